"""The CPU matmul kernel choice (tp_backend/cpu_matmul.py): oneDNN's linear equals the
product (float64 reference), the decomposition table routes exactly the matmuls it says it
routes, and a TP=2 compiled model really runs oneDNN (or not, with cpu_matmul='aten') and
still gives the single-process logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from tp_backend.cpu_matmul import decompositions, onednn_linear
from dist_utils import run_distributed
from models import make_ids, make_model

# fp32 products summed in another order than the float64 reference: with K <= 512 terms of
# |x * w| ~ 1 the rounding error is at most ~K * 2**-24 ~ 3e-5 relative to sum |x * w|;
# 1e-4 of the largest output leaves room and still catches a wrong layout (errors ~1).
REL = 1e-4

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN")


def _rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@needs_onednn
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_linear_equals_the_product(strided, with_bias):
    """Catches a transposed or mis-strided weight: nn.Linear's [N, K] layout, and a [K, N]
    weight seen through .t() (GPT-2's Conv1D), with and without bias."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 512, generator=gen)
    w = torch.randn(512, 96, generator=gen).t() if strided else torch.randn(96, 512, generator=gen)
    b = torch.randn(96, generator=gen) if with_bias else None
    ref = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    out = onednn_linear(x, w, b)
    assert out.shape == (37, 96) and out.is_contiguous()
    assert _rel_err(out, ref) < REL


def _targets(fn, *args, kernel="onednn"):
    gm = make_fx(fn, decomposition_table=decompositions(kernel))(*args)
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


ONEDNN = torch.ops.tp_backend.onednn_linear.default


@needs_onednn
def test_routing_rule():
    """Pins which matmuls go to oneDNN: float32 CPU with >= 4 rows (prefill), or few rows
    against a weight of >= 8M elements (an LM head at decode); not a small decode matmul,
    not bf16, not with cpu_matmul='aten'; addmm keeps its bias (one op, no add)."""
    lin = lambda x, w: F.linear(x, w)  # noqa: E731
    lin_bias = lambda x, w, b: F.linear(x, w, b)  # noqa: E731
    w = torch.randn(64, 32)
    assert ONEDNN in _targets(lin, torch.randn(4, 32), w)
    assert ONEDNN not in _targets(lin, torch.randn(1, 32), w)
    assert ONEDNN in _targets(lin, torch.randn(1, 512), torch.empty(16384, 512))
    assert ONEDNN not in _targets(lin, torch.randn(8, 32).bfloat16(), w.bfloat16())
    assert ONEDNN not in _targets(lin, torch.randn(8, 32), w, kernel="aten")
    with_bias = _targets(lin_bias, torch.randn(8, 32), w, torch.randn(64))
    assert ONEDNN in with_bias and torch.ops.aten.addmm.default not in with_bias
    # addmm with scaling factors is not a linear: left to Inductor's table.
    scaled = _targets(lambda b, x, wt: torch.addmm(b, x, wt, beta=0.5), torch.randn(64),
                      torch.randn(8, 32), w.t())
    assert ONEDNN not in scaled


def _kernel_use(rank, world_size):
    from torch.profiler import profile

    out = {}
    for kernel in ("onednn", "aten"):
        torch._dynamo.reset()
        model = make_model("llama")
        ids = make_ids(batch=2, seq=9)
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
            compiled = torch.compile(model, backend="tp_auto", options={"cpu_matmul": kernel})
            compiled(input_ids=ids, use_cache=False)
            with profile() as prof:
                got = compiled(input_ids=ids, use_cache=False).logits
        calls = sum(1 for ev in prof.events() if ev.name == "tp_backend::onednn_linear")
        out[kernel] = {"calls": calls, "err": (got - ref).abs().max().item()}
    return out


@pytest.mark.inductor
@needs_onednn
def test_tp2_compiled_graph_runs_onednn():
    """End to end at TP=2 under Inductor: with the default every linear of the tiny Llama
    (7 per layer x 2 layers + the LM head; M = 2 x 9 = 18 rows) runs on oneDNN, with
    cpu_matmul='aten' none does; both give the single-process logits."""
    for res in run_distributed(_kernel_use, 2):
        assert res["onednn"]["calls"] == 15, res
        assert res["aten"]["calls"] == 0, res
        # fp32 logits, reordered sums only (see test_backend_models.py for the 1e-5 budget).
        assert res["onednn"]["err"] <= 1e-5 and res["aten"]["err"] <= 1e-5, res
