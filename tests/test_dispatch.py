"""Ops registered through tp_backend.dispatch.plain_op: callable like their kernel, traced
through their fake kernel, and without the Python autograd layer that torch.library.custom_op
puts on every call (the reason the module exists); a split inference graph calls attention
through the twin without a backward, with the single-process logits."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import tp_backend.cpu_matmul  # noqa: F401  (registers tp_backend::onednn_linear)
import tp_backend.layers  # noqa: F401  (tp_backend::vocab_shard_ids)
import tp_backend.shm  # noqa: F401  (tp_backend::shm_all_reduce, tp_backend::shm_all_gather)
from tp_backend.dispatch import plain_op
from tp_backend.leaf_ops import sdpa, sdpa_inference
from dist_utils import run_distributed
from models import make_ids, make_model

HOT_OPS = ("tp_backend::shm_all_reduce", "tp_backend::shm_all_gather",
           "tp_backend::onednn_linear", "tp_backend::vocab_shard_ids",
           "tp_backend::sdpa_inference")


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


def test_inference_attention_is_the_same_kernel():
    q, k, v = (torch.randn(2, 4, 5, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    kv = (k[:, :2], v[:, :2])
    # One Python kernel behind both ops: bit for bit the same values.
    assert torch.equal(sdpa_inference(q, k, v, None, 0.0, True), sdpa(q, k, v, None, 0.0, True))
    assert torch.equal(sdpa_inference(q, *kv, enable_gqa=True), sdpa(q, *kv, enable_gqa=True))


def _attention_ops(rank, world_size):
    from torch.profiler import profile

    model = make_model("llama")
    ids = make_ids(batch=2, seq=9)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        # compiler="eager": the rewritten graph runs as it is, so the profiler sees its ops.
        compiled = torch.compile(model, backend="tp_auto", options={"compiler": "eager"})
        compiled(input_ids=ids, use_cache=False)
        with profile() as prof:
            got = compiled(input_ids=ids, use_cache=False).logits
    names = [ev.name for ev in prof.events()]
    return {"inference": names.count("tp_backend::sdpa_inference"),
            "differentiable": names.count("tp_backend::sdpa"),
            "layers": model.config.num_hidden_layers, "err": (got - ref).abs().max().item()}


def test_split_inference_graph_calls_attention_without_backward():
    """TP=2, tiny Llama: each layer's attention runs tp_backend::sdpa_inference, none the
    differentiable tp_backend::sdpa, and the logits are one process's."""
    for res in run_distributed(_attention_ops, 2):
        assert res["inference"] == res["layers"] and res["differentiable"] == 0, res
        # fp32 logits with the row-parallel sums reordered (see test_backend_models.py for
        # the 1e-5 budget).
        assert res["err"] <= 1e-5, res
