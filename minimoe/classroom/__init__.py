"""The classroom: exercises single-sourced from the reference, a student edition, a grader.

The solutions ARE the reference package. Each exercise is a region of existing code between
two marker lines (the convention of nbgrader and otter-grader): a line ``# BEGIN SOLUTION
aux-loss-free-bias`` before the reference code a student writes, a line ``# END SOLUTION``
after it. The id after ``BEGIN SOLUTION`` names an entry of ``minimoe.classroom.exercises.EXERCISES``
(number, title, points, hint). One exercise may have several regions (in several files).

* ``python -m minimoe.classroom student OUT/`` writes the student edition: the repository's
  files with every region replaced by ``raise NotImplementedError("Exercise N: title. Hint:
  ...")`` (``minimoe.classroom.student``). The teacher-only tests in ``tests/classroom_private/``
  are left out.
* ``python -m minimoe.classroom grade PATH [--json FILE]`` runs the exercise tests (pytest
  tests marked ``@pytest.mark.exercise("id")`` in ``tests/exercises/`` and
  ``tests/classroom_private/``) against the code in PATH, one subprocess per exercise with a
  time limit, and prints a score table (``minimoe.classroom.grade``).
* In the student edition, ``minimoe.classroom.pytest_plugin`` reports a test that stops at
  an unsolved exercise as skipped ("needs Exercise N"), and ``minimoe.classroom.notebook``
  (an IPython extension) makes a notebook cell say which exercise it waits for instead of
  failing.
"""
