"""`python -m implicitdiff`: the `implicitdiff` command (see `implicitdiff --help`)."""

from ._cli import main

raise SystemExit(main())
