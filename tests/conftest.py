"""Shared test setup: deterministic, small, and one thread per pytest-xdist worker."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the test command runs one worker per core; more threads per worker only oversubscribe
    torch.set_num_threads(1)

from hypothesis import settings  # noqa: E402

settings.register_profile("minimoe", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("minimoe")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
