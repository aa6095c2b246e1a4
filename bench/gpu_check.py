"""The GPU path in a few minutes on one GPU: every section time-limited, a summary table last.

    bash bench/gpu_check.sh                  # a GPU machine's own PyTorch, PYTHONPATH=., no install
    bash bench/gpu_check.sh --smoke          # the same sections on the CPU at a tiny shape (< 2 min)
    bash bench/gpu_check.sh --data data/tinyshakespeare.txt --out runs/gpu_check

Sections, each a subprocess with its own time limit (a hang in one leaves the others' results):
  env          torch, CUDA, the card, nvidia-smi as gptcore's sampler parses it
  train        the `seed` config eager and compiled: ms/step, tokens/s, MFU, the SDPA backend and
               the host syncs per step seen in a torch.profiler window, 5,000 iterations projected
               against the original project's 6,365 s on one GPU
  resume       train.deterministic=true: two straight runs and a stopped-and-resumed one, bit for bit
  gpu_to_cpu   the GPU checkpoint resumed on the CPU
  inference    sample, eval and `quantize --mode bf16` on the GPU; int8 on the GPU refused in one line
  decode       batch-1 decode at the seed shape, eager and compiled (CUDA graphs), fp32 and bf16
  shakespeare  `shakespeare_char` trained to val loss <= 1.47, and the training time it took
  ddp          DDP (compiled) over NCCL on a 1-rank process group, against the plain step
The summary goes to OUT/summary.md and OUT/summary.json; each section's log to OUT/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from harness import REPO, steady_median

import torch  # noqa: E402  (after the sys.path fix, like the gptcore imports)

from analysis.scaling import train_ms  # noqa: E402
from gptcore import hardware  # noqa: E402
from gptcore.metrics import read_metrics  # noqa: E402

ORIGINAL_SECONDS_1GPU = 6365  # the original project's 5,000 iterations on one GPU
TARGET_VAL_LOSS = 1.47  # nanoGPT's shakespeare_char reaches 1.4697
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
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
        self.smoke, self.out = args.smoke, Path(args.out)
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
               f"out_dir={run_dir}", "train.sample_tokens=0", "profile.sampler=false", *overrides]
    result = must(subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout))
    return run_dir, result.stdout + result.stderr


def trace_facts(trace_path: Path, steps: int) -> tuple[str, float]:
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
    syncs = sum(1 for name in names if name in SYNC_CALLS)
    return ", ".join(backends), syncs / steps


# -- sections -------------------------------------------------------------------------------------

def section_env(check: Check) -> None:
    from gptcore.sampler import query_gpus

    check.row("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    check.row("device", hardware.device_name(torch.device(check.device)))
    smi = shutil.which("nvidia-smi")
    gpus = query_gpus(smi) if smi else []
    check.row("nvidia-smi", "; ".join(f"gpu{g['index']} {g['mem_total_mib']:.0f} MiB, {g['util_pct']}% busy, "
                                      f"{g['power_w']} W, {g['temp_c']} C" for g in gpus)
              if gpus else "not found" if not smi else "no GPU rows parsed", ok=bool(gpus) if check.cuda else None)


def step_window(check: Check) -> list[str]:
    """The timed runs of the train and ddp sections: a few windows, a 3-step profiler window late."""
    steps = 40 if check.smoke else 120
    return ["train.log_interval=10", f"train.max_iters={steps}", f"train.eval_interval={steps}", "train.eval_iters=1",
            "train.ckpt_interval=0", "profile.torch=true", f"profile.torch_start={steps - 15}", "profile.torch_steps=3"]


def section_train(check: Check) -> None:
    window = step_window(check)
    eager_ms = None
    for compiled in ("false", "true"):
        label = "compiled" if compiled == "true" else "eager"
        run_dir, log = train(check, check.seed, f"train-{label}", *window, f"train.compile={compiled}")
        records = read_metrics(run_dir / "metrics.jsonl")
        ms = steady_median(records)
        tps = steady_median(records, "tokens_per_s")
        mfu = [r["mfu"] for r in records if "mfu" in r]
        backend, syncs = trace_facts(run_dir / "profile" / "trace_rank0.json", 3)
        name = f"{check.seed_name} {label}"
        check.row(f"{name}: ms/step", f"{ms:.2f} ({tps:,.0f} tokens/s)")
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
        else:
            check.row(f"{check.seed_name} compiled vs eager", f"{eager_ms / ms:.2f}x faster per step")
    untimed, _ = train(check, check.seed, "train-eager-untimed", *window[:5], "train.compile=false",
                       "profile.phases=false")
    untimed_ms = steady_median(read_metrics(untimed / "metrics.jsonl"))
    timer = "CUDA events" if check.cuda else "host clock"
    check.row(f"phase timers ({timer}), eager", f"{eager_ms:.2f} with vs {untimed_ms:.2f} ms/step without "
              f"({eager_ms / untimed_ms:.3f}x; the timed run also had a 3-step profiler window)")


def section_resume(check: Check) -> None:
    common = ["train.deterministic=true", "train.max_iters=40", "train.log_interval=10", "train.eval_interval=40",
              "train.eval_iters=2", "train.ckpt_interval=0"]
    straight_a, _ = train(check, check.small, "resume-straight-a", *common)
    straight_b, _ = train(check, check.small, "resume-straight-b", *common)
    resumed, _ = train(check, check.small, "resume-split", *common, "train.stop_at=20")
    shutil.copytree(resumed, check.out / "runs" / "resume-at-20")  # for gpu_to_cpu
    train(check, check.small, "resume-split", *common, "resume=auto")
    weights = {name: torch.load(path / "ckpt.pt", weights_only=True)["model"]
               for name, path in (("a", straight_a), ("b", straight_b), ("resumed", resumed))}
    def same(x: str, y: str) -> bool:
        return all(torch.equal(weights[x][key], weights[y][key]) for key in weights[x])
    check.row("two straight runs, deterministic", "bit-identical" if same("a", "b") else "differ", "bit-identical",
              same("a", "b"))
    check.row("stopped at 20 + resumed vs straight", "bit-identical" if same("a", "resumed") else "differ",
              "bit-identical", same("a", "resumed"))
    fast, _ = train(check, check.small, "resume-default", *common[1:])
    slow_ms, fast_ms = (steady_median(read_metrics(run / "metrics.jsonl")) for run in (straight_a, fast))
    check.row("train.deterministic=true costs", f"{slow_ms:.2f} vs {fast_ms:.2f} ms/step ({slow_ms / fast_ms:.2f}x)")


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
    from gptcore.data import CharTokenizer
    from gptcore.inference import LoadedModel, decode_speed
    from gptcore.model import GPT
    from gptcore.quantize import model_from_quantized, quantized_checkpoint

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
    for dtype, model in (("fp32", fp32), ("bf16", bf16)):
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


def section_shakespeare(check: Check) -> None:
    extra = ["train.max_iters=40", "train.eval_interval=20", "train.eval_iters=2"] if check.smoke else []
    start = time.perf_counter()
    run_dir, _ = train(check, check.small, "shakespeare-char", "train.ckpt_interval=0", *extra, timeout=900)
    wall = time.perf_counter() - start
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("eval")]
    reached = next((r for r in evals if r["val_loss"] <= TARGET_VAL_LOSS), None)
    # Training time up to an eval: each logged window's ms/step x its steps, eval and checkpoint taken out.
    previous, seconds = 0, []
    for step, ms in train_ms(records):
        seconds.append((step, (seconds[-1][1] if seconds else 0.0) + ms * (step - previous) / 1000))
        previous = step
    def trained_by(step: int) -> float:
        return next(s for at, s in seconds if at >= step)
    best = min(evals, key=lambda r: r["val_loss"])
    if reached:
        value = f"val {reached['val_loss']:.4f} at step {reached['step']} after {trained_by(reached['step']):.1f} s of training"
    else:
        value = f"not reached: best val {best['val_loss']:.4f} at step {best['step']}"
    check.row(f"{check.small_name} to val <= 1.47", value, "<= 60 s of training",
              bool(reached) and trained_by(reached["step"]) <= 60 if check.cuda else None)
    check.row(f"{check.small_name} whole run", f"{records[-1]['step']} steps, {wall:.0f} s wall with evals and start-up")


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
    """FSDP against DDP on one GPU, both eager over a 1-rank group: the cost of sharding where
    there is nothing to shard across, and the peak memory of each."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    window = [*step_window(check)[:5], "train.compile=false", "train.single_rank_group=true"]
    found = {}
    for strategy in ("ddp", "fsdp"):
        run_dir, _ = train(check, check.seed, f"fsdp-vs-{strategy}", *window, f"train.parallel={strategy}",
                           launcher=torchrun)
        records = read_metrics(run_dir / "metrics.jsonl")
        memory = next(r["memory"] for r in reversed(records) if r.get("memory"))
        found[strategy] = steady_median(records), memory
    (ddp_ms, ddp_memory), (fsdp_ms, fsdp_memory) = found["ddp"], found["fsdp"]
    check.row(f"{check.seed_name} FSDP vs DDP, 1 rank (eager)", f"{fsdp_ms:.2f} vs {ddp_ms:.2f} ms/step "
              f"({fsdp_ms / ddp_ms:.3f}x)")
    for strategy, memory in (("DDP", ddp_memory), ("FSDP", fsdp_memory)):
        state = (memory["param_bytes"] + memory["grad_bytes"] + memory["optimizer_bytes"]) / 2**20
        peak = f", peak {memory['peak_memory_bytes'] / 2**20:,.0f} MiB" if "peak_memory_bytes" in memory else ""
        check.row(f"{check.seed_name} {strategy} memory, 1 rank", f"state {state:,.1f} MiB{peak}",
                  "peak reported" if check.cuda else "", "peak_memory_bytes" in memory if check.cuda else None)


SECTIONS = {  # name: (function, time limit in s on a GPU, in smoke mode)
    "env": (section_env, 20, 20),
    "train": (section_train, 110, 60),
    "resume": (section_resume, 60, 30),
    "gpu_to_cpu": (section_gpu_to_cpu, 30, 10),
    "inference": (section_inference, 45, 40),
    "decode": (section_decode, 90, 45),
    "shakespeare": (section_shakespeare, 90, 20),
    "ddp": (section_ddp, 40, 40),
    "fsdp": (section_fsdp, 60, 40),
}


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
    path.write_text(json.dumps(check.rows, indent=1))
    return 0


def summary_markdown(rows: list[dict], header: str) -> str:
    mark = {True: "ok", False: "MISSED", None: ""}
    lines = [header, "", "| section | check | result | aim | |", "|---|---|---|---|---|"]
    lines += [f"| {r['section']} | {r['check']} | {r['value']} | {r['aim']} | {mark[r['ok']]} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, for CI")
    parser.add_argument("--out", default=str(REPO / "runs" / f"gpu_check-{datetime.now():%Y%m%d-%H%M%S}"))
    parser.add_argument("--data", default=None, help="training text (default: tiny Shakespeare, else the default corpus)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section
    args = parser.parse_args()
    if args.data is None:
        from shapes import data_path

        args.data = data_path()
    if args.section:
        return run_section(args.section, args)
    out = Path(args.out)
    if (out / "runs").exists():  # its runs would refuse to overwrite the earlier ones, section by section
        print(f"gpu_check: {out} holds an earlier check's runs; pass a new --out directory", file=sys.stderr)
        return 2
    (out / "logs").mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(SECTIONS)
    rows, started = [], time.perf_counter()
    for name in names:
        limit = SECTIONS[name][2 if args.smoke else 1]
        command = [sys.executable, __file__, "--section", name, "--out", str(out), "--data", args.data,
                   *(["--smoke"] if args.smoke else [])]
        section_start = time.perf_counter()
        with open(out / "logs" / f"{name}.log", "w") as log:
            try:
                subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
                found = json.loads((out / "sections" / f"{name}.json").read_text())
            except subprocess.TimeoutExpired:
                found = [{"check": "-", "value": f"timed out after {limit} s", "aim": "", "ok": False}]
            except (OSError, ValueError):
                found = [{"check": "-", "value": f"no result; see {out / 'logs' / f'{name}.log'}", "aim": "", "ok": False}]
        elapsed = time.perf_counter() - section_start
        rows += [{"section": f"{name} ({elapsed:.0f} s)", **row} for row in found]
        print(f"gpu_check: {name} done in {elapsed:.0f} s", flush=True)
    header = (f"gpu_check {'--smoke ' if args.smoke else ''}on {hardware.device_name(torch.device('cuda' if torch.cuda.is_available() and not args.smoke else 'cpu'))}, "
              f"torch {torch.__version__}, {time.perf_counter() - started:.0f} s in all, {datetime.now():%Y-%m-%d %H:%M}")
    text = summary_markdown(rows, header)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(text)
    print(f"gpu_check: summary in {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
