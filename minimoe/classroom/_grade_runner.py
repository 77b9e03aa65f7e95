"""Run one exercise's tests against a student's copy (a script: the grader starts it per exercise).

    python _grade_runner.py STUDENT_ROOT EXERCISE_ID RESULT_JSON RULES_FILE TEST_FILE...

It imports ``minimoe`` (and ``minimoe.kernels``, from STUDENT_ROOT/kernels) from the student's
copy, then runs pytest on the teacher's TEST_FILEs, keeping only the tests marked
``@pytest.mark.exercise(EXERCISE_ID)``, and writes [{nodeid, outcome, message}] to RESULT_JSON.
It imports nothing from the teacher's package, so the student's code is what gets tested.
"""

import importlib.util
import json
import pathlib
import sys


def import_student_package(root: pathlib.Path) -> None:
    sys.path.insert(0, str(root))
    import minimoe  # noqa: F401 -- the student's: sys.path[0] precedes any installed finder

    if pathlib.Path(minimoe.__file__).resolve().parent != (root / "minimoe").resolve():
        raise SystemExit(f"imported minimoe from {minimoe.__file__}, not from {root}")
    kernels = root / "kernels" / "__init__.py"
    if kernels.is_file():  # the package-dir mapping of pyproject.toml, done by hand
        spec = importlib.util.spec_from_file_location(
            "minimoe.kernels", kernels, submodule_search_locations=[str(kernels.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["minimoe.kernels"] = module
        spec.loader.exec_module(module)
        minimoe.kernels = module


class SelectExercise:
    """pytest plugin: keep the tests of one exercise; record their outcomes."""

    def __init__(self, exercise_id: str) -> None:
        self.exercise_id = exercise_id
        self.results = []

    def pytest_collection_modifyitems(self, config, items):
        keep = [item for item in items if (marker := item.get_closest_marker("exercise"))
                and marker.args and marker.args[0] == self.exercise_id]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            message = ""
            if report.outcome != "passed":
                crash = getattr(report.longrepr, "reprcrash", None)
                message = crash.message if crash is not None else str(report.longrepr)
            self.results.append({"nodeid": report.nodeid, "when": report.when,
                                 "outcome": report.outcome, "message": message})


def main() -> int:
    root, exercise_id, result_file, rules = sys.argv[1:5]
    tests = sys.argv[5:]
    import_student_package(pathlib.Path(root))
    import pytest

    selector = SelectExercise(exercise_id)
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:nbval",
                        "-o", "addopts=", "-c", rules, "--confcutdir", str(pathlib.Path(tests[0]).parent),
                        "-W", "ignore::pytest.PytestAssertRewriteWarning", *tests],
                       plugins=[selector])
    pathlib.Path(result_file).write_text(json.dumps(selector.results))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
