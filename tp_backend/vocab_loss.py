"""Vocab-parallel cross-entropy: the loss on logits split over the vocabulary, without
gathering them.

Where the logits reaching ``F.cross_entropy`` are split on the class dim (a vocab-parallel
LM head), the rewrite puts :func:`vocab_parallel_cross_entropy` in place of the
cross-entropy leaf op. Each rank holds the logits of its classes ``x: [N, C/n, d...]``
(``d...``: optional extra dims, as ``F.cross_entropy`` allows) and computes, per row, with
two all-reduces over the tensor-parallel group (Megatron-LM's VocabParallelCrossEntropy,
Shoeybi et al., 2019; the reference design's ``VocabParallelCrossEntropyLoss``):

* ``m = max_c x`` -- all-reduce MAX (subtracted before ``exp``, for range);
* ``s = sum_c exp(x - m)``, the target's logit ``x_t`` (from the one rank holding class
  ``t``; 0 elsewhere) and, with label smoothing, ``sum_c x`` -- one all-reduce SUM;
* ``loss = (1 - e) (log s + m - x_t) + e (log s + m - sum_c x / C)``, 0 for rows whose target
  is ``ignore_index``; reduced as PyTorch does (mean over the counted rows, sum, none).

Backward needs no communication: ``d x = (softmax(x) - q) g`` on the local classes, with
``softmax`` from the saved ``log s + m`` and ``q`` the (smoothed) one-hot target, which is
this rank's slice of the whole gradient (the dual of the logits' placement, see
:mod:`tp_backend.conjugates`). The whole ``[N, C]`` logits, probabilities and gradient
never exist on a rank: the loss's memory is ``1/n`` of the gathered version's.

Owns: the custom op ``tp_backend::vocab_parallel_cross_entropy`` (kernel, fake, autograd).
Must not: decide where it goes (:mod:`tp_backend.rules.attention` and
:mod:`tp_backend.rewrite` do).
"""

from __future__ import annotations

import torch

from .leaf_ops import cross_entropy_row_scale

__all__ = ["vocab_parallel_cross_entropy"]


def _all_reduce(x: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
    from torch.distributed._functional_collectives import all_reduce

    return torch.ops._c10d_functional.wait_tensor(all_reduce(x.contiguous(), op, group_name))


def _forward_parts(x, target, class_start, num_classes, group_name, ignore_index,
                   label_smoothing):
    """``(loss per row, log-sum-exp per row, counted rows)`` in float32."""
    x = x.float()
    n_local = x.shape[1]
    valid = target != ignore_index
    local_t = target - class_start
    mine = valid & (local_t >= 0) & (local_t < n_local)
    safe = torch.where(mine, local_t, torch.zeros_like(local_t))
    m = _all_reduce(x.detach().amax(dim=1), "max", group_name)
    # one [N, C/n] temporary, exponentiated in place
    sum_exp = (x.detach() - m.unsqueeze(1)).exp_().sum(dim=1)
    x_t = torch.where(mine, x.gather(1, safe.unsqueeze(1)).squeeze(1), torch.zeros_like(m))
    parts = [sum_exp, x_t]
    if label_smoothing:
        parts.append(x.sum(dim=1))
    summed = _all_reduce(torch.stack(parts), "sum", group_name)
    lse = torch.log(summed[0]) + m
    loss = lse - summed[1]
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (
            lse - summed[2] / num_classes)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, lse, valid


def _reduce(loss, valid, reduction: int):
    if reduction == 0:
        return loss
    if reduction == 2:
        return loss.sum()
    return loss.sum() / valid.sum()


@torch.library.custom_op("tp_backend::vocab_parallel_cross_entropy", mutates_args=())
def vocab_parallel_cross_entropy(x: torch.Tensor, target: torch.Tensor, class_start: int,
                                 num_classes: int, group_name: str, reduction: int = 1,
                                 ignore_index: int = -100, label_smoothing: float = 0.0
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits split over the class dim.

    Args:
        x: this rank's logits ``[N, C_local, d...]``: classes ``class_start ..
            class_start + C_local - 1`` of ``num_classes`` (``C``).
        target: class indices ``[N, d...]`` (the same on every rank); ``ignore_index``
            marks rows that do not count.
        reduction: 0 none (``[N, d...]``), 1 mean over the counted rows, 2 sum (0-dim).
        label_smoothing: as ``F.cross_entropy``'s (``e``: the target gets ``1 - e + e/C``).

    Returns:
        ``(loss, lse)``: the loss, the same on every rank, dtype of ``x``; and the
        log-sum-exp of every row over all classes ``[N, d...]`` (float32), which backward
        uses. A collective: every rank of the group calls it.
    """
    loss, lse, valid = _forward_parts(x, target, class_start, num_classes, group_name,
                                      ignore_index, label_smoothing)
    return _reduce(loss, valid, reduction).to(x.dtype), lse


@vocab_parallel_cross_entropy.register_fake
def _(x, target, class_start, num_classes, group_name, reduction=1, ignore_index=-100,
      label_smoothing=0.0):
    loss = x.new_empty(target.shape if reduction == 0 else ())
    return loss, x.new_empty(target.shape, dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, target, class_start, num_classes, group_name, reduction, ignore_index, smoothing = inputs
    ctx.save_for_backward(x, target, output[1])
    ctx.args = (class_start, num_classes, reduction, ignore_index, smoothing)


def _backward(ctx, grad, _grad_lse):
    x, target, lse = ctx.saved_tensors
    class_start, num_classes, reduction, ignore_index, smoothing = ctx.args
    valid = target != ignore_index
    n_local = x.shape[1]
    # softmax(x) on this rank's columns, then minus the (smoothed) one-hot target and
    # scaled per row, all in place in one [N, C/n] float32 tensor
    d = (x.float() - lse.unsqueeze(1)).exp_()
    local_t = target - class_start
    mine = valid & (local_t >= 0) & (local_t < n_local)
    safe = torch.where(mine, local_t, torch.zeros_like(local_t)).unsqueeze(1)
    d.scatter_add_(1, safe, mine.unsqueeze(1).to(d.dtype) * -(1.0 - smoothing))
    if smoothing:
        d.sub_(smoothing / num_classes)
    d.mul_(cross_entropy_row_scale(valid, grad, reduction, d.dtype).unsqueeze(1))
    return (d.to(x.dtype),) + (None,) * 7


vocab_parallel_cross_entropy.register_autograd(_backward, setup_context=_setup)
