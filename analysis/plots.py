"""The report's PNG plots, drawn with matplotlib's Agg backend (no display needed).

Every panel says what it cannot show: a size with too few hardware samples gets a line of text
instead of an empty axis, and a size the report flagged is drawn with a hollow marker."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from analysis.scaling import STEP_PHASES  # noqa: E402
from gptcore.files import atomic_write_bytes  # noqa: E402

STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P")
MIN_SAMPLES = 3


def save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def size_label(row: dict) -> str:
    label = str(row["world_size"]) if row["nodes"] == 1 else f"{row['world_size']} ({row['nodes']} nodes)"
    return f"{label} {row['parallel']}" if row.get("parallel", "ddp") != "ddp" else label


def line_label(parallel: str, nodes: int, mixed: bool) -> str:
    where = f"{nodes} node{'s' if nodes > 1 else ''}"
    return f"{parallel}, {where}" if mixed else where


def by_line(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Rows per (strategy, node count), so that DDP and FSDP, and runs within a node and across
    nodes, get a line each."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("parallel", "ddp"), r["nodes"]), []).append(r)
    return groups


def interval_lines(ax, rows: list[dict], value, interval) -> None:
    """Measured points with their 95% intervals as error bars, a line per node count; flagged
    sizes hollow."""
    groups = by_line(rows)
    mixed = len({parallel for parallel, _ in groups}) > 1
    for index, ((parallel, nodes), group) in enumerate(groups.items()):
        label = "measured (95% interval)" if len(groups) == 1 else line_label(parallel, nodes, mixed)
        xs, ys = [r["world_size"] for r in group], [value(r) for r in group]
        low = [y - interval(r)[0] for y, r in zip(ys, group)]
        high = [interval(r)[1] - y for y, r in zip(ys, group)]
        line = ax.errorbar(xs, ys, yerr=[low, high], fmt=MARKERS[index % len(MARKERS)] + STYLES[index % len(STYLES)],
                           capsize=4, label=label)
        for r, x, y in zip(group, xs, ys):
            if r["flags"]:
                ax.plot([x], [y], MARKERS[index % len(MARKERS)], markersize=11, markerfacecolor="white",
                        color=line[0].get_color())
                ax.annotate(", ".join(flag["kind"] for flag in r["flags"]), (x, y), textcoords="offset points",
                            xytext=(6, 6), fontsize="x-small")


def speedup_plot(rows: list[dict]):
    figure, ax = plt.subplots(figsize=(5.5, 4))
    sizes = sorted({r["world_size"] for r in rows})
    base = rows[0]["world_size"]
    ax.plot(sizes, [n / base for n in sizes], "--", color="gray", label="ideal")
    interval_lines(ax, rows, lambda r: r["speedup"], lambda r: r["speedup_interval"])
    ax.set(xlabel="ranks", ylabel="speedup (throughput)", title=f"Speedup, {rows[0]['scaling']} scaling",
           xticks=sizes)
    ax.legend(fontsize="small")
    return figure


def efficiency_plot(rows: list[dict]):
    figure, ax = plt.subplots(figsize=(5.5, 4))
    sizes = sorted({r["world_size"] for r in rows})
    ax.axhline(100, linestyle="--", color="gray", label="ideal (100%)")
    interval_lines(ax, rows, lambda r: 100 * r["efficiency"], lambda r: tuple(100 * v for v in r["efficiency_interval"]))
    top = max(110, *(100 * r["efficiency_interval"][1] + 10 for r in rows))
    ax.set(xlabel="ranks", ylabel="parallel efficiency (%)", title="Parallel efficiency", xticks=sizes, ylim=(0, top))
    ax.legend(fontsize="small")
    return figure


def phases_plot(rows: list[dict]):
    figure, ax = plt.subplots(figsize=(6, 4))
    labels = [size_label(r) for r in rows]
    if not any(r["phases_ms"] for r in rows):
        ax.text(0.5, 0.5, "no phase timers in these runs\n(profile.phases=true)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return figure
    bottom = [0.0] * len(rows)
    for name in (*STEP_PHASES, "other"):
        values = [max(0.0, r["phases_ms"].get(name, 0.0)) for r in rows]
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="ranks", ylabel="ms per step (rank 0)", title="Where a step's time goes")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def loss_plot(rows: list[dict], agreement: dict | None, agreement_limit: float):
    figure, ax = plt.subplots(figsize=(6.5, 4))
    for index, r in enumerate(rows):
        steps, losses = zip(*r["loss_curve"])
        every = max(len(rows), len(steps) // 8)
        # Identical curves (DDP's promise) must stay visible: wide pale lines under narrow ones,
        # and each size's markers on other steps than the next size's.
        line, = ax.plot(steps, losses, STYLES[index % len(STYLES)], linewidth=max(1.0, 4.0 - 1.5 * index),
                        alpha=0.9 if index else 0.5, marker=MARKERS[index % len(MARKERS)], markerfacecolor="none",
                        markevery=(index % every, every), label=f"{size_label(r)} train")
        if r["val_curve"]:
            val_steps, val = zip(*r["val_curve"])
            ax.plot(val_steps, val, "x+1234"[index % 6], markersize=10 - index, markeredgewidth=2,
                    color=line.get_color(), label=f"{size_label(r)} val")
    ax.set(xlabel="step", ylabel="loss", title="Loss per size" if len(rows) > 1 else "Loss")
    ax.legend(title="ranks", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if agreement is not None and len(rows) > 1:
        note = (f"train curves agree within {agreement_limit:g} (max {agreement['worst']:.1e}): data parallelism's "
                "promise holds" if agreement["worst"] <= agreement_limit else
                f"train curves typically {agreement['typical']:.1e} apart, at most {agreement['worst']:.1e} "
                f"at step {agreement['worst_step']}{' (a loss spike)' if agreement['spike'] else ''}")
        ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize="small")
    return figure


def utilization_plot(runs):
    """One panel per size (its first run): the node's CPU, each rank's process, others' load and
    each GPU, all in % of the node's CPUs (GPUs: % of the GPU)."""
    figure, axes = plt.subplots(len(runs), 1, figsize=(8, 2.6 * len(runs)), squeeze=False, layout="constrained")
    for ax, run in zip(axes[:, 0], runs):
        title = f"{run.world_size} rank{'s' if run.world_size > 1 else ''}, {run.config.train.parallel}"
        samples = [s for node in run.samples.values() for s in node]
        if len(samples) < MIN_SAMPLES:
            ax.text(0.5, 0.5, f"{title}: {len(samples)} hardware sample(s), too few to draw\n"
                    "(lower profile.sampler_interval or train longer)", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for node, node_samples in run.samples.items():
            start = node_samples[0]["time"]
            seconds = [s["time"] - start for s in node_samples]
            ax.plot(seconds, [s["cpu_pct"] for s in node_samples], color="black", label=f"{node}: all processes")
            if any("others_cpu_pct" in s for s in node_samples):
                ax.plot(seconds, [s.get("others_cpu_pct") for s in node_samples], color="red", linestyle="--",
                        label=f"{node}: other processes")
            ranks = sorted({p["rank"] for s in node_samples for p in s["procs"]}, key=str)
            for index, rank in enumerate(ranks):
                values = [next((p["cpu_pct"] / s.get("cpus", 1) for p in s["procs"] if p["rank"] == rank), None)
                          for s in node_samples]
                ax.plot(seconds, values, STYLES[index % len(STYLES)], alpha=0.8, label=f"rank {rank} process")
            indices = sorted({g["index"] for s in node_samples for g in s.get("gpus", [])})
            for index in indices:
                values = [next((g["util_pct"] for g in s.get("gpus", []) if g["index"] == index), None)
                          for s in node_samples]
                ax.plot(seconds, values, ":", label=f"GPU {index} util (% of the GPU)")
        ax.set(title=title, xlabel="seconds", ylabel="% of the node's CPU", ylim=(0, 105))
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def write_all(report: dict, runs, out_dir: Path) -> list[Path]:
    rows = report["runs"]
    firsts = {}
    for run in sorted(runs, key=lambda run: (run.config.train.parallel, run.world_size, run.nodes)):
        firsts.setdefault((run.config.train.parallel, run.world_size, run.nodes), run)
    figures = {"phases.png": phases_plot(rows),
               "loss.png": loss_plot(rows, report["loss_agreement"], report["thresholds"]["agreement"]),
               "utilization.png": utilization_plot(list(firsts.values()))}
    if len(rows) > 1:
        figures.update({"speedup.png": speedup_plot(rows), "efficiency.png": efficiency_plot(rows)})
    paths = []
    for name, figure in figures.items():
        save(figure, Path(out_dir) / name)
        paths.append(Path(out_dir) / name)
    return paths
