"""`textmill generate` on the bundled model: its exit status tells the shell whether the
generation worked, and a failure is one line on stderr, never a traceback."""
from __future__ import annotations

import gc
import logging

import pytest

from textmill import cli
from textmill.engine.scheduler import Scheduler
from textmill.runner.model_runner import ModelRunner

ARGS = ["generate", "The capital of France is", "--max-tokens", "4", "--dtype", "float32",
        "--kv-cache-memory", "0.05", "--max-model-len", "256"]


@pytest.fixture(autouse=True)
def _restore_process_state():
    # commands.generate gc.freeze()s the loaded model, as a one-shot process should; in this
    # process the next tests would keep every engine loaded here for good. cli.main also
    # points the root logger at this test's captured stderr, which pytest closes after it.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    gc.unfreeze()
    root.handlers[:], root.level = handlers, level


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("textmill:")]


def test_a_generation_that_works_exits_0(capsys):
    assert cli.main(ARGS) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and len(out) > len("The capital of France is")


def test_an_exception_out_of_the_engine_exits_1_with_one_line(monkeypatch, capsys):
    def broken(self):
        raise KeyError("scheduler bug")

    monkeypatch.setattr(Scheduler, "schedule", broken)
    assert cli.main(ARGS) == 1
    [line] = _stderr_lines(capsys)
    assert line == "textmill: generate failed: KeyError: 'scheduler bug'"


def test_an_engine_error_exits_non_zero_with_one_line(monkeypatch, capsys):
    def on_fire(self, scheduled):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(ModelRunner, "execute", on_fire)
    status = cli.main(ARGS)
    lines = _stderr_lines(capsys)
    assert status != 0
    assert len(lines) == 1 and "device on fire" in lines[0]
