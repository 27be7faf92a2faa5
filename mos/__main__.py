"""`python -m mos ...` is the `mos` command (see mos.cli)."""
from mos.cli import main

raise SystemExit(main())
