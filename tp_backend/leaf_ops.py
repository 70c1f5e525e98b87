"""Leaf ops: attention and cross-entropy kept whole through the ATen decomposition.

``F.scaled_dot_product_attention`` would otherwise decompose into a device-specific kernel
(``_scaled_dot_product_flash_attention_for_cpu`` here, other kernels on CUDA) and
``F.cross_entropy`` into log-softmax and nll-loss; the reference design keeps both as leaf
functions so one rule covers each. They are registered as ``torch.library`` custom ops, so
the ATen graph stays traceable by AOTAutograd and Inductor (which calls them as opaque
kernels).

Both are differentiable (``register_autograd``): the backward formulas are written with
plain ATen ops, so AOTAutograd traces them into the backward graph of a training graph.

Owns: the custom ops ``tp_backend::sdpa`` and ``tp_backend::cross_entropy`` (kernels, fake
kernels and autograd formulas), ``tp_backend::sdpa_inference`` (attention's kernel without a
backward, for inference graphs), registering their rules, and ``LEAF_FUNCTIONS`` (the
Dynamo-level callables routed to them). Must not: decide their placements (the rules are in
:mod:`tp_backend.rules.attention`), or trace graphs (:mod:`tp_backend.decompose` routes
calls through ``LEAF_FUNCTIONS``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .errors import TPTrainingError
from . import rng
from .dispatch import plain_op
from .rules.attention import register_leaf_rules

__all__ = ["sdpa", "sdpa_inference", "cross_entropy", "LEAF_FUNCTIONS"]


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
          is_causal: bool = False, scale: Optional[float] = None,
          enable_gqa: bool = False, seed: Optional[torch.Tensor] = None,
          rng_rank: int = 0) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as one op: ``q: [B, H, S, D]``, ``k, v: [B, Hkv,
    S, D]`` -> ``[B, H, S, Dv]``. The result is contiguous (the fake kernel says so too, so
    views traced after it stay valid whatever kernel the dispatcher picks).

    With ``dropout_p > 0`` and a ``seed`` (a 0-dim int64 tensor the decomposition draws
    from the default generator), the dropout mask on the probabilities ``[B, H, S, S_kv]``
    comes from :func:`tp_backend.rng.keep_mask` of ``(seed, rng_rank)`` (the rewrite sets
    ``rng_rank`` to the rank where the heads are split: independent masks per shard), and
    backward regenerates it."""
    if dropout_p and seed is not None:
        work = torch.promote_types(query.dtype, torch.float32)
        p, _, vr = _probabilities(query, key, value, attn_mask, is_causal, scale, work)
        keep = rng.keep_mask(p.shape, dropout_p, seed, rng_rank, p.device)
        out = torch.matmul(p * keep / (1.0 - dropout_p), vr)
        return out.to(query.dtype).contiguous()
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                         dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, enable_gqa=enable_gqa)
    return out.contiguous()


def _sdpa_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False, seed=None, rng_rank=0):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


# The differentiable op the decomposition routes attention to (its rules are in
# tp_backend.rules.attention; its backward is registered below).
sdpa = torch.library.custom_op("tp_backend::sdpa", _sdpa, mutates_args=())
sdpa.register_fake(_sdpa_fake)
# The same kernel without a backward, for graphs that are not differentiated: the rewrite of
# an inference graph (tp_backend.rewrite) calls it instead of ``sdpa``, which saves the
# Python autograd layer custom_op runs on every call (tp_backend.dispatch; about 6 µs, once
# per layer per forward).
sdpa_inference = plain_op("tp_backend::sdpa_inference", _sdpa, _sdpa_fake)


def _probabilities(q, k, v, mask, is_causal, scale, work):
    """``(softmax(q k^T * scale + mask), k, v)`` in dtype ``work``, the KV heads repeated
    for their query heads (q: [B, H, L, D], k: [B, Hkv, S, D] -> p: [B, H, L, S])."""
    q, k, v = q.to(work), k.to(work), v.to(work)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    rep = q.shape[-3] // k.shape[-3]
    kr = k.repeat_interleave(rep, dim=-3) if rep > 1 else k
    vr = v.repeat_interleave(rep, dim=-3) if rep > 1 else v
    s = torch.matmul(q, kr.transpose(-2, -1)) * scale  # [B, H, L, S]
    if is_causal:
        keep = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(work)
    return torch.softmax(s, dim=-1).nan_to_num(0.0), kr, vr  # a fully masked row: zeros


def _sdpa_setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed, rng_rank = \
        inputs
    if dropout_p and seed is None and any(ctx.needs_input_grad[:3]):
        raise TPTrainingError(  # pragma: no cover - the decomposition always gives a seed
            "tp_auto: attention dropout (dropout_p > 0) without a seed in a training graph")
    ctx.mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(query, key, value, attn_mask, seed)
    ctx.is_causal, ctx.scale, ctx.dropout_p, ctx.rng_rank = is_causal, scale, dropout_p, rng_rank


def _sdpa_backward(ctx, grad):
    """Gradients of ``dropout(softmax(q k^T * scale + mask)) v`` (q: [B, H, L, D], k: [B,
    Hkv, S, D], v: [B, Hkv, S, Dv], grad: [B, H, L, Dv]), recomputing the probabilities p
    (and the dropout keep mask M from its seed; pd = p M / (1 - dropout_p), or p): dv = pd^T
    g, dpd = g v^T, dp = dpd M / (1 - dropout_p), ds = p * (dp - rowsum(dp * p)), dq = ds k
    * scale, dk = ds^T q * scale. KV heads shared by ``H / Hkv`` query heads get the sum of
    their gradients; an additive float mask (a learned position bias) gets ds, summed over
    the dims it broadcasts on."""
    q0, k0, v0, mask, seed = ctx.saved_tensors
    # In float32 at least (bf16 inputs under autocast: fp32 accumulation, as the fused
    # kernels' backward does), cast back to each input's dtype at the end.
    work = torch.promote_types(q0.dtype, torch.float32)
    p, kr, vr = _probabilities(q0, k0, v0, mask, ctx.is_causal, ctx.scale, work)
    scale = ctx.scale if ctx.scale is not None else q0.shape[-1] ** -0.5
    q = q0.to(work)
    g = grad.to(work)
    if ctx.dropout_p:
        kept = rng.keep_mask(p.shape, ctx.dropout_p, seed, ctx.rng_rank, p.device).to(work)
        kept = kept / (1.0 - ctx.dropout_p)
        dv = torch.matmul((p * kept).transpose(-2, -1), g)
        dp = torch.matmul(g, vr.transpose(-2, -1)) * kept
    else:
        dv = torch.matmul(p.transpose(-2, -1), g)
        dp = torch.matmul(g, vr.transpose(-2, -1))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kr) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q) * scale
    rep = q0.shape[-3] // k0.shape[-3]
    if rep > 1:
        dk = dk.unflatten(-3, (k0.shape[-3], rep)).sum(-3)
        dv = dv.unflatten(-3, (v0.shape[-3], rep)).sum(-3)
    dmask = ds.sum_to_size(mask.shape).to(mask.dtype) if ctx.mask_grad else None
    return (dq.to(q0.dtype), dk.to(k0.dtype), dv.to(v0.dtype), dmask) + (None,) * 6


sdpa.register_autograd(_sdpa_backward, setup_context=_sdpa_setup)


@torch.library.custom_op("tp_backend::cross_entropy", mutates_args=())
def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  reduction: int = 1, ignore_index: int = -100,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """``torch._C._nn.cross_entropy_loss`` as one op (``reduction``: 0 none, 1 mean, 2 sum)."""
    return torch._C._nn.cross_entropy_loss(input, target, weight, reduction, ignore_index,
                                           label_smoothing).clone()


@cross_entropy.register_fake
def _ce_fake(input, target, weight=None, reduction=1, ignore_index=-100, label_smoothing=0.0):
    if reduction == 0:
        return input.new_empty(target.shape)
    return input.new_empty(())


def _ce_setup(ctx, inputs, output):
    input, target, weight, reduction, ignore_index, label_smoothing = inputs
    if ctx.needs_input_grad[0] and (weight is not None or target.is_floating_point()):
        raise TPTrainingError("tp_auto: training with a class-weighted cross-entropy or with "
                              "probability targets is not supported yet")
    ctx.save_for_backward(input, target)
    ctx.reduction, ctx.ignore_index, ctx.smoothing = reduction, ignore_index, label_smoothing


def cross_entropy_row_scale(valid: torch.Tensor, grad: torch.Tensor, reduction: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """What each row's cross-entropy gradient is multiplied by (shape of ``valid``: ``[N]``
    or ``[N, d...]``): 0 where the target is ignored, else the upstream gradient -- its own
    row's for ``reduction`` 0 (none), the scalar for 2 (sum), the scalar over the number
    of counted rows for 1 (mean, PyTorch's definition). Shared with
    :mod:`tp_backend.vocab_loss`."""
    scale = valid.to(dtype)
    if reduction == 1:
        return scale * (grad / valid.sum().to(dtype))
    return scale * grad


def _ce_backward(ctx, grad):
    """Gradient of cross-entropy over class dim 1 of ``input`` ([N, C] or [N, C, d...]) for
    class-index targets: ``softmax(x) - q`` per counted row, where q is the one-hot target
    smoothed as ``(1 - e) onehot + e / C``; rows whose target is ``ignore_index`` get 0; a
    mean divides by the number of counted rows (PyTorch's definition)."""
    x, target = ctx.saved_tensors
    valid = target != ctx.ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    p = torch.softmax(x.float(), dim=1)
    onehot = torch.zeros_like(p).scatter(1, safe.unsqueeze(1), 1.0)
    if ctx.smoothing:
        onehot = onehot * (1.0 - ctx.smoothing) + ctx.smoothing / x.shape[1]
    d = (p - onehot) * cross_entropy_row_scale(valid, grad, ctx.reduction, p.dtype).unsqueeze(1)
    return d.to(x.dtype), None, None, None, None, None


cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup)


register_leaf_rules(torch.ops.tp_backend.sdpa.default, torch.ops.tp_backend.cross_entropy.default)

def _functional_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                              reduce=None, reduction="mean", label_smoothing=0.0):
    """``F.cross_entropy``'s signature on the leaf op (Dynamo keeps ``F.cross_entropy``
    itself as the graph's call, not the ``torch._C._nn`` function it calls)."""
    from torch.nn import _reduction

    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    return torch.ops.tp_backend.cross_entropy.default(
        input, target, weight, _reduction.get_enum(reduction), ignore_index, label_smoothing)


def _functional_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                     scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention``'s signature on the leaf op; with dropout, a seed
    drawn here from the default generator (a graph op: every rank draws it alike) makes
    the mask reproducible in backward and per rank (:mod:`tp_backend.rng`)."""
    seed = rng.draw_seed(query.device) if dropout_p else None
    return torch.ops.tp_backend.sdpa.default(query, key, value, attn_mask, dropout_p,
                                             is_causal, scale, enable_gqa, seed)


# Dynamo-level callables that the decomposition routes to the leaf ops above.
LEAF_FUNCTIONS = {
    F.cross_entropy: _functional_cross_entropy,
    torch._C._nn.scaled_dot_product_attention: _functional_sdpa,
    F.scaled_dot_product_attention: _functional_sdpa,
    torch._C._nn.cross_entropy_loss: torch.ops.tp_backend.cross_entropy.default,
}
