"""Named regression tests for what the fuzzer (tests/test_fuzz.py) and issue 14's zoo
found. Each runs the smallest failing model against one process (same tolerance as the
fuzzer: fp32 sums in another order)."""

import torch

from dist_utils import run_distributed
from test_fuzz import ATOL, RTOL, check_spec

# Found by hypothesis (shrunk), TP=2: a fused QKV projection viewed as [B, S, 3 heads, 2]
# (1 query + 1 key + 1 value head). 3 does not divide 2: the view rule raised
# TPDivisibilityError, a crash where one process runs. Now the projection stays whole
# (with a warning) and the rest of the model still splits.
FUSED_QKV_THREE_GROUPS = {
    "B": 1, "S": 1, "H": 4, "V": 5, "pos": None, "pad": 0, "head": "pool", "tied": False,
    "classes": 1,
    "blocks": [
        {"kind": "attn", "nh": 1, "nkv": 1, "hd": 2, "qkv": "fused_view", "bias": False,
         "o_bias": False, "rope": None, "kv_repeat": "repeat_interleave", "heads": "view",
         "attn": "sdpa_causal", "norm": "layer"},
        {"kind": "mlp", "inter": 8, "mlp": "gated", "act": "silu", "bias": False,
         "inplace": False, "norm": "rms"},
    ]}


def _spec(rank, world_size, spec):
    problem, stats = check_spec(spec)
    return problem, stats


def test_fused_qkv_with_groups_tp_does_not_divide():
    for problem, stats in run_distributed(_spec, 2, FUSED_QKV_THREE_GROUPS):
        assert problem is None, problem
        assert not stats["fallback"]
        assert stats["bytes"] < 0.9, stats  # the MLP is still split


class _VmapScan(torch.nn.Module):
    """Zamba's Mamba scan runs ``torch.vmap`` inside the forward. functorch's
    ``functionalize`` (the decomposition's old tracer) broke on it with ``INTERNAL ASSERT
    FAILED ... TransformType::Functionalize`` and left functorch's layer stack dirty, so even
    the replicated fallback crashed in Dynamo's guards."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        h = torch.vmap(lambda row: row.cumsum(0) * torch.sigmoid(row))(h)
        return self.down(h)


def _vmap(rank, world_size):
    import tp_backend

    model = _VmapScan()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="tp_auto",
                            options={"compiler": "eager", "fallback": "raise"})(x)
    return (out - ref).abs().max().item(), tp_backend.last_plan().params["up.weight"].layout


def test_vmap_inside_the_graph():
    for err, layout in run_distributed(_vmap, 2):
        assert err <= ATOL + RTOL, err
        assert layout == "column"
