"""Leaf ops: attention and cross-entropy kept whole through the ATen decomposition.

``F.scaled_dot_product_attention`` would otherwise decompose into a device-specific kernel
(``_scaled_dot_product_flash_attention_for_cpu`` here, other kernels on CUDA) and
``F.cross_entropy`` into log-softmax and nll-loss; the reference design keeps both as leaf
functions so one rule covers each. They are registered as ``torch.library`` custom ops, so
the ATen graph stays traceable by AOTAutograd and Inductor (which calls them as opaque
kernels).

Owns: the custom ops ``tp_backend::sdpa`` and ``tp_backend::cross_entropy`` (kernels and
fake kernels), registering their rules, and ``LEAF_FUNCTIONS`` (the Dynamo-level callables
routed to them). Must not: decide their placements (the rules are in
:mod:`tp_backend.rules.attention`), or trace graphs (:mod:`tp_backend.decompose` routes
calls through ``LEAF_FUNCTIONS``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .rules.attention import register_leaf_rules

__all__ = ["sdpa", "cross_entropy", "LEAF_FUNCTIONS"]


@torch.library.custom_op("tp_backend::sdpa", mutates_args=())
def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
         attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None,
         enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as one op: ``q: [B, H, S, D]``, ``k, v: [B, Hkv,
    S, D]`` -> ``[B, H, S, Dv]``. The result is contiguous (the fake kernel says so too, so
    views traced after it stay valid whatever kernel the dispatcher picks)."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                         dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, enable_gqa=enable_gqa)
    return out.contiguous()


@sdpa.register_fake
def _sdpa_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


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


register_leaf_rules(torch.ops.tp_backend.sdpa.default, torch.ops.tp_backend.cross_entropy.default)

# Dynamo-level callables that the decomposition routes to the leaf ops above.
LEAF_FUNCTIONS = {
    torch._C._nn.scaled_dot_product_attention: torch.ops.tp_backend.sdpa.default,
    F.scaled_dot_product_attention: torch.ops.tp_backend.sdpa.default,
    torch._C._nn.cross_entropy_loss: torch.ops.tp_backend.cross_entropy.default,
}
