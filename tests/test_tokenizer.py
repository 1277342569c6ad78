"""Tests for phase1_jax.tokenizer: byte-level BPE round trips, determinism, files and their errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from phase1_jax.data import ByteTokenizer as DataByteTokenizer
from phase1_jax.data import embedded_corpus_bytes, split_text
from phase1_jax.errors import InputValidationError
from phase1_jax.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, tokenizer_files

NON_ASCII = "naïve café — 日本語のテキスト, Ελληνικά, emoji 🙂👍🏽, e\u0301 (combining), \x00\t\r\n  trailing  "


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return embedded_corpus_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def bpe_512(corpus_text) -> BPETokenizer:
    return BPETokenizer.train(corpus_text, 512)


def test_round_trip_of_the_corpus_and_of_non_ascii_text(bpe_512, corpus_text):
    ids = bpe_512.encode(corpus_text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.size < len(corpus_text) / 2  # merges do compress
    assert bpe_512.decode(ids) == corpus_text
    for text in (NON_ASCII, "", " ", "a", "\n\n\n", "🙂" * 7):
        assert bpe_512.decode(bpe_512.encode(text)) == text
    assert bpe_512.encode(NON_ASCII.encode("utf-8")).tolist() == bpe_512.encode(NON_ASCII).tolist()


def test_exact_vocab_size_and_interface(bpe_512):
    assert bpe_512.kind == "bpe" and bpe_512.vocab_size == 512
    record = bpe_512.describe()
    assert record == {"kind": "bpe", "vocab_size": 512, "sha256": hashlib.sha256(bpe_512.to_json()).hexdigest()}
    assert tokenizer_files(bpe_512) == {TOKENIZER_FILE: bpe_512.to_json()}
    ids = bpe_512.encode("the return statement")
    assert ids.min() >= 0 and ids.max() < 512


def test_training_is_deterministic_and_depends_on_vocab_size(corpus_text, bpe_512):
    again = BPETokenizer.train(corpus_text, 512)
    assert again.to_json() == bpe_512.to_json()  # byte-identical tokenizer.json
    assert BPETokenizer.train(corpus_text, 600).to_json() != bpe_512.to_json()


def test_training_is_deterministic_across_processes_and_thread_counts(corpus_text, bpe_512):
    script = ("import sys; from phase1_jax.data import embedded_corpus_bytes; "
              "from phase1_jax.tokenizer import BPETokenizer; "
              "sys.stdout.write(BPETokenizer.train(embedded_corpus_bytes().decode(), 512).sha256)")
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout == bpe_512.sha256


def test_small_text_caps_the_vocabulary():
    # Merges never cross words: three distinct short words cannot fill 1000 ids.
    tokenizer = BPETokenizer.train("ab ab abc abc xyz", 1000)
    assert 256 < tokenizer.vocab_size < 1000


def test_save_and_load_round_trip(bpe_512, tmp_path):
    path = tmp_path / TOKENIZER_FILE
    bpe_512.save(path)
    assert path.read_bytes() == bpe_512.to_json()
    assert [p.name for p in tmp_path.iterdir()] == [TOKENIZER_FILE]  # no temporary file left
    loaded = BPETokenizer.load(path)
    assert loaded.sha256 == bpe_512.sha256 and loaded.vocab_size == 512
    assert loaded.encode(NON_ASCII).tolist() == bpe_512.encode(NON_ASCII).tolist()


def test_load_keeps_the_file_bytes_as_given(bpe_512, tmp_path):
    # A file written by another tool (here: compact JSON) is fingerprinted as it is, not re-serialised.
    compact = json.dumps(json.loads(bpe_512.to_json()), separators=(",", ":")).encode()
    path = tmp_path / "compact.json"
    path.write_bytes(compact)
    assert BPETokenizer.load(path).sha256 == hashlib.sha256(compact).hexdigest()


@pytest.mark.parametrize("content,fragment", [
    (None, "does not exist"),
    (b"{not json", "is not a readable tokenizer.json"),
    (b"\xff\xfe", "is not a readable tokenizer.json"),
    (b"", "is not a readable tokenizer.json"),
])
def test_load_errors_are_one_line_and_name_the_path(tmp_path, content, fragment):
    path = tmp_path / "tok.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputValidationError) as info:
        BPETokenizer.load(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_load_refuses_a_directory_and_a_non_bpe_model(tmp_path):
    with pytest.raises(InputValidationError, match="not a regular file"):
        BPETokenizer.load(tmp_path)
    path = tmp_path / "wordlevel.json"
    path.write_text(Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str())
    with pytest.raises(InputValidationError, match="WordLevel tokenizer; the 'bpe' kind needs a BPE model"):
        BPETokenizer.load(path)


def test_decode_refuses_out_of_range_and_non_1d_ids(bpe_512):
    with pytest.raises(InputValidationError, match=r"outside the vocabulary of size 512"):
        bpe_512.decode([1, 2, 512])
    with pytest.raises(InputValidationError, match="outside"):
        bpe_512.decode([-1])
    with pytest.raises(InputValidationError, match="1-D"):
        bpe_512.decode(np.zeros((2, 2), np.int32))
    assert bpe_512.decode([]) == ""


def test_encode_refuses_invalid_utf8_and_other_types(bpe_512):
    with pytest.raises(InputValidationError, match="not valid UTF-8"):
        bpe_512.encode(b"ok \xff")
    with pytest.raises(InputValidationError, match="expected str or bytes"):
        bpe_512.encode(123)


@pytest.mark.parametrize("vocab_size", [256, 100, True, 512.0])
def test_train_refuses_vocab_sizes_without_merges(vocab_size):
    with pytest.raises(InputValidationError, match="vocab_size must be an int > 256"):
        BPETokenizer.train("some text", vocab_size)


def test_byte_tokenizer_is_the_same_class_everywhere_and_has_no_file():
    assert ByteTokenizer is DataByteTokenizer
    tokenizer = ByteTokenizer()
    assert tokenizer.kind == "byte" and tokenizer.describe() == {"kind": "byte", "vocab_size": 256}
    assert tokenizer_files(tokenizer) == {}


def test_training_on_the_training_split_leaves_the_validation_text_unseen():
    # A word that occurs only in the held-out tail is never merged into one token.
    text = ("alpha beta gamma " * 200) + "zyzzyva zyzzyva zyzzyva zyzzyva"
    train, val = split_text(text.encode(), 0.01, "test text")
    assert "zyzzyva" in val and "zyzzyva" not in train
    held_out = BPETokenizer.train(train, 300)
    seen = BPETokenizer.train(text, 300)
    assert held_out.encode(" zyzzyva").size > seen.encode(" zyzzyva").size == 1
