"""The scaling arithmetic, as pure functions: steady-state step time, speedup, efficiency, where
the lost time went, and an analytic ring all-reduce projection to larger GPU counts.

Strong scaling keeps the global batch fixed, so N ranks share one step's work:
    speedup = T1 / TN,  efficiency = T1 / (N * TN)
Weak scaling keeps the per-rank batch fixed, so a step at N ranks does N times the work:
    speedup = N * T1 / TN (in tokens/s),  efficiency = T1 / TN
Both are "throughput at N / throughput at 1", and efficiency is that divided by N.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from gptcore.telemetry.profiling import STEP_PHASES


def step_records(records: list[dict]) -> list[dict]:
    """The records of training steps in a metrics log (not evaluations or all-reduce probes)."""
    return [r for r in records if not r.get("eval") and "ms_per_step" in r]


def train_ms(records: list[dict]) -> list[tuple[int, float]]:
    """(step, training ms per step) for each logged window. A window's wall time also holds any
    eval and checkpoint that ran since the previous log line; those are timed separately (as
    totals in phases_ms), so they are taken out here."""
    rows, previous_step = [], None
    for record in step_records(records):
        steps = record["step"] - previous_step if previous_step is not None else None
        previous_step = record["step"]
        phases = record.get("phases_ms") or {}
        extra = phases.get("eval", 0.0) + phases.get("checkpoint", 0.0)
        ms = record["ms_per_step"]
        if extra and steps is not None and steps > 0:  # a resumed run may log a step again
            ms -= extra / steps
        rows.append((record["step"], ms))
    return rows


def steady_records(records: list[dict], warmup_fraction: float = 0.1) -> list[dict]:
    """Step records after warm-up: never the first logged window (allocator, first calls,
    lazy initialisation), and none in the first `warmup_fraction` of the run's steps."""
    steps = step_records(records)
    if len(steps) < 2:
        return steps
    cutoff = max(steps[0]["step"], warmup_fraction * steps[-1]["step"])
    return [r for r in steps if r["step"] > cutoff]


def steady_step_ms(records: list[dict], warmup_fraction: float = 0.1) -> float:
    """Median training time per optimizer step after warm-up (ms)."""
    kept = {r["step"] for r in steady_records(records, warmup_fraction)}
    values = [ms for step, ms in train_ms(records) if step in kept]
    if not values:
        raise ValueError("no step records to measure")
    return statistics.median(values)


def steady_phases_ms(records: list[dict], warmup_fraction: float = 0.1) -> dict[str, float]:
    """Median ms per step of each step phase after warm-up."""
    kept = [r for r in steady_records(records, warmup_fraction) if r.get("phases_ms")]
    if not kept:
        return {}
    return {name: statistics.median(r["phases_ms"].get(name, 0.0) for r in kept) for name in STEP_PHASES}


def total_phase_ms(records: list[dict], name: str) -> float:
    """Whole-run total of an occasional phase (eval, checkpoint)."""
    return sum((r.get("phases_ms") or {}).get(name, 0.0) for r in records)


def tokens_per_step(batch_size: int, grad_accum: int, block_size: int, world_size: int, scaling: str) -> int:
    """Tokens in one optimizer step: train.batch_size is global under strong scaling and per rank
    under weak scaling."""
    rows = batch_size * world_size if scaling == "weak" else batch_size
    return rows * grad_accum * block_size


def speedup(base_ms: float, tn_ms: float, n: int, scaling: str, base_n: int = 1) -> float:
    """Throughput at n ranks over throughput at base_n ranks (normally 1), from per-step times."""
    ratio = n / base_n
    return (ratio if scaling == "weak" else 1.0) * base_ms / tn_ms


def efficiency(base_ms: float, tn_ms: float, n: int, scaling: str, base_n: int = 1) -> float:
    """Strong: T1 / (n * Tn). Weak: T1 / Tn. (Against base_n ranks: the same with n / base_n.)"""
    return speedup(base_ms, tn_ms, n, scaling, base_n) / (n / base_n)


def compute_scale(base_n: int, n: int, scaling: str) -> float:
    """How much of the baseline's per-rank compute one rank does at n ranks: strong scaling
    splits the batch (base_n / n), weak scaling keeps it (1)."""
    return base_n / n if scaling == "strong" else 1.0


def excess_ms(base_phases: dict[str, float], phases: dict[str, float], base_n: int, n: int,
              scaling: str) -> dict[str, float]:
    """Per phase: measured ms at n ranks minus the ideal (the baseline's ms scaled by
    compute_scale). Under DDP, backward's excess estimates the gradient all-reduce: it is
    backward_n - backward_1 x (per-rank rows at n / per-rank rows at 1), assuming backward
    compute is linear in the rows per rank."""
    scale = compute_scale(base_n, n, scaling)
    return {name: phases.get(name, 0.0) - base_phases.get(name, 0.0) * scale
            for name in set(base_phases) | set(phases)}


# -- the analytic projection ----------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    name: str
    gbytes_per_s: float  # achievable all-reduce bus bandwidth per GPU, one direction
    latency_us: float  # per ring hop
    max_gpus: int  # beyond this the ring must leave the link (e.g. NVLink stops at the node)


# Bus bandwidths are what NCCL all-reduce tests reach, not the datasheet peaks.
LINKS = (
    Link("NVLink 3 (A100 SXM, one node)", 230.0, 3.0, 8),
    Link("PCIe 4.0 x16", 22.0, 5.0, 8),
    Link("InfiniBand HDR 200 Gb/s (1 NIC per node)", 23.0, 6.0, 1 << 16),
    Link("InfiniBand NDR 400 Gb/s (1 NIC per node)", 46.0, 5.0, 1 << 16),
)


def measured_link(probe: dict) -> Link:
    """The link an all-reduce probe measured (gptcore.cluster.distributed.probe_allreduce), as a Link for
    the projection: its bus bandwidth, and its one-element all-reduce time spread over the ring's
    2(n-1) hops. Assumed to hold at any size, as an inter-node link between identical nodes does."""
    hops = 2 * (probe["world_size"] - 1)
    return Link(f"measured here: {probe['nodes']} node(s), {probe['world_size']} ranks", probe["busbw_gbps"],
                probe["latency_us"] / hops, 1 << 16)


def ring_allreduce_ms(gradient_bytes: float, n: int, link: Link) -> float:
    """Ring all-reduce: 2(n-1) hops, each moving bytes/n: 2(n-1)/n x bytes / bandwidth, plus one
    latency per hop."""
    if n <= 1:
        return 0.0
    transfer = 2 * (n - 1) / n * gradient_bytes / (link.gbytes_per_s * 1e9)
    return 1000 * (transfer + 2 * (n - 1) * link.latency_us * 1e-6)


def projected_efficiency(compute_1_ms: float, backward_1_ms: float, gradient_bytes: float, n: int,
                         link: Link, scaling: str) -> tuple[float, float]:
    """(efficiency with no overlap, efficiency with the all-reduce hidden behind backward) at n
    ranks, when compute scales ideally (compute_1 / n per rank under strong scaling) and the
    all-reduce takes ring_allreduce_ms. The truth lies between the two: DDP overlaps buckets
    with backward, but the last bucket always waits."""
    scale = compute_scale(1, n, scaling)
    compute, backward = compute_1_ms * scale, backward_1_ms * scale
    comm = ring_allreduce_ms(gradient_bytes, n, link)
    no_overlap = compute / (compute + comm)
    overlapped = compute / (compute + max(0.0, comm - backward))
    return no_overlap, overlapped


# -- noise: intervals from the windows ------------------------------------------------------------

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def steady_windows(records: list[dict], warmup_fraction: float = 0.1) -> list[float]:
    """Training ms per step of every logged window after warm-up: the samples a step time and
    its spread are taken from."""
    kept = {r["step"] for r in steady_records(records, warmup_fraction)}
    return [ms for step, ms in train_ms(records) if step in kept]


def _median_resamples(values: list[float], rng) -> "numpy.ndarray":
    import numpy as np

    data = np.asarray(values, dtype=float)
    picks = rng.integers(0, len(data), size=(BOOTSTRAP_RESAMPLES, len(data)))
    return np.median(data[picks], axis=1)


def median_interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of the median (resampling windows); one window gives a point."""
    import numpy as np

    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    medians = _median_resamples(values, np.random.default_rng(seed))
    tail = 100 * (1 - CONFIDENCE) / 2
    return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def ratio_interval(numerator: list[float], denominator: list[float], seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of median(numerator) / median(denominator), the two resampled
    independently: what a speedup T1 / TN is known to within."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ratios = _median_resamples(numerator, rng) / _median_resamples(denominator, rng)
    tail = 100 * (1 - CONFIDENCE) / 2
    return float(np.percentile(ratios, tail)), float(np.percentile(ratios, 100 - tail))


def quartiles(values: list[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.percentile(values, 25)), float(np.percentile(values, 75))


# -- DDP against FSDP: memory and communication per rank ------------------------------------------

ADAMW_STATE_BYTES = 16  # fp32 weight, gradient and AdamW's two moments, per parameter
DDP_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket: one all-reduce per bucket


def state_bytes_per_rank(params: int, n: int, strategy: str) -> float:
    """Weights, gradients and AdamW state one rank holds: all of them under DDP, 1/N under FSDP."""
    return ADAMW_STATE_BYTES * params / (n if strategy == "fsdp" else 1)


def comm_bytes_per_step(params: int, n: int, strategy: str, compute_bytes: int = 4,
                        reshard_after_forward: bool = True) -> float:
    """Bytes each rank sends per optimizer step (the bus bytes of nccl-tests, so that a time is
    bytes / bus bandwidth). DDP all-reduces every fp32 gradient: 2(n-1)/n x 4P. FSDP all-gathers
    the weights in the compute dtype before forward and again before backward (once, when they
    stay gathered after forward) and reduce-scatters fp32 gradients: (n-1)/n x P x (2 x compute
    bytes + 4), which is 3(n-1)/n x 4P in fp32."""
    if n <= 1:
        return 0.0
    if strategy == "ddp":
        return 2 * (n - 1) / n * params * 4
    gathers = 2 if reshard_after_forward else 1
    return (n - 1) / n * params * (gathers * compute_bytes + 4)


def collectives_per_step(params: int, n_layer: int, strategy: str, reshard_after_forward: bool = True) -> int:
    """DDP: one all-reduce per 25 MiB bucket. FSDP: per block its all-gathers and one
    reduce-scatter; the root (embeddings, head, final norm) stays gathered from forward to
    backward: one all-gather and one reduce-scatter."""
    if strategy == "ddp":
        return max(1, -(-params * 4 // DDP_BUCKET_BYTES))
    return n_layer * ((2 if reshard_after_forward else 1) + 1) + 2


def comm_ms_per_step(params: int, n_layer: int, n: int, strategy: str, link: Link, compute_bytes: int = 4,
                     reshard_after_forward: bool = True) -> float:
    """Bytes over the link's bus bandwidth, plus a latency per ring hop of each collective
    (an all-reduce has 2(n-1) hops, an all-gather or reduce-scatter n-1)."""
    if n <= 1:
        return 0.0
    volume = comm_bytes_per_step(params, n, strategy, compute_bytes, reshard_after_forward)
    hops = 2 * (n - 1) if strategy == "ddp" else n - 1
    count = collectives_per_step(params, n_layer, strategy, reshard_after_forward)
    return 1000 * (volume / (link.gbytes_per_s * 1e9) + count * hops * link.latency_us * 1e-6)
