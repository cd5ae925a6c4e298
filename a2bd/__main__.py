"""`python -m a2bd ...` runs the `a2bd` command."""

from a2bd.cli import main

raise SystemExit(main())
