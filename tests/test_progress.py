"""Progress: plain lines every few seconds without a terminal, a bar redrawn in place on one."""

from __future__ import annotations

import io
import logging

from layered_core.progress import Progress, ProgressLogHandler, TerminalProgress, duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_duration_reads_like_a_person_would_say_it():
    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0 s", "42 s", "3 min 05 s", "2 h 07 min"]


def test_without_a_terminal_a_step_line_comes_every_few_seconds_with_an_eta():
    stream, clock = io.StringIO(), Clock()
    progress = TerminalProgress(stream, interactive=False, interval=5.0, clock=clock)
    progress.begin(2, 3, "photo.jpg")
    progress.stage("encoding the image and the prompt")
    for step in range(1, 21):
        clock.now += 1.0
        progress.step(step, 20)
    progress.stage("decoding")
    clock.now += 2.0
    progress.end("done", "done in 22 s -> out/photo")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "[2/3] photo.jpg: encoding the image and the prompt"
    steps = [line for line in lines if ", step " in line]
    # the first step, then one line per 5 s, and the last
    assert [line.split("step ")[1].split(",")[0] for line in steps] == ["1/20", "6/20", "11/20", "16/20", "20/20"]
    assert steps[2] == "[2/3] photo.jpg: sampling, step 11/20, 1.00 s/step, ETA 9 s"
    assert steps[-1] == "[2/3] photo.jpg: sampling, step 20/20, 1.00 s/step"
    assert lines[-2] == "[2/3] photo.jpg: decoding"
    # after one finished image the line says how long the rest of the batch should take
    assert lines[-1] == "[2/3] photo.jpg: done in 22 s -> out/photo; 1 left, about 22 s"


def test_on_a_terminal_one_status_line_is_redrawn_and_kept_lines_go_above_it():
    stream, clock = io.StringIO(), Clock()
    progress = TerminalProgress(stream, interactive=True, clock=clock)
    progress.begin(1, 1, "a.png")
    progress.stage("encoding the image and the prompt")
    for step in (1, 2, 3, 4):
        clock.now += 0.5
        progress.step(step, 4)
    progress.say("redoing: layers.zip is missing")
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 1  # only the kept line ends a line
    status = text.split("\r\033[K")
    assert "[1/1] a.png: sampling [############............] 2/4 0.50 s/step ETA 1 s" in status
    assert status[-2] == "[1/1] a.png: sampling [########################] 4/4 0.50 s/step"
    assert status[-1] == "[1/1] a.png: redoing: layers.zip is missing\n"  # the status line cleared for it


def test_log_records_become_kept_lines():
    stream = io.StringIO()
    progress = TerminalProgress(stream, interactive=True)
    progress.stage("loading models on cpu")
    log = logging.getLogger("layered_core.test_progress")
    handler = ProgressLogHandler(progress)
    log.addHandler(handler)
    try:
        log.warning("a prompt reached 512 tokens")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue() == "\r\033[Kloading models on cpu\r\033[Ka prompt reached 512 tokens\n"


def test_the_base_class_logs_what_a_library_user_would_want(caplog):
    progress = Progress()
    with caplog.at_level(logging.INFO, logger="layered_core.progress"):
        progress.begin(1, 2, "x.png")
        progress.warn("tiny input")
        progress.end("failed", "failed: not a readable image")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "[1/2] x.png: warning: tiny input"),
        ("WARNING", "[1/2] x.png: failed: not a readable image"),
    ]
