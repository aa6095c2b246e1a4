"""DDP against FSDP in the scaling report: what each rank holds, what it sends per step, how
fast each strategy ran at each size, and where, for larger models and more GPUs, each one wins
or stops fitting in a GPU's memory."""

from __future__ import annotations

import dataclasses

from analysis import scaling
from gptcore.cluster.parallel import estimated_memory
from gptcore.config import Config
from gptcore.models.gpt import parameter_count

DEVICE_MEMORY_GB = 80  # an A100 / H100 80GB
PROJECTION_GPUS = (1, 2, 4, 8, 16, 32, 64)
# (layers, width): the `large` preset, then GPT-2 medium / large / XL and GPT-3's 6.7B and 13B shapes.
PROJECTION_SHAPES = ((12, 768), (24, 1024), (36, 1280), (48, 1600), (32, 4096), (40, 5120))
FALLBACK_LINK = scaling.LINKS[3]  # InfiniBand NDR, when no run measured a link


def state_mib(memory: dict | None) -> float | None:
    if not memory:
        return None
    return (memory["param_bytes"] + memory["grad_bytes"] + memory["optimizer_bytes"]) / 2**20


def measured_rows(rows: list[dict], compute_bytes: int) -> list[dict]:
    """Each run's strategy, speed and per-rank state, with its communication per step from the
    formulas, timed at the bus bandwidth its own all-reduce probe measured."""
    out = []
    for row in rows:
        n, probe = row["world_size"], row["allreduce_probe"]
        volume = scaling.comm_bytes_per_step(row["parameters"], n, row["parallel"], compute_bytes,
                                             row["reshard_after_forward"])
        out.append({"parallel": row["parallel"], "world_size": n, "nodes": row["nodes"], "step_ms": row["step_ms"],
                    "step_ms_interval": row["step_ms_interval"], "efficiency": row["efficiency"],
                    "state_mib": state_mib(row["memory"]),
                    "peak_mib": row["memory"]["peak_memory_bytes"] / 2**20
                    if row["memory"] and "peak_memory_bytes" in row["memory"] else None,
                    "comm_mib": volume / 2**20,
                    "comm_ms_at_probe": 1000 * volume / (probe["busbw_gbps"] * 1e9) if probe and volume else None})
    return out


def side_by_side(rows: list[dict]) -> list[dict]:
    """At each size both strategies ran: FSDP's step time over DDP's (with a 95% interval) and
    FSDP's per-rank state over DDP's."""
    found = []
    ddp = {(r["world_size"], r["nodes"]): r for r in rows if r["parallel"] == "ddp"}
    for fsdp in (r for r in rows if r["parallel"] == "fsdp"):
        other = ddp.get((fsdp["world_size"], fsdp["nodes"]))
        if other is None:
            continue
        ours, theirs = state_mib(fsdp["memory"]), state_mib(other["memory"])
        found.append({"world_size": fsdp["world_size"], "nodes": fsdp["nodes"],
                      "time_ratio": fsdp["step_ms"] / other["step_ms"],
                      "time_ratio_interval": scaling.ratio_interval(fsdp["window_ms"], other["window_ms"]),
                      "state_ratio": ours / theirs if ours and theirs else None})
    return found


def projected(config: Config, compute_ms_1: float, link: scaling.Link, compute_bytes: int) -> list[dict]:
    """For larger models and more GPUs: which strategy fits a GPU and is faster. A step is the
    1-rank compute scaled by the model's FLOPs per token (and by 1/N under strong scaling) plus
    the communication without overlap; compute is the same for both, so where both fit the
    one that communicates less wins."""
    m, t = config.model, config.train
    base_flops = 6 * parameter_count(m) + 12 * m.n_layer * m.n_embd * m.block_size
    shapes = [(m.n_layer, m.n_embd), *(s for s in PROJECTION_SHAPES if s != (m.n_layer, m.n_embd))]
    table = []
    for layers, width in shapes:
        model = dataclasses.replace(m, n_layer=layers, n_embd=width, n_head=max(1, width // 64))
        params = parameter_count(model)
        flops = 6 * params + 12 * layers * width * m.block_size
        cells = []
        for n in PROJECTION_GPUS:
            rows_per_rank = t.batch_size if t.scaling == "weak" else t.batch_size / n
            compute = compute_ms_1 * flops / base_flops * scaling.compute_scale(1, n, t.scaling)
            cell = {"gpus": n}
            for strategy in ("ddp", "fsdp"):
                state, activations = estimated_memory(model, max(1, round(rows_per_rank)), strategy, n)
                cell[f"{strategy}_gb"] = (state + activations) / 1e9
                cell[f"{strategy}_ms"] = compute + scaling.comm_ms_per_step(params, layers, n, strategy, link,
                                                                            compute_bytes, t.reshard_after_forward)
            fitting = [s for s in ("ddp", "fsdp") if cell[f"{s}_gb"] <= DEVICE_MEMORY_GB]
            cell["winner"] = min(fitting, key=lambda s: cell[f"{s}_ms"]) if fitting else None
            cells.append(cell)
        table.append({"layers": layers, "width": width, "parameters": params, "cells": cells})
    return table


def model_name(model: dict) -> str:
    millions = model["parameters"] / 1e6
    return f"{millions:,.{2 if millions < 10 else 0}f}M ({model['layers']} x {model['width']})"


def verdicts(table: list[dict]) -> list[str]:
    """Per model: up to where DDP fits, from where FSDP does, and which wins where both do."""
    lines = []
    for model in table:
        cells = model["cells"]
        ddp_fits = [c["gpus"] for c in cells if c["ddp_gb"] <= DEVICE_MEMORY_GB]
        fsdp_fits = [c["gpus"] for c in cells if c["fsdp_gb"] <= DEVICE_MEMORY_GB]
        both = [c for c in cells if c["gpus"] in ddp_fits and c["gpus"] in fsdp_fits and c["gpus"] > 1]
        name = model_name(model)
        if not fsdp_fits:
            lines.append(f"{name}: fits neither way at up to {PROJECTION_GPUS[-1]} GPUs; it needs activation "
                         "checkpointing, a smaller micro-batch or tensor parallelism")
            continue
        ddp = (f"DDP fits at {ddp_fits[0]}+ GPU(s) ({cells[0]['ddp_gb']:.1f} GB per rank at 1)" if ddp_fits else
               f"DDP never fits ({cells[-1]['ddp_gb']:.0f} GB per rank even at {PROJECTION_GPUS[-1]} GPUs)")
        fsdp = f"FSDP from {fsdp_fits[0]} GPU(s)"
        wins = {c["winner"] for c in both}
        faster = (f"where both fit, {'DDP' if wins == {'ddp'} else 'FSDP' if wins == {'fsdp'} else 'each at some sizes'}"
                  " is faster" if both else "")
        lines.append("; ".join(part for part in (f"{name}: {ddp}", fsdp, faster) if part))
    return lines


def compare_strategies(rows: list[dict], config: Config, probe: dict | None) -> dict:
    compute_bytes = 2 if any(r.get("dtype") == "bfloat16" for r in rows) else 4
    if probe is None:  # the largest run's own probe, else a preset
        probes = [r["allreduce_probe"] for r in rows if r["allreduce_probe"]]
        probe = max(probes, key=lambda p: p["world_size"], default=None)
    link = scaling.measured_link(probe) if probe else FALLBACK_LINK
    base = next((r for r in rows if r["world_size"] == 1 and r["parallel"] == "ddp"), rows[0])
    compute_ms_1 = base["step_ms"] * base["world_size"] if config.train.scaling == "strong" else base["step_ms"]
    table = projected(config, compute_ms_1, link, compute_bytes)
    return {"compute_bytes": compute_bytes, "measured": measured_rows(rows, compute_bytes),
            "side_by_side": side_by_side(rows), "link": link.name, "link_gbps": link.gbytes_per_s,
            "device_memory_gb": DEVICE_MEMORY_GB, "projection": table, "verdicts": verdicts(table)}


def render(report: dict) -> list[str]:
    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    element = "bf16" if report["compute_bytes"] == 2 else "fp32"
    out = ["## DDP and FSDP", "",
           "Per rank: the training state it holds (weights, gradients and AdamW's moments, exact from its own "
           "tensors), its peak device memory on a GPU, and what it sends per step from the standard formulas: DDP "
           "all-reduces every fp32 gradient, 2(n-1)/n x 4P bytes; FSDP all-gathers the weights before forward and "
           f"before backward and reduce-scatters the gradients, 3(n-1)/n x P x the element size ({element} gathers, "
           "fp32 gradients), timed at the bus bandwidth of the run's own all-reduce probe.", "",
           "| parallel | ranks | step ms | 95% interval | efficiency | state MiB per rank | peak device MiB | "
           "sent MiB per step | at the probe's bandwidth ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["measured"]:
        out.append(f"| {r['parallel']} | {r['world_size']} | {r['step_ms']:.2f} | {r['step_ms_interval'][0]:.2f}-"
                   f"{r['step_ms_interval'][1]:.2f} | {100 * r['efficiency']:.0f}% | {cell(r['state_mib'], '.2f')} | "
                   f"{cell(r['peak_mib'], ',.0f')} | {r['comm_mib']:.2f} | {cell(r['comm_ms_at_probe'], '.2f')} |")
    out.append("")
    for pair in report["side_by_side"]:
        low, high = pair["time_ratio_interval"]
        state = (f", holding {100 * pair['state_ratio']:.0f}% of DDP's state per rank"
                 if pair["state_ratio"] is not None else "")
        out.append(f"- {pair['world_size']} rank{'s' if pair['world_size'] > 1 else ''}: FSDP's step takes {pair['time_ratio']:.2f}x DDP's (95% interval "
                   f"{low:.2f}-{high:.2f}){state}.")
    gpus = [c["gpus"] for c in report["projection"][0]["cells"]]
    out += ["", f"### Which strategy, for larger models (analytic, {report['device_memory_gb']} GB GPUs, "
            f"{report['link']}: {report['link_gbps']:.2f} GB/s)", "",
            "Each cell: the faster strategy that fits (memory per rank: DDP / FSDP, GB). A step is the measured "
            "1-rank compute scaled by FLOPs per token (and 1/N under strong scaling) plus the communication "
            "without overlap; memory is the training state plus one micro-batch's activations (this run's batch, "
            "no activation checkpointing).", "",
            "| model | " + " | ".join(f"{n} GPUs" for n in gpus) + " |", "|---|" + "---|" * len(gpus)]
    for model in report["projection"]:
        cells = [f"{c['winner'].upper() if c['winner'] else 'neither'} "
                 f"({c['ddp_gb']:.1f} / {c['fsdp_gb']:.1f})" for c in model["cells"]]
        out.append(f"| {model_name(model)} | "
                   + " | ".join(cells) + " |")
    out += ["", *(f"- {line}." for line in report["verdicts"]), ""]
    return out
