"""Propagation rules: how placements flow through each ATen op.

Contract. A rule is a function ``rule(ctx, node) -> Decision | None`` registered for one or
more ATen overload packets with :func:`register`. It reads the current placements of the
node's inputs through ``ctx`` and returns a :class:`Decision`: the placement of the output
and the placement each tensor input must be converted to first (``Replicate -> Shard`` is a
free local slice, ``Partial -> Replicate`` an all-reduce, ``Shard -> Replicate`` an
all-gather). A rule decides placements only: arguments that hold global sizes (the head
count of a ``view``) are rewritten to local sizes from those placements, in one place
(:mod:`tp_backend.local_args`). Returning ``None`` means "no proof of a sharded
evaluation": the solver then replicates every input and the output, and logs the op. A rule
must only return a decision it can prove exact: running the op on the local chunks (with
its local arguments) yields the local chunk of the output placement.

Sizes are *global* sizes: ``ctx.shape(x)`` is the shape on one device.
Families live in one module each: elementwise, view, matmul, conv, reduction, indexing,
attention (leaf ops).

Owns: the rule contract and registry (:class:`Decision`, :class:`Role`, :class:`Action`,
:class:`Indivisible`, :class:`RuleContext`, :func:`register`, :func:`register_by_name`,
:func:`lookup`, ``RULES``) and the helpers the families share (:func:`arg`,
:func:`static_int`, :func:`divisible`, :func:`norm_dim`, :func:`tensor_inputs`,
:func:`replicate_all`). Must not: hold an op's rule (the family modules do), rewrite
arguments (:mod:`tp_backend.local_args`), change the graph (:mod:`tp_backend.rewrite`), or
resolve conflicts and veto seeds (:mod:`tp_backend.solver`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..placement import REPLICATE, Placement, StrEnum

__all__ = ["Decision", "Role", "Action", "Indivisible", "RuleContext", "register",
           "register_by_name", "lookup", "arg", "RULES"]

RULES: dict[Any, Callable] = {}
# Rules for ops of other libraries, by qualified name (the library may load after us).
RULES_BY_NAME: dict[str, Callable] = {}


class Role(StrEnum):
    """How a parameter is stored across the ranks, as the plan's layer table says it:
    Megatron-LM's column-parallel (split on output features), row-parallel (split on input
    features, output a partial sum), vocab-parallel (an embedding table split on rows);
    ``SHARD`` another split, ``REPLICATE`` whole on every rank."""

    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    SHARD = "shard"
    REPLICATE = "replicate"


class Action(StrEnum):
    """A rewrite that replaces the op by a parallel layer of :mod:`tp_backend.layers`."""

    VOCAB_EMBEDDING = "vocab_embedding"  # lookups outside the rank's rows give zeros
    ROW_ADDMM = "row_addmm"  # all-reduce the partial product, then add the bias once
    # (sequence parallelism) the partial product plus the bias on the first rank only: a
    # partial sum, reduce-scattered over the tokens where its consumers allow
    ROW_ADDMM_PARTIAL = "row_addmm_partial"
    VOCAB_CROSS_ENTROPY = "vocab_cross_entropy"  # the loss on logits split over classes


@dataclass
class Decision:
    """What a rule decides for one node.

    Attributes:
        out: placement of the output; a tuple of placements for multi-output ops.
        inputs: required placement per input node (inputs not listed keep theirs).
        roles: for inputs derived from a parameter, the :class:`Role` the conversion gives
            it: used for the plan's layer table.
        seed: ``Role.COLUMN`` or ``Role.VOCAB`` if this node *chose* to shard a parameter;
            the solver may veto that choice (demote the seed) if it leads to a conflict.
        action: an :class:`Action` (a special rewrite), or ``None``.
        allow_gather: an all-gather of a sharded input is acceptable here (graph outputs,
            losses) instead of replicating the seeds that sharded it.
    """

    out: Placement | tuple
    inputs: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)
    seed: Role | None = None
    action: Action | None = None
    allow_gather: bool = False


class Indivisible(str):
    """The reason of a note (``ctx.note(node, Indivisible(msg))``) when a rule refuses a
    split only because ``tp_size`` does not divide a count (attention heads, groups of a
    fused projection). The solver treats it like any refusal (the seed stays whole); the
    pipeline raises :class:`~tp_backend.errors.TPDivisibilityError` with it under
    ``fallback="raise"`` and logs a warning otherwise."""


class RuleContext(Protocol):
    tp_size: int
    sequence_parallel: bool  # row-parallel addmm keeps a partial sum (see Action)
    group_kv: bool  # attention may ask for query heads in whole KV groups (solver.solve)

    def placement(self, arg: Any) -> Placement | None: ...
    def shape(self, arg: Any) -> tuple: ...
    def is_param(self, arg: Any) -> bool: ...
    def can_seed(self, node: fx.Node) -> bool: ...
    def prefer(self, value: fx.Node, dim: int, cuts: set) -> None: ...
    def preference(self, seed: fx.Node) -> tuple | None: ...
    def prefer_units(self, value: fx.Node, dim: int, units: int) -> bool: ...
    def units_preference(self, seed: fx.Node) -> int | None: ...
    def pending_units(self, value: fx.Node) -> int | None: ...
    def prefer_coarser_units(self, value: fx.Node, units: int) -> bool: ...
    def balance_counts(self, seed: fx.Node) -> tuple | None: ...
    def forced_whole(self, node: fx.Node) -> bool: ...
    def worth_vocab_split(self, table: fx.Node) -> bool: ...
    def note(self, node: fx.Node, reason: str) -> None: ...  # why a value stays whole
    def describe(self, node: fx.Node) -> str: ...  # a node's user-facing name, for notes


def register(*ops) -> Callable:
    """Register ``fn`` as the rule of every ATen op (packet or overload) in ``ops``."""

    def deco(fn):
        for op in ops:
            RULES[op] = fn
        _RESOLVED.clear()
        return fn

    return deco


def register_by_name(*names: str) -> Callable:
    """Register ``fn`` for ops named ``"namespace::op"`` (any overload)."""

    def deco(fn):
        for name in names:
            RULES_BY_NAME[name] = fn
        _RESOLVED.clear()
        return fn

    return deco


# id(target) -> (target, its rule or None), resolved once: the solver looks a rule up for
# every node of every round, and an OpOverload's own __hash__ is a Python call. The entry
# holds the target, so its id is not reused while the entry lives. Cleared by register.
_RESOLVED: dict = {}


def lookup(target) -> Callable | None:
    """The rule of an ATen overload: an overload-specific rule first, then its packet's,
    then one registered by name."""
    hit = _RESOLVED.get(id(target))
    if hit is not None:
        return hit[1]
    rule = RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = RULES.get(target.overloadpacket) or RULES_BY_NAME.get(target.name().split(".")[0])
    _RESOLVED[id(target)] = (target, rule)
    return rule


# ----------------------------------------------------------------------------- helpers


# id(overload) -> {argument name: (position, keyword-only, default)}, from its schema (the
# default is None where the schema gives none); filled on first use. Keyed by id: a rule
# asks for arguments on every node of every round, and an OpOverload's own __hash__ is a
# Python call (overloads live as long as the process, so their ids are stable).
_ARGUMENTS: dict = {}


def _arguments(target) -> dict:
    table = _ARGUMENTS[id(target)] = {
        a.name: (i, a.kwarg_only, a.default_value if a.has_default_value() else None)
        for i, a in enumerate(target._schema.arguments)}
    return table


def arg(node: fx.Node, name: str, *more: str, default: Any = None) -> Any:
    """The argument called ``name`` (or the first of ``more`` the overload has) in the call
    ``node``, however it was passed: by position, by keyword, or left to the schema's
    default. ``default`` where the overload has no argument of any of those names (``sum``
    over all dims has no ``dim``). Rules read arguments with it, never by position: the
    overloads of one op packet place them differently (``sort(x, dim)`` and
    ``sort(x, stable=, dim=)``; ``norm(x, p, dim)``), and the schema is the one source."""
    target = node.target
    table = _ARGUMENTS.get(id(target)) or _arguments(target)
    spec = table.get(name)
    if spec is None:
        for name in more:
            spec = table.get(name)
            if spec is not None:
                break
        else:
            return default
    i, kwarg_only, dflt = spec
    args = node.args
    if not kwarg_only and i < len(args):
        return args[i]
    return node.kwargs.get(name, dflt)



def static_int(size) -> int | None:
    """``size`` as a Python int if it is a static size, else ``None`` (symbolic)."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt) and is_concrete_int(size):
        return int(size)
    return None


def divisible(size, n: int) -> bool:
    """Whether a (static) size splits into ``n`` equal chunks."""
    s = static_int(size)
    return s is not None and s >= n and s % n == 0


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Tensor-valued input nodes of ``node`` in argument order (no duplicates)."""
    out = []
    for a in node.all_input_nodes:
        if isinstance(a.meta.get("val"), torch.Tensor) and a not in out:
            out.append(a)
    return out


def replicate_all(ctx: RuleContext, node: fx.Node) -> Decision:
    """The fallback: every tensor input replicated, output replicated."""
    ins = {a: REPLICATE for a in tensor_inputs(node)}
    val = node.meta.get("val")
    out = tuple(REPLICATE for _ in val) if isinstance(val, (tuple, list)) else REPLICATE
    return Decision(out=out, inputs=ins)


from . import attention, conv, elementwise, indexing, matmul, reduction, view  # noqa: E402,F401
