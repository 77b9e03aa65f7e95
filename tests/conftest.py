"""Shared test setup: deterministic, small, and one thread per pytest-xdist worker."""

import os

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

settings.register_profile("minimoe", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("minimoe")


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
