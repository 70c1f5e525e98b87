"""Rules for convolutions (``aten.convolution``: ``conv1d``/``conv2d``/``conv3d``).

``convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups)``
with ``x: [B, C_in, *S]``, ``w: [C_out, C_in / G, *K]``, ``bias: [C_out]``, ``G = groups``.
Output channels ``[g * C_out / G, (g + 1) * C_out / G)`` read only the input channels
``[g * C_in / G, (g + 1) * C_in / G)``:

* a batch shard (``x`` split on ``B``) stays, with ``w`` and ``bias`` whole;
* a channel shard whose every rank's part is a run of whole groups splits the groups: the
  rank convolves its channels with its slice of ``w`` and ``bias`` and ``groups`` becomes
  its local group count. This is the depthwise ``conv1d`` (``G = C``) of gated DeltaNet
  (Qwen3-Next) and Mamba-2 over the channels of a column-parallel projection;
* ``w`` split on ``C_out`` with ``x`` whole and ``G = 1`` is column-parallel (output split
  on channels).

Transposed convolutions and splits of ``C_in`` that cut a group are not proven.

Owns: the rule of ``aten.convolution``. Must not: set the local ``groups`` argument
(:mod:`tp_backend.local_args` does), change the graph (:mod:`tp_backend.rewrite`), or veto
the column seed it meets (:mod:`tp_backend.solver`).
"""

from __future__ import annotations

import torch

from ..placement import PARTIAL, REPLICATE, Shard
from . import Decision, arg, register, static_int

aten = torch.ops.aten


def _scaled(p: Shard, size: int, per_in: int, per_out: int, tp_size: int) -> Shard | None:
    """The channel shard of the output (of ``w``'s dim 0) for an input channel shard ``p``
    of ``size`` channels, groups of ``per_in`` input and ``per_out`` output channels; None
    if a rank's part of some block is not whole groups."""
    blocks = p.block_sizes(size)
    if any(b % per_in for b in blocks):
        return None
    if p.units is not None:
        if any((b // p.units) % per_in for b in blocks):
            return None
    elif any((b // tp_size) % per_in for b in blocks):
        return None
    if p.blocks is not None:
        return Shard(1, blocks=tuple(b // per_in * per_out for b in blocks))
    return Shard(1, p.outer, None, p.units, p.counts)


@register(aten.convolution)
def _convolution(ctx, node):
    x, w, bias = arg(node, "input"), arg(node, "weight"), arg(node, "bias")
    transposed, groups = arg(node, "transposed"), static_int(arg(node, "groups"))
    px, pw = ctx.placement(x), ctx.placement(w)
    pbias = ctx.placement(bias) if isinstance(bias, torch.fx.Node) else None
    if pw.is_partial() or (pbias is not None and pbias.is_partial()):
        return None
    whole = {t: REPLICATE for t in (w, bias) if isinstance(t, torch.fx.Node)}
    if px.is_partial():  # linear in x; a bias would be added once per rank
        if pbias is None and pw.is_replicate():
            return Decision(out=PARTIAL)
        return Decision(out=REPLICATE, inputs={x: REPLICATE, **whole})
    if px.is_replicate() and pw.is_replicate():
        return Decision(out=REPLICATE, inputs=whole)
    if px.is_shard(0):
        return Decision(out=px, inputs=whole)
    if transposed or groups is None:
        return None
    if px.is_replicate() and pw.is_shard(0) and groups == 1:
        need = {bias: pw} if pbias is not None else {}
        return Decision(out=pw.moved(1), inputs=need)
    if not px.is_shard(1):
        return None
    c_in, c_out = static_int(ctx.shape(x)[1]), static_int(ctx.shape(w)[0])
    if c_in is None or c_out is None or c_in % groups or c_out % groups:
        return None
    per_in, per_out = c_in // groups, c_out // groups
    out = _scaled(px, c_in, per_in, per_out, ctx.tp_size)
    if out is None:
        return None
    need = {w: out.moved(0)}
    if pbias is not None:
        need[bias] = out.moved(0)
    return Decision(out=out, inputs=need)  # groups: the local count (tp_backend.local_args)
