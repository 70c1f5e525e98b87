"""Ops registered through tp_backend.dispatch.plain_op: callable like their kernel, traced
through their fake kernel, and without the Python autograd layer that torch.library.custom_op
puts on every call (the reason the module exists)."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import tp_backend.cpu_matmul  # noqa: F401  (registers tp_backend::onednn_linear)
import tp_backend.layers  # noqa: F401  (tp_backend::vocab_shard_ids)
import tp_backend.leaf_ops  # noqa: F401  (tp_backend::sdpa, a custom_op, for contrast)
import tp_backend.shm  # noqa: F401  (tp_backend::shm_all_reduce, tp_backend::shm_all_gather)
from tp_backend.dispatch import plain_op

HOT_OPS = ("tp_backend::shm_all_reduce", "tp_backend::shm_all_gather",
           "tp_backend::onednn_linear", "tp_backend::vocab_shard_ids")


def _has_autograd_kernel(qualname: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")


def test_hot_ops_have_no_python_autograd_kernel():
    for name in HOT_OPS:
        assert not _has_autograd_kernel(name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")
    # The check can fail: a custom_op op (attention keeps its backward) has one.
    assert _has_autograd_kernel("tp_backend::sdpa")


def _scaled_rows(x: torch.Tensor, rows: int, scale: float) -> torch.Tensor:
    return x[:rows] * scale


def _scaled_rows_fake(x, rows, scale):
    return x.new_empty((rows, *x.shape[1:]))


scaled_rows = plain_op("tp_backend_test::scaled_rows", _scaled_rows, _scaled_rows_fake)


def test_plain_op_runs_traces_and_fakes():
    x = torch.arange(12.0).reshape(4, 3)
    # Eager: the kernel's own result, exactly (same ops on the same values).
    assert torch.equal(scaled_rows(x, 2, 0.5), x[:2] * 0.5)
    assert str(scaled_rows.default._schema) == \
        "tp_backend_test::scaled_rows(Tensor x, SymInt rows, float scale) -> Tensor"
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert scaled_rows(fake, 3, 2.0).shape == (3, 3)
    gm = make_fx(lambda t: scaled_rows(t, 1, 3.0))(x)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [scaled_rows.default]
    assert torch.equal(gm(x), x[:1] * 3.0)
