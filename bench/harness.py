"""What the side-by-side benches share: a worker per (system, repeat) in its own process, run interleaved
A B A B ... so drift and the other core's load hit every system alike, each printing one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tracetune import allocator


def run_worker(worker: Callable, args) -> None:
    """In a worker process: run `worker(args, tmp)` in a fresh temporary directory and print its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(worker(args, Path(tmp))))


def spawn(script: str, system: str, argv: list[str], tcmalloc: bool) -> dict:
    """`script --worker system argv...` in its own process (under tcmalloc where asked and installed)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    library = allocator.find_tcmalloc()
    if library and tcmalloc:
        env = allocator.preload_env(env, library)
    result = subprocess.run(
        [sys.executable, script, "--worker", system, *argv], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise SystemExit(f"{system} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def interleave(systems: tuple[str, ...], repeats: int, one: Callable[[str], dict]) -> dict[str, list[dict]]:
    """Each system `repeats` times, A B A B ...: {system: [result of each repeat]}."""
    runs = {s: [] for s in systems}
    for repeat in range(repeats):
        for system in systems:
            runs[system].append(one(system))
            print(f"repeat {repeat + 1} {system} done", file=sys.stderr, flush=True)
    return runs
