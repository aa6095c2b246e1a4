"""A scaling report from training runs of different sizes: report.md, report.json and plots.

    python -m analysis.report runs/sweep/n1 runs/sweep/n2 runs/sweep/n4 --out runs/sweep/report
    python -m analysis.report runs/cpu --out runs/cpu/report         # one run: its own report
    python -m analysis.report runs/sweep/n* --out runs/sweep/report --tensorboard runs/sweep/tb

Each RUN_DIR is a finished `gptcore train` output directory (config.yaml, metrics.jsonl, and when
profiling was on, profile/rank*.prof and samples/node*.jsonl). Runs of the same size (ranks and
nodes) are repeats and are pooled. The smallest size is the baseline (normally 1 GPU); the runs
must share train.scaling (strong or weak).

The report measures its own noise and says what it cannot conclude. A size's step time is the
median of its logged windows after warm-up, with a 95% bootstrap interval over those windows
(all repeats together); speedup and efficiency get intervals the same way. A size is flagged,
and nothing is explained from it, when its data are thin (fewer than MIN_WINDOWS timed windows,
fewer than MIN_SAMPLES hardware samples), when other processes used more than SHARED_NODE_PCT
of its node's CPU while it ran, when its ranks asked for more threads than the node has cores,
or when its efficiency is above 100% by more than its interval.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from analysis import plots, scaling, strategies
from analysis.runs import Run, gradient_bytes, load_run, merged_profile, top_functions
from gptcore.cli import ArgumentParser
from gptcore.cluster.parallel import STRATEGIES
from gptcore.cluster.spinning import SHARED_NODE_PCT
from gptcore.errors import GptcoreError, UserInputError
from gptcore.files import atomic_write_bytes, check_output
from gptcore.telemetry.sampler import describe_cost, shared_node_load, summarize_samples

PROJECTION_SIZES = (8, 16, 32, 64)
MIN_WINDOWS = 5  # timed windows after warm-up, all repeats together
MIN_SAMPLES = 3  # hardware samples per run, where the sampler ran
AGREEMENT = 1e-4  # DDP's promise: every size follows the same loss curve within this
PHASE_LABELS = {
    "data": "data loading",
    "forward": "forward",
    "backward": "backward with the gradient all-reduce (communication)",
    "optimizer": "the optimizer step (every rank repeats the full update, so it does not shrink with more ranks)",
    "other": "time outside the phases (mostly waiting for the slowest rank at the per-step sync, and logging)",
}
COMM_METHOD = (
    "Communication is measured where it happens: a DDP communication hook times each gradient bucket's "
    "all-reduce (host clock on gloo, CUDA events on NCCL); `all-reduce ms` is the time per step some bucket "
    "was in flight, `exposed ms` the part after the last bucket was ready, which backward waited for. "
    "The estimate beside it, backward(N) - backward(1) x (rows per rank at N / rows per rank at 1), is a "
    "cross-check: on shared CPU cores it also holds contention between ranks.")


def size_key(run: Run) -> tuple[int, int, int]:
    return STRATEGIES.index(run.config.train.parallel), run.world_size, run.nodes


def group_by_size(runs: list[Run]) -> list[list[Run]]:
    """Runs of one size (strategy, ranks, nodes) are repeats of one measurement; DDP's sizes in
    order, then FSDP's."""
    groups: dict[tuple[int, int], list[Run]] = {}
    for run in runs:
        groups.setdefault(size_key(run), []).append(run)
    return [groups[key] for key in sorted(groups)]


def size_name(row: dict) -> str:
    """How a table names a size: its ranks, and its strategy when that is not DDP."""
    return f"{row['world_size']}" + (f" {row['parallel']}" if row.get("parallel", "ddp") != "ddp" else "")


def median_of(records: list[dict], read) -> float | None:
    values = [value for value in (read(r) for r in records) if value is not None]
    return statistics.median(values) if values else None


def describe_size(runs: list[Run], warmup_fraction: float) -> dict:
    """One size's row: its repeats pooled."""
    first = runs[0]
    t, m = first.config.train, first.config.model
    steady = [r for run in runs for r in scaling.steady_records(run.steps, warmup_fraction)]
    windows = [ms for run in runs for ms in scaling.steady_windows(run.steps, warmup_fraction)]
    if not windows:
        raise UserInputError(f"{first.path} has no timed windows after warm-up; train for more steps")
    step_ms = statistics.median(windows)
    phases = {name: statistics.median(r["phases_ms"].get(name, 0.0) for r in steady if r.get("phases_ms"))
              for name in scaling.STEP_PHASES} if any(r.get("phases_ms") for r in steady) else {}
    if phases:
        phases["other"] = step_ms - sum(phases.values())
    tokens = scaling.tokens_per_step(t.batch_size, t.grad_accum, m.block_size, first.world_size, t.scaling)
    stats = merged_profile([path for run in runs for path in run.profiles])
    nodes: dict[str, list[dict]] = {}
    for run in runs:
        for node, samples in run.samples.items():
            nodes.setdefault(node, []).extend(samples)
    samples = {node: summarize_samples(found) for node, found in nodes.items()}
    others = [s["others_cpu_pct"] for s in samples.values() if "others_cpu_pct" in s]
    comm = [r["comm"] for r in steady if r.get("comm")]
    start = first.start or {}
    memory = next((r["memory"] for r in reversed(first.steps) if r.get("memory")), None)
    return {
        "parallel": t.parallel,
        "reshard_after_forward": t.reshard_after_forward,
        "memory": memory,
        "parameters": gradient_bytes(first.config) // 4,
        "path": str(first.path),
        "paths": [str(run.path) for run in runs],
        "repeats": len(runs),
        "world_size": first.world_size,
        "nodes": first.nodes,
        "allreduce_probe": first.probes[-1] if first.probes else None,
        "scaling": t.scaling,
        "steps": first.steps[-1]["step"],
        "steady_steps_from": scaling.steady_records(first.steps, warmup_fraction)[0]["step"],
        "windows": len(windows),
        "step_ms": step_ms,
        "step_ms_interval": scaling.median_interval(windows),
        "step_ms_quartiles": scaling.quartiles(windows),
        "repeat_step_ms": [statistics.median(scaling.steady_windows(run.steps, warmup_fraction)) for run in runs],
        "window_ms": windows,
        "tokens_per_step": tokens,
        "tokens_per_s": 1000 * tokens / step_ms,
        "phases_ms": phases,
        "comm_measured": {name: statistics.median(c[name] for c in comm) for name in comm[0]} if comm else None,
        "eval_total_ms": scaling.total_phase_ms(first.steps, "eval"),
        "checkpoint_total_ms": scaling.total_phase_ms(first.steps, "checkpoint"),
        "final_loss": first.steps[-1]["loss"],
        "final_val_loss": first.evals[-1]["val_loss"] if first.evals else None,
        "loss_curve": [[r["step"], r["loss"]] for r in first.steps],
        "val_curve": [[r["step"], r["val_loss"]] for r in first.evals],
        "sampled": bool(nodes),
        "samples": samples,
        "others_cpu_pct": max(others) if others else None,
        "shared_cost": shared_node_load(first.steps, first.samples.get("node0", [])),
        "threads": start.get("threads"),
        "node_cpus": start.get("node_cpus"),
        "dtype": start.get("dtype"),
        "ranks_per_node": first.world_size // max(1, first.nodes),
        "profile_ranks": len(first.profiles),
        "profile_top": top_functions(stats, 25, "cumulative") if stats else [],
        "profile_top_self": top_functions(stats, 15, "tottime") if stats else [],
    }


def data_flags(row: dict) -> list[dict]:
    """What keeps a size's numbers from meaning what they seem to: each with what to change."""
    found, thin, fixes = [], [], []
    if row["windows"] < MIN_WINDOWS:
        thin.append(f"only {row['windows']} timed window(s) after warm-up (at least {MIN_WINDOWS} wanted)")
        fixes.append("raise train.max_iters or lower train.log_interval, or run --repeats")
    fewest = min((s["samples"] for s in row["samples"].values() if s), default=0)
    if row["sampled"] and fewest < MIN_SAMPLES:
        thin.append(f"only {fewest} hardware sample(s) (at least {MIN_SAMPLES} wanted)")
        fixes.append("lower profile.sampler_interval or raise train.max_iters")
    if thin:  # one flag per kind, so that the table names each once
        found.append({"kind": "thin", "text": " and ".join(thin), "fix": "; ".join(fixes)})
    if row["others_cpu_pct"] is not None and row["others_cpu_pct"] > SHARED_NODE_PCT:
        cost = f" ({describe_cost(row['shared_cost'])})" if row.get("shared_cost") else ""
        found.append({"kind": "shared", "text": f"node shared: other processes used {row['others_cpu_pct']:.0f}% of "
                      f"its CPU while this size ran{cost}",
                      "fix": "rerun on a quiet node (or an exclusive allocation), with --repeats to see the spread"})
    threads, cores, ranks = row["threads"], row["node_cpus"], row["ranks_per_node"]
    if threads and cores and threads * ranks > cores:
        fix = (f"run at most {cores} rank(s) per {cores}-core node, or use nodes with more cores" if threads == 1 else
               "leave train.threads and OMP_NUM_THREADS unset, so that each rank takes its share of the cores")
        found.append({"kind": "oversubscribed", "text": f"{ranks} rank(s) x {threads} thread(s) on {cores} core(s): "
                      "the ranks fight over the cores", "fix": fix})
    return found


def compare(rows: list[dict]) -> None:
    """Adds speedup, efficiency, their intervals, per-phase excess, the communication estimate
    and the above-ideal flag against the smallest size, in place."""
    bases: dict[str, dict] = {}
    for row in rows:
        base = bases.setdefault(row.get("parallel", "ddp"), row)  # each strategy against its own smallest size
        n, base_n, kind = row["world_size"], base["world_size"], row["scaling"]
        factor = n / base_n if kind == "weak" else 1.0
        row["speedup"] = scaling.speedup(base["step_ms"], row["step_ms"], n, kind, base_n)
        row["efficiency"] = scaling.efficiency(base["step_ms"], row["step_ms"], n, kind, base_n)
        low, high = scaling.ratio_interval(base["window_ms"], row["window_ms"]) if row is not base else (1.0, 1.0)
        row["speedup_interval"] = (factor * low, factor * high)
        row["efficiency_interval"] = (factor * low / (n / base_n), factor * high / (n / base_n))
        row["ideal_step_ms"] = base["step_ms"] * scaling.compute_scale(base_n, n, kind)
        row["flags"] = data_flags(row)
        if row["efficiency_interval"][0] > 1.0:
            row["flags"].append({"kind": "above ideal", "text": f"efficiency {100 * row['efficiency']:.0f}% "
                                 f"(interval {100 * row['efficiency_interval'][0]:.0f}-"
                                 f"{100 * row['efficiency_interval'][1]:.0f}%) is beyond 100%",
                                 "fix": "the baseline was slowed (see its flags) or did other work: rerun the sizes "
                                        "together with --repeats"})
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


def percent_range(interval: tuple[float, float]) -> str:
    return f"{100 * interval[0]:.0f}-{100 * interval[1]:.0f}%"


def limits_paragraph(report: dict) -> str:
    """What limits scaling, in words, from the numbers, and only as far as they carry."""
    rows = report["runs"]
    if len(rows) < 2:
        row = rows[0]
        low, high = row["step_ms_interval"]
        text = (f"One size ran ({row['world_size']} rank{'s' if row['world_size'] > 1 else ''}, {row['repeats']} "
                f"run(s)): {row['step_ms']:.1f} ms per step (95% interval {low:.1f}-{high:.1f} ms over "
                f"{row['windows']} windows), so there is no scaling to compare; run at least two sizes for that.")
        return text + "".join(f" Note: {flag['text']}; {flag['fix']}." for flag in row["flags"])
    base = rows[0]
    flagged = [(row, flag) for row in rows for flag in row["flags"]]
    clean = [row for row in rows[1:] if not row["flags"]]
    left_out = ""
    if flagged:
        fixes = "; ".join(dict.fromkeys(flag["fix"] for _, flag in flagged))
        said = "; ".join(f"at {row['world_size']} rank(s), {flag['text']}" for row, flag in flagged)
        if base["flags"] or not clean:
            return f"No conclusion is drawn from these numbers: {said}. To get one: {fixes}."
        left_out = f"Left out of this: {said}. To include them: {fixes}."
    top = clean[-1]
    n = top["world_size"]
    parts = [f"At {n} ranks{' (the largest size without a flag)' if top is not rows[-1] else ''} the step takes "
             f"{top['step_ms']:.1f} ms (95% interval {top['step_ms_interval'][0]:.1f}-{top['step_ms_interval'][1]:.1f}) "
             f"against an ideal {top['ideal_step_ms']:.1f} ms ({top['scaling']} scaling from {base['world_size']} "
             f"rank{'s' if base['world_size'] > 1 else ''}), a parallel efficiency of {100 * top['efficiency']:.0f}% "
             f"(interval {percent_range(top['efficiency_interval'])})."]
    low, high = top["efficiency_interval"]
    if low <= 1.0 <= high:
        parts.append("That is within the measurement's noise of ideal: nothing measurable is lost at this size.")
    else:
        busy = [summary["node_cpu_pct"] for summary in top["samples"].values() if summary]
        if busy and max(busy) >= 90:
            parts.append(f"The node's CPUs were {max(busy):.0f}% busy (median of the samples), by this run's own ranks "
                         "(other processes used little): the ranks competed for cores, which inflates the time of "
                         "every phase, the communication estimate included.")
        measured = top.get("comm_measured")
        if measured:
            parts.append(f"The gradient all-reduce took {measured['allreduce_ms']:.1f} ms per step, "
                         f"{measured['exposed_ms']:.1f} ms of it after the last bucket was ready (not hidden behind "
                         "backward).")
        excess = top.get("excess_ms")
        lost = top["step_ms"] - top["ideal_step_ms"]
        if excess and lost > 0:
            ranked = sorted(((ms, name) for name, ms in excess.items() if ms > 0), reverse=True)
            added = sum(ms for ms, _ in ranked)
            named = [f"{PHASE_LABELS[name]}: +{ms:.1f} ms ({100 * ms / added:.0f}% of the time added over ideal)"
                     for ms, name in ranked[:2]]
            if named:
                parts.append("The lost time goes mostly to " + "; then ".join(named) + ".")
    projected = report.get("projection")
    if projected and projected["rows"]:
        worst = min((r for r in projected["rows"] if r["gpus"] == max(PROJECTION_SIZES)),
                    key=lambda r: r["efficiency_overlap"], default=None)
        if worst:
            parts.append(
                f"Projected at {worst['gpus']} GPUs over {worst['link']}: the all-reduce of "
                f"{projected['gradient_bytes'] / 2**20:.2f} MiB takes {worst['allreduce_ms']:.2f} ms, for an "
                f"efficiency of {100 * worst['efficiency_no_overlap']:.0f}-{100 * worst['efficiency_overlap']:.0f}%.")
    return " ".join([*parts, *([left_out] if left_out else [])])


def loss_agreement(rows: list[dict]) -> dict | None:
    """How far the sizes' losses are apart at the steps they all logged: typically (the median),
    at worst (with its step), how many steps break the promise, and whether the worst is one
    step at a loss spike, where the sizes' rounding differences are magnified for a moment."""
    curves = [dict(map(tuple, r["loss_curve"])) for r in rows]
    common = sorted(set.intersection(*(set(curve) for curve in curves))) if len(curves) > 1 else []
    if not common:
        return None
    apart = [max(curve[step] for curve in curves) - min(curve[step] for curve in curves) for step in common]
    worst = max(range(len(common)), key=apart.__getitem__)
    mean_loss = [statistics.mean(curve[step] for curve in curves) for step in common]
    return {"typical": statistics.median(apart), "worst": apart[worst], "worst_step": common[worst],
            "steps": len(common), "beyond": sum(gap > AGREEMENT for gap in apart),
            "spike": is_spike(mean_loss, worst)}


def is_spike(losses: list[float], index: int) -> bool:
    """Whether the loss at index jumps above both neighbours by more than 3 typical step-to-step changes."""
    if not 0 < index < len(losses) - 1:
        return False
    typical_change = statistics.median(abs(b - a) for a, b in zip(losses, losses[1:]))
    return losses[index] - max(losses[index - 1], losses[index + 1]) > 3 * typical_change


def agreement_verdict(agreement: dict, bf16: bool) -> str:
    promise = f"{AGREEMENT:.0e}".replace("e-0", "e-")
    typical = f"typically {agreement['typical']:.1e} apart, at most {agreement['worst']:.1e} at step {agreement['worst_step']}"
    if agreement["worst"] <= AGREEMENT:
        return f"{typical}: within {promise} at every common step, data parallelism's promise holds"
    if agreement["beyond"] == 1 and agreement["spike"]:
        return (f"{typical}, the only one of {agreement['steps']} common steps beyond {promise}. That step is a loss "
                "spike, where the sizes' small rounding differences are magnified for one step; every other step "
                f"is within {promise}, so data parallelism's promise holds")
    verdict = (f"{typical}; {agreement['beyond']} of {agreement['steps']} common steps are beyond the {promise} data "
               "parallelism promises")
    if bf16:
        verdict += (" (these runs trained under bf16 autocast, where a batch split over more ranks rounds "
                    f"differently; in fp32 the sizes agree within {promise})")
    return verdict


def build_report(runs: list[Run], warmup_fraction: float = 0.1) -> dict:
    kinds = {run.config.train.scaling for run in runs}
    if len(kinds) > 1:
        raise UserInputError("the runs mix strong and weak scaling (train.scaling); compare runs of one kind")
    groups = group_by_size(runs)
    rows = [describe_size(group, warmup_fraction) for group in groups]
    compare(rows)
    probe = measured_probe(rows)
    first_strategy = [row for row in rows if row["parallel"] == rows[0]["parallel"]]
    agreement = loss_agreement(rows)
    report = {"scaling": rows[0]["scaling"], "baseline_world_size": rows[0]["world_size"],
              "warmup_fraction": warmup_fraction, "comm_method": COMM_METHOD, "runs": rows,
              "loss_agreement": agreement, "node_efficiency": node_efficiency(rows),
              "thresholds": {"min_windows": MIN_WINDOWS, "min_samples": MIN_SAMPLES,
                             "shared_node_pct": SHARED_NODE_PCT, "agreement": AGREEMENT},
              "measured_link": {"busbw_gbps": probe["busbw_gbps"], "latency_us": probe["latency_us"],
                                "bytes": probe["bytes"], "nodes": probe["nodes"],
                                "world_size": probe["world_size"]} if probe else None}
    if rows[0]["world_size"] == 1 and rows[0]["phases_ms"] and len(first_strategy) > 1:
        report["projection"] = projection(rows[0], gradient_bytes(groups[0][0].config), probe)
    report["limits"] = limits_paragraph({**report, "runs": first_strategy})
    if any(row["parallel"] == "fsdp" for row in rows):
        report["strategies"] = strategies.compare_strategies(rows, groups[0][0].config, probe)
    return report


# -- markdown -------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    rows = report["runs"]
    base_n = report["baseline_world_size"]
    several = len(rows) > 1
    step_time = (f"Step time is the median ms per optimizer step over the logged windows after warm-up (the first "
                 f"window and the first {100 * report['warmup_fraction']:.0f}% of steps are dropped), with eval and "
                 "checkpoint time taken out, all repeats of a size together; the interval is a 95% bootstrap interval "
                 "over those windows" + (", and speedup and efficiency carry theirs." if several else "."))
    mixed = len({r["parallel"] for r in rows}) > 1
    scaling_cells = (lambda r: [f"{r['speedup']:.2f}x ({r['speedup_interval'][0]:.2f}-{r['speedup_interval'][1]:.2f})",
                                f"{r['world_size'] / base_n:.0f}x",
                                f"{100 * r['efficiency']:.0f}% ({percent_range(r['efficiency_interval'])})"])
    out = [f"# {'Scaling report' if several else 'Run report'} ({report['scaling']} scaling)", "",
           (f"Baseline: {base_n} rank{'s' if base_n > 1 else ''}" + (" of each strategy" if mixed else "") + ". "
            if several else "") + step_time, "",
           "## Scaling" if several else "## Step time", "",
           table([*(["parallel"] if mixed else []), "ranks", "step ms", "95% interval", "tokens/s", *(["speedup", "ideal", "efficiency"] if several else []),
                  "threads/rank", "cores/node", "repeats", "final loss", "final val loss", "flags"],
                 [[*([r["parallel"]] if mixed else []), r["world_size"], f"{r['step_ms']:.2f}",
                   f"{r['step_ms_interval'][0]:.2f}-{r['step_ms_interval'][1]:.2f}", f"{r['tokens_per_s']:,.0f}",
                   *(scaling_cells(r) if several else []),
                   r["threads"] or "-", r["node_cpus"] or "-", r["repeats"], f"{r['final_loss']:.4f}",
                   f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-",
                   "; ".join(flag["kind"] for flag in r["flags"]) or "-"] for r in rows]),
           ""]
    flagged = [(r, flag) for r in rows for flag in r["flags"]]
    if flagged:
        out += ["Flags, and what to change:", "",
                *(f"- {size_name(r)} rank(s): {flag['text']}. {flag['fix'][0].upper()}{flag['fix'][1:]}."
                  for r, flag in flagged), ""]
    out += [f"{'## What limits scaling' if several else '## The run'}", "", report["limits"], ""]
    if report["loss_agreement"] is not None:
        bf16 = any(r.get("dtype") == "bfloat16" for r in rows)
        out += [f"Loss curves of the sizes: {agreement_verdict(report['loss_agreement'], bf16)}.", ""]
    out += render_phases(report)
    out += render_nodes(report)
    out += render_samples(rows)
    out += render_profiles(rows)
    if "projection" in report:
        out += render_projection(report["projection"])
    if "strategies" in report:
        out += strategies.render(report["strategies"])
    pictures = ["![loss](loss.png)", "![phases](phases.png)", "![utilization](utilization.png)"]
    if several:
        pictures = ["![speedup](speedup.png) ![efficiency](efficiency.png)", *pictures]
    out += ["## Plots", "", *(line + "\n" for line in pictures)]
    return "\n".join(out)


def render_phases(report: dict) -> list[str]:
    rows = report["runs"]
    names = [name for name in (*scaling.STEP_PHASES, "other") if any(name in r["phases_ms"] for r in rows)]
    if not names:
        return []
    lines = ["## Where a step's time goes (ms per step, rank 0, median after warm-up)", "",
             table(["ranks", *names, "step", "all-reduce (measured)", "exposed", "comm estimate",
                    "eval total", "checkpoint total"],
                   [[size_name(r), *(f"{r['phases_ms'].get(name, 0.0):.2f}" for name in names), f"{r['step_ms']:.2f}",
                     f"{r['comm_measured']['allreduce_ms']:.2f}" if r.get("comm_measured") else "-",
                     f"{r['comm_measured']['exposed_ms']:.2f}" if r.get("comm_measured") else "-",
                     f"{r['comm_ms']:.2f} ({100 * r['comm_share']:.0f}%)" if "comm_ms" in r else "-",
                     f"{r['eval_total_ms']:.0f}", f"{r['checkpoint_total_ms']:.0f}"] for r in rows]),
             "", "Backward includes DDP's gradient all-reduce. " + report["comm_method"], ""]
    achieved = [(r, r["comm_measured"]) for r in rows if r.get("comm_measured") and r["comm_measured"]["allreduce_ms"]]
    if achieved:
        lines += ["Achieved all-reduce bus bandwidth (2(n-1)/n x bytes per step / all-reduce time), against the "
                  "run's own probe:", ""]
        for r, comm in achieved:
            n = r["world_size"]
            busbw = 2 * (n - 1) / n * comm["bytes"] / (comm["allreduce_ms"] / 1000) / 1e9
            probe = r["allreduce_probe"]
            lines.append(f"- {n} ranks: {comm['bytes'] / 2**20:.2f} MiB in {comm['buckets']:.0f} bucket(s) per step, "
                         f"{busbw:.3f} GB/s" + (f" (probe: {probe['busbw_gbps']:.3f} GB/s)" if probe else ""))
        lines.append("")
    return lines


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
                   [[r["nodes"], r["world_size"] // r["nodes"], size_name(r), f"{r['step_ms']:.2f}",
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
            others = f"{summary['others_cpu_pct']:.0f}%" if "others_cpu_pct" in summary else "-"
            lines.append([size_name(r), node, summary["samples"], f"{summary['node_cpu_pct']:.0f}%", others,
                          ranks, gpus])
    if not lines:
        return []
    return ["## Hardware samples (medians; memory is the peak)", "",
            "Node CPU and others' CPU are in % of all the node's cores; a rank's process CPU in % of one core.", "",
            table(["ranks", "node", "samples", "node CPU", "others' CPU", "process CPU / peak RSS per rank",
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


def write_tensorboard(runs: list[Run], log_dir: Path) -> None:
    """Every run's metrics (and node 0's hardware samples) as one TensorBoard log directory, a
    subdirectory per run, so that `tensorboard --logdir DIR` overlays the sizes of a sweep."""
    from gptcore.telemetry.sinks import replay

    targets = {run.path: log_dir / run.path.name for run in runs}
    if len(set(targets.values())) < len(targets):
        raise UserInputError("--tensorboard needs run directories with distinct names")
    if taken := [str(target) for target in targets.values() if target.exists()]:
        raise UserInputError(f"{taken[0]} already exists; choose a new --tensorboard directory")
    for run in runs:
        replay(run.path, targets[run.path])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with config.yaml and metrics.jsonl)")
    parser.add_argument("--out", required=True, help="directory for report.md, report.json and the plots")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps dropped as warm-up")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="also write the runs as one TensorBoard log directory (a subdirectory per run)")
    try:
        args = parser.parse_args(argv)
        if not 0 <= args.warmup < 1:
            raise UserInputError(f"--warmup must be in [0, 1), got {args.warmup}")
        check_output(Path(args.out), "--out", directory=True)
        if args.tensorboard:
            check_output(Path(args.tensorboard), "--tensorboard", directory=True)
        runs = [load_run(run) for run in args.runs]
        path = write_report(runs, Path(args.out), args.warmup)
        if args.tensorboard:
            write_tensorboard(runs, Path(args.tensorboard))
    except GptcoreError as err:
        print(f"analysis: error: {err}", file=sys.stderr)
        return err.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
