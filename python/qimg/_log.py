"""Diagnostics: what qimg opened and which way it went, for ``-v`` and ``QIMG_LOG``.

Messages go to the ``qimg`` logger of the :mod:`logging` module, but that module
is only imported when someone asked for them: the command line imports it for
``-v`` or ``QIMG_LOG`` (see :func:`configure`), a program using qimg's API when it
sets up logging itself. Until then every call here is a dictionary lookup, so a
plain command line starts without paying for ``logging``.
"""

from __future__ import annotations

import sys

# typing.TYPE_CHECKING without importing typing (mypy and ruff know the name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging

    from qimg.image import Image

__all__ = ["LEVELS", "configure", "debug", "driver_of", "info", "level_from_env", "opened"]

# Level names QIMG_LOG accepts, with the logging module's numbers for them.
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _emit(level: int, message: str, args: tuple[object, ...]) -> None:
    logging = sys.modules.get("logging")
    if logging is None:
        return
    logger = logging.getLogger("qimg")
    if logger.isEnabledFor(level):
        logger.log(level, message, *args)


def debug(message: str, *args: object) -> None:
    """A detail (``-vv``, ``QIMG_LOG=debug``); ``%`` arguments are formatted only if shown."""
    _emit(10, message, args)


def info(message: str, *args: object) -> None:
    """What was opened and which way the work went (``-v``, ``QIMG_LOG=info``)."""
    _emit(20, message, args)


def driver_of(image: Image) -> str:
    """How ``image`` was opened, for a log line: a plain file, or the root of a node tree."""
    spec = image.spec
    if spec is None or spec.is_plain:
        return "driver file"
    kind = type(spec.root).__name__.removesuffix("Node").lower()
    return f"node tree with a {kind} root"


def opened(role: str, name: object, image: Image) -> None:
    """Logs that ``image`` (given as ``name``) is open, in the ``role`` it plays."""
    if "logging" in sys.modules:
        info(
            "opened %s %s: format %s, %s, %d bytes%s",
            role,
            name,
            image.format,
            driver_of(image),
            image.size,
            ", read-write" if image.writable else "",
        )


def level_from_env(value: str) -> int | None:
    """The level a ``QIMG_LOG`` value names (None: not a level name)."""
    return LEVELS.get(value.strip().lower())


def _lowercase_level(record: logging.LogRecord) -> bool:
    """Gives a record its level name in lower case, as qimg's lines show it."""
    setattr(record, "qimg_level", record.levelname.lower())  # noqa: B010 - not a LogRecord field
    return True


def configure(level: int) -> None:
    """Sends the ``qimg`` logger's messages from ``level`` up to standard error, one
    ``qimg: LEVEL: message`` line each."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_lowercase_level)
    handler.setFormatter(logging.Formatter("qimg: %(qimg_level)s: %(message)s"))
    logger = logging.getLogger("qimg")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
