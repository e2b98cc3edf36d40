"""One module per qimg command, each with ``add_parser`` and ``run``."""
