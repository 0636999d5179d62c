"""Shared fixtures. `slow` tests need the packaged real models (run with TRACETUNE_SLOW=1 or -m slow);
`gpu` tests need CUDA. Both skip with a reason otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_test.yaml"


def pytest_collection_modifyitems(config, items):
    import torch

    markexpr = config.getoption("-m") or ""
    run_slow = os.environ.get("TRACETUNE_SLOW") == "1" or "slow" in markexpr
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(
                pytest.mark.skip(
                    reason="slow: needs packaged models or minutes of CPU; set TRACETUNE_SLOW=1 or -m slow"
                )
            )
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device visible"))


@pytest.fixture(autouse=True, scope="session")
def _kernel_probes_of_this_session(tmp_path_factory):
    """The kernel probes (eval/invariance.py) measured once per session on this machine and reused by every run
    and subprocess of it, never a cache a developer's earlier code left behind."""
    os.environ["TRACETUNE_KERNEL_PROBES"] = str(tmp_path_factory.mktemp("kernel_probes"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Configs name data files relative to the repository root."""
    monkeypatch.chdir(REPO)


@pytest.fixture
def tiny_cfg(tmp_path):
    """Build the tiny test config with overrides; output goes under tmp_path."""
    from tracetune.config import load_config

    def build(*overrides: str):
        return load_config(TINY_CONFIG, [f"output.root={tmp_path / 'runs'}", *overrides])

    return build


def write_jsonl(path: Path, lines: list) -> Path:
    """Write raw lines (str) or objects (dict) as JSONL."""
    import json

    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def tiny_run_args(root, *extra: str) -> list[str]:
    """`tracetune run` arguments for the tiny config writing under `root`."""
    return [
        "run",
        str(TINY_CONFIG),
        f"output.root={root}",
        f"data.train_file={REPO}/data/train.jsonl",
        f"eval.eval_file={REPO}/data/eval.jsonl",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    """One complete `tracetune run` of the tiny model, shared by the tests that only read it."""
    from tracetune.cli import main

    root = tmp_path_factory.mktemp("runs")
    assert main(tiny_run_args(root, "output.run_name=r1")) == 0
    return root / "r1"
