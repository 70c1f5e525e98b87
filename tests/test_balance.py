"""Work balance (``balance="work"``; the default ``"off"`` splits evenly): where attention heads split unevenly, the
queries are dealt in whole KV groups (each rank computes and caches only its own KV heads)
and the MLP's features are dealt by weight so that the ranks' modelled work is equal.
Every check compares with one process on the same inputs."""

import re

import pytest
import torch

import tp_backend.leaf_ops  # noqa: F401 - registers the leaf ops and their rules
import zoo
from dist_utils import run_distributed
from models import make_ids
from rule_harness import check, decide, trace
from tp_backend import balance
from tp_backend.placement import PARTIAL, REPLICATE, HeadGroup, Shard

sdpa = torch.ops.tp_backend.sdpa
# SmolLM2-135M's attention (9 heads, 3 KV heads) at a tiny width: 5 + 4 heads at TP=2, or
# 6 + 3 in whole KV groups.
SMOLLM2_SHAPED = dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=96)


def _r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_weighted_shard_arithmetic():
    """``counts`` deals the units by weight: ranges, local and global sizes follow it; the
    even deal is the plain uneven split; a deal that loses units is refused."""
    s = Shard(0, units=96, counts=(40, 56))
    assert s.ranges(96, 0, 2) == [(0, 40)] and s.ranges(96, 1, 2) == [(40, 56)]
    assert [s.local_size(96, r, 2) for r in range(2)] == [40, 56]
    assert s.global_size(56, 1, 2) == 96
    # per block: units of 4 features (24 units of a 96-feature dim)
    assert Shard(1, units=24, counts=(10, 14)).ranges(96, 1, 2) == [(40, 56)]
    assert Shard(0, units=9, counts=(5, 4)) == Shard(0, units=9)  # the even deal
    assert repr(s) == "S(0,units=96,counts=[40, 56])"
    with pytest.raises(ValueError, match="must deal all 96 units"):
        Shard(0, units=96, counts=(40, 40))
    with pytest.raises(ValueError, match="deals its units to 2 ranks, not 3"):
        s.local_size(96, 0, 3)


def test_mlp_rule_with_weighted_features():
    """A column-parallel product whose weight the balance deals by weight: the output takes
    the same deal; simulated on both ranks against the whole product (exact to float32
    rounding of the same sums: 1e-5)."""
    x, w = _r(3, 8), _r(8, 20)
    weighted = Shard(1, units=20, counts=(8, 12))
    check(torch.mm, [x, w], [REPLICATE, weighted], expect=weighted)
    # row-parallel after it: the partial sums of the two ranks' 8 and 12 features
    h, w2 = _r(3, 20), _r(20, 8)
    check(torch.mm, [h, w2], [weighted, Shard(0, units=20, counts=(8, 12))],
          expect=PARTIAL)


def test_query_heads_in_whole_kv_groups():
    """9 query heads dealt as 3 KV groups (6 + 3 at TP=2) beside 3 KV heads dealt 2 + 1:
    each rank's attention runs on its own heads as it is (simulated against the whole
    attention; float32, 1e-5). Dealt finer (5 + 4), the same keys need the queries' seed
    to coarsen: asked only when the solver balances work (``group_kv``)."""
    q, k, v = _r(2, 9, 5, 4), _r(2, 3, 5, 4), _r(2, 3, 5, 4)
    grouped, kv = Shard(1, units=3), Shard(1, units=3)
    check(lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True), [q, k, v],
          [grouped, kv, kv], expect=grouped)
    gm, node = trace(lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True), [q, k, v])
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fine = Shard(1, units=9)
    # without the balance: the keys are taken per query head (the seed behind them is
    # then replicated by the solver), as before
    dec, _ = decide(node, ph, [fine, kv, kv])
    assert dec is not None and isinstance(dec.inputs[ph[1]], HeadGroup)
    # with it: the queries' seed is asked for 3 units (next round), and this round decides
    # as without it, so the heads' split still reaches what follows
    ctxs = []
    dec, _ = decide(node, ph, [fine, kv, kv], ctx_out=ctxs, group_kv=True)
    assert ctxs[0].coarser_asked == 3 and isinstance(dec.inputs[ph[1]], HeadGroup)
    assert dec.out == fine


def _balanced(rank, world_size, balance_option):
    import tp_backend

    ref = zoo.make_model("llama", **SMOLLM2_SHAPED)
    model = zoo.make_model("llama", **SMOLLM2_SHAPED)
    model.compile(backend="tp_auto", options={"fallback": "raise", "balance": balance_option})
    ids = make_ids(1, 6, vocab=256, seed=3, low=3)
    g = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    got, want = model.generate(ids, **g), ref.generate(ids, **g)
    cache = got["cache"] if "cache" in got else got["past_key_values"]
    cache_ref = want["cache"] if "cache" in want else want["past_key_values"]
    # (a cache kept whole is a plain tensor, with no local value)
    local = sum((tp_backend.local_value(t) if tp_backend.local_value(t) is not None else t).nbytes
                for layer in cache.layers for t in (layer.keys, layer.values))
    full = sum(t.nbytes for layer in cache_ref.layers for t in (layer.keys, layer.values))
    with torch.no_grad():
        err = (model(ids).logits - ref(ids).logits).abs().max().item()
    layer = model.model.layers[0]
    rows = {name.split(".")[-2] + ".weight": tp_backend.local_shard(p).shape[0]
            for name, p in layer.named_parameters() if name.endswith("proj.weight")}
    state = model.state_dict()
    whole = all(torch.equal(state[k], v) for k, v in ref.state_dict().items())
    return (torch.equal(got.sequences, want.sequences), err, local / full, rows, whole,
            tp_backend.tp_auto.plans[0].balance)


def test_smollm2_shaped_balanced_at_tp2():
    """``balance="work"`` at TP=2: the queries go 6 + 3 heads in whole KV groups, the keys and
    values 2 + 1 KV heads (computed and cached only where used: the cache is 2/3 and 1/3
    of one process's, against the whole cache on each rank with ``balance="off"``), and the
    MLP's 96 features are dealt by weight, rank 0 (more heads) fewer. Greedy tokens equal
    one process's; logits within 1e-5 (float32: the same sums, split); ``state_dict`` holds
    the whole weights; the plan says what the balance chose."""
    res = run_distributed(_balanced, 2, "work")
    (same0, err0, cache0, rows0, whole0, text), (same1, err1, cache1, rows1, whole1, _) = res
    assert same0 and same1 and whole0 and whole1
    assert max(err0, err1) <= 1e-5, (err0, err1)
    assert (rows0["q_proj.weight"], rows1["q_proj.weight"]) == (6 * 8, 3 * 8)
    assert (rows0["k_proj.weight"], rows1["k_proj.weight"]) == (2 * 8, 1 * 8)
    assert (cache0, cache1) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    gate = (rows0["gate_proj.weight"], rows1["gate_proj.weight"])
    assert sum(gate) == 96 and gate[0] < gate[1], gate
    assert rows0["up_proj.weight"] == gate[0]
    assert "whole KV groups" in text and f"{gate[0]}|{gate[1]}" in text, text
    after, before = re.search(r"per rank (\S+) of the mean, was (\S+)", text).groups()
    spread = [max(map(float, w.split("/"))) for w in (after, before)]
    assert spread[0] < spread[1] and spread[0] <= 1.02, text
    # balance="off" (the default): 5 + 4 query heads, the 3 KV heads whole on each rank, an even MLP
    res = run_distributed(_balanced, 2, "off")
    for rank, (same, err, cache, rows, whole, text) in enumerate(res):
        assert same and whole and err <= 1e-5, rank
        assert rows["q_proj.weight"] == (5, 4)[rank] * 8 and rows["k_proj.weight"] == 24
        assert rows["gate_proj.weight"] == 48 and cache == pytest.approx(1.0) and text == ""


def test_counts_round_to_whole_tiles():
    """A rank's share is a multiple of 16 features where the projection has at least 8
    such tiles per rank, single features otherwise; a share that leaves the last rank
    nothing is refused."""
    assert balance._counts(1536, [0.445, 0.555], 2) == (688, 848)
    assert balance._counts(96, [0.4, 0.6], 2) == (38, 58)  # 3 tiles per rank: too coarse
    assert balance._counts(100, [0.39, 0.61], 2) == (39, 61)  # 100 has no 16-feature tiles
    assert balance._counts(3, [0.99, 0.01], 2) is None
