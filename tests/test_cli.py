"""The command line from the outside: train -> checkpoint -> logits, and bad input refused early."""

import json

import numpy as np
import pytest

from phase1_jax.cli import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--preset", "tiny", "--steps", "4", "--out", str(out)]) == 0
    return out


def test_train_writes_run_directory(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint/config.yaml", "checkpoint/state"):
        assert (tiny_run / name).exists(), name
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and "val_loss" in records[-1] and records[-1]["tokens_per_sec"] > 0
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["steps"] == 4 and np.isfinite(summary["final_val_loss"])


def test_logits_command_shows_causality_from_outside(tiny_run, tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(2, 32))
    changed = ids.copy()
    changed[:, 20] = (changed[:, 20] + 7) % 256
    np.save(tmp_path / "a.npy", ids)
    np.save(tmp_path / "b.npy", changed)
    assert main(["logits", str(tiny_run), "--ids", str(tmp_path / "a.npy"), "--out", str(tmp_path / "la.npy")]) == 0
    assert main(["logits", str(tiny_run / "checkpoint"), "--ids", str(tmp_path / "b.npy"),
                 "--out", str(tmp_path / "lb.npy")]) == 0
    la, lb = np.load(tmp_path / "la.npy"), np.load(tmp_path / "lb.npy")
    assert la.shape == (2, 32, 256) and la.dtype == np.float32
    assert np.array_equal(la[:, :20], lb[:, :20])
    assert not np.array_equal(la[:, 20], lb[:, 20])


def test_logits_rejects_out_of_range_ids_and_bad_lengths(tiny_run, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.array([[1, 2, 300]]))
    assert main(["logits", str(tiny_run), "--ids", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o.npy")]) == 2
    assert "outside" in capsys.readouterr().err
    np.save(tmp_path / "long.npy", np.zeros((1, 33), np.int64))
    assert main(["logits", str(tiny_run), "--ids", str(tmp_path / "long.npy"), "--out", str(tmp_path / "o.npy")]) == 2
    assert "n_seq = 32; got 33" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_train_refuses_out_of_range_token_file_before_training(tmp_path, capsys):
    tokens = np.arange(5000, dtype=np.uint16) % 300  # ids up to 299 for a 256-token vocabulary
    np.save(tmp_path / "tokens.npy", tokens)
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--out", str(out), "--set", "data.source=tokens",
                 "--set", f"data.path={tmp_path / 'tokens.npy'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "tokens.npy" in err and "outside" in err
    assert not out.exists()


def test_invalid_config_names_the_field(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--set", "model.top_k=0", "--out", str(tmp_path / "r")]) == 2
    assert "model.top_k" in capsys.readouterr().err
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "tiny" in capsys.readouterr().err


def test_text_source_needs_byte_vocab(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--set", "model.vocab_size=100", "--out", str(tmp_path / "r")]) == 2
    assert "model.vocab_size" in capsys.readouterr().err


def test_relative_paths_work(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_run.parent)
    np.save(tmp_path / "ids.npy", np.zeros((1, 8), np.int64))
    assert main(["logits", tiny_run.name, "--ids", str(tmp_path / "ids.npy"), "--out", "rel_logits.npy"]) == 0
    assert (tiny_run.parent / "rel_logits.npy").exists()


def test_train_on_user_text_and_token_files(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    out = tmp_path / "text_run"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(out), "--set", "data.source=text",
                 "--set", f"data.path={text}"]) == 0
    tokens = tmp_path / "tokens.bin"
    (np.arange(8000) % 97).astype("<u2").tofile(tokens)
    out = tmp_path / "token_run"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(out), "--set", "data.source=tokens",
                 "--set", f"data.path={tokens}", "--set", "data.token_dtype=uint16",
                 "--set", "model.vocab_size=97"]) == 0
    assert json.loads((out / "summary.json").read_text())["num_train_tokens"] > 0


def test_training_stops_on_non_finite_loss(tmp_path, capsys):
    out = tmp_path / "nan_run"
    # A learning rate of 1e30 blows the weights up within a few steps.
    code = main(["train", "--preset", "tiny", "--steps", "10", "--out", str(out), "--set", "training.learning_rate=1e30",
                 "--set", "training.grad_clip_norm=1e30", "--set", "training.log_every=1"])
    assert code == 2
    assert "Numerical instability detected in training" in capsys.readouterr().err
    assert not (out / "checkpoint").exists()


# ---------------------------------------------------------------- BPE tokenizer runs

BPE_OVERRIDES = ["--set", "data.tokenizer=bpe", "--set", "data.tokenizer_vocab_size=512",
                 "--set", "model.vocab_size=512"]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bpe"
    assert main(["train", "--preset", "tiny-phase1", "--steps", "2", "--out", str(out), *BPE_OVERRIDES]) == 0
    return out


def _error_line(capsys) -> str:
    """The one error line of a refused command (the train header line may precede it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_bpe_run_saves_its_tokenizer_in_the_run_and_the_checkpoint(bpe_run):
    import hashlib

    import yaml

    data = (bpe_run / "tokenizer.json").read_bytes()
    assert (bpe_run / "checkpoint" / "tokenizer.json").read_bytes() == data
    record = {"kind": "bpe", "vocab_size": 512, "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((bpe_run / "checkpoint" / "meta.json").read_text())["tokenizer"] == record
    summary = json.loads((bpe_run / "summary.json").read_text())
    assert summary["tokenizer"] == record
    assert summary["val_bytes_per_token"] > 2  # BPE tokens hold several bytes each
    assert yaml.safe_load((bpe_run / "config.yaml").read_text())["data"]["tokenizer"] == "bpe"
    assert not list(bpe_run.glob(".*")) and not list((bpe_run / "checkpoint").glob(".*"))  # no leftovers


def test_bpe_run_tokenizer_is_trained_on_the_training_split_only(bpe_run):
    from phase1_jax.data import embedded_corpus_bytes, split_text
    from phase1_jax.tokenizer import BPETokenizer

    train_text, val_text = split_text(embedded_corpus_bytes(), 0.05, "the embedded corpus")
    expected = BPETokenizer.train(train_text, 512)
    assert (bpe_run / "tokenizer.json").read_bytes() == expected.to_json()
    summary = json.loads((bpe_run / "summary.json").read_text())
    assert summary["num_train_tokens"] == expected.encode(train_text).size
    assert summary["num_val_tokens"] == expected.encode(val_text).size
    assert summary["val_bytes_per_token"] == len(val_text.encode()) / summary["num_val_tokens"]


def test_load_run_tokenizer_for_byte_and_bpe_runs(tiny_run, bpe_run):
    from phase1_jax.checkpoint import load_run_tokenizer
    from phase1_jax.tokenizer import BPETokenizer, ByteTokenizer

    assert isinstance(load_run_tokenizer(tiny_run), ByteTokenizer)
    assert json.loads((tiny_run / "checkpoint" / "meta.json").read_text())["tokenizer"]["kind"] == "byte"
    assert not (tiny_run / "tokenizer.json").exists()
    for path in (bpe_run, bpe_run / "checkpoint"):
        tokenizer = load_run_tokenizer(path)
        assert isinstance(tokenizer, BPETokenizer) and tokenizer.vocab_size == 512
        assert tokenizer.to_json() == (bpe_run / "tokenizer.json").read_bytes()
        assert tokenizer.decode(tokenizer.encode("déjà vu: 🙂\n")) == "déjà vu: 🙂\n"


def test_load_run_tokenizer_refuses_a_changed_or_missing_file(bpe_run, tmp_path):
    import shutil

    from phase1_jax.checkpoint import load_run_tokenizer
    from phase1_jax.errors import CheckpointError

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(bpe_run / "checkpoint", ckpt)
    (ckpt / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes() + b" ")
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded in meta.json"):
        load_run_tokenizer(ckpt)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="records a 'bpe' tokenizer but tokenizer.json is missing"):
        load_run_tokenizer(ckpt)


def test_conversion_keeps_the_tokenizer(bpe_run, tmp_path):
    from phase1_jax.checkpoint import load_run_tokenizer

    assert main(["convert-from-phase1", str(bpe_run), str(tmp_path / "baseline"), "--drop-ar-ssm"]) == 0
    assert load_run_tokenizer(tmp_path / "baseline").sha256 == load_run_tokenizer(bpe_run).sha256


def test_bpe_run_reusing_a_tokenizer_file_gets_the_same_tokens(bpe_run, tmp_path):
    out = tmp_path / "reuse"
    assert main(["train", "--preset", "tiny", "--steps", "1", "--out", str(out), "--set", "data.tokenizer=bpe",
                 "--set", f"data.tokenizer_path={bpe_run / 'tokenizer.json'}", "--set", "model.vocab_size=512"]) == 0
    assert (out / "checkpoint" / "tokenizer.json").read_bytes() == (bpe_run / "tokenizer.json").read_bytes()
    first, again = (json.loads((run / "summary.json").read_text()) for run in (bpe_run, out))
    assert again["data_fingerprint"] == first["data_fingerprint"] and again["tokenizer"] == first["tokenizer"]


def test_bpe_vocab_mismatch_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--set", "data.tokenizer=bpe",
                 "--set", "data.tokenizer_vocab_size=512"]) == 2
    line = _error_line(capsys)
    assert "model.vocab_size' = 256" in line and "data.tokenizer_vocab_size = 512" in line
    assert not out.exists()


def test_tokenizer_file_vocab_mismatch_names_both_sizes(bpe_run, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--set", "data.tokenizer=bpe",
                 "--set", f"data.tokenizer_path={bpe_run / 'tokenizer.json'}", "--set", "model.vocab_size=600"]) == 2
    line = _error_line(capsys)
    assert "model.vocab_size' = 600" in line and "vocabulary size 512" in line and "model.vocab_size=512" in line
    assert not out.exists()


@pytest.mark.parametrize("content,fragment", [(None, "does not exist"), (b"{oops", "not a readable tokenizer.json")])
def test_missing_or_unreadable_tokenizer_file(tmp_path, capsys, content, fragment):
    path = tmp_path / "tok.json"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "r"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--set", "data.tokenizer=bpe",
                 "--set", f"data.tokenizer_path={path}", "--set", "model.vocab_size=512"]) == 2
    line = _error_line(capsys)
    assert "data.tokenizer_path" in line and str(path) in line and fragment in line
    assert not out.exists()


def test_unknown_tokenizer_kind(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--set", "data.tokenizer=sentencepiece",
                 "--out", str(tmp_path / "r")]) == 2
    line = _error_line(capsys)
    assert "data.tokenizer' = 'sentencepiece'" in line and "byte | bpe" in line


def test_text_too_small_for_the_vocabulary_names_the_maximum(tmp_path, capsys):
    path = tmp_path / "small.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "r"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--set", "data.source=text",
                 "--set", f"data.path={path}", "--set", "data.tokenizer=bpe", "--set", "data.tokenizer_vocab_size=4096",
                 "--set", "model.vocab_size=4096"]) == 2
    line = _error_line(capsys)
    assert "data.tokenizer_vocab_size' = 4096" in line and "at most" in line and str(path) in line
    assert not out.exists()


def test_bpe_token_file_needs_its_tokenizer_with_the_matching_vocab(bpe_run, tmp_path, capsys):
    np.save(tmp_path / "tokens.npy", np.arange(5000, dtype=np.uint16) % 512)
    common = ["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "data.source=tokens",
              "--set", f"data.path={tmp_path / 'tokens.npy'}", "--set", "data.tokenizer=bpe"]
    assert main(common + ["--set", "model.vocab_size=512"]) == 2
    assert "data.tokenizer_path" in _error_line(capsys)
    assert main(common + ["--set", f"data.tokenizer_path={bpe_run / 'tokenizer.json'}"]) == 2
    assert "vocabulary size 512" in _error_line(capsys)
