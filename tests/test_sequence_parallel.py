"""Sequence parallelism (``options={"sequence_parallel": True}``): the regions between a
row-parallel output and the next column-parallel input run split over the tokens, each
all-reduce becoming a reduce-scatter plus an all-gather (Megatron-LM's, Korthikanti et al.
2022). Every check compares against one process on the same inputs.

Tolerances: the split model sums the same terms in another order (the reduce-scatter adds
the ranks' partial sums as the all-reduce did; a split matmul sums fewer terms per rank),
so fp32 results move in the last bits only: logits within 1e-5 absolute (observed
<= 3e-7 on these models, whose logits are O(1)), gradients within ``REL_TOL`` of
test_training (2e-5 of each parameter's largest gradient element; observed <= 2.8e-6 over
the zoo), and losses of a 5-step AdamW run within 1e-5 of the run without sequence
parallelism.
"""

from __future__ import annotations

import pytest
import torch

import zoo
from dist_utils import run_distributed
from models import make_ids
from test_training import _check, _grads

SP = {"sequence_parallel": True}


def _kinds(plans) -> dict:
    kinds = [str(c.kind) for p in plans for c in p.collectives]
    return {k: kinds.count(k) for k in set(kinds)}


def _check_split(results, model_types):
    """Gradients as test_training checks them, and the run really was sequence-parallel."""
    _check(results, model_types)
    for res in results:
        for mt in model_types:
            assert res[mt]["collectives"].get("reduce_scatter", 0) > 0, (mt, res[mt])


def test_llama_and_gpt2_gradients_with_sequence_parallel():
    """Llama (bias-free projections) and GPT-2 (row-parallel addmm: the bias joins the
    partial sum on the first rank only) at TP=2 through Inductor: every gradient equals one
    process's, and the graphs reduce-scatter."""
    types = ["llama", "gpt2"]
    _check_split(run_distributed(_grads, 2, types, "inductor", {}, SP), types)


@pytest.mark.slow
def test_zoo_gradients_with_sequence_parallel_at_tp2():
    """Every type of the zoo (decoders, parallel attention+MLP blocks, MoE, encoders, T5's
    encoder-decoder) at TP=2."""
    _check_split(run_distributed(_grads, 2, zoo.ALL, "eager", {}, SP), zoo.ALL)


@pytest.mark.slow
def test_gradients_with_sequence_parallel_at_tp4():
    types = ["llama", "gpt2", "mixtral", "bert"]
    _check_split(run_distributed(_grads, 4, types, "eager", {}, SP), types)


def _inference(rank, world_size, name, seq):
    from tp_backend.backend import tp_auto

    torch._dynamo.reset()
    ref_model, model = zoo.make_model(name), zoo.make_model(name)
    ids = make_ids(2, seq, vocab=256, seed=4, low=3)
    with torch.no_grad():
        want = ref_model(ids).logits
        model.compile(backend="tp_auto", options=SP)
        first = len(tp_auto.plans)
        got = model(ids).logits
        prefill = _kinds(tp_auto.plans[first:])
        prompt = ids[:1, :6]
        ref_tokens = ref_model.generate(prompt, max_new_tokens=12, do_sample=False)
        first = len(tp_auto.plans)
        tokens = model.generate(prompt, max_new_tokens=12, do_sample=False)
        generate = [_kinds([p]) for p in tp_auto.plans[first:]]
    return {"err": (got - want).abs().max().item(), "prefill": prefill,
            "same_tokens": torch.equal(tokens, ref_tokens), "generate": generate}


# llama-even runs through Inductor (tests/conftest.py): the reduce-scatters and all-gathers
# as Inductor schedules them.
@pytest.mark.parametrize("name, seq", [pytest.param("llama", 8, marks=pytest.mark.inductor),
                                       ("llama", 7), ("gpt2", 8)],
                         ids=["llama-even", "llama-uneven", "gpt2"])
def test_forward_and_generate_with_sequence_parallel(name, seq):
    """Logits of a forward on ``[2, seq]`` tokens, and greedy ``generate`` token for token.
    7 tokens at TP=2 split 4 + 3 (uneven, exact all the same). The forward reduce-scatters
    and never all-reduces; the decode step (1 token, fewer than the ranks) all-reduces as
    plain tensor parallelism does."""
    for r in run_distributed(_inference, 2, name, seq):
        assert r["err"] <= 1e-5, r
        assert r["same_tokens"], r
        assert r["prefill"].get("reduce_scatter", 0) > 0 and "all_reduce" not in r["prefill"], r
        decode = [k for k in r["generate"] if "reduce_scatter" not in k]
        assert decode and all(k.get("all_reduce", 0) > 0 for k in decode), r


def _losses(rank, world_size, options, steps=5):
    torch._dynamo.reset()
    model = zoo.make_model("llama").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = torch.compile(model, backend="tp_auto", options=options)
    out = []
    for i in range(steps):
        ids = make_ids(2, 16, vocab=256, seed=10 + i, low=3)
        loss = step(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_training_losses_match_the_run_without_sequence_parallel():
    """Five AdamW steps at TP=2 with and without sequence parallelism: the same losses."""
    with_sp = run_distributed(_losses, 2, SP)
    without = run_distributed(_losses, 2, {})
    for a, b in zip(with_sp, without):
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)


def test_plan_shows_two_reduce_scatters_and_two_all_gathers_per_layer():
    """The plan (no processes) of a Llama at TP=2: per decoder layer 2 reduce-scatters, 2
    all-gathers and no all-reduce, and the regions it splits over the tokens."""
    from transformers import LlamaConfig

    from tp_backend.planning import format_plan, plan_model

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    plan, = plan_model(cfg, tp_size=2, seq_len=16, sequence_parallel=True)
    layers = {0, 1, 2}
    assert {k: v for k, v in plan.collectives_per_layer("reduce_scatter").items()
            if k is not None} == {k: 2 for k in layers}
    assert {k: v for k, v in plan.collectives_per_layer("all_gather").items()
            if k is not None} == {k: 2 for k in layers}
    assert not plan.collectives_per_layer("all_reduce")
    assert plan.sequence_values > 0 and len(plan.sequence_regions()) == 7  # + the embedding
    text = format_plan(plan)
    assert "2 reduce-scatter" in text and "sequence parallel: 7 regions" in text, text
    plain, = plan_model(cfg, tp_size=2, seq_len=16)
    assert plain.sequence_values == 0 and not plain.collectives_per_layer("reduce_scatter")


def test_sequence_parallel_option_is_checked():
    from tp_backend.errors import TPOptionsTypeError
    from tp_backend.options import validate_options

    with pytest.raises(TPOptionsTypeError, match="sequence_parallel"):
        validate_options({"sequence_parallel": "yes"})


# TP=4 is long (--run-long): 4 ranks on CI's 2 cores; test_gradients_with_sequence_parallel
# _at_tp4 runs sequence parallelism at TP=4.
@pytest.mark.slow
@pytest.mark.parametrize("tp_size", [2, pytest.param(4, marks=pytest.mark.long)])
def test_zoo_outputs_with_sequence_parallel(tp_size, capsys):
    """Every type of the zoo (test_coverage's run, with ``sequence_parallel=True``) gives
    one process's output on 7 tokens, split 4 + 3 at TP=2 and 2 + 2 + 2 + 1 at TP=4, and
    reduce-scatters; the rewritten graphs run eagerly (the same plans, a third of the
    time)."""
    from test_coverage import ATOL, RTOL, _run_zoo, _table  # noqa: F401 (the tolerances)

    rows = run_distributed(_run_zoo, tp_size, zoo.ALL, "eager", SP)[0]
    with capsys.disabled():
        print(_table(tp_size, rows).replace("coverage at", "sequence parallel at"))
    bad = {k: v for k, v in rows.items() if "error" in v or not v["match"]}
    assert not bad, bad
    assert all(r["reduce_scatters"] > 0 for r in rows.values()), \
        {k: r["reduce_scatters"] for k, r in rows.items()}
