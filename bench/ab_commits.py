"""One of bench/run.py's workers from two commits, interleaved in one invocation: did a change slow anything?

Each commit is checked out into a temporary git worktree; each (commit, repeat) runs as its own process,
A B A B ..., with the worktree's src/ first on PYTHONPATH (the worker records which tracetune it imported), so
drift and the other core's load hit both alike. The worker itself is the *baseline* commit's bench/run.py
worker, the same code measuring both.

    python bench/ab_commits.py --base edbc52a --worker tracetune --repeats 3 -- --steps 6
    python bench/ab_commits.py --base edbc52a --worker generate --repeats 2 -- --eval-items 20 --generation-repeats 1

Writes bench/results/<out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tracetune import allocator

REPO = Path(__file__).resolve().parents[1]
# The numbers each worker reports that say how fast it was (higher is better unless named *_s).
TRAINING_KEYS = (
    "seconds_per_step",
    "real_tokens_per_s",
    "samples_per_s",
    "peak_rss_mb",
    "final_train_loss",
    "val_loss",
)
GENERATION_KEYS = ("items_per_s", "new_tokens_per_s")


def _worktree(rev: str, root: Path) -> Path:
    path = root / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True)
    return path


def _run_worker(tree: Path, runner: Path, worker: str, extra: list[str]) -> dict:
    env = os.environ | {"PYTHONPATH": str(tree / "src"), "TQDM_DISABLE": "1"}
    if library := allocator.find_tcmalloc():  # as `tracetune run` and bench/run.py run tracetune
        env = allocator.preload_env(env, library)
    imported = subprocess.run(
        [sys.executable, "-c", "import tracetune; print(tracetune.__file__)"], env=env, capture_output=True, text=True
    ).stdout.strip()
    assert imported == str(tree / "src" / "tracetune" / "__init__.py"), imported
    command = [sys.executable, str(runner), "--worker", worker, *extra]
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    if out.returncode:
        raise SystemExit(f"worker failed in {tree}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _numbers(worker: str, result: dict) -> dict:
    if worker == "generate":
        return {f"tracetune_{k}": result["tracetune"][k] for k in GENERATION_KEYS}
    return {k: result[k] for k in TRAINING_KEYS if k in result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit before the change")
    parser.add_argument("--head", default="HEAD", help="the commit after it")
    parser.add_argument("--worker", required=True, choices=("tracetune", "generate"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="bench/results/<out>.json (default ab_<worker>)")
    parser.add_argument("extra", nargs="*", help="after --: arguments for bench/run.py's worker")
    args = parser.parse_args()
    revs = {"base": args.base, "head": args.head}
    commits = {
        name: subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True, check=True
        ).stdout.strip()
        for name, rev in revs.items()
    }
    with tempfile.TemporaryDirectory(prefix="tracetune-ab-") as tmp:
        trees = {name: _worktree(commit, Path(tmp)) for name, commit in commits.items()}
        runner = trees["base"] / "bench" / "run.py"
        runs = {name: [] for name in trees}
        try:
            for repeat in range(args.repeats):
                for name, tree in trees.items():
                    runs[name].append(_numbers(args.worker, _run_worker(tree, runner, args.worker, args.extra)))
                    print(f"repeat {repeat + 1} {name}: {runs[name][-1]}", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    ratio = {k: medians["head"][k] / medians["base"][k] for k in medians["base"]}
    result = {"commits": commits, "worker": args.worker, "extra": args.extra, "runs": runs, "medians": medians}
    result["head_over_base"] = ratio
    out = REPO / "bench" / "results" / f"{args.out or 'ab_' + args.worker}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"medians": medians, "head_over_base": ratio}, indent=2))


if __name__ == "__main__":
    main()
