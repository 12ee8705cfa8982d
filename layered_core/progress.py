"""What a long run tells its user while it works: the image, the stage, the sampling step, an ETA.

:class:`Progress` receives the events of a batch (an image begins, a stage, a step, a line to keep, the image
ends) and sends its lines to logging, for library use. :class:`TerminalProgress` writes them to a stream: on a
terminal one status line with a bar redrawn in place, elsewhere (a pipe, a log file, a job scheduler) plain
lines, a step line every few seconds, so a log shows the run moving without a line per step.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

logger = logging.getLogger(__name__)

BAR_WIDTH = 24


def duration(seconds: float) -> str:
    """``seconds`` for a person: "42 s", "3 min 05 s", "2 h 07 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """The events of a batch, with the step rate and ETAs worked out; lines go to logging (INFO, warnings
    at WARNING). Subclasses send them elsewhere by overriding :meth:`show` and :meth:`keep`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.label = ""
        self.current_stage = ""
        self.total_images = 0
        self.number = 0
        self.image_started = 0.0
        self.finished_seconds: list[float] = []  # images decomposed in this run, not skipped ones
        self._first_step_at: float | None = None
        self._steps_total = 0

    # -- events -----------------------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        """A line to keep that belongs to no image (the models chosen, loading)."""
        self.keep(text)

    def warn(self, text: str) -> None:
        """A warning about the current image, or about the run when no image has begun."""
        self.keep(self._labelled(f"warning: {text}"), warning=True)

    def begin(self, number: int, total: int, name: str) -> None:
        """Image ``number`` of ``total`` begins."""
        self.number, self.total_images = number, total
        self.label = f"[{number}/{total}] {name}"
        self.image_started = self.clock()
        self.current_stage = ""

    def stage(self, text: str) -> None:
        """The current image (or the run) has reached a stage: "loading models", "sampling", "writing psd"."""
        self.current_stage = text
        self._first_step_at = None
        self.show(self._labelled(text), final=False)

    def step(self, done: int, total: int, stage: str = "sampling") -> None:
        """``done`` of ``total`` steps of ``stage`` (the sampling, a split's sampling) are finished."""
        now = self.clock()
        if stage != self.current_stage:
            self.current_stage, self._first_step_at = stage, None
        if done <= 1 or self._first_step_at is None or total != self._steps_total:
            # the first step also holds the warm-up: the rate is measured from its end
            self._first_step_at, self._steps_total = now, total
        self.step_shown(done, total, self.seconds_per_step(done, now))

    def say(self, text: str) -> None:
        """A line to keep about the current image ("redoing: ...")."""
        self.keep(self._labelled(text))

    def end(self, outcome: str, text: str) -> None:
        """The current image ended: ``outcome`` is "done", "skipped" or "failed"; ``text`` its last line."""
        if outcome == "done":
            self.finished_seconds.append(self.clock() - self.image_started)
            left = self.batch_seconds_left()
            if left is not None:
                text += f"; {self.total_images - self.number} left, about {duration(left)}"
        self.keep(self._labelled(text), warning=outcome == "failed")
        self.label = ""
        self.current_stage = ""

    # -- figures ----------------------------------------------------------------------------------------------

    def seconds_per_step(self, done: int, now: float | None = None) -> float | None:
        """Seconds per step since the first step finished; None before there are two steps to measure."""
        if self._first_step_at is None or done < 2:
            return None
        now = self.clock() if now is None else now
        return (now - self._first_step_at) / (done - 1)

    def batch_seconds_left(self) -> float | None:
        """The images after the current one times the mean time of those decomposed so far."""
        remaining = self.total_images - self.number
        if not self.finished_seconds or remaining <= 0:
            return None
        return remaining * sum(self.finished_seconds) / len(self.finished_seconds)

    # -- output -----------------------------------------------------------------------------------------------

    def step_shown(self, done: int, total: int, rate: float | None) -> None:
        """Show step ``done``/``total`` (``rate`` seconds per step, if known); logged at DEBUG here."""
        logger.debug("%s", self._labelled(_step_text(self.current_stage, done, total, rate)))

    def show(self, text: str, final: bool) -> None:
        """A status line that the next one may replace (``final`` False) or one to keep."""
        logger.info("%s", text)

    def keep(self, text: str, warning: bool = False) -> None:
        """A line to keep."""
        logger.log(logging.WARNING if warning else logging.INFO, "%s", text)

    def _labelled(self, text: str) -> str:
        return f"{self.label}: {text}" if self.label else text


def _step_text(stage: str, done: int, total: int, rate: float | None) -> str:
    text = f"{stage or 'sampling'}, step {done}/{total}"
    if rate is not None:
        text += f", {rate:.2f} s/step" + (f", ETA {duration(rate * (total - done))}" if done < total else "")
    return text


class TerminalProgress(Progress):
    """Progress on a stream (stderr by default). On a terminal: one status line with a bar, redrawn in place,
    and kept lines printed above it. Elsewhere: every stage and kept line as a plain line, and a step line when
    ``interval`` seconds have passed since the last line (and the last step), so a log is neither silent nor a
    line per step."""

    def __init__(
        self,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(clock)
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.interval = interval
        self._status_shown = False
        self._last_line_at = -float("inf")

    def step_shown(self, done: int, total: int, rate: float | None) -> None:
        if self.interactive:
            filled = round(BAR_WIDTH * done / total)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            text = f"{self.current_stage or 'sampling'} [{bar}] {done}/{total}"
            if rate is not None:
                text += f" {rate:.2f} s/step" + (f" ETA {duration(rate * (total - done))}" if done < total else "")
            self._status(self._labelled(text))
            return
        now = self.clock()
        if done == 1 or done == total or now - self._last_line_at >= self.interval:
            self._line(self._labelled(_step_text(self.current_stage, done, total, rate)))

    def show(self, text: str, final: bool) -> None:
        if self.interactive and not final:
            self._status(text)
        else:
            self._line(text)

    def keep(self, text: str, warning: bool = False) -> None:
        self._line(text)

    def close(self) -> None:
        """Clear the status line, so what follows starts on a clean line."""
        if self._status_shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._status_shown = False

    def _status(self, text: str) -> None:
        # cut to the terminal's width: a wrapped line cannot be redrawn in place
        width = shutil.get_terminal_size((100, 24)).columns - 1
        self.stream.write("\r\033[K" + text[:width])
        self.stream.flush()
        self._status_shown = True

    def _line(self, text: str) -> None:
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_line_at = self.clock()


class ProgressLogHandler(logging.Handler):
    """Log records as kept lines of a :class:`TerminalProgress`, so they never land inside its status line."""

    def __init__(self, progress: Progress, level: int = logging.NOTSET):
        super().__init__(level)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.keep(self.format(record), warning=record.levelno >= logging.WARNING)
        except Exception:  # logging must never end the run
            self.handleError(record)
