"""Propagation rules: how placements flow through each ATen op.

Contract. A rule is a function ``rule(ctx, node) -> Decision | None`` registered for one or
more ATen overload packets with :func:`register`. It reads the current placements of the
node's inputs through ``ctx`` and returns a :class:`Decision`: the placement of the output,
the placement each tensor input must be converted to first (``Replicate -> Shard`` is a free
local slice, ``Partial -> Replicate`` an all-reduce, ``Shard -> Replicate`` an all-gather),
and the op's arguments patched for local shapes when they differ (e.g. the head count of a
``view``). Returning ``None`` means "no proof of a sharded evaluation": the solver then
replicates every input and the output, and logs the op. A rule must only return a decision
it can prove exact: running the op on the local chunks (with the patched arguments) yields
the local chunk of the output placement.

Sizes are *global* sizes: ``ctx.shape(x)`` is the shape on one device.
Families live in one module each: elementwise, view, matmul, conv, reduction, indexing,
attention (leaf ops).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..placement import REPLICATE, Placement

__all__ = ["Decision", "Indivisible", "RuleContext", "register", "register_by_name", "lookup",
           "RULES"]

RULES: dict[Any, Callable] = {}
# Rules for ops of other libraries, by qualified name (the library may load after us).
RULES_BY_NAME: dict[str, Callable] = {}


@dataclass
class Decision:
    """What a rule decides for one node.

    Attributes:
        out: placement of the output; a tuple of placements for multi-output ops.
        inputs: required placement per input node (inputs not listed keep theirs).
        roles: for inputs derived from a parameter, the role the conversion gives it
            (``"column"``, ``"row"``, ``"vocab"``): used for the plan's layer table.
        args / kwargs: the op's arguments for local shapes, or ``None`` if unchanged.
        seed: ``"column"`` or ``"vocab"`` if this node *chose* to shard a parameter; the
            solver may veto that choice (demote the seed) if it leads to a conflict.
        action: a special rewrite: ``"vocab_embedding"`` or ``"row_addmm"``.
        allow_gather: an all-gather of a sharded input is acceptable here (graph outputs,
            losses) instead of replicating the seeds that sharded it.
    """

    out: Placement | tuple
    inputs: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)
    args: tuple | None = None
    kwargs: dict | None = None
    seed: str | None = None
    action: str | None = None
    allow_gather: bool = False


class Indivisible(str):
    """The reason of a note (``ctx.note(node, Indivisible(msg))``) when a rule refuses a
    split only because ``tp_size`` does not divide a count (attention heads, groups of a
    fused projection). The solver treats it like any refusal (the seed stays whole); the
    pipeline raises :class:`~tp_backend.errors.TPDivisibilityError` with it under
    ``fallback="raise"`` and logs a warning otherwise."""


class RuleContext(Protocol):
    tp_size: int
    tp_rank: int  # whose local sizes a decision's arguments hold (uneven splits)

    def placement(self, arg: Any) -> Placement | None: ...
    def shape(self, arg: Any) -> tuple: ...
    def is_param(self, arg: Any) -> bool: ...
    def can_seed(self, node: fx.Node) -> bool: ...
    def prefer(self, value: fx.Node, dim: int, cuts: set) -> None: ...
    def preference(self, seed: fx.Node) -> tuple | None: ...
    def prefer_units(self, value: fx.Node, dim: int, units: int) -> bool: ...
    def units_preference(self, seed: fx.Node) -> int | None: ...
    def forced_whole(self, node: fx.Node) -> bool: ...
    def worth_vocab_split(self, table: fx.Node) -> bool: ...
    def note(self, node: fx.Node, reason: str) -> None: ...  # why a value stays whole
    def describe(self, node: fx.Node) -> str: ...  # a node's user-facing name, for notes


def register(*ops) -> Callable:
    """Register ``fn`` as the rule of every ATen op (packet or overload) in ``ops``."""

    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def register_by_name(*names: str) -> Callable:
    """Register ``fn`` for ops named ``"namespace::op"`` (any overload)."""

    def deco(fn):
        for name in names:
            RULES_BY_NAME[name] = fn
        return fn

    return deco


def lookup(target) -> Callable | None:
    """The rule of an ATen overload: an overload-specific rule first, then its packet's,
    then one registered by name."""
    rule = RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = RULES.get(target.overloadpacket) or RULES_BY_NAME.get(target.name().split(".")[0])
    return rule


# ----------------------------------------------------------------------------- helpers


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
