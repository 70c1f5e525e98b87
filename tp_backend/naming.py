"""Names of what a captured graph receives, found by identity.

Owns: the mapping from the tensors and modules of a Dynamo graph to the names the user's
own model gives them (``model.named_parameters()``, ``named_buffers()``,
``named_modules()``). Must not: parse Dynamo's source names (they change with every
decorator: transformers 5.24 wraps ``forward`` in ``deprecate_kwarg`` and the parameters'
sources then start at ``L['args'][0]`` instead of ``L['self']``), or ``eval`` anything.

How. The backend receives the real parameter and buffer tensors as example inputs. The
*roots* are the ``nn.Module`` objects the compiled frame can reach: its locals (``self``, a
function's module arguments, modules inside ``*args``/``**kwargs``), the modules whose
``forward`` is running inside the same compiled call (after a graph break the frame being
compiled is an inner module's, and the outer ones are still on the Python stack), and, last,
the frame's global modules. Each tensor is named under the outermost root that holds it
(``torch.compile(model)`` gives ``model.layers.0.mlp.up_proj.weight``, whatever the frame
shape); when the graph's tensors come from several unrelated roots (two models in one
compiled function), every name is prefixed with the root's variable name (``a.model...``).
Tied tensors keep their first name (``state_dict`` order) and list the others as aliases.

Module paths of graph nodes come from Dynamo's ``nn_module_stack``, whose keys are the
modules' ``id()`` (``record_nn_module_stack(str(id(mod)), ...)``; repeated calls get an
``@n`` suffix), looked up among the roots' ``named_modules()``.
"""

from __future__ import annotations

import logging
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

log = logging.getLogger("tp_backend")

__all__ = ["TensorName", "NameIndex", "roots_of_compiling_frame"]


@dataclass(frozen=True)
class TensorName:
    """A parameter or buffer's name: ``name`` as ``state_dict()`` spells it, the other names
    of the same tensor (``aliases``, tied weights), the module holding it under ``name``
    (``owner``) and every module holding it under one of its names (``holders``)."""

    name: str
    aliases: tuple
    owner: torch.nn.Module | None
    holders: tuple = ()


def _unwrap(m):
    # torch.compile(model) returns an OptimizedModule holding the model as _orig_mod.
    while isinstance(m, torch._dynamo.eval_frame.OptimizedModule):
        m = m._orig_mod
    return m


def _modules_in(label: str, value, out: list, depth: int = 0) -> None:
    """Modules in a frame variable: the value itself, or (one level down) the items of a
    tuple/list (``*args``) or the values of a dict (``**kwargs``)."""
    if isinstance(value, torch.nn.Module):
        out.append((label, _unwrap(value)))
    elif depth == 0 and isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _modules_in(f"{label}.{i}", v, out, 1)
    elif depth == 0 and isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str):
                _modules_in(f"{label}.{k}", v, out, 1)


def _frames_inside_compiled_call():
    """Python frames between Dynamo's frame callback and the ``torch.compile`` entry:
    the outer modules' frames still running when an inner frame is compiled (after a graph
    break). Empty when not called from a Dynamo compile."""
    frames = []
    f = sys._getframe()
    while f is not None:
        frames.append(f)
        f = f.f_back
    mods = [fr.f_globals.get("__name__", "") for fr in frames]
    callback = [i for i, m in enumerate(mods) if m == "torch._dynamo.convert_frame"]
    if not callback:
        return []
    inside = []
    for fr, m in zip(frames[callback[-1] + 1:], mods[callback[-1] + 1:]):
        if m.startswith("torch._dynamo"):  # the torch.compile entry: outside from here
            break
        inside.append(fr)
    return inside


def roots_of_compiling_frame() -> tuple[list, list]:
    """``(roots, fallback_roots)``, lists of ``(label, module)`` for the frame Dynamo is
    compiling: its locals and the modules running inside the same compiled call; then its
    global modules, used only for tensors no root holds (a function that calls a global
    ``model``). Empty outside a Dynamo compile."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - not inside a Dynamo compile
        tx = None
    found: list = []
    if tx is not None:
        for k, v in tx.f_locals.items():
            _modules_in(k, v, found)
    for fr in _frames_inside_compiled_call():
        for k, v in fr.f_locals.items():
            if isinstance(v, torch.nn.Module):
                found.append((k, _unwrap(v)))
    glob: list = []
    if tx is not None:
        for k, v in tx.f_globals.items():
            if isinstance(v, torch.nn.Module):
                glob.append((k, _unwrap(v)))
    seen: set = set()

    def dedup(pairs):
        out = []
        for label, m in pairs:
            if id(m) not in seen:
                seen.add(id(m))
                out.append((label, m))
        return out

    return dedup(found), dedup(glob)


def roots_of_running_frames() -> list:
    """``[(label, module)]``: the modules held by the local variables of the frames now
    running, innermost first (at a compiled graph's call: the frame of the module whose
    code it is, its callers' modules, the user's model). For a graph that Dynamo reuses
    for another model of the same code, whose tensors the index built at compile time
    does not hold."""
    found, seen = [], set()
    f = sys._getframe(1)
    while f is not None:
        for k, v in f.f_locals.items():
            if isinstance(v, torch.nn.Module):
                m = _unwrap(v)
                if id(m) not in seen:
                    seen.add(id(m))
                    found.append((k, m))
        f = f.f_back
    return found


class NameIndex:
    """Tensors and modules under a list of ``(label, root module)``, by identity.

    Build it once per compiled graph, call :meth:`use` with the graph's parameter and
    buffer tensors (it decides whether names need the root's label), then read names with
    :meth:`tensor` and :meth:`module_path`. Roots are held weakly (a compiled graph kept by
    Dynamo must not keep a dropped model alive); a dead root names nothing.

    One compiled graph may serve several modules of the same code (Dynamo reuses a layer's
    graph for the next layer, whose parameters arrive as the same inputs): the index covers
    the whole of every root, so it names each of them.
    """

    def __init__(self, roots: list[tuple[str, torch.nn.Module]], fallback_roots=()):
        self._roots = []
        for tier, (label, root) in [(0, r) for r in roots] + [(1, r) for r in fallback_roots]:
            tensors: dict = {}
            for name, t in root.named_parameters(remove_duplicate=False):
                tensors.setdefault(id(t), []).append(name)
            for name, t in root.named_buffers(remove_duplicate=False):
                tensors.setdefault(id(t), []).append(name)
            modules: dict = {}
            for name, m in root.named_modules(remove_duplicate=False):
                modules.setdefault(id(m), name)
            self._roots.append((tier, label, weakref.ref(root), tensors, modules))
        # The outermost root that holds a tensor names it: a root holding another root
        # holds more modules, so look in the largest first (fallback roots last).
        self._roots.sort(key=lambda r: (r[0], -len(r[4])))
        self._prefix = False

    def _find(self, key_id: int, *, module: bool = False):
        """``(label, root, names)`` of the first root holding the tensor (or module) with
        this ``id``, else ``None``."""
        for _, label, ref, tensors, modules in self._roots:
            hit = (modules if module else tensors).get(key_id)
            if hit is not None:
                root = ref()
                if root is not None:  # else the id may belong to a new object
                    return label, root, hit
        return None

    def use(self, tensors) -> None:
        """Declare the graph's parameter/buffer tensors: when they come from more than one
        unrelated root, names are prefixed with the root's label."""
        used = {id(found[1]) for t in tensors if (found := self._find(id(t))) is not None}
        self._prefix = len(used) > 1

    def _name(self, label: str, name: str) -> str:
        if not self._prefix:
            return name
        return f"{label}.{name}" if name else label

    def tensor(self, t: torch.Tensor) -> TensorName | None:
        """The name of a parameter or buffer, or ``None`` if no root holds it."""
        found = self._find(id(t))
        if found is None:
            return None
        label, root, names = found
        holders = tuple(root.get_submodule(n.rpartition(".")[0]) for n in names)
        return TensorName(self._name(label, names[0]),
                          tuple(self._name(label, n) for n in names[1:]), holders[0], holders)

    def module(self, m: torch.nn.Module) -> str | None:
        """The dotted path of a module (``""`` for a root), or ``None`` if unknown."""
        return self._module_by_id(id(m))

    def _module_by_id(self, key_id: int) -> str | None:
        found = self._find(key_id, module=True)
        return self._name(found[0], found[2]) if found is not None else None

    def module_path(self, dynamo_node: fx.Node, gm: fx.GraphModule | None = None) -> str:
        """The innermost module a Dynamo node was traced in, as a dotted path (``""`` at the
        root or when unknown)."""
        stack = dynamo_node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        key = next(reversed(stack))
        head = key.split("@")[0]
        path = None
        if head.isdigit():  # Dynamo keys inlined modules by id(module)
            path = self._module_by_id(int(head))
        elif gm is not None:  # a module Dynamo installed on the graph module
            sub = getattr(gm, head, None)
            if isinstance(sub, torch.nn.Module):
                path = self.module(sub)
        return path or ""
