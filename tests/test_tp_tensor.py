""":class:`tp_backend.TPTensor` outside the compiled graphs: what optimizers,
``clip_grad_norm_`` and checkpoints do to a sharded parameter, against the same operations
on the whole tensor.

Each case builds a whole tensor on every rank (same seed), wraps this rank's shard of it in
a TPTensor, runs an operation on both, and compares this rank's slice of the whole result
with the TPTensor's local result. Element-wise operations on a shard are the shard of the
element-wise result, bit for bit (same operations on the same numbers): exact equality.
Norms sum the ranks' partial sums in another order: relative 1e-6 in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

import tp_backend
from dist_utils import run_distributed
from tp_backend.errors import TPShardedModuleError
from tp_backend.rules import Role
from tp_backend.runtime import ShardInfo
from tp_backend.state import full_tensor

# (global shape, dim, outer, blocks, padded, units): a column split, a row split, a fused
# [q | k | v] block layout, a padded vocabulary (11 rows padded to 12), an uneven split.
LAYOUTS = {
    "column": ((8, 6), 0, 1, None, None, None),
    "row": ((6, 8), 1, 1, None, None, None),
    "blocks": ((12, 4), 0, 1, (4, 4, 4), None, None),
    "padded": ((11, 4), 0, 1, None, 12, None),
    "uneven": ((9, 4), 0, 1, None, None, 3),
}


def _info(name, rank, world, group_name):
    shape, dim, outer, blocks, padded, units = LAYOUTS[name]
    return ShardInfo(name, dim, Role.COLUMN, shape, rank, world, group_name, outer, blocks,
                     padded, units)


def _wrap(whole, info):
    return tp_backend.TPTensor(info.local_of(whole).clone(), info)


def _cases(rank, world_size):
    import torch.distributed as dist

    group_name = dist.group.WORLD.group_name
    out = {}
    for name in LAYOUTS:
        info = _info(name, rank, world_size, group_name)
        g = torch.Generator(torch.get_default_device()).manual_seed(0)
        a, b = (torch.randn(info.global_shape, generator=g) for _ in range(2))
        ta, tb = _wrap(a, info), _wrap(b, info)
        res = {}
        # element-wise, in place and out of place, with a 0-dim tensor operand
        c = ta.mul(tb).abs().add_(torch.tensor(0.5)).sqrt_()
        want = a.mul(b).abs().add_(torch.tensor(0.5)).sqrt_()
        res["pointwise"] = (type(c).__name__, bool(torch.equal(c._local, info.local_of(want))))
        z = torch.zeros_like(ta)
        res["zeros_like"] = (type(z).__name__, list(z.shape), list(z._local.shape))
        # foreach, mixed with a plain (replicated) tensor
        plain = torch.randn(3, generator=g)
        xs, ws = [ta.clone(), plain.clone()], [a.clone(), plain.clone()]
        torch._foreach_mul_(xs, torch.tensor(0.25))
        torch._foreach_mul_(ws, torch.tensor(0.25))
        torch._foreach_addcdiv_(xs, [tb, plain], [tb.abs() + 1, plain.abs() + 1], 0.1)
        torch._foreach_addcdiv_(ws, [b, plain], [b.abs() + 1, plain.abs() + 1], 0.1)
        res["foreach"] = (bool(torch.equal(xs[0]._local, info.local_of(ws[0]))),
                          bool(torch.equal(xs[1], ws[1])))
        # norms of the whole tensor, combined over the ranks
        res["norms"] = []
        for ord in (2.0, 1.0, 3.0, math.inf, 0.0):
            got = torch.linalg.vector_norm(ta, ord).item()
            exp = torch.linalg.vector_norm(a, ord).item()
            res["norms"].append((ord, got, exp))
        fn = torch._foreach_norm([ta, plain], 2.0)
        res["foreach_norm"] = [(fn[0].item(), a.norm().item()), (fn[1].item(), plain.norm().item())]
        # copy_ from the whole tensor takes this rank's slice; full_tensor gathers it back
        tz = torch.zeros_like(ta)
        tz.copy_(b)
        res["copy_whole"] = bool(torch.equal(tz._local, info.local_of(b)))
        res["full_tensor"] = bool(torch.equal(ta.full_tensor(), a))
        res["full_tensor_grad"] = bool(torch.equal(full_tensor(ta), a))
        # anything else raises, naming the op
        errors = []
        for op in (lambda: ta.sum(0), lambda: ta @ b.T if info.dim == 0 else b.T @ ta,
                   lambda: ta.view(-1), lambda: ta + b):
            try:
                op()
                errors.append(None)
            except TPShardedModuleError as e:
                errors.append(str(e))
        res["errors"] = errors
        res["repr"] = repr(ta)
        out[name] = res
    return out


def test_operations_on_shards_equal_the_whole():
    for results in run_distributed(_cases, 2):
        for name, r in results.items():
            assert r["pointwise"] == ("TPTensor", True), (name, r)
            shape = list(LAYOUTS[name][0])
            assert r["zeros_like"][0] == "TPTensor" and r["zeros_like"][1] == shape, (name, r)
            assert r["foreach"] == (True, True), (name, r)
            for ord, got, want in r["norms"]:
                assert math.isclose(got, want, rel_tol=1e-6), (name, ord, got, want)
            for got, want in r["foreach_norm"]:
                assert math.isclose(got, want, rel_tol=1e-6), (name, r)
            assert r["copy_whole"] and r["full_tensor"] and r["full_tensor_grad"], (name, r)
            assert all(e is not None and "sharded" in e and "full_tensor" in e
                       for e in r["errors"]), (name, r["errors"])
            assert "TPTensor(global shape" in r["repr"], r["repr"]
