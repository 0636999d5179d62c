"""tcmalloc for the verbs that train or generate: when tracetune re-executes itself, and what env.json says."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_CONFIG
from tracetune import allocator

LIB = "libtcmalloc_minimal.so.4"


def test_plan_preloads_tcmalloc_once_for_training_and_eval_verbs():
    env = {"LD_PRELOAD": "libother.so", "PATH": "/bin"}
    plan = allocator.reexec_plan(["run", "cfg.yaml"], env, LIB, "glibc")
    assert plan["LD_PRELOAD"] == f"{LIB} libother.so" and plan["PATH"] == "/bin"
    assert plan["TRACETUNE_ALLOCATOR_REEXECUTED"] == "1" and int(plan["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 2**32
    for verb in ("train", "resume", "eval"):
        assert allocator.reexec_plan([verb], {}, LIB, "glibc") is not None
    # Never: another verb, no tcmalloc, already on tcmalloc or jemalloc, opted out, or already re-executed once.
    assert allocator.reexec_plan(["report", "runs/x"], {}, LIB, "glibc") is None
    assert allocator.reexec_plan(["run"], {}, None, "glibc") is None
    assert allocator.reexec_plan(["run"], {}, LIB, "tcmalloc") is None
    assert allocator.reexec_plan(["run"], {}, LIB, "jemalloc") is None
    assert allocator.reexec_plan(["run"], {"TRACETUNE_ALLOCATOR": "system"}, LIB, "glibc") is None
    assert allocator.reexec_plan(["run"], {"TRACETUNE_ALLOCATOR_REEXECUTED": "1"}, LIB, "glibc") is None


def test_this_process_runs_on_glibc_and_says_so():
    if "LD_PRELOAD" in os.environ:
        pytest.skip("the test process itself has a preloaded library")
    assert allocator.active() == "glibc"
    assert allocator.describe()["allocator"] == "glibc"


@pytest.mark.parametrize("choice", ["auto", pytest.param("system", marks=pytest.mark.slow)])
def test_tracetune_run_records_the_allocator_it_ran_on(tmp_path, choice):
    """`python -m tracetune run` re-executes under tcmalloc when it is installed, unless told not to."""
    if allocator.find_tcmalloc() is None and choice == "auto":
        pytest.skip("tcmalloc is not installed (make install installs it where it can)")
    args = ["run", str(TINY_CONFIG), f"output.root={tmp_path}", "output.run_name=r", "eval.max_items=2"]
    args += [f"data.train_file={REPO}/data/train.jsonl", f"eval.eval_file={REPO}/data/eval.jsonl"]
    env = {**os.environ, "TRACETUNE_ALLOCATOR": choice, "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tracetune", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((tmp_path / "r" / "env.json").read_text())
    assert recorded["allocator"] == ("tcmalloc" if choice == "auto" else "glibc")
    assert recorded["TRACETUNE_ALLOCATOR"] == choice
    log = (tmp_path / "r" / "logs" / "train.log").read_text()
    assert "memory allocator: glibc" not in log  # tcmalloc in use, or glibc chosen on purpose: no hint


def test_the_training_log_hints_at_tcmalloc_only_when_it_would_help(monkeypatch):
    monkeypatch.delenv("TRACETUNE_ALLOCATOR", raising=False)
    monkeypatch.setattr(allocator, "active", lambda: "glibc")
    assert "libtcmalloc-minimal4" in allocator.hint()
    monkeypatch.setenv("TRACETUNE_ALLOCATOR", "system")
    assert allocator.hint() is None
    monkeypatch.delenv("TRACETUNE_ALLOCATOR")
    monkeypatch.setattr(allocator, "active", lambda: "tcmalloc")
    assert allocator.hint() is None


def test_a_failed_re_execution_carries_on(monkeypatch, capsys):
    def refuse(*args):
        raise OSError("exec refused")

    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: LIB)
    monkeypatch.setattr(allocator, "active", lambda: "glibc")
    monkeypatch.delenv("TRACETUNE_ALLOCATOR", raising=False)
    monkeypatch.delenv("TRACETUNE_ALLOCATOR_REEXECUTED", raising=False)
    monkeypatch.setattr(allocator.os, "execve", refuse)
    allocator.maybe_reexec(["run", "cfg.yaml"])
    assert "could not re-execute under tcmalloc (exec refused)" in capsys.readouterr().err
