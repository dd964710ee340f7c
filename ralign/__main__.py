"""`python -m ralign` is the `ralign` command (also what `accelerate launch -m ralign` runs)."""

from ralign.cli import main

raise SystemExit(main())
