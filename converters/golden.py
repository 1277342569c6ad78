"""Golden-case runner: rebuild a reference module from a case folder, run it, write its outputs.

    python -m phase1_jax.converters.golden CASE_DIR OUT_DIR

A case folder (the layout of shared/golden) holds case.json (kind, constructor arguments, input and output
names), state_dict.pt (absent for parameter-free kinds) and input_<name>.npy files. The runner writes
OUT_DIR/<name>.npy for every output that case.json names (OUT_DIR/grads.npz for the baseline's gradients,
keyed by state-dict name, as the cases store them).

Kinds: resnet_bk_language_model, holographic_tt_embedding, adaptive_rank_semiseparable_layer,
bk_stability_monitor. With `--checkpoint DIR` a baseline case runs the model of a phase1-jax checkpoint (for
example one written by `phase1-jax import-torch` from the case's state_dict.pt) instead of state_dict.pt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phase1_jax.errors import CheckpointError, InputValidationError
from phase1_jax.models.common import split_model

from .key_map import key_map
from .state_dict import load_state_into, trees_to_state_dict

Outputs = dict[str, np.ndarray]


def _inputs(case_dir: Path, names: list[str]) -> dict[str, np.ndarray]:
    missing = [n for n in names if not (case_dir / f"input_{n}.npy").is_file()]
    if missing:
        raise InputValidationError(f"{case_dir}: missing input file(s) {[f'input_{n}.npy' for n in missing]}")
    return {n: np.load(case_dir / f"input_{n}.npy", allow_pickle=False) for n in names}


def _state(case_dir: Path):
    from .torch_io import load_state_dict

    return load_state_dict(case_dir / "state_dict.pt")


def run_baseline(case: dict, case_dir: Path, inputs: dict[str, np.ndarray], checkpoint: Path | None = None) -> Outputs:
    from phase1_jax.train import cross_entropy

    from .bridge import model_from_state_dict

    ctor = dict(case.get("constructor", {}))
    if "dropout_p" in ctor:
        ctor["dropout"] = ctor.pop("dropout_p")
    overrides = {k: ctor[k] for k in ("top_k", "dropout", "prime_bump_init", "prime_bump_scale",
                                      "scattering_scale", "scattering_scale_warmup_steps") if k in ctor}
    if checkpoint is not None:
        from phase1_jax.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint)[1]
    else:
        model = model_from_state_dict(_state(case_dir), **overrides)
    for key in ("vocab_size", "d_model", "n_layers", "n_seq", "num_experts"):
        if key in ctor and getattr(model.config, key) != ctor[key]:
            raise InputValidationError(f"{case_dir}: state_dict.pt has {key} = {getattr(model.config, key)}, "
                                       f"case.json says {ctor[key]}")
    ids = jnp.asarray(inputs["ids"], jnp.int32)
    model.check_input_shape(ids)
    graphdef, params, buffers = split_model(model)

    def loss_and_aux(p):
        logits, aux = nnx.merge(graphdef, p, buffers).forward(ids)
        loss = cross_entropy(logits, jnp.asarray(inputs["targets"], jnp.int32)) if "targets" in inputs else 0.0
        return loss, (logits, aux)

    wanted = set(case["outputs"])
    if "grads" in wanted or "loss" in wanted:
        (loss, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss_and_aux, has_aux=True))(params)
    else:
        loss, (logits, aux) = jax.jit(loss_and_aux)(params)
        grads = None
    out: Outputs = {"logits": np.asarray(logits), "loss": np.asarray(loss, np.float32),
                    "bk_features": np.stack([np.asarray(b["bk_features"]) for b in aux["blocks"]])}
    if grads is not None:
        trees = {"params": jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(grads)),
                 "buffers": jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(buffers))}
        # Parameters only (buffers get no gradient). With top_k = 1 the gating network's gradient is exactly 0,
        # as in the reference.
        out["grads"] = dict(trees_to_state_dict(trees, key_map(model).parameter_rows()))
    return out


def run_htt(case: dict, case_dir: Path, inputs: dict[str, np.ndarray]) -> Outputs:
    from phase1_jax.models.htt import HolographicTTEmbedding

    ctor = case["constructor"]
    kwargs = {k: ctor[k] for k in ("rank", "num_cores", "phase_encoding", "init_scale") if k in ctor}
    emb = nnx.eval_shape(lambda: HolographicTTEmbedding(ctor["vocab_size"], ctor["d_model"], **kwargs,
                                                         rngs=nnx.Rngs(0)))
    emb = load_state_into(emb, _state(case_dir), key_map(emb))
    ids = np.asarray(inputs["ids"])
    if ids.min() < 0 or ids.max() >= ctor["vocab_size"]:
        raise InputValidationError(f"{case_dir}: ids outside [0, {ctor['vocab_size']})")
    return {"embeddings": np.asarray(nnx.jit(lambda m, i: m(i))(emb, jnp.asarray(ids, jnp.int32)))}


def run_ar_ssm(case: dict, case_dir: Path, inputs: dict[str, np.ndarray]) -> Outputs:
    from phase1_jax.models.ar_ssm import AdaptiveRankSemiseparableLayer

    ctor = dict(case["constructor"])
    current = ctor.pop("current_max_rank", None)
    kwargs = {k: ctor[k] for k in ("max_rank", "min_rank", "gate_hidden_dim", "l1_regularization") if k in ctor}
    layer = AdaptiveRankSemiseparableLayer(ctor["d_model"], **kwargs, local_conv="centered", rngs=nnx.Rngs(0))
    layer = load_state_into(layer, _state(case_dir), key_map(layer))
    if current is not None:
        layer.set_rank(current)
    y, aux = nnx.jit(lambda m, x: m(x, return_gates=True))(layer, jnp.asarray(inputs["x"], jnp.float32))
    return {"y": np.asarray(y), "gates": np.asarray(aux["gates"]),
            "effective_rank": np.asarray(aux["effective_rank"]), "gate_l1_loss": np.asarray(aux["gate_l1_loss"])}


def run_stability(case: dict, case_dir: Path, inputs: dict[str, np.ndarray]) -> Outputs:
    from phase1_jax.stability import BKStabilityMonitor, StabilityThresholds

    ctor = dict(case["constructor"])
    threshold_fields = {k: ctor.pop(k) for k in list(ctor) if k in StabilityThresholds.__dataclass_fields__}
    monitor = BKStabilityMonitor(StabilityThresholds(**threshold_fields), mode="reference")
    g = (inputs["G_ii_real"] + 1j * inputs["G_ii_imag"]).astype(np.complex64)
    metrics = monitor.check_stability(g, inputs["potential"], ctor.get("epsilon", 1.0), ctor.get("gradient_norm"))
    names = ("det_condition", "eigenvalue_ratio", "gradient_norm", "is_stable", "max_eigenvalue", "min_eigenvalue",
             "schatten_s1", "schatten_s2")
    return {n: np.asarray(getattr(metrics, n)) for n in names}


RUNNERS: dict[str, Callable[[dict, Path, dict], Outputs]] = {
    "resnet_bk_language_model": run_baseline,
    "holographic_tt_embedding": run_htt,
    "adaptive_rank_semiseparable_layer": run_ar_ssm,
    "bk_stability_monitor": run_stability,
}


def run_case(case_dir: str | Path, checkpoint: str | Path | None = None) -> Outputs:
    """Runs one case folder and returns {output name: array} for the outputs case.json names."""
    case_dir = Path(case_dir)
    try:
        case = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputValidationError(f"{case_dir}: cannot read case.json ({err})") from err
    kind = case.get("kind")
    if kind not in RUNNERS:
        raise InputValidationError(f"{case_dir}: kind {kind!r} is not supported; supported: {sorted(RUNNERS)}")
    inputs = _inputs(case_dir, list(case.get("inputs", [])))
    with jax.default_matmul_precision("highest"):
        if checkpoint is not None:
            if kind != "resnet_bk_language_model":
                raise InputValidationError(f"--checkpoint applies to resnet_bk_language_model cases, not {kind}")
            outputs = run_baseline(case, case_dir, inputs, Path(checkpoint))
        else:
            outputs = RUNNERS[kind](case, case_dir, inputs)
    unknown = [n for n in case["outputs"] if n not in outputs]
    if unknown:
        raise InputValidationError(f"{case_dir}: outputs {unknown} are not produced by kind {kind}")
    return {n: outputs[n] for n in case["outputs"]}


def write_outputs(outputs: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, value in outputs.items():
        if isinstance(value, dict):
            path = out_dir / f"{name}.npz"
            np.savez(path, **value)
        else:
            path = out_dir / f"{name}.npy"
            np.save(path, value)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phase1_jax.converters.golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--checkpoint", help="phase1-jax checkpoint to run instead of the case's state_dict.pt")
    args = parser.parse_args(argv)
    try:
        written = write_outputs(run_case(args.case_dir, args.checkpoint), args.out_dir)
    except (ValueError, CheckpointError) as err:  # InputValidationError and converter errors are ValueErrors
        print(f"golden: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
