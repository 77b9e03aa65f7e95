"""pytest plugin of the student edition: a test stopped by an unsolved exercise is skipped.

The student edition's pyproject.toml loads it (``-p minimoe.classroom.pytest_plugin``). A test
that fails because it reached a stub -- ``NotImplementedError: Exercise N: ...`` anywhere in
its failure report, also wrapped (Triton's interpreter), from a subprocess or a notebook cell -- is reported as skipped with
the reason "needs Exercise N", so the rest of the suite stays green while exercises are open.
Tests marked ``@pytest.mark.exercise`` are never converted: they are the ones that must fail
until the exercise is solved. In the reference no stub exists, so nothing is ever converted.
"""

from __future__ import annotations

import re

import pytest

# "NotImplementedError: Exercise 3: ..." or, wrapped (Triton's interpreter), "NotImplementedError('Exercise 3: ..."
UNSOLVED = re.compile(r"NotImplementedError(?:: |\(['\"])(Exercise (\d+): [^.\n]*)")


def unsolved_exercise(report_text: str):
    """'Exercise N: title' of the first unsolved exercise named in a failure report, or None."""
    match = UNSOLVED.search(report_text)
    return match.group(1) if match else None


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(id, points=None): a graded exercise test")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or item.get_closest_marker("exercise") is not None:
        return
    needed = unsolved_exercise(str(report.longrepr))
    if needed is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"needs {needed}")
