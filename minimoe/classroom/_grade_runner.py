"""Run exercise tests against a student's copy (a script: the grader starts it).

    python _grade_runner.py STUDENT_ROOT IDS RESULT_JSON RULES_FILE SECONDS TEST_FILE...

IDS: exercise ids separated by commas. It imports ``minimoe`` (and ``minimoe.kernels``, from
STUDENT_ROOT/kernels) from the student's copy, then runs pytest on the teacher's TEST_FILEs,
keeping the tests marked ``@pytest.mark.exercise(id)`` for those ids, and writes
[{exercise, nodeid, when, outcome, message}] to RESULT_JSON. Each exercise may spend SECONDS
in all its tests: a SIGALRM timer interrupts the test that overruns, and the exercise's later
tests fail at once. It imports nothing from the teacher's package, so the student's code is
what gets tested.
"""

import importlib.util
import json
import pathlib
import signal
import sys
import time


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


class ExerciseTimeLimit(Exception):
    """This exercise's tests used up their time."""


class SelectExercises:
    """pytest plugin: keep the tests of some exercises; time them; record their outcomes."""

    def __init__(self, exercise_ids: list, seconds: float) -> None:
        self.exercise_ids = exercise_ids
        self.left = {exercise_id: seconds for exercise_id in exercise_ids}
        self.seconds = seconds
        self.results = []
        self.started = None

    @staticmethod
    def exercise_of(item):
        marker = item.get_closest_marker("exercise")
        return marker.args[0] if marker is not None and marker.args else None

    def pytest_collection_modifyitems(self, config, items):
        keep = [item for item in items if self.exercise_of(item) in self.left]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep

    def _alarm(self, signum, frame):
        raise ExerciseTimeLimit(f"time limit: the exercise's tests ran past {self.seconds:.0f} s")

    def pytest_runtest_setup(self, item):
        left = self.left[self.exercise_of(item)]
        if left <= 0:
            raise ExerciseTimeLimit(f"time limit: the exercise's tests ran past {self.seconds:.0f} s")
        signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, left)
        self.started = time.monotonic()

    def pytest_runtest_teardown(self, item, nextitem):
        signal.setitimer(signal.ITIMER_REAL, 0)
        if self.started is not None:
            self.left[self.exercise_of(item)] -= time.monotonic() - self.started
            self.started = None

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            message = ""
            if report.outcome != "passed":
                crash = getattr(report.longrepr, "reprcrash", None)
                message = crash.message if crash is not None else str(report.longrepr)
            exercise = next((value for key, value in report.user_properties if key == "exercise"), None)
            self.results.append({"exercise": exercise, "nodeid": report.nodeid, "when": report.when,
                                 "outcome": report.outcome, "message": message})

    def pytest_runtest_makereport(self, item, call):
        if not any(key == "exercise" for key, _ in item.user_properties):
            item.user_properties.append(("exercise", self.exercise_of(item)))


def main() -> int:
    root, ids, result_file, rules, seconds = sys.argv[1:6]
    tests = sys.argv[6:]
    import_student_package(pathlib.Path(root))
    import pytest

    selector = SelectExercises(ids.split(","), float(seconds))
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:nbval",
                        "-o", "addopts=", "-c", rules, "--confcutdir", str(pathlib.Path(tests[0]).parent),
                        "-W", "ignore::pytest.PytestAssertRewriteWarning", *tests],
                       plugins=[selector])
    pathlib.Path(result_file).write_text(json.dumps(selector.results))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
