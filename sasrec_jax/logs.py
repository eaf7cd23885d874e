"""The messages of training, evaluation and export go to the standard `logging` logger "sasrec_jax": an
application configures them like any other library's (levels, handlers, files).

`SASRec(verbose=True)` and the CLI call `console()`, which shows them on stdout when nothing else was set up:
a handler is added only if the logger has none, and it does not propagate, so a root handler configured by
the application does not print every line twice."""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("sasrec_jax")


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted (notebooks and pytest replace it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def console() -> None:
    """Show sasrec_jax's INFO messages on stdout, unless the application has configured the logger itself."""
    if LOGGER.handlers or LOGGER.propagate is False:
        return
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def info(message: str) -> None:
    """The default `log` callable of training, evaluation, export and the demo."""
    LOGGER.info(message)
