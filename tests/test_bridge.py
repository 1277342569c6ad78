"""import-torch / export-torch: parity with the reference, bit-exact round trips, and strict, safe failures."""

import json
import os
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import golden_cases  # noqa: E402
from phase1_jax.cli import main  # noqa: E402

BASELINE_CASES = golden_cases("baseline_")


def _cli(*args):
    return main([str(a) for a in args])


def _assert_identical(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(-1).view(torch.uint8) if a[key].dtype != torch.complex64 else a[key],
                           b[key].view(-1).view(torch.uint8) if b[key].dtype != torch.complex64 else b[key]), key


@pytest.mark.parametrize("case_dir", BASELINE_CASES, ids=lambda c: c.name)
def test_import_logits_match_reference_and_export_is_bit_identical(case_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert _cli("import-torch", case_dir / "state_dict.pt", ckpt) == 0
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["torch_layout"] == "baseline"
    assert "numerics: reference" in (ckpt / "config.yaml").read_text()
    assert _cli("logits", ckpt, "--ids", case_dir / "input_ids.npy", "--out", tmp_path / "logits.npy") == 0
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), np.load(case_dir / "expected_logits.npy"),
                               atol=1e-5, rtol=0)
    for fmt, name in (("pt", "out.pt"), ("safetensors", "out.safetensors")):
        assert _cli("export-torch", ckpt, tmp_path / name, "--format", fmt) == 0
    original = torch.load(case_dir / "state_dict.pt", weights_only=True)
    _assert_identical(original, torch.load(tmp_path / "out.pt", weights_only=True))
    from safetensors.torch import load_file

    from phase1_jax.converters.torch_io import load_state_dict, numpy_to_tensor

    plain = load_file(str(tmp_path / "out.safetensors"))  # any safetensors reader gets every tensor...
    _assert_identical(original, OrderedDict((k, plain[k]) for k in original))
    ordered = load_state_dict(tmp_path / "out.safetensors")  # ...and ours also the original key order
    _assert_identical(original, OrderedDict((k, numpy_to_tensor(v)) for k, v in ordered.items()))


@pytest.fixture(scope="module")
def small_state():
    cases = golden_cases("baseline_small")
    if not cases:
        pytest.skip("golden baseline_small not available")
    return torch.load(cases[0] / "state_dict.pt", weights_only=True)


def test_bf16_round_trip_is_bit_identical(small_state, tmp_path):
    bf16 = OrderedDict((k, v.to(torch.bfloat16) if v.is_floating_point() else v.clone())
                       for k, v in small_state.items())
    # Random low bits, so a float32 detour would show.
    torch.save(bf16, tmp_path / "bf16.pt")
    assert _cli("import-torch", tmp_path / "bf16.pt", tmp_path / "ckpt") == 0
    assert "param_dtype: bfloat16" in (tmp_path / "ckpt" / "config.yaml").read_text()
    assert _cli("export-torch", tmp_path / "ckpt", tmp_path / "back.pt") == 0
    _assert_identical(bf16, torch.load(tmp_path / "back.pt", weights_only=True))


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "model_state_dict"])
def test_wrapped_training_checkpoints_are_accepted(small_state, tmp_path, wrapper):
    torch.save({wrapper: small_state, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "train.pt")
    assert _cli("import-torch", tmp_path / "train.pt", tmp_path / "ckpt", "--top-k", "2") == 0
    assert "top_k: 2" in (tmp_path / "ckpt" / "config.yaml").read_text()


def test_phase1_integrated_layout_round_trips(small_state, tmp_path):
    """The reference's Phase1IntegratedModel: `base_model.` prefix, HTT cores for both embeddings."""
    from phase1_jax.models.htt import tt_factorization

    rank = 4
    state = OrderedDict()
    gen = torch.Generator().manual_seed(0)
    for key, value in small_state.items():
        if key in ("token_embedding.weight", "position_embedding.weight"):
            rows = value.shape[0]
            v1, v2, d1, d2 = tt_factorization(rows, value.shape[1])
            name = key.split(".")[0]
            state[f"base_model.{name}.core1"] = torch.randn(v1, 1, rank, d1, generator=gen) * 0.02
            state[f"base_model.{name}.core2"] = torch.randn(v2, rank, 1, d2, generator=gen) * 0.02
            state[f"base_model.{name}.phase_shift"] = torch.randn(rank, generator=gen) * 0.1
        else:
            state[f"base_model.{key}"] = value
    torch.save(state, tmp_path / "p1.pt")
    assert _cli("import-torch", tmp_path / "p1.pt", tmp_path / "ckpt") == 0
    text = (tmp_path / "ckpt" / "config.yaml").read_text()
    assert "htt_position_embedding: true" in text and "ar_ssm_enabled: false" in text
    ids = np.random.default_rng(0).integers(0, 1000, size=(1, 32))
    np.save(tmp_path / "ids.npy", ids)
    assert _cli("logits", tmp_path / "ckpt", "--ids", tmp_path / "ids.npy", "--out", tmp_path / "l.npy") == 0
    assert np.isfinite(np.load(tmp_path / "l.npy")).all()
    assert _cli("export-torch", tmp_path / "ckpt", tmp_path / "back.pt") == 0
    _assert_identical(state, torch.load(tmp_path / "back.pt", weights_only=True))


# ------------------------------------------------------------------------------------------ bad inputs

def _expect_failure(capsys, tmp_path, src, *fragments, extra=()):
    out = tmp_path / "out_ckpt"
    assert _cli("import-torch", src, out, *extra) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out_ckpt")], "partial output left behind"
    return err


def test_truncated_file(small_state, tmp_path, capsys):
    torch.save(small_state, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    _expect_failure(capsys, tmp_path, tmp_path / "cut.pt", "cut.pt", "truncated or corrupt")


def test_missing_extra_and_misshaped_keys_reported_together(small_state, tmp_path, capsys):
    state = OrderedDict(small_state)
    del state["blocks.1.bk_layer.v_proj.bias"]
    state["blocks.0.bk_layer.extra_scale"] = torch.ones(3)
    state["blocks.0.bk_layer.output_proj.weight"] = torch.ones(64, 3)
    torch.save(state, tmp_path / "bad.pt")
    err = _expect_failure(capsys, tmp_path, tmp_path / "bad.pt", "missing key 'blocks.1.bk_layer.v_proj.bias'",
                          "unexpected key 'blocks.0.bk_layer.extra_scale'",
                          "'blocks.0.bk_layer.output_proj.weight' has shape (64, 3), expected (64, 2)",
                          "expected layout")
    assert "3 problem(s)" in err


def test_wrong_dtype_reported(small_state, tmp_path, capsys):
    state = OrderedDict(small_state)
    state["blocks.0.bk_layer.moe_ffn.scattering_step_counter"] = torch.tensor(0.0)
    torch.save(state, tmp_path / "bad.pt")
    _expect_failure(capsys, tmp_path, tmp_path / "bad.pt", "scattering_step_counter' has dtype float32, expected int64")


def test_nan_weight_reported_by_key(small_state, tmp_path, capsys):
    state = OrderedDict(small_state)
    w = state["lm_head.weight"].clone()
    w[3, 5] = float("nan")
    state["lm_head.weight"] = w
    torch.save(state, tmp_path / "nan.pt")
    _expect_failure(capsys, tmp_path, tmp_path / "nan.pt", "'lm_head.weight' holds 1 non-finite value(s)")


def test_wrong_architecture(tmp_path, capsys):
    torch.save({"encoder.weight": torch.ones(3, 3)}, tmp_path / "other.pt")
    _expect_failure(capsys, tmp_path, tmp_path / "other.pt", "missing key 'lm_head.weight'")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_code_carrying_pickle_refused(tmp_path, capsys):
    torch.save({"token_embedding.weight": torch.ones(2, 2), "evil": Payload()}, tmp_path / "evil.pt")
    _expect_failure(capsys, tmp_path, tmp_path / "evil.pt", "refusing to load a pickle that carries code",
                    "torch.save(model.state_dict()", "--allow-pickle-code")


def test_unwritable_output_path(small_state, tmp_path, capsys):
    torch.save(small_state, tmp_path / "ok.pt")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _cli("import-torch", tmp_path / "ok.pt", blocker / "ckpt") == 2
    assert "cannot write" in capsys.readouterr().err
    assert _cli("import-torch", tmp_path / "ok.pt", tmp_path / "ckpt") == 0
    assert _cli("export-torch", tmp_path / "ckpt", blocker / "x.pt") == 2
    assert "cannot write" in capsys.readouterr().err
    assert _cli("import-torch", tmp_path / "ok.pt", tmp_path / "ckpt") == 2  # exists: refuse, keep it intact
    assert "already exists" in capsys.readouterr().err and (tmp_path / "ckpt" / "state").is_dir()


def test_missing_source_file(tmp_path, capsys):
    _expect_failure(capsys, tmp_path, tmp_path / "nope.pt", "no such file")


@pytest.mark.parametrize("case_dir", BASELINE_CASES, ids=lambda c: c.name)
def test_golden_runner_and_twin_on_imported_checkpoint(case_dir, tmp_path):
    from phase1_jax.checkpoint import load_checkpoint
    from phase1_jax.converters.golden import main as golden_main
    from phase1_jax.converters.torch_twins import build_torch_twin

    ckpt = tmp_path / "ckpt"
    assert _cli("import-torch", case_dir / "state_dict.pt", ckpt) == 0
    assert golden_main([str(case_dir), str(tmp_path / "out"), "--checkpoint", str(ckpt)]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out" / "logits.npy"), np.load(case_dir / "expected_logits.npy"),
                               atol=1e-5, rtol=0)
    # The export loads strictly into the PyTorch twin, which computes the same logits.
    assert _cli("export-torch", ckpt, tmp_path / "model.pt") == 0
    config, _ = load_checkpoint(ckpt)
    twin = build_torch_twin(config.model)
    twin.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    ids = np.load(case_dir / "input_ids.npy")
    with torch.no_grad():
        logits = twin(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(logits, np.load(case_dir / "expected_logits.npy"), atol=1e-5, rtol=0)


def test_past_the_overflow_cliff_through_the_cli(tmp_path):
    """A reference checkpoint at n_seq = 1024 (random potentials overflow complex128 there): import-torch +
    logits agree with the PyTorch twin, which runs the reference's complex128 recurrences literally."""
    import jax
    from flax import nnx

    from phase1_jax.config import ModelConfig
    from phase1_jax.converters.bridge import state_dict_from_model
    from phase1_jax.converters.torch_io import numpy_to_tensor
    from phase1_jax.converters.torch_twins import build_torch_twin
    from phase1_jax.models.resnet_bk import ResNetBK

    config = ModelConfig(vocab_size=30, d_model=8, n_layers=1, n_seq=1024, num_experts=2, top_k=2,
                         numerics="reference")
    model = ResNetBK(config, rngs=nnx.Rngs(0))
    # Large potentials: the v_proj weights scaled up so v spans the +-3 clamp.
    model.blocks[0].bk_layer.v_proj.kernel[...] = model.blocks[0].bk_layer.v_proj.kernel[...] * 20
    state = OrderedDict((k, numpy_to_tensor(v)) for k, v in state_dict_from_model(model).items())
    torch.save(state, tmp_path / "long.pt")
    assert _cli("import-torch", tmp_path / "long.pt", tmp_path / "ckpt", "--top-k", "2") == 0
    ids = np.random.default_rng(1).integers(0, 30, size=(2, 1024))
    np.save(tmp_path / "ids.npy", ids)
    assert _cli("logits", tmp_path / "ckpt", "--ids", tmp_path / "ids.npy", "--out", tmp_path / "l.npy") == 0
    twin = build_torch_twin(config)
    twin.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected = twin(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), expected, atol=1e-5, rtol=0)
    _, aux = jax.jit(lambda m, x: m.forward(x))(model, ids)
    assert not np.any(np.asarray(aux["blocks"][0]["bk_features"]))  # the cliff: every feature is 0


def test_phase1_export_with_ar_ssm_imports_back(tmp_path):
    """export-torch's own Phase 1 layout (HTT cores, `blocks.{i}.ar_ssm.*`) imports back: the AR-SSM rank, which
    no state dict stores, starts at max_rank, and the logits and the re-export are exact."""
    import jax
    from flax import nnx

    from phase1_jax.checkpoint import load_checkpoint
    from phase1_jax.config import ModelConfig
    from phase1_jax.converters.bridge import state_dict_from_model
    from phase1_jax.converters.torch_io import numpy_to_tensor
    from phase1_jax.models.resnet_bk import ResNetBK
    from phase1_jax.phase1_config import Phase1Config

    phase1 = Phase1Config(ar_ssm_max_rank=6, ar_ssm_min_rank=2, htt_rank=4, ar_ssm_layers=(1,),
                          use_gradient_checkpointing=False, checkpoint_ar_ssm=False)
    config = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_seq=20, num_experts=2, numerics="native",
                         phase1=phase1)
    model = ResNetBK(config, rngs=nnx.Rngs(3))
    layer = model.blocks[1].ar_ssm
    layer.output_proj.kernel[...] = layer.output_proj.kernel[...] + 0.5  # a branch that changes the logits
    state = OrderedDict((k, numpy_to_tensor(v)) for k, v in state_dict_from_model(model).items())
    torch.save(state, tmp_path / "p1.pt")
    assert _cli("import-torch", tmp_path / "p1.pt", tmp_path / "ckpt", "--numerics", "native",
                "--ar-ssm-min-rank", "2") == 0
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["torch_layout"] == "phase1_jax"
    imported_config, imported = load_checkpoint(tmp_path / "ckpt")
    # The shapes give the gate's hidden size, which the source config left to its default, max(d // 4, min_rank).
    assert imported_config.model == config.replace(phase1=phase1.replace(ar_ssm_gate_hidden_dim=4))
    assert int(imported.blocks[1].ar_ssm.current_max_rank[...]) == 6
    ids = np.random.default_rng(0).integers(0, 40, size=(2, 20))
    np.save(tmp_path / "ids.npy", ids)
    assert _cli("logits", tmp_path / "ckpt", "--ids", tmp_path / "ids.npy", "--out", tmp_path / "l.npy") == 0
    expected = jax.jit(lambda m, x: m(x, inference=True))(model, ids)  # as the logits command computes them
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), np.asarray(expected))
    assert _cli("export-torch", tmp_path / "ckpt", tmp_path / "back.pt") == 0
    _assert_identical(state, torch.load(tmp_path / "back.pt", weights_only=True))


# ------------------------------------------------------------------------------ tied HTT head, low-rank experts

def _layout_of(config):
    """A zero state dict with the layout of ResNetBK(config), read off the key map (no model is built)."""
    from phase1_jax.converters.key_map import model_key_map

    dtypes = {"float": np.float32, "complex64": np.complex64, "int64": np.int64}
    return OrderedDict((m.torch_key, np.zeros(m.torch_shape, dtypes[m.torch_dtype])) for m in model_key_map(config))


def _tiny_phase1_config(**phase1_changes):
    """What the shapes cannot tell at the reference's defaults, so that inference can give back the config."""
    from phase1_jax.config import ModelConfig
    from phase1_jax.phase1_config import Phase1Config

    phase1 = Phase1Config(ar_ssm_max_rank=6, ar_ssm_min_rank=4, ar_ssm_gate_hidden_dim=4, htt_rank=4,
                          ar_ssm_layers=(1,), use_gradient_checkpointing=False, checkpoint_ar_ssm=False)
    return ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_seq=20, num_experts=3, numerics="reference",
                       phase1=phase1.replace(**phase1_changes))


@pytest.mark.parametrize("lm_head", ["dense", "htt_tied"])
@pytest.mark.parametrize("ratio", [None, 0.25, 0.3], ids=["dense_experts", "rank4", "rank5"])
def test_config_inferred_for_every_head_and_expert_layout(lm_head, ratio):
    from phase1_jax.converters.layouts import detect_layout, infer_model_config
    from phase1_jax.models.resnet_bk import expert_rank

    config = _tiny_phase1_config(lm_head=lm_head, expert_rank_ratio=ratio)
    state = _layout_of(config)
    assert ("lm_head.weight" in state) == (lm_head == "dense")
    assert detect_layout(state) == "phase1_jax"
    inferred = infer_model_config(state, "phase1_jax")
    # The ratio is recorded as rank / d_model: 0.25 stays 0.25; 0.3 (rank round(4.8) = 5) becomes 5/16.
    rank = expert_rank(config)
    assert inferred == config.replace(phase1=config.phase1.replace(
        expert_rank_ratio=None if rank is None else rank / 16))
    assert expert_rank(inferred) == rank
    if ratio is not None:  # a ratio given as an option is kept when it gives the stored rank
        assert infer_model_config(state, "phase1_jax", expert_rank_ratio=ratio) == config


def test_low_rank_experts_alone_are_a_phase1_layout():
    from phase1_jax.converters.bridge import model_from_state_dict

    config = _tiny_phase1_config(htt_enabled=False, ar_ssm_enabled=False, ar_ssm_layers=None,
                                 expert_rank_ratio=0.125)
    model = model_from_state_dict(_layout_of(config))
    assert model.config.phase1.expert_rank_ratio == 0.125 and model.blocks[1].bk_layer.moe_ffn.expert_rank == 2


def _mismatch(state, **options):
    from phase1_jax.converters.bridge import model_from_state_dict
    from phase1_jax.converters.state_dict import StateDictMismatchError

    with pytest.raises(StateDictMismatchError) as err:
        model_from_state_dict(state, **options)
    return err.value.problems


def test_a_misshaped_low_rank_factor_is_one_error_naming_it():
    config = _tiny_phase1_config(lm_head="htt_tied", expert_rank_ratio=0.25)
    for key, shape in (("blocks.1.bk_layer.moe_ffn.experts.2.3.b.weight", (16, 5)),
                       # The first factor of all: the rank is the most common one, so only this key is wrong.
                       ("blocks.0.bk_layer.moe_ffn.experts.0.0.a.weight", (5, 16)),
                       ("blocks.0.bk_layer.moe_ffn.experts.1.0.b.weight", (32, 4, 1))):
        state = _layout_of(config)
        expected = state[key].shape
        state[key] = np.zeros(shape, np.float32)
        assert _mismatch(state) == [f"'{key}' has shape {shape}, expected {expected}"]


def test_impossible_ranks_and_ratios_are_refused_by_name():
    config = _tiny_phase1_config(lm_head="htt_tied", expert_rank_ratio=0.25)
    state = _layout_of(config)
    key = "blocks.0.bk_layer.moe_ffn.experts.0.0.a.weight"
    problems = _mismatch(state, expert_rank_ratio=0.3)
    assert problems == [f"expert_rank_ratio 0.3 gives rank 5 at d_model = 16, but '{key}' has rank 4"]
    full = OrderedDict((k, np.zeros((16, v.shape[1]) if k.endswith(".a.weight") else
                                    (v.shape[0], 16) if k.endswith(".b.weight") else v.shape, v.dtype))
                       for k, v in state.items())
    assert _mismatch(full) == [f"'{key}' has rank 16, but low-rank experts need a rank below d_model = 16 "
                               "(expert_rank_ratio < 1)"]
    dense = _layout_of(_tiny_phase1_config())
    assert _mismatch(dense, expert_rank_ratio=0.25) == [
        "expert_rank_ratio 0.25 was given, but the state dict holds dense experts"]
    state["lm_head.bias"] = np.zeros(30, np.float32)  # 30 tokens factor as 6 x 5, the cores hold 7 x 6
    assert _mismatch(state) == [
        "tied head: 'lm_head.bias' has 30 entries (the vocabulary), which needs HTT cores of 6 and 5 rows at "
        "d_model = 16, but 'token_embedding.core1' has 7 and 'token_embedding.core2' 6"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_head_low_rank_export_round_trips(tmp_path, dtype):
    """export -> import -> the same logits bit for bit and the same export, in float32 and bfloat16."""
    import jax
    from flax import nnx

    from phase1_jax.checkpoint import load_checkpoint
    from phase1_jax.converters.bridge import state_dict_from_model
    from phase1_jax.converters.torch_io import numpy_to_tensor
    from phase1_jax.models.resnet_bk import ResNetBK

    config = _tiny_phase1_config(lm_head="htt_tied", expert_rank_ratio=0.3).replace(numerics="native",
                                                                                     param_dtype=dtype)
    model = ResNetBK(config, rngs=nnx.Rngs(4))
    rng = np.random.default_rng(0)
    model.lm_head.bias[...] = jax.numpy.asarray(rng.standard_normal(40), dtype)  # init is zeros: make it count
    state = OrderedDict((k, numpy_to_tensor(v)) for k, v in state_dict_from_model(model).items())
    assert "lm_head.weight" not in state and state["lm_head.bias"].dtype == getattr(torch, dtype)
    torch.save(state, tmp_path / "p1.pt")
    assert _cli("import-torch", tmp_path / "p1.pt", tmp_path / "ckpt", "--numerics", "native",
                "--expert-rank-ratio", "0.3") == 0
    imported_config, _ = load_checkpoint(tmp_path / "ckpt")
    assert imported_config.model == config
    assert _cli("export-torch", tmp_path / "ckpt", tmp_path / "back.pt") == 0
    _assert_identical(state, torch.load(tmp_path / "back.pt", weights_only=True))
    if dtype == "float32":
        ids = rng.integers(0, 40, size=(2, 20))
        np.save(tmp_path / "ids.npy", ids)
        assert _cli("logits", tmp_path / "ckpt", "--ids", tmp_path / "ids.npy", "--out", tmp_path / "l.npy") == 0
        expected = jax.jit(lambda m, x: m(x, inference=True))(model, ids)
        np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), np.asarray(expected))
