"""`python -m minimoe ...` is the same as the `minimoe` command."""

from minimoe.cli import main

raise SystemExit(main())
