"""Sample calls for every ATen op overload that has a propagation rule.

Used by ``test_rules_exhaustive.py``. A sample is one concrete call ``op(*args, **kwargs)``
with real tensors; the exhaustive check gives each of its tensor inputs every placement
(replicate, partial, shard on each dim, strided shard) and checks every decision the rule
accepts on 2 and 3 simulated ranks.

Element-wise ops are sampled from their schemas (every functional overload of the packet,
tensor arguments at a common shape and broadcast against smaller ones); the other families
are written out, several shapes each. Values are floats in [0.1, 0.9] (inside the domain of
log, sqrt, asin, erfinv, logit...) in float64, so a wrong placement shows as an error many
orders of magnitude above rounding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

aten = torch.ops.aten
F64 = torch.float64


@dataclass
class Sample:
    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict = field(default_factory=dict)
    shape_only: bool = False  # uninitialised output (empty*): compare shapes, not values
    same_rng: bool = False  # random output: every rank seeds its generator alike


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def t(*shape, seed=0, dtype=F64):
    """Values in [0.1, 0.9] (float), {1..4} (int) or random bools."""
    g = _gen(seed + 7 * len(shape) + sum(shape))
    if dtype is torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(1, 5, shape, generator=g, dtype=dtype)
    return (torch.rand(shape, generator=g, dtype=F64) * 0.8 + 0.1).to(dtype)


def idx(high, *shape, seed=0):
    return torch.randint(0, high, shape, generator=_gen(seed + high))


# ------------------------------------------------------------------ schema-driven samples

# Values for required non-tensor arguments, by schema type (as ``str(arg.type)`` spells
# it: a Scalar is "number", a ScalarType "int") and, where the type is ambiguous, by name.
_BY_NAME = {"dtype": torch.float32, "rounding_mode": "floor", "min": 0.8, "max": 1.2}
_BY_TYPE = {"number": 0.75, "Optional[number]": 0.75, "float": 0.5, "int": 1, "bool": False}


def _functional_overloads(packet):
    for name in packet.overloads():
        op = getattr(packet, name)
        sch = op._schema
        if sch.is_mutable or any(a.name == "out" for a in sch.arguments):
            continue
        if [str(r.type) for r in sch.returns] != ["Tensor"]:
            continue  # e.g. where(condition) -> Tensor[], which the graph never holds
        yield op, sch


def _schema_args(sch, shapes, dtypes):
    """Arguments for ``sch``: the k-th tensor argument gets ``shapes[k]``/``dtypes[k]``
    (optional tensors too, so ``clamp.Tensor`` gets its bounds); other arguments keep
    their defaults or get a value by name or type. ``None`` if one has no sample value."""
    args, kwargs, k = [], {}, 0
    for a in sch.arguments:
        ty = str(a.type)
        if ty in ("Tensor", "Optional[Tensor]"):
            if k >= len(shapes):
                if a.has_default_value():
                    continue
                return None
            val = t(*shapes[k], seed=k, dtype=dtypes[k])
            k += 1
        elif a.name in ("min", "max") and ty == "Optional[number]":
            val = _BY_NAME[a.name]  # clamp: one bound at least
        elif a.has_default_value():
            continue
        elif a.name in _BY_NAME:
            val = _BY_NAME[a.name]
        elif ty in _BY_TYPE:
            val = _BY_TYPE[ty]
        else:
            return None
        if a.kwarg_only:
            kwargs[a.name] = val
        else:
            args.append(val)
    if k == 0:
        return None
    return tuple(args), kwargs, k


def _dtype_choices(n):
    """Dtype assignments to try, in order: all float, one bool (a mask or condition),
    all bool, all int64."""
    yield (F64,) * n
    for i in range(n):
        yield tuple(torch.bool if j == i else F64 for j in range(n))
    yield (torch.bool,) * n
    yield (torch.int64,) * n


def elementwise_samples(packet):
    """Samples of every functional overload of an element-wise ``packet``: operands of one
    shape ``[6, 12]``, and broadcast operands ``[2, 6, 12]``, ``[12]``, ``[6, 1]``."""
    out = []
    for op, sch in _functional_overloads(packet):
        n_tensor = sum(str(a.type) in ("Tensor", "Optional[Tensor]") for a in sch.arguments)
        for shapes in ([(6, 12)] * 3, [(2, 6, 12), (12,), (6, 1)]):
            for dtypes in _dtype_choices(max(n_tensor, 1)):
                built = _schema_args(sch, shapes, dtypes)
                if built is None:
                    break
                args, kwargs, _ = built
                try:
                    op(*args, **kwargs)
                except Exception:
                    continue
                out.append(Sample(op, args, kwargs,
                                  shape_only=packet in (aten.empty_like, aten.new_empty)))
                break
    return out


# ------------------------------------------------------------------ written-out samples


def _written():
    x3 = t(2, 12, 12)
    s = []
    add = lambda op, *a, **k: s.append(Sample(op, a, k))  # noqa: E731
    # casts (the CASTS table): narrowing, widening, to and from integers
    add(aten._to_copy.default, t(6, 12), dtype=torch.float32)
    add(aten._to_copy.default, t(6, 12, dtype=torch.float32), dtype=F64)
    add(aten._to_copy.default, t(6, 12, dtype=torch.int64), dtype=torch.float32)
    add(aten._to_copy.default, t(6, 12), dtype=torch.int64)
    add(aten.type_as.default, t(6, 12), t(6, 12, dtype=torch.float32))
    add(aten.type_as.default, t(6, 12, dtype=torch.float32), t(12))
    add(aten.div.Tensor_mode, t(6, 12), t(12), rounding_mode="floor")
    add(aten._conj.default, torch.complex(t(6, 12), t(6, 12, seed=1)))  # complex only
    # views
    add(aten.view.default, x3, [2, 12, 6, 2])
    add(aten.view.default, x3, [2, 12, -1, 2])
    add(aten.view.default, t(2, 6, 12, 2), [2, 6, 24])
    add(aten.view.default, t(2, 6, 4, 3), [12, 4, 3])
    add(aten.view.default, t(12, 6), [72])
    add(aten._unsafe_view.default, t(2, 12, 6, 2), [2, 12, 12])
    add(aten.reshape.default, t(12, 6), [6, 12])
    add(aten.view_copy.default, x3, [24, 12])
    add(aten.expand.default, t(1, 6, 1, 12), [2, 6, 4, 12])
    add(aten.expand.default, t(6, 1), [3, 6, 4])
    add(aten.expand_copy.default, t(6, 1), [6, 12])
    add(aten.repeat.default, t(2, 4, 6), [1, 2, 1])  # JetMoE's k.repeat(1, top_k, 1, 1)
    add(aten.repeat.default, t(4, 6), [2, 1, 3])  # a new leading dim, the last dim tiled
    add(aten.permute.default, t(2, 6, 12), [2, 0, 1])
    add(aten.permute_copy.default, t(2, 6, 12), [1, 2, 0])
    add(aten.transpose.int, t(2, 6, 12), 0, 2)
    add(aten.transpose_copy.int, t(2, 6, 12), -1, 1)
    add(aten.t.default, t(6, 12))
    add(aten.t_copy.default, t(6, 12))
    add(aten.numpy_T.default, t(6, 12, 2))
    add(aten.unsqueeze.default, t(6, 12), 1)
    add(aten.unsqueeze_copy.default, t(6, 12), -1)
    add(aten.squeeze.dim, t(6, 1, 12), 1)
    add(aten.squeeze.dims, t(6, 1, 12, 1), [1, 3])
    add(aten.squeeze.default, t(6, 1, 12))
    add(aten.squeeze_copy.dim, t(1, 6), 0)
    # slicing, selecting, joining, splitting
    add(aten.slice.Tensor, t(6, 12), 1, 0, 6)
    add(aten.slice.Tensor, t(6, 12), 1, 3, 12)
    add(aten.slice.Tensor, t(6, 12), 1, 0, 9223372036854775807)
    add(aten.slice.Tensor, t(6, 12), 0, 2, 6, 2)
    add(aten.slice.Tensor, t(6, 12), 1, 1, 9223372036854775807, 2)
    add(aten.slice.Tensor, t(6, 12), 1, 0, 12, 3)
    add(aten.slice.Tensor, t(6, 12), -1, -4)
    add(aten.select.int, t(6, 12, 2), 1, 3)
    add(aten.select.int, t(6, 12, 2), 0, -1)
    add(aten.cat.default, [t(6, 12), t(6, 12, seed=1)], 1)
    add(aten.cat.default, [t(6, 12), t(6, 12, seed=1)])
    add(aten.cat.default, [t(6, 12), t(6, 6, seed=1)], -1)
    add(aten.cat.default, [t(2, 6), t(2, 6, seed=1), t(2, 12, seed=2)], 1)  # -> blocks
    add(aten.constant_pad_nd.default, t(2, 6, 12), [0, 0, 1, 2])
    add(aten.constant_pad_nd.default, t(2, 6, 12), [2, 1], 0.5)
    add(aten.stack.default, [t(6, 12), t(6, 12, seed=1)])
    add(aten.stack.default, [t(6, 12), t(6, 12, seed=1)], 2)
    add(aten.split.Tensor, t(6, 12), 6, 1)
    add(aten.split.Tensor, t(6, 12), 4)
    add(aten.split_with_sizes.default, t(6, 12), [4, 8], 1)
    add(aten.split_with_sizes_copy.default, t(6, 12), [2, 4])
    add(aten.split_with_sizes.default, t(2, 24), [12, 6, 6], 1)
    add(aten.unbind.int, t(6, 12, 2), 2)
    add(aten.unbind.int, t(6, 12))
    # gathers and lookups
    add(aten.index_select.default, t(6, 12), 1, idx(12, 4))
    add(aten.index_select.default, t(6, 12), 0, idx(6, 6))
    add(aten.gather.default, t(6, 12), 1, idx(12, 6, 6))
    add(aten.gather.default, t(6, 12), 1, idx(12, 3, 6))
    add(aten.gather.default, t(6, 12), 0, idx(6, 6, 12))
    add(aten.index.Tensor, t(6, 12, 4), [None, idx(12, 6)])
    add(aten.index.Tensor, t(6, 12, 4), [idx(6, 2, 3)])
    add(aten.index.Tensor, t(6, 12, 4), [None, idx(12, 6), idx(4, 6)])
    add(aten.embedding.default, t(12, 6), idx(12, 2, 6))
    add(aten.embedding.default, t(12, 6), idx(12, 6))
    add(aten.index_put.default, t(2, 6, 12, 4), [None, None, idx(12, 3)], t(2, 6, 3, 4, seed=1))
    add(aten.index_put.default, t(2, 6, 12, 4), [None, None, idx(12, 3)], t(2, 1, 3, 4, seed=1))
    add(aten.index_put.default, t(6, 12), [idx(6, 2)], t(2, 12, seed=1), True)
    add(aten.copy_.default, t(6, 12), t(6, 12, seed=1))
    add(aten.copy_.default, t(6, 12), t(12, seed=1))
    # matrix products
    add(aten.mm.default, t(6, 12), t(12, 6, seed=1))
    add(aten.bmm.default, t(6, 4, 12), t(6, 12, 6, seed=1))
    add(aten.addmm.default, t(6), t(6, 12, seed=1), t(12, 6, seed=2))
    add(aten.addmm.default, t(6, 6), t(6, 12, seed=1), t(12, 6, seed=2))
    add(aten.addmm.default, t(6), t(6, 12, seed=1), t(12, 6, seed=2), beta=0.5, alpha=2.0)
    add(aten.baddbmm.default, t(6, 4, 6), t(6, 4, 12, seed=1), t(6, 12, 6, seed=2), alpha=3)
    add(aten.baddbmm.default, t(6, 4, 6), t(6, 4, 12, seed=1), t(6, 12, 6, seed=2))
    # triangular solves: A [*, n, n] (well conditioned: a unit-ish diagonal), B [*, n, k]
    a_tri = t(6, 4, 4) + 4 * torch.eye(4, dtype=F64)
    add(aten.linalg_solve_triangular.default, a_tri, t(6, 4, 6, seed=1), upper=False)
    add(aten.linalg_solve_triangular.default, a_tri, t(6, 6, 4, seed=1), upper=True,
        left=False)
    add(aten.linalg_solve_triangular.default, t(4, 4) + 4 * torch.eye(4, dtype=F64),
        t(6, 4, 6, seed=1), upper=False, unitriangular=True)
    # convolutions: x [B, C_in, L], w [C_out, C_in / G, K]
    add(aten.convolution.default, t(2, 12, 5), t(12, 1, 3, seed=1), t(12, seed=2), [1], [2],
        [1], False, [0], 12)  # depthwise (gated DeltaNet, Mamba-2)
    add(aten.convolution.default, t(2, 12, 5), t(18, 2, 3, seed=1), None, [1], [1], [1],
        False, [0], 6)  # grouped, 2 in / 3 out channels per group
    add(aten.convolution.default, t(2, 6, 5), t(12, 6, 3, seed=1), t(12, seed=2), [1], [0],
        [1], False, [0], 1)
    add(aten.convolution.default, t(2, 6, 4, 4), t(6, 6, 3, 3, seed=1), None, [1, 1], [1, 1],
        [1, 1], False, [0, 0], 1)
    # reductions
    x = t(6, 12, 2)
    add(aten.sum.dim_IntList, x, [1])
    add(aten.sum.dim_IntList, x, [0, 1], True)
    add(aten.sum.default, x)
    add(aten.mean.dim, x, [1])
    add(aten.mean.default, x)
    add(aten.amax.default, x, [1])
    add(aten.amin.default, x, [0], True)
    add(aten.argmax.default, x, 1)
    add(aten.argmin.default, x, 0)
    add(aten.var.correction, x, [1], correction=1)
    add(aten.var_mean.correction, x, [1], correction=0)
    add(aten.std.correction, x, [0], correction=1)
    add(aten.std_mean.correction, x, [1], correction=1, keepdim=True)
    add(aten.prod.dim_int, x, 1)
    add(aten.prod.default, x)
    add(aten.any.dim, t(6, 12, dtype=torch.bool), 1)
    add(aten.all.dim, t(6, 12, dtype=torch.bool), 0)
    add(aten.logsumexp.default, x, [1])
    add(aten.max.dim, x, 1)
    add(aten.max.default, x)
    add(aten.min.dim, x, 0)
    add(aten.norm.ScalarOpt_dim, x, 2, [1])
    add(aten.linalg_vector_norm.default, x, 2, [1])
    add(aten._softmax.default, x, 1, False)
    add(aten._log_softmax.default, x, 0, False)
    add(aten.softmax.int, x, -1)
    add(aten.log_softmax.int, x, 1)
    add(aten.cumsum.default, x, 1)
    add(aten.cumprod.default, x, 0)
    add(aten.sort.default, x, 1)
    add(aten.topk.default, x, 3, 1)
    add(aten.cummax.default, x, 1)
    add(aten.cummin.default, x, 0)
    add(aten.logcumsumexp.default, x, 1)
    add(aten.native_layer_norm.default, t(2, 6, 12), [12], t(12, seed=1), t(12, seed=2), 1e-5)
    add(aten.native_group_norm.default, t(2, 6, 4), t(6, seed=1), t(6, seed=2), 2, 6, 4, 3, 1e-5)
    add(aten._fused_rms_norm.default, t(2, 6, 12), [12], t(12, seed=1), 1e-5)
    add(aten.rms_norm.default, t(2, 6, 12), [12], t(12, seed=1), 1e-5)
    add(aten.layer_norm.default, t(2, 6, 12), [6, 12], t(6, 12, seed=1), t(6, 12, seed=2))
    # factories
    add(aten.arange.default, 6)
    add(aten.arange.start, 2, 8)
    add(aten.full.default, [6, 12], 1.5)
    add(aten.zeros.default, [6])
    add(aten.ones.default, [6, 2])
    add(aten.scalar_tensor.default, 2.0)
    add(aten.eye.default, 6)
    add(aten.linspace.default, 0, 1, 6)
    add(aten.tensor.float, 2.0)
    add(aten.new_zeros.default, t(6, 12), [6])
    add(aten.new_ones.default, t(6, 12), [6, 2])
    add(aten.new_full.default, t(6, 12), [6], 2.0)
    add(aten.zeros_like.default, t(6, 12))
    add(aten.ones_like.default, t(6, 12))
    add(aten.lift_fresh.default, t(6, 12))
    add(aten._assert_tensor_metadata.default, t(6, 12), dtype=F64)
    add(aten._assert_async.default, torch.tensor(True))
    for op, a in ((aten.empty.memory_format, ([6, 12],)),
                  (aten.empty_strided.default, ([6, 12], [12, 1])),
                  (aten.new_empty.default, (t(6, 12), [6])),
                  (aten.new_empty_strided.default, (t(6, 12), [6], [1]))):
        s.append(Sample(op, a, shape_only=True))
    # random values of x's shape: the values differ per rank where x is split (see
    # tp_backend.rng), so only the shapes are compared
    s.append(Sample(aten.rand_like.default, (t(6, 12),), shape_only=True))
    for op, a in ((aten.rand.default, ([6, 12],)), (aten.randn.default, ([6, 12],)),
                  (aten.randint.default, (10, [6, 12])), (aten.randperm.default, (12,))):
        s.append(Sample(op, a, {"dtype": torch.int64} if op is aten.randperm.default else {},
                        same_rng=True))
    # leaf ops: attention (heads on dim 1) and cross-entropy
    sdpa = torch.ops.tp_backend.sdpa.default
    q, k, v = t(2, 6, 4, 3), t(2, 6, 4, 3, seed=1), t(2, 6, 4, 3, seed=2)
    add(sdpa, q, k, v)
    add(sdpa, q, k, v, None, 0.0, True)
    add(sdpa, q, k, v, t(2, 6, 4, 4, seed=3))
    add(sdpa, q, k, v, t(1, 1, 4, 4, seed=3))
    add(sdpa, q, t(2, 2, 4, 3, seed=1), t(2, 2, 4, 3, seed=2), enable_gqa=True)
    # 4 heads: a strided split of the heads (outer=2) at 2 ranks, as JetMoE's
    add(sdpa, t(2, 4, 4, 3), t(2, 4, 4, 3, seed=1), t(2, 4, 4, 3, seed=2), None, 0.0, True)
    add(torch.ops.tp_backend.cross_entropy.default, t(6, 12), idx(12, 6))
    # mixture-of-experts grouped matmul: x [T, K] @ w [E, K, N] (CPU needs float32, rows
    # aligned to 16 bytes)
    offs = torch.tensor([4, 12], dtype=torch.int32)
    add(aten._grouped_mm.default, t(12, 24, dtype=torch.float32),
        t(2, 24, 24, seed=1, dtype=torch.float32), offs)
    return s


def all_samples():
    """Every sample: the schema-driven element-wise ones and the written-out ones."""
    from tp_backend.rules.elementwise import COPIES, UNARY_OR_BINARY

    out = []
    for packet in itertools.chain(UNARY_OR_BINARY, COPIES):
        out += elementwise_samples(packet)
    return out + _written()
