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


def _run_pass(fn, *inputs):
    """Run the decomposed graph of ``fn(*inputs)``, the pass on it, and the graph again:
    (calls made causal, outputs before, outputs after, the graph after the pass)."""
    from tp_backend.causal import make_masks_causal

    gm, inputs = _decomposed(fn, *inputs)
    with torch.no_grad():
        before = gm(*inputs)
        done = make_masks_causal(gm)
        after = gm(*inputs)
    return done, before, after, gm


def _made_causal(fn, *inputs):
    """(calls made causal, max |output after - output before|, attention calls left with
    a mask)."""
    done, before, after, gm = _run_pass(fn, *inputs)
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


def _drawn_mask(L, S, B, offset, window, fill, altered):
    """A mask made in the graph from ``arange`` (a constant of the graph, as transformers'
    is): keys ``j <= i + offset`` attend (``offset`` 0 is the causal pattern, ``S - L`` the
    bottom-right one of a cache), within ``window`` keys if given; ``[B, 1, L, S]``; one
    element of the last batch flipped where ``altered``; as booleans, or additive with
    ``fill`` where keys do not attend."""
    i = torch.arange(L).view(L, 1)
    j = torch.arange(S).view(1, S)
    allowed = j <= i + offset
    if window is not None:
        allowed = allowed & (j > i - window)
    allowed = allowed.view(1, 1, L, S).expand(B, 1, L, S)
    if altered:
        allowed = allowed.clone()
        allowed[B - 1, 0, L - 1, 0] = ~allowed[B - 1, 0, L - 1, 0]
    if fill is None:
        return allowed
    return torch.where(allowed, torch.zeros(()), torch.full((), fill))


def test_drawn_constant_masks_are_made_causal_only_where_they_are_causal():
    """Property (hypothesis, a fixed seed): for masks drawn from the families transformers
    builds (causal, shifted, bottom-right, sliding window; boolean or additive with -inf,
    float32's minimum or -1e4; one element of one batch changed or not) and queries and
    keys of 1-5 positions, the pass makes attention causal exactly where the mask, read
    eagerly, is ``tril(ones(L, S))`` in every batch as booleans or 0/-inf, and the outputs
    before and after agree (NaN where a row attends to nothing, in both)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(L=st.integers(1, 5), S=st.integers(1, 5), B=st.integers(1, 2),
           offset=st.integers(-2, 2), bottom_right=st.booleans(),
           window=st.sampled_from([None, 1, 2, 8]), altered=st.booleans(),
           fill=st.sampled_from([None, float("-inf"), torch.finfo(torch.float32).min, -1e4]))
    def check(L, S, B, offset, bottom_right, window, altered, fill):
        offset = S - L if bottom_right else offset
        q = torch.randn(B, 2, L, 8, generator=torch.Generator().manual_seed(L))
        k = torch.randn(B, 2, S, 8, generator=torch.Generator().manual_seed(S + 10))

        def attend(q, k):
            mask = _drawn_mask(L, S, B, offset, window, fill, altered)
            return (F.scaled_dot_product_attention(q, k, k, attn_mask=mask),)

        eager = _drawn_mask(L, S, B, offset, window, fill, altered)
        causal = torch.ones(L, S, dtype=torch.bool).tril().expand(B, 1, L, S)
        if fill is not None:  # the additive form of is_causal: 0 attends, -inf does not
            causal = torch.where(causal, torch.zeros(()), torch.full((), float("-inf")))
        expected = torch.equal(eager, causal)
        done, before, after, _ = _run_pass(attend, q, k)
        assert done == int(expected), (done, expected)
        torch.testing.assert_close(after[0], before[0], atol=ATOL, rtol=0, equal_nan=True)

    check()
