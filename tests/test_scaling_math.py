"""The scaling arithmetic and the parsers behind the sweep, the sampler and the report, on
hand-made inputs whose answers can be worked out on paper."""

import pytest

import random
import statistics

from analysis import scaling
from analysis.report import agreement_verdict, compare, limits_paragraph, loss_agreement
from gptcore.cluster.distributed import bus_bandwidth_gbps
from gptcore.errors import UserInputError
from gptcore.telemetry.sampler import parse_nvidia_smi, visible_gpus
from launch.submit import failure_line
from launch.sweep import check_capacity, gres_gpus, parse_sizes, run_name


def test_strong_scaling_divides_one_steps_work():
    # 100 ms on 1 rank, 30 ms on 4: 3.33x faster, 100 / (4 x 30) = 83% efficient.
    assert scaling.speedup(100, 30, 4, "strong") == pytest.approx(100 / 30)
    assert scaling.efficiency(100, 30, 4, "strong") == pytest.approx(100 / 120)


def test_weak_scaling_keeps_per_rank_work():
    # A 4-rank step does 4x the work: 125 ms against 100 ms is 80% efficient, 3.2x the tokens/s.
    assert scaling.efficiency(100, 125, 4, "weak") == pytest.approx(0.8)
    assert scaling.speedup(100, 125, 4, "weak") == pytest.approx(3.2)


def test_efficiency_against_a_baseline_of_two_ranks():
    assert scaling.efficiency(60, 40, 4, "strong", base_n=2) == pytest.approx(60 / (2 * 40))
    assert scaling.speedup(60, 40, 4, "weak", base_n=2) == pytest.approx(2 * 60 / 40)


def test_tokens_per_step_follow_the_meaning_of_batch_size():
    assert scaling.tokens_per_step(8, 2, 32, world_size=4, scaling="strong") == 8 * 2 * 32
    assert scaling.tokens_per_step(8, 2, 32, world_size=4, scaling="weak") == 4 * 8 * 2 * 32


def step(n, ms, **phases):
    return {"step": n, "loss": 1.0, "ms_per_step": ms, "world_size": 1,
            "phases_ms": {"data": 1, "forward": 2, "backward": 3, "optimizer": 4, **phases}}


def test_eval_and_checkpoint_time_leave_the_step_time():
    records = [step(5, 50.0), {"step": 5, "eval": True, "val_loss": 2.0}, step(10, 30.0, eval=40.0, checkpoint=60.0)]
    # The window 5..10 (5 steps) held 100 ms of eval and checkpoint: 20 ms per step come off.
    assert scaling.train_ms(records) == [(5, 50.0), (10, 10.0)]
    assert scaling.total_phase_ms(records, "checkpoint") == 60.0


def test_steady_state_is_the_median_after_warm_up():
    records = [step(10, 900.0)] + [step(n, ms) for n, ms in ((20, 12.0), (30, 10.0), (40, 11.0), (100, 13.0))]
    # The first window goes (allocations, first calls); so does step 10 as 10% of 100.
    assert scaling.steady_step_ms(records) == 11.5
    assert scaling.steady_phases_ms(records) == {"data": 1, "forward": 2, "backward": 3, "optimizer": 4}


def test_backward_excess_estimates_communication():
    one = {"data": 1.0, "forward": 8.0, "backward": 16.0, "optimizer": 2.0}
    four = {"data": 1.0, "forward": 2.0, "backward": 9.0, "optimizer": 2.0}
    strong = scaling.excess_ms(one, four, 1, 4, "strong")
    # Strong: each rank has 1/4 of the rows, so backward should be 4 ms: 5 ms are the all-reduce.
    assert strong["backward"] == pytest.approx(5.0)
    assert strong["optimizer"] == pytest.approx(1.5)  # replicated on every rank: does not shrink
    weak = scaling.excess_ms(one, {**one, "backward": 21.0}, 1, 4, "weak")
    assert weak["backward"] == pytest.approx(5.0) and weak["forward"] == 0.0


def test_ring_allreduce_moves_two_n_minus_one_over_n_of_the_bytes():
    link = scaling.Link("test", gbytes_per_s=100.0, latency_us=0.0, max_gpus=64)
    # 2 x 3/4 x 1 GB / 100 GB/s = 15 ms.
    assert scaling.ring_allreduce_ms(1e9, 4, link) == pytest.approx(15.0)
    assert scaling.ring_allreduce_ms(1e9, 1, link) == 0.0
    slow = scaling.Link("test", gbytes_per_s=100.0, latency_us=10.0, max_gpus=64)
    assert scaling.ring_allreduce_ms(1e9, 4, slow) == pytest.approx(15.0 + 6 * 0.010)


def test_projection_brackets_overlap():
    link = scaling.Link("test", gbytes_per_s=100.0, latency_us=0.0, max_gpus=64)
    # Weak scaling, 40 ms compute of which 10 ms backward; the all-reduce takes 15 ms at 4 GPUs.
    low, high = scaling.projected_efficiency(40.0, 10.0, 1e9, 4, link, "weak")
    assert low == pytest.approx(40 / 55) and high == pytest.approx(40 / 45)


def row(world_size, step_ms, interval, efficiency, efficiency_interval, flags=(), **extra):
    return {"world_size": world_size, "step_ms": step_ms, "step_ms_interval": interval, "ideal_step_ms": 40.0 / world_size,
            "efficiency": efficiency, "efficiency_interval": efficiency_interval, "scaling": "strong",
            "flags": list(flags), "samples": {}, **extra}


def test_limits_name_the_biggest_excess_when_the_intervals_separate():
    report = {"runs": [
        row(1, 40.0, (39.0, 41.0), 1.0, (1.0, 1.0)),
        row(4, 20.0, (19.5, 20.5), 0.5, (0.47, 0.53), excess_ms={"backward": 8.0, "optimizer": 2.0, "forward": -0.5},
            samples={"node0": {"node_cpu_pct": 97.0}}, comm_measured={"allreduce_ms": 6.0, "exposed_ms": 4.5}),
    ]}
    text = limits_paragraph(report)
    assert "efficiency of 50% (interval 47-53%)" in text
    assert text.index("gradient all-reduce") < text.index("optimizer step")
    assert "+8.0 ms (80% of the time added" in text and "97% busy" in text and "by this run's own ranks" in text
    assert "took 6.0 ms per step, 4.5 ms of it after the last bucket was ready" in text


def test_a_difference_within_the_noise_is_called_so():
    report = {"runs": [row(1, 40.0, (30.0, 50.0), 1.0, (1.0, 1.0)),
                       row(2, 22.0, (15.0, 29.0), 0.91, (0.7, 1.2), excess_ms={"backward": 2.0})]}
    text = limits_paragraph(report)
    assert "within the measurement's noise of ideal" in text and "lost time goes" not in text


def test_flagged_sizes_get_what_to_change_instead_of_an_explanation():
    shared = {"kind": "shared", "text": "node shared: other processes used 35% of its CPU while this size ran",
              "fix": "rerun on a quiet node"}
    report = {"runs": [row(1, 40.0, (39.0, 41.0), 1.0, (1.0, 1.0)),
                       row(2, 60.0, (58.0, 62.0), 0.33, (0.32, 0.35), flags=[shared], excess_ms={"backward": 30.0},
                           samples={"node0": {"node_cpu_pct": 99.0}})]}
    text = limits_paragraph(report)
    assert "No conclusion is drawn from these numbers: at 2 rank(s), node shared: other processes used 35%" in text
    assert "To get one: rerun on a quiet node." in text
    assert "competed for cores" not in text and "lost time goes" not in text  # others' load is never ours


def windows_row(world_size, windows, **extra):
    base = {"world_size": world_size, "nodes": 1, "scaling": "strong", "windows": len(windows), "window_ms": windows,
            "step_ms": statistics.median(windows), "phases_ms": {}, "samples": {}, "sampled": False,
            "others_cpu_pct": None, "threads": 1, "node_cpus": 2, "ranks_per_node": world_size}
    return {**base, **extra}


def test_thin_data_above_ideal_and_oversubscription_are_flagged():
    steady = [10.0, 10.2, 9.9, 10.1, 10.0, 9.8, 10.3]
    rows = [windows_row(1, [20.0 + w / 100 for w in steady]), windows_row(2, [8.0, 8.1]),
            windows_row(2, [w / 2.5 for w in steady], threads=2, others_cpu_pct=25.0, sampled=True,
                        samples={"node0": {"samples": 2}})]
    compare(rows)
    kinds = [[flag["kind"] for flag in r["flags"]] for r in rows]
    assert kinds[0] == []
    assert "thin" in kinds[1] and "above ideal" in kinds[1]  # 2 windows; 20 / (2 x 8) = 125%
    assert rows[1]["efficiency_interval"][0] > 1.0
    assert set(kinds[2]) == {"thin", "shared", "oversubscribed", "above ideal"}
    texts = " ".join(flag["text"] for flag in rows[2]["flags"])
    assert "only 2 hardware sample(s)" in texts and "2 rank(s) x 2 thread(s) on 2 core(s)" in texts
    # Few windows and few samples at once: one "thin" flag that says both.
    both = windows_row(2, [8.0, 8.1], sampled=True, samples={"node0": {"samples": 1}})
    compare([windows_row(1, steady), both])
    thin = [flag for flag in both["flags"] if flag["kind"] == "thin"]
    assert len(thin) == 1 and "2 timed window(s)" in thin[0]["text"] and "1 hardware sample(s)" in thin[0]["text"]
    assert "train.log_interval" in thin[0]["fix"] and "profile.sampler_interval" in thin[0]["fix"]


def curve_rows(*curves):
    return [{"loss_curve": [[10 * (i + 1), loss] for i, loss in enumerate(curve)]} for curve in curves]


def test_the_loss_check_gives_the_typical_and_the_worst_difference_and_names_a_spike():
    falling = [3.0 - 0.05 * i for i in range(20)]
    # Within the promise everywhere.
    close = loss_agreement(curve_rows(falling, [x + 3e-6 for x in falling]))
    assert close["typical"] == pytest.approx(3e-6) and close["beyond"] == 0
    assert "promise holds" in agreement_verdict(close, bf16=False)
    # One step at a loss spike (step 80 jumps by 0.5, the sizes 1.7e-4 apart there), the rest 5e-6.
    spiked = [x + (0.5 if i == 7 else 0.0) for i, x in enumerate(falling)]
    other = [x + (1.7e-4 if i == 7 else 5e-6) for i, x in enumerate(spiked)]
    one = loss_agreement(curve_rows(spiked, other))
    assert (one["worst_step"], one["beyond"], one["spike"]) == (80, 1, True)
    assert one["typical"] == pytest.approx(5e-6) and one["worst"] == pytest.approx(1.7e-4)
    verdict = agreement_verdict(one, bf16=True)
    assert "at most 1.7e-04 at step 80" in verdict and "loss spike" in verdict and "promise holds" in verdict
    # The same gap without a spike is a broken promise, said so.
    plain = loss_agreement(curve_rows(falling, [x + (1.7e-4 if i == 7 else 5e-6) for i, x in enumerate(falling)]))
    assert plain["spike"] is False and "promise holds" not in agreement_verdict(plain, bf16=False)
    # Curves that drift apart break it at many steps, whatever the loss does.
    drift = loss_agreement(curve_rows(spiked, [x + 2e-4 * i for i, x in enumerate(spiked)]))
    assert drift["beyond"] == 19 and "19 of 20 common steps are beyond" in agreement_verdict(drift, bf16=False)


def test_intervals_narrow_with_more_windows_and_are_seeded():
    rng = random.Random(4)
    few = [10 + rng.gauss(0, 1) for _ in range(6)]
    many = few + [10 + rng.gauss(0, 1) for _ in range(42)]
    width = [high - low for low, high in (scaling.median_interval(few), scaling.median_interval(many))]
    assert width[1] < width[0]
    assert scaling.median_interval(few) == scaling.median_interval(few)  # the same report twice
    low, high = scaling.ratio_interval([20.0] * 5, [10.0] * 5)
    assert low == high == 2.0


def test_nvidia_smi_rows_and_the_jobs_own_gpus():
    gpus = parse_nvidia_smi("0, 87, 31245, 81559, 312.45, 64\n1, 3, 2, 81559, [N/A], 41\nWARNING: noise\n")
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[0]["util_pct"] == 87.0 and gpus[1]["power_w"] is None
    assert [g["index"] for g in visible_gpus(gpus, "1")] == [1]
    assert len(visible_gpus(gpus, None)) == len(visible_gpus(gpus, "GPU-5c1e0f")) == 2


def test_gpu_lists_and_partition_capacity():
    assert parse_sizes("4, 1,2") == [1, 2, 4]
    for bad in ("0", "a,b", "1,,2", "2,2"):
        with pytest.raises(UserInputError):
            parse_sizes(bad)
    assert [gres_gpus(g) for g in ("gpu:4", "gpu:a100:8(S:0-1)", "gpu:2,mps:200", "(null)")] == [4, 8, 2, 0]
    check_capacity([1, 2, 4], 1, "debug", [(8, 4)])
    with pytest.raises(UserInputError, match="at most 4 GPUs per node"):
        check_capacity([1, 8], 1, "debug", [(8, 4)])
    with pytest.raises(UserInputError, match="no GPUs"):
        check_capacity([1], 1, "cpu", [(8, 0)])
    with pytest.raises(UserInputError, match="more than partition debug's 1 node"):
        check_capacity([1], 2, "debug", [(8, 4)])


def test_one_line_out_of_submitits_errors():
    failed = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent "
              "call last):\n  File \"x\", line 1\nRuntimeError: Connection closed by peer\n----------------------\n"
              "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /a.err\n  - /a.out")
    assert failure_line(failed) == "RuntimeError: Connection closed by peer"
    cancelled = ("Job 12 (task: 0) with path /x/12_0_result.pkl\nhas not produced any output (state: CANCELLED by 0)\n"
                 "Error stream produced:\n" + "-" * 40 + "\nslurmstepd: error: *** JOB 12 CANCELLED ***")
    assert failure_line(cancelled) == "ended without a result (state: CANCELLED by 0)"


def test_node_lists_and_run_names_show_both_axes():
    assert parse_sizes("2,1", "--nodes") == [1, 2]
    with pytest.raises(UserInputError, match="^--nodes '1,1' repeats"):
        parse_sizes("1,1", "--nodes")
    # 2 ranks are 1 node x 2 GPUs or 2 nodes x 1 GPU: the names must tell them apart.
    assert [run_name(n, g, True) for n, g in ((1, 2), (2, 1), (2, 2))] == ["n2-1x2", "n2-2x1", "n4-2x2"]
    assert run_name(1, 4, False) == "n4"


def test_probe_bus_bandwidth_and_the_measured_link():
    # 4 MiB over 4 ranks in 10 ms: each rank sends 2 x 3/4 x 4 MiB = 6 MiB, 0.629 GB/s.
    assert bus_bandwidth_gbps(4 * 2**20, 0.010, 4) == pytest.approx(1.5 * 4 * 2**20 / 0.010 / 1e9)
    link = scaling.measured_link({"busbw_gbps": 0.5, "latency_us": 600.0, "world_size": 4, "nodes": 2})
    assert (link.gbytes_per_s, link.latency_us) == (0.5, 100.0)  # 600 us over 2 x 3 hops
    # The model gives the probe's own all-reduce back: 6 MiB at 0.5 GB/s plus 6 hops.
    assert scaling.ring_allreduce_ms(4 * 2**20, 4, link) == pytest.approx(1000 * 1.5 * 4 * 2**20 / 0.5e9 + 0.6)


def test_ddp_and_fsdp_bytes_per_step_follow_the_standard_formulas():
    from analysis.scaling import collectives_per_step, comm_bytes_per_step, comm_ms_per_step, state_bytes_per_rank

    params, n = 1_000_000, 4
    assert comm_bytes_per_step(params, 1, "fsdp") == comm_bytes_per_step(params, 1, "ddp") == 0
    assert comm_bytes_per_step(params, n, "ddp") == pytest.approx(2 * 3 / 4 * 4 * params)  # all-reduce, fp32
    assert comm_bytes_per_step(params, n, "fsdp") == pytest.approx(3 * 3 / 4 * 4 * params)  # 2 gathers + scatter
    # bf16 compute: gathers move 2 bytes a weight, gradients are still reduced in fp32.
    assert comm_bytes_per_step(params, n, "fsdp", compute_bytes=2) == pytest.approx(3 / 4 * params * (2 + 2 + 4))
    assert comm_bytes_per_step(params, n, "fsdp", reshard_after_forward=False) == pytest.approx(3 / 4 * params * 8)
    assert collectives_per_step(params, 8, "fsdp") == 8 * 3 + 2 and collectives_per_step(params, 8, "ddp") == 1
    assert state_bytes_per_rank(params, n, "ddp") == 16 * params == n * state_bytes_per_rank(params, n, "fsdp")
    link = scaling.LINKS[3]
    bandwidth_only = 1000 * comm_bytes_per_step(params, n, "ddp") / (link.gbytes_per_s * 1e9)
    assert comm_ms_per_step(params, 8, n, "ddp", link) == pytest.approx(bandwidth_only + 6 * link.latency_us / 1000)


def test_the_memory_estimate_shards_the_state_under_fsdp_and_not_the_activations():
    from gptcore.cluster.parallel import estimated_memory
    from gptcore.config import ModelConfig
    from gptcore.models.gpt import parameter_count

    model = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=96)
    ddp_state, ddp_activations = estimated_memory(model, 8, "ddp", 8)
    fsdp_state, fsdp_activations = estimated_memory(model, 8, "fsdp", 8)
    assert ddp_state == 16 * parameter_count(model)
    block = 12 * 768 * 768 + 2 * 768  # one block's weights (no biases), two gathered at a time in fp32
    assert fsdp_state == pytest.approx(ddp_state / 8 + 2 * 4 * block)
    assert fsdp_activations == ddp_activations
    assert estimated_memory(model, 8, "ddp", 8, activation_checkpointing=True)[1] < ddp_activations / 4
