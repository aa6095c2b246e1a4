"""Data preparation that streams: directories, JSON Lines, parallel workers, bounded memory."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO, assert_one_line_error, gptcore_here, run_gptcore, write_corpus
from gptcore.data.corpus import CharTokenizer, read_meta
from gptcore.data.prepare import DOCUMENT_END, prepare_corpus


def reference(documents: list[str], several: bool) -> tuple[list[str], np.ndarray, int]:
    """The simplest preparation there is, in one process and in memory: (vocab, ids, split)."""
    text = "".join(d + DOCUMENT_END for d in documents) if several else "".join(documents)
    vocab = sorted(set(text))
    ids = np.array([vocab.index(ch) for ch in text])
    ends = np.cumsum([len(d) + 1 for d in documents]) if several else np.array([], dtype=int)
    target = int(len(ids) * 0.9)
    later = [int(e) for e in ends if target <= e < len(ids)]
    return vocab, ids, later[0] if later else target


def read_prepared(out) -> tuple[list[str], np.ndarray, int]:
    meta = read_meta(out)
    dtype = np.dtype(meta["dtype"])
    train, val = (np.fromfile(out / f"{split}.bin", dtype=dtype) for split in ("train", "val"))
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    return meta["vocab"], np.concatenate([train, val]).astype(int), len(train)


def documents_of(scratch, seed: int, count: int) -> list[str]:
    """Texts of varied sizes, some with characters of several UTF-8 bytes."""
    return [write_corpus(scratch / f"doc{seed}-{k}.txt", chars=200 + 900 * ((seed + k) % 7), seed=seed + k).read_text()
            + ("café — naïve ☃\n" if k % 3 == 0 else "") for k in range(count)]


def test_a_directory_and_a_jsonl_file_with_two_workers_match_a_one_process_reference(tmp_path):
    docs = documents_of(tmp_path, 1, 36)
    folder = tmp_path / "books"
    (folder / "part2").mkdir(parents=True)
    for k, doc in enumerate(docs[:6]):  # sorted by path: a.txt..f.txt, then part2/...
        (folder / ("part2" if k >= 3 else "") / f"{'abcdef'[k]}.txt").write_text(doc, encoding="utf-8")
    (folder / ".hidden").write_text("never read")
    in_order = [docs[0], docs[1], docs[2], docs[3], docs[4], docs[5]]
    made = run_gptcore("prepare", "--data", folder, "--out", tmp_path / "dir", "--workers", "2")
    assert made.returncode == 0, made.stderr
    vocab, ids, split = read_prepared(tmp_path / "dir")
    ref_vocab, ref_ids, ref_split = reference(in_order, several=True)
    assert vocab == ref_vocab and split == ref_split and np.array_equal(ids, ref_ids)

    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps({"id": k, "text": doc}) + "\n" for k, doc in enumerate(docs[6:])) + "\n",
                     encoding="utf-8")
    # Small chunks, so that documents are cut across chunks and workers (the API takes a chunk size).
    meta = prepare_corpus([lines], tmp_path / "jsonl", workers=2, progress=False, chunk_bytes=1500)
    vocab, ids, split = read_prepared(tmp_path / "jsonl")
    ref_vocab, ref_ids, ref_split = reference(docs[6:], several=True)
    assert vocab == ref_vocab == meta["vocab"] and split == ref_split and np.array_equal(ids, ref_ids)
    # Validation begins at a document's start: the split is a document boundary.
    assert ids[split - 1] == vocab.index(DOCUMENT_END)


def test_one_text_file_cut_into_many_chunks_is_prepared_as_if_read_whole(tmp_path):
    text = "".join(documents_of(tmp_path, 4, 5))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare_corpus([path], out, workers=workers, progress=False, chunk_bytes=777)  # cuts inside characters
        vocab, ids, split = read_prepared(out)
        assert vocab == sorted(set(text)) and split == int(len(text) * 0.9)
        assert CharTokenizer(vocab).decode(ids.tolist()) == text
    bytes_meta = prepare_corpus([path], tmp_path / "bytes", vocab="bytes", workers=2, progress=False, chunk_bytes=777)
    raw = np.fromfile(tmp_path / "bytes" / "train.bin", dtype=np.uint8)
    assert bytes_meta["vocab"] == "bytes" and bytes(raw) == text.encode("utf-8")[:len(raw)]


def test_bad_jsonl_and_binary_inputs_are_one_line(tmp_path, capsys):
    lines = tmp_path / "docs.jsonl"
    lines.write_text('{"text": "fine"}\n{"title": "no text"}\n', encoding="utf-8")
    result = gptcore_here(capsys, "prepare", "--data", lines, "--out", tmp_path / "out")
    assert_one_line_error(result, 2, "the line at byte offset 17", 'is not a JSON object with a "text" string')
    binary = tmp_path / "folder"
    binary.mkdir()
    (binary / "a.txt").write_text("good text\n" * 100)
    (binary / "b.bin").write_bytes(b"\x7fELF\x00\x01" * 100)
    result = gptcore_here(capsys, "prepare", "--data", binary, "--out", tmp_path / "out")
    assert_one_line_error(result, 2, "b.bin looks binary (a NUL byte at offset 4)")
    assert not (tmp_path / "out" / "meta.json").exists() and not list((tmp_path / "out").glob("*.bin"))


def test_a_corpus_larger_than_the_memory_limit_is_prepared(tmp_path):
    """Under `ulimit -v` of 250 MB (Python and numpy take 110 of it) a 300 MB corpus is prepared, by 2 workers, all of it."""
    line = write_corpus(tmp_path / "line.txt", chars=100_000).read_text().replace("\n", " ")[:99_999] + "\n"
    corpus = tmp_path / "big.txt"
    with open(corpus, "w", encoding="utf-8") as handle:
        for _ in range(3000):
            handle.write(line)
    size = corpus.stat().st_size
    assert size == 300_000_000
    limit_kb = 250 * 1024
    script = (f"ulimit -v {limit_kb} && exec {sys.executable} -m gptcore prepare --data {corpus} "
              f"--out {tmp_path / 'out'} --workers 2")
    # ulimit -v counts address space, and glibc reserves 64 MB of it for each thread's malloc arena
    # (the pool's 3 threads), never touched; Python 3.12 starts no pool under the limit without a cap.
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    meta = read_meta(tmp_path / "out")
    assert meta["train_tokens"] + meta["val_tokens"] == size > limit_kb * 1024
    corpus.unlink()
