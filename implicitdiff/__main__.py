"""`python -m implicitdiff`: the `implicitdiff` command (see `implicitdiff --help`)."""

from .cli import main

raise SystemExit(main())
