"""The GPU path in under five minutes on one GPU: every section time-limited, the table written as it grows.

Here, once (no GPU needed): put the training text in gpu_bundle/, the folder the device call carries
    bash bench/gpu_check.sh --prepare                    # tiny Shakespeare from ../shared, else the default corpus
Then on the GPU machine (its own PyTorch, no network, no ../shared, no ~/.cache needed):
    bash bench/gpu_check.sh                              # every section, <= 5 min; the table to $OUT
    bash bench/gpu_check.sh --quick                      # the core sections, <= 2 min, for a second try
    bash bench/gpu_check.sh --smoke                      # every section on the CPU at a tiny shape (CI)

Sections, each a subprocess in its own process group with a time limit (a timeout kills the whole
group, torchrun's ranks included; a section that fails prints its last lines and the rest go on):
  env           torch, CUDA, the card, nvidia-smi as gptcore's sampler parses it
  time_to_loss  `shakespeare_char` with the fast recipe to val loss <= 1.47 (full validation passes),
                training time apart from compile and evaluation; it stops at the target
  train         the `seed` config eager and compiled (bf16): ms/step, tokens/s, MFU, compile time
                apart, the SDPA backend and the host syncs per step in a torch.profiler window
  resume        train.deterministic=true (eager): two straight runs and a stopped-and-resumed one, bit for bit
  gpu_to_cpu    the GPU checkpoint resumed on the CPU
  inference     sample, eval and `quantize --mode bf16` on the GPU; int8 on the GPU refused in one line
  decode        batch-1 decode at the seed shape with the static KV cache: fp32 and bf16, eager and
                compiled (CUDA graphs); int8 and int4 on the machine's CPU (CPU kernels)
  checkpoint    what a checkpoint of the seed model stalls the loop: the copy to host against the whole write
  ddp           DDP (compiled) over NCCL on a 1-rank process group, against the plain step
  fsdp          FSDP against DDP on one GPU, eager and compiled (per block, as compile=auto does)
The order is the priority: when the budget runs short, the last sections are the ones cut.
The table goes to REPORT/gpu_check.md and REPORT/gpu_check.json after every section (REPORT: $OUT
where it is set, as on the device machine, else --out), with the failed sections' last lines in
REPORT/gpu_check.log; the runs themselves stay in --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from harness import REPO, steady_median
from arguments import BenchParser, listed, one_of, output_path, positive_number, refuse

import torch  # noqa: E402  (after the sys.path fix, like the gptcore imports)

from analysis.scaling import train_ms  # noqa: E402
from gptcore.files import atomic_path, atomic_write_bytes  # noqa: E402
from gptcore.telemetry import hardware  # noqa: E402
from gptcore.telemetry.metrics import read_metrics  # noqa: E402
from gptcore.telemetry.profiling import host_syncs_per_step  # noqa: E402

BUNDLE = REPO / "gpu_bundle"  # what the device call carries (git ignores it): the training text
BUNDLE_TEXT = BUNDLE / "train.txt"
DEVICE_CALL = ('command "bash bench/gpu_check.sh", carry ["gpu_bundle"], timeout_s 420 '
               '(a --quick rerun then fits in what is left of 15 minutes)')
BUDGET_S = {"full": 300, "quick": 120, "smoke": 900}  # the whole check's wall time; sections share it
ORIGINAL_SECONDS_1GPU = 6365  # the original project's 5,000 iterations on one GPU
TARGET_VAL_LOSS = 1.47  # nanoGPT's shakespeare_char reaches 1.4697
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_attention_math": "math",
}


class Check:
    """Where a section runs and at what size: the real shapes on a GPU, tiny ones in smoke mode."""

    def __init__(self, args):
        self.smoke, self.quick, self.out = args.smoke, args.quick, Path(args.out)
        self.cuda = torch.cuda.is_available() and not self.smoke
        self.device = "cuda" if self.cuda else "cpu"
        self.data = args.data
        tiny = ["--config", "tiny", "train.device=cpu", "train.threads=0", "model.dropout=0.1"]
        self.seed = tiny if self.smoke else ["--config", "seed"]  # the original project's model
        self.small = tiny if self.smoke else ["--config", "shakespeare_char"]  # nanoGPT's reference
        self.seed_name, self.small_name = self.seed[1], self.small[1]
        self.rows: list[dict] = []

    def row(self, check: str, value: str, aim: str = "", ok: bool | None = None) -> None:
        self.rows.append({"check": check, "value": value, "aim": aim, "ok": ok})

    def skip_without_cuda(self) -> bool:
        if not self.cuda:
            self.row("-", "skipped: no CUDA" + (" (smoke runs on the CPU)" if self.smoke else ""))
        return not self.cuda


def gptcore(*args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gptcore", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def must(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit {result.returncode}: {tail}")
    return result


def train(check: Check, preset: list[str], name: str, *overrides: str, launcher: list[str] | None = None,
          timeout: float = 600) -> tuple[Path, str]:
    """A `gptcore train` run into OUT/runs/NAME; (its run directory, its log)."""
    run_dir = check.out / "runs" / name
    command = [*(launcher or [sys.executable]), "-m", "gptcore", "train", *preset, f"data.path={check.data}",
               f"out_dir={run_dir}", "train.sample_tokens=0", "profile.sampler=false", "log.tensorboard=false",
               *overrides]
    result = must(subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout))
    return run_dir, result.stdout + result.stderr


def trace_facts(trace_path: Path) -> tuple[str, float]:
    """(the SDPA backends a torch.profiler trace ran, host synchronizations per step in it).
    The backend shows as its aten op, or, where torch.compile called the kernel itself, as the
    kernel's name; inductor on the CPU writes attention out as its own kernels ("fused")."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    names = [event.get("name", "") for event in events]
    backends = {label for op, label in SDPA_OPS.items() if op in names}
    kernels = " ".join(event.get("name", "") for event in events if event.get("cat") == "kernel").lower()
    backends |= {label for word, label in (("flash", "flash kernel"), ("fmha", "memory-efficient kernel"),
                                           ("cudnn", "cuDNN kernel")) if word in kernels}
    backends = sorted(backends) or ["none seen (fused by torch.compile)"]
    return ", ".join(backends), host_syncs_per_step(events)


# -- sections -------------------------------------------------------------------------------------

def section_env(check: Check) -> None:
    from gptcore.telemetry.sampler import describe_gpu, query_gpus

    check.row("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    check.row("device", hardware.device_name(torch.device(check.device)))
    smi = shutil.which("nvidia-smi")
    gpus = query_gpus(smi) if smi else []
    check.row("nvidia-smi", "; ".join(describe_gpu(g) for g in gpus)
              if gpus else "not found" if not smi else "no GPU rows parsed", ok=bool(gpus) if check.cuda else None)


def step_window(check: Check) -> list[str]:
    """The timed runs of the train and ddp sections: a few windows, a 3-step profiler window late."""
    steps = 40 if check.smoke else 120
    return ["train.log_interval=10", f"train.max_iters={steps}", f"train.eval_interval={steps}", "train.eval_iters=1",
            "train.ckpt_interval=0", "profile.torch=true", f"profile.torch_start={steps - 15}", "profile.torch_steps=3"]


def dtype_of(log: str) -> str:
    """The dtype a training ran in, from its start line (dtype=bfloat16)."""
    return next((part.split("=")[1] for part in log.split() if part.startswith("dtype=")), "?")


def section_train(check: Check) -> None:
    window = step_window(check)
    eager_ms = None
    for compiled in ("true",) if check.quick else ("false", "true"):
        label = "compiled" if compiled == "true" else "eager"
        run_dir, log = train(check, check.seed, f"train-{label}", *window, f"train.compile={compiled}")
        records = read_metrics(run_dir / "metrics.jsonl")
        ms = steady_median(records)
        tps = steady_median(records, "tokens_per_s")
        mfu = [r["mfu"] for r in records if "mfu" in r]
        backend, syncs = trace_facts(run_dir / "profile" / "trace_rank0.json")
        name = f"{check.seed_name} {label}"
        check.row(f"{name}: ms/step", f"{ms:.2f} ({tps:,.0f} tokens/s, {dtype_of(log)})")
        first = next(r for r in records if "ms_per_step" in r)
        check.row(f"{name}: compile + warm-up", f"{(first['ms_per_step'] - ms) * 10 / 1000:.1f} s more than steady "
                  "steps in the first 10 (not in ms/step)")
        check.row(f"{name}: MFU", f"{100 * statistics.median(mfu):.1f}%" if mfu else "unknown card",
                  "compiled >= 35%" if compiled == "true" else "",
                  statistics.median(mfu) >= 0.35 if mfu and compiled == "true" and check.cuda else None)
        check.row(f"{name}: SDPA backend", backend)
        check.row(f"{name}: host syncs per step", f"{syncs:g} (profiler window, no log step)", "0",
                  syncs == 0 if check.cuda else None)
        projected = 5000 * ms / 1000
        check.row(f"{name}: 5,000 iterations", f"{projected:,.0f} s projected",
                  f"original project {ORIGINAL_SECONDS_1GPU:,} s on 1 GPU ({ORIGINAL_SECONDS_1GPU / projected:.0f}x)")
        if compiled == "false":
            eager_ms = ms
        elif eager_ms:
            check.row(f"{check.seed_name} compiled vs eager", f"{eager_ms / ms:.2f}x faster per step")
    if check.quick:
        return
    untimed, _ = train(check, check.seed, "train-eager-untimed", *window[:5], "train.compile=false",
                       "profile.phases=false")
    untimed_ms = steady_median(read_metrics(untimed / "metrics.jsonl"))
    timer = "CUDA events" if check.cuda else "host clock"
    check.row(f"phase timers ({timer}), eager", f"{eager_ms:.2f} with vs {untimed_ms:.2f} ms/step without "
              f"({eager_ms / untimed_ms:.3f}x; the timed run also had a 3-step profiler window)")


def section_resume(check: Check) -> None:
    """Eager: deterministic mode is part of inductor's cache key, so compiled runs would each compile
    again; bit-identity is a property of the kernels and the saved state, which eager shows."""
    common = ["train.deterministic=true", "train.compile=false", "train.max_iters=40", "train.log_interval=10",
              "train.eval_interval=40", "train.eval_iters=2", "train.ckpt_interval=0"]
    straight_a, _ = train(check, check.small, "resume-straight-a", *common)
    runs = {"a": straight_a}
    if not check.quick:
        runs["b"], _ = train(check, check.small, "resume-straight-b", *common)
    runs["resumed"], _ = train(check, check.small, "resume-split", *common, "train.stop_at=20")
    shutil.copytree(runs["resumed"], check.out / "runs" / "resume-at-20")  # for gpu_to_cpu
    train(check, check.small, "resume-split", *common, "resume=auto")
    weights = {name: torch.load(path / "ckpt.pt", weights_only=True)["model"] for name, path in runs.items()}
    def same(x: str, y: str) -> bool:
        return all(torch.equal(weights[x][key], weights[y][key]) for key in weights[x])
    if "b" in weights:
        check.row("two straight runs, deterministic", "bit-identical" if same("a", "b") else "differ",
                  "bit-identical", same("a", "b"))
    check.row("stopped at 20 + resumed vs straight", "bit-identical" if same("a", "resumed") else "differ",
              "bit-identical", same("a", "resumed"))
    if check.quick:
        return
    fast, _ = train(check, check.small, "resume-default", *common[2:], "train.compile=false")
    slow_ms, fast_ms = (steady_median(read_metrics(run / "metrics.jsonl")) for run in (straight_a, fast))
    check.row("train.deterministic=true costs (eager)",
              f"{slow_ms:.2f} vs {fast_ms:.2f} ms/step ({slow_ms / fast_ms:.2f}x)")


def section_gpu_to_cpu(check: Check) -> None:
    if check.skip_without_cuda():
        return
    source = check.out / "runs" / "resume-at-20"
    if not (source / "ckpt.pt").is_file():
        check.row("GPU checkpoint on the CPU", "no checkpoint: the resume section did not get that far", ok=False)
        return
    target = check.out / "runs" / "resumed-on-cpu"
    shutil.copytree(source, target)
    result = must(gptcore("train", *check.small, f"data.path={check.data}", f"out_dir={target}", "resume=auto",
                          "train.device=cpu", "train.max_iters=40", "train.stop_at=25", "train.log_interval=5",
                          "train.eval_interval=40", "train.ckpt_interval=0", "train.sample_tokens=0",
                          "profile.sampler=false"))
    resumed = "resumed from" in result.stdout and "device=cpu" in result.stdout
    loss = [r["loss"] for r in read_metrics(target / "metrics.jsonl") if "loss" in r][-1]
    check.row("GPU checkpoint resumed on the CPU", f"step 20 -> 25 on cpu, loss {loss:.4f}", "resumes", resumed)


def section_inference(check: Check) -> None:
    ckpt = check.out / "runs" / "resume-straight-a" / "ckpt.pt"
    if not ckpt.is_file():
        check.row("inference", "no checkpoint: the resume section did not get that far", ok=False)
        return
    sampled = must(gptcore("sample", "--ckpt", ckpt, "--tokens", 200, "--seed", 1, "--device", check.device))
    check.row("sample", sampled.stderr.strip().splitlines()[-1], ok=True)
    evaluated = json.loads(must(gptcore("eval", "--ckpt", ckpt, "--json", "--device", check.device)).stdout)
    check.row("eval", f"val {evaluated['val_loss']:.4f} on {evaluated['device']}", ok=True)
    bf16 = ckpt.with_name("ckpt_bf16.pt")
    must(gptcore("quantize", "--ckpt", ckpt, "--mode", "bf16", "--out", bf16, "--device", check.device))
    report = json.loads(bf16.with_suffix(".json").read_text())
    decode = report["decode"]
    check.row("quantize bf16", f"val {report['eval']['loss_change_pct']:+.3f}%, decode "
              f"{decode['fp32']['tokens_per_s']:.0f} -> {decode['bf16']['tokens_per_s']:.0f} tokens/s on "
              f"{decode['device']}", ok=True)
    int8 = ckpt.with_name("ckpt_int8.pt")
    must(gptcore("quantize", "--ckpt", ckpt, "--mode", "int8", "--out", int8, "--bench-tokens", 0))
    auto = must(gptcore("sample", "--ckpt", int8, "--tokens", 20, "--seed", 1))
    check.row("int8 with --device auto", auto.stderr.strip().splitlines()[-1], "runs on the CPU",
              "on cpu" in auto.stderr)
    if check.skip_without_cuda():
        return
    refused = gptcore("sample", "--ckpt", int8, "--device", "cuda")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    check.row("int8 with --device cuda", lines[0] if lines else "(nothing)", "one line, exit 2",
              refused.returncode == 2 and len(lines) == 1 and "Traceback" not in refused.stderr)


def section_decode(check: Check) -> None:
    from gptcore.config import load_config
    from gptcore.data.corpus import CharTokenizer
    from gptcore.inference.generate import LoadedModel, decode_speed
    from gptcore.inference.quantize import model_from_quantized, quantized_checkpoint
    from gptcore.inference.weight_layout import column_major_linears
    from gptcore.models.gpt import GPT

    config = load_config(check.seed[1], [])
    config.model.vocab_size, config.model.dropout = 65, 0.0
    vocab = ["\n", *(chr(32 + i) for i in range(64))]
    torch.manual_seed(0)
    fp32 = GPT(config.model).eval()
    state = {"model": fp32.state_dict(), "config": config.to_dict(), "vocab": vocab}
    bf16, _ = model_from_quantized(quantized_checkpoint(state, "bf16", 64), config)
    device = torch.device(check.device)
    tokens = 100 if check.smoke else 500
    speeds = {}
    for dtype, model in (("bf16", bf16),) if check.quick else (("fp32", fp32), ("bf16", bf16)):
        loaded = LoadedModel(model.to(device), CharTokenizer(vocab), config, dtype, device)
        for compiled in (False, True):
            result = decode_speed(loaded, tokens, seed=0, compile=compiled)
            label = f"{dtype} {'compiled' + (' + CUDA graphs' if check.cuda else '') if compiled else 'eager'}"
            speeds[label] = result["tokens_per_s"]
            check.row(f"{check.seed_name} decode batch 1, {label}", f"{result['tokens_per_s']:,.0f} tokens/s, "
                      f"{100 * result['bandwidth_utilization']:.1f}% of {result['bandwidth_gbps']:,.0f} GB/s")
    best = max(speeds, key=speeds.get)
    eager = speeds[f"{best.split()[0]} eager"]
    check.row("decode: fastest vs its eager", f"{best}: {speeds[best] / eager:.1f}x", ">= 3,000 tokens/s and >= 3x",
              speeds[best] >= 3000 and speeds[best] >= 3 * eager if check.cuda else None)
    if check.quick:
        return
    group = 64 if config.model.n_embd % 64 == 0 else 32
    cpu = torch.device("cpu")
    for mode in ("int8", "int4"):  # PyTorch's CPU kernels: on the GPU machine's own CPU
        model, _ = model_from_quantized(quantized_checkpoint(state, mode, group), config)
        result = decode_speed(LoadedModel(model, CharTokenizer(vocab), config, mode, cpu), tokens, seed=0)
        check.row(f"{check.seed_name} decode batch 1, {mode} on the CPU ({torch.get_num_threads()} threads)",
                  f"{result['tokens_per_s']:,.0f} tokens/s")
    # The fp32 layout CPU inference loads (inference.weight_layout), measured on another CPU than
    # the one it was chosen on: two alternating rounds of each.
    row_major = GPT(config.model, init_weights=False).eval()
    row_major.load_state_dict(state["model"])
    layouts = {"row-major": row_major, "column-major": column_major_linears(copy.deepcopy(row_major))}
    fastest = dict.fromkeys(layouts, 0.0)  # tokens/s, the better of each layout's two runs
    for order in (list(layouts), list(layouts)[::-1]):
        for layout in order:
            loaded = LoadedModel(layouts[layout], CharTokenizer(vocab), config, "fp32", cpu)
            fastest[layout] = max(fastest[layout], decode_speed(loaded, min(tokens, 100), seed=0)["tokens_per_s"])
    check.row(f"{check.seed_name} decode batch 1, fp32 on the CPU ({torch.get_num_threads()} threads), "
              "column-major vs row-major weights",
              f"{fastest['column-major']:,.0f} vs {fastest['row-major']:,.0f} tokens/s "
              f"({fastest['column-major'] / fastest['row-major']:.2f}x)")


def section_checkpoint(check: Check) -> None:
    """The seed model with AdamW's state, saved as training saves it: the loop waits for the copy to
    host memory only; the write (temp file, fsync, rename) goes on in a thread."""
    from gptcore.checkpointing import checkpoint
    from gptcore.config import load_config
    from gptcore.models.gpt import GPT
    from gptcore.models.optim import make_optimizer

    config = load_config(check.seed[1], ["model.dropout=0.0"])
    config.model.vocab_size = 65
    device = torch.device(check.device)
    model = GPT(config.model).to(device)
    optimizer = make_optimizer(model, config)
    x = torch.randint(0, 65, (2, config.model.block_size), device=device)
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()  # AdamW's moments exist from the first step on

    class Position:  # the data position a checkpoint holds
        def state_dict(self):
            return {"generator": torch.Generator().get_state()}

    run = {"config": config.to_dict(), "vocab": [chr(32 + i) for i in range(65)], "world_size": 1, "best_val_loss": 1.0}
    writer = checkpoint.Checkpointer(check.out / "runs" / "checkpoint" / "ckpt.pt", device, rank=0)
    writer.path.parent.mkdir(parents=True, exist_ok=True)
    stalls, writes = [], []
    for _ in range(3):
        start = time.perf_counter()
        writer.save(1, model, optimizer, Position(), **run)
        stalls.append(time.perf_counter() - start)
        writer.wait()
        writes.append(time.perf_counter() - start)
    size = writer.path.stat().st_size / 1e6
    check.row(f"{check.seed_name} checkpoint ({size:,.0f} MB)", f"loop stalls {1000 * statistics.median(stalls):,.0f} ms "
              f"(copy to host), write done after {1000 * statistics.median(writes):,.0f} ms (median of 3)",
              "stall < write", statistics.median(stalls) < statistics.median(writes))


def fast_recipe() -> list[str]:
    """The fast preset's recipe (optimizer, schedule, block options) as overrides for another shape."""
    from gptcore.config import BLOCK_OPTIONS, load_config

    fast = load_config("fast")
    keys = ["train.optimizer", "train.muon_lr", "train.schedule", "train.decay_frac", "model.zero_init_proj",
            *BLOCK_OPTIONS]
    return [f"{key}={getattr(getattr(fast, key.split('.')[0]), key.split('.')[1])}" for key in keys]


def section_time_to_loss(check: Check) -> None:
    """bench/bench_time_to_loss.py's measure, one seed: full validation passes, their time and the
    first steps' (compile) kept out of the training time; the run stops at the first pass that
    reaches the target (the schedule stays the 1,500 steps')."""
    steps = 40 if check.smoke else 1500
    overrides = [*fast_recipe(), f"train.max_iters={steps}", "train.warmup_iters=100" if not check.smoke else
                 "train.warmup_iters=5", "log.tensorboard=false"]
    command = [sys.executable, str(REPO / "bench" / "bench_time_to_loss.py"), "--one", "--preset", check.small[1],
               "--overrides", json.dumps(overrides), "--seed", "1337", "--data", check.data,
               "--every", "10" if check.smoke else "100", "--eval-from", "0.25", "--warmup", "10",
               "--stop-at", str(TARGET_VAL_LOSS)]
    result = must(subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900))
    run = json.loads(result.stdout.strip().splitlines()[-1])
    hit = next((point for point in run["curve"] if point["val"] <= TARGET_VAL_LOSS), None)
    best = min(run["curve"], key=lambda point: point["val"])
    value = (f"val {hit['val']:.4f} at step {hit['step']} after {hit['train_s']:.1f} s of training" if hit else
             f"not reached: best val {best['val']:.4f} at step {best['step']} ({best['train_s']:.1f} s)")
    check.row(f"{check.small_name} + fast recipe to val <= {TARGET_VAL_LOSS}", value, "<= 30 s of training",
              bool(hit) and hit["train_s"] <= 30 if check.cuda else None)
    check.row(f"{check.small_name} + fast recipe, apart", f"{run['ms_per_step']} ms/step; first 10 steps (compile) "
              f"{run['warmup_s']:.1f} s; full validation passes {run['eval_s']:.1f} s")


def section_ddp(check: Check) -> None:
    """Against the train section's compiled run (the same steps and profiler window), when it ran."""
    common = [*step_window(check), "train.compile=true"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    plain = check.out / "runs" / "train-compiled"
    if not (plain / "metrics.jsonl").is_file():
        plain, _ = train(check, check.seed, "ddp-plain", *common)
    grouped, log = train(check, check.seed, "ddp-one-rank", *common, "train.single_rank_group=true", launcher=torchrun)
    backend = next((part.split("=")[1] for part in log.split() if part.startswith("backend=")), "?")
    plain_ms = steady_median(read_metrics(plain / "metrics.jsonl"))
    ddp_ms = steady_median(read_metrics(grouped / "metrics.jsonl"))
    check.row("DDP(compiled), 1-rank group", f"backend {backend}, {ddp_ms:.2f} ms/step vs {plain_ms:.2f} plain "
              f"({ddp_ms / plain_ms:.3f}x)", "nccl" if check.cuda else "gloo",
              backend == ("nccl" if check.cuda else "gloo"))


def section_fsdp(check: Check) -> None:
    """FSDP against DDP on one GPU over a 1-rank group: the cost of sharding where there is
    nothing to shard across, and the peak memory of each; then FSDP compiled as compile=auto
    does it on a cluster (each block compiled, the root eager)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    window = [*step_window(check)[:5], "train.single_rank_group=true"]
    found = {}
    for strategy, compiled in (("ddp", "false"), ("fsdp", "false"), ("fsdp", "true")):
        run_dir, log = train(check, check.seed, f"fsdp-vs-{strategy}-{compiled}", *window, f"train.parallel={strategy}",
                             f"train.compile={compiled}", launcher=torchrun)
        records = read_metrics(run_dir / "metrics.jsonl")
        memory = next(r["memory"] for r in reversed(records) if r.get("memory"))
        found[strategy, compiled] = steady_median(records), memory
    (ddp_ms, ddp_memory), (fsdp_ms, fsdp_memory) = found["ddp", "false"], found["fsdp", "false"]
    check.row(f"{check.seed_name} FSDP vs DDP, 1 rank (eager)", f"{fsdp_ms:.2f} vs {ddp_ms:.2f} ms/step "
              f"({fsdp_ms / ddp_ms:.3f}x)")
    compiled_ms = found["fsdp", "true"][0]
    check.row(f"{check.seed_name} FSDP compiled per block vs eager", f"{compiled_ms:.2f} vs {fsdp_ms:.2f} ms/step "
              f"({fsdp_ms / compiled_ms:.2f}x faster)", "runs", True)
    for strategy, memory in (("DDP", ddp_memory), ("FSDP", fsdp_memory)):
        state = (memory["param_bytes"] + memory["grad_bytes"] + memory["optimizer_bytes"]) / 2**20
        peak = f", peak {memory['peak_memory_bytes'] / 2**20:,.0f} MiB" if "peak_memory_bytes" in memory else ""
        check.row(f"{check.seed_name} {strategy} memory, 1 rank", f"state {state:,.1f} MiB{peak}",
                  "peak reported" if check.cuda else "", "peak_memory_bytes" in memory if check.cuda else None)


# The order is the priority when the budget runs short: time_to_loss, the GPU target, comes
# right after the environment, and stops at the target.
# A smoke limit catches a hang, not a slow CPU: about 3x the section's time alone on the slowest
# CI machine seen (2-core AVX2 EPYC: 3, 12, 53, 39, 4, 22, 31, 6, 19 and 65 s), so that it holds
# beside the other tests' load.
SECTIONS = {  # name: (function, time limit in s on a GPU, in smoke mode)
    "env": (section_env, 15, 30),
    "time_to_loss": (section_time_to_loss, 120, 60),
    "train": (section_train, 75, 160),
    "resume": (section_resume, 40, 120),
    "gpu_to_cpu": (section_gpu_to_cpu, 20, 20),
    "inference": (section_inference, 30, 70),
    "decode": (section_decode, 55, 100),
    "checkpoint": (section_checkpoint, 15, 30),
    "ddp": (section_ddp, 30, 60),
    "fsdp": (section_fsdp, 45, 200),
}
QUICK_SECTIONS = ("env", "time_to_loss", "train", "resume", "decode", "ddp")  # each does less under --quick


# -- the driver -----------------------------------------------------------------------------------

def run_section(name: str, args) -> int:
    """One section in this process; its rows go to OUT/sections/NAME.json."""
    check = Check(args)
    try:
        SECTIONS[name][0](check)
    except Exception as err:  # noqa: BLE001  (a failed section is a row of the summary, not a crash)
        check.row("error", f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200] if str(err).strip() else ''}",
                  ok=False)
    path = check.out / "sections" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(check.rows, indent=1).encode())
    return 0


def run_in_own_group(command: list[str], log_path: Path, limit: float) -> bool:
    """Run command with its output in log_path, in a process group of its own; past `limit`
    seconds the whole group is ended (SIGTERM, then SIGKILL 5 s later): the ranks a torchrun or
    a `gptcore train` started go too, not only the child we started. Whether it finished in time."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=max(1.0, limit))
            return True
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    continue
                if not group_alive(process.pid):
                    break
            return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def last_lines(path: Path, count: int = 12) -> list[str]:
    try:
        return path.read_text(errors="replace").rstrip().splitlines()[-count:]
    except OSError:
        return []


def summary_markdown(rows: list[dict], header: str) -> str:
    mark = {True: "ok", False: "MISSED", None: ""}
    lines = [header, "", "| section | check | result | aim | |", "|---|---|---|---|---|"]
    lines += [f"| {r['section']} | {r['check']} | {r['value']} | {r['aim']} | {mark[r['ok']]} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(report: Path, rows: list[dict], header: str, failures: list[str]) -> str:
    """The table so far, in REPORT: a check cut short still leaves what ran."""
    text = summary_markdown(rows, header)
    report.mkdir(parents=True, exist_ok=True)
    for name, content in (("gpu_check.md", text), ("gpu_check.json", json.dumps(rows, indent=1)),
                          ("gpu_check.log", "\n".join(failures) + "\n")):
        atomic_write_bytes(report / name, content.encode("utf-8"))
    return text


def prepare_bundle(data: str | None) -> int:
    """gpu_bundle/train.txt from --data, tiny Shakespeare in ../shared, or the default corpus."""
    from shapes import TINY_SHAKESPEARE

    if data:
        source = Path(data)
    elif TINY_SHAKESPEARE.is_file():
        source = TINY_SHAKESPEARE
    else:
        from gptcore.data.corpus import fetch_corpus
        from gptcore.errors import UserInputError

        try:
            source = fetch_corpus("shakespeare")
        except UserInputError as err:
            print(f"gpu_check: {err}", file=sys.stderr)
            return 2
    if not source.is_file():
        print(f"gpu_check: --data {source} is not a file", file=sys.stderr)
        return 2
    with atomic_path(BUNDLE_TEXT) as tmp:
        shutil.copyfile(source, tmp)
    print(f"gpu_check: {BUNDLE_TEXT} from {source} ({BUNDLE_TEXT.stat().st_size:,} bytes)")
    print(f"gpu_check: now the device call: {DEVICE_CALL}")
    return 0


def main() -> int:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="put the training text into gpu_bundle/ and stop")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, for CI")
    parser.add_argument("--quick", action="store_true", help="the core sections, each doing less: <= 2 minutes")
    parser.add_argument("--out", default=str(REPO / "runs" / f"gpu_check-{datetime.now():%Y%m%d-%H%M%S}"),
                        help="runs and logs")
    parser.add_argument("--report", default=None, help="the table (default: $OUT where set, else --out)")
    parser.add_argument("--data", default=None, help="training text (default: gpu_bundle/train.txt, else tiny "
                        "Shakespeare in ../shared, else the default corpus)")
    parser.add_argument("--only", type=listed(one_of(*SECTIONS)), default=None, help="comma-separated sections to run")
    parser.add_argument("--budget", type=positive_number, default=None, help="seconds for the whole check "
                        f"(default {BUDGET_S['full']}, --quick {BUDGET_S['quick']})")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section
    args = parser.parse_args()
    if args.prepare:
        return prepare_bundle(args.data)
    if args.data is None:
        from shapes import data_path

        args.data = str(BUNDLE_TEXT) if BUNDLE_TEXT.is_file() else data_path()
    if args.section:
        return run_section(args.section, args)
    out = output_path(args.out, "--out", directory=True)
    report = output_path(args.report or os.environ.get("OUT") or args.out, "--report", directory=True)
    if (out / "runs").exists():  # its runs would refuse to overwrite the earlier ones, section by section
        refuse(f"{out} holds an earlier check's runs; pass a new --out directory")
    names = args.only or list(QUICK_SECTIONS if args.quick else SECTIONS)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    budget = args.budget or BUDGET_S["smoke" if args.smoke else "quick" if args.quick else "full"]
    device = hardware.device_name(torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    mode = "--smoke " if args.smoke else "--quick " if args.quick else ""
    rows, failures, started = [], [], time.perf_counter()
    print(f"gpu_check {mode}on {device}: {len(names)} sections in at most {budget:.0f} s; runs in {out}, "
          f"table in {report}", flush=True)
    for name in names:
        left = budget - (time.perf_counter() - started)
        limit = min(SECTIONS[name][2 if args.smoke else 1], left)
        log_path = out / "logs" / f"{name}.log"
        section_start = time.perf_counter()
        if limit < 5:
            found = [{"check": "-", "value": f"not run: the check's {budget:.0f} s were spent", "aim": "", "ok": None}]
        else:
            command = [sys.executable, __file__, "--section", name, "--out", str(out), "--data", args.data,
                       *(["--smoke"] if args.smoke else []), *(["--quick"] if args.quick else [])]
            finished = run_in_own_group(command, log_path, limit)
            try:
                found = json.loads((out / "sections" / f"{name}.json").read_text()) if finished else [
                    {"check": "-", "value": f"timed out after {limit:.0f} s", "aim": "", "ok": False}]
            except (OSError, ValueError):
                found = [{"check": "-", "value": f"no result; see {log_path}", "aim": "", "ok": False}]
        elapsed = time.perf_counter() - section_start
        rows += [{"section": f"{name} ({elapsed:.0f} s)", **row} for row in found]
        print(f"gpu_check: {name} done in {elapsed:.0f} s", flush=True)
        if any(row["ok"] is False for row in found):
            tail = last_lines(log_path)
            failures += [f"== {name} ==", *tail]
            print("\n".join(f"  {name}| {line}" for line in tail), flush=True)
        header = (f"gpu_check {mode}on {device}, torch {torch.__version__}, "
                  f"{time.perf_counter() - started:.0f} s in all, {datetime.now():%Y-%m-%d %H:%M}")
        text = write_report(report, rows, header, failures)
    print(text)
    print(f"gpu_check: table in {report / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
