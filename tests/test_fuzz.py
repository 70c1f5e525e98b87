"""Fuzzed differential testing (issue 14, item 6): random transformer-like models
(tests/fuzz_graphs.py) compiled with ``tp_auto`` at TP = 2, 3 and 4, each compared with the
same model run by one process. Replication is allowed; a wrong number or a crash is not.

hypothesis draws the models inside every rank of the group. With ``derandomize=True`` and
no example database, every rank draws the same sequence; after each example the ranks
agree on the outcome (one small collective on a separate group), so they also shrink a
failure the same way, and every rank reports the same smallest failing spec.

Profiles (``--fuzz-profile``, or the ``TP_FUZZ_PROFILE`` environment variable):

- ``ci`` (default, slow test): a fixed seed, 160 + 130 + 100 models at TP = 2, 3, 4
  (390 in all, about 4 minutes on CI's 2 cores).
- ``quick``: 30 per TP size, for a first look.
- ``long``: 3,000 per TP size (or ``TP_FUZZ_EXAMPLES``), a new random seed each run
  (printed; ``TP_FUZZ_SEED`` repeats one).

A failure it finds becomes a named test in tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import pytest
import torch

from dist_utils import log_records, run_distributed

pytestmark = pytest.mark.slow

# fp32 models of up to 4 blocks with hidden sizes up to 16: the sharded run adds the same
# products in another order (partial sums then an all-reduce), which moves results by a few
# ulps of values of order 1-10; 1e-4 leaves room for that and catches any real error
# (a wrong rule moves values by order 1).
ATOL, RTOL = 1e-4, 1e-4

# max_examples per TP size (TP=4 runs 4 processes on CI's 2 cores: the slowest per model)
PROFILES = {"ci": dict(max_examples={2: 160, 3: 130, 4: 100}, derandomize=True),
            "quick": dict(max_examples=30, derandomize=True),
            "long": dict(max_examples=int(os.environ.get("TP_FUZZ_EXAMPLES", 3000)),
                         derandomize=False)}


# One collector of tp_backend's log records per worker process, emptied for each model.
_log_records = functools.cache(log_records)


def check_spec(spec):
    """Compile ``FuzzNet(spec)`` with ``tp_auto`` on this rank and compare with the model run
    eagerly. Returns ``(problem or None, stats)``; ``stats`` has ``fallback`` (the graph ran
    replicated: no plan was made) and ``bytes`` (this rank's fraction of the parameter
    bytes). A pass that failed is a finding, like a crash: the fallback keeps the numbers
    right, but a failed pass is a defect of the pass, not a choice of the solver."""
    import tp_backend
    from fuzz_graphs import FuzzNet, inputs

    torch._dynamo.reset()  # (and tp_auto's plans with it: last_plan() is this model's)
    model = FuzzNet(spec)
    ids, keep = inputs(spec)
    full = sum(p.nbytes for p in model.parameters())
    records = _log_records()
    records.clear()
    try:
        with torch.no_grad():
            ref = model(ids, keep)
            out = torch.compile(model, backend="tp_auto", options={"compiler": "eager"})(ids, keep)
    except Exception as e:  # noqa: BLE001 - a crash is a finding
        return f"crash: {type(e).__name__}: {str(e)[:600]}", {}
    failed = [r.getMessage() for r in records
              if r.levelno >= logging.WARNING and "pass failed" in r.getMessage()]
    if failed:
        return f"a pass failed: {failed[0][:600]}", {}
    plan = tp_backend.last_plan()
    stats = {"fallback": plan is None or not plan.params,
             "bytes": tp_backend.local_parameter_bytes(model) / full}
    if out.shape != ref.shape:
        return f"wrong shape {tuple(out.shape)} vs {tuple(ref.shape)}", stats
    if not torch.allclose(out, ref, atol=ATOL, rtol=RTOL, equal_nan=True):
        return f"wrong result: max error {(out - ref).abs().max().item():.3g}", stats
    return None, stats


def _fuzz(rank, world_size, profile):
    import torch.distributed as dist
    from hypothesis import HealthCheck, Phase, given, settings

    from fuzz_graphs import specs

    agree = dist.new_group(backend="gloo")  # outcomes travel apart from the model's collectives
    seen = []
    cfg = dict(PROFILES[profile])
    if isinstance(cfg["max_examples"], dict):
        cfg["max_examples"] = cfg["max_examples"][world_size]
    seed = None
    if not cfg["derandomize"]:
        seed = int(os.environ.get("TP_FUZZ_SEED", time.time_ns() % 2**31))
        obj = [seed]
        dist.broadcast_object_list(obj, src=0, group=agree)
        seed = obj[0]

    def one(spec):
        problem, stats = check_spec(spec)
        outcomes = [None] * world_size
        dist.all_gather_object(outcomes, problem, group=agree)
        seen.append((spec, stats))
        bad = {r: p for r, p in enumerate(outcomes) if p is not None}
        if bad:
            raise AssertionError(f"TP={world_size} spec={spec!r}: {bad}")

    test = given(specs())(one)
    test = settings(database=None, deadline=None, print_blob=False,
                    suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], **cfg)(test)
    if seed is not None:
        from hypothesis import seed as hseed
        test = hseed(seed)(test)
    t0 = time.perf_counter()
    try:
        test()
    except AssertionError as e:
        # the smallest failing spec is the last one hypothesis ran
        return {"failure": str(e), "examples": len(seen), "seed": seed}
    return {"failure": None, "examples": len(seen), "seed": seed,
            "fallbacks": sum(1 for _, s in seen if s.get("fallback")),
            "bytes": sum(s["bytes"] for _, s in seen) / max(1, len(seen)),
            "seconds": time.perf_counter() - t0}


@pytest.mark.parametrize("tp_size", [2, 3, 4])
def test_fuzz(tp_size, request, capsys):
    profile = request.config.getoption("--fuzz-profile")
    r = run_distributed(_fuzz, tp_size, profile)[0]
    with capsys.disabled():
        print(f"\nfuzz TP={tp_size} ({profile}): {r['examples']} models"
              + (f", seed {r['seed']}" if r["seed"] is not None else "")
              + ("" if r["failure"] else
                 f", {r['fallbacks']} ran replicated, mean parameter bytes "
                 f"per rank {r['bytes']:.0%}, {r['seconds']:.0f} s"))
    assert r["failure"] is None, r["failure"]
