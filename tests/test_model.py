import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phase1_jax.config import ModelConfig
from phase1_jax.errors import InputValidationError
from phase1_jax.models.resnet_bk import ResNetBK, primes_below
from phase1_jax.train import cross_entropy, split_model

SMALL = dict(vocab_size=50, d_model=16, n_layers=2, n_seq=24, num_experts=4, dropout=0.0)


def make(seed=0, **kw):
    return ResNetBK(ModelConfig(**{**SMALL, **kw}), rngs=nnx.Rngs(seed))


def test_reference_state_layout_and_param_count():
    # The reference's parameter count formula (REFERENCE_SPEC §1.3) for V=1000, D=64, L=2, N=32, E=4.
    model = ResNetBK(ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_seq=32, numerics="reference"),
                     rngs=nnx.Rngs(0))
    _, params, buffers = split_model(model)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 265_076
    flat = nnx.to_pure_dict(buffers)["blocks"][0]["bk_layer"]
    assert flat["z"].dtype == jnp.complex64 and complex(flat["z"]) == 1j
    assert np.all(np.asarray(flat["h0_diag_base"]) == -2.0) and flat["h0_sub_base"].shape == (1, 31)


def test_init_scheme_matches_reference():
    model = ResNetBK(ModelConfig(vocab_size=2000, d_model=64, n_layers=1, n_seq=32, prime_bump_init=True,
                                 prime_bump_scale=0.02), rngs=nnx.Rngs(0))
    tok = np.asarray(model.token_embedding.embedding[...])
    assert abs(tok.std() - 0.02) < 1e-3 and abs(tok.mean()) < 1e-3
    pos = np.asarray(model.position_embedding.embedding[...])
    primes = primes_below(32)
    assert primes == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31]
    others = [i for i in range(32) if i not in primes]
    assert abs(pos[primes].mean() - 0.02) < 4e-3 and abs(pos[others].mean()) < 4e-3
    head = np.asarray(model.lm_head.kernel[...])
    bound = np.sqrt(6.0 / (64 + 2000))  # xavier-uniform
    assert head.max() <= bound and head.min() >= -bound and head.max() > 0.95 * bound
    assert not np.any(np.asarray(model.lm_head.bias[...]))
    assert float(model.blocks[0].bk_layer.bk_scale[...]) == 1.0


@pytest.mark.parametrize("direction", ["causal"])
def test_native_is_causal_bit_for_bit(direction):
    model = make(bk_direction=direction)
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, 50)
    f = jax.jit(lambda m, x: m(x))
    base = np.asarray(f(model, ids))
    for t in (0, 7, 23):
        changed = ids.at[:, t].set((ids[:, t] + 1) % 50)
        out = np.asarray(f(model, changed))
        assert np.array_equal(out[:, :t], base[:, :t]), f"position < {t} changed"
        assert not np.array_equal(out[:, t], base[:, t])


def test_bidirectional_sees_the_future():
    model = make(bk_direction="bidirectional")
    ids = jax.random.randint(jax.random.key(1), (1, 24), 0, 50)
    base = np.asarray(model(ids))
    out = np.asarray(model(ids.at[:, 20].set((ids[:, 20] + 1) % 50)))
    assert not np.array_equal(out[:, :20], base[:, :20])


def test_reference_mode_is_not_causal_like_the_reference():
    model = make(numerics="reference")
    ids = jax.random.randint(jax.random.key(1), (1, 24), 0, 50)
    base = np.asarray(model(ids))
    out = np.asarray(model(ids.at[:, 20].set((ids[:, 20] + 1) % 50)))
    assert not np.array_equal(out[:, :20], base[:, :20])


def test_length_rules():
    native, reference = make(), make(numerics="reference")
    assert native(jnp.zeros((1, 5), jnp.int32)).shape == (1, 5, 50)
    assert native(jnp.zeros((1, 1), jnp.int32)).shape == (1, 1, 50)
    with pytest.raises(InputValidationError, match=r"exactly n_seq = 24.*got length 5"):
        reference(jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(InputValidationError, match="between 1 and n_seq = 24; got 25"):
        native(jnp.zeros((1, 25), jnp.int32))
    with pytest.raises(InputValidationError, match="shape"):
        native(jnp.zeros((5,), jnp.int32))


def test_native_finite_at_65536_tokens():
    model = ResNetBK(ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_seq=65_536, dropout=0.0),
                     rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (1, 65_536), 0, 16)
    logits, aux = jax.jit(lambda m, x: m.forward(x))(model, ids)
    feats = np.asarray(aux["blocks"][0]["bk_features"])
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(feats).all()
    assert np.abs(feats).max() <= 1.0 + 1e-6 and np.abs(feats[..., 1]).min() > 0  # |G| <= 1, Im G > 0


def _loss_and_grads(model, ids):
    graphdef, params, buffers = split_model(model)

    def loss(p):
        return cross_entropy(nnx.merge(graphdef, p, buffers)(ids[:, :-1]), ids[:, 1:])

    return jax.value_and_grad(loss)(params)


def test_top1_gating_gets_zero_gradient_and_dense_routing_trains_it():
    ids = jax.random.randint(jax.random.key(2), (2, 25), 0, 50)
    _, grads = _loss_and_grads(make(top_k=1), ids)
    gating = grads["blocks"][0]["bk_layer"]["moe_ffn"]["gating_network"]
    assert not np.any(np.asarray(gating["kernel"][...]))
    _, grads = _loss_and_grads(make(top_k=4), ids)
    gating = grads["blocks"][0]["bk_layer"]["moe_ffn"]["gating_network"]
    assert np.abs(np.asarray(gating["kernel"][...])).max() > 0


def test_moe_dense_and_top2_mix_expected_experts():
    model = make(top_k=2, num_experts=3)
    moe = model.blocks[0].bk_layer.moe_ffn
    x = jax.random.normal(jax.random.key(3), (1, 4, 16))
    y, _ = moe(x)
    logits = np.asarray(moe.gating_network(x[0]))
    w1, b1, w2, b2 = (np.asarray(moe.w1[...]), np.asarray(moe.b1[...]), np.asarray(moe.w2[...]),
                      np.asarray(moe.b2[...]))
    for t in range(4):
        top = np.argsort(-logits[t])[:2]
        w = np.exp(logits[t, top] - logits[t, top].max())
        w /= w.sum()
        expect = sum(w[j] * (np.maximum(np.asarray(x[0, t]) @ w1[e] + b1[e], 0) @ w2[e] + b2[e])
                     for j, e in enumerate(top))
        np.testing.assert_allclose(np.asarray(y[0, t]), expect, rtol=1e-5, atol=1e-6)


def test_native_gradients_match_finite_differences():
    """Exact gradients in native mode: directional derivatives of the loss vs central differences."""
    # Dense routing: top-k selection is piecewise constant, so finite differences across a switch are meaningless.
    model = make(n_layers=1, d_model=8, n_seq=12, top_k=4)
    ids = jax.random.randint(jax.random.key(4), (2, 13), 0, 50)
    graphdef, params, buffers = split_model(model)
    pure = nnx.to_pure_dict(params)
    # Amplify the potential so the BK branch matters, keeping it inside the +-3 clamp (a kink).
    bk = pure["blocks"][0]["bk_layer"]
    bk["v_proj"]["kernel"] = bk["v_proj"]["kernel"] * 1.5

    def loss(tree):
        state = jax.tree_util.tree_map(lambda x: x, params)
        nnx.replace_by_pure_dict(state, tree)
        return cross_entropy(nnx.merge(graphdef, state, buffers)(ids[:, :-1]), ids[:, 1:])

    grads = jax.jit(jax.grad(loss))(pure)
    keys = iter(jax.random.split(jax.random.key(5), 64))
    # Each leaf moves relative to its own scale (embeddings are ~0.02, matrices ~0.3): a 1% step stays linear.
    direction = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape) * (jnp.std(x) + 1e-2),
                                       pure)
    # The whole model, then the BK potential path alone (where the reference's heuristic gradient would be off).
    only_v = jax.tree_util.tree_map(jnp.zeros_like, pure)
    only_v["blocks"][0]["bk_layer"]["v_proj"]["kernel"] = direction["blocks"][0]["bk_layer"]["v_proj"]["kernel"]
    for d, eps in ((direction, 1e-2), (only_v, 1e-2)):
        analytic = sum(jnp.vdot(g, x) for g, x in zip(jax.tree_util.tree_leaves(grads),
                                                      jax.tree_util.tree_leaves(d)))
        plus = jax.tree_util.tree_map(lambda p, x: p + eps * x, pure, d)
        minus = jax.tree_util.tree_map(lambda p, x: p - eps * x, pure, d)
        numeric = (loss(plus) - loss(minus)) / (2 * eps)
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2, atol=1e-4)
