"""Progress bars: redrawn in place on a terminal, a few whole lines in a log (a file or a pipe)."""

from __future__ import annotations

import io
import time

from vit2cbsa.train import progress
from vit2cbsa.train.progress import LineStream, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_few_whole_lines_not_one_redraw_per_step(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    log = io.StringIO()
    bar = progress_bar(True, stream=log, total=400, desc="finetune", unit="step")
    for _ in range(400):
        time.sleep(0.0005)
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 2 <= len(lines) <= 12, lines  # ~0.2 s of steps at one line per 0.05 s, and the closing line
    assert lines[-1].startswith("finetune: 100%") and "400/400" in lines[-1]


def test_a_terminal_keeps_tqdm_redrawing_in_place():
    tty = Terminal()
    bar = progress_bar(True, stream=tty, total=50, desc="align")
    for _ in range(50):
        bar.update(1)
    bar.close()
    assert "\r" in tty.getvalue() and bar.mininterval == 0.1  # tqdm's own default


def test_other_processes_show_nothing():
    log = io.StringIO()
    bar = progress_bar(False, stream=log, total=5)
    bar.update(5)
    bar.close()
    assert log.getvalue() == ""


def test_line_stream_drops_redraw_and_clear_sequences():
    out = io.StringIO()
    s = LineStream(out)
    s.write("\rstep 1")
    s.write("\r" + " " * 20 + "\r")  # tqdm clearing a bar with leave=False
    s.write("\rstep 2\n")
    assert out.getvalue() == "step 1\nstep 2\n"
