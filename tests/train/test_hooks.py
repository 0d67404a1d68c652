"""The loop's hooks in isolation: interrupts polled without a collective a step, only rank 0
talks, and the engine names no detector's terms."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from fdet.train import hooks as H


def fake_trainer(*, world_size: int, iterations: int = 100, log_interval: int = 10):
    return SimpleNamespace(
        exp=SimpleNamespace(iterations=iterations, log_interval=log_interval),
        state=SimpleNamespace(iteration=0),
        world_size=world_size,
        device="cpu",
        stop=None,
        is_last=False,
    )


def run_steps(hook: H.InterruptHook, trainer, steps: int, *, signal_at: int | None = None) -> int:
    for i in range(1, steps + 1):
        trainer.state.iteration = i
        if signal_at == i:
            hook.requested = True
        hook.after_step(trainer, {})
        if trainer.stop is not None:
            return i
    return -1


def test_one_process_stops_right_after_the_signal() -> None:
    trainer = fake_trainer(world_size=1)
    assert run_steps(H.InterruptHook(), trainer, 50, signal_at=13) == 13
    assert trainer.stop == "interrupted"


def test_several_processes_agree_only_at_the_log_interval(monkeypatch) -> None:
    polls: list[int] = []
    trainer = fake_trainer(world_size=2, log_interval=10)

    def any_rank(flag: bool, device: object) -> bool:
        polls.append(trainer.state.iteration)
        return flag

    monkeypatch.setattr(H, "_any_rank", any_rank)
    assert run_steps(H.InterruptHook(), trainer, 50, signal_at=13) == 20
    assert polls == [10, 20]  # one collective a log interval, none in the steps between


def test_stop_after_needs_no_collective(monkeypatch) -> None:
    monkeypatch.setattr(H, "_any_rank", lambda *a: pytest.fail("no collective expected"))
    trainer = fake_trainer(world_size=2, log_interval=1000)
    assert run_steps(H.InterruptHook(stop_after=7), trainer, 50) == 7


def test_only_rank_zero_prints() -> None:
    out = io.StringIO()
    quiet = H.Console(10, 0, out, bar=True, main=False)
    quiet.update(1, {"loss": "1"}, "a line")
    quiet.write("another")
    assert out.getvalue() == ""
    loud = H.Console(10, 0, out, bar=True, main=True)  # not a terminal: plain lines
    loud.update(1, {}, "a line")
    loud.write("another")
    assert out.getvalue() == "a line\nanother\n"


def test_the_engine_names_no_detector() -> None:
    """fdet/train knows detectors only through the contract: no family's names or terms."""
    folder = Path(H.__file__).parent
    pattern = re.compile(r"RetinaNet|retinanet|cls_loss|box_loss|num_pos|anchors")
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(folder.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
