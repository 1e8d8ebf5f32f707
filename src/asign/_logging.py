"""The package logger."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("asign")


def _configure() -> None:
    if logger.handlers:
        return
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
    except ImportError:  # pragma: no cover
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    if logger.level == logging.NOTSET:  # keep a level the user set before asign configured its logger
        logger.setLevel(os.environ.get("ASIGN_LOGLEVEL", "INFO").upper())


_configure()
