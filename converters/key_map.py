"""The torch state-dict keys of phase1-jax modules, derived from the modules themselves.

Each module class has a rule that declares, in the torch state dict's order, only names and transforms:

    Tensor(torch_name, jax_name, transform)   one Param or Buffer of the module
    PerRow(torch_name, (Tensor, ...))         torch holds one submodule per row of stacked JAX arrays
    Submodule(torch_name, jax_name)           a child module (for an nnx.List, one per item: name.0, name.1, ...)
    NotStored(jax_name, initial)              a variable that torch state dicts do not carry

A rule may also be a function of the module returning its entries, for a class whose stored tensors depend on
its configuration (SparseMoE: dense or low-rank experts).

`key_map(module)` walks a module with these rules and reads every shape and dtype off its variables (an
abstract module from `nnx.eval_shape` is enough): a key's torch shape is the JAX shape sent through the
declared transform. It raises `KeyMapError` if a module has no rule, a declared variable is absent, or a
variable is declared nowhere, so a change to the model cannot silently drop a tensor from checkpoints.
Adding a module or a parameter is a few lines in `RULES`.

jax paths are tuples into the {"params": ..., "buffers": ...} pure dicts of `split_model` (list indices as ints).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from phase1_jax.config import ModelConfig
from phase1_jax.models.ar_ssm import AdaptiveRankSemiseparableLayer, DepthwiseTimeConv
from phase1_jax.models.common import split_model
from phase1_jax.models.htt import HolographicTTEmbedding
from phase1_jax.models.lns import LNSLinear
from phase1_jax.models.moe import SparseMoE
from phase1_jax.models.resnet_bk import MoEResNetBKLayer, ResNetBK, ResNetBKBlock, TiedHTTHead

Shape = tuple[int, ...]
JaxPath = tuple[Any, ...]


class KeyMapError(ValueError):
    """The key rules and a module's variables disagree (a rule is missing, stale or incomplete)."""


# --------------------------------------------------------------------------------------------------------------
# Transforms: how one JAX array is stored as a torch tensor, and what that does to its shape and dtype.
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_jax: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[Shape], Shape]
    # None: "float" for floating arrays (the checkpoint's one float dtype), the dtype's name otherwise.
    torch_dtype: str | None = None


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _conv_to_jax(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w[:, 0, :].T)  # torch depthwise Conv1d weight (D, 1, 3) -> taps (3, D)


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T[:, None, :])


IDENTITY = Transform("identity", _identity, _identity, lambda shape: shape)
# nn.Linear stores (out, in); nnx.Linear's kernel is (in, out).
LINEAR_KERNEL = Transform("transpose", _transpose, _transpose, lambda shape: shape[::-1])
DEPTHWISE_CONV = Transform("depthwise conv (D, 1, 3) <-> (3, D)", _conv_to_torch, _conv_to_jax,
                           lambda shape: (shape[1], 1, shape[0]))
# Counters are int32 in JAX (x64 is off) and int64 in the reference.
INT64_COUNTER = Transform("int32 <-> int64", lambda x: x.astype(np.int64), lambda x: x.astype(np.int32),
                          lambda shape: shape, torch_dtype="int64")


# --------------------------------------------------------------------------------------------------------------
# Rule entries.
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tensor:
    torch_name: str
    jax_name: str | None = None  # defaults to torch_name
    transform: Transform = IDENTITY
    optional: bool = False  # absent (None) in some configurations, e.g. a Linear without bias


@dataclasses.dataclass(frozen=True)
class PerRow:
    """`{torch_name}.{k}.{entry.torch_name}` holds row k of each entry's JAX array (stacked experts)."""
    torch_name: str
    entries: tuple[Tensor, ...]


@dataclasses.dataclass(frozen=True)
class Submodule:
    torch_name: str
    jax_name: str | None = None
    optional: bool = False  # None or unset in some configurations (e.g. blocks without AR-SSM)


@dataclasses.dataclass(frozen=True)
class NotStored:
    """A variable the torch state dict does not carry; an import sets it to `initial(module)`."""
    jax_name: str
    initial: Callable[[nnx.Module], Any]


Entry = Tensor | PerRow | Submodule | NotStored
Rule = tuple[Entry, ...] | Callable[[nnx.Module], tuple[Entry, ...]]


# --------------------------------------------------------------------------------------------------------------
# The rules: names and transforms of every module that appears in a ResNet-BK (REFERENCE_SPEC §1.3, §2.1, §2.2).
# Entries are in the torch state dict's order: own parameters and buffers as registered, then submodules.
# --------------------------------------------------------------------------------------------------------------

LINEAR = (Tensor("weight", "kernel", LINEAR_KERNEL), Tensor("bias", optional=True))


def _sparse_moe(moe: SparseMoE) -> tuple[Entry, ...]:
    if moe.expert_rank is None:
        # Each torch expert is Sequential(Linear, ReLU, Dropout, Linear): indices 0 and 3 hold the weights.
        experts = (Tensor("0.weight", "w1", LINEAR_KERNEL), Tensor("0.bias", "b1"),
                   Tensor("3.weight", "w2", LINEAR_KERNEL), Tensor("3.bias", "b2"))
    else:
        # Low-rank experts (ours): Sequential(LowRankLinear, ReLU, Dropout, LowRankLinear), where a LowRankLinear
        # computes b(a(x)) + bias with bias-free Linears a (in -> rank) and b (rank -> out). The bias keeps the
        # dense layout's key; torch lists a module's own parameters before its submodules'.
        experts = (Tensor("0.bias", "b1"), Tensor("0.a.weight", "w1_a", LINEAR_KERNEL),
                   Tensor("0.b.weight", "w1_b", LINEAR_KERNEL),
                   Tensor("3.bias", "b2"), Tensor("3.a.weight", "w2_a", LINEAR_KERNEL),
                   Tensor("3.b.weight", "w2_b", LINEAR_KERNEL))
    return (Tensor("scattering_step_counter", transform=INT64_COUNTER), PerRow("experts", experts),
            Submodule("gating_network"))


RULES: dict[type, Rule] = {
    nnx.Linear: LINEAR,
    LNSLinear: LINEAR,  # an LNS head keeps nnx.Linear's kernel/bias layout
    nnx.LayerNorm: (Tensor("weight", "scale"), Tensor("bias")),
    nnx.Embed: (Tensor("weight", "embedding"),),
    # phase_shift is a Param with phase encoding and a Buffer without; the key is the same.
    HolographicTTEmbedding: (Tensor("core1"), Tensor("core2"), Tensor("phase_shift")),
    DepthwiseTimeConv: (Tensor("weight", "kernel", DEPTHWISE_CONV),),
    AdaptiveRankSemiseparableLayer: (
        Submodule("complexity_gate.0", "complexity_gate_in"),  # complexity_gate is a torch Sequential
        Submodule("complexity_gate.2", "complexity_gate_out"),
        Submodule("U_proj"),
        Submodule("V_proj"),
        Submodule("T_conv"),
        Submodule("output_proj"),
        # A plain Python attribute in the reference that starts at max_rank (REFERENCE_SPEC §2.2).
        NotStored("current_max_rank", lambda layer: layer.max_rank),
    ),
    SparseMoE: _sparse_moe,
    MoEResNetBKLayer: (
        Tensor("bk_scale"),
        Tensor("h0_diag_base"), Tensor("h0_sub_base"), Tensor("h0_super_base"), Tensor("z"),
        Submodule("moe_ffn"),
        Submodule("v_proj"),
        Submodule("output_proj"),
    ),
    ResNetBKBlock: (
        Submodule("ar_ssm_norm", optional=True),
        Submodule("ar_ssm", optional=True),
        Submodule("layer_norm"),
        Submodule("bk_layer"),
    ),
    ResNetBK: (
        Submodule("token_embedding"),
        Submodule("position_embedding"),
        Submodule("blocks"),
        Submodule("layer_norm_final"),
        Submodule("lm_head"),
    ),
    # The tied head's weight is the token embedding's HTT cores, stored once under token_embedding.
    TiedHTTHead: (Tensor("bias"),),
}


# --------------------------------------------------------------------------------------------------------------
# The map.
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """One torch tensor and where it lives in the JAX pure dicts."""
    torch_key: str
    jax_path: JaxPath  # ("params", "blocks", 0, "bk_layer", "moe_ffn", "w1")
    jax_shape: Shape  # the whole JAX array (for a row of a stacked array: the stack)
    torch_shape: Shape
    torch_dtype: str  # "float" (the checkpoint's float dtype), "complex64" or "int64"
    transform: Transform = IDENTITY
    row: int | None = None  # index into the leading axis of a stacked JAX array

    @property
    def is_parameter(self) -> bool:
        return self.jax_path[0] == "params"

    def to_jax(self, x: np.ndarray) -> np.ndarray:
        return self.transform.to_jax(x)

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        return self.transform.to_torch(x)


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """The rows in torch order, and the values of the variables that no torch key carries."""
    rows: tuple[KeyMapping, ...]
    not_stored: Mapping[JaxPath, np.ndarray]

    def __iter__(self) -> Iterator[KeyMapping]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def parameter_rows(self) -> list[KeyMapping]:
        """Trainable parameters, in torch's `model.parameters()` order (the indices of a torch optimizer state)."""
        return [m for m in self.rows if m.is_parameter]


def _rule_for(module: nnx.Module, where: str) -> tuple[Entry, ...]:
    for cls in type(module).__mro__:
        if cls in RULES:
            rule = RULES[cls]
            return rule(module) if callable(rule) else rule
    raise KeyMapError(f"no key rule for {type(module).__name__} at '{where or '<root>'}': declare its torch "
                      f"names in phase1_jax.converters.key_map.RULES")


def _torch_dtype(dtype: np.dtype, transform: Transform, where: str) -> str:
    if transform.torch_dtype is not None:
        return transform.torch_dtype
    if jnp.issubdtype(dtype, jnp.floating):  # bfloat16 included (NumPy's issubdtype does not know it)
        return "float"
    if dtype == np.complex64:
        return "complex64"
    raise KeyMapError(f"'{where}' has dtype {dtype}, which torch state dicts store only through a declared "
                      f"transform (e.g. INT64_COUNTER)")


def _dotted(path: JaxPath) -> str:
    return ".".join(str(p) for p in path)


class _Walker:
    def __init__(self, module: nnx.Module):
        _, params, buffers = split_model(module)
        # Every variable of the module by path: the pure-dict collection split_model puts it in, and its value.
        self.variables: dict[JaxPath, tuple[str, Any]] = {}
        self.kinds: dict[JaxPath, str] = {}  # Param, Buffer, RankState, ... for error messages
        for collection, state in (("params", params), ("buffers", buffers)):
            for path, variable in nnx.to_flat_state(state):
                self.variables[tuple(path)] = (collection, variable.get_value())
                self.kinds[tuple(path)] = type(variable).__name__
        self.rows: list[KeyMapping] = []
        self.not_stored: dict[JaxPath, np.ndarray] = {}
        self.declared: set[JaxPath] = set()

    def variable(self, path: JaxPath, optional: bool, owner: nnx.Module) -> tuple[str, Any] | None:
        if path in self.variables:
            self.declared.add(path)
            return self.variables[path]
        if optional and getattr(owner, path[-1], None) is None:
            return None
        raise KeyMapError(f"the key rule for {type(owner).__name__} names '{_dotted(path)}', which is not a "
                          f"variable of the module")

    def add(self, torch_key: str, path: JaxPath, collection: str, value: Any, transform: Transform,
            row: int | None = None) -> None:
        shape = tuple(value.shape)
        torch_shape = transform.torch_shape(shape if row is None else shape[1:])
        self.rows.append(KeyMapping(torch_key, (collection, *path), shape, tuple(torch_shape),
                                    _torch_dtype(np.dtype(value.dtype), transform, _dotted(path)), transform, row))

    def walk(self, module: nnx.Module, torch_prefix: str, path: JaxPath) -> None:
        for entry in _rule_for(module, _dotted(path)):
            if isinstance(entry, Tensor):
                leaf = path + (entry.jax_name or entry.torch_name,)
                found = self.variable(leaf, entry.optional, module)
                if found is not None:
                    self.add(f"{torch_prefix}{entry.torch_name}", leaf, *found, entry.transform)
            elif isinstance(entry, PerRow):
                self.walk_rows(module, entry, torch_prefix, path)
            elif isinstance(entry, Submodule):
                jax_name = entry.jax_name or entry.torch_name
                child = getattr(module, jax_name, None)
                if child is None:
                    if entry.optional:
                        continue
                    raise KeyMapError(f"the key rule for {type(module).__name__} names submodule "
                                      f"'{_dotted(path + (jax_name,))}', which the module does not have")
                prefix = f"{torch_prefix}{entry.torch_name}."
                if isinstance(child, nnx.List):
                    for i, item in enumerate(child):
                        self.walk(item, f"{prefix}{i}.", path + (jax_name, i))
                else:
                    self.walk(child, prefix, path + (jax_name,))
            else:
                leaf = path + (entry.jax_name,)
                found = self.variable(leaf, False, module)
                self.not_stored[(found[0], *leaf)] = np.asarray(entry.initial(module), dtype=found[1].dtype)

    def walk_rows(self, module: nnx.Module, entry: PerRow, torch_prefix: str, path: JaxPath) -> None:
        stacked = []
        for tensor in entry.entries:
            leaf = path + (tensor.jax_name or tensor.torch_name,)
            stacked.append((tensor, leaf, *self.variable(leaf, False, module)))
        counts = {value.shape[0] for _, _, _, value in stacked}
        if len(counts) != 1:
            raise KeyMapError(f"'{_dotted(path)}': the arrays stored per row of {entry.torch_name} have different "
                              f"leading sizes {sorted(counts)}")
        for k in range(counts.pop()):
            for tensor, leaf, collection, value in stacked:
                self.add(f"{torch_prefix}{entry.torch_name}.{k}.{tensor.torch_name}", leaf, collection, value,
                         tensor.transform, row=k)

    def check_complete(self) -> None:
        undeclared = [f"'{_dotted(p)}' ({self.kinds[p]} {tuple(v.shape)})"
                      for p, (_, v) in self.variables.items() if p not in self.declared]
        if undeclared:
            raise KeyMapError(f"{len(undeclared)} variable(s) have no torch key: {', '.join(undeclared)}; declare "
                              "each in phase1_jax.converters.key_map.RULES (Tensor, or NotStored if torch does "
                              "not store it)")


def key_map(module: nnx.Module, torch_prefix: str = "") -> KeyMap:
    """The key map of any module the rules cover (a ResNetBK, or e.g. a standalone AR-SSM layer or HTT embedding).

    `module` may be abstract (`nnx.eval_shape`). `torch_prefix` is prepended to every torch key ("base_model.").
    """
    walker = _Walker(module)
    walker.walk(module, torch_prefix, ())
    walker.check_complete()
    return KeyMap(tuple(walker.rows), walker.not_stored)


def abstract_model(config: ModelConfig) -> ResNetBK:
    """The structure, shapes and dtypes of `ResNetBK(config)`, without initialising any array."""
    return nnx.eval_shape(lambda: ResNetBK(config, rngs=nnx.Rngs(0)))


def model_key_map(config: ModelConfig, torch_prefix: str = "") -> KeyMap:
    """Torch keys of `ResNetBK(config)` in order: the reference LanguageModel (REFERENCE_SPEC §1.3) for a baseline
    config; for a Phase 1 config, HTT cores in place of embedding weights (as the reference's
    Phase1IntegratedModel stores them, §2.12) and, in phase1-jax's own layout (the reference has none of these):
    per AR-SSM block `ar_ssm_norm.*` and `ar_ssm.*`, for a tied HTT head only `lm_head.bias`, and for low-rank
    experts `experts.{k}.{0,3}.{bias,a.weight,b.weight}`."""
    return key_map(abstract_model(config), torch_prefix)
