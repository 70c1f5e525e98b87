"""Checkpoints: finding a model's files and reading this rank's slice of each weight.

``resolve_model_dir`` turns a hub id into a local directory with huggingface_hub
``snapshot_download`` (only config, safetensors and index files; honours ``revision``,
``cache_dir``, ``local_files_only`` and ``HF_HUB_OFFLINE``); a local directory is used as
is. :class:`CheckpointIndex` maps tensor names to files (``model.safetensors`` or the
``weight_map`` of ``model.safetensors.index.json``). :func:`read_tensor` reads a whole
tensor or one slice along a dim with safetensors ``safe_open(...).get_slice``, so a rank
never materialises the rest of a sharded tensor.

:class:`ParameterMeta` is the reference design's per-parameter record: global shape and
dtype, which checkpoint tensor (file and name) the parameter comes from, and the other
names a tied parameter is known by.

Owns: finding a model's files (:func:`resolve_model_dir`, ``NEEDED_FILES``), the name ->
file and shape index (:class:`CheckpointIndex`), :class:`ParameterMeta`, every read of a
checkpoint tensor (:func:`read_tensor`, :func:`load_pending`) and the record of reads
(``READS``). Must not: decide which slice a rank reads (the
:class:`~tp_backend.runtime.ShardInfo` from the solved plan says), keep what it read (the
``shard`` callback hands it to the store of :mod:`tp_backend.runtime`), or build models
(:mod:`tp_backend.api`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .errors import TPWeightError

__all__ = ["ParameterMeta", "CheckpointIndex", "read_tensor", "resolve_model_dir", "READS",
           "NEEDED_FILES", "load_pending"]

NEEDED_FILES = ["config.json", "generation_config.json", "*.safetensors",
                "model.safetensors.index.json"]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Every read: (tensor name, shape read, bytes). Tests use it to prove that a rank reads
# only its slices; cleared with READS.clear().
READS: list = []


@dataclass(frozen=True)
class ParameterMeta:
    """Where one parameter's values live.

    Attributes:
        fqn: the parameter's name in the model (``model.embed_tokens.weight``).
        source: the tensor's name in the checkpoint (differs from ``fqn`` for tied
            parameters stored once, e.g. ``lm_head.weight`` -> ``model.embed_tokens.weight``).
        file: the safetensors file holding it.
        global_shape: the unsharded shape.
        dtype: the dtype the parameter is loaded as.
        tied: all names the parameter has in the model.
        device: where the parameter's values go (read on CPU, then moved).
    """

    fqn: str
    source: str
    file: str
    global_shape: tuple
    dtype: torch.dtype
    tied: tuple = field(default=())
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def resolve_model_dir(model_name_or_path: str, *, revision=None, cache_dir=None,
                      local_files_only=False, config_only: bool = False) -> str:
    """A local directory holding the model's config and safetensors files (only the
    config with ``config_only``)."""
    if os.path.isdir(model_name_or_path):
        return model_name_or_path
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    return snapshot_download(model_name_or_path, revision=revision, cache_dir=cache_dir,
                             local_files_only=local_files_only or offline,
                             allow_patterns=["config.json"] if config_only else NEEDED_FILES)


class CheckpointIndex:
    """Tensor name -> safetensors file of a checkpoint directory.

    Raises:
        TPWeightError: no safetensors weights in ``directory``, an index naming a missing
            file, or a file whose header cannot be read (truncated or corrupt).
    """

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        self._shapes: dict = {}
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            self.weight_map = {k: os.path.join(directory, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            self._shapes = _shapes(single)  # one read of the header gives names and shapes
            self.weight_map = {k: single for k in self._shapes}
            return
        else:
            raise TPWeightError(f"no safetensors weights in {directory}: expected {SINGLE_FILE} "
                                f"or {INDEX_FILE} (only safetensors checkpoints are supported)")
        for path in sorted(set(self.weight_map.values())):
            if not os.path.exists(path):
                names = [k for k, v in self.weight_map.items() if v == path]
                raise TPWeightError(f"checkpoint file {path} is missing (it should hold "
                                    f"{names[0]!r} and {len(names) - 1} more tensors)")
            self._shapes.update(_shapes(path))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise TPWeightError(f"tensor {name!r} is not in the checkpoint {self.directory}")
        return self.weight_map[name]

    def shape_of(self, name: str) -> tuple:
        path = self.file_of(name)
        if name not in self._shapes:
            raise TPWeightError(f"tensor {name!r} is listed for {path} but that file does not hold it")
        return self._shapes[name]


def _shapes(path):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise TPWeightError(f"cannot read safetensors file {path}: {e}") from e


def read_tensor(meta: ParameterMeta, dim: int | None = None, start: int = 0,
                length: int | None = None) -> torch.Tensor:
    """The parameter's values, or rows ``[start, start + length)`` of dim ``dim`` only.

    Returns a contiguous tensor of ``meta.dtype`` on ``meta.device``. Raises
    :class:`TPWeightError` naming the file and the tensor if the file is missing or corrupt
    or the shape is wrong.
    """
    from safetensors import safe_open

    try:
        with safe_open(meta.file, framework="pt", device="cpu") as f:
            sl = f.get_slice(meta.source)
            shape = tuple(sl.get_shape())
            if shape != tuple(meta.global_shape):
                raise TPWeightError(f"tensor {meta.source!r} in {meta.file} has shape {list(shape)}, "
                                    f"the model expects {list(meta.global_shape)} for {meta.fqn!r}")
            if dim is None:
                t = sl[:] if shape else f.get_tensor(meta.source)
            else:
                index = [slice(None)] * len(shape)
                index[dim] = slice(start, start + length)
                t = sl[tuple(index)]
    except TPWeightError:
        raise
    except FileNotFoundError as e:
        raise TPWeightError(f"checkpoint file {meta.file} is missing (needed for tensor "
                            f"{meta.source!r})") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise TPWeightError(f"cannot read tensor {meta.source!r} from {meta.file}: {e}") from e
    t = t.to(dtype=meta.dtype, device=meta.device).contiguous()
    READS.append((meta.source, tuple(t.shape), t.nbytes))
    return t


def load_pending(items: list, specs: dict, pending, whole, shard) -> None:
    """Read the weights of ``items`` (``[(input index, parameter)]``, each a key of
    ``pending`` whose value is its :class:`ParameterMeta`): the whole tensor of a
    parameter kept whole (into ``whole[param]``, the store's ``whole``: the parameter
    keeps its placeholder, see :class:`~tp_backend.runtime.ShardStore`), only this rank's
    slice of one split as ``specs[index]`` (a :class:`~tp_backend.runtime.ShardInfo`)
    says, handed to ``shard(param, info, index, local)`` (safetensors ``get_slice``: the
    rest of the tensor is never read). A progress bar (tqdm) on rank 0.

    Raises:
        TPWeightError: a missing or unreadable file or tensor (see :func:`read_tensor`).
    """
    show = bool(specs) and next(iter(specs.values())).tp_rank == 0
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="loading weights (rank 0)", unit="tensor")
    for idx, t in items:
        meta = pending.pop(t)
        info = specs.get(idx)
        if info is None:  # kept whole: the parameter keeps its placeholder
            whole[t] = read_tensor(meta)
        else:
            local = info.take(lambda start, n: read_tensor(meta, info.dim, start, n),
                              meta.dtype, meta.device)
            shard(t, info, idx, local)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
