"""Text of any size -> train.bin, val.bin and meta.json, in memory that does not grow with it.

    gptcore prepare --data book.txt --out data/book
    gptcore prepare --data web/ --out data/web --workers 8          # a directory of text files
    gptcore prepare --data docs.jsonl --out data/docs --vocab bytes  # JSON Lines, a "text" field each

Inputs are text files, directories (every file under them, by path) and JSON Lines files
(`*.jsonl`, one document per line). Each file and each JSON line is a document; when there is
more than one, each ends with DOCUMENT_END, a character of its own in the vocabulary. The inputs
are cut into chunks of CHUNK_BYTES at character boundaries (JSON Lines: at line ends) and worker
processes read, check and tokenize them: a first pass finds the vocabulary and counts tokens, a
second encodes, and the main process writes each chunk's tokens in order. At most a few chunks
per worker are in flight, so memory is bounded by the chunk size, not the corpus. The split is
document-aware: validation starts at the first document boundary past 90% of the tokens (a
single document splits at 90% exactly). With --clean seed each document is cleaned whole (the
cleaning joins sentences across lines), so memory then grows with the largest document.
"""

from __future__ import annotations

import codecs
import collections
import json
import multiprocessing
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptcore.cpus import usable_cpus
from gptcore.data.corpus import (CLEANERS, CORPORA, VAL_FRACTION, ByteTokenizer, CharTokenizer, check_vocab, corpus_dir, data_home,
                          fetch_corpus, file_sha256, read_meta, text_vocabulary, token_dtype)
from gptcore.errors import UserInputError
from gptcore.files import atomic_write_bytes, check_output, fsync_directory, naming

DOCUMENT_END = "\x1e"  # ASCII record separator: ends each document when there are several
CHUNK_BYTES = 8 * 2**20
IN_FLIGHT_PER_WORKER = 2
RUN_MARKS = ("ckpt.pt", "config.yaml", "metrics.jsonl")  # what `gptcore train` writes into a run directory


@dataclass(frozen=True)
class Chunk:
    path: str
    start: int
    end: int
    jsonl: bool
    ends_document: bool  # the last chunk of a plain text file


@dataclass(frozen=True)
class Survey:
    """What the first pass learns of a chunk."""
    chars: str  # its distinct characters
    tokens: int  # under the vocabulary asked for (characters, or bytes)
    document_ends: np.ndarray  # token positions in the chunk just after each DOCUMENT_END


def input_files(paths: list[Path]) -> list[Path]:
    """Every file to read, in order; what cannot be read is refused before anything is."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserInputError(f"data file {path} does not exist; pass data.path=FILE with a UTF-8 text file")
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() \
            else [path]
        if path.is_dir() and not found:
            raise UserInputError(f"data directory {path} has no files; pass text files or a directory of them")
        for file in found:
            if not stat.S_ISREG(file.stat().st_mode):
                raise UserInputError(f"data path {file} is not a regular file (a pipe, socket or device); "
                                     "pass a text file saved on disk")
        files += found
    return files


def file_states(files: list[Path]) -> dict[Path, tuple[int, int]]:
    """Each input's size and modification time, taken before it is read."""
    return {path: (stat.st_size, stat.st_mtime_ns) for path in files for stat in [path.stat()]}


def check_unchanged(before: dict[Path, tuple[int, int]]) -> None:
    """Refuse tokens read from a file that was written, cut or replaced while it was read."""
    for path, (size, mtime) in before.items():
        try:
            now = path.stat()
        except FileNotFoundError:
            raise changed_while_read(path, "it was removed") from None
        if (now.st_size, now.st_mtime_ns) != (size, mtime):
            raise changed_while_read(path, f"{size:,} -> {now.st_size:,} bytes" if now.st_size != size
                                     else "its modification time moved")


def changed_while_read(path, how: str) -> UserInputError:
    return UserInputError(f"data file {path} changed while it was read ({how}); nothing was written: prepare it "
                          "again once nothing writes to it, or prepare a copy")


def boundary(handle, offset: int, line_ends: bool) -> int:
    """The first chunk boundary at or after offset: past the next newline for JSON Lines, else
    the start of the next character (UTF-8 continuation bytes are 0b10xxxxxx)."""
    handle.seek(offset)
    while True:
        block = handle.read(65536)
        if not block:
            return handle.tell()
        if line_ends:
            if (newline := block.find(b"\n")) >= 0:
                return offset + newline + 1
        else:
            lead = next((i for i, byte in enumerate(block[:4]) if byte & 0xC0 != 0x80), len(block[:4]))
            return offset + lead
        offset += len(block)


def plan_chunks(files: list[Path], chunk_bytes: int, whole_documents: bool) -> list[Chunk]:
    chunks = []
    for path in files:
        size, jsonl = path.stat().st_size, path.suffix == ".jsonl"
        step = size if whole_documents and not jsonl else chunk_bytes
        with open(path, "rb") as handle:
            start = 0
            while start < size:
                end = min(size, boundary(handle, start + step, jsonl)) if start + step < size else size
                chunks.append(Chunk(str(path), start, end, jsonl, ends_document=end == size and not jsonl))
                start = end
    return chunks


def chunk_text(chunk: Chunk, clean: str, several_documents: bool) -> str:
    """A chunk as text: checked (no NUL bytes, valid UTF-8), JSON lines unpacked, cleaned, each
    document ended by DOCUMENT_END when there are several."""
    with open(chunk.path, "rb") as handle:
        handle.seek(chunk.start)
        payload = handle.read(chunk.end - chunk.start)
    if len(payload) < chunk.end - chunk.start:
        raise changed_while_read(chunk.path, f"it ends before byte {chunk.end:,}")
    if (nul := payload.find(b"\x00")) >= 0:
        raise UserInputError(f"data file {chunk.path} looks binary (a NUL byte at offset {chunk.start + nul}); "
                             "pass a UTF-8 text file")
    try:
        text = codecs.decode(payload, "utf-8")
    except UnicodeDecodeError as err:
        raise UserInputError(
            f"data file {chunk.path} is not UTF-8 (bad byte at offset {chunk.start + err.start}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {chunk.path} > {Path(chunk.path).stem}.utf8.txt") from None
    cleaner = CLEANERS[clean]
    if not chunk.jsonl:
        return cleaner(text) + (DOCUMENT_END if several_documents and chunk.ends_document else "")
    documents = []
    for number, line in enumerate(text.split("\n")):  # not splitlines(): JSON may hold U+2028 as is
        if not line.strip():
            continue
        try:
            document = json.loads(line)["text"]
            if not isinstance(document, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise UserInputError(f"{chunk.path}: the line at byte offset {chunk.start + line_offset(text, number)} "
                                 "is not a JSON object with a \"text\" string") from None
        documents.append(cleaner(document) + DOCUMENT_END)
    return "".join(documents)


def line_offset(text: str, line_number: int) -> int:
    """The byte offset of a line in a chunk's text, for an error message (only then computed)."""
    return sum(len(line.encode("utf-8")) + 1 for line in text.split("\n")[:line_number])


def survey(job: tuple[Chunk, str, bool, bool]) -> Survey:
    chunk, clean, several, byte_vocab = job
    text = chunk_text(chunk, clean, several)
    size = (lambda part: len(part.encode("utf-8"))) if byte_vocab else len
    ends = np.cumsum([size(document) + 1 for document in text.split(DOCUMENT_END)[:-1]], dtype=np.int64)
    return Survey("".join(sorted(set(text))), size(text), ends)


def encode(job: tuple[Chunk, str, bool, list[str] | str, str]) -> np.ndarray:
    chunk, clean, several, vocab, dtype = job
    text = chunk_text(chunk, clean, several)
    tokenizer = ByteTokenizer() if vocab == ByteTokenizer.vocab else CharTokenizer(vocab)
    return tokenizer.encode_array(text).astype(dtype, copy=False)  # already that dtype: no copy


class Progress:
    """One line on stderr per pass, redrawn in place on a terminal, else every 10 s (a Slurm log)."""

    def __init__(self, label: str, total_bytes: int, enabled: bool):
        self.label, self.total, self.enabled = label, max(total_bytes, 1), enabled
        self.done, self.started, self.shown_at = 0, time.monotonic(), 0.0
        self.drawn = False
        self.tty = sys.stderr.isatty()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        # A terminal sees the line redrawn; a log (a Slurm job's) gets one every 10 s, and a
        # preparation shorter than that prints nothing.
        if self.enabled and now - max(self.shown_at, self.started if not self.tty else 0.0) >= (0.5 if self.tty else 10.0):
            self.shown_at = now
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else 0.0
            line = (f"prepare: {self.label} {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB, {rate / 1e6:,.1f} MB/s, "
                    f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
            self.drawn = True

    def close(self) -> None:
        if self.drawn and self.tty:
            print(file=sys.stderr, flush=True)


def ordered_map(function, jobs, workers: int):
    """function over jobs in order, on `workers` processes with a bounded number in flight, so
    results never pile up faster than they are consumed."""
    if workers == 1:
        yield from map(function, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(function, (job,)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def split_point(total: int, document_ends: np.ndarray) -> int:
    """Where validation starts: the first document boundary at or past 90% of the tokens, when
    one lies before the end; else 90% exactly."""
    target = int(total * (1 - VAL_FRACTION))
    later = document_ends[(document_ends >= target) & (document_ends < total)]
    return int(later[0]) if len(later) else target


def default_workers() -> int:
    """The CPUs this job may use (its affinity mask, such as Slurm's --cpus-per-task, and its quota)."""
    return usable_cpus()


def prepare_corpus(paths: list[Path], out_dir: Path, clean: str = "none", vocab: list[str] | str | None = None,
                   owner: str = "", workers: int | None = None, progress: bool = True,
                   chunk_bytes: int = CHUNK_BYTES, note: dict | None = None) -> dict:
    """Prepare the inputs into out_dir; returns the meta written. vocab: None for the text's own
    characters, "bytes", or a checkpoint's characters (every character of the text among them)."""
    if clean not in CLEANERS:
        raise UserInputError(f"--clean must be one of {', '.join(CLEANERS)}, got {clean!r}")
    files = input_files(paths)
    before = file_states(files)
    chunks = plan_chunks(files, chunk_bytes, whole_documents=clean != "none")
    workers = max(1, min(workers or default_workers(), len(chunks)))
    several = len(files) > 1 or any(Path(chunk.path).suffix == ".jsonl" for chunk in chunks)
    total_bytes = sum(file.stat().st_size for file in files)
    source = ", ".join(map(str, paths))

    bar = Progress("pass 1/2 (vocabulary)", total_bytes, progress)
    chars, ends, offset = set(), [], 0
    byte_vocab = vocab == ByteTokenizer.vocab
    for chunk, found in zip(chunks, ordered_map(survey, [(c, clean, several, byte_vocab) for c in chunks], workers)):
        chars.update(found.chars)
        ends.append(found.document_ends + offset)
        offset += found.tokens
        bar.advance(chunk.end - chunk.start)
    bar.close()
    if not "".join(sorted(chars)).strip():
        raise UserInputError(f"data {source} is empty; pass a text file with content")
    tokenizer = text_vocabulary("".join(sorted(chars)), vocab, source, owner)
    vocab_size = 256 if byte_vocab else len(tokenizer.vocab)
    dtype = np.dtype(token_dtype(vocab_size))
    total = offset
    split = split_point(total, np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64))

    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = {name: out_dir / f".{name}.bin.partial" for name in ("train", "val")}
    bar = Progress("pass 2/2 (tokens)", total_bytes, progress)
    done = False
    try:
        with open(partial["train"], "wb") as train, open(partial["val"], "wb") as val:
            position = 0
            jobs = [(c, clean, several, tokenizer.vocab, dtype.name) for c in chunks]
            for chunk, ids in zip(chunks, ordered_map(encode, jobs, workers)):
                cut = min(max(split - position, 0), len(ids))
                train.write(memoryview(ids[:cut]))  # the array's own buffer: no copy of the chunk
                val.write(memoryview(ids[cut:]))
                position += len(ids)
                bar.advance(chunk.end - chunk.start)
            for handle in (train, val):
                handle.flush()
                os.fsync(handle.fileno())
        check_unchanged(before)
        (out_dir / "meta.json").unlink(missing_ok=True)  # never an old meta.json beside new tokens
        for name, path in partial.items():
            os.replace(path, out_dir / f"{name}.bin")
        fsync_directory(out_dir)
        bar.close()
        meta = {"vocab": tokenizer.vocab, "vocab_size": vocab_size, "dtype": dtype.name, "train_tokens": split,
                "val_tokens": total - split, "source": source, "clean": clean, "documents_separated": several,
                **(note or {})}
        atomic_write_bytes(out_dir / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))  # last: marks it done
        done = True
    except OSError as err:
        raise naming(err, out_dir / "train.bin") from None
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
        if created and not done and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a full disk or a changed input leaves no empty directory behind
    return meta


def prepare(sources: list[str], out_dir: Path | None, clean: str = "none", download: bool = True,
            vocab: str = "chars", workers: int | None = None) -> tuple[Path, dict]:
    """`gptcore prepare`: text files, directories, JSON Lines or a corpus name -> a prepared
    directory, of the text's characters or (vocab="bytes") of UTF-8 bytes."""
    corpus = sources[0] if len(sources) == 1 and sources[0] in CORPORA else None
    if corpus:
        out_dir = out_dir or (corpus_dir(corpus, clean) if vocab == "chars" else None)
        if out_dir is None:
            raise UserInputError(f"prepare --vocab bytes needs --out DIR (the default {corpus_dir(corpus, clean)} "
                                 "holds the character vocabulary)")
    elif out_dir is None:
        raise UserInputError(f"prepare needs --out DIR for {', '.join(sources)}")
    out_dir = check_output(Path(out_dir), "--out", directory=True)
    if holds := [name for name in RUN_MARKS if (out_dir / name).exists()] + sorted(p.name for p in out_dir.glob("ckpt-*")):
        raise UserInputError(f"--out {out_dir} is a training run's directory (it holds {', '.join(holds[:3])}); "
                             f"prepare into a directory of its own, e.g. --out {out_dir / 'data'} (nothing was written)")
    if corpus:  # downloaded only once --out is known to take it
        paths = [fetch_corpus(corpus) if download else data_home() / f"{corpus}.txt"]
    else:
        paths = [Path(source) for source in sources]
    return out_dir, prepare_corpus(paths, out_dir, clean, ByteTokenizer.vocab if vocab == "bytes" else None,
                                   "--vocab bytes", workers)


def resolve_data(path: str, clean: str, scratch_dir: Path, expected_vocab: list[str] | str | None = None,
                 owner: str = "the checkpoint") -> Path:
    """Where the prepared data for `data.path` lives: a prepared directory, a named corpus, or
    a text file (or directory of them) prepared into scratch_dir, reused while the text, the
    cleaning and the vocabulary stay the same. With expected_vocab (a resumed or fine-tuning
    run, `owner`; or "bytes"), the data must be of that vocabulary, refused before scratch_dir is
    touched. Never touches the network: named corpora must have been fetched by env/setup.sh.
    Here in one process: training calls it with its process group up, where forking is unsafe."""
    if path in CORPORA:
        prepared = corpus_dir(path, clean)
        if not (prepared / "meta.json").is_file():
            if not (data_home() / f"{path}.txt").is_file():
                raise UserInputError(
                    f"corpus {path!r} is not downloaded; run `bash env/setup.sh` or "
                    f"`gptcore prepare --data {path}` first")
            prepare([path], prepared, clean, download=False, workers=1)
        if expected_vocab is None or read_meta(prepared)["vocab"] == expected_vocab:
            return prepared
        path = str(data_home() / f"{path}.txt")  # encoded with the vocabulary the run needs instead
    candidate = Path(path)
    if candidate.is_dir() and (candidate / "meta.json").is_file():
        check_vocab(read_meta(candidate)["vocab"], expected_vocab, str(candidate), owner)
        return candidate
    files = input_files([candidate])
    digest = file_sha256(files[0]) if len(files) == 1 else None
    prepared = Path(scratch_dir)
    if digest and (prepared / "meta.json").is_file():
        meta = read_meta(prepared)
        if (meta.get("text_sha256") == digest and meta.get("clean") == clean
                and (expected_vocab is None or meta["vocab"] == expected_vocab)):
            return prepared
    prepare_corpus([candidate], prepared, clean, expected_vocab, owner, workers=1, progress=False,
                   note={"text_sha256": digest} if digest else None)
    return prepared
