"""nanoGPT's own train.py as an arm of bench_time_to_loss.py (`--nanogpt CHECKOUT`, arm `nanogpt`).

Its train.py runs unchanged from a scratch directory that links the checkout's train.py,
model.py and configurator.py, and holds as data/gptcore/ the token ids our arms read, written as
nanoGPT's uint16 train.bin and val.bin, beside a meta.pkl of the same vocabulary. Its flags are the
baseline preset's: shape, batch, AdamW and its betas, warmup then cosine to min_lr at the last
step, gradient clipping. The rest is nanoGPT's own way on the device: on a CPU fp32 (its autocast
is off there) and compile=False (its README's advice for CPUs); seed 1337 whatever ours is (it
takes none), so its rounds sample the wall time only.

Its evaluation averages random batches (estimate_loss), which a time to a target cannot use. So
it evaluates one batch (eval_iters=1) and saves a checkpoint at every evaluation; each save is
moved aside when the next iteration's line shows it complete, and after the run each one at our
evaluation steps is imported (gptcore.formats.nanogpt) and evaluated on the whole validation
split, as our arms are. Training time is the sum of its per-iteration times (log_interval=1); an
iteration that began with its evaluation and save counts as the run's median iteration, and the
rest of it is reported as evaluation time.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from arguments import refuse

NANOGPT_FILES = ("train.py", "model.py", "configurator.py")  # what --nanogpt must hold
CHARACTERS_ONLY = ("the nanogpt arm needs a character vocabulary (nanoGPT's meta.pkl): data.vocab chars, and --data a "
                   "text or a directory prepared with characters")
ITERATION = re.compile(r"^iter (\d+): loss \S+, time ([\d.]+)ms")


def check_expressible(config, preset: str) -> None:
    """nanoGPT's train.py is AdamW, warmup + cosine and GPT-2's block, on characters (its meta.pkl)
    or GPT-2 tokens; checked before any arm runs."""
    from gptcore.config import non_gpt2_options

    t = config.train
    if t.optimizer != "adamw" or t.schedule != "cosine" or (options := non_gpt2_options(config.model)):
        refuse(f"the nanogpt arm takes the baseline's recipe (AdamW, cosine, GPT-2's block); "
               f"--config {preset} has optimizer {t.optimizer}, schedule {t.schedule}"
               f"{', ' + ', '.join(options) if t.optimizer == 'adamw' and t.schedule == 'cosine' else ''}")
    if config.data.vocab != "chars":
        refuse(CHARACTERS_ONLY)


def nanogpt_flags(config, eval_interval: int, device: str) -> list[str]:
    """train.py's --key=value flags for the baseline preset (its configurator evaluates each value
    as a Python literal and insists on the default's type, so floats keep their point)."""
    m, t = config.model, config.train
    values = {"n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "block_size": m.block_size,
              "dropout": float(m.dropout), "bias": m.bias, "batch_size": t.batch_size,
              "gradient_accumulation_steps": t.grad_accum, "learning_rate": float(t.lr), "min_lr": float(t.min_lr),
              "warmup_iters": t.warmup_iters, "max_iters": t.max_iters, "lr_decay_iters": t.max_iters,
              "weight_decay": float(t.weight_decay), "beta1": float(t.beta1), "beta2": float(t.beta2),
              "grad_clip": float(t.grad_clip), "eval_interval": eval_interval, "eval_iters": 1, "log_interval": 1,
              "always_save_checkpoint": True, "dataset": "gptcore", "out_dir": "out", "device": device}
    if device == "cpu":
        values.update(dtype="float32", compile=False)
    return [f"--{key}={value!r}" if isinstance(value, float) else f"--{key}={value}" for key, value in values.items()]


def train_seconds(times: dict[int, float], interval: int, warmup: int, steps: int) -> tuple[float, float]:
    """(training seconds of iterations warmup..steps-1, their evaluation seconds): an iteration
    that began with an evaluation and a save counts as the run's median plain iteration instead."""
    median = statistics.median(seconds for step, seconds in times.items() if step >= warmup and step % interval)
    trained = evaluating = 0.0
    for step in range(warmup, steps):
        if step % interval == 0:
            trained += min(times[step], median)
            evaluating += max(0.0, times[step] - median)
        else:
            trained += times[step]
    return trained, evaluating


def run(args, evaluation_every) -> dict:
    """One run of nanoGPT's train.py: the curve of full validation losses against training time."""
    import numpy as np
    import torch

    from gptcore.config import config_from_dict, load_config
    from gptcore.cpus import usable_cpus
    from gptcore.data.batches import Batches
    from gptcore.data.corpus import read_meta
    from gptcore.data.prepare import resolve_data
    from gptcore.formats.nanogpt import import_checkpoint, meta_pickle
    from gptcore.models.gpt import GPT
    from gptcore.training.evaluation import evaluate_full
    from gptcore.training.setup import autocast_context, autocast_dtype

    checkout = args.nanogpt.resolve()
    config = load_config(args.preset, [*json.loads(args.overrides), f"data.path={args.data}"])
    t = config.train
    every = evaluation_every(args.every, t.max_iters)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interval = math.gcd(every, t.max_iters)  # its evaluations must fall on ours and on the last step
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        prepared = resolve_data(config.data.path, config.data.clean, scratch / "prepared")
        meta = read_meta(prepared)
        vocab = meta["vocab"]
        if not isinstance(vocab, list):
            refuse(CHARACTERS_ONLY)  # a prepared directory of bytes
        data = scratch / "data" / "gptcore"
        data.mkdir(parents=True)
        for split in ("train", "val"):  # ours are uint8 below 257 characters
            np.fromfile(prepared / f"{split}.bin", dtype=meta["dtype"]).astype(np.uint16).tofile(data / f"{split}.bin")
        (data / "meta.pkl").write_bytes(meta_pickle(vocab))
        for name in NANOGPT_FILES:
            (scratch / name).symlink_to(checkout / name)
        saved, times, output = scratch / "saved", {}, deque(maxlen=30)  # the tail, for a failure
        saved.mkdir()
        flags = nanogpt_flags(config, interval, device.type)
        with subprocess.Popen([sys.executable, "train.py", *flags], cwd=scratch, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as process:
            for line in process.stdout:
                output.append(line)
                if match := ITERATION.match(line):
                    step = int(match[1])
                    times[step] = float(match[2]) / 1000
                    if step and step % interval == 0:  # this iteration began with a save, now complete
                        (scratch / "out" / "ckpt.pt").rename(saved / f"{step}.pt")
        if process.returncode != 0 or len(times) <= t.max_iters:
            sys.exit(f"bench_time_to_loss: nanoGPT's train.py failed:\n{''.join(output)}")
        torch.set_num_threads(t.threads or usable_cpus())  # as our arms evaluate
        autocast = autocast_context(autocast_dtype(config, device), device)
        batches = Batches(prepared, config.model.block_size, args.seed, device=device)
        curve, evaluating = [], 0.0
        for step in sorted(int(path.stem) for path in saved.glob("*.pt")):
            if step != t.max_iters and (step % every or step < args.eval_from * t.max_iters):
                continue
            start = time.perf_counter()
            converted, _ = import_checkpoint(saved / f"{step}.pt", data / "meta.pkl")
            model = GPT(config_from_dict(converted["config"], "the imported checkpoint").model).to(device)
            model.load_state_dict(converted["model"])
            val = evaluate_full(model, batches, "val", args.eval_rows, autocast)
            evaluating += time.perf_counter() - start
            trained, _ = train_seconds(times, interval, args.warmup, step)
            curve.append({"step": step, "train_s": round(trained, 3), "val": round(val, 5)})
    trained, its_evaluations = train_seconds(times, interval, args.warmup, t.max_iters)
    return {"preset": "nanogpt", "overrides": flags, "seed": 1337, "max_iters": t.max_iters,
            "warmup_s": round(sum(times[step] for step in range(args.warmup)), 3),
            "eval_s": round(evaluating + its_evaluations, 3),
            "ms_per_step": round(1000 * trained / (t.max_iters - args.warmup), 2),
            "final_val": curve[-1]["val"], "curve": curve, "threads": torch.get_num_threads()}
