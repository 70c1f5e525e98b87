"""End-to-end: tiny random Llama, Mistral, Qwen2 (qkv bias) and Gemma (head_dim unrelated
to hidden/heads) compiled with ``tp_auto`` at TP = 1, 2 and 4 give the logits of the
single-process eager model, identical on every rank; the tiny Llama's plan is the
Megatron plan with exactly 2 all-reduces per decoder layer."""

import pytest
import torch

from dist_utils import run_distributed
from models import make_ids, make_model

# End to end with the defaults, Inductor included (tests/conftest.py).
pytestmark = pytest.mark.inductor

MODELS = ["llama", "mistral", "qwen2", "gemma"]

# fp32 logits. TP changes the order of additions only: a row-parallel matmul sums N partial
# dot products (each over K/N terms) instead of one over K terms, and Inductor (the default
# downstream compiler) fuses and vectorises reductions such as RMSNorm's mean differently.
# With |activations| ~ 1 and K <= 128 the rounding differs by a few ulps of the accumulated values, ~1e-6 here
# (observed <= 3e-7); 1e-5 absolute leaves room while still catching any real error, which
# shows up at ~1e-2 or more.
ATOL, RTOL = 1e-5, 1e-5


def _compare_models(rank, world_size):
    import tp_backend

    results = {}
    for name in MODELS:
        torch._dynamo.reset()
        model = make_model(name)
        ids = make_ids()
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
            compiled = torch.compile(model, backend="tp_auto")
            out = compiled(input_ids=ids, use_cache=False).logits
            again = compiled(input_ids=ids, use_cache=False).logits  # after the re-trace
        plan = tp_backend.last_plan()
        results[name] = {
            "max_err": (out - ref).abs().max().item(),
            "max_err_again": (again - ref).abs().max().item(),
            "close": torch.allclose(out, ref, atol=ATOL, rtol=RTOL),
            "logits": out,
            "layouts": {k: sorted(v) for k, v in plan.layouts().items()} if plan else {},
            "per_layer": plan.collectives_per_layer("all_reduce") if plan else {},
        }
    return results


# TP=4 is long (--run-long): 4 ranks on CI's 2 cores take 90 s; CI checks TP=4 through the
# fuzzer, the linear-attention hybrids, uneven heads' generation and training's gradients.
@pytest.mark.parametrize("tp_size", [1, 2, pytest.param(4, marks=pytest.mark.long)])
def test_logits_match_single_process(tp_size):
    results = run_distributed(_compare_models, tp_size)
    for name in MODELS:
        for rank, res in enumerate(results):
            r = res[name]
            assert r["close"], f"{name} rank {rank}: max |diff| {r['max_err']:.3g}"
            assert r["max_err_again"] <= ATOL + RTOL, name
            # Every rank computes the same logits (all-gathered, bit for bit).
            assert torch.equal(r["logits"], results[0][name]["logits"]), (name, rank)
        if tp_size > 1:
            layouts = results[0][name]["layouts"]
            assert layouts.get("column") and layouts.get("row"), (name, layouts)
            assert set(results[0][name]["per_layer"].items()) == {(0, 2), (1, 2), (None, 1)}, \
                (name, results[0][name]["per_layer"])


def _llama_plan(rank, world_size):
    import tp_backend

    model = make_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="tp_auto")(input_ids=make_ids(), use_cache=False)
    plan = tp_backend.last_plan()
    return {"params": {k: (p.layout, p.shard_dim, p.local_shape) for k, p in plan.params.items()},
            "all_reduce": plan.collectives_per_layer("all_reduce"),
            "all_gather": plan.collectives_per_layer("all_gather"),
            "summary": plan.summary()}


def test_llama_plan_is_megatron():
    """Pins the plan: q/k/v/gate/up column-parallel (weight dim 0 split), o/down
    row-parallel (dim 1), embedding vocab-parallel, LM head column-parallel, norms
    replicated; 2 all-reduces per layer, 1 for the embedding, 1 all-gather of the logits."""
    res = run_distributed(_llama_plan, 2)[0]
    params = res["params"]
    for layer in range(2):
        pre = f"model.layers.{layer}."
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                     "mlp.up_proj"):
            assert params[pre + proj + ".weight"][:2] == ("column", 0), proj
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            assert params[pre + proj + ".weight"][:2] == ("row", 1), proj
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert params[pre + norm + ".weight"][:2] == ("replicate", None)
    assert params["model.embed_tokens.weight"] == ("vocab", 0, (64, 64))
    assert params["lm_head.weight"][:2] == ("column", 0)
    assert params["model.norm.weight"][0] == "replicate"
    assert params["model.layers.0.self_attn.q_proj.weight"][2] == (32, 64)
    assert res["all_reduce"] == {None: 1, 0: 2, 1: 2}
    assert res["all_gather"] == {None: 1}


def _eager_compiler(rank, world_size):
    model = make_model("llama")
    with torch.no_grad():
        compiled = torch.compile(model, backend="tp_auto", options={"compiler": "eager"})
        outs = [compiled(input_ids=make_ids(seq=s), use_cache=False).logits for s in (7, 9)]
        refs = [model_ref(input_ids=make_ids(seq=s), use_cache=False).logits for s in (7, 9)]
    return [(o - r).abs().max().item() for o, r in zip(outs, refs)]


_REF = {}


def model_ref(**kw):
    if "m" not in _REF:
        _REF["m"] = make_model("llama")
    return _REF["m"](**kw)


def test_eager_compiler_option():
    """compiler='eager' (for debugging) runs the rewritten graph without Inductor: same
    logits within the fp32 tolerance, across two lengths (the second compiles a dynamic
    graph)."""
    for errs in run_distributed(_eager_compiler, 2):
        assert max(errs) <= ATOL, errs
