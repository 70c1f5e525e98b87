"""Exceptions raised by tp_backend.

Every user-facing failure raises a subclass of :class:`TPError`, so callers can catch the
package's errors in one place. Option errors also subclass ``ValueError``/``TypeError`` and
divisibility errors ``ValueError``, the training error ``NotImplementedError``, matching the
exception types PyTorch users expect.

Owns: the exception classes (:class:`TPError` and its subclasses) and which builtin type
each also is. Must not: decide when to raise or what a message says (the module that finds
the failure does: e.g. :mod:`tp_backend.options`, :mod:`tp_backend.checkpoint`,
:mod:`tp_backend.pipeline`), or import any other tp_backend module.
"""

__all__ = [
    "TPError",
    "TPOptionsError",
    "TPOptionsTypeError",
    "TPProcessGroupError",
    "TPDivisibilityError",
    "TPShardedModuleError",
    "TPWeightError",
    "TPConfigError",
    "TPInputMismatchError",
    "TPPassError",
    "TPTrainingError",
]


class TPError(RuntimeError):
    """Base class of every error tp_backend raises on purpose."""


class TPOptionsError(TPError, ValueError):
    """An option passed to ``tp_auto`` is unknown or has a bad value."""


class TPOptionsTypeError(TPError, TypeError):
    """An option passed to ``tp_auto`` has the wrong type."""


class TPProcessGroupError(TPError):
    """No tensor-parallel process group was given and none can be inferred."""


class TPDivisibilityError(TPError, ValueError):
    """A dimension that must be split across the TP ranks is not divisible by ``tp_size``."""


class TPTrainingError(TPError, NotImplementedError):
    """A training use ``tp_auto`` does not support: a class-weighted cross-entropy or
    probability targets in a training graph, or backward through the outputs of a graph
    compiled for inference (under ``torch.no_grad()``)."""


class TPShardedModuleError(TPError):
    """A module whose parameters were sharded by ``tp_auto`` was called without compilation,
    or an eager operation on a :class:`~tp_backend.TPTensor` other than the element-wise
    ones, norms and copies."""


class TPWeightError(TPError):
    """A checkpoint file or tensor is missing, corrupt or of the wrong shape; the message
    names the file and the tensor."""


class TPConfigError(TPError):
    """A model directory has no usable config (missing ``config.json`` or ``architectures``)."""


class TPInputMismatchError(TPError, ValueError):
    """The ranks of a tensor-parallel group were called with different inputs (raised on
    every rank; the message names the inputs and the ranks)."""


class TPPassError(TPError):
    """A pass of the pipeline (decomposition, padding, solver, rewrite) failed on a graph
    with an unexpected error. ``pass_name`` names the pass; the original error is the
    ``__cause__``. ``seeds`` (self-check only): name -> description of the seeds whose
    split reached the bad value. With ``fallback="replicate"`` (the default) the backend
    catches it and runs that graph replicated."""

    def __init__(self, message: str, pass_name: str, detail: str | None = None,
                 seeds: dict | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.detail = detail or message  # what went wrong, without the pass's name
        self.seeds = seeds or {}
