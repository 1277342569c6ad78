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
