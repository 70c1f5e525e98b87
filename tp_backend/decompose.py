"""AOT decomposition: the Dynamo graph as a functional graph of core ATen ops.

``decompose(gm, fake_inputs)`` traces the Dynamo ``GraphModule`` with ``make_fx`` under
``torch.func.functionalize`` and the core ATen decomposition table
(``torch._decomp.core_aten_decompositions``), on fake tensors (no compute, no copy of the
weights). In-place ops become out-of-place (``add_`` -> ``add``). Scaled dot-product
attention and cross-entropy stay leaf ops (:mod:`tp_backend.leaf_ops`).

Provenance: every ATen node gets ``node.meta["tp_source"]``, the name of the Dynamo node
whose evaluation created it, and ``node.meta["tp_module"]``, the path of that node's
innermost module (e.g. ``model.layers.3.self_attn.o_proj``) as the caller's
``module_path`` names it (:meth:`tp_backend.naming.NameIndex.module_path`: by identity).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx

from .leaf_ops import LEAF_FUNCTIONS

__all__ = ["decompose"]

_TABLE = None


def _decomposition_table():
    global _TABLE
    if _TABLE is None:
        _TABLE = dict(core_aten_decompositions())
    return _TABLE


class _LeafInterpreter(fx.Interpreter):
    """Runs the Dynamo graph, routing leaf functions to leaf ops and recording provenance."""

    def __init__(self, gm: fx.GraphModule, module_path: Callable[[fx.Node], str]):
        super().__init__(gm)
        self._module_path = module_path

    def call_function(self, target, args, kwargs):
        leaf = LEAF_FUNCTIONS.get(target)
        if leaf is not None:
            return leaf(*args, **kwargs)
        return super().call_function(target, args, kwargs)

    def run_node(self, n):
        mode = get_proxy_mode()
        graph = mode.tracer.graph if mode is not None else None
        last = graph._root.prev if graph is not None else None
        result = super().run_node(n)
        if graph is not None:
            path = self._module_path(n)
            node = last.next
            while node is not graph._root:
                node.meta.setdefault("tp_source", n.name)
                node.meta.setdefault("tp_module", path)
                node = node.next
        return result


def decompose(gm: fx.GraphModule, fake_inputs: list, fake_mode,
              module_path: Callable[[fx.Node], str] = lambda n: "") -> fx.GraphModule:
    """Trace ``gm`` to a functional core-ATen graph. ``fake_inputs`` are fake tensors (and
    SymInts) in ``fake_mode``, one per placeholder of ``gm``; ``module_path(dynamo_node)``
    names the module a Dynamo node ran in. Returns a ``GraphModule`` whose placeholders
    correspond one-to-one, in order, to ``gm``'s."""
    interp = _LeafInterpreter(gm, module_path)

    def run(*args):
        return interp.run(*args)

    with torch.no_grad(), fake_mode:
        traced = make_fx(torch.func.functionalize(run, remove="mutations"),
                         decomposition_table=_decomposition_table(),
                         tracing_mode="real", _allow_non_fake_inputs=False)(*fake_inputs)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced
