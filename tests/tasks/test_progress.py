"""Live progress of computing stages (tasks/progress.py; docs/design.md §4 "Progress"): the worker's throttle bounds
what it sends, the reporters exist only inside a reporting stage, the driver's board turns events into lines and
counts, and a training stage's `losses` output holds one row per step without changing its other output's bytes."""

from __future__ import annotations

import hashlib
import io
import itertools
from pathlib import Path

import pytest

from many.config import FinetuneConfig, LoraConfig
from many.data import TaskData, write_task
from many.progress import Step, read_losses
from tasks.progress import (
    Board,
    Cadence,
    Event,
    Throttle,
    batch_reporter,
    board_of,
    reporting,
    step_reporter,
    worker_channel,
)
from tasks.stages import FinetuneStageConfig, compute_finetune
from tests.conftest import make_samples


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_sends_at_most_two_events_a_second_plus_each_phase_start_and_end() -> None:
    clock, sent = Clock(), []
    throttle = Throttle(sent.append, interval=0.5, clock=clock)
    for step in range(1, 1001):  # 1000 steps in 10 s: 100 steps/s
        clock.now = step / 100
        throttle(Event("step", step, 1000, clock.now, 1.0))
    assert len(sent) <= 10 / 0.5 + 2
    assert sent[0].done == 1 and sent[-1].done == 1000  # the phase's first and last step always go
    assert all(b.seconds - a.seconds >= 0.5 for a, b in itertools.pairwise(sent[:-1]))
    throttle(Event("answer", 1, 40, 0.0))  # a new phase goes at once
    assert sent[-1].unit == "answer"


def test_reporters_exist_only_inside_a_reporting_stage() -> None:
    assert step_reporter() is None and batch_reporter("answer", 10) is None  # computes called directly report nothing
    events: list[Event] = []
    with reporting(events.append):
        step_reporter()(Step(3, 30, 2.5, 1e-4, 1.5))
        answers = batch_reporter("answer", 7)  # two generate calls of 4 and 3 answers count as one phase of 7
        for done, of in [(2, 4), (4, 4), (2, 3), (3, 3)]:
            answers(done, of)
        batch_reporter("batch")(1, 5)
    assert step_reporter() is None
    assert events[0] == Event("step", 3, 30, 1.5, 2.5)
    assert [(e.unit, e.done, e.total) for e in events[1:]] == [
        ("answer", 2, 7), ("answer", 4, 7), ("answer", 6, 7), ("answer", 7, 7), ("batch", 1, 5)]


class FakeHub:
    """Records the worker's fire-and-forget calls `hub.push.remote(stage_id, event)`."""

    def __init__(self) -> None:
        self.pushed: list[tuple[str, Event]] = []
        self.push = type("Method", (), {"remote": lambda _, *args: self.pushed.append(args)})()


def test_a_worker_reports_its_start_and_its_steps_throttled() -> None:
    hub = FakeHub()
    with worker_channel((hub, "run-1")):
        on_step = step_reporter()
        for step in range(1, 101):  # a fast loop: well under the throttle's interval
            on_step(Step(step, 100, 1.0 / step, 1e-3, step * 1e-4))
    assert hub.pushed[0] == ("run-1", Event("", 0, 0, 0.0))
    steps = [event.done for _, event in hub.pushed[1:]]
    assert steps[0] == 1 and steps[-1] == 100 and len(steps) <= 3
    with worker_channel(None):
        assert step_reporter() is None


def test_the_cadence_of_lines_first_every_tenth_at_most_every_min_seconds_and_last() -> None:
    clock = Clock()
    cadence = Cadence(fraction=0.1, min_seconds=5, max_seconds=60, clock=clock)
    due = []
    for done in range(1, 101):
        clock.now = done  # 1 step a second
        if cadence.due(Event("step", done, 100, clock.now)):
            due.append(done)
    assert due == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]
    slow = Cadence(fraction=0.1, min_seconds=5, max_seconds=60, clock=clock)
    assert not slow.due(Event("", 0, 0, 0.0))  # a start event has no count to show
    clock.now = 0
    assert slow.due(Event("step", 1, 10_000, 0.0))
    clock.now = 59
    assert not slow.due(Event("step", 2, 10_000, 59.0))
    clock.now = 60
    assert slow.due(Event("step", 3, 10_000, 60.0))  # a minute without a line


def test_event_text() -> None:
    assert Event("step", 12, 30, 6.0, 2.31041).text() == "step 12/30 (40%)  loss 2.3104  2.00 it/s  ETA 0:09"
    assert Event("answer", 0, 60, 0.0).text() == "answer 0/60 (0%)"
    assert Event("", 0, 0, 0.0).text() == "starting"


def test_the_board_shows_stage_lines_and_the_stage_count(monkeypatch) -> None:
    monkeypatch.setattr(Board, "_ensure_hub", lambda self: "hub")  # no Ray: events are handed to `receive`
    out = io.StringIO()
    board = Board(stream=out, live=False)
    try:
        assert board_of(board.token) is board
        board.expect(4)
        board.finished(("base", None, None), "cached")
        hub, first = board.queued(("finetune", "style-cls", None))
        board.queued(("finetune", "chart-qa", None))
        assert hub == "hub"
        assert board.counts() == {"done": 1, "total": 4, "running": 0, "queued": 2, "waiting": 1}
        board.receive([(first, Event("", 0, 0, 0.0)), (first, Event("step", 1, 30, 0.2, 3.5))])
        assert board.counts()["running"] == 1 and board.counts()["queued"] == 1
        board.receive([(first, Event("step", 30, 30, 6.0, 0.25))])
        board.ended((hub, first))
        board.finished(("finetune", "style-cls", None), "computed")
    finally:
        board.close()
    assert board_of(board.token) is None
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["finetune", "style-cls", "step", "1/30", "(3%)", "loss", "3.5000", "5.00", "it/s",
                                "ETA", "0:06"]
    assert lines[1].split()[:6] == ["finetune", "style-cls", "step", "30/30", "(100%)", "loss"]
    assert lines[2] == "[2/4] stages done  0 running  1 queued  1 waiting"
    assert lines[-1] == lines[2]  # closing repeats the count
    assert "running" not in lines[0].split()  # tests/reliability parse "running" lines as stage starts


def test_the_board_skips_a_slow_hub_and_stops_on_a_dead_one(monkeypatch) -> None:
    import ray

    answers: list = [ray.exceptions.GetTimeoutError("slow"), [], ray.exceptions.RayActorError()]

    def get(_ref, timeout):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    board = Board(stream=io.StringIO(), live=False)
    board._hub = type("Hub", (), {"take": type("Method", (), {"remote": lambda _: "ref"})()})()
    try:
        assert board._take() is True  # timed out: try again next round
        assert board._take() is True
        assert board._take() is False  # the actor died: stop polling
    finally:
        board._hub = None
        board.close()


def _digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data") / "task"
    write_task(TaskData("colours", "exact_match", make_samples(16, seed=2), make_samples(4, seed=3)), directory)
    return directory


def test_finetune_stores_one_loss_row_per_step_and_reporting_leaves_its_bytes_alone(tiny_base_dir, data_dir, tmp_path):
    config = FinetuneStageConfig(finetune=FinetuneConfig(lora=LoraConfig(rank=2, alpha=4.0), steps=6, batch_size=4))
    inputs = {"base": tiny_base_dir, "data": data_dir}
    quiet = compute_finetune(inputs, (tmp_path / "quiet").mkdir() or tmp_path / "quiet", config=config, device="cpu")
    events: list[Event] = []
    with reporting(events.append):
        loud = compute_finetune(inputs, (tmp_path / "loud").mkdir() or tmp_path / "loud", config=config, device="cpu")
    assert set(quiet) == {"task", "losses"}
    assert _digest(quiet["task"]) == _digest(loud["task"])
    losses = [read_losses(outputs["losses"]).to_pydict() for outputs in (quiet, loud)]
    assert losses[0]["step"] == [1, 2, 3, 4, 5, 6]
    assert (losses[0]["loss"], losses[0]["lr"]) == (losses[1]["loss"], losses[1]["lr"])  # bit-identical per seed
    assert [(e.done, e.total) for e in events if e.unit == "step"] == [(s, 6) for s in range(1, 7)]
