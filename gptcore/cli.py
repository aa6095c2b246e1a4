"""`gptcore` command line: prepare | train | sample | eval | quantize | export | import.

    gptcore prepare --data shakespeare
    gptcore train --config cpu out_dir=runs/cpu
    gptcore sample --ckpt runs/cpu/ckpt.pt --prompt "ROMEO:"
    gptcore eval --ckpt runs/cpu/ckpt.pt --json

Errors a user can fix are printed as one line on stderr with exit code 2 (1 for failures at run
time); no traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import time
from pathlib import Path

from gptcore.cluster.spinning import set_wait_policy
from gptcore.cpus import usable_cpus
from gptcore.errors import GptcoreError, UserInputError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, once: not where its help already says it, nor for a required
    option, a flag or an option whose default is nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default is None or action.default is False \
                or action.default == "" or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but its usage errors take the same one-line path as every other error, and
    --help shows every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserInputError(f"{message} (see {self.prog} --help)")


def at_least(lowest: int, most: int | None = None, why: str = ""):
    """An argparse type: an integer from `lowest` to `most` (WHY it stops there), refused in one
    line otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:,} ({why}), got {value:,}")
        return value
    return parse


# Upper bounds of the numeric flags: what a command holds in memory grows with them.
MAX_TOKENS = 10_000_000  # sample: the generated ids and text are held in memory
MAX_ROWS = 4096  # eval/quantize --batch-size: one batch's logits are rows x block x vocabulary floats
MAX_BATCHES = 1_000_000
MAX_SEED = 2**64 - 1  # torch.Generator's seed is 64 bits


def thread_count(lowest: int):
    """An argparse type for --threads: from `lowest` up to the CPUs this process may use (more
    threads than CPUs only contend, and a huge count makes OpenMP fail allocating their stacks)."""
    def parse(text: str) -> int:
        value = at_least(lowest)(text)
        usable = usable_cpus()
        if value > usable:
            raise argparse.ArgumentTypeError(f"{value} is more than the {usable} CPU(s) this process may use")
        return value
    return parse


def non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def positive_number(text: str) -> float:
    value = non_negative_number(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def cmd_prepare(args) -> None:
    from gptcore.data.corpus import describe
    from gptcore.data.prepare import prepare

    out_dir, meta = prepare(args.data, args.out, args.clean, vocab=args.vocab, workers=args.workers)
    print(f"prepared {out_dir}: {describe(meta)}")


def cmd_train(args) -> None:
    from gptcore.cluster import preemption

    # From the start to the end of the sample, a scheduler's signal stops training at a step
    # boundary and never ends the process with a signal status.
    with preemption.catching():
        from gptcore.config import load_config

        config = load_config(args.config, args.overrides)  # before torch is imported: a typo fails at once
        from gptcore.data.corpus import bits_unit
        from gptcore.telemetry.loop import format_eta
        from gptcore.training.train import Trainer

        started = time.monotonic()
        trainer = Trainer(config)
        result = trainer.run()
        if not trainer.contract.is_main:
            return
        if result.start_step >= config.train.max_iters:
            print(f"{result.out_dir} is complete: its checkpoint is at step {result.start_step}/{config.train.max_iters}, "
                  f"so nothing was trained or sampled; gptcore sample --ckpt {result.checkpoint}, or train on with a "
                  "larger train.max_iters")
            return
        if result.final_step < config.train.max_iters:
            return
        if config.train.sample_tokens:
            from gptcore.inference.generate import generate_text, load_model

            loaded = load_model(result.checkpoint, str(result.device))
            text, speed = generate_text(loaded, "\n", config.train.sample_tokens, seed=config.train.seed)
            print(f"--- sample ({config.train.sample_tokens} tokens, {speed:.0f} tokens/s on {loaded.device}) ---")
            print(text.strip("\n"))
            print("---")
            from gptcore.telemetry.sinks import add_sample_text

            add_sample_text(config, result.out_dir, result.final_step, text)
        print(training_summary(result, format_eta(time.monotonic() - started), bits_unit(result.vocab)))
        shared = session_load(result.out_dir, result.start_step) if config.profile.sampler else None
        if shared:
            print(shared)


def training_summary(result, took: str, unit: str = "bits/char") -> str:
    """The end of a finished training: how it went, where the model is, what to run next."""
    best_val, ckpt = result.best_val, result.checkpoint
    best = f"best val loss {best_val:.4f} ({best_val / math.log(2):.3f} {unit})" if math.isfinite(best_val) else \
        "no evaluation"
    out = result.out_dir
    return "\n".join([
        f"done: {result.final_step} steps in {took}, {best}; checkpoint {ckpt}",
        f"next: gptcore sample --ckpt {ckpt} --prompt \"...\" --tokens 300",
        f"      gptcore quantize --ckpt {ckpt} --mode int8 --out {out / 'ckpt_int8.pt'}",
        f"      {interpreter()} -m analysis.report {out} --out {out / 'report'}",
    ])


def session_load(out_dir: Path, start_step: int) -> str | None:
    """The line saying what other processes on the node cost this session, if they took a share."""
    from gptcore.telemetry.metrics import read_metrics
    from gptcore.telemetry.sampler import read_samples, shared_node_cost

    steps = [r for r in read_metrics(out_dir / "metrics.jsonl") if "ms_per_step" in r and r["step"] > start_step]
    return shared_node_cost(steps, read_samples(out_dir / "samples" / "node0.jsonl"))


def interpreter() -> str:
    """This Python as a hint can name it: `.venv/bin/python` from the checkout (the report needs
    the venv's matplotlib, and the quick start never activates the venv), else its full path."""
    path = Path(sys.executable)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_config(args) -> None:
    from gptcore.config import CHOICES, key_table, load_config

    config = load_config(args.config, args.overrides)
    rows = key_table(config)
    width = max(len(key) for key, *_ in rows)
    print(f"# {'the defaults' if not args.config else args.config}{' + ' + ' '.join(args.overrides) if args.overrides else ''}: "
          "every key, its type, its value, and what it does; set one with key=value on the train command line")
    for key, kind, value, note in rows:
        listed = key not in CHOICES or all(choice in note for choice in CHOICES[key])
        choices = "" if listed else f" [{' | '.join(CHOICES[key])}]"
        print(f"{key:<{width}}  {kind:<5}  {value!r:<14}  {note}{choices}".rstrip())


def cmd_sample(args) -> None:
    from dataclasses import replace

    import torch

    from gptcore.checkpointing.sharded import open_checkpoint
    from gptcore.inference.generate import fastest_form, generate_text, in_fp32, load_model
    from gptcore.inference.quantize import CPU_ONLY_MODES
    from gptcore.telemetry.hardware import check_cpu_compile

    if args.threads:
        torch.set_num_threads(args.threads)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    state = open_checkpoint(args.ckpt)
    loaded = load_model(args.ckpt, args.device, state)
    if args.compile:
        check_cpu_compile(loaded.device, "--compile", "sample without --compile")
    if loaded.kind in CPU_ONLY_MODES:
        if args.weights == "fp32":
            loaded = in_fp32(loaded, state)
        elif args.weights == "auto" and not args.no_cache and not args.compile:
            loaded = fastest_form(loaded, state)
        else:
            loaded = replace(loaded, weights="quantized", runs_as=f"{loaded.kind} kernels")
    text, speed = generate_text(loaded, args.prompt, args.tokens, args.temperature, args.top_k or None,
                                seed, use_cache=not args.no_cache, compile=args.compile)
    print(text)
    kind = f"{loaded.kind} ({loaded.runs_as})" if loaded.runs_as else loaded.kind
    # The two forms round differently, so a repeat names the one that ran.
    repeat_form = f" --weights {loaded.weights}" if loaded.weights else ""
    print(f"[{args.tokens} tokens at {speed:.1f} tokens/s on {loaded.device}, {kind}, "
          f"{'no cache' if args.no_cache else 'KV cache'}{', compiled' if args.compile else ''}; "
          f"--seed {seed}{repeat_form} repeats it]", file=sys.stderr)


def cmd_eval(args) -> None:
    from gptcore.data.corpus import bits_unit
    from gptcore.inference.generate import evaluate, load_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = load_model(args.ckpt, args.device)
    result = evaluate(loaded, args.data, args.batches, args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"val loss {result['val_loss']:.4f} | {result['val_bpc']:.4f} {bits_unit(loaded.tokenizer.vocab)} "
              f"({result['batches']} batches x {result['batch_size']} x {result['block_size']} tokens, {result['model']})")


def cmd_quantize(args) -> None:
    from gptcore.formats.convert import quantize_command

    quantize_command(args)


def cmd_export(args) -> None:
    from gptcore.formats.convert import export_command

    export_command(args)


def cmd_import(args) -> None:
    from gptcore.formats.convert import import_command

    import_command(args)


def build_parser() -> argparse.ArgumentParser:
    from gptcore.config import preset_names

    parser = ArgumentParser(prog="gptcore", description="Train, sample, evaluate, quantize and convert a character-level GPT.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("prepare", help="text files, directories, JSON Lines or a corpus name -> train.bin, val.bin, "
                                       "meta.json, in bounded memory")
    p.add_argument("--data", required=True, nargs="+",
                   help="UTF-8 text files, directories of them, *.jsonl files (a \"text\" field per line) or a "
                        "corpus name (shakespeare)")
    p.add_argument("--clean", default="none", choices=["none", "seed"],
                   help="none: the text as it is; seed: the original project's cleaning (commas, quotes and hyphens "
                        "dropped, one '.'-led sentence after another)")
    p.add_argument("--vocab", default="chars", choices=["chars", "bytes"],
                   help="the text's characters, or UTF-8 bytes (256 ids, shared by every text)")
    p.add_argument("--workers", type=at_least(1, 4 * usable_cpus(), "four per CPU this process may use: more only "
                                                                 "contend"), default=None,
                   help="processes that read and tokenize (default: every CPU this job may use)")
    p.add_argument("--out", default=None, help="output directory (default for a corpus: the data home)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model: gptcore train --config cpu key=value ...")
    presets = ", ".join(preset_names())
    p.add_argument("--config", default=None, help=f"preset name ({presets}) or YAML file (default: the built-in "
                                                   "defaults, GPT-2's block at the seed shape)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_iters=100")
    p.set_defaults(func=cmd_train)

    device_help = "auto (the GPU if there is one; the CPU for int8/int4), cpu, cuda or cuda:N"
    threads_help = "CPU threads; 0 leaves torch's default (every CPU: on a machine another job uses, pass 1)"

    p = sub.add_parser("config", help="every config key with its type, value and meaning, for a preset")
    p.add_argument("--config", default=None, help=f"preset name ({presets}) or YAML file (default: the defaults)")
    p.add_argument("overrides", nargs="*", help="key=value, as on the train command line")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train or quantize")
    p.add_argument("--prompt", default="\n", help="text to continue, only characters the model saw (default: a newline)")
    p.add_argument("--tokens", type=at_least(1, MAX_TOKENS, "held in memory"), default=500, help="characters to generate")
    p.add_argument("--temperature", type=non_negative_number, default=0.8, help="0 picks the likeliest character")
    p.add_argument("--top-k", type=at_least(0), default=200, help="sample among the k likeliest; 0 for all")
    p.add_argument("--seed", type=at_least(0, MAX_SEED, "a 64-bit seed"), default=None,
                   help="repeat a sample (default: a fresh seed, printed)")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--threads", type=thread_count(0), default=0, help=threads_help)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token step (CUDA graphs on a GPU): pays off for long samples")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--weights", default="auto", choices=["auto", "quantized", "fp32"],
                   help="int8/int4 files: compute by the quantized kernels, or with the weights dequantized to "
                        "fp32 at load (faster for small models, whose weights fit in cache); auto times both "
                        "briefly and takes the faster")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="validation loss and bits per character of a checkpoint")
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train or quantize")
    p.add_argument("--data", default=None, help="text file, prepared directory or corpus (default: the training data)")
    p.add_argument("--batches", type=at_least(1, MAX_BATCHES, "more only repeats the validation split"), default=20,
                   help="fixed validation batches")
    p.add_argument("--batch-size", type=at_least(1, MAX_ROWS, "a batch's logits are held in memory"), default=16,
                   help="rows per batch")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--threads", type=thread_count(0), default=0, help=threads_help)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="weight-only int8/int4 quantization of a checkpoint")
    p.add_argument("--ckpt", required=True, help="an fp32 ckpt.pt written by train")
    p.add_argument("--mode", required=True, choices=["int8", "int4", "bf16"])
    p.add_argument("--group-size", type=at_least(1), default=None,
                   help="int4: weights per scale along the input (default 64, or 32 where 64 does not "
                        "divide n_embd)")
    p.add_argument("--out", required=True, help="quantized checkpoint; the report goes beside it as .json")
    p.add_argument("--data", default=None, help="text to evaluate on (default: the training data)")
    p.add_argument("--eval-batches", type=at_least(0, MAX_BATCHES, "more only repeats the validation split"),
                   default=20, help="fixed val batches for the loss report; 0 skips")
    p.add_argument("--batch-size", type=at_least(1, MAX_ROWS, "a batch's logits are held in memory"), default=16,
                   help="rows per evaluation batch")
    p.add_argument("--bench-tokens", type=at_least(0, MAX_TOKENS, "held in memory"), default=200,
                   help="new tokens for the decode speed; 0 skips")
    p.add_argument("--threads", type=thread_count(1), default=1, help="CPU threads for the decode speed")
    p.add_argument("--device", default="auto", help=device_help)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="a sharded checkpoint as one file, or a checkpoint as a Hugging Face "
                                      "directory, a nanoGPT checkpoint or a GGUF file for llama.cpp")
    p.add_argument("--ckpt", required=True, help="an fp32 ckpt.pt written by train or import, or a train.parallel=fsdp "
                                                 "run directory (its newest ckpt-NNNNNNNN/)")
    p.add_argument("--format", default="gptcore", choices=["gptcore", "hf", "nanogpt", "gguf"],
                   help="gptcore: a sharded checkpoint as one ckpt.pt file; hf: config.json, "
                        "model.safetensors and a tokenizer for transformers; nanogpt: ckpt.pt and meta.pkl; "
                        "gguf: one file for llama.cpp, llama-cpp-python and ollama")
    p.add_argument("--type", default=None, choices=["f32", "f16", "q8_0", "q4_0"],
                   help="gguf only: how the weights are stored (default f16; q8_0 and q4_0 as llama.cpp's "
                        "quantize writes them)")
    p.add_argument("--out", required=True, help="a new file (gptcore, gguf) or directory (hf, nanogpt)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="a nanoGPT checkpoint as a gptcore one")
    p.add_argument("--nanogpt", required=True, help="nanoGPT's ckpt.pt (e.g. out-shakespeare-char/ckpt.pt)")
    p.add_argument("--meta", default=None, help="its vocabulary, nanoGPT's data/<dataset>/meta.pkl")
    p.add_argument("--out", required=True, help="the gptcore checkpoint to write (a new file)")
    p.set_defaults(func=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        set_wait_policy(args.command)  # before torch is imported
        args.func(args)
    except GptcoreError as err:
        print(f"gptcore: error: {err}", file=sys.stderr)
        if err.exit_at_once:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(err.exit_code)
        return err.exit_code
    except KeyboardInterrupt:
        print("gptcore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gptcore config | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        print(f"gptcore: error: {disk_error(err)}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The `gptcore` process: main, then exit with its status, which a late stop signal no longer changes."""
    code = main()
    from gptcore.cluster.preemption import ignore_while_exiting

    ignore_while_exiting()
    sys.exit(code)


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def disk_error(err: OSError) -> str:
    """One line for a write the disk refused. Every writer writes a temporary file and renames
    it, so what was there before is intact and nothing half-written is left."""
    # The nearest directory that still exists: a writer removes what it created on failure.
    where = next((p for p in Path(err.filename).parents if p.is_dir()), None) if err.filename else None
    place = f" in {where}" if where else ""
    fix = "it is read-only: write elsewhere" if err.errno == errno.EROFS else \
        "a file size limit (ulimit -f) stopped it: raise it or write elsewhere" if err.errno == errno.EFBIG else \
        f"free space{place} (df -h {where or '.'}) or write elsewhere"
    return f"could not write{place} ({err.strerror}); nothing was replaced or left half-written: {fix}"


if __name__ == "__main__":
    sys.exit(main())
