"""The autograder: the teacher's exercise tests against a student's copy, one subprocess each.

``grade(student_root)`` runs, for every exercise of the registry, the tests marked
``@pytest.mark.exercise(id)`` in the teacher's ``tests/exercises/`` and
``tests/classroom_private/`` (the student's own copies of tests are never used) with
``_grade_runner.py`` in a fresh Python process that imports the student's ``minimoe``: one
process for all exercises, each exercise with its own time limit; an exercise whose result
that process could not deliver runs again in a process of its own (``isolate=True``: every
exercise alone). An exercise earns its points when all its tests pass (at least one must run). ``format_table`` prints the score table; ``write_json`` the LMS records
(id, title, points, earned, passed, message).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from minimoe.classroom.exercises import EXERCISES, Exercise
from minimoe.classroom.student import PRIVATE_TESTS

REFERENCE_ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNER = pathlib.Path(__file__).with_name("_grade_runner.py")


def test_files(reference_root: pathlib.Path = REFERENCE_ROOT) -> list[pathlib.Path]:
    """The teacher's exercise test files: tests/exercises/ then tests/classroom_private/."""
    files = []
    for folder in ("tests/exercises", PRIVATE_TESTS):
        files += sorted((reference_root / folder).glob("test_*.py"))
    if not files:
        raise FileNotFoundError(f"no exercise tests under {reference_root}/tests/exercises: "
                                f"grade from a checkout of the reference")
    return files


def _run_tests(exercises: list, student_root: pathlib.Path, files: list, timeout: float):
    """{exercise id: [test results]} from one runner process, or None if it died or hung."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as scratch:
        result_file = pathlib.Path(scratch) / "result.json"
        command = [sys.executable, str(RUNNER), str(student_root), ",".join(e.id for e in exercises),
                   str(result_file), str(REFERENCE_ROOT / "pyproject.toml"), str(timeout),
                   *map(str, files)]
        try:  # the runner limits each exercise; this outer limit catches a hang in C code
            subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True,
                           timeout=timeout * len(exercises) + 60)
        except subprocess.TimeoutExpired:
            return None
        if not result_file.is_file():
            return None
        results = json.loads(result_file.read_text())
    by_exercise = {e.id: [] for e in exercises}
    for result in results:
        by_exercise.setdefault(result["exercise"], []).append(result)
    return by_exercise


def score(exercise: Exercise, results) -> dict:
    """The record of one exercise: all its tests must pass, and at least one must run."""
    record = {"id": exercise.id, "number": exercise.number, "title": exercise.title,
              "points": exercise.points, "earned": 0, "passed": False, "message": ""}
    if results is None:
        record["message"] = "the tests did not finish (crash or time limit)"
        return record
    failures = [r for r in results if r["outcome"] != "passed"]
    ran = [r for r in results if r["when"] == "call"]
    if not ran and not failures:
        record["message"] = "no test of this exercise ran"
    elif failures:
        first = failures[0]
        reason = first["message"].splitlines()[0] if first["message"] else first["outcome"]
        record["message"] = (f"{reason} ({len(failures)} of {max(len(ran), len(failures))} tests "
                             f"failed; first: {first['nodeid'].split('::')[-1]})")
    else:
        record.update(passed=True, earned=exercise.points, message=f"{len(ran)} tests passed")
    return record


def _files_for(exercises: list, files: list) -> list:
    """The test files that mention these exercises (collecting the others costs time only)."""
    mine = [f for f in files if any(f'exercise("{e.id}"' in f.read_text(encoding="utf-8")
                                    for e in exercises)]
    return mine or files[:1]


def grade(student_root, timeout: float = 120.0, isolate: bool = False, jobs: int = 1,
          only=None) -> list[dict]:
    """One record per exercise (registry order) for the copy of minimoe at ``student_root``.

    All exercises run in one process (each with ``timeout`` seconds for its tests); an
    exercise whose result that process could not deliver (a crash, a hang in C code) is run
    again alone. ``isolate``: one process per exercise from the start (``jobs`` at a time).
    """
    student_root = pathlib.Path(student_root).resolve()
    if not (student_root / "minimoe" / "__init__.py").is_file():
        raise FileNotFoundError(f"{student_root} holds no minimoe/__init__.py: pass the root of a "
                                f"student's copy of the repository")
    files = test_files()
    chosen = [e for e in EXERCISES if only is None or e.id in only]
    results = {} if isolate else (_run_tests(chosen, student_root, _files_for(chosen, files), timeout) or {})
    again = [e for e in chosen if not results.get(e.id)]

    def alone(exercise: Exercise):
        found = _run_tests([exercise], student_root, _files_for([exercise], files), timeout)
        return exercise.id, None if found is None else found.get(exercise.id)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results.update(pool.map(alone, again))
    return [score(e, results.get(e.id)) for e in chosen]


def format_table(records: list[dict], width: int = 70) -> str:
    rows = [("#", "exercise", "points", "passed", "message")]
    for r in records:
        message = r["message"] if len(r["message"]) <= width else r["message"][:width - 3] + "..."
        rows.append((str(r["number"]), r["id"], f"{r['earned']}/{r['points']}",
                     "yes" if r["passed"] else "no", message))
    earned, total = sum(r["earned"] for r in records), sum(r["points"] for r in records)
    rows.append(("", "total", f"{earned}/{total}", f"{sum(r['passed'] for r in records)}/{len(records)}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
             for row in rows]
    lines.insert(1, "-" * (sum(widths) + 8 + min(width, max(len(r[4]) for r in rows))))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(line.rstrip() for line in lines)


def write_json(records: list[dict], path) -> None:
    keys = ("id", "title", "points", "earned", "passed", "message")
    pathlib.Path(path).write_text(json.dumps([{k: r[k] for k in keys} for r in records], indent=1) + "\n")
