"""What the ``jaxprompt`` command shows: one logging system, progress with rate and ETA.

Everything jaxprompt says goes through the standard library's ``logging`` under the
``jaxprompt`` logger (the library modules log to ``jaxprompt.<module>``). :func:`setup` sends it
to stderr and keeps third-party libraries (orbax, tensorstore, absl, jax, transformers, the hub
client, grain) at WARNING, so a run shows its own progress and results, not theirs.

:class:`Progress` reports a long loop: a bar redrawn in place on a terminal, plain lines at
intervals in a log file or CI, both with the rate and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

THIRD_PARTY = (
    "absl",
    "orbax",
    "tensorstore",
    "jax",
    "etils",
    "transformers",
    "huggingface_hub",
    "grain",
    "tensorflow",
    "tensorflow_datasets",
    "urllib3",
    "filelock",
    "matplotlib",
    "PIL",
)

log = logging.getLogger("jaxprompt")


def setup(verbosity: int = 0, stream: TextIO | None = None) -> None:
    """Logs jaxprompt's messages to ``stream`` (stderr) and quiets third-party libraries.

    Args:
      verbosity: -1 warnings only; 0 jaxprompt's progress and results (default); 1 jaxprompt's
        debug messages and third-party INFO.
      stream: where to write (default ``sys.stderr``).
    """
    ours = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    theirs = logging.INFO if verbosity >= 1 else logging.WARNING
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(theirs)
    log.setLevel(ours)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(theirs)
    _route_warnings()
    try:  # absl keeps its own verbosity beside the logger level
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbosity >= 1 else absl_logging.WARNING)
        absl_logging.get_absl_handler().setLevel(theirs)
    except ImportError:
        pass


def _route_warnings() -> None:
    """jaxprompt's own warnings (e.g. a checkpoint that could not be read) become one log line
    each; Python's default shows them as two lines with a source line. Other libraries'
    warnings are shown as before. Also drops one harmless notice (see below)."""
    import warnings

    if getattr(warnings.showwarning, "_jaxprompt", False):
        return
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] == "jaxprompt":
            log.warning("warning: %s", message)
        else:
            shown(message, category, filename, lineno, file, line)

    showwarning._jaxprompt = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning

    # An orbax read that fails (an unreadable checkpoint, which the reader then skips) leaves
    # tensorstore reads in flight; their completion callbacks find orbax's event loop closed
    # and print "RuntimeError: Event loop is closed" tracebacks, from no object, after the
    # fallback has already been reported. Only that one is dropped.
    unraisable = sys.unraisablehook

    def hook(u):
        if not (
            u.object is None
            and u.exc_type is RuntimeError
            and str(u.exc_value) == "Event loop is closed"
        ):
            unraisable(u)

    sys.unraisablehook = hook
    # The same failed reads, when their task is collected before anyone awaited it, reach
    # asyncio's "Task exception was never retrieved" log record with the read's traceback (seen
    # when every checkpoint is unreadable: the one-line error came after it). Only records whose
    # exception is such a tensorstore read error are dropped.
    logging.getLogger("asyncio").addFilter(_unretrieved_read_error)


def _unretrieved_read_error(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's never-retrieved task records of a failed checkpoint read."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (
        record.getMessage().startswith("Task exception was never retrieved")
        and exc is not None
        and "Error reading" in str(exc)
    )


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of a loop of ``total`` units: a bar on a terminal, plain lines in logs.

    Example::

        bar = Progress(n_images, "eval base", unit="images")
        for b in batches:
            correct += evaluate(b)
            bar.update(len(b["label"]), note=f"top-1 {100 * correct / bar.done:.1f}%")
        bar.close()

    Args:
      total: the number of units the loop will do (``None`` if unknown).
      desc: what the loop does.
      unit: the unit counted (shown with the rate).
      every: seconds between plain log lines when not on a terminal.
      stream: the terminal to draw on (default stderr); the bar is drawn only where it is a
        terminal and jaxprompt logs at INFO.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "it",
        every: float = 30.0,
        stream: TextIO | None = None,
    ):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.done = 0
        self.note = ""
        self._t0 = self._last = time.perf_counter()
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self._bar = bool(isatty) and log.isEnabledFor(logging.INFO)

    def text(self) -> str:
        """``desc 120/640 [19%] 35.2 images/s eta 0:15 | note``."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = self.done / elapsed
        out = f"{self.desc} {self.done}"
        if self.total:
            out += f"/{self.total} [{100 * self.done / self.total:3.0f}%]"
        out += f" {rate:.3g} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            out += f" eta {format_seconds((self.total - self.done) / rate)}"
        return out + (f" | {self.note}" if self.note else "")

    def update(self, n: int = 1, *, note: str | None = None) -> None:
        """Counts ``n`` more units done (``note``: a short status shown beside)."""
        self.done += n
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self._bar:
            self.stream.write("\r\033[K" + self.text())
            self.stream.flush()
        elif now - self._last >= self.every:
            log.info(self.text())
            self._last = now

    def close(self) -> None:
        """Ends the bar, logging the final line once."""
        if self._bar:
            self.stream.write("\r\033[K")
            self.stream.flush()
        log.info(self.text() + f" in {format_seconds(time.perf_counter() - self._t0)}")
