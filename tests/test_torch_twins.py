"""The PyTorch twins load an exported phase1-jax model strictly and reproduce its logits to 1e-5."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import GOLDEN_DIR
from phase1_jax.config import ModelConfig
from phase1_jax.converters.bridge import state_dict_from_model
from phase1_jax.converters.key_map import model_key_map
from phase1_jax.converters.torch_io import numpy_to_tensor, tensor_to_numpy
from phase1_jax.converters.torch_twins import (
    bidirectional_resolvent_diagonal,
    build_torch_twin,
    causal_resolvent_diagonal,
    reference_resolvent_diagonal,
)
from phase1_jax.kernels.bk_scan import bidirectional_numpy, causal_numpy, reference_mode_forward_numpy
from phase1_jax.models.resnet_bk import ResNetBK
from phase1_jax.phase1_config import Phase1Config

jax.config.update("jax_default_matmul_precision", "highest")
# The LNS case compares the JAX model's plain-matmul logits, which is what its one-time warning is about.
pytestmark = pytest.mark.filterwarnings("ignore:LNSLinear is inference-only")

TINY = dict(vocab_size=40, d_model=16, n_layers=2, n_seq=20, num_experts=3, dropout=0.1)
PHASE1 = Phase1Config(ar_ssm_max_rank=6, ar_ssm_min_rank=2, htt_rank=4, use_gradient_checkpointing=False,
                      checkpoint_ar_ssm=False)
TOLERANCE = 1e-5
BATCH = 3
TORCH_DTYPES = {"float": torch.float32, "complex64": torch.complex64, "int64": torch.int64}

# name -> (config, sequence lengths to compare; reference numerics only take n_seq). Each length is one JAX compile.
CASES = {
    "baseline_reference": (ModelConfig(**TINY, numerics="reference", scattering_scale_warmup_steps=4), (20,)),
    "baseline_native_causal": (ModelConfig(**TINY, numerics="native"), (20, 1)),
    "baseline_native_bidirectional": (ModelConfig(**TINY, numerics="native", bk_direction="bidirectional"),
                                      (20, 2)),
    "top2_routing": (ModelConfig(**TINY, numerics="native", top_k=2), (20,)),
    "dense_routing": (ModelConfig(**TINY, numerics="reference", top_k=3), (20,)),
    "phase1_causal_conv": (ModelConfig(**TINY, phase1=PHASE1), (20, 5)),
    "phase1_htt_positions_centered_conv_block1": (ModelConfig(
        **TINY, phase1=PHASE1.replace(htt_position_embedding=True, ar_ssm_layers=(1,), ar_ssm_local_conv="centered",
                                      lns_enabled=True)), (20,)),
    # d_model 16: rank round(0.25 * 16) = 4; vocab 40 pads the HTT table to 7 x 6, so the tied head drops padding.
    "phase1_tied_head_low_rank_experts": (ModelConfig(
        **TINY, phase1=PHASE1.replace(lm_head="htt_tied", expert_rank_ratio=0.25)), (20, 3)),
    # Low-rank experts alone (no HTT, no AR-SSM), rank round(0.2 * 16) = 3, top-2 routing.
    "low_rank_experts_dense_head": (ModelConfig(
        **TINY, numerics="reference", top_k=2,
        phase1=PHASE1.replace(htt_enabled=False, ar_ssm_enabled=False, expert_rank_ratio=0.2)), (20,)),
    "tied_head_positions_dense_experts": (ModelConfig(
        **TINY, numerics="native", phase1=PHASE1.replace(lm_head="htt_tied", htt_position_embedding=True,
                                                         htt_phase_encoding=False, ar_ssm_layers=(0,))), (20,)),
}


def perturbed_model(config: ModelConfig, seed: int) -> ResNetBK:
    """A model whose every parameter is randomly moved off its init (zero biases, unit LayerNorm scales, ...).

    Reference numerics also get a 5x larger v_proj so the ±3 potential clamp binds, and counters on both sides of
    the scattering warm-up. Native numerics get non-uniform Hamiltonian buffers and z, so the twin's b/c/z
    conventions are checked too.
    """
    model = ResNetBK(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)

    def noisy(x):  # NumPy noise: eager jax.random calls would compile once per parameter shape
        x = np.asarray(x)
        return jnp.asarray(x + 0.2 * rng.standard_normal(x.shape).astype(x.dtype))

    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map(noisy, nnx.to_pure_dict(params)))
    nnx.update(model, params)
    for index, block in enumerate(model.blocks):
        bk = block.bk_layer
        if config.numerics == "reference":
            bk.v_proj.kernel.set_value(jnp.asarray(5.0 * np.asarray(bk.v_proj.kernel[...])))
            bk.moe_ffn.scattering_step_counter.set_value(jnp.asarray(3 * index, jnp.int32))
        else:
            n = config.n_seq
            bk.h0_diag_base.set_value(jnp.asarray(-2.0 + rng.uniform(-0.5, 0.5, (1, n)), jnp.float32))
            bk.h0_sub_base.set_value(jnp.asarray(rng.uniform(0.6, 1.4, (1, n - 1)), jnp.float32))
            bk.h0_super_base.set_value(jnp.asarray(rng.uniform(0.6, 1.4, (1, n - 1)), jnp.float32))
            bk.z.set_value(jnp.asarray(0.3 + 0.8j, jnp.complex64))
    return model


def exported_tensors(model: ResNetBK) -> dict[str, torch.Tensor]:
    return {key: numpy_to_tensor(value) for key, value in state_dict_from_model(model).items()}


# One jitted function for the whole file: models of equal structure and ids of equal shape share a compilation.
_jax_forward = jax.jit(lambda m, x: m(x))


def jax_logits(model: ResNetBK, ids: np.ndarray) -> np.ndarray:
    return np.asarray(_jax_forward(model, jnp.asarray(ids, jnp.int32)))


def twin_logits(twin: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return twin(torch.as_tensor(ids, dtype=torch.int64)).numpy()


def assert_same_layout(twin_state: dict, exported: dict) -> None:
    assert list(twin_state) == list(exported)
    for key, value in exported.items():
        assert twin_state[key].shape == value.shape, key
        assert twin_state[key].dtype == value.dtype, key


@pytest.mark.parametrize("name", list(CASES))
def test_twin_matches_jax_model(name):
    config, lengths = CASES[name]
    model = perturbed_model(config, seed=len(name))
    exported = exported_tensors(model)
    twin = build_torch_twin(config)
    assert_same_layout(twin.state_dict(), exported)
    expected = [(m.torch_key, m.torch_shape, TORCH_DTYPES[m.torch_dtype]) for m in model_key_map(config)]
    assert [(k, tuple(v.shape), v.dtype) for k, v in twin.state_dict().items()] == expected
    twin.load_state_dict(exported, strict=True)
    assert not twin.training

    rng = np.random.default_rng(0)
    for length in lengths:
        ids = rng.integers(0, config.vocab_size, (BATCH, length))
        want, got = jax_logits(model, ids), twin_logits(twin, ids)
        assert got.dtype == np.float32 and got.shape == (BATCH, length, config.vocab_size)
        assert np.abs(got - want).max() <= TOLERANCE, (length, np.abs(got - want).max())

    # Eval mode leaves the state alone: the counters come back as they were exported.
    for key, value in twin.state_dict().items():
        if key.endswith("scattering_step_counter"):
            assert torch.equal(value, exported[key])


@pytest.mark.parametrize("name", list(CASES))
def test_parameter_rows_follow_torch_parameter_order(name):
    """The order a torch optimizer's state is indexed by, and the golden runner's gradient keys."""
    config, _ = CASES[name]
    twin_order = [key for key, _ in build_torch_twin(config).named_parameters()]
    assert twin_order == [m.torch_key for m in model_key_map(config).parameter_rows()]


def test_reference_twin_reproduces_golden_baseline():
    case_dir = GOLDEN_DIR / "baseline_small"
    if not (case_dir / "case.json").is_file():
        pytest.skip(f"golden case not found at {case_dir}")
    constructor = dict(json.loads((case_dir / "case.json").read_text())["constructor"])
    if "dropout_p" in constructor:
        constructor["dropout"] = constructor.pop("dropout_p")
    config = ModelConfig(**constructor, numerics="reference")
    state = torch.load(case_dir / "state_dict.pt", weights_only=True)
    twin = build_torch_twin(config)
    assert_same_layout(twin.state_dict(), state)
    twin.load_state_dict(state, strict=True)
    got = twin_logits(twin, np.load(case_dir / "input_ids.npy"))
    np.testing.assert_allclose(got, np.load(case_dir / "expected_logits.npy"), atol=TOLERANCE, rtol=0)


def test_wrong_lengths_and_bad_ids_raise():
    reference = build_torch_twin(ModelConfig(**TINY, numerics="reference"))
    with pytest.raises(ValueError, match=r"n_seq = 20.*got length 7"):
        reference(torch.zeros(1, 7, dtype=torch.int64))
    native = build_torch_twin(ModelConfig(**TINY, numerics="native"))
    with pytest.raises(ValueError, match=r"n_seq = 20; got 21"):
        native(torch.zeros(1, 21, dtype=torch.int64))
    with pytest.raises(ValueError, match="token ids must lie in"):
        native(torch.full((1, 5), 40, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        native(torch.zeros(5, dtype=torch.int64))


def test_bk_cores_match_numpy_oracles_including_the_overflow_cliff():
    rng = np.random.default_rng(3)
    n = 24
    a = rng.uniform(-5.0, 1.0, (2, n)).astype(np.float32)
    b = rng.uniform(0.5, 1.5, n - 1).astype(np.float32)
    c = rng.uniform(0.5, 1.5, n - 1).astype(np.float32)
    z = 0.2 + 1.0j
    args = (torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c), torch.tensor(z, dtype=torch.complex64))
    for twin_fn, oracle in ((reference_resolvent_diagonal, reference_mode_forward_numpy),
                            (causal_resolvent_diagonal, causal_numpy),
                            (bidirectional_resolvent_diagonal, bidirectional_numpy)):
        got = tensor_to_numpy(twin_fn(*args))
        want = np.asarray(oracle(a, b, c, z))
        want = want[..., 0] + 1j * want[..., 1] if want.ndim == 3 else want
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=twin_fn.__name__)

    # Constant potential v = -3 (diagonal -5): the reference's determinants overflow complex128 from N = 446 on.
    for length, all_zero in ((445, False), (446, True)):
        diagonal = torch.full((1, length), -5.0)
        ones = torch.ones(length - 1)
        g = reference_resolvent_diagonal(diagonal, ones, ones, torch.tensor(1j, dtype=torch.complex64))
        assert bool((g == 0).all()) == all_zero
        assert bool(torch.isfinite(causal_resolvent_diagonal(diagonal, ones, ones, torch.tensor(1j))).all())


def test_ar_ssm_rank_mask_follows_current_max_rank():
    config, _ = CASES["phase1_causal_conv"]
    model = perturbed_model(config, seed=5)
    twin = build_torch_twin(config)
    twin.load_state_dict(exported_tensors(model), strict=True)
    # Same ids shape as in test_twin_matches_jax_model: the rank is traced state, so the compiled model is reused.
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (BATCH, 5))
    full_rank = twin_logits(twin, ids)
    for block in model.blocks:
        block.ar_ssm.set_rank(3)
    for block in twin.blocks:
        block.ar_ssm.current_max_rank = 3
    masked = twin_logits(twin, ids)
    assert np.abs(masked - full_rank).max() > 1e-3
    assert np.abs(masked - jax_logits(model, ids)).max() <= TOLERANCE
