import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (real models; CI runs them)")
    parser.addoption("--run-long", action="store_true", default=False,
                     help="also run tests marked long (more ranks than cores on a real model, "
                          "repeats of what a slow test checks at another size; CI does not)")
    parser.addoption("--downstream", default="eager", choices=["eager", "inductor"],
                     help="downstream compiler of the tp_auto graphs of tests that name none: "
                          "'eager' (default: tests marked inductor still use Inductor, the "
                          "library's default) or 'inductor' (every test)")
    parser.addoption("--fuzz-profile", default=os.environ.get("TP_FUZZ_PROFILE", "ci"),
                     choices=["ci", "quick", "long"],
                     help="how many random models test_fuzz.py draws (see its docstring)")


def pytest_collection_modifyitems(config, items):
    skips = {"slow": (config.getoption("--run-slow"), "slow: pass --run-slow (CI does)"),
             "long": (config.getoption("--run-long"), "long: pass --run-long (CI does not)")}
    for item in items:
        for marker, (run, reason) in skips.items():
            if marker in item.keywords and not run:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _downstream_compiler(request):
    """Run the test's tp_auto graphs eagerly unless it is marked ``inductor`` (it checks the
    downstream compile or what Inductor does with the rewritten graph) or pytest runs with
    ``--downstream inductor`` (see ``dist_utils.DEFAULT_COMPILER``)."""
    import dist_utils

    keep = (request.node.get_closest_marker("inductor") is not None
            or request.config.getoption("--downstream") == "inductor")
    dist_utils.DEFAULT_COMPILER = None if keep else "eager"
    yield
    dist_utils.DEFAULT_COMPILER = None
