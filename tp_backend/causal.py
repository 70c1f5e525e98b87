"""Attention masks that are the causal pattern, computed in the graph: attention made causal.

transformers builds its attention mask inside the model's forward. Run eagerly, it finds
that a mask would only say "causal" and passes ``attn_mask=None, is_causal=True`` to scaled
dot-product attention. Under ``torch.compile`` it cannot look at the data while tracing, so
a forward without a KV cache (the full-logits forward, every training step) builds the
mask ``[B, 1, L, S]`` in the graph from ``arange`` (its check for packed sequences
included) and attention reads it: PyTorch's CPU flash-attention kernel then computes every
block, where ``is_causal=True`` skips the blocks above the diagonal (about 30 % of
attention's time at L = S = 512).

:func:`make_masks_causal` finds each ``tp_backend::sdpa`` whose mask depends on no graph
input (only on constants and the graph's static sizes, so it is the same tensor on every
call), evaluates that mask once, and where it is exactly the causal pattern of
``is_causal=True`` (``tril(ones(L, S))``, top-left aligned, the same in every batch and
head; as booleans, or as an additive float mask of 0 and -inf) it calls attention with
``attn_mask=None, is_causal=True`` instead. Attention then computes the same function; the
mask's subgraph is left unused and removed. A mask that depends on an input (padding, a
KV cache's positions), uses symbolic sizes or random ops, or is too large to evaluate is
left as it is.

Owns: :func:`make_masks_causal`: which masks are constant, evaluating them, the comparison
with the causal pattern and the switch of the attention call. Must not: decide placements
(the solver) or define the attention op (:mod:`tp_backend.leaf_ops`).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from . import nodemeta

log = logging.getLogger("tp_backend")

__all__ = ["make_masks_causal"]

# The largest intermediate (elements) evaluated to check a mask: [1, 1, 4096, 4096] fits.
MAX_EVAL_NUMEL = 1 << 24

_ATTN_MASK = 3  # tp_backend::sdpa(query, key, value, attn_mask, dropout_p, is_causal, ...)
_IS_CAUSAL = 5


def _sdpa_op():
    from .leaf_ops import sdpa  # noqa: F401 - registers the op

    return torch.ops.tp_backend.sdpa.default


def _static_val(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return not free_symbols(val) and val.numel() <= MAX_EVAL_NUMEL
    return isinstance(val, (int, float, bool))


def _constant_subgraph(mask: fx.Node) -> list[fx.Node] | None:
    """The nodes ``mask`` is computed from, in graph order, if none is an input, a
    random or mutating op, or has a symbolic or too large value; else ``None``."""
    seen, stack = set(), [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            return None
        if n.target.namespace != "aten" or n.target._schema.is_mutable \
                or torch.Tag.nondeterministic_seeded in n.target.tags:
            return None
        if not _static_val(n):
            return None
        stack.extend(n.all_input_nodes)
    return [n for n in mask.graph.nodes if n in seen]


def _evaluate(nodes: list[fx.Node]) -> torch.Tensor | None:
    """Run ``nodes`` (a constant subgraph, in graph order) on real CPU tensors; the last
    node's value, or ``None`` where an op fails. Every tensor of the subgraph is made in it
    (``arange``, ``full``), so its values do not depend on the device the graph names
    (CPU here even for a graph traced on the meta device, as ``tp_backend.planning``
    does)."""
    env: dict = {}
    try:
        with torch.no_grad():
            for n in nodes:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
                if "device" in kwargs:
                    kwargs = {**kwargs, "device": torch.device("cpu")}
                env[n] = n.target(*args, **kwargs)
    except Exception as e:  # an op this cannot run here: the mask stays as it is
        log.debug("tp_auto: the attention mask %s could not be evaluated (%s: %s); it stays",
                  nodes[-1].name, type(e).__name__, e)
        return None
    return env[nodes[-1]]


def _is_causal_pattern(mask: torch.Tensor, L: int, S: int) -> bool:
    """Whether ``mask`` ``[..., L, S]`` says the same as ``is_causal=True`` for a query of
    ``L`` and a key of ``S`` positions in every batch and head: the lower triangle
    (``tril``, top-left aligned) attends, nothing else does."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (L, S):
        return False
    causal = torch.ones(L, S, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    if mask.is_floating_point():
        allowed = torch.where(causal, torch.zeros((), dtype=mask.dtype, device=mask.device),
                              torch.full((), float("-inf"), dtype=mask.dtype, device=mask.device))
        return bool((mask == allowed).all())
    return False


def make_masks_causal(gm: fx.GraphModule) -> int:
    """Call attention with ``is_causal=True`` wherever its mask is a constant of the graph
    equal to the causal pattern (see the module's docstring). ``gm`` is a decomposed graph
    (:func:`tp_backend.decompose.decompose`) with fake values in ``node.meta["val"]``;
    it is changed in place (the unused mask nodes removed, the code recompiled).

    Returns:
        The number of attention calls made causal.
    """
    sdpa = _sdpa_op()
    done, values = 0, {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not sdpa:
            continue
        args = list(node.args)
        if len(args) <= _ATTN_MASK or not isinstance(args[_ATTN_MASK], fx.Node) or node.kwargs:
            continue
        if len(args) > _IS_CAUSAL and args[_IS_CAUSAL]:
            continue
        mask = args[_ATTN_MASK]
        q, k = args[0].meta.get("val"), args[1].meta.get("val")
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) \
                or free_symbols(q) or free_symbols(k):
            continue
        L, S = int(q.shape[-2]), int(k.shape[-2])
        if mask not in values:  # evaluated once; compared per call (its L and S)
            nodes = _constant_subgraph(mask)
            values[mask] = _evaluate(nodes) if nodes is not None else None
        if values[mask] is None or not _is_causal_pattern(values[mask], L, S):
            continue
        args[_ATTN_MASK] = None
        if len(args) == _IS_CAUSAL - 1:
            args.append(0.0)  # dropout_p's default
        if len(args) == _IS_CAUSAL:
            args.append(True)
        args[_IS_CAUSAL] = True
        node.args = tuple(args)
        done += 1
        log.debug("tp_auto: %s: its mask %s is the causal pattern; attention runs with "
                  "is_causal=True", nodemeta.describe(node), mask.name)
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        log.info("tp_auto: %d attention call(s) read a mask equal to the causal pattern, built "
                 "in the graph; they run with is_causal=True instead", done)
    return done
