"""`python -m qseg` is the `qseg` command."""

from qseg.cli import main

raise SystemExit(main())
