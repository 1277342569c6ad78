"""Training that never loses work: whole-state checkpoints, exact resume, --init-from, recovery and its events.

Runs are the `tiny-phase1` preset (HTT, AR-SSM with its rank curriculum) for 40 steps, checkpointing every 10.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from phase1_jax.checkpoint import TRAIN_CHECKPOINTS_DIR, load_checkpoint
from phase1_jax.cli import main

STEPS = 40
RUN = ["--preset", "tiny-phase1", "--steps", str(STEPS), "--set", "training.checkpoint_every=10"]


def _events(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "event" in r]


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def _params(run: Path) -> list[np.ndarray]:
    _, model = load_checkpoint(run)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`phase1-jax` in a child process (the only way to be killed by SIGKILL and keep the test alive)."""
    proc = subprocess.run([sys.executable, "-m", "phase1_jax.cli", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "clean"
    assert main(["train", *RUN, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identically(clean_run, tmp_path):
    run = tmp_path / "killed"
    killed = _cli("train", *RUN, "--out", str(run), "--inject-fault", "kill@25", check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "checkpoint").exists() and (run / TRAIN_CHECKPOINTS_DIR).is_dir()
    _cli("train", "--resume", str(run))
    # Same data order, same losses, same parameters, same logits from the outside.
    assert [r["loss"] for r in _records(run)] == [r["loss"] for r in _records(clean_run)]
    for a, b in zip(_params(run), _params(clean_run)):
        assert np.array_equal(a, b)
    ids = np.random.default_rng(0).integers(0, 256, (2, 32))
    np.save(tmp_path / "ids.npy", ids)
    for name, source in (("a", clean_run), ("b", run)):
        assert main(["logits", str(source), "--ids", str(tmp_path / "ids.npy"), "--out",
                     str(tmp_path / f"{name}.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tmp_path):
    run = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "phase1_jax.cli", "train", "--preset", "tiny", "--steps", "100000",
                             "--out", str(run), "--set", "training.checkpoint_every=null"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, "the run did not start"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err
    steps = sorted(int(p.name) for p in (run / TRAIN_CHECKPOINTS_DIR).iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 5  # the first record was logged at step 5


def test_nan_loss_is_skipped_and_the_run_finishes_like_a_clean_one(clean_run, tmp_path):
    run = tmp_path / "nan"
    assert main(["train", *RUN, "--out", str(run), "--inject-fault", "nan-loss@12"]) == 0
    skips = [e for e in _events(run) if e["event"] == "skip"]
    assert [(e["step"], e["reason"]) for e in skips] == [(12, "non-finite_loss")]
    assert all(np.isfinite(p).all() for p in _params(run))
    final, clean = _records(run)[-1], _records(clean_run)[-1]
    assert abs(final["val_loss"] - clean["val_loss"]) < 0.05 and final["skipped_total"] == 1


def test_repeated_inf_gradients_restore_and_cut_the_learning_rate(clean_run, tmp_path):
    run = tmp_path / "inf"
    faults = [a for s in (22, 23, 24) for a in ("--inject-fault", f"inf-grad@{s}")]
    assert main(["train", *RUN, "--out", str(run), *faults, "--set", "training.log_every=25"]) == 0
    events = _events(run)
    kinds = [e["event"] for e in events]
    assert kinds == ["skip", "skip", "skip", "restore", "lr_cut"]
    restore = events[3]
    assert restore["restored_step"] == 20 and restore["bad_batches"] == [21, 22, 23]
    assert events[4]["lr_scale"] == 0.5
    records = _records(run)
    assert records[-1]["step"] == STEPS and np.isfinite(records[-1]["val_loss"])
    # Steps 21-24 were redone from the checkpoint, at half the learning rate.
    step25 = next(r for r in records if r["step"] == 25)
    clean25 = next(r for r in _records(clean_run) if r["step"] == 25)
    assert step25["learning_rate"] == pytest.approx(0.5 * clean25["learning_rate"]) and step25["skipped"] == 0


def test_out_of_memory_rebuilds_the_step_with_the_same_effective_batch(tmp_path):
    run = tmp_path / "oom"
    assert main(["train", "--preset", "tiny-phase1", "--steps", "10", "--out", str(run),
                 "--inject-fault", "oom@5", "--inject-fault", "oom@6"]) == 0
    plans = [e for e in _events(run) if e["event"] == "memory_plan"]
    assert [(e["step"], e["plan"]) for e in plans] == [(5, {"remat": "blocks", "micro_batches": 1}),
                                                      (6, {"remat": "blocks", "micro_batches": 2})]
    assert [r["step"] for r in _records(run)] == [5, 10]
    assert "2 micro-batch(es) of 4" in plans[1]["message"]  # batch 8 = 2 x 4


def test_target_vram_plans_memory_before_the_first_step(tmp_path):
    run = tmp_path / "planned"
    assert main(["train", "--preset", "tiny-phase1", "--steps", "5", "--out", str(run),
                 "--set", "model.phase1.target_vram_gb=0.0000001"]) == 0
    plan = [e for e in _events(run) if e["event"] == "memory_plan"]
    assert len(plan) == 1 and plan[0]["step"] == 0 and "over target_vram_gb" in plan[0]["message"]
    assert "micro-batch(es) of 1" in plan[0]["message"]  # escalated all the way


def test_tensorboard_events_and_flops(clean_run):
    files = list((clean_run / "tensorboard").glob("events.out.tfevents.*"))
    assert files and b"grad_norm" in files[0].read_bytes() and b"tokens_per_sec" in files[0].read_bytes()
    assert _records(clean_run)[-1]["model_flops_per_step"] > 0


def test_resume_errors_and_fallbacks(clean_run, tmp_path, capsys):
    # Not a run directory.
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory to resume" in capsys.readouterr().err
    # A run whose config was edited to another shape.
    edited = tmp_path / "edited"
    shutil.copytree(clean_run, edited)
    shutil.rmtree(edited / "checkpoint")
    config = (edited / "config.yaml").read_text()
    (edited / "config.yaml").write_text(config.replace("d_model: 32", "d_model: 48"))
    assert main(["train", "--resume", str(edited), "--steps", "50"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "d_model" in err and err.count("\n") == 1
    # Shape-changing overrides are refused, and so are --out and --config with --resume.
    (edited / "config.yaml").write_text(config)
    assert main(["train", "--resume", str(edited), "--set", "model.n_layers=3"]) == 2
    assert "model.n_layers: 2 -> 3" in capsys.readouterr().err
    # A truncated newest checkpoint: reported, and the previous one is used; nothing is lost.
    newest = edited / TRAIN_CHECKPOINTS_DIR / "40"
    for path in sorted(newest.rglob("*")):
        if path.is_file() and path.stat().st_size > 100 and "state" in str(path):
            path.write_bytes(path.read_bytes()[:20])
    assert main(["train", "--resume", str(edited), "--steps", "45"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint step 40" in err and "unreadable" in err and "resuming" in err and "from step 30" in err
    assert (edited / "checkpoint").exists()
    # A deleted newest checkpoint: the one before it is used.
    shutil.rmtree(edited / TRAIN_CHECKPOINTS_DIR / "45")
    assert main(["train", "--resume", str(edited), "--steps", "50"]) == 0
    assert "from step 40" in capsys.readouterr().err


def test_bad_fault_specs_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--inject-fault", "segv@3"]) == 2
    err = capsys.readouterr().err
    assert "--inject-fault" in err and "nan-loss, inf-grad, oom, kill" in err and not (tmp_path / "x").exists()


def test_import_convert_train_and_export_chain(tmp_path):
    torch = pytest.importorskip("torch")
    from phase1_jax.converters.bridge import state_dict_from_model
    from phase1_jax.config import ModelConfig
    from phase1_jax.converters.torch_twins import build_torch_twin
    from phase1_jax.train import build_model

    # A PyTorch baseline checkpoint (the reference layout), as a user would bring it.
    config = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_seq=32, num_experts=2, dropout=0.0,
                         numerics="reference")
    state = state_dict_from_model(build_model(config, seed=3))
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp_path / "baseline.pt")
    assert main(["import-torch", str(tmp_path / "baseline.pt"), str(tmp_path / "imported"), "--dropout", "0.0"]) == 0
    assert main(["convert-to-phase1", str(tmp_path / "imported"), str(tmp_path / "p1"), "--preset", "8gb",
                 "--numerics", "native"]) == 0
    assert main(["train", "--init-from", str(tmp_path / "p1"), "--preset", "tiny", "--steps", "6",
                 "--out", str(tmp_path / "trained"), "--set", "training.checkpoint_every=null"]) == 0
    summary = json.loads((tmp_path / "trained" / "summary.json").read_text())
    assert summary["init_from"].endswith("p1") and np.isfinite(summary["final_val_loss"])
    assert main(["convert-from-phase1", str(tmp_path / "trained"), str(tmp_path / "back"), "--drop-ar-ssm"]) == 0
    assert main(["export-torch", str(tmp_path / "back"), str(tmp_path / "back.pt")]) == 0
    exported = torch.load(tmp_path / "back.pt", weights_only=True)
    _, model = load_checkpoint(tmp_path / "back")
    twin = build_torch_twin(model.config)
    twin.load_state_dict(exported)
    ids = np.random.default_rng(1).integers(0, 256, (2, 32))
    with torch.no_grad():
        torch_logits = twin(torch.from_numpy(ids)).numpy()
    with jax.default_matmul_precision("highest"):
        jax_logits = np.asarray(model(jax.numpy.asarray(ids)))
    np.testing.assert_allclose(torch_logits, jax_logits, rtol=1e-4, atol=1e-4)


def test_init_from_reference_checkpoint_warns_when_switching_to_native(tmp_path, capsys):
    from phase1_jax.checkpoint import save_checkpoint
    from phase1_jax.config import ModelConfig, RunConfig
    from phase1_jax.models.common import split_model
    from phase1_jax.train import build_model

    config = ModelConfig(vocab_size=256, d_model=16, n_layers=1, n_seq=32, num_experts=2, numerics="reference")
    _, params, buffers = split_model(build_model(config))
    save_checkpoint(tmp_path / "ref", RunConfig(model=config), params, buffers)
    assert main(["train", "--init-from", str(tmp_path / "ref"), "--preset", "tiny", "--steps", "2",
                 "--out", str(tmp_path / "native"), "--set", "model.numerics=native"]) == 0
    err = capsys.readouterr().err
    assert "switching an imported reference-numerics model to native numerics" in err
    assert "numerics: native" in (tmp_path / "native" / "config.yaml").read_text()
    # The reference model trains in reference numerics when nothing is asked.
    assert main(["train", "--init-from", str(tmp_path / "ref"), "--preset", "tiny", "--steps", "2",
                 "--out", str(tmp_path / "ref_run")]) == 0
    assert "numerics: reference" in (tmp_path / "ref_run" / "config.yaml").read_text()


def test_phase1_error_recovery_from_python():
    from phase1_jax.config import TrainConfig
    from phase1_jax.errors import NumericalInstabilityError
    from phase1_jax.recovery import Phase1ErrorRecovery
    from phase1_jax.trainer import SimulatedOOM

    recovery = Phase1ErrorRecovery(max_recovery_attempts=3)
    cfg = TrainConfig(batch_size=4)
    plans = []
    for _ in range(4):
        cfg = recovery.handle_vram_exhausted(SimulatedOOM("RESOURCE_EXHAUSTED"), cfg) or cfg
        plans.append((cfg.remat, cfg.micro_batches))
    assert plans == [("blocks", 1), ("blocks", 2), ("blocks", 4), ("blocks", 4)]  # 3 attempts, then none
    assert recovery.handle_vram_exhausted(ValueError("unrelated"), cfg) is None
    new, state = recovery.handle_numerical_instability(NumericalInstabilityError("training"), cfg)
    assert new.learning_rate == cfg.learning_rate / 2 and state is None
    summary = recovery.get_recovery_summary()
    assert summary["action_types"] == {"enable_gradient_checkpointing": 1, "increase_micro_batches": 2,
                                       "reduce_learning_rate": 1}
