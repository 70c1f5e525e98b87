"""tp_backend.causal: attention whose mask, built in the graph, is the causal pattern runs
with ``is_causal=True``; every other mask is left alone. Each case runs the decomposed graph
before and after the pass on the same inputs."""

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from models import make_ids, make_model

# fp32. The pass changes which attention kernel path runs (the causal one skips the blocks
# above the diagonal, whose weights are exactly 0 either way), not the function: PyTorch's
# CPU flash kernel gave bit-identical outputs here; 1e-6 leaves room for another kernel's
# order of additions (~1e-7 on values ~1) and still catches a wrong mask (~1e-1).
ATOL = 1e-6


def _decomposed(fn, *inputs):
    """(the decomposed graph of ``fn(*inputs)`` as Dynamo captures it, its real inputs)."""
    from tp_backend.decompose import decompose

    torch._dynamo.reset()
    got = {}

    def backend(gm, example_inputs):
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        fakes = [n.meta["example_value"] for n in ph]
        mode = next(f.fake_mode for f in fakes if isinstance(f, torch.Tensor))
        got["gm"], got["inputs"] = decompose(gm, fakes, mode), list(example_inputs)
        return gm.forward

    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return got["gm"], got["inputs"]


def _sdpa_calls(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.tp_backend.sdpa.default]


def _made_causal(fn, *inputs):
    """(calls made causal, max |output after - output before|, attention calls left with
    a mask)."""
    from tp_backend.causal import make_masks_causal

    gm, inputs = _decomposed(fn, *inputs)
    with torch.no_grad():
        before = gm(*inputs)
        done = make_masks_causal(gm)
        after = gm(*inputs)
    err = max((a - b).abs().max().item() for a, b in zip(after, before)
              if isinstance(a, torch.Tensor))
    masked = sum(isinstance(n.args[3], torch.fx.Node) for n in _sdpa_calls(gm))
    return done, err, masked


def test_llama_full_logits_mask_becomes_causal():
    """A forward without a KV cache builds its mask from ``arange`` in the graph (packed
    sequences checked included): every layer's attention is made causal, the mask's
    nodes are gone and the logits are unchanged."""
    model = make_model("llama")
    ids = make_ids(seq=16)
    done, err, masked = _made_causal(lambda i: model(input_ids=i, use_cache=False).logits, ids)
    assert done == model.config.num_hidden_layers
    assert masked == 0
    assert err <= ATOL


def test_padding_mask_from_an_input_is_kept():
    """A mask that depends on the ``attention_mask`` input (padding) differs between calls:
    it is not evaluated, and attention keeps it."""
    model = make_model("llama")
    ids = make_ids(seq=16)
    pad = torch.ones_like(ids)
    pad[0, :3] = 0
    done, err, masked = _made_causal(
        lambda i, a: model(input_ids=i, attention_mask=a, use_cache=False).logits, ids, pad)
    assert done == 0 and masked == model.config.num_hidden_layers and err == 0


def test_sliding_window_mask_is_kept():
    """Mistral with a window shorter than the sequence: its mask is a constant of the graph
    but a band, not the causal pattern."""
    model = make_model("mistral", sliding_window=4)
    ids = make_ids(seq=16)
    done, err, masked = _made_causal(lambda i: model(input_ids=i, use_cache=False).logits, ids)
    assert done == 0 and masked == model.config.num_hidden_layers and err == 0


def _float_mask_attention(q, k, v, fill):
    L, S = q.shape[-2], k.shape[-2]
    mask = torch.full((L, S), fill, dtype=q.dtype).triu(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fill,causal", [(float("-inf"), True), (-1e4, False)])
def test_additive_float_masks(fill, causal):
    """An additive mask of 0 and -inf above the diagonal is the causal pattern; one of 0 and
    -1e4 is not (those weights are small, not zero), and stays."""
    q, k, v = (torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(s))
               for s in range(3))
    done, err, masked = _made_causal(lambda *a: (_float_mask_attention(*a, fill),), q, k, v)
    assert (done, masked) == ((1, 0) if causal else (0, 1))
    assert err <= ATOL


def test_key_longer_than_query_is_kept():
    """A lower triangle of ``[L, S]`` with ``S > L`` is top-left aligned, as
    ``is_causal=True`` is, but a mask that lets every query see the first ``S - L`` keys
    (bottom-right, as with a cache) is not that pattern and stays."""
    q = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    k = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(1))

    def attend(q, k):
        L, S = q.shape[-2], k.shape[-2]
        top_left = torch.ones(L, S, dtype=torch.bool).tril()
        bottom_right = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        return (F.scaled_dot_product_attention(q, k, k, attn_mask=top_left),
                F.scaled_dot_product_attention(q, k, k, attn_mask=bottom_right))

    done, err, masked = _made_causal(attend, q, k)
    assert (done, masked) == (1, 1)
    assert err <= ATOL


def _tp_logits(rank, world_size):
    import tp_backend

    torch._dynamo.reset()
    model = make_model("llama")
    ids = make_ids(seq=16)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = torch.compile(model, backend="tp_auto")(input_ids=ids, use_cache=False).logits
    plan = tp_backend.last_plan()
    return (out - ref).abs().max().item(), plan.causal_masks, plan.summary()


def test_tp2_plan_reports_causal_attention():
    """Through the backend at TP=2: the plan counts one causal attention per layer, says so
    in its summary, and the logits match one process (tolerance of
    test_backend_models.py: TP reorders additions)."""
    for err, count, summary in run_distributed(_tp_logits, 2):
        assert err <= 1e-5
        assert count == 2
        assert "is_causal=True" in summary


def test_planning_on_the_meta_device():
    """``plan_model`` traces on the meta device, where nothing can be read: the mask is
    evaluated on CPU tensors (every tensor of it is made in the graph)."""
    from transformers import LlamaConfig

    from tp_backend.planning import plan_model

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    plan, = plan_model(cfg, tp_size=2, seq_len=16)
    assert plan.causal_masks == 3


def test_mask_shared_by_queries_of_other_lengths():
    """One mask ``[1, S]`` read by a one-token query (where it is the causal pattern) and,
    broadcast over rows, by a 4-token query (where it is not): only the first call is made
    causal (each call is compared against its own query length)."""
    q1 = torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(0))
    q4 = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(1))
    k = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(2))

    def attend(q1, q4, k):
        first_key_only = torch.ones(1, k.shape[-2], dtype=torch.bool).tril()
        return (F.scaled_dot_product_attention(q1, k, k, attn_mask=first_key_only),
                F.scaled_dot_product_attention(q4, k, k, attn_mask=first_key_only))

    done, err, masked = _made_causal(attend, q1, q4, k)
    assert (done, masked) == (1, 1)
    assert err <= ATOL
