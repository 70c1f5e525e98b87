"""Recompiles and memory: new input shapes recompile without re-solving what was solved
or re-sharding parameters; each rank holds ~1/N of the sharded parameters; the full
tensors are freed; the original module refuses to run on its sharded parameters."""

import gc

import pytest
import torch

from dist_utils import run_distributed
from models import make_ids, make_model

ATOL = 1e-5  # fp32, reordered sums only (see test_backend_models.py)


def _recompile_worker(rank, world_size):
    import tp_backend
    from torch.multiprocessing.reductions import StorageWeakRef

    tp_backend.tp_auto.reset()
    torch._dynamo.reset()
    model = make_model("llama")
    params_before = [id(p) for p in model.parameters()]
    q_ref = StorageWeakRef(model.model.layers[0].self_attn.q_proj.weight.untyped_storage())
    full_bytes = sum(p.nbytes for p in model.parameters())
    compiled = torch.compile(model, backend="tp_auto")
    shapes = [(2, 5), (2, 5), (2, 7), (2, 9), (3, 6)]
    errs, shard_ids = [], []
    with torch.no_grad():
        for batch, seq in shapes:
            ids = make_ids(batch, seq, seed=seq)
            # The reference runs on an unsharded twin built from the same seed.
            ref = _twin(model)(input_ids=ids, use_cache=False).logits
            out = compiled(input_ids=ids, use_cache=False).logits
            errs.append((out - ref).abs().max().item())
            shard_ids.append([id(tp_backend.local_shard(p)) for p in model.parameters()])
    gc.collect()
    eager_error = None
    try:
        with torch.no_grad():
            model(input_ids=make_ids(), use_cache=False)
    except tp_backend.TPShardedModuleError as e:
        eager_error = str(e)
    plan = tp_backend.last_plan()
    return {"errs": errs, "params_same": params_before == [id(p) for p in model.parameters()],
            "shards_same": all(s == shard_ids[0] for s in shard_ids),
            "stats": dict(tp_backend.tp_auto.stats), "freed": q_ref.expired(),
            "local_bytes": tp_backend.local_parameter_bytes(model), "full_bytes": full_bytes,
            "plan_bytes": plan.param_bytes(), "eager_error": eager_error}


_TWIN = {}


def _twin(model):
    if "m" not in _TWIN:
        _TWIN["m"] = make_model("llama")
    return _TWIN["m"]


def test_recompiles_reuse_shards_and_memory_is_split():
    res = run_distributed(_recompile_worker, 2)
    for r in res:
        assert max(r["errs"]) <= ATOL, r["errs"]
        assert r["params_same"], "parameter objects were replaced"
        assert r["shards_same"], "a recompile re-sharded parameters"
        # 4 input shapes: the first compile, one re-trace after sharding (a cache hit), and at
        # most two more graphs once Dynamo marks sequence and batch dynamic.
        assert r["stats"]["solves"] <= 3, r["stats"]
        assert r["stats"]["cache_hits"] >= 1, r["stats"]
        assert r["freed"], "the full q_proj weight is still alive after sharding"
        local, full = r["plan_bytes"]
        assert full == r["full_bytes"]
        assert r["local_bytes"] == local
        # Norm weights (5 x 64 floats) are the only replicated parameters: ~1/2 + a bit.
        assert 0.5 < local / full < 0.51, local / full
        assert r["eager_error"] and "torch.compile" in r["eager_error"]


def _swap_and_free_worker(rank, world_size):
    """A compiled model's parameter replaced by a new tensor is sharded and used (the
    runner's per-call shortcut is keyed by the parameters' identity); dropping the model
    frees its local shards (the shortcut holds none alive)."""
    import tp_backend
    from torch.multiprocessing.reductions import StorageWeakRef

    torch._dynamo.reset()
    model, twin = make_model("llama"), make_model("llama")
    compiled = torch.compile(model, backend="tp_auto")
    ids = make_ids()
    errs = []
    with torch.no_grad():
        for step in range(3):
            if step == 2:  # a new q_proj weight, in both models
                new = 0.05 * torch.randn(model.model.layers[0].self_attn.q_proj.weight.shape,
                                         generator=torch.Generator().manual_seed(7))
                model.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(new.clone())
                twin.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(new.clone())
            ref = twin(input_ids=ids, use_cache=False).logits
            out = compiled(input_ids=ids, use_cache=False).logits
            errs.append((out - ref).abs().max().item())
    local = StorageWeakRef(tp_backend.local_shard(
        model.model.layers[1].self_attn.q_proj.weight).untyped_storage())
    del model, compiled, out
    gc.collect()
    return {"errs": errs, "freed": local.expired()}


def test_replaced_parameter_is_used_and_dropped_model_is_freed():
    for r in run_distributed(_swap_and_free_worker, 2):
        # The first error before the swap, the last after it: a stale shard of the old
        # q_proj weight would be off by far more than fp32 reordering (ATOL).
        assert max(r["errs"]) <= ATOL, r["errs"]
        assert r["freed"], "a local shard outlived its model"


def test_param_cache_drops_shards_when_a_parameter_dies():
    from tp_backend.backend import _ParamCache

    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    cache = _ParamCache(tuple(params), (torch.ones(1),) * 3)
    assert cache.ids == tuple(map(id, params)) and cache.locals is not None
    del params[1]
    gc.collect()
    assert cache.locals is None


def _threads_worker(rank, world_size):
    import tp_backend

    torch._dynamo.reset()
    ids = make_ids()
    seen = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            compiled = torch.compile(make_model("llama"), backend="tp_auto")
            with torch.no_grad():
                compiled(input_ids=ids, use_cache=False)
            seen.append(dict(tp_backend.tp_auto.stats))
    finally:
        torch.set_num_threads(1)
    return seen


@pytest.mark.inductor
def test_a_graph_compiled_under_other_threads_is_not_reused():
    """Inductor's CPU kernels are specialised on the thread count, and Dynamo recompiles
    when it changes: the backend then compiles again instead of returning the graph it
    compiled under 1 thread from its cache."""
    for seen in run_distributed(_threads_worker, 2):
        assert seen[0]["solves"] >= 1, seen
        assert seen[1]["solves"] > seen[0]["solves"], seen  # 2 threads: solved and compiled again


def _layouts_worker(rank, world_size):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    ref.load_state_dict(model.state_dict())
    step = torch.compile(model, backend="tp_auto", dynamic=True)
    errs = []
    with torch.no_grad():
        # a transposed view, a contiguous tensor, a transposed view again: Dynamo compiles
        # one graph per layout, with the same code and the same symbolic shapes
        for x in (torch.randn(8, 5).t(), torch.randn(6, 8), torch.randn(8, 7).t()):
            errs.append((step(x) - ref(x)).abs().max().item())
    return errs


@pytest.mark.inductor
def test_a_graph_compiled_for_other_input_strides_is_not_reused():
    """Dynamo recompiles when an input's layout changes (a key/value cache is a transposed
    view after the prefill, contiguous after a decode step's ``cat``); the backend's own
    cache must not hand the new graph the one compiled for the other strides, whose
    Inductor code assumes them (it failed with a stride assertion)."""
    for errs in run_distributed(_layouts_worker, 2):
        assert max(errs) <= ATOL, errs


def test_placeholders_of_split_values_start_at_offset_0():
    """The placeholders a decode step returns for its split cache entries (one per layer's
    keys and values) are distinct tensors of the global shape over one shared NaN element,
    all at storage offset 0. Placeholders at different offsets (one element each of an
    n-element storage, as before) made Dynamo compile the next step with one SymInt input
    per entry for its storage offset: 58 more graph inputs, and guards, per decode step of a
    30-layer model."""
    from tp_backend.runtime import placeholders

    phs = placeholders(5, (1, 2, 7, 4), torch.float32)
    assert len({id(p) for p in phs}) == 5
    for p in phs:
        assert p.shape == (1, 2, 7, 4)
        assert p.storage_offset() == 0
        assert p.untyped_storage().nbytes() == 4  # one float32 element backs all of them
        assert torch.isnan(p).all()
    ints = placeholders(2, (3,), torch.int64)
    assert all(p.storage_offset() == 0 and (p == 0).all() for p in ints)
