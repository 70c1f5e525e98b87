"""The LM head's placement (``options={"lm_head": ...}``): vocab-parallel (``"split"``, the
default: the logits all-gathered) or whole on every rank (``"replicate"``: no logits
all-gather, and a tied embedding whole too, so no embedding all-reduce). Every check
compares against one process on the same inputs.

Tolerances: a replicated head computes the logits exactly as one process does, but the
hidden state before it went through the split layers, which sum the same terms in another
order, so fp32 logits move in the last bits only: within 1e-5 absolute (these tiny
models' logits are O(1)); gradients within ``REL_TOL`` of test_training.
"""

from __future__ import annotations

import pytest
import torch

import zoo
from dist_utils import run_distributed
from models import make_ids
from test_sequence_parallel import _kinds
from test_training import _check, _grads

REPLICATE = {"lm_head": "replicate"}


def _inference(rank, world_size, name, options, overrides):
    import tp_backend
    from tp_backend.backend import tp_auto

    torch._dynamo.reset()
    ref_model = zoo.make_model(name, **overrides)
    model = zoo.make_model(name, **overrides)
    ids = make_ids(2, 8, vocab=256, seed=4, low=3)
    with torch.no_grad():
        want = ref_model(ids).logits
        model.compile(backend="tp_auto", options=options)
        first = len(tp_auto.plans)
        got = model(ids).logits
        plans = tp_auto.plans[first:]
        prompt = ids[:1, :6]
        ref_tokens = ref_model.generate(prompt, max_new_tokens=10, do_sample=False)
        tokens = model.generate(prompt, max_new_tokens=10, do_sample=False)
    head = model.get_output_embeddings().weight
    outside = sum(1 for p in plans for c in p.collectives if c.layer is None
                  and c.kind == "all_reduce")
    return {"err": (got - want).abs().max().item(),
            "same_tokens": torch.equal(tokens, ref_tokens),
            "kinds": _kinds(plans), "outside_all_reduces": outside,
            "head_fraction": tp_backend.local_shard(head).shape[0] / head.shape[0],
            "plan_head": [(p.lm_head, p.lm_head_choice) for p in plans],
            "summary": plans[0].summary(),
            "local_bytes": tp_backend.local_parameter_bytes(model)}


# Llama with a tied head is long (--run-long): GPT-2's head is tied as well (40 s of CI).
@pytest.mark.parametrize("name,overrides", [("llama", {}),
                                            pytest.param("llama", {"tie_word_embeddings": True},
                                                         marks=pytest.mark.long),
                                            ("gpt2", {})],
                         ids=["llama", "llama-tied", "gpt2-tied"])
def test_replicated_lm_head_matches_one_process(name, overrides):
    """``lm_head="replicate"`` at TP=2: logits and greedy tokens equal one process's; the
    head is whole on every rank, the forward gathers no logits, the plan names the head and
    the choice; a tied embedding is whole too and its lookup needs no all-reduce. The
    default (``"split"``) shards the head over the vocabulary and all-gathers the logits."""
    split = run_distributed(_inference, 2, name, {}, overrides)
    whole = run_distributed(_inference, 2, name, REPLICATE, overrides)
    tied = bool(overrides.get("tie_word_embeddings", name == "gpt2"))
    fqn = "transformer.wte.weight" if name == "gpt2" else (
        "model.embed_tokens.weight" if tied else "lm_head.weight")
    for s, w in zip(split, whole):
        for r in (s, w):
            assert r["err"] <= 1e-5 and r["same_tokens"], r
        assert s["head_fraction"] == 0.5 and w["head_fraction"] == 1.0, (s, w)
        assert s["kinds"].get("all_gather", 0) >= 1, s  # the split logits are gathered
        assert w["kinds"].get("all_gather", 0) == 0, w
        assert all(h == ((fqn,), "split") for h in s["plan_head"]), s["plan_head"]
        assert all(h == ((fqn,), "replicate") for h in w["plan_head"]), w["plan_head"]
        assert "kept whole on every rank (lm_head='replicate'" in w["summary"], w["summary"]
        if name == "llama":  # nothing else is kept whole, and the head is not listed so
            assert "a shard would need a gather" not in w["summary"], w["summary"]
        assert w["local_bytes"] > s["local_bytes"], (s, w)
        if tied and name == "llama":
            # the vocab-parallel lookup all-reduces; the whole table's does not (the tiny
            # GPT-2's position table is as large as its vocabulary, so it is looked up
            # vocab-parallel in both runs and all-reduces in both)
            assert s["outside_all_reduces"] >= 1 and w["outside_all_reduces"] == 0, (s, w)


def test_replicated_lm_head_gradients():
    """Training with ``lm_head="replicate"`` at TP=2 through Inductor: Llama (its own head)
    and GPT-2 (the head tied to the word embedding): every gradient equals one process's."""
    types = ["llama", "gpt2"]
    results = run_distributed(_grads, 2, types, "inductor", {}, REPLICATE)
    _check(results, types)
    for res in results:
        for mt in types:
            assert res[mt]["collectives"].get("all_gather", 0) == 0, (mt, res[mt])


def test_lm_head_option_is_checked():
    from tp_backend.errors import TPOptionsError
    from tp_backend.options import validate_options

    with pytest.raises(TPOptionsError, match="'lm_head' must be one of"):
        validate_options({"lm_head": "whole", "tp_group": object()})
