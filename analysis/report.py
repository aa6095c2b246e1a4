"""A scaling report from training runs of different sizes: report.md, report.json and plots.

    python -m analysis.report runs/sweep/n1 runs/sweep/n2 runs/sweep/n4 --out runs/sweep/report

Each RUN_DIR is a finished `gptcore train` output directory (config.yaml, metrics.jsonl, and when
profiling was on, profile/rank*.prof and samples/node*.jsonl). The smallest run is the baseline
(normally 1 GPU); the runs must share train.scaling (strong or weak).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from analysis import plots, scaling
from analysis.runs import Run, gradient_bytes, load_run, merged_profile, summarize_samples, top_functions
from gptcore.checkpoint import atomic_write_bytes
from gptcore.cli import ArgumentParser
from gptcore.errors import GptcoreError, UserInputError

PROJECTION_SIZES = (8, 16, 32, 64)
PHASE_LABELS = {
    "data": "data loading",
    "forward": "forward",
    "backward": "backward with the gradient all-reduce (communication)",
    "optimizer": "the optimizer step (every rank repeats the full update, so it does not shrink with more ranks)",
    "other": "time outside the phases (mostly waiting for the slowest rank at the per-step sync, and logging)",
}
COMM_METHOD = (
    "Communication is estimated, not measured: DDP runs the gradient all-reduce inside backward, so "
    "comm(N) = backward(N) - backward(1) x (rows per rank at N / rows per rank at 1), i.e. backward's "
    "excess over its compute scaled from the 1-rank run (backward(N) - backward(1) under weak scaling). "
    "It assumes backward compute is linear in the rows per rank; on shared CPU cores it also includes "
    "contention between ranks.")


def describe_run(run: Run, warmup_fraction: float) -> dict:
    t, m = run.config.train, run.config.model
    step_ms = scaling.steady_step_ms(run.steps, warmup_fraction)
    phases = scaling.steady_phases_ms(run.steps, warmup_fraction)
    if phases:
        phases["other"] = step_ms - sum(phases.values())
    tokens = scaling.tokens_per_step(t.batch_size, t.grad_accum, m.block_size, run.world_size, t.scaling)
    stats = merged_profile(run.profiles)
    return {
        "path": str(run.path),
        "world_size": run.world_size,
        "nodes": run.nodes,
        "allreduce_probe": run.probes[-1] if run.probes else None,
        "scaling": t.scaling,
        "steps": run.steps[-1]["step"],
        "steady_steps_from": scaling.steady_records(run.steps, warmup_fraction)[0]["step"],
        "step_ms": step_ms,
        "tokens_per_step": tokens,
        "tokens_per_s": 1000 * tokens / step_ms,
        "phases_ms": phases,
        "eval_total_ms": scaling.total_phase_ms(run.steps, "eval"),
        "checkpoint_total_ms": scaling.total_phase_ms(run.steps, "checkpoint"),
        "final_loss": run.steps[-1]["loss"],
        "final_val_loss": run.evals[-1]["val_loss"] if run.evals else None,
        "loss_curve": [[r["step"], r["loss"]] for r in run.steps],
        "samples": {node: summarize_samples(samples) for node, samples in run.samples.items()},
        "profile_ranks": len(run.profiles),
        "profile_top": top_functions(stats, 25, "cumulative") if stats else [],
        "profile_top_self": top_functions(stats, 15, "tottime") if stats else [],
    }


def compare(rows: list[dict]) -> None:
    """Adds speedup, efficiency, per-phase excess and the communication estimate against the
    smallest run, in place."""
    base = rows[0]
    for row in rows:
        n, base_n, kind = row["world_size"], base["world_size"], row["scaling"]
        row["speedup"] = scaling.speedup(base["step_ms"], row["step_ms"], n, kind, base_n)
        row["efficiency"] = scaling.efficiency(base["step_ms"], row["step_ms"], n, kind, base_n)
        row["ideal_step_ms"] = base["step_ms"] * scaling.compute_scale(base_n, n, kind)
        if base["phases_ms"] and row["phases_ms"]:
            row["excess_ms"] = scaling.excess_ms(base["phases_ms"], row["phases_ms"], base_n, n, kind)
            row["comm_ms"] = max(0.0, row["excess_ms"]["backward"]) if n > base_n else 0.0
            row["comm_share"] = row["comm_ms"] / row["step_ms"]


def measured_probe(rows: list[dict]) -> dict | None:
    """The all-reduce probe of the run across the most nodes (then ranks), if any ran on several."""
    probes = [r["allreduce_probe"] for r in rows if r["allreduce_probe"] and r["nodes"] > 1]
    return max(probes, key=lambda p: (p["nodes"], p["world_size"]), default=None)


def node_efficiency(rows: list[dict]) -> dict:
    """Efficiency of the largest multi-rank run within one node and of the largest across nodes."""
    def largest(rows_):
        return max(rows_, key=lambda r: (r["world_size"], r["nodes"]), default=None)
    intra = largest([r for r in rows if r["nodes"] == 1 and r["world_size"] > 1])
    inter = largest([r for r in rows if r["nodes"] > 1])
    return {name: {"world_size": r["world_size"], "nodes": r["nodes"], "efficiency": r["efficiency"]} if r else None
            for name, r in (("intra_node", intra), ("inter_node", inter))}


def projection(base: dict, gradient_bytes_: int, probe: dict | None = None) -> dict:
    """Efficiency at 8..64 GPUs per link preset, and over the link the probe measured, from the
    1-rank run's measured step."""
    compute_ms = base["step_ms"]
    backward_ms = base["phases_ms"].get("backward", 0.0)
    table = []
    for link in (*scaling.LINKS, *([scaling.measured_link(probe)] if probe else [])):
        for n in PROJECTION_SIZES:
            if n > link.max_gpus:
                continue
            low, high = scaling.projected_efficiency(compute_ms, backward_ms, gradient_bytes_, n, link,
                                                     base["scaling"])
            table.append({"link": link.name, "gpus": n, "allreduce_ms": scaling.ring_allreduce_ms(gradient_bytes_, n, link),
                          "efficiency_no_overlap": low, "efficiency_overlap": high})
    return {
        "gradient_bytes": gradient_bytes_,
        "compute_ms_1": compute_ms,
        "backward_ms_1": backward_ms,
        "rows": table,
        "assumptions": [
            "compute per rank scales ideally: the 1-rank step time divided by N under strong scaling, unchanged under weak",
            "the 1-rank step time measured here is the compute time; a faster device shrinks it and lowers efficiency",
            "one ring all-reduce of every fp32 gradient per step: 2(N-1)/N x bytes / bandwidth + 2(N-1) x hop latency",
            "the ring runs at its slowest link: NVLink and PCIe only within one 8-GPU node, InfiniBand between nodes",
            "bandwidths are achievable NCCL bus bandwidths, not datasheet peaks; the measured link is this "
            "cluster's all-reduce probe (bus bandwidth of a 4 MiB all-reduce, latency of a one-element one)",
            "efficiency is given with no overlap and with the all-reduce fully hidden behind backward; DDP lies between",
        ],
    }


def limits_paragraph(report: dict) -> str:
    """What limits scaling, in words, from the numbers."""
    rows = report["runs"]
    if len(rows) < 2:
        return "Only one size ran, so there is nothing to compare; run at least two sizes."
    base, top = rows[0], rows[-1]
    n = top["world_size"]
    parts = [f"At {n} ranks the step takes {top['step_ms']:.1f} ms against an ideal "
             f"{top['ideal_step_ms']:.1f} ms ({top['scaling']} scaling from {base['world_size']} rank"
             f"{'s' if base['world_size'] > 1 else ''}), a parallel efficiency of {100 * top['efficiency']:.0f}%."]
    busy = [summary["node_cpu_pct"] for summary in top["samples"].values() if summary]
    if busy and max(busy) >= 90:
        parts.append(f"The node's CPUs were {max(busy):.0f}% busy (median of the samples): the ranks competed "
                     f"for cores, which inflates the time of every phase, the communication estimate included.")
    excess = top.get("excess_ms")
    lost = top["step_ms"] - top["ideal_step_ms"]
    if excess and lost > 0:
        ranked = sorted(((ms, name) for name, ms in excess.items() if ms > 0), reverse=True)
        added = sum(ms for ms, _ in ranked)
        named = [f"{PHASE_LABELS[name]}: +{ms:.1f} ms ({100 * ms / added:.0f}% of the time added over ideal)"
                 for ms, name in ranked[:2]]
        if named:
            parts.append("The lost time goes mostly to " + "; then ".join(named) + ".")
    elif lost <= 0:
        parts.append("It is at or above ideal: nothing measurable is lost at this size.")
    projected = report.get("projection")
    if projected and projected["rows"]:
        worst = min((r for r in projected["rows"] if r["gpus"] == max(PROJECTION_SIZES)),
                    key=lambda r: r["efficiency_overlap"], default=None)
        if worst:
            parts.append(
                f"Projected at {worst['gpus']} GPUs over {worst['link']}: the all-reduce of "
                f"{projected['gradient_bytes'] / 2**20:.2f} MiB takes {worst['allreduce_ms']:.2f} ms, for an "
                f"efficiency of {100 * worst['efficiency_no_overlap']:.0f}-{100 * worst['efficiency_overlap']:.0f}%.")
    return " ".join(parts)


def build_report(runs: list[Run], warmup_fraction: float = 0.1) -> dict:
    kinds = {run.config.train.scaling for run in runs}
    if len(kinds) > 1:
        raise UserInputError("the runs mix strong and weak scaling (train.scaling); compare runs of one kind")
    rows = sorted((describe_run(run, warmup_fraction) for run in runs),
                  key=lambda row: (row["world_size"], row["nodes"]))
    compare(rows)
    probe = measured_probe(rows)
    report = {"scaling": rows[0]["scaling"], "baseline_world_size": rows[0]["world_size"],
              "warmup_fraction": warmup_fraction, "comm_method": COMM_METHOD, "runs": rows,
              "node_efficiency": node_efficiency(rows),
              "measured_link": {"busbw_gbps": probe["busbw_gbps"], "latency_us": probe["latency_us"],
                                "bytes": probe["bytes"], "nodes": probe["nodes"],
                                "world_size": probe["world_size"]} if probe else None}
    if rows[0]["world_size"] == 1 and rows[0]["phases_ms"]:
        smallest = min(runs, key=lambda run: run.world_size)
        report["projection"] = projection(rows[0], gradient_bytes(smallest.config), probe)
    report["limits"] = limits_paragraph(report)
    return report


# -- markdown -------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    rows = report["runs"]
    base_n = report["baseline_world_size"]
    out = [f"# Scaling report ({report['scaling']} scaling)", "",
           f"Baseline: {base_n} rank{'s' if base_n > 1 else ''}. Step time is the median ms per optimizer step "
           f"after warm-up (the first logged window and the first {100 * report['warmup_fraction']:.0f}% of steps "
           f"are dropped), with eval and checkpoint time taken out.", "",
           "## Scaling", "",
           table(["ranks", "step ms", "tokens/s", "speedup", "ideal", "efficiency", "comm ms (share)",
                  "final loss", "run"],
                 [[r["world_size"], f"{r['step_ms']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x",
                   f"{r['world_size'] / base_n:.0f}x", f"{100 * r['efficiency']:.0f}%",
                   f"{r['comm_ms']:.2f} ({100 * r['comm_share']:.0f}%)" if "comm_ms" in r else "-",
                   f"{r['final_loss']:.4f}", f"`{r['path']}`"] for r in rows]),
           "", "## What limits scaling", "", report["limits"], "",
           "## Where a step's time goes (ms per step, rank 0, median after warm-up)", ""]
    names = [name for name in (*scaling.STEP_PHASES, "other") if any(name in r["phases_ms"] for r in rows)]
    out += [table(["ranks", *names, "step", "eval total", "checkpoint total"],
                  [[r["world_size"], *(f"{r['phases_ms'].get(name, 0.0):.2f}" for name in names),
                    f"{r['step_ms']:.2f}", f"{r['eval_total_ms']:.0f}", f"{r['checkpoint_total_ms']:.0f}"]
                   for r in rows]),
            "", "Backward includes DDP's gradient all-reduce. " + report["comm_method"], ""]
    out += render_nodes(report)
    out += render_samples(rows)
    out += render_profiles(rows)
    if "projection" in report:
        out += render_projection(report["projection"])
    out += ["## Plots", "", "![speedup](speedup.png) ![efficiency](efficiency.png)", "",
            "![phases](phases.png) ![loss](loss.png)", "", "![utilization](utilization.png)", ""]
    return "\n".join(out)


def render_nodes(report: dict) -> list[str]:
    """Runs within one node against runs across nodes, with each run's all-reduce probe."""
    rows = report["runs"]
    if not any(r["allreduce_probe"] for r in rows):
        return []
    def probe_cells(probe):
        if not probe:
            return ["-", "-", "-"]
        return [f"{probe['busbw_gbps']:.3f}", f"{1000 * probe['seconds']:.2f}", f"{probe['latency_us']:.0f}"]
    lines = ["## Within a node and across nodes", "",
             table(["nodes", "ranks per node", "ranks", "step ms", "efficiency", "all-reduce bus GB/s",
                    "probe all-reduce ms", "latency us"],
                   [[r["nodes"], r["world_size"] // r["nodes"], r["world_size"], f"{r['step_ms']:.2f}",
                     f"{100 * r['efficiency']:.0f}%", *probe_cells(r["allreduce_probe"])] for r in rows]), ""]
    words = {"intra_node": "within one node", "inter_node": "across nodes"}
    found = [f"{words[name]} {100 * e['efficiency']:.0f}% at {e['world_size']} ranks on {e['nodes']} node(s)"
             for name, e in report["node_efficiency"].items() if e]
    if found:
        lines += ["Parallel efficiency " + "; ".join(found) + ".", ""]
    link = report["measured_link"]
    if link:
        lines += [f"Measured link: {link['busbw_gbps']:.3f} GB/s all-reduce bus bandwidth "
                  f"({link['bytes'] / 2**20:.0f} MiB float32, 2(n-1)/n x bytes / time) and {link['latency_us']:.0f} us "
                  f"per one-element all-reduce, {link['world_size']} ranks on {link['nodes']} nodes. The projection "
                  "below uses it alongside the presets.", ""]
    return lines


def render_samples(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        for node, summary in r["samples"].items():
            if not summary:
                continue
            ranks = ", ".join(f"r{rank} {s['cpu_pct']:.0f}% / {s['rss_peak_mib']:.0f} MiB"
                              for rank, s in summary["ranks"].items())
            gpus = ", ".join(f"gpu{index} {g['util_pct']:.0f}% / {g['mem_peak_mib']:,.0f} of {g['mem_total_mib']:,.0f} MiB"
                             for index, g in summary.get("gpus", {}).items()) or "no nvidia-smi"
            lines.append([r["world_size"], node, summary["samples"], f"{summary['node_cpu_pct']:.0f}%",
                          ranks, gpus])
    if not lines:
        return []
    return ["## Hardware samples (medians; memory is the peak)", "",
            table(["ranks", "node", "samples", "node CPU", "process CPU / peak RSS per rank",
                   "GPU util / peak memory"], lines), ""]


def render_profiles(rows: list[dict]) -> list[str]:
    profiled = [r for r in rows if r["profile_top"]]
    if not profiled:
        return []
    r = profiled[-1]
    def where(f):
        return f"`{f['function']}` ({Path(f['file']).name}:{f['line']})" if f["line"] else f"`{f['function']}`"
    return [f"## cProfile of the training loop, {r['world_size']} ranks, all {r['profile_ranks']} ranks added", "",
            "By cumulative time (time inside the function and its callees, summed over ranks):", "",
            table(["function", "calls", "cumulative s", "own s"],
                  [[where(f), f["calls"], f"{f['cumtime_s']:.3f}", f"{f['tottime_s']:.3f}"] for f in r["profile_top"][:12]]),
            "", "By own time (hot spots):", "",
            table(["function", "calls", "own s"],
                  [[where(f), f["calls"], f"{f['tottime_s']:.3f}"] for f in r["profile_top_self"][:8]]),
            "", "Every run's profiles, one per rank: `<run>/profile/rank<R>.prof` "
            "(`python -m pstats`, snakeviz) and `rank<R>.txt`.", ""]


def render_projection(projected: dict) -> list[str]:
    sizes = sorted({row["gpus"] for row in projected["rows"]})
    links = list(dict.fromkeys(row["link"] for row in projected["rows"]))
    cells = {(row["link"], row["gpus"]): row for row in projected["rows"]}
    def cell(link, n):
        row = cells.get((link, n))
        if row is None:
            return "-"
        return (f"{100 * row['efficiency_no_overlap']:.0f}-{100 * row['efficiency_overlap']:.0f}% "
                f"({row['allreduce_ms']:.2f} ms)")
    return ["## Projection to more GPUs (analytic)", "",
            f"Gradients: {projected['gradient_bytes'] / 2**20:.2f} MiB per step; measured 1-rank compute "
            f"{projected['compute_ms_1']:.2f} ms per step (backward {projected['backward_ms_1']:.2f} ms). "
            "Each cell: efficiency without overlap - with full overlap (all-reduce time).", "",
            table(["link", *(f"{n} GPUs" for n in sizes)], [[link, *(cell(link, n) for n in sizes)] for link in links]),
            "", "Assumptions:", "", *(f"- {a}" for a in projected["assumptions"]), ""]


# -- files ----------------------------------------------------------------------------------------

def write_report(runs: list[Run], out_dir: Path, warmup_fraction: float = 0.1) -> Path:
    """report.md, report.json and the plots in out_dir, each written atomically."""
    out_dir = Path(out_dir)
    report = build_report(runs, warmup_fraction)
    plots.write_all(report, runs, out_dir)
    atomic_write_bytes(out_dir / "report.json", json.dumps(report, indent=1).encode("utf-8"))
    atomic_write_bytes(out_dir / "report.md", render_markdown(report).encode("utf-8"))
    return out_dir / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with config.yaml and metrics.jsonl)")
    parser.add_argument("--out", required=True, help="directory for report.md, report.json and the plots")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps dropped as warm-up")
    try:
        args = parser.parse_args(argv)
        if not 0 <= args.warmup < 1:
            raise UserInputError(f"--warmup must be in [0, 1), got {args.warmup}")
        path = write_report([load_run(run) for run in args.runs], Path(args.out), args.warmup)
    except GptcoreError as err:
        print(f"analysis: error: {err}", file=sys.stderr)
        return err.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
