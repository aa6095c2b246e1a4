"""Checkpoints in, checkpoints out: `gptcore quantize` writes an int8, int4 or bf16 copy of a
trained model and measures what it costs and gains, on the same batches and the same device;
`gptcore export` writes a model for Hugging Face transformers, nanoGPT or llama.cpp (GGUF),
`gptcore import` reads a nanoGPT one.

    gptcore quantize --ckpt runs/cpu/ckpt.pt --mode int8 --out runs/cpu/ckpt_int8.pt
    gptcore export --ckpt runs/cpu/ckpt.pt --format hf --out runs/cpu/hf
    gptcore export --ckpt runs/cpu/ckpt.pt --format gguf --type q8_0 --out runs/cpu/model-q8_0.gguf
    gptcore export --ckpt runs/fsdp --out runs/fsdp/ckpt_whole.pt   (a sharded checkpoint as one file)
    gptcore import --nanogpt out-shakespeare-char/ckpt.pt --meta data/shakespeare_char/meta.pkl --out ckpt.pt

The report (printed, and saved beside the output as .json): file sizes, val loss and bits/char
before and after, and batch-1 decode tokens/s with the memory bandwidth it implies.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gptcore.checkpointing import checkpoint
from gptcore.checkpointing.sharded import consolidate, is_sharded, open_checkpoint, size_on_disk
from gptcore.config import non_gpt2_options
from gptcore.errors import UserInputError
from gptcore.files import atomic_write_bytes, check_output, write_new_directory
from gptcore.inference.generate import decode_speed, eval_data, evaluate, load_model, resolve_device
from gptcore.inference.quantize import FORMAT, check_group_size, fp32_model_checkpoint, quantized_checkpoint, serialized_size

DEFAULT_GROUP_SIZE = 64


def pick_group_size(mode: str, asked: int | None, n_embd: int) -> tuple[int, str | None]:
    """The int4 group size, and a note when it was chosen for the user: 64, or the kernel's
    smaller 32 where 64 does not divide n_embd (a 32-wide model)."""
    if asked is not None or mode != "int4" or n_embd % DEFAULT_GROUP_SIZE == 0 or n_embd % 32:
        return (asked if asked is not None else DEFAULT_GROUP_SIZE), None  # check_group_size judges it
    return 32, f"group size 32: the default {DEFAULT_GROUP_SIZE} does not divide n_embd {n_embd}"


def measure(reference, quantized, args, data_dir: Path | None) -> dict:
    """Loss on the same fixed batches of data_dir (the source checkpoint's data) and decode speed,
    for the fp32 model and the quantized one."""
    report = {}
    if data_dir is not None:
        before = evaluate(reference, str(data_dir), args.eval_batches, args.batch_size)
        after = evaluate(quantized, str(data_dir), args.eval_batches, args.batch_size)
        report["eval"] = {
            "batches": args.eval_batches, "batch_size": args.batch_size, "block_size": before["block_size"],
            "fp32": {"val_loss": before["val_loss"], "val_bpc": before["val_bpc"]},
            args.mode: {"val_loss": after["val_loss"], "val_bpc": after["val_bpc"]},
            "loss_change_pct": 100 * (after["val_loss"] / before["val_loss"] - 1),
        }
    if args.bench_tokens > 0:
        if quantized.device.type == "cpu":
            torch.set_num_threads(args.threads)
        seed = reference.config.train.seed
        fp32 = decode_speed(reference, args.bench_tokens, seed)
        mode = decode_speed(quantized, args.bench_tokens, seed)
        report["decode"] = {"device": str(quantized.device), "threads": args.threads, "new_tokens": args.bench_tokens,
                            "kv_cache": True, "fp32": fp32, args.mode: mode,
                            "speedup": mode["tokens_per_s"] / fp32["tokens_per_s"]}
    return report


def describe(report: dict) -> list[str]:
    mode, size = report["mode"], report["size_bytes"]
    lines = [f"size    fp32 {size['fp32'] / 1e6:.2f} MB -> {mode} {size[mode] / 1e6:.2f} MB "
             f"({100 * report['size_ratio']:.1f}% of fp32)"]
    if "eval" in report:
        e = report["eval"]
        lines.append(f"val     fp32 {e['fp32']['val_loss']:.4f} ({e['fp32']['val_bpc']:.4f} bits/char) -> {mode} "
                     f"{e[mode]['val_loss']:.4f} ({e[mode]['val_bpc']:.4f} bits/char), {e['loss_change_pct']:+.2f}% "
                     f"({e['batches']} batches x {e['batch_size']} x {e['block_size']} tokens)")
    if "decode" in report:
        d = report["decode"]
        fp32, quantized = d["fp32"], d[mode]
        threads = f", {d['threads']} thread(s)" if d["device"] == "cpu" else ""
        lines.append(f"decode  fp32 {fp32['tokens_per_s']:.0f} -> {mode} {quantized['tokens_per_s']:.0f} tokens/s "
                     f"(x{d['speedup']:.2f}; {d['new_tokens']} tokens, {d['device']}{threads}, KV cache)")
        lines.append(f"memory  {fp32['achieved_gbps']:.1f} -> {quantized['achieved_gbps']:.1f} GB/s of weights read, "
                     f"{100 * fp32['bandwidth_utilization']:.1f}% -> {100 * quantized['bandwidth_utilization']:.1f}% "
                     f"of {quantized['bandwidth_gbps']:.0f} GB/s ({quantized['bandwidth_source']})")
    return lines


def quantize_command(args) -> None:
    source, out = Path(args.ckpt), Path(args.out)
    if out.resolve() == source.resolve() or out.suffix == ".json":
        raise UserInputError(f"--out {out} would overwrite the input checkpoint or the report; name it e.g. ckpt_int8.pt")
    check_output(out, "--out")
    if out.with_suffix(".json").is_dir():
        raise UserInputError(f"--out {out} has its report beside it as {out.with_suffix('.json')}, which is a directory; "
                             "choose another --out")
    for flag, lowest in (("eval_batches", 0), ("batch_size", 1), ("bench_tokens", 0), ("threads", 1)):
        if getattr(args, flag) < lowest:
            raise UserInputError(f"--{flag.replace('_', '-')} must be at least {lowest}, got {getattr(args, flag)}")
    state = open_checkpoint(source)
    if state["format"] == FORMAT:
        raise UserInputError(f"{source} is already quantized ({state.get('mode')}); pass the fp32 ckpt.pt "
                             "written by `gptcore train`")
    device = str(resolve_device(args.device, args.mode))
    reference = load_model(source, device, state)
    group_size, note = pick_group_size(args.mode, args.group_size, reference.config.model.n_embd)
    check_group_size(args.mode, group_size, reference.config.model)
    if note:
        print(f"int4: {note}")

    with tempfile.TemporaryDirectory(prefix="gptcore-quantize-") as scratch:
        # The data the source was trained on, found before anything is written: beside the source
        # checkpoint (not beside --out), --data, or its named corpus.
        data_dir = eval_data(reference, args.data, Path(scratch)) if args.eval_batches > 0 else None
        quantized_state = quantized_checkpoint(state, args.mode, group_size)
        checkpoint.save(quantized_state, out)
        quantized = load_model(out, device)  # measure the file as written, through the loader users run
        measured = measure(reference, quantized, args, data_dir)
    report = {
        "mode": args.mode, "group_size": quantized_state["group_size"], "source": str(source), "out": str(out),
        "size_bytes": {"fp32": serialized_size(fp32_model_checkpoint(state)), args.mode: out.stat().st_size,
                       "source_file": size_on_disk(source)},
    }
    report["size_ratio"] = report["size_bytes"][args.mode] / report["size_bytes"]["fp32"]
    report.update(measured)
    report_path = out.with_suffix(".json")
    atomic_write_bytes(report_path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    print(f"wrote {out} ({args.mode}" + (f", group size {group_size}" if args.mode == "int4" else "") + ")")
    for line in describe(report):
        print(line)
    print(f"report  {report_path}")


def export_command(args) -> None:
    from gptcore.formats import hf, llamacpp, nanogpt

    if args.type is not None and args.format != "gguf":
        raise UserInputError(f"--type {args.type} is for --format gguf only (the {args.format} format keeps fp32 weights)")
    if args.format == "gptcore":
        return consolidate_command(Path(args.ckpt), Path(args.out))
    raw = open_checkpoint(args.ckpt)
    loaded = load_model(args.ckpt, "cpu", raw)
    if loaded.kind != "fp32":
        raise UserInputError(f"{args.ckpt} is {loaded.kind}-quantized, and export reads full-precision weights only: "
                             "export the fp32 ckpt.pt it was quantized from (--format gguf --type q8_0|q4_0 "
                             "quantizes on the way out)")
    model, vocab = loaded.config.model, loaded.tokenizer.vocab
    state = {name: tensor.detach() for name, tensor in loaded.model.state_dict().items()}
    if args.format == "gguf":
        kind = args.type or "f16"
        llamacpp.check_expressible(model, kind, args.ckpt)
        out = new_file(Path(args.out))
        llamacpp.write_gguf(out, state, model, vocab, f"gptcore-{Path(loaded.config.out_dir).name}", kind)
        print(f"wrote {out} (gguf {kind}, {out.stat().st_size / 1e6:.2f} MB, {llamacpp.describe_vocabulary(vocab)}, "
              f"context {model.block_size}); run it with llama-cli -m {out} -p \"...\" -n 200 -c {model.block_size} "
              "-no-cnv, or see the README's llama.cpp section")
        return
    if vocab == "bytes" and args.format == "nanogpt":
        raise UserInputError(f"{args.ckpt} has the bytes vocabulary (data.vocab=bytes), which nanoGPT's meta.pkl "
                             "(one string per token) cannot hold; export it with --format hf or gguf")
    if options := non_gpt2_options(model):
        raise UserInputError(f"{args.ckpt} is trained with {', '.join(options)}, which the {args.format} format (GPT-2's "
                             "architecture) cannot express; export it with --format gptcore, or train with those "
                             "options at their defaults")
    if args.format == "hf":
        files = hf.hf_directory(state, model, vocab)
        use = f"AutoModelForCausalLM.from_pretrained({str(args.out)!r}) and AutoTokenizer.from_pretrained({str(args.out)!r})"
    else:
        files = nanogpt.nanogpt_files(state, model, vocab, Path(loaded.config.data.path).stem or "gptcore",
                                      int(raw.get("step", 0)), float(raw.get("best_val_loss", float("inf"))))
        use = f"nanoGPT's sample.py --out_dir={args.out} (it reads meta.pkl from data/<dataset>/: copy it there)"
    write_new_directory(Path(args.out), files)
    print(f"wrote {args.out} ({args.format}: {', '.join(files)}); load it with {use}")


def import_command(args) -> None:
    from gptcore.formats import nanogpt

    out = new_file(Path(args.out))
    state, described = nanogpt.import_checkpoint(Path(args.nanogpt), Path(args.meta) if args.meta else None)
    checkpoint.save(state, out)
    print(f"wrote {out} from {args.nanogpt}: {described}")
    print(f"next: gptcore sample --ckpt {out} --prompt \"...\" | gptcore eval --ckpt {out} --data TEXT")


def consolidate_command(source: Path, out: Path) -> None:
    """A sharded checkpoint (train.parallel=fsdp) as one file, optimizer state included."""
    if not is_sharded(source):
        raise UserInputError(f"{source} holds no sharded checkpoint: --format gptcore makes one file of a "
                             "train.parallel=fsdp run's ckpt-NNNNNNNN/ (a ckpt.pt already is one)")
    new_file(out)
    state = consolidate(source)
    checkpoint.save(state, out)
    print(f"wrote {out}: step {state['step']} of {source}, saved by {state['world_size']} rank(s), as one file")
    print(f"next: gptcore sample --ckpt {out} --prompt \"...\" | gptcore eval --ckpt {out} | "
          f"resume it under train.parallel=ddp as RUN_DIR/ckpt.pt")


def new_file(out: Path) -> Path:
    """--out for a command that writes a new file: an existing one is refused, never replaced."""
    if out.exists():
        raise UserInputError(f"--out {out} already exists; choose a new file (nothing was written)")
    return check_output(out, "--out")
