"""What a run reports as it goes: ``out/metrics.jsonl`` (:class:`MetricsLog`) and the split of a stage's wall
time into training steps, evaluations and checkpoints (:class:`StageClock`)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional


class MetricsLog:
    """``metrics.jsonl`` (main process only): one JSON line per logged step or evaluation, with the wall time
    (``time``) and the seconds since this launch started (``elapsed_s``). On resume, the lines after the
    checkpoint resumed from (``resume_step``, a global step) are dropped; without one, all of them."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]) -> None:
        self.path, self.enabled, self.t0 = path, enabled, time.time()
        if enabled and path.exists():
            keep = [] if resume_step is None else [r for r in self.records() if r["global_step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, **record: Any) -> None:
        """Append ``record`` (main process; the others do nothing)."""
        if self.enabled:
            record.update(time=round(time.time(), 3), elapsed_s=round(time.time() - self.t0, 3))
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> List[dict]:
        """The lines written so far (a line cut short by a kill is skipped)."""
        out = []
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out


class StageClock:
    """A stage's wall time split into training steps and the evaluations / checkpoints between them;
    the stage's tqdm ``bar`` is shifted past each pause, so its elapsed time, rate and ETA are those of
    the training steps alone."""

    def __init__(self, bar: Any = None) -> None:
        self.bar, self.t0 = bar, time.perf_counter()
        self.spent = {"eval": 0.0, "checkpoint": 0.0}
        self.count = {"eval": 0, "checkpoint": 0}

    @contextlib.contextmanager
    def pause(self, kind: str) -> Iterator[None]:
        """Time the block as ``kind`` (``"eval"`` or ``"checkpoint"``), not as training."""
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.spent[kind] += dt
            self.count[kind] += 1
            if self.bar is not None and not getattr(self.bar, "disable", True):
                self.bar.start_t += dt  # what tqdm's own unpause() does, for exactly the pause
                self.bar.last_print_t += dt

    def train_s(self) -> float:
        """Seconds of training so far (the pauses left out)."""
        return time.perf_counter() - self.t0 - sum(self.spent.values())

    def summary(self, steps: int) -> Dict[str, Any]:
        """``final.json``'s ``timing`` of the stage, after ``steps`` training steps this launch."""
        train = self.train_s()
        return dict(steps=steps, train_s=round(train, 3), s_per_step=round(train / steps, 4) if steps else None,
                    evals=self.count["eval"], eval_s=round(self.spent["eval"], 3),
                    checkpoints=self.count["checkpoint"], checkpoint_s=round(self.spent["checkpoint"], 3))
