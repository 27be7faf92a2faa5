"""`python -m mos ...` is the `mos` command (see mos.lab.cli)."""
from mos.lab.cli import main

raise SystemExit(main())
