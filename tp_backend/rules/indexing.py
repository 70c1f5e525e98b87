"""Rules for slicing, concatenation, splitting, gathering and embedding lookups, and for
factory ops (which make replicated values).

Slicing, concatenating or splitting along a dim other than the sharded one keeps the shard
(``select`` is a layout op: :mod:`~tp_backend.rules.view`); doing it along the sharded dim
is not proven (falls back). Vocab-parallel
embedding (Megatron-LM ``VocabParallelEmbedding``): the table ``W: [V, E]`` split on ``V``,
each rank looks up the ids in its range and writes zeros elsewhere, giving a ``Partial``
output. The lookup is Partial for any replicated ids, positions included (``arange``), and
stays Partial only through ops linear in it (views, slices, ``P + P``, ``P * R``: see
``elementwise``); a split saves memory only for a large table, so the solver keeps small
ones whole (``worth_vocab_split``).

Slicing, selecting, concatenating and index lookups are linear, so a ``Partial`` input gives a
``Partial`` output when every other tensor operand is an index (replicated) or Partial too.

Owns: the rules of ``slice``, ``cat``, ``constant_pad_nd``, ``stack``, ``split``/``unbind``,
``index_select``, ``gather``, ``index``, ``index_put``, ``copy_``, the factory ops
(``FACTORIES``) and ``embedding`` (the vocab-parallel seed). Must not: compute local slice
bounds or split sizes (:mod:`tp_backend.local_args`), do the masked lookup
(:func:`tp_backend.layers.vocab_parallel_embedding`, inserted by :mod:`tp_backend.rewrite`
for ``Action.VOCAB_EMBEDDING``), or decide which tables are worth splitting (the solver's
``worth_vocab_split``).
"""

from __future__ import annotations


import torch

from .. import nodemeta
from ..placement import PARTIAL, REPLICATE, Shard
from . import Action, Decision, Role, arg, divisible, norm_dim, register, static_int, tensor_inputs

aten = torch.ops.aten


def _full_range(start, end, step, size) -> bool:
    size = static_int(size)
    start = 0 if start is None else static_int(start)
    end = size if end is None else static_int(end)
    return step in (None, 1) and start == 0 and size is not None and end is not None and end >= size


def slice_bounds(start, end, size) -> tuple | None:
    """``(start, end)`` of a unit-step slice of a dim of ``size``, as Python ints: a missing
    bound filled, a negative one counted from the end, ``end`` clamped to ``size``; ``None``
    where a bound or the size is symbolic. The slice rule and the local arguments of the
    slice (:mod:`tp_backend.local_args`) read bounds through it."""
    size = static_int(size)
    start = 0 if start is None else static_int(start)
    end = size if end is None else static_int(end)
    if None in (start, end, size):
        return None
    start = start + size if start < 0 else start
    return start, min(end + size if end < 0 else end, size)


def _cuts(sizes):
    """Offsets where consecutive pieces of ``sizes`` start and end."""
    out, off = {0}, 0
    for b in sizes:
        off += b
        out.add(off)
    return out


@register(aten.slice)
def _slice(ctx, node):
    """A slice of the sharded dim is exact when it is exactly one block of a block shard
    (one of q/k/v of a fused projection): locally it is the rank's chunk of that block.
    Otherwise the slice's bounds are passed back to the seed as a preferred block layout."""
    x = arg(node, "self")
    p = ctx.placement(x)
    if not p.is_shard():
        return Decision(out=p)
    nd = len(ctx.shape(x))
    dim = norm_dim(arg(node, "dim"), nd)
    if dim != p.dim:
        return Decision(out=p)
    if nodemeta.is_unpad(node):
        # Cutting a padded vocabulary back to size (tp_backend.padding): gather, then cut,
        # as an LM head gathers its logits anyway.
        return Decision(out=REPLICATE, inputs={x: REPLICATE}, allow_gather=True)
    start, end, step = arg(node, "start"), arg(node, "end"), arg(node, "step")
    size = static_int(ctx.shape(x)[dim])
    if _full_range(start, end, step, size):
        return Decision(out=p)
    start = static_int(0 if start is None else start)
    end = static_int(size if end is None else end)
    if step not in (None, 1):
        return _strided_slice(ctx, x, dim, p, start, end, static_int(step), size)
    bounds = slice_bounds(start, end, size)
    if bounds is None:
        return None
    start, end = bounds
    if p.units is not None:  # an uneven split: the rank's part of a block is not b / N
        return None
    blocks = None if p.plain else p.block_sizes(size)
    if blocks is not None:
        off = 0
        for b in blocks:
            if (start, end) == (off, off + b):
                return Decision(out=Shard(dim))
            off += b
    ctx.prefer(x, dim, {start, end} | (_cuts(blocks) if blocks else set()))
    return None


def _strided_slice(ctx, x, dim, p, start, end, step, size):
    """``x[..., s::k]`` along the sharded dim: every ``k``-th element from ``s`` to the end
    (gate and up interleaved in one projection, as gpt-oss stores its experts' ``gate_up``).

    Exact when ``0 <= s < k`` and every rank's chunk of every block has a size divisible
    by ``k``: a rank's chunk of a block then starts at a multiple of ``k``, so the local
    ``[s::k]`` keeps exactly the elements of the global selection that fall in that chunk,
    in order, which is the rank's chunk of the corresponding output block (``b / k``
    elements for a block of ``b``)."""
    n = ctx.tp_size
    if p.units is not None:
        return None
    if None in (start, end, size, step) or not 0 <= start < step or end < size:
        return None
    blocks = p.block_sizes(size)
    if any(b % (n * step) for b in blocks):
        return None
    if p.blocks is not None:
        out = Shard(dim, blocks=tuple(b // step for b in blocks))
    else:
        out = p
    return Decision(out=out)


def _common(ctx, tensors):
    """The common placement of same-rank operands, and the conversions to reach it."""
    pls = [ctx.placement(t) for t in tensors]
    need = {}
    if any(p.is_partial() for p in pls):
        if all(p.is_partial() for p in pls):
            return PARTIAL, need
        for t, p in zip(tensors, pls):
            if p.is_partial():
                need[t] = REPLICATE
        pls = [REPLICATE if p.is_partial() else p for p in pls]
    shards = {p for p in pls if p.is_shard()}
    if not shards:
        return REPLICATE, need
    if len(shards) > 1:
        return None, need
    s, = shards
    for t, p in zip(tensors, pls):
        if p.is_replicate():
            need[t] = s
    return s, need


@register(aten.cat)
def _cat(ctx, node):
    nd = len(ctx.shape(node))
    # torch.cat skips 1-D empty tensors of any other rank (legacy; e.g. an empty KV cache).
    tensors = [t for t in arg(node, "tensors") if isinstance(t, torch.fx.Node)
               and not (len(ctx.shape(t)) == 1 and static_int(ctx.shape(t)[0]) == 0 and nd != 1)]
    dim = norm_dim(arg(node, "dim"), nd)
    if any(ctx.placement(t).is_shard(dim) for t in tensors):
        return _cat_blocks(ctx, tensors, dim)
    out, need = _common(ctx, tensors)
    if out is None or out.is_shard() and out.dim == dim:
        return None
    return Decision(out=out, inputs=need)


def _cat_blocks(ctx, tensors, dim):
    """``cat`` along the sharded dim (``torch.cat((q, k, v), -1)`` before one depthwise
    convolution over all channels, as gated DeltaNet and Mamba-2 do): each rank holds its
    chunk of every operand, in order, which is its chunk of a block shard whose blocks are
    the operands' blocks. A replicated operand is sliced to a plain shard first (free).
    Refused for uneven (``units``) or Partial operands, and for symbolic sizes."""
    blocks, need = [], {}
    for t in tensors:
        p, size = ctx.placement(t), static_int(ctx.shape(t)[dim])
        if size is None or p.is_partial():
            return None
        if p.is_replicate():
            p = need[t] = Shard(dim)
            if not p.splits(size, ctx.tp_size):
                return None
        elif p.dim != dim or p.units is not None:
            return None
        blocks += p.block_sizes(size)
    return Decision(out=Shard(dim, blocks=tuple(blocks)), inputs=need)


@register(aten.constant_pad_nd)
def _constant_pad(ctx, node):
    """``F.pad(x, pad, value=c)``: ``pad`` holds (before, after) pairs for the last dims,
    last dim first. A shard on a dim that is not padded stays; padding the sharded dim is
    not proven. Padding is linear for ``c = 0``, so a Partial input stays Partial then."""
    x, pad, value = arg(node, "self"), arg(node, "pad"), arg(node, "value")
    p = ctx.placement(x)
    if p.is_partial():
        if value == 0:
            return Decision(out=PARTIAL)
        return Decision(out=REPLICATE, inputs={x: REPLICATE})
    if p.is_replicate():
        return Decision(out=REPLICATE)
    k = len(ctx.shape(x)) - 1 - p.dim  # pairs before the sharded dim's
    if 2 * k < len(pad) and not (static_int(pad[2 * k]) == 0 and static_int(pad[2 * k + 1]) == 0):
        return None
    return Decision(out=p)


@register(aten.stack)
def _stack(ctx, node):
    tensors = list(arg(node, "tensors"))
    nd = len(ctx.shape(node))
    dim = norm_dim(arg(node, "dim"), nd)
    out, need = _common(ctx, tensors)
    if out is None:
        return None
    if out.is_shard():
        need = {t: out for t in tensors}
        out = out.moved(out.dim + (out.dim >= dim))
    return Decision(out=out, inputs=need)


@register(aten.split_with_sizes, aten.split, aten.unbind, aten.split_with_sizes_copy)
def _split(ctx, node):
    """Splitting the sharded dim is exact when the pieces are the blocks of a block shard
    (``torch.split(qkv, [q, k, v])``, ``gate_up.chunk(2)``), or runs of whole blocks (a
    piece of several blocks keeps them: a block shard itself); otherwise the cut points are
    passed back to the seed as a preferred block layout."""
    x = arg(node, "self")
    p = ctx.placement(x)
    n_out = len(node.meta["val"])
    nd = len(ctx.shape(x))
    op = node.target.overloadpacket
    dim = norm_dim(arg(node, "dim"), nd)
    if not p.is_shard():
        return Decision(out=tuple(p for _ in range(n_out)))
    if dim != p.dim:
        d = p.dim - (op is aten.unbind and dim < p.dim)
        return Decision(out=tuple(p.moved(d) for _ in range(n_out)))
    size = static_int(ctx.shape(x)[dim])
    if op is aten.unbind or size is None:
        return None
    ss = arg(node, "split_size", "split_sizes")  # (split.Tensor: an int; else a list)
    if isinstance(ss, int):
        sizes = [ss] * (size // ss) + ([size % ss] if size % ss else [])
    else:
        sizes = [static_int(v) for v in ss]
    pieces = _pieces(p.block_sizes(size), sizes) if not p.plain and p.units is None else None
    if pieces is not None:
        return Decision(out=tuple(Shard(dim, blocks=bl) for bl in pieces))
    ctx.prefer(x, dim, _cuts(sizes))
    return None


def _pieces(blocks, sizes):
    """The blocks each piece of ``sizes`` is made of, when every piece is a run of whole
    consecutive blocks (``[z | x B C | dt]`` split from blocks ``z, x, B, C, dt``), else
    None."""
    out, k = [], 0
    for want in sizes:
        got = []
        while k < len(blocks) and sum(got) < want:
            got.append(blocks[k])
            k += 1
        if sum(got) != want:
            return None
        out.append(tuple(got))
    return out if k == len(blocks) else None


@register(aten.index_select)
def _index_select(ctx, node):
    x, dim, index = arg(node, "self"), arg(node, "dim"), arg(node, "index")
    p, pi = ctx.placement(x), ctx.placement(index)
    if pi.is_shard():
        return None
    if pi.is_partial():
        return None
    if p.is_partial():
        return Decision(out=PARTIAL)
    if p.is_shard() and norm_dim(dim, len(ctx.shape(x))) == p.dim:
        return None
    return Decision(out=p)


@register(aten.gather)
def _gather(ctx, node):
    x, dim, index = arg(node, "self"), arg(node, "dim"), arg(node, "index")
    p, pi = ctx.placement(x), ctx.placement(index)
    dim = norm_dim(dim, len(ctx.shape(x)))
    if p.is_partial() or pi.is_partial():
        return None
    if p.is_replicate() and pi.is_replicate():
        return Decision(out=REPLICATE)
    s = p if p.is_shard() else pi
    if s.dim == dim or (p.is_shard() and pi.is_shard() and p != pi):
        return None
    # out[i][j] = x[i][index[i][j]] (dim 1): the split dim pairs x's rows with index's rows
    # only when both have all of them (gather allows a shorter index there).
    if static_int(ctx.shape(index)[s.dim]) != static_int(ctx.shape(x)[s.dim]):
        return None
    need = {}
    if p.is_replicate():
        need[x] = s
    if pi.is_replicate() and static_int(ctx.shape(index)[s.dim]) != 1:
        need[index] = s
    return Decision(out=s, inputs=need)


@register(aten.index)
def _index(ctx, node):
    """``x[i0, i1, ...]`` with index tensors; the sharded dim must not be indexed and the
    indexed dims must be adjacent (then the broadcast index dims replace them in place)."""
    x, indices = arg(node, "self"), arg(node, "indices")
    p = ctx.placement(x)
    idx_nodes = [i for i in indices if isinstance(i, torch.fx.Node)]
    if any(not ctx.placement(i).is_replicate() for i in idx_nodes):
        return None
    if p.is_replicate():
        return Decision(out=REPLICATE)
    if p.is_partial():
        return Decision(out=PARTIAL)
    pos = [k for k, i in enumerate(indices) if i is not None]
    if p.dim in pos or pos != list(range(pos[0], pos[-1] + 1)):
        return None
    idx_nd = max(len(ctx.shape(i)) for i in idx_nodes)
    d = p.dim if p.dim < pos[0] else p.dim - len(pos) + idx_nd
    return Decision(out=p.moved(d))


@register(aten.embedding)
def _embedding(ctx, node):
    """``embedding(W: [V, E], ids: [*]) -> [*, E]``."""
    w, ids = arg(node, "weight"), arg(node, "indices")
    pw, pi = ctx.placement(w), ctx.placement(ids)
    if not pi.is_replicate():
        if pi.is_shard() and pw.is_replicate():
            return Decision(out=pi)
        return None
    nd_out = len(ctx.shape(node))
    # scale_grad_by_freq divides each row's gradient by its id's count in the batch: a
    # rank's lookup would count the ids of other ranks' rows as its own row 0
    row_split_ok = not arg(node, "scale_grad_by_freq")
    if pw.is_replicate():
        v = ctx.shape(w)[0]
        if ctx.is_param(w) and ctx.can_seed(node) and divisible(v, ctx.tp_size) \
                and row_split_ok:
            if not ctx.worth_vocab_split(w):
                ctx.note(node, f"table {list(ctx.shape(w))} is small next to the model's "
                         "largest weight: kept whole (a split would cost an all-reduce "
                         "per lookup and save next to no memory)")
                return Decision(out=REPLICATE)
            return Decision(out=PARTIAL, inputs={w: Shard(0)}, roles={w: Role.VOCAB},
                            seed=Role.VOCAB, action=Action.VOCAB_EMBEDDING)
        if ctx.is_param(w) and not divisible(v, ctx.tp_size):
            ctx.note(node, f"vocab size {v} is not divisible by tp_size={ctx.tp_size}: "
                     "embedding replicated")
        return Decision(out=REPLICATE)
    if pw.is_shard(0) and pw.plain and row_split_ok:  # (a strided or block split is not a row range)
        return Decision(out=PARTIAL, action=Action.VOCAB_EMBEDDING)
    if pw.is_shard(1) and pw.plain:
        return Decision(out=pw.moved(nd_out - 1))
    return None


FACTORIES = [aten.full, aten.zeros, aten.ones, aten.empty, aten.empty_strided, aten.arange,
             aten.scalar_tensor, aten.rand, aten.randn, aten.randint, aten.tensor, aten.eye,
             aten.linspace, aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty,
             aten.new_empty_strided, aten.zeros_like, aten.ones_like, aten.randperm,
             aten._assert_tensor_metadata, aten._assert_async]


@register(*FACTORIES)
def _factory(ctx, node):
    """Factories make replicated values. ``new_*`` ops only read the dtype/device of their
    input, so a sharded input is fine; the output has the global size given in the args."""
    ins = tensor_inputs(node)
    if node.target.overloadpacket in (aten.zeros_like, aten.ones_like):
        p = ctx.placement(ins[0])
        return Decision(out=REPLICATE if p.is_partial() else p)
    if node.target.overloadpacket in (aten._assert_tensor_metadata, aten._assert_async):
        return Decision(out=REPLICATE)
    return Decision(out=REPLICATE, inputs={})


def _zero_filled(node) -> bool:
    """Whether ``node`` is a factory's tensor of zeros (``zeros``, ``full(.., 0)``...)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    op = getattr(node.target, "overloadpacket", None)
    if op in (aten.zeros, aten.new_zeros, aten.zeros_like):
        return True
    if op not in (aten.full, aten.new_full):
        return False
    fill = arg(node, "fill_value")
    return fill == 0 and not isinstance(fill, bool)


@register(aten.index_put)
def _index_put(ctx, node):
    """``x[indices] = values`` (a static KV cache update: ``cache[:, :, pos] = k``): a shard
    on a dim that is not indexed stays, with ``values`` split the same way.

    Accumulated into zeros (``zeros.index_add(0, idx, y)``, how JetMoE and other MoE blocks
    put the experts' rows back in token order), the result is a sum of ``values`` rows,
    linear in ``values``: Partial ``values`` give a Partial result. Reducing after the
    scatter moves ``[T, H]`` instead of the ``[T * top_k, H]`` expert rows."""
    x, indices, values = arg(node, "self"), arg(node, "indices"), arg(node, "values")
    accumulate = arg(node, "accumulate")
    p, pv = ctx.placement(x), ctx.placement(values)
    idx_nodes = [i for i in indices if isinstance(i, torch.fx.Node)]
    if any(not ctx.placement(i).is_replicate() for i in idx_nodes):
        return None
    if pv.is_partial() and p.is_replicate() and accumulate is True and _zero_filled(x):
        return Decision(out=PARTIAL, inputs={values: PARTIAL})
    if p.is_partial() or pv.is_partial():
        return None
    s = p if p.is_shard() else pv if pv.is_shard() else None
    if s is None:
        return Decision(out=REPLICATE)
    pos = [k for k, i in enumerate(indices) if i is not None]
    if len(ctx.shape(values)) != len(ctx.shape(x)) or s.dim in pos:
        return None  # (any layout of a dim that is not indexed: its columns are independent)
    if static_int(ctx.shape(values)[s.dim]) != static_int(ctx.shape(x)[s.dim]):
        return None  # values broadcast along the split dim: not this rank's slice
    return Decision(out=s, inputs={x: s, values: s})


@register(aten.copy_)
def _copy_(ctx, node):
    """The write-back that ends a functionalised graph: ``copy_(state, new)``. A split
    new value asks for the state itself to be stored split the same way (see the solver):
    a KV cache over heads, a convolution state over channels in blocks (``[x | B | C]``)."""
    dst, src = arg(node, "self"), arg(node, "src")
    pd, ps = ctx.placement(dst), ctx.placement(src)
    same_shape = ctx.shape(dst) == ctx.shape(src)  # else src broadcasts into dst
    if ps.is_shard() and same_shape and not ctx.forced_whole(node) \
            and (pd.is_replicate() or pd == ps):
        return Decision(out=ps, inputs={dst: ps}, roles={dst: Role.SHARD})
    return Decision(out=REPLICATE, inputs={dst: REPLICATE, src: REPLICATE})
