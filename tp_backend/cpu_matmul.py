"""Which kernel computes a float32 matmul on CPU in each rank's compiled graph.

Contract: :func:`decompositions` returns the decomposition table the backend hands to
Inductor (``compile_fx(..., decompositions=...)``). With ``"aten"`` it is Inductor's own
table (exactly what ``backend="inductor"`` uses). With ``"onednn"`` (the default) it also
sends ``aten.mm`` and ``aten.addmm`` on float32 CPU tensors to :func:`onednn_linear`,
oneDNN's fp32 GEMM, except where too few rows make its fixed cost show (see
:func:`use_onednn`). Other devices and dtypes keep Inductor's choice: on CUDA this module
changes nothing, and bf16/fp16 matmuls on CPU already run on oneDNN inside ATen.

Why: ATen computes fp32 ``mm`` on CPU with MKL's sgemm. On AMD CPUs MKL runs its AVX2
code (it dispatches AVX-512 only on Intel; no MKL environment variable changes that), while
oneDNN, which PyTorch ships, runs AVX-512 code. Measured on this project's CI machine (AMD
EPYC, Zen 5, 1 thread, fp32): ``[512, 1536] @ [1536, 2112]`` at 95 GFLOP/s with MKL and 206
with oneDNN; the 512-token prefill of ``benchmarks/forward.py``'s 258M Llama 1.80x faster
in eager. Inductor's own oneDNN linear (``mkldnn._linear_pointwise``, used with
``freezing=True`` for bf16/fp16 weights or a dynamic batch; frozen fp32 linears otherwise go
to MKL's packed GEMM) needs the weights as frozen constants, and here they are graph inputs
(each rank's shard, fed by the runner), so the kernel is wrapped as an op of its own
(:func:`tp_backend.dispatch.plain_op`) that Inductor calls as an opaque kernel, like
:mod:`tp_backend.leaf_ops`.

Numerics: the same fp32 products, summed in another order (no reduced precision; oneDNN's
``fp32_precision`` is left at its default). Against a float64 reference both kernels err by
about 1e-6 of the largest output (MKL 3.6e-7, oneDNN 1.2e-6 at K=1536); the tests'
tolerances are stated for that.

Letter key: M rows (tokens), K contraction dim (``in_features``), N output dim
(``out_features``).

Owns: the CPU fp32 matmul kernel of the compiled local graphs: the custom op
:func:`onednn_linear`, the choice :func:`use_onednn`, the table :func:`decompositions` and
``CPU_MATMUL_KERNELS``. Must not: validate the ``cpu_matmul`` option
(:mod:`tp_backend.options`), call the downstream compiler (:mod:`tp_backend.downstream` passes
the table to Inductor), or touch placements and collectives (the solver and
:mod:`tp_backend.rewrite`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .dispatch import plain_op

__all__ = ["onednn_linear", "use_onednn", "decompositions", "CPU_MATMUL_KERNELS"]

aten = torch.ops.aten

CPU_MATMUL_KERNELS = ("onednn", "aten")

# Below 4 rows (a decode step: M = batch) oneDNN's fixed cost per call (~15 us of primitive
# lookup, plus ~15 us for the custom-op call) outweighs its faster inner loop except on large
# weights. Measured (1 thread, us, MKL / oneDNN) for [M, K] @ [K, N], when the op went through
# torch.library.custom_op (about 6 us per call more than tp_backend.dispatch's registration
# costs now; the threshold was not measured again):
#   K x N = 1536 x 2112:  M=1 298/353, M=2 668/697, M=4 889/693, M=64 5554/2899
#   K x N = 1536 x 16032 (an LM head at TP=2):  M=1 5144/3613
_MIN_ROWS = 4
_MIN_WEIGHT_NUMEL_FEW_ROWS = 1 << 23  # 8M elements (32 MiB fp32)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` on oneDNN: ``x: [M, K]``, ``weight: [N, K]`` (nn.Linear's
    layout; any strides), ``bias: [N]`` or ``None`` -> ``[M, N]`` (contiguous), float32
    on CPU."""
    return torch.ops.mkldnn._linear_pointwise.default(x, weight, bias, "none", [], "")


def _onednn_linear_fake(x, weight, bias=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


# ``tp_backend::onednn_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor``.
onednn_linear = plain_op("tp_backend::onednn_linear", _onednn_linear, _onednn_linear_fake)


def use_onednn(x: torch.Tensor, w_t: torch.Tensor) -> bool:
    """Whether ``mm(x, w_t)`` (``x: [M, K]``, ``w_t: [K, N]``) goes to oneDNN: float32 CPU
    operands, and either at least 4 rows (or a row count not known while tracing, e.g. a
    dynamic sequence length) or a weight of at least 8M elements. Decided while tracing,
    without adding guards."""
    # mm's operands are 2-D and of one dtype (the op checks both).
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if statically_known_true(x.shape[0] < _MIN_ROWS):
        return statically_known_true(w_t.shape[0] * w_t.shape[1] >= _MIN_WEIGHT_NUMEL_FEW_ROWS)
    return True


def decompositions(kernel: str) -> dict:
    """The decomposition table for Inductor: its own (``select_decomp_table()``), plus,
    for ``kernel == "onednn"`` where this build of torch has oneDNN, ``aten.mm`` /
    ``aten.addmm`` on float32 CPU tensors rewritten to :func:`onednn_linear`.

    Raises:
        ValueError: ``kernel`` is not one of ``CPU_MATMUL_KERNELS``.
    """
    from torch._inductor.decomposition import select_decomp_table

    if kernel not in CPU_MATMUL_KERNELS:
        raise ValueError(f"cpu_matmul must be one of {CPU_MATMUL_KERNELS}, got {kernel!r}")
    table = dict(select_decomp_table())
    if kernel == "aten" or not torch.backends.mkldnn.is_available():
        return table
    inductor_mm = table.get(aten.mm.default)
    inductor_addmm = table.get(aten.addmm.default)

    def mm(x, w_t):
        if use_onednn(x, w_t):
            # mm(x, W.t()) is a linear with W: [N, K]; the transposed view costs no copy.
            return torch.ops.tp_backend.onednn_linear(x, w_t.t())
        return inductor_mm(x, w_t) if inductor_mm is not None else NotImplemented

    def addmm(bias, x, w_t, *, beta=1, alpha=1):
        if beta == 1 and alpha == 1 and bias.dim() == 1 and use_onednn(x, w_t) \
                and statically_known_true(bias.shape[0] == w_t.shape[1]):
            return torch.ops.tp_backend.onednn_linear(x, w_t.t(), bias)
        if inductor_addmm is not None:
            return inductor_addmm(bias, x, w_t, beta=beta, alpha=alpha)
        return NotImplemented

    table[aten.mm.default] = mm
    table[aten.addmm.default] = addmm
    return table
