"""Where does our training part from the reference's? Restarts from the reference's saved parameters.

    python tests/trajectory_tool.py CASE_DIR [--optimizer torch_adamw] [--loss-atol 1e-5]
                                             [--grad-norm-rtol 1e-4] [--param-rtol 3e-4]

A case directory (shared/golden_training/<name>/, or one written by `write_case`) holds case.json (the
reference's constructor, optimizer and number of steps), batch_ids.npy / batch_targets.npy (steps, B, N),
expected_losses.npy and expected_grad_norms.npy (per step, before its update) and state_dict_stepNN.pt (the
parameters before update NN; the last one after the final update). case.json's optimizer names
torch.optim.AdamW or Adam with lr, betas, eps, weight_decay, grad_clipping (null or a max norm) and
lr_schedule: "constant" or {"warmup_steps": W, "min_lr_ratio": r} (training.*'s warmup-cosine, as a LambdaLR).

The case is trained with our training step (make_train_step, reference numerics, `--optimizer`, default the
case's own) and the report gives:
* restarts: at every saved step, our loss and gradient norm from the reference's own parameters (the forward
  and the gradient, isolated from the training dynamics);
* the trajectory from step 0: per-step loss and gradient norm, and the parameters at every saved step;
* segments: from the reference's parameters at each saved step to the next one, so that a parting is pinned
  to the steps where it starts instead of being inherited (the cases save no optimizer state: a segment starts
  from our trajectory's optimizer state at that step);
and the first step where loss, gradient norm or parameters part beyond the tolerances (exit code 1 if any).
Parameters are judged per tensor by max |ours - reference| / max |reference| (the report adds the norm ratio
|ours - reference| / |reference|, worst tensor).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phase1_jax.config import ModelConfig, TrainConfig
from phase1_jax.converters import bridge, layouts
from phase1_jax.converters.torch_io import load_state_dict, save_state_dict
from phase1_jax.data import Batch
from phase1_jax.train import GuardState, TrainState, build_model, create_train_state, make_train_step, split_model

OPTIMIZERS = {"torch.optim.AdamW": "torch_adamw", "torch.optim.Adam": "torch_adam"}
# Constructor arguments that the state dict's shapes cannot tell (REFERENCE_SPEC §1.1).
REFERENCE_OPTIONS = ("top_k", "prime_bump_init", "prime_bump_scale", "scattering_scale",
                     "scattering_scale_warmup_steps")


@dataclass(frozen=True)
class Tolerances:
    """Just above what float32 rounding alone gives: Adam amplifies the last-bit differences of gradients near
    zero in single elements, so parameters part at ~1e-4 long before losses do (torch itself, rerun here from
    the golden case's initial state, parts from the golden run by 6e-5)."""

    loss_atol: float = 1e-5
    grad_norm_rtol: float = 1e-4
    param_rtol: float = 3e-4


@dataclass
class Case:
    name: str
    model: ModelConfig
    training: TrainConfig
    ids: np.ndarray  # (steps, B, N)
    targets: np.ndarray
    losses: np.ndarray  # the reference's loss before update s
    grad_norms: np.ndarray
    states: dict[int, dict[str, np.ndarray]]  # the reference's parameters before update NN


def training_config(spec: dict, optimizer: str | None = None) -> TrainConfig:
    opt = spec["optimizer"]
    if opt["name"] not in OPTIMIZERS:
        raise ValueError(f"case.json optimizer.name = {opt['name']!r}: allowed {sorted(OPTIMIZERS)}")
    schedule = opt.get("lr_schedule", "constant")
    if schedule == "constant":
        schedule = {"warmup_steps": 0, "min_lr_ratio": 1.0}
    elif not (isinstance(schedule, dict) and set(schedule) == {"warmup_steps", "min_lr_ratio"}):
        raise ValueError(f"case.json optimizer.lr_schedule = {schedule!r}: allowed 'constant' or "
                         "{'warmup_steps': W, 'min_lr_ratio': r}")
    return TrainConfig(batch_size=spec["batch"], steps=spec["steps"], learning_rate=opt["lr"], beta1=opt["betas"][0],
                       beta2=opt["betas"][1], eps=opt["eps"], weight_decay=opt["weight_decay"],
                       grad_clip_norm=opt.get("grad_clipping"), optimizer=optimizer or OPTIMIZERS[opt["name"]],
                       **schedule)


def load_case(case_dir: str | Path, optimizer: str | None = None) -> Case:
    case_dir = Path(case_dir)
    spec = json.loads((case_dir / "case.json").read_text())
    names = (re.fullmatch(r"state_dict_step(\d+)\.pt", p.name) for p in case_dir.glob("state_dict_step*.pt"))
    states = {int(m.group(1)): load_state_dict(case_dir / m.group(0)) for m in names if m}
    if 0 not in states:
        raise FileNotFoundError(f"{case_dir}: no state_dict_step00.pt to start from")
    ctor = spec["constructor"]
    # The reference trains in eval mode (dropout inactive), as case.json's notes say: dropout 0 here.
    model = layouts.infer_model_config(states[0], layouts.detect_layout(states[0]), dropout=0.0,
                                      **{k: ctor[k] for k in REFERENCE_OPTIONS if k in ctor})
    return Case(name=case_dir.name, model=model, training=training_config(spec, optimizer),
                ids=np.load(case_dir / "batch_ids.npy"), targets=np.load(case_dir / "batch_targets.npy"),
                losses=np.load(case_dir / "expected_losses.npy"),
                grad_norms=np.load(case_dir / "expected_grad_norms.npy"), states=dict(sorted(states.items())))


def write_case(case_dir: str | Path, spec: dict, ids, targets, losses, grad_norms, states) -> Path:
    """Writes a case in the golden layout (spec is case.json's content)."""
    case_dir = Path(case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / "case.json").write_text(json.dumps(spec, indent=2))
    for name, array in (("batch_ids", ids), ("batch_targets", targets), ("expected_losses", losses),
                        ("expected_grad_norms", grad_norms)):
        np.save(case_dir / f"{name}.npy", np.asarray(array))
    for step, state in states.items():
        save_state_dict(state, case_dir / f"state_dict_step{step:02d}.pt")
    return case_dir


@dataclass
class Track:
    """Our losses and gradient norms over steps [start, stop), parameters (per tensor error) at saved steps."""

    start: int
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    params: dict[int, tuple[float, str, float]] = field(default_factory=dict)  # step -> param_error(...)


def param_error(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[float, str, float]:
    """(max over tensors of max |ours - ref| / max |ref|, that tensor's key, max over tensors of the norm ratio
    |ours - ref| / |ref|): the first is what the tolerance judges, the second a tensor-wide view."""
    floats = [(k, ours[k].astype(np.float64), ref) for k, ref in reference.items()
              if ref.dtype.kind == "f" and ref.any()]
    worst = max((float(np.abs(a - r).max() / np.abs(r).max()), k) for k, a, r in floats)
    norm = max(float(np.linalg.norm(a - r) / np.linalg.norm(r)) for _, a, r in floats)
    return worst[0], worst[1], norm


class Trainer:
    """Our training step for one model and training configuration, compiled once (see `trainer`)."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, layout: str):
        self.model_cfg, self.train_cfg, self.layout = model_cfg, train_cfg, layout
        self.graphdef, initial, optimizer = create_train_state(build_model(model_cfg), train_cfg)
        self.fresh_opt_state = jax.device_get(initial.opt_state)
        self.step_fn = make_train_step(self.graphdef, optimizer, model_cfg, train_cfg)

    def export(self, state: TrainState) -> dict[str, np.ndarray]:
        return bridge.state_dict_from_model(nnx.merge(self.graphdef, state.params, state.buffers), self.layout)

    def start(self, state_dict, opt_state, step: int) -> TrainState:
        _, params, buffers = split_model(bridge.model_from_state_dict(state_dict, self.model_cfg, layout=self.layout))
        return TrainState(step=jnp.asarray(step, jnp.int32), params=params, buffers=buffers,
                          opt_state=jax.tree.map(jnp.asarray, opt_state), rng=jax.random.key(self.train_cfg.seed),
                          guard=GuardState.create(self.train_cfg.spike_window))

    def run(self, case: Case, state: TrainState, start: int, stop: int, opt_states: dict | None = None) -> Track:
        """Steps start..stop-1; `opt_states` collects host copies of the optimizer state at saved steps."""
        track = Track(start)
        for s in range(start, stop + 1):
            if s in case.states:
                if s > start:
                    track.params[s] = param_error(self.export(state), case.states[s])
                if opt_states is not None:
                    opt_states[s] = jax.device_get(state.opt_state)  # the step donates its input
            if s == stop:
                return track
            batch = Batch(inputs=jnp.asarray(case.ids[s], jnp.int32), targets=jnp.asarray(case.targets[s], jnp.int32))
            state, metrics = self.step_fn(state, batch)
            track.losses.append(float(metrics["loss"]))
            track.grad_norms.append(float(metrics["grad_norm"]))


@functools.cache
def trainer(model_cfg: ModelConfig, train_cfg: TrainConfig, layout: str) -> Trainer:
    """One compilation per configuration and process: cases that share one reuse it."""
    return Trainer(model_cfg, train_cfg, layout)


@dataclass
class Report:
    case: Case
    tolerances: Tolerances
    trajectory: Track
    segments: list[Track]

    def loss_errors(self, track: Track) -> np.ndarray:
        return np.abs(np.asarray(track.losses) - self.case.losses[track.start:track.start + len(track.losses)])

    def grad_norm_errors(self, track: Track) -> np.ndarray:
        ref = self.case.grad_norms[track.start:track.start + len(track.grad_norms)]
        return np.abs(np.asarray(track.grad_norms) - ref) / ref

    def parting(self, track: Track) -> tuple[int, str] | None:
        """(step, what) of the first quantity beyond its tolerance on this track."""
        tol = self.tolerances
        found = []
        for what, errors, limit in (("loss", self.loss_errors(track), tol.loss_atol),
                                    ("grad norm", self.grad_norm_errors(track), tol.grad_norm_rtol)):
            over = np.flatnonzero(errors > limit)
            if over.size:
                s = int(over[0])
                found.append((track.start + s, f"{what} {errors[s]:.1e} > {limit:.0e}"))
        found += [(step, f"parameters {err:.1e} > {tol.param_rtol:.0e} ({key})")
                  for step, (err, key, _) in track.params.items() if err > tol.param_rtol]
        return min(found) if found else None

    def first_parting(self) -> tuple[int, str, str] | None:
        """(step, track name, what); the trajectory first when a segment parts at the same step."""
        found = [(p[0], order, name, p[1]) for order, (name, track) in enumerate(self.named_tracks())
                 if (p := self.parting(track))]
        if not found:
            return None
        step, _, name, what = min(found)
        return step, name, what

    def named_tracks(self):
        yield "trajectory", self.trajectory
        for seg in self.segments:
            yield f"segment from {seg.start}", seg

    def format(self) -> str:
        case, tol, traj = self.case, self.tolerances, self.trajectory
        saved = sorted(case.states)
        lines = [f"case {case.name}: {case.training.steps} steps of {case.training.optimizer}, saved steps "
                 f"{' '.join(str(s) for s in saved)}",
                 f"tolerances: loss {tol.loss_atol:.0e} abs, grad norm {tol.grad_norm_rtol:.0e} rel, parameters "
                 f"{tol.param_rtol:.0e} rel (per tensor max|ours - ref| / max|ref|)",
                 "restarts from the reference's parameters:   loss |ours - ref|   grad norm rel"]
        for seg in self.segments:
            loss, grad_norm = self.loss_errors(seg)[0], self.grad_norm_errors(seg)[0]
            lines.append(f"  step {seg.start:3d}   {loss:20.1e}   {grad_norm:13.1e}")
        for title, tracks in (("trajectory from step 0", self._windows(traj, saved)),
                              ("segments from the reference's parameters", self.segments)):
            lines.append(f"{title}:   max loss |ours - ref|, max grad norm rel; parameters at the end")
            for track in tracks:
                end = track.start + len(track.losses)
                err, key, norm = track.params.get(end, (np.nan, "-", np.nan))
                lines.append(f"  steps {track.start:3d}-{end - 1:3d}   loss {self.loss_errors(track).max():.1e}   "
                             f"grad norm {self.grad_norm_errors(track).max():.1e}   params@{end} {err:.1e} {key} "
                             f"(norm {norm:.1e})")
        first = self.first_parting()
        lines.append("no parting beyond the tolerances" if first is None else
                     f"first parting: step {first[0]} ({first[1]}): {first[2]}")
        return "\n".join(lines)

    def _windows(self, track: Track, saved: list[int]) -> list[Track]:
        """The trajectory cut at the saved steps, for a per-window summary."""
        out = []
        for a, b in zip(saved, saved[1:]):
            window = Track(a, track.losses[a:b], track.grad_norms[a:b])
            if b in track.params:
                window.params[b] = track.params[b]
            out.append(window)
        return out


def compare(case: Case, tolerances: Tolerances = Tolerances()) -> Report:
    run = trainer(case.model, case.training, layouts.detect_layout(case.states[0]))
    saved = sorted(case.states)
    opt_states: dict[int, object] = {}
    trajectory = run.run(case, run.start(case.states[0], run.fresh_opt_state, 0), 0, case.training.steps, opt_states)
    segments = [run.run(case, run.start(case.states[a], opt_states[a], a), a, b) for a, b in zip(saved, saved[1:])]
    return Report(case, tolerances, trajectory, segments)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case_dir")
    parser.add_argument("--optimizer", choices=("torch_adamw", "torch_adam", "adamw"),
                        help="our optimizer (default: the one the case names)")
    parser.add_argument("--loss-atol", type=float, default=Tolerances.loss_atol)
    parser.add_argument("--grad-norm-rtol", type=float, default=Tolerances.grad_norm_rtol)
    parser.add_argument("--param-rtol", type=float, default=Tolerances.param_rtol)
    args = parser.parse_args(argv)
    report = compare(load_case(args.case_dir, args.optimizer),
                     Tolerances(args.loss_atol, args.grad_norm_rtol, args.param_rtol))
    print(report.format())
    return 0 if report.first_parting() is None else 1


if __name__ == "__main__":
    sys.exit(main())
