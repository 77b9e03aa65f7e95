"""pytest plugin of the student edition: a test stopped by an unsolved exercise is skipped.

The student edition's pyproject.toml loads it (``-p minimoe.classroom.pytest_plugin``). A test
that fails because it reached a stub -- the stub's message ``Exercise N: title. Hint: ...``
anywhere in its failure report or captured output, also wrapped (Triton's interpreter), from
a subprocess, a command-line error or a notebook cell -- is reported as skipped with
the reason "needs Exercise N", so the rest of the suite stays green while exercises are open.
Tests marked ``@pytest.mark.exercise`` are never converted: they are the ones that must fail
until the exercise is solved. In the reference no stub exists, so nothing is ever converted.
"""

from __future__ import annotations

import re

import pytest

# the stub's message "Exercise N: title. Hint: ...", however it was passed on (a traceback,
# Triton's interpreter wrapping it, a command-line error line, a table a script printed)
UNSOLVED = re.compile(r"(Exercise (\d+): [^\n]*?)\. Hint: ")


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
    printed = "\n".join(content for _, content in report.sections)  # captured output
    needed = unsolved_exercise(f"{report.longrepr}\n{printed}")
    if needed is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"needs {needed}")
