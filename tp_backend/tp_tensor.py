"""The tensor a trainable sharded parameter becomes: global shape outside, this rank's shard
inside.

Owns :class:`TPTensor` (a wrapper tensor subclass), :class:`ToLocal` (the autograd edge
from a :class:`TPTensor` parameter to the local shard a compiled graph takes) and
:func:`promote` (turn a parameter ``tp_auto`` sharded into a :class:`TPTensor` parameter in
every module holding it). Must not: solve, rewrite, compile, or hold the store of split
values (:mod:`tp_backend.runtime` does).

Why a subclass. Outside the compiled graphs a user's code meets a sharded parameter through
``model.parameters()``: stock optimizers (``torch.optim.AdamW``, ``SGD``, for-loop or
``foreach``), ``torch.nn.utils.clip_grad_norm_``, ``state_dict``. A :class:`TPTensor` has
the parameter's global shape, dtype and device (so Dynamo traces the same graph as for the
whole parameter, and ``numel()`` counts the whole model), while its only data is this
rank's shard (``._local``). Element-wise work (an optimizer step, scaling by a clip
coefficient, ``zeros_like`` for optimizer state) runs on the shards, which equals the shard
of the whole computation; norms are combined over the tensor-parallel group, so
``clip_grad_norm_`` returns the norm one process computes. Any other eager operation
raises :class:`~tp_backend.errors.TPShardedModuleError` naming the op: a TPTensor never
computes a wrong number. The design follows PyTorch's DTensor (parameters that optimizers
and ``clip_grad_norm_`` understand without special code), reduced to the one placement
``tp_auto`` stores parameters in.

Under Dynamo's fake tensors (``_local`` is a ``FakeTensor``) every operation runs on an
empty stand-in of the global shape: the traced graph is the one a whole parameter gives,
and the ``tp_auto`` backend then finds the parameter's shard by identity.
"""

from __future__ import annotations

import math

import torch
from torch.utils import _pytree as pytree

from .errors import TPShardedModuleError

__all__ = ["TPTensor", "ToLocal", "FromLocal", "promote", "is_tp_tensor"]

aten = torch.ops.aten


def _fake(t: torch.Tensor) -> bool:
    return type(t) is not torch.Tensor and isinstance(t, _fake_tensor_class()) \
        or t.device.type == "meta"


def _fake_tensor_class():
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


class TPTensor(torch.Tensor):
    """A tensor of global shape ``[..., D, ...]`` whose data is this rank's shard
    ``[..., D_local, ...]`` along ``info.dim`` (the layout :class:`~tp_backend.runtime.
    ShardInfo` describes: column-, row- or vocab-parallel, blocks, padding, uneven units).

    What the model holds for a parameter ``tp_auto`` sharded while training (its gradient
    and the optimizer's state of it are TPTensors too). ``full_tensor()`` all-gathers the
    whole value (a collective); ``to_local()`` is the shard.

    Raises:
        TPShardedModuleError: an eager operation other than the element-wise ones, copies,
            ``*_like`` constructors, dtype/device conversion and vector norms.
    """

    _local: torch.Tensor
    _info: object

    @staticmethod
    def __new__(cls, local: torch.Tensor, info, requires_grad: bool = False):
        shape = tuple(info.global_shape)
        r = torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=_contiguous_strides(shape), dtype=local.dtype,
            device=local.device, requires_grad=requires_grad)
        r._local = local
        r._info = info
        return r

    def __init__(self, *args, **kwargs):
        pass

    def __tensor_flatten__(self):
        return ["_local"], self._info

    @staticmethod
    def __tensor_unflatten__(inner, info, outer_size, outer_stride):
        return TPTensor(inner["_local"], info)

    def __repr__(self, *, tensor_contents=None):
        return (f"TPTensor(global shape {list(self.shape)}, {self._info.fqn!r} split on dim "
                f"{self._info.dim}, rank {self._info.tp_rank}/{self._info.tp_size}, "
                f"local={self._local!r})")

    __torch_function__ = torch._C._disabled_torch_function_impl

    def to_local(self) -> torch.Tensor:
        """This rank's shard (a view of the data, not a copy)."""
        return self._local

    def full_tensor(self) -> torch.Tensor:
        """The whole value, all-gathered over the tensor-parallel group (padding rows cut).
        A collective: every rank of the group calls it, for the same tensors, in order."""
        from .state import gather_whole

        return gather_whole(self._local, self._info)

    # torch.distributed.checkpoint's _Checkpointable protocol (as DTensor implements it):
    # each rank writes and reads its own chunks of the global tensor -- one per range of
    # the split dim it holds, padding rows left out -- so a sharded save never gathers a
    # whole tensor, and a load reads whatever chunks this rank's layout needs (any TP size).
    def _chunks(self) -> list:
        """``[(global offsets, sizes, local start)]`` of this rank's real (unpadded) rows."""
        info, out = self._info, []
        for start, local_start, _, n in info.pieces():
            if n:
                offsets = [0] * len(info.global_shape)
                offsets[info.dim] = start
                sizes = list(info.global_shape)
                sizes[info.dim] = n
                out.append((torch.Size(offsets), torch.Size(sizes), local_start))
        return out

    def __create_write_items__(self, fqn: str, obj):
        from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata,
                                                           MetadataIndex, TensorProperties)
        from torch.distributed.checkpoint.planner import (TensorWriteData, WriteItem,
                                                          WriteItemType)

        props = TensorProperties.create_from_tensor(self._local)
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                              properties=props, size=self.size()))
                for offsets, sizes, _ in self._chunks()]

    def __create_chunk_list__(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=offsets, sizes=sizes)
                for offsets, sizes, _ in self._chunks()]

    def __get_tensor_shard__(self, index):
        for offsets, sizes, local_start in self._chunks():
            if index.offset is None or torch.Size(index.offset) == offsets:
                # a view: a load writes into the parameter's own storage
                return self._local.narrow(self._info.dim, local_start, sizes[self._info.dim])
        raise ValueError(f"{index.fqn!r}: this rank holds no chunk at offset {index.offset}")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = _first_tp_tensor(args, kwargs)
        if func in _ALIASES:
            return TPTensor(func(args[0]._local), args[0]._info)
        if _fake(first._local):
            return _on_global_stand_ins(func, args, kwargs)
        kind = _KINDS.get(func)
        if kind is None:
            kind = _KINDS[func] = _kind(func)
        if kind == "pointwise":
            return _pointwise(func, args, kwargs)
        if kind == "foreach":
            return _foreach(func, args, kwargs)
        if kind == "handler":
            return _HANDLERS[func](func, args, kwargs)
        raise TPShardedModuleError(
            f"{func} on {_what(first._info)}, global shape {list(first.shape)}, of which "
            f"this rank holds {list(first._local.shape)}: outside the compiled model a split "
            "tensor supports element-wise operations (optimizer steps), norms and copies "
            "only. Use .full_tensor() for the whole value (a collective) or .to_local() for "
            "this rank's shard")


def _what(info) -> str:
    """What a TPTensor is, for error messages: a parameter or a graph's output."""
    if info.fqn.startswith("output "):
        return (f"{info.fqn} of a graph, returned split (option 'outputs': its default 'auto' "
                "splits the logits beside a training forward's own loss; 'gather' returns "
                "them whole)")
    return f"the parameter {info.fqn!r}, which tp_auto sharded"


def _first_tp_tensor(args, kwargs) -> "TPTensor":
    """The first TPTensor among the arguments (and one level of lists: ``_foreach_*``)."""
    for a in (*args, *kwargs.values()):
        if type(a) is TPTensor:
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if type(b) is TPTensor:
                    return b
    raise AssertionError("__torch_dispatch__ without a TPTensor")  # pragma: no cover


def _kind(func) -> str:
    if func in _HANDLERS:
        return "handler"
    if func.name().startswith("aten::_foreach_"):
        return "foreach"
    if torch.Tag.pointwise in func.tags or func.overloadpacket in _LIKE:
        return "pointwise"
    return "unsupported"


_KINDS: dict = {}  # op overload -> how a TPTensor runs it (see _kind)


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def is_tp_tensor(t) -> bool:
    return isinstance(t, TPTensor)


def _on_global_stand_ins(func, args, kwargs):
    """Under fake tensors: the op on empty tensors of the global shape (what Dynamo traces)."""
    def stand_in(t):
        if isinstance(t, TPTensor):
            with t._local.fake_mode:
                return torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return t

    return func(*pytree.tree_map(stand_in, args), **pytree.tree_map(stand_in, kwargs))


def _mismatch(func, t: TPTensor, other) -> TPShardedModuleError:
    shape = list(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
    return TPShardedModuleError(
        f"{func} combines {_what(t._info)} (global shape {list(t.shape)}) with {shape}, "
        "which is not split the same way; use .full_tensor() for the whole value (a "
        "collective)")


def _unwrap_position(func, values: list):
    """The local tensors of one element-wise position: TPTensors must share one layout,
    plain tensors must broadcast as scalars (0-dim). Returns (locals, info or None)."""
    info = next((v._info for v in values if isinstance(v, TPTensor)), None)
    if info is None:
        return values, None
    first = next(v for v in values if isinstance(v, TPTensor))
    out = []
    for v in values:
        if isinstance(v, TPTensor):
            if not _same_layout(v._info, info):
                raise _mismatch(func, first, v)
            out.append(v._local)
        elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() != 1:
            raise _mismatch(func, first, v)
        else:
            out.append(v)
    return out, info


def _padding_rows(info) -> list:
    """``(local start, length)`` of the rows of the local shard past the real size of a
    padded dim (a vocabulary padded to a multiple of the TP size)."""
    if not info.padded:
        return []
    return [(local_start + n, length - n) for _, local_start, length, n in info.pieces()
            if n < length]


def _keep_padding_zero(local: torch.Tensor, info) -> torch.Tensor:
    """Padding rows stay zero whatever an element-wise op made of them (``p.add_(1)``):
    they are no part of the value, and a norm must not count them."""
    for start, length in _padding_rows(info):
        local.narrow(info.dim, start, length).zero_()
    return local


def _same_layout(a, b) -> bool:
    return a is b or a == b or (a.global_shape, a.ranges()) == (b.global_shape, b.ranges())


def _pointwise(func, args, kwargs):
    """An element-wise op on the local shards: TPTensor operands of one layout, other
    tensor operands 0-dim or of one element (they broadcast alike on every shard)."""
    info, first, largs = None, None, []
    for a in args:
        if type(a) is TPTensor:
            if info is None:
                info, first = a._info, a
            elif not _same_layout(a._info, info):
                raise _mismatch(func, first, a)
            largs.append(a._local)
        elif isinstance(a, torch.Tensor) and a.dim() > 0 and a.numel() != 1:
            raise _mismatch(func, _first_tp_tensor(args, kwargs), a)
        else:
            largs.append(a)
    lkwargs = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):  # e.g. out=, or a tensor passed by keyword
            if type(v) is not TPTensor and (v.dim() > 0 and v.numel() != 1) or \
                    type(v) is TPTensor and info is not None and not _same_layout(v._info, info):
                raise _mismatch(func, _first_tp_tensor(args, kwargs), v)
            if type(v) is TPTensor:
                info = info or v._info
                v = v._local
        lkwargs[k] = v
    mutable = func._schema.is_mutable
    if mutable and type(args[0]) is not TPTensor:
        raise _mismatch(func, _first_tp_tensor(args, kwargs), args[0])
    out = func(*largs, **lkwargs)
    if mutable:  # in place: the TPTensor written into
        if info.padded:
            _keep_padding_zero(args[0]._local, info)
        return args[0]
    if isinstance(out, torch.Tensor):
        return TPTensor(_keep_padding_zero(out, info) if info.padded else out, info)
    return pytree.tree_map(
        lambda o: TPTensor(_keep_padding_zero(o, info), info)
        if isinstance(o, torch.Tensor) and o.dim() > 0 else o, out)


def _foreach(func, args, kwargs):
    """``_foreach_*`` ops (element-wise per list position; ``_foreach_norm`` combined over
    the group)."""
    if func.overloadpacket is aten._foreach_norm:
        return _foreach_norm(*args, **kwargs)
    if func.overloadpacket in (aten._foreach_max,):
        raise TPShardedModuleError(f"{func} on sharded parameters is not supported")
    lists = [i for i, a in enumerate(args) if isinstance(a, (list, tuple))]
    n = len(args[lists[0]])
    new_args = [list(a) if isinstance(a, (list, tuple)) else a for a in args]
    infos = []
    for k in range(n):
        values = [args[i][k] for i in lists]
        local, info = _unwrap_position(func, values)
        for i, v in zip(lists, local):
            new_args[i][k] = v
        infos.append(info)
    kw = {key: _unwrap_scalar_like(v) for key, v in kwargs.items()}
    out = func(*new_args, **kw)
    if out is None or func._schema.is_mutable:
        for t, info in zip(new_args[lists[0]], infos):
            if info is not None:
                _keep_padding_zero(t, info)
        return None
    return [TPTensor(_keep_padding_zero(o, info), info) if info is not None else o
            for o, info in zip(out, infos)]


def _unwrap_scalar_like(v):
    if isinstance(v, TPTensor):
        raise TPShardedModuleError("a sharded parameter cannot be a scalar argument")
    return v


def _local_norm_power(x: torch.Tensor, ord: float, dtype=None) -> torch.Tensor:
    """What combines over the ranks: ``sum |x|^ord`` (0-dim, float32 at least), the max
    of ``|x|`` for ``ord = inf`` (min for ``-inf``), the count of non-zeros for 0."""
    if math.isinf(ord):
        return torch.linalg.vector_norm(x, ord, dtype=dtype).float()
    if ord == 0:
        return torch.linalg.vector_norm(x, 0, dtype=dtype).float()
    return torch.linalg.vector_norm(x, ord, dtype=dtype).float().pow(ord)


def _combine_norms(powers: list, infos: list, ord: float) -> list:
    """Combine local norm powers of sharded tensors over their groups (one collective per
    group) and take the root: the norms of the whole tensors."""
    from torch.distributed._functional_collectives import all_reduce as fc_all_reduce

    out = list(powers)
    by_group: dict = {}
    for k, info in enumerate(infos):
        if info is not None:
            by_group.setdefault(info.group_name, []).append(k)
    reduce_op = "max" if ord == math.inf else "min" if ord == -math.inf else "sum"
    for group_name, ks in sorted(by_group.items()):
        stacked = torch.stack([powers[k] for k in ks])
        total = fc_all_reduce(stacked, reduce_op, group_name)
        total = torch.ops._c10d_functional.wait_tensor(total)
        for j, k in enumerate(ks):
            out[k] = total[j]
    return [o if math.isinf(ord) or ord == 0 or infos[k] is None else o.pow(1.0 / ord)
            for k, o in enumerate(out)]


def _norm_handler(func, args, kwargs):
    x, ord = args[0], (args[1] if len(args) > 1 else kwargs.get("ord", 2))
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
    dtype = kwargs.get("dtype")
    if dim not in (None, [], ()) or keepdim:
        raise TPShardedModuleError(
            f"{func} over some dims of the sharded parameter {x._info.fqn!r}: only the norm "
            "of the whole tensor is supported; use .full_tensor() for the whole value")
    ord = float(ord)
    power = _local_norm_power(x._local, ord, dtype)
    norm = _combine_norms([power], [x._info], ord)[0]
    return norm.to(dtype or x.dtype)


def _foreach_norm(tensors, ord=2, dtype=None):
    ord = float(ord)
    powers, infos = [], []
    for t in tensors:
        if isinstance(t, TPTensor):
            powers.append(_local_norm_power(t._local, ord, dtype))
            infos.append(t._info)
        else:
            powers.append(torch.linalg.vector_norm(t, ord, dtype=dtype))
            infos.append(None)
    norms = _combine_norms(powers, infos, ord)
    return [n.to(dtype or t.dtype) for n, t in zip(norms, tensors)]


def _copy_handler(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, TPTensor):
        raise TPShardedModuleError(
            f"copying the sharded parameter {src._info.fqn!r} into a plain tensor; use "
            ".full_tensor() for the whole value")
    if isinstance(src, TPTensor):
        src_local = _unwrap_position(func, [dst, src])[0][1]
    elif isinstance(src, torch.Tensor) and tuple(src.shape) == tuple(dst.shape):
        src_local = dst._info.local_of(src)  # a whole value: this rank's slice of it
    elif isinstance(src, torch.Tensor) and src.dim() > 0 and src.numel() != 1:
        raise _mismatch(func, dst, src)
    else:
        src_local = src
    dst._local.copy_(src_local, *args[2:], **kwargs)
    _keep_padding_zero(dst._local, dst._info)
    return dst


def _to_copy_handler(func, args, kwargs):
    t = args[0]
    return TPTensor(func(t._local, *args[1:], **kwargs), t._info)


_ALIASES = (aten.detach.default, aten.alias.default)
_HANDLERS = {
    aten.linalg_vector_norm.default: _norm_handler,
    aten.copy_.default: _copy_handler,
    aten._to_copy.default: _to_copy_handler,
}
# (not rand_like: per-rank draws of different sizes would part the ranks' random streams)
_LIKE = {aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.clone}


class ToLocal(torch.autograd.Function):
    """``TPTensor [.., D, ..] -> local shard [.., D_local, ..]``; backward wraps the local
    gradient in a :class:`TPTensor` of the global shape, so it accumulates in the
    parameter's own ``.grad`` (where optimizers and ``clip_grad_norm_`` read it)."""

    @staticmethod
    def forward(ctx, p):
        ctx.info = p._info
        return p._local.view_as(p._local)

    @staticmethod
    def backward(ctx, grad):
        return TPTensor(grad.contiguous(), ctx.info)


class FromLocal(torch.autograd.Function):
    """``local shard [.., D_local, ..] -> TPTensor [.., D, ..]`` (an output a graph returns
    split, option ``outputs="split"``); backward hands the gradient's local shard back: a
    TPTensor gradient's own shard, or this rank's slice of a whole one."""

    @staticmethod
    def forward(ctx, local, info):
        ctx.info = info
        return TPTensor(local.view_as(local), info)

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, TPTensor):
            return grad._local, None
        return ctx.info.local_of(grad), None


def promote(t: torch.nn.Parameter, info, local: torch.Tensor, holders) -> torch.nn.Parameter:
    """A :class:`TPTensor` parameter over ``local`` (``requires_grad`` as ``t``), put in
    ``t``'s place in every module of ``holders`` (tied parameters: all of them). ``t``
    itself stays a placeholder of the global shape; optimizers built over it are moved to
    the new parameter on their next step (:mod:`tp_backend.training`)."""
    new = torch.nn.Parameter(TPTensor(local.detach(), info), requires_grad=t.requires_grad)
    for holder in holders:
        for name, value in list(holder._parameters.items()):
            if value is t:
                holder._parameters[name] = new
    return new
