"""Vocabularies that do not divide the TP size: pad, shard, and cut the padding off.

Before solving, a parameter used as an embedding table ``W: [V, E]`` with ``V % N != 0``
(and otherwise only as the weight of a matmul, i.e. a tied or separate LM head) is
replaced in the graph by ``W_pad = pad(W): [V_pad, E]``, ``V_pad = ceil(V / N) * N``, with
zero rows. Lookups never touch the padding (ids < V). A matmul against ``W_pad`` yields
``V_pad`` logits whose last ``V_pad - V`` are zero; a slice marked ``tp_unpad`` cuts them
off, after gathering. The solver then shards ``W_pad`` like any table (vocab-parallel,
column-parallel head), so every rank holds ``V_pad / N`` rows -- the last rank's include
the zero padding (vLLM pads its vocabulary the same way).

Owns: :func:`pad_vocabularies`: which tables need padding, the ``constant_pad_nd`` node,
the fake values it changes, and the slices marked ``tp_unpad``. Must not: decide how the
padded table is split (the solver does), pad or cut the stored weights
(:mod:`tp_backend.runtime`'s :class:`~tp_backend.runtime.ShardInfo` and
:mod:`tp_backend.state`), or drop the pad node after the rewrite (:mod:`tp_backend.pipeline`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from . import nodemeta

aten = torch.ops.aten

__all__ = ["pad_vocabularies"]

_LAYOUT = {aten.t, aten.permute, aten.transpose, aten._to_copy, aten.clone, aten.alias}


def _uses_ok(node: fx.Node, padded_mm: list) -> bool:
    """Every use is an embedding table, or (through layout ops) the right operand of a
    matmul whose output columns are the vocabulary."""
    for user in node.users:
        op = getattr(user.target, "overloadpacket", None)
        if op is aten.embedding and user.args[0] is node:
            continue
        if op in _LAYOUT and len(user.meta["val"].shape) == 2:
            if op is aten._to_copy or op is aten.clone or op is aten.alias:
                if not _uses_ok(user, padded_mm):
                    return False
                continue
            for mm in user.users:
                mop = getattr(mm.target, "overloadpacket", None)
                if mop is aten.mm and mm.args[1] is user:
                    padded_mm.append(mm)
                elif mop is aten.addmm and mm.args[2] is user and not isinstance(mm.args[0], fx.Node):
                    padded_mm.append(mm)
                else:
                    return False
            continue
        return False
    return True


def pad_vocabularies(gm: fx.GraphModule, param_nodes: list, tp_size: int, fake_mode) -> dict:
    """Insert the padding for each embedding parameter whose rows do not divide
    ``tp_size``. Returns ``{placeholder: pad node}`` (the pad node then stands for the
    parameter in the solver)."""
    graph = gm.graph
    out = {}
    for w in param_nodes:
        val = w.meta.get("val")
        if val is None or val.dim() != 2:
            continue
        rows = int(val.shape[0])
        if rows % tp_size == 0:
            continue
        if not any(getattr(u.target, "overloadpacket", None) is aten.embedding and u.args[0] is w
                   for u in w.users):
            continue
        mms: list = []
        if not _uses_ok(w, mms):
            continue
        padded = -(-rows // tp_size) * tp_size
        with graph.inserting_after(w):
            pad = graph.call_function(aten.constant_pad_nd.default,
                                      (w, [0, 0, 0, padded - rows], 0.0))
        _refresh(pad, fake_mode)
        nodemeta.copy_provenance(pad, w, with_param=True)
        w.replace_all_uses_with(pad, delete_user_cb=lambda u: u is not pad)
        changed = {pad}
        for node in graph.nodes:  # shapes between the pad and the matmuls change
            if node.op == "call_function" and node is not pad and \
                    any(a in changed for a in node.all_input_nodes) and \
                    (getattr(node.target, "overloadpacket", None) in _LAYOUT or node in mms):
                _refresh(node, fake_mode)
                changed.add(node)
        for mm in mms:
            with graph.inserting_after(mm):
                cut = graph.call_function(aten.slice.Tensor, (mm, 1, 0, rows))
            _refresh(cut, fake_mode)
            nodemeta.copy_provenance(cut, mm)
            nodemeta.mark_unpad(cut)
            mm.replace_all_uses_with(cut, delete_user_cb=lambda u: u is not cut)
        out[w] = pad
    if out:
        graph.lint()
        gm.recompile()
    return out


def _refresh(node, fake_mode):
    """Recompute ``node.meta["val"]`` from its inputs' fake values."""
    args = fx.node.map_arg(node.args, lambda a: a.meta["val"])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: a.meta["val"])
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)
