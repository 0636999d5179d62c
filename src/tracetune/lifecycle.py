"""The run directory's life, for every verb that writes one (`run`, `resume`, `train`): its name, its lock,
creating it, the checks before a resume, and the records opened at the start of a run (run.json, env.json, the
trackers) and closed at its end (gates, report, model card, manifest). Where each file lives is
tracetune.layout's."""

from __future__ import annotations

import contextlib
import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path

from tracetune.config import Config, dump_config, flatten
from tracetune.errors import RunDirError
from tracetune.layout import RunLayout, read_json, write_json


def run_dir_of(cfg: Config) -> Path:
    """The run directory a config names; a missing run_name becomes a UTC timestamp, recorded in the config."""
    if cfg.output.run_name is None:
        cfg.output.run_name = datetime.now(UTC).strftime("run-%Y%m%dT%H%M%SZ")
    return cfg.output.root / cfg.output.run_name


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock beside the run directory, so two processes never share one (released on exit or crash)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f".{run_dir.name}.lock"
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise RunDirError(
                f"run directory {run_dir} is in use by another process ({handle.read().strip()})"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


def check_resumable(run_dir: Path, cfg: Config, world_size: int = 1) -> None:
    """Refuse to resume when anything that shapes training changed; list every change.

    The world size may change when the global batch (micro-batch x accumulation x ranks) does not: a run
    of 2 ranks x 2 accumulation continues on 1 process with train.grad_accum_steps=4.
    """
    from tracetune.config import load_config
    from tracetune.data.sources import describe as describe_source
    from tracetune.hashing import sha256_file

    files = RunLayout(run_dir)
    if not files.config.is_file():
        raise RunDirError(f"nothing to resume: {run_dir} is not a run directory (no config.yaml)")
    # Where the run lives (output.*) may change, e.g. a moved directory; nothing else may, except the
    # accumulation when the world size changes (checked below as part of the global batch).
    saved_cfg = load_config(files.config)
    run = read_json(files.run) or {}
    saved_world = run.get("world_size", 1)

    def shaping(c: Config) -> dict:
        flat = flatten(c.model_dump(mode="json")).items()
        return {
            k: v
            for k, v in flat
            if not k.startswith("output.") and (k != "train.grad_accum_steps" or saved_world == world_size)
        }

    saved, now = shaping(saved_cfg), shaping(cfg)
    changes = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
    ]
    for path, digest in run.get("data_sha256", {}).items():
        current = sha256_file(Path(path)) if Path(path).is_file() else "missing"
        if current != digest:
            changes.append(f"data {path}: sha256 {digest[:12]}... -> {current[:12]}")
    for source, recorded in run.get("datasets", {}).items():
        current = describe_source(source)
        if current != recorded:
            changes.append(
                f"dataset {source}: fingerprint {recorded.get('fingerprint')} -> {current.get('fingerprint')}"
            )
    before = saved_cfg.train.batch_size * saved_cfg.train.grad_accum_steps * saved_world
    after = cfg.train.batch_size * cfg.train.grad_accum_steps * world_size
    if saved_world != world_size and before != after:
        accum = before / (cfg.train.batch_size * world_size)
        fix = f"train.grad_accum_steps={int(accum)}" if accum == int(accum) else f"a world size dividing {before}"
        changes.append(
            f"global batch: {before} ({saved_cfg.train.batch_size} x {saved_cfg.train.grad_accum_steps} x "
            f"{saved_world} ranks) -> {after} ({cfg.train.batch_size} x {cfg.train.grad_accum_steps} x "
            f"{world_size} ranks); fix: keep it with {fix}"
        )
    if changes:
        raise RunDirError(f"cannot resume {run_dir}: the run changed:\n    " + "\n    ".join(changes))


def new_run_dir(cfg: Config) -> Path:
    """Create the run directory; refuse one that already exists so nothing is overwritten."""
    run_dir = run_dir_of(cfg)
    if run_dir.exists():
        raise RunDirError(
            f"run directory {run_dir} already exists; fix: choose another output.run_name, or continue it with "
            f"`tracetune resume {run_dir}`"
        )
    files = RunLayout(run_dir)
    files.logs.mkdir(parents=True)
    files.config.write_text(dump_config(cfg), encoding="utf-8")
    return run_dir


def git_state() -> dict:
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def open_run(cfg: Config, run_dir: Path, argv: list[str], resume: bool, device, topology: dict) -> dict:
    """Rank 0: create (or reopen, on resume) the run directory and its records; returns run.json's record."""
    import tracetune
    from tracetune.data.sources import describe as describe_source
    from tracetune.data.sources import is_hub
    from tracetune.evidence.env import write_env, write_gpu_snapshot
    from tracetune.hashing import sha256_file

    files = RunLayout(run_dir)
    if resume:
        check_resumable(run_dir, cfg, topology["world_size"])
        record = read_json(files.run)
        record.setdefault("resumed_at", []).append(now())
        record.update(status="running", ended_at=None)
        record.pop("error", None)
        files.config.write_text(dump_config(cfg), encoding="utf-8")  # accumulation may differ
    else:
        new_run_dir(cfg)
        data = [cfg.data.train_file] + ([cfg.eval.eval_file] if cfg.eval.eval_file else [])
        record = {
            "run_id": run_dir.name,
            "argv": argv,
            "started_at": now(),
            "ended_at": None,
            "status": "running",
            "seed": cfg.seed,
            "tracetune_version": tracetune.__version__,
            "git": git_state(),
            "data_sha256": {str(p): sha256_file(p) for p in data if not is_hub(p)},
        }
        if any(is_hub(p) for p in data):  # a Hub dataset has no file to hash: its name, fingerprint, rows
            record["datasets"] = {str(p): describe_source(p) for p in data if is_hub(p)}
    record.update(topology)
    write_json(files.run, record)
    if not files.env.is_file():
        write_env(run_dir, device.type, cfg.eval.precision)
    write_gpu_snapshot(run_dir, device.type, "start")
    return record


def final_numbers(run_dir: Path, gates: dict) -> dict[str, float]:
    """What the trackers get at the end: the final and strongest-baseline accuracies, the gates."""
    files = RunLayout(run_dir)
    final, comparison = read_json(files.eval().scores), read_json(files.comparison)
    numbers = {"gates_passed": float(gates["passed"])}
    if final:
        numbers |= {"accuracy": final["accuracy"], "verified_accuracy": final["verified_accuracy"]}
    if comparison:
        numbers |= {"baseline_accuracy": comparison["base_accuracy"], "difference": comparison["difference"]}
    return numbers


def close_run(run_dir: Path, record: dict) -> dict:
    """Rank 0: gates, run.json's final status, report, model card, and the manifest (written last)."""
    from tracetune import tracking
    from tracetune.evidence.card import write_card
    from tracetune.evidence.gates import compute_gates, write_gates
    from tracetune.evidence.manifest import write_manifest
    from tracetune.evidence.report import write_report

    gates = write_gates(run_dir, compute_gates(run_dir))
    tracking.finish(final_numbers(run_dir, gates))
    record.update(status="completed" if gates["passed"] else "gates_failed", ended_at=now())
    write_json(RunLayout(run_dir).run, record)
    write_report(run_dir)
    write_card(run_dir)
    write_manifest(run_dir)
    return gates


@contextlib.contextmanager
def run_life(cfg: Config, run_dir: Path, argv: list[str], resume: bool, device, topology: dict):
    """The run directory held for one verb: rank 0 takes the lock, opens run.json (and env.json) and starts the
    trackers of output.report_to; an exception ends the run as interrupted or failed in run.json and finishes
    the trackers. Yields run.json's record (None on other ranks); end with close_run or end_training."""
    from tracetune import dist, tracking
    from tracetune.faults import Interrupted

    main = dist.current().is_main
    with run_lock(run_dir) if main else contextlib.nullcontext():
        record = dist.on_main(lambda: open_run(cfg, run_dir, argv, resume, device, topology))
        if main:
            tracking.start(cfg.output.report_to, run_dir, cfg.model_dump(mode="json"))
        try:
            yield record
        except BaseException as exc:
            if main:
                tracking.finish({})
                status = "interrupted" if isinstance(exc, Interrupted | KeyboardInterrupt) else "failed"
                record.update(status=status, ended_at=now(), error=f"{type(exc).__name__}: {exc}")
                write_json(RunLayout(run_dir).run, record)
            raise


def end_training(run_dir: Path, record: dict) -> None:
    """Rank 0, `tracetune train`: the run trained (no evaluation, no gates); run.json and the trackers say so."""
    from tracetune import tracking

    tracking.finish({})
    record.update(status="trained", ended_at=now())
    write_json(RunLayout(run_dir).run, record)
