"""``python -m qimg``."""

from qimg.cli import main

raise SystemExit(main())
