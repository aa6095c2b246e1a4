"""The report's PNG plots, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from analysis.scaling import STEP_PHASES  # noqa: E402
from gptcore.checkpoint import atomic_write_bytes  # noqa: E402


def save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def size_label(row: dict) -> str:
    return str(row["world_size"]) if row["nodes"] == 1 else f"{row['world_size']} ({row['nodes']} nodes)"


def by_nodes(rows: list[dict]) -> dict[int, list[dict]]:
    """Rows per node count, so that runs within a node and across nodes get a line each."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["nodes"], []).append(r)
    return groups


def per_nodes_lines(ax, rows: list[dict], value) -> None:
    groups = by_nodes(rows)
    for nodes, group in groups.items():
        label = "measured" if len(groups) == 1 else f"{nodes} node{'s' if nodes > 1 else ''}"
        ax.plot([r["world_size"] for r in group], [value(r) for r in group], "o-", label=label)


def speedup_plot(rows: list[dict]):
    figure, ax = plt.subplots(figsize=(5, 4))
    sizes = sorted({r["world_size"] for r in rows})
    base = rows[0]["world_size"]
    ax.plot(sizes, [n / base for n in sizes], "--", color="gray", label="ideal")
    per_nodes_lines(ax, rows, lambda r: r["speedup"])
    ax.set(xlabel="ranks", ylabel="speedup (throughput)", title=f"Speedup, {rows[0]['scaling']} scaling",
           xticks=sizes)
    ax.legend()
    return figure


def efficiency_plot(rows: list[dict]):
    figure, ax = plt.subplots(figsize=(5, 4))
    sizes = sorted({r["world_size"] for r in rows})
    ax.axhline(100, linestyle="--", color="gray")
    per_nodes_lines(ax, rows, lambda r: 100 * r["efficiency"])
    ax.set(xlabel="ranks", ylabel="parallel efficiency (%)", title="Parallel efficiency", xticks=sizes,
           ylim=(0, max(110, *(100 * r["efficiency"] + 10 for r in rows))))
    if len(by_nodes(rows)) > 1:
        ax.legend()
    return figure


def phases_plot(rows: list[dict]):
    figure, ax = plt.subplots(figsize=(6, 4))
    labels = [size_label(r) for r in rows]
    bottom = [0.0] * len(rows)
    for name in (*STEP_PHASES, "other"):
        values = [max(0.0, r["phases_ms"].get(name, 0.0)) for r in rows]
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="ranks", ylabel="ms per step (rank 0)", title="Where a step's time goes")
    ax.legend(fontsize="small")
    return figure


def loss_plot(rows: list[dict]):
    figure, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        steps, losses = zip(*r["loss_curve"])
        ax.plot(steps, losses, label=size_label(r))
    ax.set(xlabel="step", ylabel="training loss", title="Loss per size")
    ax.legend(title="ranks")
    return figure


def utilization_plot(runs):
    """One panel per run: node CPU%, each rank's process CPU% and each GPU's utilization."""
    figure, axes = plt.subplots(len(runs), 1, figsize=(7, 2.4 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        for node, samples in run.samples.items():
            if not samples:
                continue
            start = samples[0]["time"]
            seconds = [s["time"] - start for s in samples]
            ax.plot(seconds, [s["cpu_pct"] for s in samples], color="black", label=f"{node} CPU (all cores)")
            ranks = sorted({p["rank"] for s in samples for p in s["procs"]}, key=str)
            for rank in ranks:
                values = [next((p["cpu_pct"] for p in s["procs"] if p["rank"] == rank), None) for s in samples]
                ax.plot(seconds, values, alpha=0.7, label=f"rank {rank} process CPU")
            indices = sorted({g["index"] for s in samples for g in s.get("gpus", [])})
            for index in indices:
                values = [next((g["util_pct"] for g in s.get("gpus", []) if g["index"] == index), None)
                          for s in samples]
                ax.plot(seconds, values, linestyle=":", label=f"GPU {index} util")
        ax.set(title=f"{run.world_size} rank{'s' if run.world_size > 1 else ''}", xlabel="seconds", ylabel="%",
               ylim=(0, 115))
        ax.legend(fontsize="x-small", loc="lower left", ncol=3)
    return figure


def write_all(report: dict, runs, out_dir: Path) -> list[Path]:
    rows = report["runs"]
    ordered = sorted(runs, key=lambda run: (run.world_size, run.nodes))
    figures = {"speedup.png": speedup_plot(rows), "efficiency.png": efficiency_plot(rows),
               "phases.png": phases_plot(rows), "loss.png": loss_plot(rows),
               "utilization.png": utilization_plot(ordered)}
    paths = []
    for name, figure in figures.items():
        save(figure, Path(out_dir) / name)
        paths.append(Path(out_dir) / name)
    return paths
