"""Supported versions of torch and transformers, checked when tp_backend is imported.

Owns: comparing the installed torch and transformers with the ranges this package declares
in ``pyproject.toml`` (read back from the installed distribution's metadata, so the range
is written in one place). Must not: import transformers (importing tp_backend stays
cheap; only its metadata is read).

The backend relies on how Dynamo hands graphs to a backend and on Inductor's entry points,
which change between torch minor releases, hence torch's ceiling. transformers has a floor
(the oldest release CI tests) and no ceiling: CI also tests the newest release.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

__all__ = ["check_versions", "supported_versions"]

_CHECKED = ("torch", "transformers")


def supported_versions() -> dict[str, str]:
    """``{"torch": ">=2.13,<2.14", "transformers": ">=5.0"}``: the ranges the installed
    tp_backend declares (empty when running from a source tree that is not installed)."""
    try:
        requires = metadata.requires("tp_backend") or []
    except metadata.PackageNotFoundError:
        return {}
    out = {}
    for line in requires:
        req = Requirement(line)
        if req.name in _CHECKED and req.marker is None:
            out[req.name] = str(req.specifier)
    return out


def check_versions() -> None:
    """Raise ``ImportError`` naming the package, the installed version and the supported
    range when torch or transformers is outside what tp_backend declares."""
    from packaging.specifiers import SpecifierSet

    for name, spec in supported_versions().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pip installs both; a missing one fails at its own import
        try:
            ok = SpecifierSet(spec).contains(Version(installed), prereleases=True)
        except InvalidVersion:
            continue
        if not ok:
            raise ImportError(
                f"tp_backend supports {name}{spec}, but {name} {installed} is installed. "
                f"Install a supported version: pip install '{name}{spec}'")
