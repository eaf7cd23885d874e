"""The messages of training, evaluation and export go to the standard `logging` logger "sasrec_jax": an
application configures them like any other library's (levels, handlers, files).

`SASRec(verbose=True)` and the CLI call `console()`, which shows them on stdout when nothing else was set up:
a handler is added only if the logger has none, and it does not propagate, so a root handler configured by
the application does not print every line twice."""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext

LOGGER = logging.getLogger("sasrec_jax")


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted (notebooks and pytest replace it), above the
    progress bars: the bars are cleared, the line written and flushed, and the bars drawn again below it."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property ignores it
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            with _bars_cleared():
                # flushed before the bars are redrawn: a piped stdout is block-buffered, and the line would
                # otherwise come out after the bars (on stderr) that it should sit above
                self.stream.write(message + self.terminator)
                self.flush()
        except Exception:
            self.handleError(record)


def _bars_cleared():
    """tqdm's context that clears its bars and redraws them on exit (nothing when tqdm is not installed)."""
    try:
        from tqdm import tqdm
    except ImportError:  # the serving-only install has no tqdm, and no bars
        return nullcontext()
    return tqdm.external_write_mode(file=sys.stdout)


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
