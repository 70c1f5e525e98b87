"""Typed access to what tp_backend records on the nodes of an FX graph (``node.meta``).

Owns the keys and their meaning; every module reads and writes them through these
functions, never by string. Must not: compute anything (the passes that set a value own
how it is found).

- *provenance* (set by :mod:`tp_backend.decompose`, copied to the nodes later passes
  insert): the name of the Dynamo node whose evaluation created an ATen node, and the
  path of that node's module (``""`` at the root), for messages and the plan's layers.
- *parameter* (set by :mod:`tp_backend.pipeline`): a placeholder's input index, the name
  of the parameter or state it holds (``named_parameters()`` spelling), and the role a
  pre-split input was stored in (``"shard"``, ``"column"``...).
- *unpad* (set by :mod:`tp_backend.padding`): the slice that cuts a padded vocabulary back
  to its real size.
"""

from __future__ import annotations

import torch.fx as fx

__all__ = ["describe", "source", "module", "set_provenance", "copy_provenance", "input_index",
           "set_input_index", "param_fqn", "set_param_fqn", "role", "set_role", "is_unpad",
           "mark_unpad"]

_SOURCE, _MODULE, _FQN, _INDEX, _ROLE, _UNPAD = (
    "tp_source", "tp_module", "tp_param_fqn", "tp_index", "tp_role", "tp_unpad")


def source(node: fx.Node) -> str:
    """The Dynamo node whose evaluation created ``node`` (``node.name`` if unknown)."""
    return node.meta.get(_SOURCE, node.name)


def module(node: fx.Node) -> str | None:
    """The path of the module ``node`` was computed in (``""``: the root; ``None``:
    unknown)."""
    return node.meta.get(_MODULE)


def set_provenance(node: fx.Node, source_name: str, module_path: str) -> None:
    """Record where ``node`` came from, unless it is known already."""
    node.meta.setdefault(_SOURCE, source_name)
    node.meta.setdefault(_MODULE, module_path)


def copy_provenance(dst: fx.Node, src: fx.Node, with_param: bool = False) -> None:
    """Give ``dst`` (a node a pass inserted for ``src``) ``src``'s provenance, and its
    parameter name with ``with_param`` (a padded copy of a parameter)."""
    keys = (_SOURCE, _MODULE, _FQN) if with_param else (_SOURCE, _MODULE)
    dst.meta.update({k: src.meta[k] for k in keys if k in src.meta})


def input_index(node: fx.Node) -> int:
    """The input index of placeholder ``node`` (set by the pipeline)."""
    return node.meta[_INDEX]


def set_input_index(node: fx.Node, index: int) -> None:
    node.meta[_INDEX] = index


def param_fqn(node: fx.Node) -> str | None:
    """The name of the parameter (or state) placeholder ``node`` holds, else ``None``."""
    return node.meta.get(_FQN)


def set_param_fqn(node: fx.Node, fqn: str, with_module: bool = False) -> None:
    """Name the parameter ``node`` holds; with ``with_module``, also record its module:
    the name less its last part (``"model.layers.0.mlp.up_proj"`` for
    ``"model.layers.0.mlp.up_proj.weight"``)."""
    node.meta[_FQN] = fqn
    if with_module:
        node.meta[_MODULE] = fqn.rpartition(".")[0]


def role(node: fx.Node) -> str:
    """The role a pre-split input was stored in (``"shard"`` unless set)."""
    return node.meta.get(_ROLE, "shard")


def set_role(node: fx.Node, value: str) -> None:
    node.meta[_ROLE] = value


def is_unpad(node: fx.Node) -> bool:
    """Whether ``node`` cuts a padded vocabulary back to its real size."""
    return bool(node.meta.get(_UNPAD))


def mark_unpad(node: fx.Node) -> None:
    node.meta[_UNPAD] = True


def describe(node: fx.Node) -> str:
    """A user-facing name for an ATen value: its module and Dynamo op."""
    mod = module(node) or "<root>"
    src = source(node)
    fqn = param_fqn(node)
    if fqn:
        return f"parameter {fqn!r}"
    return f"the output of {src!r} in module {mod!r}"
