"""Every propagation rule proven on numbers, exhaustively (issue 20).

For every registered op overload (samples in ``op_samples.py``) and every combination of
input placements -- replicate, partial, shard on each dim, a strided shard where the dim
allows -- with and without the float inputs counted as parameters (so the seeds fire), the
rule is asked for a decision at 2 and at 3 simulated ranks. Every decision it accepts is
run rank by rank (``rule_harness.simulate``: local chunks, partial addends, the decision's
local arguments and actions) and its output placement must reassemble the op's result on
the whole inputs. A combination a rule accepts that the simulation refutes fails the test.

Tolerance: float64 inputs; the simulation sums partial addends and matmul pieces in
another order than the whole op, so results differ by rounding (~1e-15 relative); a wrong
placement errs by O(1) (values are in [0.1, 0.9]). rtol = atol = 1e-9; 1e-5 where a float32
value is involved (a cast, the float32-only grouped matmul), as its addends round in
float32.

``python tests/test_rules_exhaustive.py`` prints the size of the check per op.
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

sys.path.insert(0, str(Path(__file__).parent))

import tp_backend.leaf_ops  # noqa: E402,F401 - registers the leaf ops and their rules
from op_samples import all_samples  # noqa: E402
from rule_harness import decide, simulate  # noqa: E402
from tp_backend.placement import PARTIAL, REPLICATE, Shard  # noqa: E402
from tp_backend.rules import RULES, RULES_BY_NAME, lookup  # noqa: E402

aten = torch.ops.aten
TP_SIZES = (2, 3)
# Registered packets that are not ops on this torch (no overload to call).
NOT_CALLABLE = {"transformers::grouped_mm_fallback"}  # a transformers kernel, not an ATen op


def build(sample):
    """A one-op FX graph for ``sample``: (placeholders, the op node, the input tensors)."""
    g = fx.Graph()
    phs, inputs = [], []

    def placeholder(v):
        if not isinstance(v, torch.Tensor):
            return v
        n = g.placeholder(f"x{len(phs)}")
        n.meta["val"] = v
        phs.append(n)
        inputs.append(v)
        return n

    args = tree_map(placeholder, sample.args)
    kwargs = tree_map(placeholder, sample.kwargs)
    node = g.call_function(sample.op, tuple(args), kwargs)
    node.meta["val"] = sample.op(*sample.args, **sample.kwargs)
    return phs, node, inputs


def placements_of(x: torch.Tensor, n: int):
    """Every placement a value ``x`` can have at ``n`` ranks."""
    out = [REPLICATE]
    if x.dtype is not torch.bool:
        out.append(PARTIAL)
    for d, size in enumerate(x.shape):
        if size >= n and size % n == 0:
            out.append(Shard(d))
        if size % (2 * n) == 0:
            out.append(Shard(d, outer=2))
        # an uneven split (issue 15): the finest units n does not divide
        units = [u for u in range(n + 1, size + 1) if size % u == 0 and u % n]
        if units:
            out.append(Shard(d, units=units[-1]))
    return out


def check_sample(sample):
    """Runs every accepted (placements, params, tp_size) case of ``sample``; returns
    (cases accepted and verified, cases refused, failures)."""
    phs, node, inputs = build(sample)
    assert lookup(node.target) is not None, f"no rule for {node.target}"
    floats = tuple(i for i, x in enumerate(inputs) if x.is_floating_point())
    ok, refused, failures = 0, 0, []
    # float32 samples (a cast, the float32-only grouped matmul): their partial addends
    # round in float32 already
    vals = inputs + [v for v in tree_flatten(node.meta["val"])[0] if isinstance(v, torch.Tensor)]
    tol = 1e-5 if any(v.dtype == torch.float32 for v in vals) else 1e-9
    for n in TP_SIZES:
        for combo in itertools.product(*(placements_of(x, n) for x in inputs)):
            for params in {(), floats}:
                dec, _ = decide(node, phs, list(combo), tp_size=n, params=params)
                if dec is None:
                    refused += 1
                    continue
                try:
                    simulate(node, phs, inputs, list(combo), dec, tp_size=n, rtol=tol,
                             atol=tol, same_rng=sample.same_rng, shape_only=sample.shape_only)
                    ok += 1
                except Exception as e:  # noqa: BLE001 - a wrong value and a crash both refute
                    failures.append(f"{node.target} at tp_size={n}, inputs {list(combo)}, "
                                    f"params {params}: rule says {dec.out} "
                                    f"(inputs {dict((k.name, v) for k, v in dec.inputs.items())}):"
                                    f" {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return ok, refused, failures


SAMPLES = all_samples()
BY_PACKET = defaultdict(list)
for _s in SAMPLES:
    BY_PACKET[str(_s.op.overloadpacket)].append(_s)


@pytest.mark.parametrize("packet", sorted(BY_PACKET))
def test_rule_is_exact_for_every_placement(packet):
    failures = []
    for sample in BY_PACKET[packet]:
        failures += check_sample(sample)[2]
    assert not failures, f"{len(failures)} refuted decisions:\n" + "\n".join(failures[:20])


def test_every_registered_op_is_sampled():
    """The catalogue covers every op a rule is registered for."""
    registered = {str(k) for k in RULES} | set(RULES_BY_NAME)
    sampled = set(BY_PACKET) | {str(s.op) for s in SAMPLES}
    sampled |= {str(s.op.overloadpacket).replace(".", "::", 1) for s in SAMPLES}
    missing = sorted(registered - sampled - NOT_CALLABLE)
    assert not missing, f"registered ops without a sample: {missing}"


def summary():
    """(overload, cases verified, cases refused) for every sampled overload."""
    rows = Counter(), Counter()
    for sample in SAMPLES:
        ok, refused, failures = check_sample(sample)
        rows[0][str(sample.op)] += ok
        rows[1][str(sample.op)] += refused
        for f in failures:
            print("FAIL", f)
    return rows


if __name__ == "__main__":
    ok, refused = summary()
    for op in sorted(ok | refused):
        print(f"{op:45s} {ok[op]:7d} {refused[op]:7d}")
    print(f"{len(ok | refused)} overloads of {len(BY_PACKET)} packets, {len(SAMPLES)} samples: "
          f"{sum(ok.values())} accepted cases verified, {sum(refused.values())} refused")
