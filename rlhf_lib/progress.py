"""Progress of a long piece of work, one format for every stage: a log line with the rate and an ETA, bounded in
rate so the log of a 10-hour run stays readable, and — for a stage's training loop — a JSON line per update in
`<stage output>/progress.jsonl`, which the step's task reads while it waits, to draw the step's live card
(`rlhf_lib/live.py`).

    [ppo] step 60/80 (75%) · 1.02 steps/s · 59s elapsed · ETA 20s · score 5.12, kl 3.40

A line is printed on the first update, on the last, and in between at most once per max(10 s, an eighteenth of the
time elapsed): about 18·ln(duration / 180 s) + 18 lines whatever the stage's length — 111 for 10 hours
(tests/test_progress.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.jsonl"
MIN_INTERVAL_S = 10.0
INTERVAL_FRACTION = 1 / 18


def duration(seconds: float) -> str:
    """3s, 4m05s, 2h03m."""
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """`total` units of work of `stage` (None: not known in advance — no percentage, no ETA; a checkpointed stage
    resumed at `start` counts its pace from there). Call `update(done, **metrics)` as work completes; `record` adds
    it to `<out>/progress.jsonl` (rank 0 only). `main=False` (another process of the stage than rank 0): neither
    recorded nor printed."""

    def __init__(self, stage: str, total: int | None, unit: str = "step", start: int = 0, out: Path | None = None,
                 record: bool = True, clock=time.monotonic, printer=print, main: bool = True):
        self.stage, self.unit, self.start = stage, unit, start
        self.total = None if total is None else max(int(total), 1)
        self.clock, self.printer = clock, printer if main else (lambda *a, **k: None)
        record = record and main
        self.began = self.last_line = clock()
        self.lines, self.done = 0, start
        self.path = Path(out) / PROGRESS_FILE if out is not None and record else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a stage run alone may not have made it yet
            self._append({"event": "start", "stage": stage, "total": self.total, "unit": unit, "start": start})

    def _append(self, entry: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"time": time.time(), **entry}) + "\n")

    def eta_s(self, done: int) -> float | None:
        """Seconds left at this attempt's pace; None before the first unit is done."""
        made, spent = done - self.start, self.clock() - self.began
        return (self.total - done) * spent / made if made > 0 and self.total is not None else None

    def line(self, done: int, metrics: dict) -> str:
        spent = self.clock() - self.began
        rate = (done - self.start) / spent if spent > 0 else 0.0
        eta = self.eta_s(done)
        of = f"{done}" if self.total is None else f"{done}/{self.total} ({100 * done // self.total}%)"
        text = (f"[{self.stage}] {self.unit} {of} · {rate:.3g} {self.unit}s/s · {duration(spent)} elapsed"
                + ("" if self.total is None else f" · ETA {'?' if eta is None else duration(eta)}"))
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return text + (" · " + ", ".join(f"{k} {number(v)}" for k, v in list(shown.items())[:4]) if shown else "")

    def due(self, done: int) -> bool:
        now = self.clock()
        return self.lines == 0 or (self.total is not None and done >= self.total) or \
            now - self.last_line >= max(MIN_INTERVAL_S, (now - self.began) * INTERVAL_FRACTION)

    def update(self, done: int, shown: dict | None = None, **metrics) -> None:
        """`done` units so far, and this unit's `metrics` (recorded; the log line shows them, or `shown`)."""
        self.done = done
        if self.path is not None:
            eta = self.eta_s(done)
            self._append({"event": "update", "done": done, "total": self.total,
                          "eta_s": None if eta is None else round(eta, 1), **metrics})
        if self.due(done):
            self.printer(self.line(done, metrics if shown is None else shown), flush=True)
            self.lines, self.last_line = self.lines + 1, self.clock()

    def advance(self, units: int = 1, **metrics) -> None:
        self.update(self.done + units, **metrics)

    def note(self, **fields) -> None:
        """A fact for the live card that is not a step (a checkpoint written, sample generations)."""
        if self.path is not None:
            self._append({"event": "note", **fields})


def read(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The complete JSON lines of a progress file from byte `offset` on, and the offset after them (a line still
    being written is left for the next read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    entries = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
    return entries, offset + end


def hf_callback(stage: str, out: Path):
    """A transformers TrainerCallback that reports an HF-Trainer stage's optimizer steps (and its logged metrics)."""
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        progress = None
        logged: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = Progress(stage, state.max_steps, start=state.global_step, out=out,
                                     main=state.is_world_process_zero)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))
                           and not k.startswith(("train_", "epoch"))}
            if self.progress is not None and self.logged:
                self.progress.note(step=state.global_step, metrics=self.logged)

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:  # the log line shows the newest logged metrics
                self.progress.update(state.global_step, shown=self.logged)

        def on_save(self, args, state, control, **kwargs):
            if self.progress is not None and state.is_world_process_zero:
                self.progress.note(checkpoint=str(Path(args.output_dir) / f"checkpoint-{state.global_step}"),
                                   step=state.global_step)

    return ReportProgress()
