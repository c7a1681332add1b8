"""Live progress of the stages that compute (docs/design.md §4 "Progress"): from the Ray worker to the terminal and to
Prefect's run logs.

    compute ── many's callbacks (a Step per optimizer step, (done, total) per batch)
            ─► `step_reporter` / `batch_reporter`: an `Event`, through a `Throttle` (≤ 2 per second per stage)
            ─► a fire-and-forget call of the run's `Hub`, a Ray actor of 0 CPUs that the driver started
            ─► the driver's `Board` takes the hub's events every second and shows them: one live line per running
               stage and a `[done/total] stages` line (rich on a TTY; plain lines every 10 % or minute otherwise),
               and logs them on the stage's Prefect task run (every 10 % or minute), which Prefect's UI shows.

A compute asks for its reporters with `step_reporter()` / `batch_reporter(...)`: None outside a stage that reports
(tests calling computes directly, `many run` with progress off), so nothing is measured or sent. In the worker,
`tasks.dispatch.execute` sets the channel for the duration of the stage (`reporting`); the worker's last call
waits for the hub to have every event, so the stage's final report is shown before its "computed" line.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from many.progress import BatchCallback, StepCallback

SEND_SECONDS = 0.5  # a worker sends at most one event per this many seconds (plus phase starts and ends)
POLL_SECONDS = 1.0  # the driver takes the hub's events this often
LINE_FRACTION = 0.1  # a plain line / a Prefect log line every 10 % of a phase ...
LINE_MIN_SECONDS = 5.0  # ... but not more often than this ...
LINE_MAX_SECONDS = 60.0  # ... and at least this often
HUB_TIMEOUT = 10.0  # seconds a call to the hub may take before progress is given up (never the stage)

Label = tuple[str, str | None, str | None]  # (stage, task, method), as the run summary names a stage
PRINT_LOCK = threading.Lock()  # held while a stage line is written (tasks.dispatch's lines too)


@dataclass(frozen=True)
class Event:
    """A stage's report: `done` of `total` `unit`s of its current phase ("step", "answer", …; "" when it starts)."""

    unit: str
    done: int
    total: int
    seconds: float  # since the phase started
    loss: float | None = None

    def rate(self) -> float | None:
        """Units per second so far (None before a unit is done)."""
        return self.done / self.seconds if self.done and self.seconds > 0 else None

    def text(self) -> str:
        """"step 12/30 (40%)  loss 2.3104  5.12 it/s  ETA 0:04" (the parts that are known)."""
        if self.total <= 0:
            return "starting"
        parts = [f"{self.unit} {self.done}/{self.total} ({100 * self.done // self.total}%)"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:.2f} it/s" if rate < 100 else f"{rate:.0f} it/s")
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        return "  ".join(parts)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


Send = Callable[[Event], None]


class Throttle:
    """Passes an event on when it starts a phase (another unit than the last one passed), ends one (done ≥ total)
    or comes `interval` seconds after the last one passed; drops the others. So a stage sends at most 1/interval
    events per second plus two per phase, however fast its loop runs."""

    def __init__(self, send: Send, interval: float = SEND_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.send, self.interval, self.clock = send, interval, clock
        self._unit: str | None = None
        self._at = -float("inf")

    def __call__(self, event: Event) -> None:
        now = self.clock()
        if event.unit != self._unit or event.done >= event.total or now - self._at >= self.interval:
            self._unit, self._at = event.unit, now
            self.send(event)


# -- the worker side: what a compute reports to -------------------------------------------------------------------

_channel: contextvars.ContextVar[Send | None] = contextvars.ContextVar("many_stage_progress", default=None)


@contextlib.contextmanager
def reporting(send: Send | None) -> Iterator[None]:
    """Within the block, `step_reporter` and `batch_reporter` report to `send` (None: report nothing)."""
    token = _channel.set(send)
    try:
        yield
    finally:
        _channel.reset(token)


def step_reporter() -> StepCallback | None:
    """An `on_step` for a training loop of the running stage, or None when the stage reports nothing."""
    send = _channel.get()
    if send is None:
        return None
    return lambda step: send(Event("step", step.step, step.total, step.seconds, step.loss))


def batch_reporter(unit: str, total: int | None = None) -> BatchCallback | None:
    """An `on_batch` of the running stage, or None when it reports nothing.

    Without `total` each call's (done, total) is reported as it is. With `total`, successive calls count as one
    phase of `total` units: the eval stage's answers over several tasks (and, for CRAM, several experts), where
    each `generate_answers` call reports its own (done, len(samples))."""
    send = _channel.get()
    if send is None:
        return None
    started = time.monotonic()
    finished = 0  # units of the calls that ended

    def report(done: int, of: int) -> None:
        nonlocal finished
        send(Event(unit, finished + done, total if total is not None else of, time.monotonic() - started))
        if total is not None and done >= of:
            finished += of

    return report


class Hub:
    """The run's mailbox of progress events (run as a Ray actor of 0 CPUs): workers push (stage run id, Event),
    the driver takes them all."""

    def __init__(self) -> None:
        self._events: list[tuple[str, Event]] = []

    def push(self, stage_id: str, event: Event) -> None:
        self._events.append((stage_id, event))

    def take(self) -> list[tuple[str, Event]]:
        events, self._events = self._events, []
        return events

    def flush(self) -> bool:
        """A round trip: every push its caller made before has arrived (a caller's calls run in order)."""
        return True


Channel = tuple[Any, str]  # (the hub's actor handle, the stage run's id)


@contextlib.contextmanager
def worker_channel(channel: Channel | None) -> Iterator[None]:
    """In a Ray worker: report the stage to the hub for the duration of the block (nothing when None). Sends a
    start event first; at the end waits (at most HUB_TIMEOUT) until the hub holds every event sent."""
    if channel is None:
        yield
        return
    hub, stage_id = channel

    def push(event: Event) -> None:
        hub.push.remote(stage_id, event)  # fire and forget: the training loop never waits for the driver

    send = Throttle(push)
    send(Event("", 0, 0, 0.0))
    try:
        with reporting(send):
            yield
    finally:
        import ray

        if ray.is_initialized():
            with contextlib.suppress(Exception):  # progress is never worth failing a stage for
                ray.get(hub.flush.remote(), timeout=HUB_TIMEOUT)


# -- the driver side: one board per run ---------------------------------------------------------------------------


class Cadence:
    """When a phase is worth a line (terminal without a TTY, Prefect log): its first report, its last, and between
    them every `fraction` of the total but at most once per `min_seconds`, or after `max_seconds` in any case."""

    def __init__(self, fraction: float = LINE_FRACTION, min_seconds: float = LINE_MIN_SECONDS,
                 max_seconds: float = LINE_MAX_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.fraction, self.min_seconds, self.max_seconds, self.clock = fraction, min_seconds, max_seconds, clock
        self._unit: str | None = None
        self._done = 0
        self._at = -float("inf")

    def due(self, event: Event) -> bool:
        if event.total <= 0:
            return False
        now = self.clock()
        since = now - self._at
        if not (
            event.unit != self._unit
            or event.done >= event.total
            or (event.done - self._done >= self.fraction * event.total and since >= self.min_seconds)
            or since >= self.max_seconds
        ):
            return False
        self._unit, self._done, self._at = event.unit, event.done, now
        return True


def stage_name(label: Label) -> str:
    """The stage column of the progress lines: "finetune               style-cls" (tasks.dispatch's layout)."""
    stage, task, method = label
    where = task or ""
    if method:
        where = f"{where} [{method}]" if where else f"[{method}]"
    return f"{stage:<22} {where:<34}"


@dataclass
class _Stage:
    label: Label
    logger: logging.LoggerAdapter | None
    event: Event | None = None  # None while queued on Ray
    line: Cadence = field(default_factory=Cadence)  # its plain lines
    log: Cadence = field(default_factory=Cadence)  # its Prefect log lines
    row: Any = None  # its rich task id


_boards: dict[str, Board] = {}
_boards_lock = threading.Lock()


def board_of(token: str | None) -> Board | None:
    """The open board of `token` (tasks.dispatch.ClusterSpec.board), or None."""
    with _boards_lock:
        return _boards.get(token) if token else None


class Board:
    """One run's stages as the driver sees them: how many are done, running (their latest events), queued on Ray or
    waiting for inputs; shown on `stream` and logged on each running stage's Prefect task run."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        stream = stream or sys.stderr
        self.live = stream.isatty() if live is None else live
        self.display = _RichDisplay(stream) if self.live else _PlainDisplay(stream)
        self.token = uuid.uuid4().hex
        self.total = 0
        self._done: set[Label] = set()
        self._computed = 0
        self._stages: dict[str, _Stage] = {}  # stage run id → its stage, while queued or running
        self._lock = threading.RLock()
        self._take_lock = threading.Lock()
        self._hub: Any = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._overall_at = time.monotonic()
        with _boards_lock:
            _boards[self.token] = self

    # the flow
    def expect(self, total: int) -> None:
        """The number of stages the run submitted."""
        with self._lock:
            self.total = total
            self._show_overall()

    # tasks.dispatch, in the stage's Prefect task
    def queued(self, label: Label) -> Channel:
        """A stage about to be submitted to Ray: the channel its worker reports on (starts the hub if needed)."""
        stage_id = uuid.uuid4().hex
        with self._lock:
            self._stages[stage_id] = _Stage(label, _prefect_logger())
            self._show_overall()
            return self._ensure_hub(), stage_id

    def ended(self, channel: Channel) -> None:
        """The stage's Ray task returned (or failed): show its last events, drop its live line."""
        self._take()
        with self._lock:
            stage = self._stages.pop(channel[1], None)
            if stage is not None and stage.row is not None:
                self.display.remove(stage.row)

    def finished(self, label: Label, status: str) -> None:
        """The stage is done ("computed" or "cached")."""
        with self._lock:
            self._done.add(label)
            if status == "computed":
                self._computed += 1
                self.display.overall_line(self._overall())
            self._show_overall()

    def close(self) -> None:
        """Stop polling, stop the hub, print the final count and end the live display (idempotent)."""
        with _boards_lock:
            _boards.pop(self.token, None)
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=HUB_TIMEOUT)
        with self._lock:
            if self._hub is not None:
                with contextlib.suppress(Exception):
                    import ray

                    ray.kill(self._hub)
                self._hub = None
            if self._computed:
                self.display.overall_line(self._overall())
            self.display.close()

    # the events
    def _ensure_hub(self) -> Any:
        if self._hub is None:
            import ray

            self._hub = ray.remote(num_cpus=0)(Hub).remote()
            self._poller = threading.Thread(target=self._poll, name="many-progress", daemon=True)
            self._poller.start()
        return self._hub

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            if not self._take():
                return
            with self._lock:
                if self._stages and time.monotonic() - self._overall_at >= LINE_MAX_SECONDS:
                    self.display.overall_line(self._overall())
                    self._overall_at = time.monotonic()

    def _take(self) -> bool:
        """Show the hub's pending events, in order; False when the hub is gone (Ray shut down, the actor died): then
        progress stops, the run goes on. A slow answer (a loaded machine) only skips this round."""
        with self._take_lock:
            hub = self._hub
            if hub is None:
                return True
            import ray

            try:
                events = ray.get(hub.take.remote(), timeout=HUB_TIMEOUT)
            except Exception as error:  # noqa: BLE001 - progress never fails the run
                return ray.is_initialized() and not isinstance(error, ray.exceptions.RayActorError)
            self.receive(events)
            return True

    def receive(self, events: list[tuple[str, Event]]) -> None:
        """Show events (stage run id, Event) in order: the running stages' rows, lines and Prefect logs."""
        with self._lock:
            for stage_id, event in events:
                stage = self._stages.get(stage_id)
                if stage is not None:
                    self._show(stage, event)
            if events:
                self._show_overall()

    def _show(self, stage: _Stage, event: Event) -> None:
        stage.event = event
        name = stage_name(stage.label)
        stage.row = self.display.update(stage.row, name, event)
        if stage.line.due(event):
            self.display.stage_line(name, event)
        if stage.logger is not None and stage.log.due(event):
            stage.logger.info("%s: %s", " ".join(name.split()), event.text().replace("  ", ", "))

    def counts(self) -> dict[str, int]:
        """Stages done (computed or cached), running on a worker, queued on Ray, waiting for their inputs; total."""
        with self._lock:
            running = sum(stage.event is not None for stage in self._stages.values())
            queued = len(self._stages) - running
            done = len(self._done)
            waiting = max(0, self.total - done - running - queued)
            return {"done": done, "total": self.total, "running": running, "queued": queued, "waiting": waiting}

    def _overall(self) -> str:
        return overall_text(self.counts())

    def _show_overall(self) -> None:
        self.display.overall(self.counts())


def overall_text(counts: dict[str, int]) -> str:
    """"[12/57] stages done  2 running  3 queued  40 waiting"."""
    return (f"[{counts['done']}/{counts['total']}] stages done  {counts['running']} running  {counts['queued']} queued"
            f"  {counts['waiting']} waiting")


def _prefect_logger() -> logging.LoggerAdapter | None:
    """A logger onto the current Prefect task run that sends to Prefect's API (what its UI shows) and not to the
    console, whatever PREFECT_LOGGING_LEVEL the CLI set to keep the terminal quiet; None outside a task run."""
    try:
        from prefect.logging import get_run_logger

        run = get_run_logger()
    except Exception:  # noqa: BLE001 - no run context: no Prefect logs
        return None
    return logging.LoggerAdapter(_api_logger(), dict(getattr(run, "extra", {})))


_api_lock = threading.Lock()


def _api_logger() -> logging.Logger:
    logger = logging.getLogger("many.progress")
    with _api_lock:
        if not logger.handlers:
            from prefect.logging.handlers import APILogHandler

            logger.addHandler(APILogHandler())
            logger.setLevel(logging.INFO)
            logger.propagate = False
    return logger


class _PlainDisplay:
    """Lines, for a terminal that is not a TTY (CI, tests, logs): a stage's line on its cadence, the count of
    stages after each computed stage and every minute."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._overall = ""

    def _write(self, line: str) -> None:
        with PRINT_LOCK:
            self.stream.write(line + "\n")
            self.stream.flush()

    def update(self, row: Any, name: str, event: Event) -> Any:
        return None

    def remove(self, row: Any) -> None:
        pass

    def stage_line(self, name: str, event: Event) -> None:
        self._write(f"  {name} {event.text()}")

    def overall(self, counts: dict[str, int]) -> None:
        pass

    def overall_line(self, text: str) -> None:
        if text != self._overall:  # e.g. the closing count right after the last stage's
            self._overall = text
            self._write(text)

    def close(self) -> None:
        pass


class _RichDisplay:
    """A rich live display on a TTY: the `[done/total]` row, then one row per running stage (bar, count, loss,
    it/s, ETA). What else the run writes on stderr (the stages' "computed" lines) scrolls above it."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("{task.description}", markup=False),  # "[many]" is a method, not a style
            BarColumn(bar_width=24),
            TextColumn("{task.fields[text]}", markup=False),
            console=Console(file=stream),
            transient=True,
            redirect_stdout=False,  # stdout may be a pipe (--json): only stderr is ours
            redirect_stderr=True,
            refresh_per_second=4,
        )
        self.overall_row = self.progress.add_task("stages", total=None, text="")
        self.progress.start()
        atexit.register(self.close)  # a run that fails before its flow closes the board still restores the terminal

    def update(self, row: Any, name: str, event: Event) -> Any:
        fields = {"total": event.total or None, "completed": event.done, "text": event.text()}
        if row is None:
            return self.progress.add_task(f"  {name.rstrip()}", **fields)
        self.progress.update(row, **fields)
        return row

    def remove(self, row: Any) -> None:
        self.progress.remove_task(row)

    def stage_line(self, name: str, event: Event) -> None:
        pass

    def overall(self, counts: dict[str, int]) -> None:
        self.progress.update(
            self.overall_row, total=counts["total"] or None, completed=counts["done"],
            description=f"[{counts['done']}/{counts['total']}] stages",
            text=f"{counts['running']} running  {counts['queued']} queued  {counts['waiting']} waiting",
        )

    def overall_line(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.progress.stop()  # idempotent
