"""The host side of training: the loop around the pure step, and everything that keeps a run from losing work.

    trainer = Trainer(config, run_dir, data, state=..., resume=False)
    result = trainer.run()

What lives here (all outside `jit`; the step itself is `phase1_jax.train.make_train_step`):

* **Whole-state checkpoints** every `training.checkpoint_every` steps and/or `checkpoint_every_minutes`, written
  in the background (`checkpoint.TrainCheckpoints`), once more at the end and on SIGTERM/SIGINT.
* **Recovery.** The step skips non-finite and spiking updates itself; the loop watches how many were skipped in
  a row and, after `max_consecutive_skips`, restores the last checkpoint saved while training was healthy,
  multiplies the learning rate by `recovery_lr_factor`, marks the offending batches to be skipped, and goes on;
  after `max_restores` restorations it gives up with `NumericalInstabilityError`. Out of device memory
  (`RESOURCE_EXHAUSTED`), it rebuilds the step with per-block rematerialisation, then with gradient accumulation
  over more micro-batches (the same effective batch), and carries on from the same step.
* **The memory plan.** For Phase 1 models, before the first step the compiled step's memory analysis is held
  against the preset's `target_vram_gb`; rematerialisation and micro-batching are added until the estimate fits.
* **Events and logs.** Every skip, spike, restore, learning-rate cut and plan change goes to `metrics.jsonl`
  (`"event": ...` records) and stderr; scalars also to TensorBoard event files (tensorboardX), with the model
  FLOPs utilisation where the device's peak rate is known.
* **Fault injection** (`train --inject-fault KIND@STEP`, a testing aid): `nan-loss`, `inf-grad` (inside the jitted
  step), `oom` (a simulated RESOURCE_EXHAUSTED before the step is dispatched) and `kill` (SIGKILL).

Steps are numbered from 1 in logs, checkpoints and fault specs: step N is the N-th update.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .checkpoint import TrainCheckpoints
from .config import RunConfig
from .data import Batch
from .errors import InvalidConfigError, NumericalInstabilityError, VRAMExhaustedError
from .train import (
    FAULT_INF_GRAD,
    FAULT_NAN_LOSS,
    FAULT_NONE,
    LoopResult,
    TrainState,
    evaluate,
    make_eval_step,
    make_optimizer,
    make_train_step,
    rank_for_step,
    set_ar_ssm_rank,
)

FAULT_KINDS = ("nan-loss", "inf-grad", "oom", "kill")
_IN_STEP_FAULTS = {"nan-loss": FAULT_NAN_LOSS, "inf-grad": FAULT_INF_GRAD}
GIB = 1024 ** 3

# Dense bf16 matrix rates (FLOP/s) by device name, for the model FLOPs utilisation; datasheet figures.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12, "RTX 3080": 59.5e12}


class SimulatedOOM(RuntimeError):
    """What `--inject-fault oom@N` raises in place of XLA's out-of-memory error."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT arrived; a checkpoint was written first. `exit_code` is what the process should return."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def parse_faults(specs: list[str]) -> dict[int, list[str]]:
    """["nan-loss@12", "kill@30"] -> {12: ["nan-loss"], 30: ["kill"]}; one-line errors for anything else."""
    faults: dict[int, list[str]] = {}
    for spec in specs:
        kind, _, step = spec.partition("@")
        if kind not in FAULT_KINDS or not step.isdigit() or int(step) < 1:
            raise InvalidConfigError("--inject-fault", spec, f"KIND@STEP with KIND one of {', '.join(FAULT_KINDS)} "
                                                           f"and STEP an integer >= 1")
        faults.setdefault(int(step), []).append(kind)
    return faults


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, SimulatedOOM) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


@dataclasses.dataclass
class MemoryPlan:
    """How a step trades compute for memory: per-block rematerialisation and gradient-accumulation slices."""

    remat: str = "model"
    micro_batches: int = 1

    def escalate(self, batch_size: int) -> "MemoryPlan | None":
        """The next plan that uses less memory, or None: remat first, then twice the micro-batches."""
        if self.remat != "blocks":
            return MemoryPlan("blocks", self.micro_batches)
        if batch_size % (2 * self.micro_batches) == 0:
            return MemoryPlan(self.remat, 2 * self.micro_batches)
        return None


@dataclasses.dataclass
class HostState:
    """What the loop keeps besides the TrainState; saved in every checkpoint's meta so resumes are exact."""

    data_index: int = 0  # the next batch index to read (ahead of the step once batches were skipped)
    bad_batches: list[int] = dataclasses.field(default_factory=list)
    lr_scale: float = 1.0
    restores: int = 0
    plan: MemoryPlan = dataclasses.field(default_factory=MemoryPlan)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HostState":
        return cls(data_index=d["data_index"], bad_batches=list(d["bad_batches"]), lr_scale=d["lr_scale"],
                   restores=d["restores"], plan=MemoryPlan(**d["plan"]))


@dataclasses.dataclass
class TrainData:
    batch_at: Callable[[int], Batch]
    val_batches: list[Batch]
    tokenizer_record: dict[str, Any]


class Trainer:
    """Runs `config.training.steps` steps of a run in `run_dir` (see the module docstring)."""

    def __init__(self, config: RunConfig, run_dir: str | Path, data: TrainData, graphdef, state: TrainState, *,
                 host: HostState | None = None, faults: dict[int, list[str]] | None = None,
                 progress: Callable[[int, dict], None] | None = None, log: Callable[[str], None] | None = None,
                 metrics_mode: str = "w"):
        self.config, self.run_dir, self.data = config, Path(run_dir), data
        self.model_cfg, self.train_cfg = config.model, config.training
        self.graphdef, self.state = graphdef, state
        # The restore target: shapes and structure only (the live state's buffers may have been donated).
        self._abstract_state = jax.eval_shape(lambda s: s, state)
        self.host = host or HostState(plan=MemoryPlan(self.train_cfg.remat, self.train_cfg.micro_batches))
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.progress = progress
        self.log = log or (lambda message: print(f"phase1-jax train: {message}", file=sys.stderr, flush=True))
        self.checkpoints = TrainCheckpoints(self.run_dir, keep=self.train_cfg.keep_checkpoints, create=True)
        self.metrics_file = (self.run_dir / "metrics.jsonl").open(metrics_mode, encoding="utf-8")
        self.tensorboard = self._tensorboard() if self.train_cfg.tensorboard else None
        self.eval_step = make_eval_step(graphdef)
        self.history: list[dict[str, Any]] = []
        self._interrupt: int | None = None
        self._flops_per_step: float | None = None

    # ------------------------------------------------------------------------------------------ plumbing

    def _tensorboard(self):
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _write(self, record: dict[str, Any]) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def event(self, kind: str, step: int, message: str, **details) -> None:
        """A recovery or planning event: one metrics.jsonl record, one stderr line, one TensorBoard text."""
        self._write({"event": kind, "step": step, "message": message, **details})
        self.log(f"[{kind}] step {step}: {message}")
        if self.tensorboard is not None:
            self.tensorboard.add_text(f"events/{kind}", message, step)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._interrupt = signum

    def _build_step(self):
        """The jitted step for the current plan and learning-rate scale (compiled on first use)."""
        train_cfg = dataclasses.replace(self.train_cfg, remat=self.host.plan.remat,
                                        micro_batches=self.host.plan.micro_batches,
                                        learning_rate=self.train_cfg.learning_rate * self.host.lr_scale)
        optimizer = make_optimizer(train_cfg)
        return make_train_step(self.graphdef, optimizer, self.model_cfg, train_cfg)

    def _compile(self, step_fn, batch: Batch):
        compiled = step_fn.lower(self.state, batch, jnp.int32(FAULT_NONE)).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        self._flops_per_step = (cost or {}).get("flops")
        return compiled

    def _peak_bytes(self, compiled) -> int | None:
        mem = compiled.memory_analysis()
        if mem is None:
            return None
        return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes)

    def _plan_memory(self, batch: Batch):
        """Before the first step: add remat / micro-batches until the compiled step fits target_vram_gb."""
        p1 = self.model_cfg.phase1
        compiled = self._compile(self._build_step(), batch)
        if p1 is None or p1.target_vram_gb is None:
            return compiled
        target = p1.target_vram_gb * GIB
        peak = self._peak_bytes(compiled)
        start = dataclasses.replace(self.host.plan)
        while peak is not None and peak > target:
            nxt = self.host.plan.escalate(self.train_cfg.batch_size)
            if nxt is None:
                self.event("memory_plan", 0, f"even {self._plan_text()} needs an estimated {peak / GIB:.2f} GiB, "
                                             f"over target_vram_gb = {p1.target_vram_gb:g}; training with it anyway",
                           estimated_peak_bytes=peak, target_bytes=int(target))
                return compiled
            self.host.plan = nxt
            compiled = self._compile(self._build_step(), batch)
            peak = self._peak_bytes(compiled)
        if self.host.plan != start:
            self.event("memory_plan", 0, f"{self._plan_text()}: estimated peak {peak / GIB:.2f} GiB fits "
                                         f"target_vram_gb = {p1.target_vram_gb:g}", plan=dataclasses.asdict(self.host.plan),
                       estimated_peak_bytes=peak, target_bytes=int(target))
        return compiled

    def _plan_text(self) -> str:
        plan = self.host.plan
        return f"remat {plan.remat}, {plan.micro_batches} micro-batch(es) of {self.train_cfg.batch_size // plan.micro_batches}"

    def _next_batch(self) -> tuple[int, Batch]:
        while self.host.data_index in self.host.bad_batches:
            self.host.data_index += 1
        index = self.host.data_index
        self.host.data_index += 1
        return index, self.data.batch_at(index)

    def _meta(self) -> dict[str, Any]:
        return {"host": self.host.to_dict(), "config": self.config.to_dict(), "tokenizer": self.data.tokenizer_record}

    def _save(self, step: int, wait: bool = False) -> None:
        self.checkpoints.save(step, self.state, self._meta())
        if wait:
            self.checkpoints.wait()

    def _restore_last_good(self, reason: str, step: int) -> int:
        """Restore the newest checkpoint (all are saved while healthy); returns the step to go on from."""
        self.checkpoints.wait()
        if not self.checkpoints.steps():
            raise NumericalInstabilityError("training", {"step": step, "reason": reason,
                                                         "restore": "no checkpoint to restore yet"})
        restored_step, self.state, meta, notes = self.checkpoints.restore_latest(self._abstract_state)
        for note in notes:
            self.event("checkpoint_unreadable", step, note)
        host = HostState.from_dict(meta["host"])
        # Keep what the failure taught us: the plan, the LR scale, the bad batches and the restore count.
        host.plan, host.lr_scale = self.host.plan, self.host.lr_scale
        host.bad_batches = sorted(set(host.bad_batches) | set(self.host.bad_batches))
        host.restores = self.host.restores
        self.host = host
        return restored_step

    # ------------------------------------------------------------------------------------------ recovery

    def _recover_from_skips(self, step: int, consecutive: int, bad: list[int]) -> int:
        self.host.restores += 1
        if self.host.restores > self.train_cfg.max_restores:
            raise NumericalInstabilityError("training", {
                "step": step, "consecutive_skipped_steps": consecutive, "restores": self.host.restores - 1,
                "advice": "lower training.learning_rate, check the data, or raise training.max_restores"})
        self.host.bad_batches = sorted(set(self.host.bad_batches) | set(bad))
        old_scale = self.host.lr_scale
        self.host.lr_scale *= self.train_cfg.recovery_lr_factor
        restored = self._restore_last_good(f"{consecutive} consecutive skipped steps", step)
        self.event("restore", step, f"{consecutive} steps in a row were skipped: restored the checkpoint of step "
                                    f"{restored}; batches {bad} will be skipped", restored_step=restored,
                   bad_batches=bad, restores=self.host.restores)
        self.event("lr_cut", step, f"learning rate scale {old_scale:g} -> {self.host.lr_scale:g}",
                   lr_scale=self.host.lr_scale)
        return restored

    def _recover_from_oom(self, step: int, err: BaseException) -> int:
        """Escalates the plan; returns the number of steps done from which to go on (step - 1 unless the donated
        state was lost, then the restored checkpoint's)."""
        nxt = self.host.plan.escalate(self.train_cfg.batch_size)
        if nxt is None:
            stats = jax.devices()[0].memory_stats() or {}
            raise VRAMExhaustedError(stats.get("peak_bytes_in_use", 0) / 2 ** 20, stats.get("bytes_limit", 0) / 2 ** 20,
                                     [f"even {self._plan_text()} ran out of device memory at step {step}: "
                                      f"{str(err).splitlines()[0][:300]}",
                                      "lower training.batch_size or model.n_seq, or use a larger device"])
        old = self._plan_text()
        self.host.plan = nxt
        self.event("memory_plan", step, f"out of device memory ({str(err).splitlines()[0][:120]}): {old} -> "
                                        f"{self._plan_text()}, same effective batch",
                   plan=dataclasses.asdict(nxt))
        leaves = jax.tree.leaves(self.state)
        if any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            # The failed call had already taken the donated state: go back to the last checkpoint.
            return self._restore_last_good("out of memory after the state was donated", step)
        return step - 1

    # ------------------------------------------------------------------------------------------------ loop

    def run(self) -> LoopResult:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.checkpoints.close()
            self.metrics_file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _run(self) -> LoopResult:
        cfg, p1 = self.train_cfg, self.model_cfg.phase1
        use_curriculum = p1 is not None and p1.ar_ssm_enabled
        step = int(jax.device_get(self.state.step))
        first_batch = self.data.batch_at(self.host.data_index)
        step_fn = self._plan_memory(first_batch) if step == 0 else self._compile(self._build_step(), first_batch)
        tokens_per_step = first_batch.inputs.size
        pending: list[tuple] = []  # (step, data index, (skipped, loss, grad_norm)) not yet looked at
        streak: list[int] = []  # data indices of the current run of skipped steps
        val_loss = None
        last_time, last_step, last_save = time.perf_counter(), step, time.perf_counter()
        while step < cfg.steps:
            if self._interrupt is not None:
                self._save(step, wait=True)
                name = signal.Signals(self._interrupt).name
                raise TrainingInterrupted(f"{name} at step {step}: checkpoint written; continue with "
                                          f"`phase1-jax train --resume {self.run_dir}`", 128 + self._interrupt)
            number = step + 1
            kinds = self.faults.pop(number, [])
            if "kill" in kinds:
                self.metrics_file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            index, batch = self._next_batch()
            if use_curriculum:
                rank = rank_for_step(step, p1.ar_ssm_min_rank, p1.ar_ssm_max_rank, p1.ar_ssm_rank_warmup_steps)
                self.state = self.state.replace(buffers=set_ar_ssm_rank(self.state.buffers, rank))
            fault = jnp.int32(next((_IN_STEP_FAULTS[k] for k in kinds if k in _IN_STEP_FAULTS), FAULT_NONE))
            try:
                if "oom" in kinds:
                    raise SimulatedOOM(f"RESOURCE_EXHAUSTED: injected out-of-memory at step {number}")
                self.state, metrics = step_fn(self.state, batch, fault)
            except Exception as err:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raised
                if not is_out_of_memory(err):
                    raise
                self.host.data_index = index  # this batch was not consumed
                step = self._recover_from_oom(number, err)
                step_fn = self._compile(self._build_step(), batch)
                continue
            step = number
            pending.append((number, index, (metrics["skipped"], metrics["loss"], metrics["grad_norm"])))
            log_now = number % cfg.log_every == 0 or number == cfg.steps or number % cfg.eval_every == 0
            if number % cfg.max_consecutive_skips == 0 or log_now:
                # One host transfer for the skip flags of every step since the last look.
                flags = jax.device_get([flag for _, _, flag in pending])
                for (n, i, _), (flag, loss, grad_norm) in zip(pending, flags):
                    if flag:
                        streak.append(i)
                        loss, grad_norm = float(loss), float(grad_norm)
                        why = ("non-finite loss" if not math.isfinite(loss) else
                               "non-finite gradients" if not math.isfinite(grad_norm) else "loss spike")
                        self.event("skip", n, f"update skipped: {why} (loss {loss:.4g}, gradient norm "
                                              f"{grad_norm:.4g})", reason=why.replace(" ", "_"), loss=loss,
                                   grad_norm=grad_norm, consecutive=len(streak))
                    else:
                        streak = []
                pending = []
                if len(streak) >= cfg.max_consecutive_skips:
                    step = self._recover_from_skips(number, len(streak), streak)
                    streak = []
                    step_fn = self._compile(self._build_step(), batch)
                    continue
            if log_now:
                record = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                record["tokens_per_sec"] = tokens_per_step * (number - last_step) / max(now - last_time, 1e-9)
                if self._flops_per_step:
                    record["model_flops_per_step"] = self._flops_per_step
                    peak = self._peak_flops()
                    if peak:
                        record["mfu"] = self._flops_per_step * record["tokens_per_sec"] / tokens_per_step / peak
                last_time, last_step = now, number
                record["step"] = number
                if number % cfg.eval_every == 0 or number == cfg.steps:
                    val_loss = evaluate(self.eval_step, self.state.params, self.state.buffers, self.data.val_batches)
                    record["val_loss"] = val_loss
                self.history.append(record)
                self._write(record)
                if self.tensorboard is not None:
                    for key, value in record.items():
                        if key != "step" and math.isfinite(value):
                            self.tensorboard.add_scalar(key, value, number)
                if self.progress:
                    self.progress(number, record)
            due_steps = cfg.checkpoint_every is not None and number % cfg.checkpoint_every == 0
            due_minutes = (cfg.checkpoint_every_minutes is not None
                           and time.perf_counter() - last_save >= 60 * cfg.checkpoint_every_minutes)
            if (due_steps or due_minutes) and number < cfg.steps:
                # Only healthy states are saved, so a restore never lands inside a run of skipped steps.
                if int(jax.device_get(self.state.guard.consecutive_skips)) == 0:
                    self._save(number)
                    last_save = time.perf_counter()
        self._save(step, wait=True)
        return LoopResult(state=self.state, graphdef=self.graphdef, history=self.history, final_val_loss=val_loss)

    def _peak_flops(self) -> float | None:
        if self.train_cfg.compute_dtype != "bfloat16":
            return None
        kind = jax.devices()[0].device_kind
        return next((rate for name, rate in PEAK_BF16_FLOPS.items() if name in kind), None)


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the records after `step` from a metrics.jsonl (a resumed run writes them again), atomically."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def host_state_from_meta(meta: dict[str, Any]) -> HostState:
    return HostState.from_dict(meta["host"])
