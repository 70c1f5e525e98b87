"""Parameter names by identity, whatever the shape of the frame Dynamo compiles.

transformers 5.24 wrapped ``forward`` in ``deprecate_kwarg``; Dynamo's outermost frame
became that ``wrapped_func(*args, **kwargs)``, the parameters' source names started at
``L['args'][0]``, and the plan (parsed from those strings) named every parameter
``0.model.layers...`` and put every collective in "layer 0". These tests compile the same
tiny Llama through every frame shape a user writes and check that the plan names each
parameter exactly as the compiled module's ``named_parameters()`` does, and counts 2
all-reduces in every decoder layer, with logits equal to one process.
"""

import functools
from collections import Counter

import torch

from dist_utils import run_distributed
from models import make_ids, make_model
from tp_backend.naming import NameIndex

# fp32 logits; TP only reorders additions (see test_backend_models.py): 1e-5 catches any
# real error (~1e-2 or more).
ATOL = 1e-5


def _kwarg_wrapper(fn):
    """A decorator of the shape transformers 5.24 puts on every forward."""

    @functools.wraps(fn)
    def wrapped_func(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapped_func


class _Holder(torch.nn.Module):
    """A user's module holding the model as an attribute."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, ids):
        return self.inner(input_ids=ids, use_cache=False).logits


class _Breaking(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        torch._dynamo.graph_break()  # the MLP runs in its own graph, in this frame
        return self.mlp(x)


def _step(m, ids):
    return m(input_ids=ids, use_cache=False).logits


def _both(a, b, ids):
    return a(input_ids=ids, use_cache=False).logits + b(input_ids=ids, use_cache=False).logits


def _frame_shapes(rank, world_size):
    import tp_backend

    eager = {"compiler": "eager"}  # naming does not depend on the downstream compiler
    ids = make_ids()
    results = {}

    def record(case, out, ref, module):
        plans = tp_backend.tp_auto.plans
        names = set()
        for p in plans:
            for q in p.params.values():
                names.add(q.fqn)
                names.update(q.aliases)
        per_module_layer = Counter()
        for p in plans:
            for c in p.collectives:
                if c.kind == "all_reduce" and c.layer is not None:
                    root = c.module.split(".")[0] if case == "two models" else ""
                    per_module_layer[(root, c.layer)] += 1
        results[case] = {
            "err": (out - ref).abs().max().item(),
            "names": names,
            "expected": {n for n, _ in module.named_parameters(remove_duplicate=False)},
            "per_layer": dict(per_module_layer),
            # Each sharded parameter's own record names it (not the graph's first user).
            "misnamed": [(n, tp_backend.sharding_info(p).fqn)
                         for n, p in module.named_parameters()
                         if tp_backend.sharding_info(p) is not None
                         and tp_backend.sharding_info(p).fqn != n],
            "sharded": sum(tp_backend.sharding_info(p) is not None
                           for p in module.parameters()),
        }

    with torch.no_grad():
        ref = make_model("llama")(input_ids=ids, use_cache=False).logits

        torch._dynamo.reset()
        model = make_model("llama")
        out = torch.compile(model, backend="tp_auto", options=eager)(
            input_ids=ids, use_cache=False).logits
        record("torch.compile(model)", out, ref, model)

        torch._dynamo.reset()
        model = make_model("llama")
        model.compile(backend="tp_auto", options=eager)
        record("model.compile()", model(input_ids=ids, use_cache=False).logits, ref, model)

        torch._dynamo.reset()
        model = make_model("llama")
        cls = type(model)
        model.__class__ = type("Decorated" + cls.__name__, (cls,),
                               {"forward": _kwarg_wrapper(cls.forward)})
        out = torch.compile(model, backend="tp_auto", options=eager)(
            input_ids=ids, use_cache=False).logits
        record("decorated forward", out, ref, model)

        torch._dynamo.reset()
        model = make_model("llama")
        out = torch.compile(_step, backend="tp_auto", options=eager)(model, ids)
        record("user function", out, ref, model)

        torch._dynamo.reset()
        model = make_model("llama")
        step = torch.compile(lambda x: model(input_ids=x, use_cache=False).logits,
                             backend="tp_auto", options=eager)
        record("closure", step(ids), ref, model)

        torch._dynamo.reset()
        holder = _Holder(make_model("llama"))
        out = torch.compile(holder, backend="tp_auto", options=eager)(ids)
        record("held by a user module", out, ref, holder)

        torch._dynamo.reset()
        a, b = make_model("llama"), make_model("llama")
        out = torch.compile(_both, backend="tp_auto", options=eager)(a, b, ids)
        both = torch.nn.ModuleDict({"a": a, "b": b})  # names "a.<fqn>", "b.<fqn>"
        record("two models", out, 2 * ref, both)

        torch._dynamo.reset()
        model = make_model("llama")
        for layer in model.model.layers:
            layer.mlp = _Breaking(layer.mlp)
        out = torch.compile(model, backend="tp_auto", options=eager)(
            input_ids=ids, use_cache=False).logits
        record("graph break in a layer", out, ref, model)
    return results


def test_plan_names_equal_named_parameters_in_every_frame_shape():
    """Plain ``torch.compile(model)``, ``model.compile()``, a decorated forward (the 5.24
    case), a user function taking the model, a closure over it, a model held by a user's
    module, two models in one function (names say which) and a graph break inside a layer
    (the MLP graph's frame is an inner module's): the plan names every parameter as the
    compiled module's ``named_parameters()`` does, and counts 2 all-reduces per decoder
    layer (per model)."""
    results = run_distributed(_frame_shapes, 2)
    for rank, res in enumerate(results):
        assert len(res) == 8
        for case, r in res.items():
            assert r["err"] <= ATOL * (2 if case == "two models" else 1), (case, rank, r["err"])
            assert not r["misnamed"], (case, r["misnamed"][:3])
            assert r["sharded"] > 0, case
            roots = ("a", "b") if case == "two models" else ("",)
            if case == "graph break in a layer":
                # Dynamo runs the model's loop over layers eagerly and reuses layer 0's two
                # graphs (attention, MLP) for layer 1: the plans name layer 0's parameters,
                # each with its own name, and the sharded layer-1 parameters are named by
                # identity (checked by "misnamed" above).
                assert r["names"] and r["names"] <= r["expected"], (case, r["names"] - r["expected"])
                assert any(".mlp.mlp." in n for n in r["names"]), r["names"]
                assert r["per_layer"] == {("", 0): 2}, r["per_layer"]
                continue
            assert r["names"] == r["expected"], (case, sorted(r["names"] ^ r["expected"])[:6])
            assert r["per_layer"] == {(root, k): 2 for root in roots for k in (0, 1)}, \
                (case, r["per_layer"])


def test_tied_parameters_keep_one_name_and_list_aliases():
    """A tied LM head is one tensor with two names: the first (``state_dict`` order) is
    its name, the other an alias."""
    model = make_model("llama", tie_word_embeddings=True)
    index = NameIndex([("", model)])
    index.use([model.lm_head.weight])
    found = index.tensor(model.lm_head.weight)
    assert found.name == "model.embed_tokens.weight"
    assert found.aliases == ("lm_head.weight",)
    assert found.owner is model.model.embed_tokens
    assert index.module(model.model.layers[1].mlp) == "model.layers.1.mlp"


def test_unrelated_roots_prefix_names_only_when_both_are_used():
    """Two models reachable from one frame: names carry the root's label only if the
    graph's tensors come from both (otherwise names stay the model's own)."""
    a, b = make_model("llama"), make_model("llama")
    index = NameIndex([("a", a), ("b", b)])
    index.use([a.lm_head.weight])
    assert index.tensor(a.lm_head.weight).name == "lm_head.weight"
    index.use([a.lm_head.weight, b.lm_head.weight])
    assert index.tensor(b.lm_head.weight).name == "b.lm_head.weight"
    assert index.tensor(torch.zeros(1)) is None
