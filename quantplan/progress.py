"""Progress of long work: counted steps -> events (stage, step, done, total, rate, eta) -> listeners.

Every stage that takes more than a few seconds counts its units (windows, layers, trials, plans) on a `Step`
of a `Progress`; each count becomes a `ProgressEvent` for every listener: rich bars on stderr (`RichBars`, for
commands), the job record (the runner stores the latest event: `quantplan status --json`, `GET /v1/jobs/{id}`,
`--wait`). Work on Ray workers counts into a tally actor that the driver polls and feeds into the step
(`workers.tasks`), so a bar moves with the windows done across all workers, not with whole tasks.

Functions that take `progress: bool | Progress` open it with `reporting(progress)`: a `Progress` is used as it
is (one display for nested work), True opens rich bars on stderr for the call, False reports to no one.
Torch-free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Listener", "Progress", "ProgressEvent", "RichBars", "Step", "reporting", "stderr_console"]


@dataclass(frozen=True)
class ProgressEvent:
    """Where one step of a stage stands: `done` of `total` units after `elapsed` seconds.

    `rate` is units per second since the step began and `eta` the seconds left at that rate (both None before
    the first unit is done; `eta` is 0 once every unit is)."""

    stage: str
    step: str
    unit: str
    done: int
    total: int
    elapsed: float
    rate: float | None
    eta: float | None

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[ProgressEvent], None]


class Progress:
    """Where work reports: `step(name, total, unit)` starts a counted step whose updates go to the listeners.

    `at(stage)` gives a view that labels its events with `stage` and shares the listeners. A listener may raise
    (e.g. the runner, on a cancel request) to stop the work that reports."""

    def __init__(self, *listeners: Listener, stage: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.listeners = list(listeners)
        self.stage = stage
        self.clock = clock

    @property
    def enabled(self) -> bool:
        """Whether anyone listens (work skips its counting machinery, e.g. the Ray tally, when no one does)."""
        return bool(self.listeners)

    def at(self, stage: str) -> Progress:
        view = Progress(stage=stage, clock=self.clock)
        view.listeners = self.listeners  # shared: a listener added to either reaches both
        return view

    def step(self, name: str, total: int, unit: str = "windows") -> Step:
        return Step(self, name, max(0, int(total)), unit)

    def emit(self, event: ProgressEvent) -> None:
        for listener in self.listeners:
            listener(event)


class Step:
    """One counted step; reports `done` 0 when it starts and every change after (`update`, `advance`);
    `tick(every)` re-reports an unchanged count with a fresh elapsed time and eta (for long units)."""

    def __init__(self, progress: Progress, name: str, total: int, unit: str) -> None:
        self.progress, self.name, self.total, self.unit = progress, name, total, unit
        self.done = 0
        self.started = progress.clock()
        self.report()

    def update(self, done: int) -> None:
        done = min(max(int(done), self.done), self.total)  # counts only go up (a retried task counts again)
        if done != self.done:
            self.done = done
            self.report()

    def advance(self, k: int = 1) -> None:
        self.update(self.done + k)

    def finish(self) -> None:
        self.update(self.total)

    def tick(self, every: float = 0.0) -> None:
        """Report the count again if nothing was reported for `every` seconds."""
        if self.progress.clock() - self.reported >= every:
            self.report()

    def event(self) -> ProgressEvent:
        elapsed = max(0.0, self.progress.clock() - self.started)
        rate = self.done / elapsed if self.done and elapsed > 0 else None
        eta = 0.0 if self.done >= self.total else ((self.total - self.done) / rate if rate else None)
        return ProgressEvent(self.progress.stage, self.name, self.unit, self.done, self.total, elapsed, rate, eta)

    def report(self) -> None:
        self.reported = self.progress.clock()
        self.progress.emit(self.event())


@contextmanager
def reporting(progress: bool | Progress | None, stage: str = "") -> Iterator[Progress]:
    """`progress` itself when it is a Progress; rich bars on stderr for the call when True; else no one."""
    if isinstance(progress, Progress):
        yield progress.at(stage) if stage and not progress.stage else progress
        return
    if not progress:
        yield Progress(stage=stage)
        return
    bars = RichBars()
    try:
        yield Progress(bars, stage=stage)
    finally:
        bars.close()


_STDERR: Any = None


def stderr_console() -> Any:
    """The one rich Console on stderr (stdout carries results, e.g. --json): the bars and the log handler share
    it, so log lines print above a live bar instead of through it."""
    global _STDERR
    if _STDERR is None:
        from rich.console import Console

        _STDERR = Console(stderr=True)
    return _STDERR


class RichBars:
    """A listener drawing one rich bar per (stage, step) on stderr, with the rate and the eta of the events."""

    def __init__(self, console: Any = None) -> None:
        self._console = console
        self._bars: Any = None
        self._tasks: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            bars = self._open()
            key = (event.stage, event.step)
            label = f"{event.stage}: {event.step}" if event.stage else event.step
            if key not in self._tasks:
                self._tasks[key] = bars.add_task(label, total=event.total or None, unit=event.unit, rate="", eta="")
            bars.update(self._tasks[key], completed=event.done, total=event.total or None,
                        rate=_rate(event), eta=_eta(event))

    def _open(self) -> Any:
        if self._bars is None:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bars

            self._bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[rate]}"),
                              TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                              console=self._console or stderr_console())
            self._bars.start()
        return self._bars

    def close(self) -> None:
        with self._lock:
            if self._bars is not None:
                self._bars.stop()
                self._bars, self._tasks = None, {}


def _rate(event: ProgressEvent) -> str:
    if event.rate is None:
        return ""
    return f"{event.rate:.2f}/s" if event.rate >= 0.1 else f"{1 / event.rate:.0f} s each"


def _eta(event: ProgressEvent) -> str:
    if event.finished or event.eta is None:
        return ""
    m, s = divmod(int(event.eta + 0.5), 60)
    return f"eta {m // 60}:{m % 60:02d}:{s:02d}"
