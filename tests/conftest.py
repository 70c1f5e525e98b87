import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (real models; CI runs them)")
    parser.addoption("--fuzz-profile", default=os.environ.get("TP_FUZZ_PROFILE", "ci"),
                     choices=["ci", "quick", "long"],
                     help="how many random models test_fuzz.py draws (see its docstring)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
