"""The vocab-parallel cross-entropy (``tp_backend::vocab_parallel_cross_entropy``) against
``F.cross_entropy`` on the whole logits: the loss and this rank's slice of the logits'
gradient, for every reduction, ignored rows, label smoothing and an extra dim.

Tolerance: relative 1e-6 (fp32 loss) and 1e-6 of the largest gradient element. The split
version sums the exponentials in two parts (one per rank) and adds them, which reorders a
sum of C terms; nothing else differs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tp_backend  # noqa: F401  (registers the op)
from dist_utils import run_distributed
from models import make_ids

CASES = [  # (reduction, label_smoothing, extra dim)
    ("mean", 0.0, False), ("sum", 0.0, False), ("none", 0.0, False),
    ("mean", 0.1, False), ("none", 0.2, True), ("mean", 0.0, True),
]


def _compare(rank, world_size):
    import torch.distributed as dist

    group = dist.group.WORLD.group_name
    out = []
    for reduction, smoothing, extra in CASES:
        g = torch.Generator(torch.get_default_device()).manual_seed(0)
        n, c = 12, 10 * world_size
        shape = (n, c, 3) if extra else (n, c)
        x = (torch.randn(shape, generator=g) * 4).requires_grad_(True)
        target = torch.randint(0, c, (n, 3) if extra else (n,), generator=g)
        target[::4] = -100  # ignored rows
        want = F.cross_entropy(x, target, reduction=reduction, label_smoothing=smoothing)
        upstream = torch.randn(want.shape, generator=g)
        (want * upstream).sum().backward()
        step = c // world_size
        local = x.detach()[:, rank * step:(rank + 1) * step].clone().requires_grad_(True)
        got, _ = torch.ops.tp_backend.vocab_parallel_cross_entropy(
            local, target, rank * step, c, group, {"none": 0, "mean": 1, "sum": 2}[reduction],
            -100, smoothing)
        (got * upstream).sum().backward()
        want_grad = x.grad[:, rank * step:(rank + 1) * step]
        out.append({
            "case": (reduction, smoothing, extra),
            "loss_err": ((got - want).abs().max() / want.abs().max()).item(),
            "grad_err": ((local.grad - want_grad).abs().max() / x.grad.abs().max()).item(),
        })
    return out


def test_matches_cross_entropy_on_whole_logits():
    for results in run_distributed(_compare, 2):
        for r in results:
            assert r["loss_err"] <= 1e-6 and r["grad_err"] <= 1e-6, r


def _in_model(rank, world_size, options):
    import zoo

    torch._dynamo.reset()
    model = zoo.make_model("llama").train()
    ids = make_ids(vocab=250, seed=1)
    step = torch.compile(model, backend="tp_auto", options={"compiler": "eager", **options})
    step(input_ids=ids, labels=ids).loss.backward()
    plan = tp_backend.last_plan()
    # the local graph calls the vocab-parallel loss, and gathers no [N, C] logits for it
    return {"lm_head": str(plan.params["lm_head.weight"].layout),
            "loss_reduces": sum(1 for c in plan.collectives
                                if c.layer is None and c.module == "" and
                                str(c.kind) == "all_reduce"),
            "gathers": [c.module for c in plan.collectives if str(c.kind) == "all_gather"]}


@pytest.mark.parametrize("options,gathers", [({}, []), ({"outputs": "gather"}, ["lm_head"])])
def test_language_model_loss_runs_vocab_parallel(options, gathers):
    """A tiny Llama with ``labels`` at TP=2: the LM head stays vocab-split and the loss
    takes two all-reduces; nothing is all-gathered (the default returns the logits split
    beside a training forward's own loss), or only the returned logits with
    ``outputs="gather"`` (gradients: see test_training.py, whose causal-LM losses all take
    this path)."""
    for r in run_distributed(_in_model, 2, options):
        assert r["lm_head"] == "column" and r["loss_reduces"] == 2, r
        assert r["gathers"] == gathers, r


def _split_outputs(rank, world_size, options):
    import copy

    import zoo

    torch._dynamo.reset()
    model = zoo.make_model("llama").train()
    ref = copy.deepcopy(model)
    ids = make_ids(vocab=250, seed=1)
    want = ref(input_ids=ids, labels=ids)
    want.loss.backward()
    step = torch.compile(model, backend="tp_auto",
                         options={"compiler": "eager", **options})
    out = step(input_ids=ids, labels=ids)
    out.loss.backward()
    plan = tp_backend.last_plan()
    logits = out.logits
    v_local = want.logits.shape[-1] // world_size
    mine = want.logits.detach()[..., rank * v_local:(rank + 1) * v_local]
    grad = model.lm_head.weight.grad
    grad_mine = ref.lm_head.weight.grad[rank * v_local:(rank + 1) * v_local]
    with torch.no_grad():  # an evaluation forward with labels: an inference graph
        eval_type = type(step(input_ids=ids, labels=ids).logits).__name__
    # the same graph compiled again with outputs="gather" (no reset): solved apart
    gathered = torch.compile(model, backend="tp_auto",
                             options={"compiler": "eager", "outputs": "gather"})
    gather_type = type(gathered(input_ids=ids, labels=ids).logits).__name__
    try:  # what generate would do: not element-wise, so a clear error
        logits[:, -1]
        refused = None
    except tp_backend.TPShardedModuleError as e:
        refused = str(e)
    return {"type": type(logits).__name__, "shape": tuple(logits.shape),
            "want_shape": tuple(want.logits.shape),
            "local_err": (logits.to_local() - mine).abs().max().item(),
            "whole_err": (tp_backend.full_tensor(logits) - want.logits).abs().max().item(),
            "loss_err": (out.loss - want.loss).abs().item(),
            "grad_err": (grad.to_local() - grad_mine).abs().max().item(),
            "gathers": [c.module for c in plan.collectives if str(c.kind) == "all_gather"],
            "refused": refused, "eval_type": eval_type, "gather_type": gather_type}


@pytest.mark.parametrize("options,eval_type", [({}, "Tensor"),
                                               ({"outputs": "split"}, "TPTensor")])
def test_split_outputs_return_the_logits_split(options, eval_type):
    """A training forward with labels, under the default ``outputs="auto"`` and under
    ``"split"``: the logits returned beside the loss stay split (a TPTensor of the global
    shape over this rank's vocabulary slice), so no rank holds them whole (an evaluation
    forward under no_grad gathers them under "auto", not under "split"); the loss, the gradients and the gathered logits equal one process's (fp32,
    TP only reorders additions: observed <= 5e-7; 1e-5 absolute, while a wrong slice or a
    lost gradient is off by ~1e-1)."""
    for r in run_distributed(_split_outputs, 2, options):
        assert r["type"] == "TPTensor" and r["shape"] == r["want_shape"], r
        assert r["eval_type"] == eval_type and r["gather_type"] == "Tensor", r
        assert r["gathers"] == [], r
        assert r["refused"] and "'outputs'" in r["refused"] and "'gather'" in r["refused"], r
        assert max(r["local_err"], r["whole_err"], r["loss_err"], r["grad_err"]) <= 1e-5, r
