"""The rewrite checks itself: this rank's graph is run on fake tensors of the local input
shapes, and every value's local shape must be the one its placement promises.

A rule that claims a placement it does not deliver (the partial-times-shard hole of issue
20), or a shape constant the rewrite left global, shows here as a shape that differs or an
op that cannot run -- before any real data is touched. The check raises
:class:`~tp_backend.errors.TPPassError` (pass ``"self-check"``) naming the node and its
module, with the seeds whose split reached it (``seeds``). The backend vetoes those seeds
and solves again (a correct, partly replicated graph); if no seed is to blame, with
``fallback="replicate"`` (the default) it runs the graph unsplit. Either way such a bug
costs memory and speed, never a wrong number or a crash at run time.

Local shape of a value of global shape ``G``: ``G`` for Replicate and Partial; for
``Shard(d)`` (any ``outer``/``blocks``) ``G`` with ``G[d] / N``. Symbolic sizes are
compared as expressions (no guards are added); a symbolic split dim is not compared.
A data-dependent size (an unbacked symbol: ``.tolist()``, ``nonzero``) gets a fresh name
when the local graph runs; the first time one is met it is bound to the global graph's
symbol in the same place, and every later use must agree with that binding.

Owns: :func:`check_local_graph` (the local graph run on fake local inputs, each value's
shape compared with its placement) and :func:`seeds_behind`. Must not: repair what it
finds -- vetoing seeds, solving again or falling back is :mod:`tp_backend.backend`'s -- or
change the graph or the solution.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from .errors import TPPassError
from .placement import Placement
from .nodemeta import describe
from .solver import Solution

__all__ = ["check_local_graph"]


def _expr(a):
    return a.node.expr if isinstance(a, torch.SymInt) else a


def _fresh(expr) -> bool:
    """Whether ``expr`` is a bare unbacked symbol (a data-dependent size)."""
    return getattr(expr, "is_Symbol", False) and bool(free_unbacked_symbols(expr))


def _same(a, b, renames: dict) -> bool:
    """Whether local size ``a`` equals expected size ``b``; a local unbacked symbol met
    for the first time against an unbacked symbol of the global graph is bound to it in
    ``renames``."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        ea, eb = _expr(a), _expr(b)
        if _fresh(ea) and _fresh(eb) and ea not in renames:
            renames[ea] = eb
        if renames and hasattr(ea, "xreplace"):
            ea = ea.xreplace(renames)
        return bool(ea == eb)
    return int(a) == int(b)


def _expected(node: fx.Node, p: Placement, tp_rank: int, tp_size: int):
    shape = list(node.meta["val"].shape)
    if p.is_shard():
        d = shape[p.dim]
        if isinstance(d, torch.SymInt):
            shape[p.dim] = None  # not compared
        else:
            shape[p.dim] = p.local_size(int(d), tp_rank, tp_size)
    return shape


class _Stop(Exception):
    pass


class _Recorder(fx.Interpreter):
    """Runs the graph node by node; stops at the first node that fails or whose shape
    differs from its placement's (the reason in ``failure``)."""

    def __init__(self, gm, placements, tp_rank, tp_size):
        super().__init__(gm)
        self.placements = placements  # node -> Placement, for the nodes to compare
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.failure = None
        self.node = None
        self.renames = {}  # local unbacked symbol -> the global graph's (see _same)

    def run_node(self, n):
        self.node = n
        try:
            out = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - any error is the finding
            self.failure = (f"{describe(n)} ({n.format_node()}) cannot run on this rank's "
                            f"local shapes: {type(e).__name__}: {str(e).splitlines()[0]}")
            raise _Stop from e
        val = n.meta.get("val")
        if isinstance(out, torch.SymInt) and isinstance(val, torch.SymInt):
            _same(out, val, self.renames)  # binds a data-dependent scalar (.item())
        p = self.placements.get(n)
        if p is not None and isinstance(out, torch.Tensor):
            want = _expected(n, p, self.tp_rank, self.tp_size)
            got = list(out.shape)
            if len(got) != len(want) or not all(w is None or _same(g, w, self.renames)
                                                for g, w in zip(got, want)):
                self.failure = (f"{describe(n)} ({n.format_node()}) has local shape {got} on "
                                f"this rank, but its placement {p} means "
                                f"{['?' if w is None else w for w in want]}")
                raise _Stop
        return out


def check_local_graph(gm: fx.GraphModule, sol: Solution, local_inputs: list, fake_mode,
                      tp_size: int, tp_rank: int = 0) -> None:
    """Run this rank's rewritten graph ``gm`` on ``local_inputs`` (fake tensors of the
    local shapes, in ``fake_mode``) and compare each value with its placement in ``sol``.

    Raises:
        TPPassError: (``pass_name == "self-check"``) a value whose local shape differs
            from its placement's, or an op that cannot run on the local shapes; the
            message names the node, its module and both shapes.
    """
    # Placeholders get the shapes the runner feeds; every op's output is compared.
    placements = {n: p for n in gm.graph.nodes if n.op == "call_function"
                  and isinstance(p := sol.placements.get(n), Placement)
                  and isinstance(n.meta.get("val"), torch.Tensor)}
    rec = _Recorder(gm, placements, tp_rank, tp_size)
    try:
        # The Python dispatcher, as in the decomposition: a composite op's meta function
        # takes symbolic sizes only through it (constant_pad_nd with a symbolic pad).
        with fake_mode, enable_python_dispatcher():
            rec.run(*local_inputs)
    except _Stop:
        raise TPPassError(f"tp_auto: self-check: {rec.failure}", "self-check", rec.failure,
                          seeds=seeds_behind(rec.node, sol)) from None


def seeds_behind(node: fx.Node, sol: Solution) -> dict:
    """The seeds (column / vocab shards) whose split reached ``node`` or its inputs,
    looking through the nodes the rewrite inserted (collectives, slices): node name ->
    a description for messages."""
    seeds, todo, seen = {}, [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in sol.taint:
            seeds.update({s.name: describe(s) for s in sol.taint[n]})
            if n is not node:
                continue
        todo.extend(n.all_input_nodes)
    return seeds
