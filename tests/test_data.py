"""Tests for phase1_jax.data: corpus, tokenizer, loaders, validation, splits and batches."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from phase1_jax.data import (
    Batch,
    BatchIterator,
    ByteTokenizer,
    corpus_fingerprint,
    embedded_corpus_bytes,
    eval_batches,
    load_text,
    load_tokens,
    split_text,
    train_val_split,
    unigram_entropy_nats,
    validate_token_range,
)
from phase1_jax.errors import InputValidationError


# ---------------------------------------------------------------- corpus and fingerprint


def test_embedded_corpus_is_large_english_text_and_stable():
    corpus = embedded_corpus_bytes()
    assert isinstance(corpus, bytes)
    assert len(corpus) > 100_000
    assert b"the" in corpus
    assert embedded_corpus_bytes() == corpus
    assert corpus_fingerprint(corpus) == corpus_fingerprint(embedded_corpus_bytes())
    assert corpus_fingerprint(corpus) == hashlib.sha256(corpus).hexdigest()[:16]


def test_fingerprint_of_token_arrays_ignores_storage_dtype_and_detects_changes():
    tokens = np.arange(1000) % 300
    assert corpus_fingerprint(tokens.astype(np.uint16)) == corpus_fingerprint(tokens.astype(np.int64))
    changed = tokens.copy()
    changed[500] += 1
    assert corpus_fingerprint(changed) != corpus_fingerprint(tokens)
    assert len(corpus_fingerprint(tokens, length=32)) == 32


def test_load_embedded_matches_corpus_bytes():
    tokens = load_tokens("embedded")
    corpus = embedded_corpus_bytes()
    assert tokens.dtype == np.int32 and tokens.ndim == 1
    assert tokens.size == len(corpus)
    assert bytes(tokens.astype(np.uint8)) == corpus


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["hello, world", "", "naïve café — 日本語 🚀", "line\nbreak\ttab\x00nul"])
def test_byte_tokenizer_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert ids.size == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text


def test_byte_tokenizer_bytes_and_invalid_utf8():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 256
    assert tokenizer.encode(b"\xff\x00A").tolist() == [255, 0, 65]
    assert tokenizer.decode([0xFF, 65]) == "\ufffdA"
    with pytest.raises(InputValidationError, match="256"):
        tokenizer.decode([65, 256])


# ---------------------------------------------------------------- file sources


def test_load_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("héllo\n", encoding="utf-8")
    tokens = load_tokens("text", str(path))
    assert tokens.dtype == np.int32
    assert tokens.tolist() == list("héllo\n".encode("utf-8"))


def test_load_text_returns_the_bytes_of_text_sources(tmp_path):
    assert load_text("embedded") == embedded_corpus_bytes()
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9")  # any bytes: only a tokenizer that needs UTF-8 checks the encoding
    assert load_text("text", path) == b"caf\xe9"
    with pytest.raises(InputValidationError, match="'tokens' is not text"):
        load_text("tokens", path)
    with pytest.raises(InputValidationError, match="takes no path"):
        load_text("embedded", path)
    with pytest.raises(InputValidationError, match="needs a path"):
        load_text("text")


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "int64"])
def test_load_npy_tokens(tmp_path, dtype):
    values = np.array([0, 1, 255, 1000, 60000], dtype=dtype)
    path = tmp_path / "tokens.npy"
    np.save(path, values)
    tokens = load_tokens("tokens", str(path))
    assert tokens.dtype == np.int32
    assert tokens.tolist() == values.tolist()


def test_load_big_endian_npy(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.array([1, 2, 513], dtype=">u2"))
    assert load_tokens("tokens", path).tolist() == [1, 2, 513]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_load_raw_bin_tokens_little_endian(tmp_path, dtype):
    values = np.array([0, 7, 300, 65535], dtype=np.dtype(dtype).newbyteorder("<"))
    path = tmp_path / "tokens.bin"
    path.write_bytes(values.tobytes())
    tokens = load_tokens("tokens", str(path), token_dtype=dtype)
    assert tokens.dtype == np.int32
    assert tokens.tolist() == values.tolist()


def test_unknown_source_names_allowed_values():
    with pytest.raises(InputValidationError, match="'embedded', 'text', 'tokens'") as info:
        load_tokens("wikipedia", None)
    assert "wikipedia" in str(info.value)


def test_embedded_rejects_a_path():
    with pytest.raises(InputValidationError, match="takes no path"):
        load_tokens("embedded", "some/file.txt")


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_file_sources_need_a_path(source):
    with pytest.raises(InputValidationError, match="needs a path"):
        load_tokens(source, None)


@pytest.mark.parametrize("source,name", [("text", "missing.txt"), ("tokens", "missing.npy"), ("tokens", "missing.bin")])
def test_missing_file(tmp_path, source, name):
    path = str(tmp_path / name)
    with pytest.raises(InputValidationError, match="not found") as info:
        load_tokens(source, path, token_dtype="uint16")
    assert path in str(info.value)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(InputValidationError, match="not a regular file") as info:
        load_tokens("text", str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("source,name", [("text", "empty.txt"), ("tokens", "empty.bin")])
def test_empty_file(tmp_path, source, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(InputValidationError, match="empty") as info:
        load_tokens(source, str(path), token_dtype="uint16")
    assert str(path) in str(info.value)


def test_npy_with_empty_array(tmp_path):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros(0, dtype=np.int32))
    with pytest.raises(InputValidationError, match="empty") as info:
        load_tokens("tokens", str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("dtype", ["float32", "int8", "uint8", "bool"])
def test_npy_wrong_dtype(tmp_path, dtype):
    path = tmp_path / "tokens.npy"
    np.save(path, np.zeros(4, dtype=dtype))
    with pytest.raises(InputValidationError, match="dtype") as info:
        load_tokens("tokens", str(path))
    message = str(info.value)
    assert str(path) in message and np.dtype(dtype).name in message


def test_npy_not_one_dimensional(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(InputValidationError, match=r"1-D.*\(2, 3\)") as info:
        load_tokens("tokens", str(path))
    assert str(path) in str(info.value)


def test_npy_dtype_disagreeing_with_token_dtype(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.zeros(4, dtype=np.uint32))
    with pytest.raises(InputValidationError, match="token_dtype='uint16'"):
        load_tokens("tokens", str(path), token_dtype="uint16")


def test_corrupt_npy(tmp_path):
    path = tmp_path / "tokens.npy"
    path.write_bytes(b"definitely not numpy")
    with pytest.raises(InputValidationError, match="not a readable .npy") as info:
        load_tokens("tokens", str(path))
    assert str(path) in str(info.value)


def test_bin_without_token_dtype(tmp_path):
    path = tmp_path / "tokens.bin"
    path.write_bytes(b"\x00\x01\x02\x03")
    with pytest.raises(InputValidationError, match="token_dtype") as info:
        load_tokens("tokens", str(path))
    assert str(path) in str(info.value)


def test_bin_with_unsupported_token_dtype(tmp_path):
    path = tmp_path / "tokens.bin"
    path.write_bytes(b"\x00\x01\x02\x03")
    with pytest.raises(InputValidationError, match="token_dtype='int8'") as info:
        load_tokens("tokens", str(path), token_dtype="int8")
    assert "uint16, uint32" in str(info.value)


@pytest.mark.parametrize("dtype,size", [("uint16", 5), ("uint32", 6)])
def test_bin_length_not_multiple_of_item_size(tmp_path, dtype, size):
    path = tmp_path / "tokens.bin"
    path.write_bytes(bytes(size))
    with pytest.raises(InputValidationError, match=f"{size} bytes, not a multiple") as info:
        load_tokens("tokens", str(path), token_dtype=dtype)
    assert str(path) in str(info.value)


def test_ids_beyond_int32_are_rejected_not_wrapped(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.array([5, 2**31, 6, -1], dtype=np.int64))
    with pytest.raises(InputValidationError, match="2 token id") as info:
        load_tokens("tokens", str(path))
    message = str(info.value)
    assert str(path) in message and "position 1" in message and "2147483648" in message


# ---------------------------------------------------------------- range validation and entropy


def test_validate_token_range_accepts_in_range():
    validate_token_range(np.array([0, 5, 255]), 256, "inline")


def test_validate_token_range_reports_offenders_and_never_clamps(tmp_path):
    path = tmp_path / "tokens.bin"
    np.array([3, 300, 10, 999, 4], dtype="<u2").tofile(path)
    tokens = load_tokens("tokens", str(path), token_dtype="uint16")
    before = tokens.copy()
    with pytest.raises(InputValidationError) as info:
        validate_token_range(tokens, 256, str(path))
    message = str(info.value)
    assert str(path) in message
    assert "2 token id(s)" in message
    assert "min offending 300" in message and "max offending 999" in message
    assert "first at position 1" in message
    np.testing.assert_array_equal(tokens, before)


def test_validate_token_range_rejects_negative_ids():
    with pytest.raises(InputValidationError, match="min offending -3.*position 2"):
        validate_token_range(np.array([1, 2, -3, -1]), 10, "inline")


def test_validate_token_range_rejects_bad_vocab_and_float_tokens():
    with pytest.raises(InputValidationError, match="vocab_size"):
        validate_token_range(np.array([1]), 0, "inline")
    with pytest.raises(InputValidationError, match="integer dtype"):
        validate_token_range(np.array([1.0]), 10, "inline")


def test_unigram_entropy_uniform_and_constant():
    assert unigram_entropy_nats(np.arange(256).repeat(3), 256) == pytest.approx(math.log(256))
    assert unigram_entropy_nats(np.full(100, 7), 256) == 0.0
    assert unigram_entropy_nats(np.array([0, 1]), 256) == pytest.approx(math.log(2))
    with pytest.raises(InputValidationError):
        unigram_entropy_nats(np.array([0, 256]), 256)


def test_embedded_corpus_entropy_is_plausible_for_english_bytes():
    entropy = unigram_entropy_nats(load_tokens("embedded"), 256)
    assert 2.5 < entropy < 4.0  # English bytes sit near 3 nats; far below log(256) = 5.55


# ---------------------------------------------------------------- splits


def test_train_val_split_is_contiguous_tail():
    tokens = np.arange(1000, dtype=np.int32)
    train, val = train_val_split(tokens, 0.1, seq_len=16)
    assert train.size == 900 and val.size == 100
    np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
    assert val[0] == 900


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, True])
def test_train_val_split_rejects_bad_fraction(fraction):
    with pytest.raises(InputValidationError, match="val_fraction"):
        train_val_split(np.arange(1000), fraction, seq_len=8)


def test_train_val_split_too_short_names_lengths():
    with pytest.raises(InputValidationError) as info:
        train_val_split(np.arange(100), 0.05, seq_len=16)
    message = str(info.value)
    assert "train 95" in message and "validation 5" in message and "17" in message


def test_split_text_matches_train_val_split_on_ascii():
    data = bytes(range(32, 127)) * 20
    train, val = split_text(data, 0.1, "ascii")
    byte_train, byte_val = train_val_split(np.frombuffer(data, np.uint8), 0.1, seq_len=8)
    assert train.encode() == byte_train.tobytes() and val.encode() == byte_val.tobytes()


def test_split_text_never_cuts_a_character():
    data = "é".encode() * 50  # 100 bytes; the byte cut at 95 falls inside a character
    train, val = split_text(data, 0.05, "accents")
    assert train + val == "é" * 50 and len(val) == 3  # moved back to 94: 6 bytes of validation


def test_split_text_names_the_offset_of_invalid_utf8():
    with pytest.raises(InputValidationError, match=r"corpus.txt is not valid UTF-8 \(byte 4: invalid start byte\)"):
        split_text(b"abcd\xffefgh", 0.1, "corpus.txt")
    with pytest.raises(InputValidationError, match="val_fraction"):
        split_text(b"abc", 1.0, "x")


# ---------------------------------------------------------------- training batches


def _stream(length=5000):
    return np.random.default_rng(0).integers(0, 256, size=length).astype(np.uint16)


def test_batches_shape_dtype_and_shift():
    tokens = _stream()
    batch = BatchIterator(tokens, batch_size=4, seq_len=32, seed=1).batch_at(0)
    assert isinstance(batch, Batch)
    inputs, targets = batch
    assert inputs.shape == targets.shape == (4, 32)
    assert inputs.dtype == targets.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    # Each row is a real window of the stream, with its target being the following token.
    for row_inputs, row_targets in zip(inputs, targets):
        matches = np.flatnonzero(
            np.all(np.lib.stride_tricks.sliding_window_view(tokens, 33) == np.append(row_inputs, row_targets[-1]), axis=1)
        )
        assert matches.size >= 1


def test_batches_cover_the_last_token():
    tokens = np.arange(10, dtype=np.int32)
    iterator = BatchIterator(tokens, batch_size=64, seq_len=9, seed=0)
    batch = iterator.batch_at(0)
    # Only one window fits: it must end at the final token.
    np.testing.assert_array_equal(batch.inputs, np.tile(np.arange(9), (64, 1)))
    np.testing.assert_array_equal(batch.targets, np.tile(np.arange(1, 10), (64, 1)))


def test_batches_deterministic_and_seed_dependent():
    tokens = _stream()
    first = BatchIterator(tokens, 8, 16, seed=3)
    second = BatchIterator(tokens, 8, 16, seed=3)
    other = BatchIterator(tokens, 8, 16, seed=4)
    for step in range(3):
        np.testing.assert_array_equal(first.batch_at(step).inputs, second.batch_at(step).inputs)
    assert not np.array_equal(first.batch_at(0).inputs, other.batch_at(0).inputs)
    assert not np.array_equal(first.batch_at(0).inputs, first.batch_at(1).inputs)


def test_batches_resumable_and_order_independent():
    tokens = _stream()
    uninterrupted = BatchIterator(tokens, 4, 16, seed=11)
    seen = [next(uninterrupted) for _ in range(10)]
    assert uninterrupted.state() == {"seed": 11, "step": 10}

    state = {"seed": 11, "step": 6}
    resumed = BatchIterator(tokens, 4, 16, seed=state["seed"], start_step=state["step"])
    for expected in seen[6:]:
        got = next(resumed)
        np.testing.assert_array_equal(got.inputs, expected.inputs)
        np.testing.assert_array_equal(got.targets, expected.targets)

    shuffled = BatchIterator(tokens, 4, 16, seed=11)
    for step in [9, 2, 7, 0, 2]:
        np.testing.assert_array_equal(shuffled.batch_at(step).inputs, seen[step].inputs)


def test_batch_iterator_rejects_bad_arguments():
    tokens = _stream(100)
    with pytest.raises(InputValidationError, match="too short"):
        BatchIterator(tokens, 2, 100, seed=0)
    with pytest.raises(InputValidationError, match="batch_size"):
        BatchIterator(tokens, 0, 8, seed=0)
    with pytest.raises(InputValidationError, match="seed"):
        BatchIterator(tokens, 2, 8, seed=-1)
    with pytest.raises(InputValidationError, match="1-D"):
        BatchIterator(tokens.reshape(10, 10), 2, 8, seed=0)
    with pytest.raises(InputValidationError, match="step"):
        BatchIterator(tokens, 2, 8, seed=0).batch_at(-1)


# ---------------------------------------------------------------- evaluation batches


def test_eval_batches_fixed_and_spread():
    val = _stream(2000)
    batches = eval_batches(val, batch_size=4, seq_len=32, num_batches=3)
    again = eval_batches(val, batch_size=4, seq_len=32, num_batches=3)
    assert len(batches) == 3
    for batch, repeat in zip(batches, again):
        assert batch.inputs.shape == batch.targets.shape == (4, 32)
        assert batch.inputs.dtype == np.int32
        np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
        np.testing.assert_array_equal(batch.inputs, repeat.inputs)
    # Evenly spaced from the first window to the last one.
    np.testing.assert_array_equal(batches[0].inputs[0], val[:32])
    np.testing.assert_array_equal(batches[-1].targets[-1], val[-32:])


def test_eval_batches_too_short():
    with pytest.raises(InputValidationError, match="too short"):
        eval_batches(np.arange(10), batch_size=1, seq_len=10, num_batches=1)
