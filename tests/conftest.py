"""Shared test setup: deterministic, small, and one thread per pytest-xdist worker."""

import os
import random

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The test command runs one worker per core. More threads per worker (or per notebook
    # kernel, which inherits this environment) only oversubscribe the cores, and OpenMP's
    # spin-waiting then slows torch down by orders of magnitude.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from hypothesis import settings  # noqa: E402

# Property tests draw new examples on every run (no derandomize): each run explores configs
# the earlier ones did not. A failure reproduces three ways: the session's seed is printed in
# the header (rerun with --hypothesis-seed=N), the failing example is printed with a
# @reproduce_failure(...) line (print_blob), and Hypothesis's local example database
# (.hypothesis/) replays it first on the next run.
settings.register_profile("minimoe", deadline=None, max_examples=25, print_blob=True)
settings.load_profile("minimoe")


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's own plugin reads --hypothesis-seed
def pytest_configure(config):
    """One random Hypothesis seed per test session unless --hypothesis-seed gives one. The
    xdist workers start after this hook with the controller's environment: the variable
    hands them the same seed."""
    seed = config.getoption("hypothesis_seed", None) or os.environ.get("MINIMOE_HYPOTHESIS_SEED")
    if seed is None:
        seed = str(random.SystemRandom().randrange(2**32))
    os.environ["MINIMOE_HYPOTHESIS_SEED"] = config.option.hypothesis_seed = str(seed)


def pytest_report_header(config):
    seed = config.getoption("hypothesis_seed", None)
    return f"hypothesis seed {seed} (reproduce with: pytest --hypothesis-seed={seed})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kernels_used(monkeypatch):
    """The names of the kernel modules the kernel switch handed out during the test."""
    from minimoe import kernel_switch

    used = []
    original = kernel_switch._kernel

    def spy(x, module_name, function_name):
        kernel = original(x, module_name, function_name)
        if kernel is not None:
            used.append(module_name)
        return kernel

    monkeypatch.setattr(kernel_switch, "_kernel", spy)
    return used
