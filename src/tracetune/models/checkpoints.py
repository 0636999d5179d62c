"""Reading committed checkpoints: which are intact, the newest of them, and a plain model from an FSDP one.
What evidence (the reload gate) and resuming share, without the training loop; train/checkpoint.py writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tracetune.hashing import hash_mismatches

if TYPE_CHECKING:
    from tracetune.config import Config

COMMIT_MARKER = "COMMITTED"
MANIFEST = "MANIFEST.json"


def verify_checkpoint(path: Path) -> list[str]:
    """Problems with one checkpoint directory: missing marker or manifest, missing or altered files."""
    if not (path / COMMIT_MARKER).is_file():
        return [f"{path.name}: no {COMMIT_MARKER} marker (incomplete write)"]
    if not (path / MANIFEST).is_file():
        return [f"{path.name}: no {MANIFEST}"]
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    reasons = {"missing": "missing", "altered": "sha256 mismatch (altered or truncated)"}
    return [f"{path.name}/{name}: {reasons[kind]}" for name, kind in hash_mismatches(path, manifest)]


def committed_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first (marker present; hashes not checked here)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".staging")]
    return sorted((p for p in dirs if (p / COMMIT_MARKER).is_file()), key=lambda p: p.name)


def latest_good_checkpoint(root: Path) -> Path | None:
    """The newest committed checkpoint whose files all match its manifest."""
    for path in reversed(committed_checkpoints(root)):
        if not verify_checkpoint(path):
            return path
    return None


def load_sharded_model(path: Path):
    """A plain (unsharded) model from an FSDP checkpoint, in one process: for the reload gate and evaluation."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=path / "dcp", no_dist=True)  # rank 0 alone, even inside a process group
    set_model_state_dict(model, state["model"])
    return model


def load_checkpoint_model(path: Path, cfg: Config):
    """A checkpoint's model from its files, built the way training built it (fp32 load, the same attention,
    then bf16 for bf16-weights, buffers included), so that a reload on the same device is bit-exact."""
    import torch
    from transformers import AutoModelForCausalLM

    if (path / "dcp").is_dir():
        return load_sharded_model(path)
    if cfg.train.method == "lora":
        from peft import PeftModel

        from tracetune.models.sources import load_model, load_tokenizer

        base = load_model(cfg.model.source, load_tokenizer(cfg.model.source), cfg.seed, cfg.model.attn_implementation)
        model = PeftModel.from_pretrained(base, path / "model")
    else:
        from tracetune.models.sources import attention_kernel

        model = AutoModelForCausalLM.from_pretrained(
            path / "model", dtype=torch.float32, attn_implementation=attention_kernel(cfg.model.attn_implementation)
        )
    return model.to(torch.bfloat16) if cfg.train.precision == "bf16-weights" else model
