"""python -m minimoe.classroom student OUT/ | grade PATH [--json FILE] [--timeout S] [--isolate] | list."""

from __future__ import annotations

import argparse
import pathlib
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimoe.classroom",
                                     description="Student edition and autograder of minimoe's exercises.")
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("student", help="write the student edition into OUT")
    student.add_argument("out", type=pathlib.Path, help="a new (or empty) folder outside the repository")
    grade = commands.add_parser("grade", help="grade a student's copy of the repository")
    grade.add_argument("path", type=pathlib.Path, help="root of the student's copy (holds minimoe/)")
    grade.add_argument("--json", type=pathlib.Path, help="also write one record per exercise here")
    grade.add_argument("--timeout", type=float, default=120.0,
                       help="seconds one exercise's tests may take (default 120)")
    grade.add_argument("--isolate", action="store_true",
                       help="one process per exercise (slower; a crash then costs one exercise only)")
    grade.add_argument("--jobs", type=int, default=1, help="with --isolate: processes at once (default 1)")
    grade.add_argument("--only", nargs="+", metavar="ID", help="grade these exercise ids only")
    commands.add_parser("list", help="list the exercises and where their solutions are")
    args = parser.parse_args(argv)

    if args.command == "student":
        from minimoe.classroom.grade import REFERENCE_ROOT
        from minimoe.classroom.student import write_student_edition

        summary = write_student_edition(REFERENCE_ROOT, args.out)
        print(f"student edition in {args.out}: {summary['files']} files, {summary['exercises']} "
              f"exercises in {summary['regions']} regions (see {args.out / 'EXERCISES.md'})")
        return 0
    if args.command == "list":
        from minimoe.classroom.exercises import EXERCISES
        from minimoe.classroom.grade import REFERENCE_ROOT
        from minimoe.classroom.student import solution_regions

        regions = solution_regions(REFERENCE_ROOT)
        for exercise in EXERCISES:
            print(f"{exercise.number:>2}  {exercise.id:<24} {exercise.points} pt  "
                  f"{', '.join(regions[exercise.id])}")
        return 0
    from minimoe.classroom.exercises import BY_ID
    from minimoe.classroom.grade import format_table, grade as run_grade, write_json

    unknown = [i for i in args.only or [] if i not in BY_ID]
    if unknown:
        parser.error(f"--only: unknown exercise id(s) {', '.join(unknown)}; known: {', '.join(BY_ID)}")
    if args.json is not None and args.json.is_dir():
        parser.error(f"--json {args.json} is a folder; give a file name")
    records = run_grade(args.path, timeout=args.timeout, isolate=args.isolate, jobs=args.jobs,
                        only=args.only)
    print(format_table(records))
    if args.json is not None:
        write_json(records, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
