"""Checkpoints: staged, fsynced, renamed, then committed with a manifest; keep-last-N after commit.

Layout of `checkpoints/step-000100/`:
  model/            Hugging Face weights (full) or the peft adapter (LoRA)    one process or DDP
  optimizer.pt      optimizer (and fp32 master weights) state                 one process or DDP
  dcp/              weights and optimizer state, one shard per rank (DCP)     FSDP, instead of the two above
  config.json       the model's architecture, to rebuild it around dcp/       FSDP
  trainer_state.pt  scheduler, RNG states, data position, step
  config.yaml       the resolved config
  probe.json        outputs of the model on a fixed probe batch, for the reload gate
  MANIFEST.json     sha256 of every file above
  COMMITTED         written last; a directory without it is never loaded
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tracetune.dist import barrier, current
from tracetune.errors import TracetuneError
from tracetune.faults import crash_point
from tracetune.hashing import sha256_file
from tracetune.layout import CONFIG
from tracetune.models.checkpoints import COMMIT_MARKER, MANIFEST, committed_checkpoints


class CheckpointError(TracetuneError):
    """A checkpoint could not be written (disk full, permissions)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    root: Path,
    step: int,
    model,
    optimizer_state: dict,
    trainer_state: dict,
    config_yaml: str,
    probe: dict,
    keep_last: int,
) -> Path:
    """Write one committed checkpoint of a replicated model (one process or DDP: rank 0 writes; every rank
    calls) and prune old ones; returns its directory."""

    def write_weights(staging: Path) -> None:
        if current().is_main:
            model.save_pretrained(staging / "model")
            crash_point(f"checkpoint-{step}/model-written")
            torch.save(optimizer_state, staging / "optimizer.pt")

    return _write_committed(root, step, write_weights, trainer_state, config_yaml, probe, keep_last)


def save_sharded_checkpoint(
    root: Path,
    step: int,
    model,
    optimizer,
    trainer_state: dict,
    config_yaml: str,
    probe: dict,
    keep_last: int,
) -> Path:
    """Write one committed checkpoint of an FSDP model: each rank writes its shards of the weights and the
    optimizer state through torch.distributed.checkpoint into dcp/, then rank 0 seals and commits it. DCP
    reshards on load, so it resumes at any world size (and on one process without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def write_weights(staging: Path) -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging / "dcp")
        crash_point(f"checkpoint-{step}/model-written")
        if current().is_main:
            model.config.to_json_file(staging / "config.json")  # what load_sharded_model builds the model from

    return _write_committed(root, step, write_weights, trainer_state, config_yaml, probe, keep_last)


def _write_committed(root, step, write_weights, trainer_state, config_yaml, probe, keep_last) -> Path:
    """Stage, write, hash, fsync, rename, then mark COMMITTED; rank 0 does all but `write_weights`."""
    main = current().is_main
    final = root / step_dir_name(step)
    staging = root / (final.name + ".staging")
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    try:
        write_weights(staging)
        barrier()
        if main:
            torch.save(trainer_state, staging / "trainer_state.pt")
            (staging / CONFIG).write_text(config_yaml, encoding="utf-8")
            (staging / "probe.json").write_text(json.dumps(probe, indent=1) + "\n", encoding="utf-8")
            files = sorted(p for p in staging.rglob("*") if p.is_file())
            manifest = {str(p.relative_to(staging)): sha256_file(p) for p in files}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
            _fsync_tree(staging)
            crash_point(f"checkpoint-{step}/staged")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            crash_point(f"checkpoint-{step}/renamed")
            (final / COMMIT_MARKER).write_text(f"{step}\n", encoding="utf-8")
            _fsync_tree(final)
    except (OSError, RuntimeError) as exc:  # disk full, permission denied: report it; earlier ones are untouched
        # (torch.save's zip writer reports a full disk as RuntimeError "unexpected pos ...", not as OSError)
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(root).free / 1e9
        raise CheckpointError(
            f"could not write checkpoint {final.name}: {exc} ({free:.1f} GB free on {root}); "
            "earlier checkpoints are intact"
        ) from exc
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    if main:
        prune_checkpoints(root, keep_last)
    return final


def prune_checkpoints(root: Path, keep_last: int) -> None:
    committed = committed_checkpoints(root)
    for old in committed[: max(0, len(committed) - keep_last)]:
        shutil.rmtree(old)


@dataclass
class Progress:
    """Everything about where training is that a checkpoint must restore for an exact resume."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0  # index into the epoch's batch plan of the next micro-batch
    elapsed_s: float = 0.0
    num_skipped_steps: int = 0
    # Sums since the last metrics line, so a resumed run logs the same averages.
    window: dict = field(
        default_factory=lambda: {"loss_sum": 0.0, "loss_tokens": 0, "tokens": 0, "padded": 0, "samples": 0}
    )


def restore_checkpoint(path: Path, model, optimizer, scheduler, master, method: str) -> Progress:
    """Load weights (or adapter), optimizer (and fp32 master weights), scheduler and RNG states from a
    checkpoint directory into the live objects; return where training was."""
    from safetensors.torch import load_file

    if method == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "model" / "adapter_model.safetensors"))
    else:
        weights = {}
        for file in sorted((path / "model").glob("*.safetensors")):
            weights.update(load_file(file))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {name for name in missing if "lm_head" in name and model.config.tie_word_embeddings}
        assert not unexpected and set(missing) == tied, (missing, unexpected)
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(optimizer_state["optimizer"])
    if master:
        with torch.no_grad():
            for target, saved in zip(master.master, optimizer_state["master"], strict=True):
                target.copy_(saved)
    return _restore_trainer_state(path, scheduler)


def restore_sharded_checkpoint(path: Path, model, optimizer, scheduler) -> Progress:
    """Load an FSDP checkpoint's dcp/ into the live model and optimizer, sharded or not, at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path / "dcp")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return _restore_trainer_state(path, scheduler)


def _restore_trainer_state(path: Path, scheduler) -> Progress:
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return Progress(**state["progress"])
