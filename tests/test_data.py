"""Data: the seed cleaning, the character vocabulary, prepared files and per-rank batches."""

import json

import numpy as np
import pytest
import torch

from gptcore.data.batches import Batches, Shard
from gptcore.data.corpus import ByteTokenizer, CharTokenizer, clean_seed
from gptcore.data.prepare import prepare, prepare_corpus
from gptcore.errors import UserInputError

PARAGRAPH = (
    "Mr. and Mrs. Dursley, of number four, Privet Drive, were proud to say that they were "
    "perfectly normal, thank you very much. They hadn't expected an owl-free morning!\n"
    "\"Little tyke,\" chortled Mr. Dursley. Was it 'Dr. Who' he'd meant? He put his mind back on drills. "
    "Mr. Dursley always sat with his back to the window."
)


def test_seed_cleaning_reproduces_the_original_preprocessing():
    cleaned = clean_seed(PARAGRAPH)
    assert cleaned == (
        ".Mr and Mrs Dursley of number four Privet Drive were proud to say that they were perfectly "
        "normal thank you very much .They hadnt expected an owlfree morning .Little tyke chortled "
        "Mr Dursley .Was it Dr Who hed meant .He put his mind back on drills .Mr Dursley always sat "
        "with his back to the window")
    assert "drills .Mr Dursley always sat" in cleaned
    for mark in ",'\"-":
        assert mark not in cleaned


def test_seed_cleaning_handles_curly_quotes_and_dashes():
    assert clean_seed("\u201cIt\u2019s mine\u201d \u2014 said he. Done") == ".Its mine said he .Done"


def test_tokenizer_round_trip_and_vectorised_encode():
    text = "hello, wörld\n"
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.vocab == sorted(set(text))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_array(text).tolist() == tokenizer.encode(text)
    with pytest.raises(UserInputError, match="never saw"):
        tokenizer.encode("xyz")


def test_prepare_writes_memmappable_splits(tmp_path, corpus):
    out, meta = prepare([str(corpus)], tmp_path / "prep", "none")
    train = np.fromfile(out / "train.bin", dtype=np.uint8)
    val = np.fromfile(out / "val.bin", dtype=np.uint8)
    text = corpus.read_text()
    assert len(train) + len(val) == len(text)
    assert len(val) == pytest.approx(0.1 * len(text), abs=1)
    saved = json.loads((out / "meta.json").read_text())
    assert saved["vocab"] == sorted(set(text)) == meta["vocab"]
    assert CharTokenizer(saved["vocab"]).decode(train[:50].tolist()) == text[:50]


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"abc\x00\x01\x02", "looks binary"),
    ("caf\u00e9 au lait".encode("latin-1"), "is not UTF-8"),
])
def test_unusable_text_files_are_named(tmp_path, content, expected):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=expected):
        prepare_corpus([path], tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        prepare_corpus([tmp_path / "nope.txt"], tmp_path / "out")


def test_ranks_take_disjoint_slices_of_the_same_global_batch(tmp_path, corpus):
    out, _ = prepare([str(corpus)], tmp_path / "prep", "none")
    whole = Batches(out, block_size=16, seed=3).next_train(8)
    halves = [Batches(out, 16, 3, Shard(rank, 2)).next_train(8) for rank in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
    assert torch.equal(whole[0][:, 1:], whole[1][:, :-1])  # targets are inputs shifted by one


def test_split_shorter_than_a_block_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be " * 10)
    out, _ = prepare([str(path)], tmp_path / "prep", "none")
    with pytest.raises(UserInputError, match="fewer than block_size"):
        Batches(out, block_size=64, seed=0)


def test_byte_decoding_holds_back_a_cut_off_character_and_marks_invalid_bytes():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("naïve ☃")
    assert len(ids) == len("naïve ☃".encode("utf-8")) == 10 and tokenizer.decode(ids) == "naïve ☃"
    assert tokenizer.decode(ids[:-1]) == "naïve "  # the snowman's third byte is not there yet
    assert tokenizer.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"  # never mojibake
    assert tokenizer.encode_array("ï").tolist() == [0xC3, 0xAF]
