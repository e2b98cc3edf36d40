"""``python -m qimg``."""

from qimg.cli import entry

entry()
