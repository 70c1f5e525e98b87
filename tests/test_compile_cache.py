"""Inductor's caches and tp_auto (tp_backend/downstream.py): the ranks of a host with fewer
CPUs than ranks compile an evenly split graph once (the lowest rank compiles, the others
load its result), ranks with a CPU each compile side by side, a second process loads every
rank's graph from the cache, and a graph loaded from the cache gives the single-process
logits."""

import os

import pytest
import torch

from dist_utils import run_distributed
import zoo
from models import make_ids, make_model

# The downstream compile is what these tests check (tests/conftest.py).
pytestmark = pytest.mark.inductor

# fp32 logits of the tiny models, reordered sums only (see test_backend_models.py for the
# 1e-5 budget): a graph loaded from the cache must meet the same budget as one compiled.
ATOL = 1e-5

# 9 query heads and 3 KV heads, as SmolLM2 (test_generation.py): TP=2 splits them 5 + 4.
UNEVEN = dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
              intermediate_size=100)


def _compile_and_run(rank, world_size, name, one_cpu=False):
    from torch._dynamo.utils import counters

    import tp_backend

    if one_cpu:  # every rank on the same CPU: a host with more ranks than CPUs
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    counters.clear()
    model = zoo.make_model("llama", **UNEVEN) if name == "uneven" else make_model(name)
    ids = make_ids(batch=2, seq=9)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, backend="tp_auto")
        got = compiled(input_ids=ids, use_cache=False).logits
    plan = tp_backend.last_plan()
    return {"err": (got - ref).abs().max().item(),
            "aot": dict(counters["aot_autograd"]), "fx": dict(counters["inductor"]),
            "sharded": sum(1 for p in plan.params.values() if p.shard_dim is not None)}


def _hits(res):
    return res["aot"].get("autograd_cache_hit", 0), res["aot"].get("autograd_cache_miss", 0)


# GPT-2 (a tied head, fused c_attn) is long (--run-long): the same mechanism as Llama's, and
# 80 s of CI's 2 cores.
@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.long)])
def test_ranks_of_a_crowded_host_compile_once(tmp_path, monkeypatch, name):
    """TP=2 on one CPU, in an empty cache directory: rank 0 compiles the graph (a miss,
    written to the cache), rank 1 loads it (a hit, no compile of its own): their local
    graphs are the same graph, although each holds another half of the vocabulary-parallel
    embedding and all-gathers its own part of the logits. A second run of both ranks loads
    both. Every run gives the single-process logits."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    first = run_distributed(_compile_and_run, 2, name, True)
    assert first[0]["sharded"] > 0, first  # the graph really is split
    assert _hits(first[0]) == (0, 1) and first[0]["aot"].get("autograd_cache_saved") == 1, first
    assert _hits(first[1]) == (1, 0), first
    # (pinned again: Inductor's key holds its compile-worker count, set from the CPUs)
    again = run_distributed(_compile_and_run, 2, name, True)
    assert [_hits(r) for r in again] == [(1, 0), (1, 0)], again
    for res in first + again:
        assert res["err"] <= ATOL, res


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_ranks_with_a_cpu_each_compile_side_by_side(tmp_path, monkeypatch):
    """TP=2 with a CPU per rank: both ranks compile at once (neither waits), exact."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    res = run_distributed(_compile_and_run, 2, "llama")
    assert [_hits(r) for r in res] == [(0, 1), (0, 1)], res
    for r in res:
        assert r["err"] <= ATOL, r


@pytest.mark.long  # 100 s of CI's 2 cores; the uneven logits are checked in CI elsewhere
def test_uneven_ranks_compile_apart(tmp_path, monkeypatch):
    """9 heads at TP=2 split 5 + 4, on one CPU: the ranks' local graphs differ, so each
    compiles its own (no rank waits for a graph it cannot use), and the logits match."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    res = run_distributed(_compile_and_run, 2, "uneven", True)
    assert [_hits(r) for r in res] == [(0, 1), (0, 1)], res
    for r in res:
        assert r["err"] <= ATOL, r


# Three functions with the same body: each is a code object of its own, so Dynamo captures
# the same graph three times and hands it to tp_auto each time (torch._dynamo.reset() would
# also clear tp_auto's cache).
def _logits_1(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _logits_2(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _logits_3(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _config_change_worker(rank, world_size):
    import tp_backend

    torch._dynamo.reset()
    ids = make_ids(batch=2, seq=9)
    hits, errs = [], []
    for fn, setting in ((_logits_1, False), (_logits_2, False), (_logits_3, True)):
        model = make_model("llama")
        before = tp_backend.tp_auto.stats["cache_hits"]
        with torch.no_grad(), torch._inductor.config.patch(fallback_random=setting):
            ref = fn(model, ids)
            got = torch.compile(fn, backend="tp_auto")(model, ids)
        hits.append(tp_backend.tp_auto.stats["cache_hits"] - before)
        errs.append((got - ref).abs().max().item())
    return hits, errs


def test_inductor_setting_change_compiles_again():
    """tp_auto's in-process cache of compiled graphs keys on Inductor's settings
    (``torch._inductor.config``'s digest), as Inductor's own caches do: the same graph is
    reused under the same settings, and compiled again after one changed."""
    for hits, errs in run_distributed(_config_change_worker, 2):
        assert hits == [0, 1, 0], hits
        assert max(errs) <= ATOL, errs
