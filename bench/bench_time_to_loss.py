"""Time to a good model: the wall time and steps until the validation loss first reaches a target.

    python bench/bench_time_to_loss.py                      # baseline against fast: cpu shape, default corpus
    python bench/bench_time_to_loss.py --arms baseline,adamw-short,+muon,+wsd,+relu2,+qk_norm,+rotary,+zero_init,fast
    python bench/bench_time_to_loss.py --data ../shared/data/tinyshakespeare.txt --seeds 5
    python bench/bench_time_to_loss.py --arms finetune-dropout0.2,finetune --init-from runs/pretrain/ckpt.pt --data book.txt
    python bench/bench_time_to_loss.py --arms baseline,nanogpt --nanogpt ../nanoGPT   # nanoGPT's own train.py
    python bench/bench_time_to_loss.py --arms fast@../before,fast     # another checkout's gptcore against this one
    python bench/bench_time_to_loss.py --arms fast@../before,fast --set train.dtype=float32   # every arm in fp32
    python bench/bench_time_to_loss.py --report runs.json --arms fast,baseline   # saved runs, another reference

Each arm is a recipe run for its own number of steps (a schedule decays over max_iters, so the
step budget is part of the recipe). From `--eval-from` of the run on, every `--every` steps (at
least a fifteenth of the run), and at the last step, the model is evaluated on the WHOLE
validation split (consecutive windows, nothing sampled); that time is left out of the clock and
reported apart, and so is warm-up (the first `--warmup` steps: allocation, torch.compile). The
first arm listed is the reference (the baseline): the target is its own final validation loss,
averaged over its seeds (or --target); an arm's time to it is the training time at its first
evaluation at or below it. With --init-from every arm fine-tunes that checkpoint. With --nanogpt,
nanoGPT's own train.py is the arm `nanogpt`, on the baseline's settings (bench/nanogpt_arm.py).
An arm ARM@CHECKOUT runs ARM with the gptcore of another checkout (a commit before a change, say),
through that checkout's copy of this script.

Arms run as fresh processes, alternating (round r runs every arm with seed r), so that drift of
the machine falls on all arms alike. The verdict compares the arms' times with Welch's t-test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nanogpt_arm
from arguments import (BenchParser, at_least, checkout, data_source, existing_file, known_config, non_negative_number,
                       output_path, probability, refuse, thread_count)

from gptcore.files import atomic_write_bytes  # noqa: E402

# The recipes. `baseline` is nanoGPT's (AdamW, warmup + cosine, GPT-2 block) as the config gives
# it; `fast` is the fast preset cut to the --steps budget. The ablation starts from the baseline
# at that budget and adds one technique at a time, each keeping the ones before it, until it is
# the fast preset: what each technique bought at an equal number of steps.
SHORT = ["train.max_iters={steps}"]
MUON = ["train.optimizer=muon", "train.muon_lr=0.02"]
WSD = ["train.schedule=wsd", "train.decay_frac=0.5", "train.warmup_iters=50", "train.lr=4e-3", "train.min_lr=4e-5"]
BLOCK = ["model.mlp=relu2", "model.qk_norm=true", "model.position=rotary", "model.zero_init_proj=true"]
ARMS = {
    "baseline": ("{config}", []),
    "fast": ("fast", SHORT),
    "adamw-short": ("{config}", SHORT),
    "+muon": ("{config}", SHORT + MUON),
    "+wsd": ("{config}", SHORT + MUON + WSD),
    "+relu2": ("{config}", SHORT + MUON + WSD + BLOCK[:1]),
    "+qk_norm": ("{config}", SHORT + MUON + WSD + BLOCK[:2]),
    "+rotary": ("{config}", SHORT + MUON + WSD + BLOCK[:3]),
    "+zero_init": ("{config}", SHORT + MUON + WSD + BLOCK[:4]),  # + an untied head: the fast preset
    "fast-gelu": ("fast", SHORT + ["model.mlp=gelu"]),  # the fast preset with GPT-2's MLP instead of ReLU²
    # Fine-tuning (with --init-from): the finetune preset (no dropout), and with nanoGPT's dropout 0.2.
    "finetune": ("finetune", []),
    "finetune-dropout0.2": ("finetune", ["model.dropout=0.2"]),
    "nanogpt": ("{config}", []),  # nanoGPT's own train.py on the baseline's settings (--nanogpt)
}


def split_arm(arm: str) -> tuple[str, Path]:
    """An arm's recipe (a key of ARMS) and the copy of this script that runs it: this checkout's,
    or for ARM@CHECKOUT that checkout's."""
    recipe, at, checkout = arm.partition("@")
    return recipe, Path(checkout) / "bench" / Path(__file__).name if at else Path(__file__)


def evaluation_every(every: int, max_iters: int) -> int:
    """Steps between full validation passes: --every, or more, so that a run has at most ~15."""
    return max(every, max_iters // 15 // every * every)


def run_one(args) -> dict:
    """One arm, one seed, in this process: the curve of full validation losses against training time."""
    import torch

    from gptcore.config import load_config
    from gptcore.telemetry.profiling import PhaseTimer
    from gptcore.training.evaluation import evaluate_full
    from gptcore.cluster import distributed
    from gptcore.training.parts import compose
    from gptcore.training.rundir import RunLock
    from gptcore.training.step import train_step

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.preset, json.loads(args.overrides) + [
            f"out_dir={tmp}/run", f"data.path={args.data}", f"train.seed={args.seed}", "train.sample_tokens=0",
            "profile.sampler=false", "log.tensorboard=false", "profile.comm=false"])
        lock = RunLock(Path(config.out_dir))
        try:
            parts = compose(config, distributed.read_contract(), lock, print)
            t, model = config.train, parts.model
            timer = PhaseTimer(parts.device, enabled=False)
            sync = torch.cuda.synchronize if parts.device.type == "cuda" else (lambda: None)
            curve, trained, warmup, evaluating = [], 0.0, 0.0, 0.0
            every = evaluation_every(args.every, t.max_iters)
            for step in range(t.max_iters):
                start = time.perf_counter()
                train_step(parts, step, timer)
                sync()
                elapsed = time.perf_counter() - start
                if step < args.warmup:
                    warmup += elapsed
                else:
                    trained += elapsed
                done = step + 1
                if done == t.max_iters or (done % every == 0 and done >= args.eval_from * t.max_iters):
                    start = time.perf_counter()
                    val = evaluate_full(model, parts.batches, "val", args.eval_rows, parts.autocast)
                    evaluating += time.perf_counter() - start
                    curve.append({"step": done, "train_s": round(trained, 3), "val": round(val, 5)})
                    if not math.isfinite(val) or val <= args.stop_at:
                        break
        finally:
            lock.release()
            distributed.shutdown()
    return {"preset": args.preset, "overrides": json.loads(args.overrides), "seed": args.seed,
            "max_iters": config.train.max_iters, "warmup_s": round(warmup, 3), "eval_s": round(evaluating, 3),
            "ms_per_step": round(1000 * trained / max(1, curve[-1]["step"] - args.warmup), 2),
            "final_val": curve[-1]["val"], "curve": curve, "threads": torch.get_num_threads()}


def newton_schulz_flops(shape: tuple[int, int], steps: int = 5) -> int:
    """FLOPs of torch.optim.Muon's orthogonalization of one (rows, cols) update: per iteration
    X X^T (2 m^2 n), b G + c G G (2 m^3) and a X + (..) X (2 m^2 n), with m the shorter side."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m ** 3)


def optimizer_cost(preset: str, rounds: int) -> list[str]:
    """The optimizer step alone on the preset's model with gradients in place, alternating: AdamW,
    and Muon + AdamW with the Newton-Schulz iterations in bf16 and in fp32. What Muon adds per step,
    the FLOPs behind it, and which precision is faster on this CPU (training takes fp32 where bf16
    is not in hardware)."""
    import torch

    from gptcore.config import load_config
    from gptcore.models.gpt import GPT
    from gptcore.models.optim import make_optimizer
    from gptcore.telemetry.hardware import has_native_bf16

    config = load_config(preset, [])
    config.model.vocab_size = 84
    model = GPT(config.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {"AdamW": make_optimizer(model, load_config(preset, ["train.optimizer=adamw"]))}
    for dtype in (torch.bfloat16, torch.float32):
        name = f"Muon ({str(dtype).replace('torch.', '')}) + AdamW"
        optimizers[name] = make_optimizer(model, load_config(preset, ["train.optimizer=muon"]), dtype)
    times = {name: [] for name in optimizers}
    for round_ in range(rounds):
        for name in sorted(optimizers, reverse=round_ % 2 == 1):
            optimizers[name].step()  # warm: state allocated
            start = time.perf_counter()
            for _ in range(10):
                optimizers[name].step()
            times[name].append((time.perf_counter() - start) / 10 * 1000)
    flops = sum(newton_schulz_flops(tuple(p.shape)) for p in model.transformer.h.parameters() if p.dim() == 2)
    adamw = statistics.median(times["AdamW"])
    lines = [f"optimizer step on the {preset} model ({torch.get_num_threads()} threads, median (min-max) of {rounds} "
             f"alternating rounds of 10); Newton-Schulz {flops / 1e9:.2f} GFLOP per step"]
    for name, measured in times.items():
        median = statistics.median(measured)
        lines.append(f"  {name}: {median:.2f} ms ({min(measured):.2f}-{max(measured):.2f})"
                     + (f", +{median - adamw:.2f} ms" if name != "AdamW" else ""))
    native = has_native_bf16(torch.device("cpu"))
    lines.append(f"  training here orthogonalizes in {'bf16 (bf16 matmuls in' if native else 'fp32 (bf16 matmuls not in'} "
                 "hardware)")
    return lines


def block_cost(preset: str, rounds: int) -> list[str]:
    """Forward + backward of one batch of the preset's shape with each block option alone, and
    with all of the fast preset's, against GPT-2's block, alternating, in this process (bf16
    autocast where training uses it)."""
    import torch

    from gptcore.config import load_config
    from gptcore.models.gpt import GPT
    from gptcore.training.setup import autocast_context, autocast_dtype

    config = load_config(preset, [])
    options = {"gpt2": [], "rotary": ["model.position=rotary"], "qk_norm": ["model.qk_norm=true"],
               "rmsnorm": ["model.norm=rmsnorm"], "relu2": ["model.mlp=relu2"], "untied": ["model.tie_head=false"],
               "fast's": BLOCK + ["model.tie_head=false"]}
    cpu = torch.device("cpu")
    autocast = autocast_context(autocast_dtype(config, cpu), cpu)
    models = {}
    for name, extra in options.items():
        model_config = load_config(preset, extra).model
        model_config.vocab_size = 84
        models[name] = GPT(model_config)
    x = torch.randint(0, 84, (config.train.batch_size, config.model.block_size))
    times = {name: [] for name in models}
    for round_ in range(rounds):
        for name in (list(models) if round_ % 2 == 0 else list(models)[::-1]):
            start = time.perf_counter()
            for _ in range(3):
                with autocast:
                    _, loss = models[name](x, x)
                loss.backward()
            times[name].append((time.perf_counter() - start) / 3 * 1000)
    base = statistics.median(times["gpt2"])
    return [f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) | "
            f"{statistics.median(values) / base:.3f}x |" for name, values in times.items()]


def time_to(curve: list[dict], target: float) -> tuple[float, int] | None:
    """(training seconds, steps) at the first evaluation at or below target, or None."""
    hit = next((point for point in curve if point["val"] <= target), None)
    return (hit["train_s"], hit["step"]) if hit else None


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and its two-sided p-value (Student's t with the Welch-Satterthwaite
    degrees of freedom)."""
    ma, mb, va, vb = statistics.mean(a), statistics.mean(b), statistics.variance(a), statistics.variance(b)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0:
        return math.inf, 0.0
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return t, incomplete_beta(df / 2, 0.5, df / (df + t * t))


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's
    method), which converges fast for x < (a + 1) / (a + b + 2); the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) covers the rest. I_{df/(df+t^2)}(df/2, 1/2) is Student's
    two-sided p-value."""
    if x <= 0 or x >= 1:
        return max(0.0, min(1.0, x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-12:
            break
    return front * result


def mean_std(values: list[float], digits: int = 2) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def arm_hits(runs: list[dict], target: float, reference: bool) -> list[tuple[float, int] | None]:
    """Each run's (training seconds, steps) to the target. The reference arm's is its whole run:
    the target is the loss it reaches at its last step (its seeds' mean), which about half of them
    pass a little earlier or miss by a little; either way the wait for its result is the run."""
    if reference:
        return [(run["curve"][-1]["train_s"], run["curve"][-1]["step"]) for run in runs]
    return [time_to(run["curve"], target) for run in runs]


def saved_arms(results: dict[str, list[dict]], arms: str | None) -> dict[str, list[dict]]:
    """The runs of an earlier --json to report: all of them, or the arms named, in that order (the
    first is the reference), so that one set of runs is reported against another reference."""
    if arms is None:
        return results
    chosen = arms.split(",")
    if unknown := [arm for arm in chosen if arm not in results]:
        refuse(f"the file has no arm {', '.join(unknown)}; it has {', '.join(results)}")
    return {arm: results[arm] for arm in chosen}


def report(results: dict[str, list[dict]], target: float) -> list[str]:
    """The table and verdicts; the first arm of RESULTS is the reference ("vs baseline")."""
    reference = next(iter(results))
    lines = [f"target: validation loss {target:.4f} (full pass over the validation split; the mean final loss "
             f"of {reference}, the reference arm, unless given)", "",
             "| arm | steps run | ms/step | final val | reached | time to target (s) | steps to target | vs baseline |",
             "|---|---|---|---|---|---|---|---|"]
    base_times = [hit[0] for hit in arm_hits(results[reference], target, reference=True)]
    for arm, runs in results.items():
        hits = arm_hits(runs, target, arm == reference)
        times = [hit[0] for hit in hits if hit]
        steps = [hit[1] for hit in hits if hit]
        ratio = (f"{statistics.mean(times) / statistics.mean(base_times):.1%}"
                 if times and base_times and len(times) == len(runs) else "-")
        lines.append(f"| {arm} | {runs[0]['max_iters']} | {mean_std([r['ms_per_step'] for r in runs])} | "
                     f"{mean_std([r['final_val'] for r in runs], 4)} | {len(times)}/{len(runs)} | "
                     f"{mean_std(times) if times else '-'} | {mean_std(steps, 0) if steps else '-'} | {ratio} |")
    lines.append("")
    for arm, runs in results.items():
        times = [hit[0] for hit in arm_hits(runs, target, arm == reference) if hit]
        if arm == reference or len(times) < 2 or len(base_times) < 2 or len(times) < len(runs):
            continue
        t, p = welch(times, base_times)
        verdict = "faster" if statistics.mean(times) < statistics.mean(base_times) else "slower"
        lines.append(f"verdict {arm}: {statistics.mean(times) / statistics.mean(base_times):.1%} of {reference}'s "
                     f"time to target, {verdict} (Welch t = {t:.2f}, p = {p:.2g}, n = {len(times)} and {len(base_times)})")
    return lines


def stepwise(results: dict[str, list[dict]]) -> list[str]:
    """Each arm's final loss against the arm listed before it (Welch's t on the seeds): what each
    technique of a cumulative ablation bought at an equal number of steps."""
    lines = ["| arm | final val | change from the arm before | Welch p |", "|---|---|---|---|"]
    before = None
    for arm, runs in results.items():
        finals = [run["final_val"] for run in runs]
        change = p = ""
        if before and len(finals) > 1 and len(before) > 1:
            change, (_, p) = f"{statistics.mean(finals) - statistics.mean(before):+.4f}", welch(finals, before)
            p = f"{p:.2g}"
        lines.append(f"| {arm} | {mean_std(finals, 4)} | {change} | {p} |")
        before = finals
    return lines


def arm_config(recipe: str, config: str, steps: int, overrides: list[str]) -> tuple[str, list[str]]:
    """A gptcore arm's preset and overrides: its recipe's at this step budget, then --set's."""
    preset, extra = ARMS[recipe]
    return preset.format(config=config), [o.format(steps=steps) for o in extra] + overrides


def check_configs(overrides: list[str], recipes: set[str], config: str, steps: int) -> None:
    """Every arm's config, from --config with the arm's own overrides, then with --set too, refused
    in one line before any run, naming what is at fault; the nanogpt arm's must be one nanoGPT's
    train.py can run (it takes no --set)."""
    from gptcore.config import load_config
    from gptcore.errors import UserInputError

    if overrides and "nanogpt" in recipes:
        refuse("--set changes gptcore's config; the arm nanogpt runs nanoGPT's train.py")
    for recipe in sorted(recipes):
        preset, own = arm_config(recipe, config, steps, [])
        for fault, extra in ((f"the arm {recipe} cannot run on --config {config}", []), ("--set", overrides)):
            try:
                checked = load_config(preset, own + extra)
            except UserInputError as err:
                refuse(f"{fault}: {err}")
        if recipe == "nanogpt":
            nanogpt_arm.check_expressible(checked, preset)


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=known_config, default="cpu", help="the baseline's preset (default cpu)")
    parser.add_argument("--data", type=data_source, default="shakespeare", help="corpus name or text file (default: the default corpus)")
    parser.add_argument("--arms", help=f"comma-separated, from {', '.join(ARMS)} (default baseline,fast); with "
                        "--report, which of the file's arms, the first the reference (default all)")
    parser.add_argument("--steps", type=at_least(1), default=350, help="step budget of fast and the ablation arms")
    parser.add_argument("--seeds", type=at_least(1), default=5)
    parser.add_argument("--every", type=at_least(1), default=25, help="steps between full validation passes (at least "
                        "a fifteenth of the run)")
    parser.add_argument("--eval-from", type=probability, default=0.5, help="first evaluation at this fraction of the run")
    parser.add_argument("--eval-rows", type=at_least(1), default=64)
    parser.add_argument("--warmup", type=at_least(0), default=3, help="first steps timed apart (allocation, compile)")
    parser.add_argument("--target", type=non_negative_number, default=0.0, help="default: the first arm's mean final val loss")
    parser.add_argument("--threads", type=thread_count(0), default=0, help="train.threads (0: all this process may use)")
    parser.add_argument("--init-from", type=existing_file, help="every arm fine-tunes this checkpoint (train.init_from)")
    parser.add_argument("--nanogpt", metavar="CHECKOUT", help="a nanoGPT checkout, for the arm nanogpt",
                        type=checkout(nanogpt_arm.NANOGPT_FILES, "a nanoGPT checkout (git clone "
                                      "https://github.com/karpathy/nanoGPT)"))
    parser.add_argument("--json", help="write every run's curve here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every arm (repeatable), e.g. train.dtype=float32")
    parser.add_argument("--optimizer-cost", action="store_true", help="time the optimizer step alone and stop")
    parser.add_argument("--block-cost", action="store_true", help="time forward + backward per block option and stop")
    parser.add_argument("--report", metavar="JSON", help="report the runs of an earlier --json again and stop")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=non_negative_number, default=0.0, help=argparse.SUPPRESS)  # --one: a val loss
    args = parser.parse_args()
    if args.one:
        print(json.dumps(nanogpt_arm.run(args, evaluation_every) if args.nanogpt else run_one(args)))
        return
    if args.report:
        try:
            saved = json.loads(Path(args.report).read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            refuse(f"cannot read runs from {args.report} ({err}); give a file that --json wrote")
        results = saved_arms(saved, args.arms)
        target = args.target or statistics.mean(r["final_val"] for r in next(iter(results.values())))
        print("\n".join(report(results, target) + [""] + stepwise(results)))
        return
    if args.block_cost:
        print("| block | forward + backward ms (min-max) | vs GPT-2 |\n|---|---|---|")
        print("\n".join(block_cost(args.config, rounds=7)))
        return
    if args.optimizer_cost:
        print("\n".join(optimizer_cost("fast" if args.config == "cpu" else args.config, rounds=7)))
        return
    json_path = output_path(args.json, "--json")
    arms = (args.arms or "baseline,fast").split(",")
    recipes = [split_arm(arm)[0] for arm in arms]
    if unknown := [arm for arm, recipe in zip(arms, recipes) if recipe not in ARMS]:
        refuse(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if missing := [arm for arm in arms if not split_arm(arm)[1].is_file()]:
        refuse(f"no {split_arm(missing[0])[1]} for the arm {missing[0]}: ARM@CHECKOUT needs a "
               "gptcore checkout there")
    if "nanogpt" in recipes:  # nanogpt@CHECKOUT too: nanoGPT's train.py through that checkout's copy
        if not args.nanogpt:
            refuse("the arm nanogpt runs nanoGPT's own train.py: pass --nanogpt CHECKOUT")
        if args.init_from:
            refuse("the arm nanogpt trains from scratch; leave out --init-from or the arm")
    steps = args.steps
    check_configs(args.set, set(recipes), args.config, steps)
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for round_ in range(args.seeds):
        for arm in arms:
            recipe, script = split_arm(arm)
            preset, overrides = arm_config(recipe, args.config, steps, args.set)
            overrides += (([f"train.threads={args.threads}"] if args.threads else [])
                          + ([f"train.init_from={Path(args.init_from).resolve()}"] if args.init_from else []))
            command = [sys.executable, str(script), "--one", "--preset", preset,
                       "--overrides", json.dumps(overrides), "--seed", str(1000 + round_), "--data", args.data,
                       "--every", str(args.every), "--eval-from", str(args.eval_from), "--eval-rows", str(args.eval_rows), "--warmup", str(args.warmup)]
            if recipe == "nanogpt":
                command += ["--nanogpt", str(args.nanogpt)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"bench_time_to_loss: arm {arm} seed {1000 + round_} failed:\n{done.stderr[-2000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            results[arm].append(run)
            print(f"round {round_} {arm}: {run['max_iters']} steps, {run['ms_per_step']} ms/step, final val "
                  f"{run['final_val']:.4f}, eval {run['eval_s']:.0f} s (not timed)", flush=True)
    target = args.target or statistics.mean(r["final_val"] for r in results[arms[0]])
    if json_path:
        atomic_write_bytes(json_path, json.dumps({"target": target, "results": results}, indent=1).encode())
    print("\n".join(report(results, target) + [""] + stepwise(results)))


if __name__ == "__main__":
    main()
