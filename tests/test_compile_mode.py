"""Inductor's compile modes under tp_auto: ``torch.compile(model, backend="tp_auto",
mode=...)`` or ``options={"mode": ...}`` compiles each rank's local graph as
``backend="inductor"`` does in that mode, and the parameter shards and the state stored
split are static inputs of its CUDA graphs (recorded at their own addresses, not copied
on every call). On CPU Inductor makes no CUDA graphs, so these tests check that each mode
gives the single-process tokens and that Inductor is told which inputs are static; the
CUDA graphs themselves need a GPU (``TP_TEST_DEVICE=cuda``)."""

import pytest
import torch

import zoo
from dist_utils import run_distributed

# The downstream compile is what these tests check (tests/conftest.py).
pytestmark = pytest.mark.inductor


def _record_inner_compiles() -> list:
    """What Inductor's inner compile is told about each graph it compiles in this worker
    from now on: a dict per graph (CUDA graphs and max-autotune on, the static inputs'
    positions, the count of inputs)."""
    from torch._inductor import compile_fx

    seen = []
    inner = compile_fx.compile_fx_inner

    def spy(gm, example_inputs, **kwargs):
        seen.append({"cudagraphs": bool(torch._inductor.config.triton.cudagraphs),
                     "max_autotune": bool(torch._inductor.config.max_autotune),
                     "static": list(kwargs.get("static_input_idxs") or ()),
                     "inputs": len(example_inputs)})
        return inner(gm, example_inputs, **kwargs)

    compile_fx.compile_fx_inner = spy
    return seen


def _generate_in_mode(rank, world_size, spelling, mode):
    import tp_backend

    seen = _record_inner_compiles()
    ref_model, model = zoo.make_model("llama"), zoo.make_model("llama")
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    # The static cache: the decode graph writes the keys and values into cache buffers
    # stored split (state), the case CUDA graphs need static inputs for.
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    ref = ref_model.generate(ids, **kw)
    if spelling == "mode=":
        model.compile(backend="tp_auto", mode=mode)
    else:
        model.compile(backend="tp_auto", options={"mode": mode})
    got = model.generate(ids, **kw)
    store = tp_backend.backend.tp_auto.store
    return {"same": torch.equal(got, ref), "seen": seen,
            # what a rank holds split: the projections' shards and the cache buffers
            "split": len(store.sharded), "params": sum(1 for _ in model.parameters())}


@pytest.mark.parametrize("spelling", ["mode=", "options"])
def test_reduce_overhead_marks_shards_static(tmp_path, monkeypatch, spelling):
    """``mode="reduce-overhead"`` at TP=2, greedy decoding with the static cache: the same
    tokens as one process, and every graph Inductor compiles has CUDA graphs on and is told
    that each parameter (split or whole) and each cache buffer stored split is a static
    input. In an empty cache directory, so Inductor compiles (a graph loaded from the cache
    never reaches its inner compile)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    for res in run_distributed(_generate_in_mode, 2, spelling, "reduce-overhead"):
        assert res["same"], res
        compiled = res["seen"]
        assert compiled, res  # at least the prefill graph was compiled on this rank
        for graph in compiled:
            assert graph["cudagraphs"] and not graph["max_autotune"], graph
            # parameters (split or whole) are static; the prefill graph also takes the
            # cache buffers, the decode graph them and more: at least every parameter
            # and at most all but the token ids and positions
            assert res["params"] <= len(graph["static"]) <= graph["inputs"] - 2, (graph, res)
        # the decode graph reads and writes every cache buffer stored split: those are
        # static too (4 buffers: 2 layers, keys and values)
        decode = max(compiled, key=lambda g: g["inputs"])
        assert len(decode["static"]) >= res["params"] + 4, (decode, res)
        assert res["split"] > 4, res


def _default_mode(rank, world_size):
    seen = _record_inner_compiles()
    ref_model, model = zoo.make_model("llama"), zoo.make_model("llama")
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_model(input_ids=ids, use_cache=False).logits
        got = torch.compile(model, backend="tp_auto")(input_ids=ids, use_cache=False).logits
    return (got - ref).abs().max().item(), seen


def test_default_mode_leaves_inductor_as_it_is(tmp_path, monkeypatch):
    """Without a mode, Inductor compiles with its own settings: no CUDA graphs, and its
    list of static inputs untouched (empty for a local graph: its FX-graph cache keys on
    it, so the entries of earlier versions stay valid)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    for err, seen in run_distributed(_default_mode, 2):
        # fp32 logits, reordered sums only (see test_backend_models.py for the budget)
        assert err <= 1e-5
        assert seen and all(g["cudagraphs"] is False and g["static"] == [] for g in seen), seen


def _mode_with_eager(rank, world_size):
    model = zoo.make_model("llama")
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    try:
        torch.compile(model, backend="tp_auto",
                      options={"mode": "reduce-overhead", "compiler": "eager"})(input_ids=ids)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        while e is not None and not isinstance(e, ValueError):
            e = getattr(e, "inner_exception", None) or e.__cause__
        return None if e is None else (type(e).__name__, str(e))
    return "no error"


def test_mode_needs_inductor():
    """A mode with ``compiler="eager"`` (which runs the graph as it is) raises
    TPOptionsError on every rank, naming both options."""
    for res in run_distributed(_mode_with_eager, 2):
        assert res is not None and res != "no error", res
        name, msg = res
        assert name == "TPOptionsError" and "reduce-overhead" in msg and "eager" in msg, res


def test_static_inputs_only_where_the_inputs_line_up(monkeypatch):
    """The positions of the local graph's static inputs are passed on only under CUDA
    graphs, for a forward graph whose inputs line up with the local graph's (as many, the
    same dtype and shape at each static position); otherwise Inductor's own list stands
    (the inputs are copied per call: slower, never wrong)."""
    from torch._inductor import compile_fx

    from tp_backend.downstream import _StaticInputs

    told = []
    monkeypatch.setattr(compile_fx, "compile_fx_inner",
                        lambda gm, inputs, **kwargs: told.append(kwargs["static_input_idxs"]))
    weight, ids = torch.empty(4, 2), torch.zeros(3, dtype=torch.long)
    inner = _StaticInputs([weight, ids], (0,))
    same = [torch.empty(4, 2), torch.zeros(3, dtype=torch.long)]
    with torch._inductor.config.patch({"triton.cudagraphs": True}):
        inner(None, same, static_input_idxs=(1,))
        inner(None, same[:1], static_input_idxs=())  # an input merged away
        inner(None, same[::-1], static_input_idxs=())  # other inputs at the static position
        inner(None, same, static_input_idxs=(), is_backward=True)  # a backward's own inputs
    inner(None, same, static_input_idxs=())  # no CUDA graphs
    assert told == [[0, 1], (), (), (), ()]
