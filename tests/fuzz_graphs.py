"""Random transformer-like models for differential fuzzing (issue 14, item 6).

A *spec* is a plain dict drawn by the hypothesis strategy :func:`specs`: sizes (batch B,
sequence S, hidden H, vocabulary V) and a list of blocks. :class:`FuzzNet` builds the module
a spec describes (seeded weights, so every process builds the same one) and its ``forward``
only reads the spec, so Dynamo sees the spec's choices as constants.

The blocks are made of the ops transformers models use:

- embeddings: a token table (V need not divide the TP size), a learned position table
  indexed by ``arange`` or by ``cumsum`` of the padding mask (OPT/RoBERTa style);
- attention: separate or fused QKV projections (split by ``split``, ``chunk``, or ``view``
  then slicing), grouped KV heads (``repeat_interleave`` or ``expand`` + ``reshape``),
  head layouts by ``view``+``transpose`` or ``unflatten``+``permute``, rotary embeddings
  (rotate-half by slicing and ``cat``, or interleaved by step slices and ``stack``), SDPA
  with a causal or padding mask or a hand-written softmax attention;
- MLPs: plain, gated, fused-gated (``chunk``), Conv1D-style ``addmm`` with ``[in, out]``
  weights, in-place activations and products;
- element-wise and indexing blocks on a projection's features: slices with steps,
  ``index_select``/``gather`` with a fixed permutation, ``cumsum``, reductions
  (``mean``/``amax``/``sum``), ``softmax`` over a ``view`` of the features, per-feature
  scales broadcast over the batch;
- norms: LayerNorm, a hand-written RMSNorm, or none;
- heads: an LM head (tied or not), a mean-pooled classifier, or the hidden states.

Sizes are small and often odd (heads 1..6, head dims 2..8, features 1..24), so dims that
do not divide the TP size are common.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # the strategies need hypothesis (a test dependency); FuzzNet does not
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

ACTS = ["gelu", "silu", "relu", "gelu_tanh"]
MISC = ["cumsum_seq", "center", "amax_gate", "permute_features", "step_slices", "scale_shift",
        "proj_slice", "proj_gather", "proj_cumsum", "proj_reduce", "proj_softmax_view",
        "proj_inplace"]


def _act(name, x, inplace=False):
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x, inplace=inplace)
    return F.relu(x, inplace=inplace)


if st is not None:
    @st.composite
    def attn_block(draw):
        nh = draw(st.integers(1, 6))
        nkv = draw(st.sampled_from([d for d in range(1, nh + 1) if nh % d == 0]))
        hd = draw(st.sampled_from([2, 4, 6, 8]))
        qkv = draw(st.sampled_from(["separate", "fused_split", "fused_view"]
                                   + (["fused_chunk"] if nkv == nh else [])))
        return {"kind": "attn", "nh": nh, "nkv": nkv, "hd": hd, "qkv": qkv,
                "bias": draw(st.booleans()), "o_bias": draw(st.booleans()),
                "rope": draw(st.sampled_from([None, "half", "interleaved"])),
                "kv_repeat": draw(st.sampled_from(["repeat_interleave", "expand"])),
                "heads": draw(st.sampled_from(["view", "unflatten"])),
                "attn": draw(st.sampled_from(["sdpa_causal", "sdpa_mask", "manual"])),
                "norm": draw(st.sampled_from(["layer", "rms", None]))}

    @st.composite
    def mlp_block(draw):
        return {"kind": "mlp", "inter": draw(st.integers(1, 24)),
                "mlp": draw(st.sampled_from(["plain", "gated", "fused_gated", "conv1d"])),
                "act": draw(st.sampled_from(ACTS)), "bias": draw(st.booleans()),
                "inplace": draw(st.booleans()),
                "norm": draw(st.sampled_from(["layer", "rms", None]))}

    @st.composite
    def misc_block(draw):
        return {"kind": "misc", "op": draw(st.sampled_from(MISC)),
                "inter": draw(st.integers(2, 24)), "act": draw(st.sampled_from(ACTS)),
                "norm": draw(st.sampled_from(["layer", "rms", None]))}

    @st.composite
    def specs(draw):
        """A model spec: ``{"B", "S", "H", "V", "pos", "blocks", "head", "tied"}``."""
        blocks = draw(st.lists(st.one_of(attn_block(), mlp_block(), misc_block()),
                               min_size=1, max_size=4))
        head = draw(st.sampled_from(["lm", "pool", "hidden"]))
        return {"B": draw(st.integers(1, 2)), "S": draw(st.integers(1, 7)),
                "H": draw(st.sampled_from([4, 6, 8, 12, 16])), "V": draw(st.integers(5, 40)),
                "pos": draw(st.sampled_from([None, "arange", "mask_cumsum"])),
                "pad": draw(st.integers(0, 2)), "blocks": blocks, "head": head,
                "tied": head == "lm" and draw(st.booleans()),
                "classes": draw(st.integers(1, 5))}


class RMSNorm(nn.Module):
    def __init__(self, h, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(h))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(kind, h):
    return RMSNorm(h) if kind == "rms" else nn.LayerNorm(h) if kind == "layer" else nn.Identity()


class Attention(nn.Module):
    def __init__(self, b, h):
        super().__init__()
        self.b = b
        nh, nkv, hd = b["nh"], b["nkv"], b["hd"]
        self.norm = _norm(b["norm"], h)
        if b["qkv"] == "separate":
            self.q_proj = nn.Linear(h, nh * hd, bias=b["bias"])
            self.k_proj = nn.Linear(h, nkv * hd, bias=b["bias"])
            self.v_proj = nn.Linear(h, nkv * hd, bias=b["bias"])
        else:
            self.qkv_proj = nn.Linear(h, (nh + 2 * nkv) * hd, bias=b["bias"])
        self.o_proj = nn.Linear(nh * hd, h, bias=b["o_bias"])

    def _heads(self, t, n):  # [B, S, n*hd] -> [B, n, S, hd]
        B, S, _ = t.shape
        if self.b["heads"] == "view":
            return t.view(B, S, n, self.b["hd"]).transpose(1, 2)
        return t.unflatten(-1, (n, self.b["hd"])).permute(0, 2, 1, 3)

    def _rope(self, t, pos):  # t [B, n, S, hd], pos [B, S]
        hd = self.b["hd"]
        inv = 1.0 / (100.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = pos[:, None, :, None].float() * inv  # [B, 1, S, hd/2]
        if self.b["rope"] == "half":
            cos = torch.cat([ang.cos(), ang.cos()], -1)
            sin = torch.cat([ang.sin(), ang.sin()], -1)
            rot = torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
            return t * cos + rot * sin
        even, odd = t[..., ::2], t[..., 1::2]
        cos, sin = ang.cos(), ang.sin()
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)

    def _repeat(self, t):  # [B, nkv, S, hd] -> [B, nh, S, hd]
        rep = self.b["nh"] // self.b["nkv"]
        if rep == 1:
            return t
        if self.b["kv_repeat"] == "repeat_interleave":
            return t.repeat_interleave(rep, dim=1)
        B, n, S, hd = t.shape
        return t[:, :, None].expand(B, n, rep, S, hd).reshape(B, n * rep, S, hd)

    def forward(self, x, pos, keep):
        b = self.b
        nh, nkv, hd = b["nh"], b["nkv"], b["hd"]
        y = self.norm(x)
        if b["qkv"] == "separate":
            q, k, v = self.q_proj(y), self.k_proj(y), self.v_proj(y)
        else:
            qkv = self.qkv_proj(y)
            if b["qkv"] == "fused_split":
                q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            elif b["qkv"] == "fused_chunk":
                q, k, v = qkv.chunk(3, dim=-1)
            else:  # a view over all heads, then slices of the head dim
                B, S, _ = qkv.shape
                t = qkv.view(B, S, nh + 2 * nkv, hd)
                q, k, v = (t[:, :, :nh].flatten(2), t[:, :, nh:nh + nkv].flatten(2),
                           t[:, :, nh + nkv:].flatten(2))
        q, k, v = self._heads(q, nh), self._heads(k, nkv), self._heads(v, nkv)
        if b["rope"]:
            q, k = self._rope(q, pos), self._rope(k, pos)
        k, v = self._repeat(k), self._repeat(v)
        S = x.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        if b["attn"] == "sdpa_causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # keys kept: not padding, causal; the diagonal always (no empty row)
            allowed = (causal & keep[:, None, None, :]) | torch.eye(S, dtype=torch.bool)
            if b["attn"] == "sdpa_mask":
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            else:
                s = q @ k.transpose(-1, -2) / math.sqrt(hd)
                s = s.masked_fill(~allowed, float("-inf"))
                o = s.softmax(-1) @ v
        o = o.transpose(1, 2).reshape(x.shape[0], S, nh * hd)
        return x + self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, b, h):
        super().__init__()
        self.b = b
        i = b["inter"]
        self.norm = _norm(b["norm"], h)
        if b["mlp"] == "conv1d":  # GPT-2's Conv1D: weight [in, out], addmm
            self.w_in = nn.Parameter(0.2 * torch.randn(h, i))
            self.b_in = nn.Parameter(0.1 * torch.randn(i))
            self.w_out = nn.Parameter(0.2 * torch.randn(i, h))
            self.b_out = nn.Parameter(0.1 * torch.randn(h))
        else:
            width = 2 * i if b["mlp"] == "fused_gated" else i
            self.up = nn.Linear(h, width, bias=b["bias"])
            if b["mlp"] == "gated":
                self.gate = nn.Linear(h, i, bias=b["bias"])
            self.down = nn.Linear(i, h, bias=b["bias"])

    def forward(self, x):
        b = self.b
        y = self.norm(x)
        if b["mlp"] == "conv1d":
            B, S, H = y.shape
            t = torch.addmm(self.b_in, y.reshape(-1, H), self.w_in)
            t = _act(b["act"], t, b["inplace"])
            return x + torch.addmm(self.b_out, t, self.w_out).view(B, S, H)
        if b["mlp"] == "plain":
            t = _act(b["act"], self.up(y), b["inplace"])
        else:
            if b["mlp"] == "gated":
                g, u = self.gate(y), self.up(y)
            else:
                g, u = self.up(y).chunk(2, dim=-1)
            g = _act(b["act"], g)
            t = g.mul_(u) if b["inplace"] else g * u
        return x + self.down(t)


class Misc(nn.Module):
    """One of :data:`MISC`: an element-wise, indexing, scan or reduction step on the hidden
    states, or on the features of a projection (``proj_*``: up, the op, down)."""

    def __init__(self, b, h):
        super().__init__()
        self.b = b
        op, i = b["op"], b["inter"]
        self.norm = _norm(b["norm"], h)
        gen = torch.Generator().manual_seed(h * 31 + i)
        if op == "permute_features":
            self.register_buffer("perm", torch.randperm(h, generator=gen))
        if op == "scale_shift":
            self.scale = nn.Parameter(1 + 0.1 * torch.randn(h))
            self.shift = nn.Parameter(0.1 * torch.randn(h))
        if op.startswith("proj_"):
            self.up = nn.Linear(h, i)
            width = {"proj_slice": len(range(1, i, 2)) or 1, "proj_gather": (i + 1) // 2}.get(op, i)
            self.down = nn.Linear(width, h)
            if op == "proj_gather":
                self.register_buffer("pick", torch.randperm(i, generator=gen)[:width])

    def forward(self, x):
        op = self.b["op"]
        y = self.norm(x)
        if op == "cumsum_seq":
            return x + 0.1 * y.cumsum(1)
        if op == "center":
            return y - y.mean(-1, keepdim=True)
        if op == "amax_gate":
            return x + y * y.amax(-1, keepdim=True).sigmoid()
        if op == "permute_features":
            return x + y.index_select(-1, self.perm)
        if op == "step_slices":
            return x + torch.cat([y[..., 1::2], y[..., ::2]], -1)
        if op == "scale_shift":
            return y * self.scale + self.shift
        t = self.up(y)
        if op == "proj_slice":
            t = t[..., 1::2] if t.shape[-1] > 1 else t
        elif op == "proj_gather":
            B, S, _ = t.shape
            t = torch.gather(t, -1, self.pick.expand(B, S, -1))
        elif op == "proj_cumsum":
            t = t.cumsum(-1) / t.shape[-1]
        elif op == "proj_reduce":
            t = _act(self.b["act"], t - t.sum(-1, keepdim=True) / t.shape[-1])
        elif op == "proj_softmax_view":
            i = t.shape[-1]
            a = next(d for d in (3, 2, 1) if i % d == 0)
            t = t.unflatten(-1, (a, i // a)).softmax(-1).flatten(-2)
        else:  # proj_inplace
            t.mul_(torch.sigmoid(t)).add_(1.0)
        return x + self.down(t)


class FuzzNet(nn.Module):
    """The model a spec describes. ``forward(ids [B, S] int64, keep [B, S] bool)`` returns
    logits ``[B, S, V]`` (``head="lm"``), class scores ``[B, classes]`` (``"pool"``) or the
    hidden states ``[B, S, H]``."""

    def __init__(self, spec, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.spec = spec
        h, v = spec["H"], spec["V"]
        self.embed = nn.Embedding(v, h)
        if spec["pos"]:
            self.pos = nn.Embedding(spec["S"] + 2, h)
        self.blocks = nn.ModuleList(
            Attention(b, h) if b["kind"] == "attn" else MLP(b, h) if b["kind"] == "mlp"
            else Misc(b, h) for b in spec["blocks"])
        self.final_norm = nn.LayerNorm(h)
        if spec["head"] == "lm":
            self.lm_head = nn.Linear(h, v, bias=False)
            if spec["tied"]:
                self.lm_head.weight = self.embed.weight
        elif spec["head"] == "pool":
            self.classifier = nn.Linear(h, spec["classes"])

    def forward(self, ids, keep):
        spec = self.spec
        x = self.embed(ids)
        S = ids.shape[1]
        if spec["pos"] == "mask_cumsum":  # OPT/RoBERTa: positions count kept tokens
            pos = keep.long().cumsum(1) * keep.long()
        else:
            pos = torch.arange(S).expand(ids.shape[0], S)
        if spec["pos"]:
            x = x + self.pos(pos)
        for blk in self.blocks:
            x = blk(x, pos, keep) if isinstance(blk, Attention) else blk(x)
        x = self.final_norm(x)
        if spec["head"] == "lm":
            return self.lm_head(x)
        if spec["head"] == "pool":
            return self.classifier(x.mean(1))
        return x


def inputs(spec, seed=1):
    """``(ids [B, S], keep [B, S])``: random tokens; the first ``pad`` positions of the last
    sequence are padding (left padding)."""
    g = torch.Generator().manual_seed(seed)
    B, S = spec["B"], spec["S"]
    ids = torch.randint(0, spec["V"], (B, S), generator=g)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[-1, :min(spec["pad"], S - 1)] = False
    return ids, keep
