"""tp_backend: automatic tensor parallelism as a ``torch.compile`` backend.

``torch.compile(model, backend="tp_auto", options={"tp_group": group})`` splits any model
across the ranks of ``group`` with no per-model code. See README.md.

Owns: the package's public surface -- the names in ``__all__`` (re-exported from the modules
that define them), ``__version__``, :func:`last_plan`, and calling the version check first
on import. Must not: implement what it re-exports: compiling is :mod:`tp_backend.backend`'s,
loading :mod:`tp_backend.api`'s, split values and their accessors :mod:`tp_backend.runtime`'s,
gradients :mod:`tp_backend.training`'s, the sharded-parameter tensor
:mod:`tp_backend.tp_tensor`'s, whole and sharded state dicts :mod:`tp_backend.state`'s,
the version check itself :mod:`tp_backend.versions`'s.
"""

from .versions import check_versions as _check_versions

_check_versions()  # a clear ImportError for a torch/transformers outside the tested range

from .backend import TPAutoBackend, tp_auto
from .runtime import ShardInfo, local_parameter_bytes, local_shard, local_value, sharding_info
from .state import full_tensor, sharded_state_dict
from .tp_tensor import TPTensor
from .training import local_grad
from .api import parallelize_model
from .errors import (TPConfigError, TPDivisibilityError, TPError, TPInputMismatchError,
                     TPOptionsError, TPOptionsTypeError, TPPassError, TPProcessGroupError,
                     TPShardedModuleError, TPTrainingError, TPWeightError)
from .placement import Partial, Replicate, Shard
from .plan import CollectivePlan, ParamPlan, TPPlan

__all__ = [
    "tp_auto", "parallelize_model", "TPAutoBackend", "sharding_info", "ShardInfo", "local_shard",
    "local_parameter_bytes", "local_value", "local_grad", "TPTensor", "full_tensor", "sharded_state_dict",
    "last_plan", "TPPlan", "ParamPlan",
    "CollectivePlan", "Replicate", "Shard", "Partial", "TPError", "TPOptionsError",
    "TPOptionsTypeError", "TPProcessGroupError", "TPDivisibilityError", "TPShardedModuleError",
    "TPTrainingError", "TPWeightError", "TPConfigError", "TPInputMismatchError", "TPPassError",
]

__version__ = "0.1.0"


def last_plan() -> TPPlan | None:
    """The plan of the graph ``tp_auto`` solved most recently in this process, or ``None``."""
    return tp_auto.plans[-1] if tp_auto.plans else None
