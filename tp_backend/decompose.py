"""AOT decomposition: the Dynamo graph as a functional graph of core ATen ops.

``decompose(gm, fake_inputs)`` traces the Dynamo ``GraphModule`` with ``make_fx`` under
Python functionalization (``FunctionalTensorMode``, what AOTAutograd uses) and the core
ATen decomposition table (``torch._decomp.core_aten_decompositions``), on fake tensors (no
compute, no copy of the weights). In-place ops become out-of-place (``add_`` -> ``add``);
an input the graph writes into gets one ``copy_`` of its new value at the end. Scaled
dot-product attention and cross-entropy stay leaf ops (:mod:`tp_backend.leaf_ops`).

functorch's ``torch.func.functionalize`` is not used: it is a functorch transform, and a
graph that runs its own (``torch.vmap`` in Zamba's Mamba scan) breaks its layer stack
(``INTERNAL ASSERT FAILED ... TransformType::Functionalize``, issue 14).

Provenance: every ATen node gets (:mod:`tp_backend.nodemeta`) the name of the Dynamo node
whose evaluation created it, and the path of that node's
innermost module (e.g. ``model.layers.3.self_attn.o_proj``) as the caller's
``module_path`` names it (:meth:`tp_backend.naming.NameIndex.module_path`: by identity).

Owns: :func:`decompose` -- tracing to functional core ATen on fake tensors (the
decomposition table, functionalisation with the write-back of mutated inputs, leaf
functions routed to leaf ops) and stamping provenance on every ATen node. Must not: define
the leaf ops (:mod:`tp_backend.leaf_ops`) or the meta keys (:mod:`tp_backend.nodemeta`),
find module names (:mod:`tp_backend.naming`, through ``module_path``), or look at
placements or ranks (the later passes of :mod:`tp_backend.pipeline`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._decomp import core_aten_decompositions
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx

from . import nodemeta
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
                nodemeta.set_provenance(node, n.name, path)
                node = node.next
        return result


def decompose(gm: fx.GraphModule, fake_inputs: list, fake_mode,
              module_path: Callable[[fx.Node], str] = lambda n: "") -> fx.GraphModule:
    """Trace ``gm`` to a functional core-ATen graph. ``fake_inputs`` are fake tensors (and
    SymInts) in ``fake_mode``, one per placeholder of ``gm``; ``module_path(dynamo_node)``
    names the module a Dynamo node ran in. Returns a ``GraphModule`` whose placeholders
    correspond one-to-one, in order, to ``gm``'s."""
    interp = _LeafInterpreter(gm, module_path)

    def unwrap(t: FunctionalTensor) -> torch.Tensor:
        torch._sync(t)
        return torch._from_functional_tensor(t.elem)

    def run(*args):
        # As torch._subclasses.functional_tensor.dispatch_functionalize, plus the write-back
        # of mutated inputs that AOTAutograd adds.
        no_c_functionalize = torch._C._ExcludeDispatchKeyGuard(
            torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize))
        with no_c_functionalize, FunctionalTensorMode():
            wrapped = [FunctionalTensor.to_functional(a) if isinstance(a, torch.Tensor) else a
                       for a in args]
            out = pytree.tree_map_only(FunctionalTensor, unwrap, interp.run(*wrapped))
            for a, w in zip(args, wrapped):
                if isinstance(w, FunctionalTensor):
                    new = unwrap(w)  # synced: a write into the input is now recorded
                    if torch._functionalize_has_data_mutation(w.elem):
                        a.copy_(new)
        return out

    # The Python dispatcher, as AOTAutograd enables it: with Dynamo's symbolic sizes, a meta
    # function that calls a composite op (linalg_solve_triangular's expand) would otherwise
    # reach its C++ kernel, which takes only concrete sizes.
    with torch.no_grad(), fake_mode, enable_python_dispatcher():
        traced = make_fx(run, decomposition_table=_decomposition_table(),
                         tracing_mode="real", _allow_non_fake_inputs=False)(*fake_inputs)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced
