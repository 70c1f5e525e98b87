"""The rewrite: a solved global ATen graph -> this rank's local ATen graph.

``rewrite(gm, solution, ...)`` applies a :class:`~tp_backend.solver.Solution` in place:

* arguments that hold global sizes become this rank's local sizes (``view(x, [B, S, 9,
  64])`` -> ``view(x, [B, S, 3, 64])`` at TP=3), from the solved placements
  (:func:`tp_backend.local_args.local_args`);
* redistributions are inserted on the edges the solver marked: a local slice of a
  replicated value, an all-reduce of a partial sum, an all-gather of a shard; each is
  inserted once per (value, placement) and reused by later consumers;
* vocab-parallel embeddings and row-parallel ``addmm`` become the layer functions of
  :mod:`tp_backend.layers`.

Sharded parameters need no graph change: their placeholders receive the local shard.

Owns: :func:`rewrite` (local arguments set, conversions inserted once per value and
placement, :class:`~tp_backend.rules.Action` nodes replaced by layer calls), the list of
inserted collectives it returns, and :func:`layer_index`. Must not: decide placements or
conversions (:mod:`tp_backend.rules`, :mod:`tp_backend.solver`), compute local argument
values (:mod:`tp_backend.local_args`), or implement what it inserts
(:mod:`tp_backend.collectives`, :mod:`tp_backend.layers`).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import torch.fx as fx

from . import collectives, layers, nodemeta
from .local_args import local_args
from .placement import Collective, HeadGroup
from .rules import Action
from .solver import Solution

__all__ = ["rewrite", "layer_index"]

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module_path: str) -> int | None:
    """The repeated-block index in a module path: ``model.layers.3.mlp`` -> 3."""
    m = _LAYER.search(module_path or "")
    return int(m.group(1)) if m else None


def rewrite(gm: fx.GraphModule, sol: Solution, *, tp_rank: int, tp_size: int,
            group_name: str, use_shm: bool = False) -> tuple[fx.GraphModule, list[dict]]:
    """Rewrite ``gm`` for rank ``tp_rank``; all-reduces (and small all-gathers) use the
    shared-memory kernel where ``use_shm`` (:mod:`tp_backend.shm`). Returns the module and
    the list of inserted collectives (``{"kind", "module", "layer", "shape"}`` each, in
    graph order)."""
    graph = gm.graph
    by_node = defaultdict(list)
    for c in sol.conversions:
        by_node[c.node].append(c)
    cache: dict = {}
    replaced: dict = {}  # nodes swapped for a layer call -> their replacement
    inserted: list[dict] = []

    def record(kind, src):
        mod = nodemeta.module(src) or ""
        val = src.meta.get("val")
        inserted.append({"kind": kind, "module": mod, "layer": layer_index(mod),
                         "shape": tuple(val.shape) if hasattr(val, "shape") else None})

    def convert(c, before):
        key = (c.src, c.want)
        if key in cache:
            return cache[key]
        with graph.inserting_before(before):
            cur = replaced.get(c.src, c.src)
            if c.collective is Collective.ALL_REDUCE:
                cur = graph.call_function(collectives.all_reduce, (cur, group_name, use_shm))
                record(Collective.ALL_REDUCE, c.src)
            elif c.collective is Collective.ALL_GATHER:
                cur = graph.call_function(collectives.all_gather,
                                          (cur, c.have.dim, c.have.outer, tp_size, group_name,
                                           c.have.blocks, tp_rank, use_shm, c.have.units))
                record(Collective.ALL_GATHER, c.src)
            if isinstance(c.want, HeadGroup):
                cur = graph.call_function(layers.kv_head_slice,
                                          (cur, c.want.dim, c.want.local_heads(tp_rank, tp_size)))
            elif c.slices:
                cur = graph.call_function(layers.local_shard,
                                          (cur, c.want.dim, c.want.outer, tp_rank, tp_size,
                                           c.want.blocks, c.want.units))
        nodemeta.copy_provenance(cur, c.src)
        cache[key] = cur
        return cur

    for node in list(graph.nodes):
        dec = sol.decisions.get(node)
        if dec is not None:
            wants = {c.src: c.want for c in by_node.get(node, ())}
            local = local_args(node, sol.placements.get(node, dec.out),
                               lambda a: wants.get(a) or sol.placements[a], tp_rank, tp_size)
            if local is not None:
                node.args, node.kwargs = local
        for c in by_node.get(node, ()):
            node.replace_input_with(replaced.get(c.src, c.src), convert(c, node))
        if dec is None or dec.action is None:
            continue
        if dec.action is Action.VOCAB_EMBEDDING:
            w, ids = node.args[0], node.args[1]
            v_global = _global_rows(node, sol)
            step = v_global // tp_size
            with graph.inserting_before(node):
                new = graph.call_function(layers.vocab_parallel_embedding,
                                          (w, ids, tp_rank * step, (tp_rank + 1) * step))
        elif dec.action is Action.ROW_ADDMM:
            bias, a, b = node.args[:3]
            with graph.inserting_before(node):
                new = graph.call_function(
                    layers.row_parallel_linear, (bias, a, b, group_name, use_shm),
                    {k: node.kwargs[k] for k in ("beta", "alpha") if k in node.kwargs})
            record(Collective.ALL_REDUCE, node)
        else:  # pragma: no cover - internal invariant
            raise AssertionError(f"unknown rewrite action {dec.action}")
        new.meta.update(node.meta)
        replaced[node] = new
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm, inserted


def _global_rows(node: fx.Node, sol: Solution) -> int:
    """Global number of rows (vocabulary size) of an embedding's table."""
    w = node.args[0]
    src = w
    # The table may have been sliced by an inserted local_shard: read the original.
    while src.op == "call_function" and src.target is layers.local_shard:
        src = src.args[0]
    return int(src.meta["val"].shape[0])


def count_collectives(inserted: list[dict]) -> Counter:
    """``Counter`` of ``(kind, layer)`` over inserted collectives."""
    return Counter((c["kind"], c["layer"]) for c in inserted)
