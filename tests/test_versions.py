"""The supported versions: pyproject.toml's ranges are what the installed package checks
at import, and an unsupported torch or transformers is named with the range to install."""

from importlib import metadata
from unittest import mock

import pytest

from tp_backend import versions


def test_declared_ranges_are_checked():
    """The installed metadata declares a floor for transformers and torch's minor series,
    and the versions running the tests satisfy them (no error)."""
    ranges = versions.supported_versions()
    assert ranges["transformers"].startswith(">="), ranges
    assert "<2.14" in ranges["torch"] and ">=2.13" in ranges["torch"], ranges
    versions.check_versions()


@pytest.mark.parametrize("name,bad", [("transformers", "4.57.1"), ("torch", "2.14.0")])
def test_unsupported_version_is_named(name, bad):
    """A version outside the range raises ImportError naming the package, the installed
    version and the range to install."""
    real = metadata.version
    with mock.patch.object(metadata, "version", lambda n: bad if n == name else real(n)):
        with pytest.raises(ImportError, match=rf"{name} {bad} is installed.*pip install"):
            versions.check_versions()
