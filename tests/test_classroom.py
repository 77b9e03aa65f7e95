"""The classroom: markers, the student edition and the grader, end to end.

* every exercise of the registry has a solution region and graded tests;
* generating the student edition twice gives byte-identical files, without the teacher's
  tests and without any solution;
* the student edition imports (every module, kernels included) from its own folder;
* the grader gives the reference full marks and a fresh student edition zero, each
  exercise failing on its own stub ("Exercise N: ...");
* in the student edition, a quick subset of the rest of the suite passes -- the router and
  balance tests and the routing notebook, where most exercises live --
  with what needs an unsolved exercise reported as skipped ("needs Exercise N") and notebook
  cells saying what they wait for. (The full student-edition suite takes as long as the
  reference's; the subset covers the mechanisms in about a minute.)
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from minimoe.classroom.environment import student_environment
from minimoe.classroom.exercises import BY_ID, EXERCISES, stub_message
from minimoe.classroom.grade import REFERENCE_ROOT, grade
from minimoe.classroom.student import (BEGIN, PRIVATE_TESTS, MarkerError, solution_regions,
                                       stub_source)

ROOT = pathlib.Path(__file__).resolve().parent.parent
STUDENT_SUBSET = ["tests/test_router.py", "tests/test_balance.py",
                  "notebooks/02_routing_and_balance.ipynb"]


def generate(out: pathlib.Path) -> None:
    subprocess.run([sys.executable, "-m", "minimoe.classroom", "student", str(out)], check=True,
                   capture_output=True, cwd=ROOT)


def files_of(folder: pathlib.Path) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def student_edition(tmp_path_factory):
    out = tmp_path_factory.mktemp("classroom") / "student"
    generate(out)
    return out


def test_registry_and_markers_agree():
    assert [e.number for e in EXERCISES] == list(range(1, len(EXERCISES) + 1))
    assert len(BY_ID) == len(EXERCISES) >= 12
    regions = solution_regions(ROOT)
    assert all(regions[e.id] for e in EXERCISES), regions
    tests = "".join(p.read_text() for folder in ("tests/exercises", PRIVATE_TESTS)
                    for p in (ROOT / folder).glob("test_*.py"))
    for exercise in EXERCISES:
        assert exercise.hint and exercise.title and exercise.points > 0
        assert f'exercise("{exercise.id}"' in tests, f"no graded test for {exercise.id}"


def test_stub_source_replaces_regions_and_rejects_bad_markers():
    text = ("def f(x):\n    y = 1\n    # BEGIN SOLUTION yarn\n    y = x * 2\n    return y\n"
            "    # END SOLUTION\n\n\nclass A:\n    def g(self):\n        # BEGIN SOLUTION yarn\n"
            "        pass\n        # END SOLUTION\n")
    stubbed = stub_source(text, "example.py")
    message = stub_message(BY_ID["yarn"])
    assert stubbed.count(f"raise NotImplementedError({message!r})") == 2
    assert "y = x * 2" not in stubbed and "SOLUTION" not in stubbed
    assert f"        raise NotImplementedError({message!r})" in stubbed  # indentation kept
    compile(stubbed, "example.py", "exec")
    for bad, complaint in [("# BEGIN SOLUTION yarn\nx = 1\n", "never closed"),
                           ("x = 1\n# END SOLUTION\n", "without a BEGIN"),
                           ("# BEGIN SOLUTION no-such-id\n# END SOLUTION\n", "unknown exercise id"),
                           ("# BEGIN SOLUTION yarn\n# BEGIN SOLUTION yarn\n", "inside the region")]:
        with pytest.raises(MarkerError, match=complaint):
            stub_source(bad, "bad.py")


def test_generation_is_deterministic_and_hides_solutions(student_edition, tmp_path):
    again = tmp_path / "again"
    generate(again)
    first, second = files_of(student_edition), files_of(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    assert not any(name.startswith(PRIVATE_TESTS) for name in first)
    assert any(name.startswith("tests/exercises/") for name in first)
    texts = {name: data.decode() for name, data in first.items() if name.endswith((".py", ".ipynb"))}
    assert not any(BEGIN.match(line) for text in texts.values() for line in text.splitlines())
    for exercise in EXERCISES:
        assert any(f"Exercise {exercise.number}: {exercise.title}." in t for t in texts.values())
    # a line only the solution has is gone (and the reference's own copy still has it)
    line = "queue = ranked_experts.t().reshape(-1)"
    assert line in (ROOT / "minimoe/balance.py").read_text() and line not in texts["minimoe/balance.py"]
    with pytest.raises(subprocess.CalledProcessError):  # a folder holding other files is refused
        generate(tmp_path)


def test_student_edition_imports_from_its_own_folder(student_edition, tmp_path):
    script = ("import importlib, pkgutil, minimoe, minimoe.kernels\n"
              "names = [m.name for m in pkgutil.walk_packages(minimoe.__path__, 'minimoe.')\n"
              "         if not m.name.endswith('__main__')]\n"
              "names += [m.name for m in pkgutil.iter_modules(minimoe.kernels.__path__, 'minimoe.kernels.')]\n"
              "files = {importlib.import_module(n).__file__ for n in sorted(set(names))}\n"
              "print(len(files), sorted({f.split('/minimoe/')[0].split('/kernels/')[0] for f in files}))")
    env = dict(student_environment(student_edition, tmp_path), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert int(out[0]) > 40
    assert out[1].strip() == repr([str(student_edition.resolve())])


def test_reference_scores_full_marks():
    records = grade(REFERENCE_ROOT)
    failed = {r["id"]: r["message"] for r in records if not r["passed"]}
    assert failed == {}
    assert sum(r["earned"] for r in records) == sum(e.points for e in EXERCISES)


def test_student_edition_scores_zero_on_its_stubs(student_edition):
    records = grade(student_edition)
    assert [r["earned"] for r in records] == [0] * len(EXERCISES)
    for record in records:  # each fails on its own stub, not on something else
        assert f"Exercise {record['number']}: " in record["message"], record


def test_an_exercise_that_hangs_is_stopped_by_its_time_limit(student_edition, tmp_path):
    copy = tmp_path / "hangs"
    for name, data in files_of(student_edition).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    rope = copy / "minimoe/rope.py"
    stub = f"raise NotImplementedError({stub_message(BY_ID['yarn'])!r})"
    rope.write_text(rope.read_text().replace(stub, "while True:\n            pass"))
    [record] = grade(copy, timeout=4, only=["yarn"])
    assert not record["passed"] and "time limit" in record["message"], record


def test_student_edition_passes_the_rest_of_a_quick_subset(student_edition, tmp_path):
    env = student_environment(student_edition, tmp_path)
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-q", "-rs", "-p", "no:randomly",
                          *STUDENT_SUBSET], cwd=student_edition, env=env, capture_output=True,
                         text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-3000:]
    assert re.search(r"\d+ passed", summary) and re.search(r"\d+ skipped", summary), summary
    assert "needs Exercise" in run.stdout  # the skips name the exercise they wait for
    assert "failed" not in summary
