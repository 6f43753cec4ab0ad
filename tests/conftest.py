"""Shared fixtures for tests that train on the tiny generated data (tests/tiny.py).

Not autouse: test modules opt in with `pytestmark = pytest.mark.usefixtures("isolated")`,
so slow integration tests that use the real cache are untouched.
"""

import sys

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console

import fedrec.cli
import fedrec.data.encoder
import fedrec.data.pipeline
from fedrec.data.pipeline import prepare
from tiny import tiny_config


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """One torch thread, FEDREC_HOME in tmp (never the user's cache), Flower's process-
    global task identity restored afterwards, and the per-process caches cleared."""
    torch.set_num_threads(1)
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path / "home"))
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    fedrec.data.pipeline._PREPARED.clear()
    fedrec.data.encoder._encoder.cache_clear()
    yield
    fedrec.data.pipeline._PREPARED.clear()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def cfg(tiny_root):
    return tiny_config(tiny_root)


@pytest.fixture(scope="module")
def prepared(cfg):
    return prepare(cfg)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `fedrec ARGS...` in-process: (exit code, console text, stderr); with_stdout
    appends what went to stdout directly (a simulation's server lines)."""
    def run(*args: str, with_stdout: bool = False) -> tuple[int, str, str]:
        record = Console(width=300, record=True)
        monkeypatch.setattr(fedrec.cli, "console", record)
        monkeypatch.setattr(sys, "argv", ["fedrec", *args])
        code = 0
        try:
            fedrec.cli.main()
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, record.export_text() + (captured.out if with_stdout else ""), captured.err
    return run
