"""User errors: each is a clear exception of the package (raised on every rank, before any
collective, so never a hang): no process group, unknown or ill-typed options, heads that
do not divide the TP size (under ``fallback="raise"``; by default they stay whole with a
warning)."""

import logging

import pytest
import torch

import tp_backend
from dist_utils import log_records, run_distributed
from models import make_ids, make_model


def _raised(exc_info, cls):
    """The exception of type ``cls`` in the chain Dynamo wraps backend errors in."""
    e = exc_info.value
    while e is not None:
        if isinstance(e, cls):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__
    raise AssertionError(f"no {cls.__name__} in {exc_info.value!r}")


def _call(options):
    torch._dynamo.reset()
    model = make_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="tp_auto", options=options)(input_ids=make_ids(),
                                                                  use_cache=False)


def test_no_process_group_says_how_to_make_one():
    assert not torch.distributed.is_initialized()
    with pytest.raises(Exception) as info:
        _call(None)
    err = _raised(info, tp_backend.TPProcessGroupError)
    assert "init_process_group" in str(err) and "torchrun" in str(err)


def test_unknown_option_names_the_key():
    with pytest.raises(Exception) as info:
        _call({"tp_grop": None})
    err = _raised(info, ValueError)
    assert isinstance(err, tp_backend.TPOptionsError) and "'tp_grop'" in str(err)


def _option_default_and_error(rank, world_size, key, bad):
    from tp_backend.options import validate_options

    default = getattr(validate_options({}), key)
    try:
        validate_options({key: bad})
    except tp_backend.TPOptionsError as e:
        return default, str(e)
    return default, None


# Marked inductor so the workers see the library's own defaults (tests/conftest.py).
@pytest.mark.inductor
@pytest.mark.parametrize("key,default,bad", [("compiler", "inductor", "cudagraphs"),
                                             ("cpu_matmul", "onednn", "mkl"),
                                             ("sync_rng", "first", "never"),
                                             ("check_inputs", "first", "yes"),
                                             ("fallback", "replicate", "ignore"),
                                             ("outputs", "auto", "sharded"),
                                             ("mode", "default", "fast")])
def test_option_default_and_bad_value_named(key, default, bad):
    """Pins the defaults (Inductor downstream, oneDNN CPU matmuls, random state synced and
    inputs checked on a graph's first call, failed passes replicated, split outputs
    gathered except the logits beside a training graph's own loss, Inductor's default
    mode); a bad value raises
    TPOptionsError naming the key, the value and the valid choices."""
    [(got, err)] = run_distributed(_option_default_and_error, 1, key, bad)
    assert got == default
    assert err is not None and f"'{key}'" in err and f"'{bad}'" in err and default in err


def test_tp_group_of_wrong_type():
    with pytest.raises(Exception) as info:
        _call({"tp_group": 2})
    err = _raised(info, TypeError)
    assert "ProcessGroup" in str(err) and "int" in str(err)


def _indivisible_heads(rank, world_size, fallback):
    # Phi-3's fused [q | k | v] projection with 3 heads of 16 per block: each block would
    # have to split unevenly (2 + 1 heads) inside the fused projection, which has no exact
    # layout (a block shard splits every block N ways), so no split exists at TP=2. (Separate
    # q/k/v projections split 2 + 1: tests/test_generation.py.)
    records = log_records()
    kw = dict(num_attention_heads=3, num_key_value_heads=3, hidden_size=48)
    model, ref_model = make_model("phi3", **kw), make_model("phi3", **kw)
    ids = make_ids()
    try:
        with torch.no_grad():
            out = torch.compile(model, backend="tp_auto", options={"fallback": fallback})(
                input_ids=ids, use_cache=False).logits
            ref = ref_model(input_ids=ids, use_cache=False).logits
    except Exception as e:  # noqa: BLE001 - the test inspects it
        while e is not None and not isinstance(e, tp_backend.TPDivisibilityError):
            e = getattr(e, "inner_exception", None) or e.__cause__
        return {"raised": None if e is None else str(e)}
    plan = tp_backend.last_plan()
    return {"err": (out - ref).abs().max().item(),
            "q_proj": plan.params["model.layers.0.self_attn.qkv_proj.weight"].layout,
            "mlp": plan.params["model.layers.0.mlp.gate_up_proj.weight"].layout,
            "warnings": [r.getMessage() for r in records if r.levelno == logging.WARNING]}


def test_indivisible_heads_raise_on_every_rank():
    """fallback="raise": TPDivisibilityError on every rank, naming the tensor, the count and
    tp_size."""
    for r in run_distributed(_indivisible_heads, 2, "raise"):
        msg = r.get("raised")
        assert msg is not None, r
        assert "3 groups" in msg and "tp_size=2" in msg and "self_attn" in msg, msg


def test_indivisible_heads_stay_whole_with_a_warning():
    """The default (fallback="replicate"): attention stays whole, the MLP still splits, the
    logits match one process (fp32, 2 layers: the all-reduce adds in another order), and
    one warning per projection names it."""
    for r in run_distributed(_indivisible_heads, 2, "replicate"):
        assert r["err"] <= 1e-5, r
        assert (r["q_proj"], r["mlp"]) == ("replicate", "column"), r
        warned = [w for w in r["warnings"] if "3 groups" in w and "tp_size=2" in w]
        assert warned and all("Kept whole" in w for w in warned), r["warnings"]
