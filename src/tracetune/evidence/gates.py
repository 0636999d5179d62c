"""Quality gates computed from the run directory's files alone, so `tracetune verify` can recompute them.

Each gate: name, passed, status (pass | fail | skip), measured value, threshold, and the file it read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from tracetune.config import Config, load_config
from tracetune.data.traces import load_eval_items
from tracetune.eval.evaluate import BASELINE_DIRS
from tracetune.models.checkpoints import latest_good_checkpoint, load_sharded_model
from tracetune.runfiles import read_metrics, read_predictions, write_json


@dataclass
class Gate:
    name: str
    passed: bool
    value: object
    threshold: object
    source: str
    status: str = ""
    detail: str = ""

    def __post_init__(self):
        self.status = self.status or ("pass" if self.passed else "fail")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def gate_training_completed(name: str, run_dir: Path, cfg: Config) -> Gate:
    training = json.loads((run_dir / "training.json").read_text(encoding="utf-8"))
    train, _ = read_metrics(run_dir)
    last = train[-1]["step"] if train else 0
    return Gate(
        name,
        last == training["planned_steps"],
        last,
        training["planned_steps"],
        "metrics.jsonl, training.json",
    )


def gate_loss_decreased(name: str, run_dir: Path, cfg: Config) -> Gate:
    train, val = read_metrics(run_dir)
    k = max(1, len(train) // 10)
    first, last = _mean([r["loss"] for r in train[:k]]), _mean([r["loss"] for r in train[-k:]])
    value = {"first_10pct_loss": first, "last_10pct_loss": last}
    passed = len(train) >= 2 and first - last > cfg.gates.min_loss_drop
    if val:
        value.update(first_val_loss=val[0]["loss"], last_val_loss=val[-1]["loss"])
        passed = passed and len(val) >= 2 and val[-1]["loss"] < val[0]["loss"]
    threshold = f"first - last > {cfg.gates.min_loss_drop}" + ("; last val < first val" if val else "")
    return Gate(name, passed, value, threshold, "metrics.jsonl")


def gate_no_nan_or_inf(name: str, run_dir: Path, cfg: Config) -> Gate:
    train, val = read_metrics(run_dir)
    bad = [r["step"] for r in train + val for k in ("loss", "grad_norm") if k in r and not math.isfinite(r[k])]
    return Gate(name, not bad, len(bad), 0, "metrics.jsonl", detail=f"steps {bad[:10]}" if bad else "")


def _load_checkpoint_model(path: Path, cfg: Config):
    """A checkpoint's model from its files, built the way training built it (fp32 load, the same attention,
    then bf16 for bf16-weights, buffers included), so that a reload on the same device is bit-exact."""
    from transformers import AutoModelForCausalLM

    if (path / "dcp").is_dir():
        return load_sharded_model(path)
    if cfg.train.method == "lora":
        from peft import PeftModel

        from tracetune.models.sources import load_model, load_tokenizer

        base = load_model(cfg.model.source, load_tokenizer(cfg.model.source), cfg.seed, cfg.model.attn_implementation)
        model = PeftModel.from_pretrained(base, path / "model")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path / "model", dtype=torch.float32, attn_implementation=cfg.model.attn_implementation
        )
    return model.to(torch.bfloat16) if cfg.train.precision == "bf16-weights" else model


def gate_checkpoint_reloads(name: str, run_dir: Path, cfg: Config) -> Gate:
    from tracetune.models.probe import probe_difference, probe_outputs

    path = latest_good_checkpoint(run_dir / "checkpoints")
    if path is None:
        return Gate(
            name,
            False,
            None,
            f"max |diff| <= {cfg.gates.probe_atol}",
            "checkpoints/",
            detail="no committed, intact checkpoint",
        )
    expected = json.loads((path / "probe.json").read_text(encoding="utf-8"))
    recorded = expected.get("device", "cpu")
    device = recorded if recorded == "cpu" or (recorded == "cuda" and torch.cuda.is_available()) else "cpu"
    actual = probe_outputs(_load_checkpoint_model(path, cfg).to(device), expected["input_ids"])
    exact = device == recorded and expected.get("exact", True)
    diff = probe_difference(expected, actual, compare_argmax=exact)
    atol = cfg.gates.probe_atol if exact else cfg.gates.probe_cross_device_atol
    source = f"checkpoints/{path.name}/probe.json"
    detail = f"probe recorded on {recorded}, reloaded on {device}" + (
        "" if expected.get("exact", True) else " (inexact)"
    )
    return Gate(name, diff <= atol, diff, atol, source, detail=detail)


def gate_final_model_loads(name: str, run_dir: Path, cfg: Config) -> Gate:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run_dir / "final_model"
    try:
        AutoTokenizer.from_pretrained(final)
        model = AutoModelForCausalLM.from_pretrained(final)
        detail = f"{type(model).__name__}, {sum(p.numel() for p in model.parameters())} params"
        return Gate(name, True, True, True, "final_model/", detail=detail)
    except (OSError, ValueError) as exc:
        return Gate(name, False, False, True, "final_model/", detail=str(exc)[:300])


def gate_gpu_used(name: str, run_dir: Path, cfg: Config) -> Gate:
    env = json.loads((run_dir / "env.json").read_text(encoding="utf-8"))
    if cfg.train.device != "cuda":
        return Gate(
            name,
            True,
            env["device"],
            "cuda (only when asked)",
            "env.json",
            status="skip",
            detail=f"train.device is {cfg.train.device}",
        )
    train, _ = read_metrics(run_dir)
    on_gpu = env["device"] == "cuda" and all("cuda_allocated_mb" in r for r in train)
    return Gate(name, on_gpu, env.get("device_name"), "cuda", "env.json, metrics.jsonl")


def gate_eval_complete(name: str, run_dir: Path, cfg: Config, which: str) -> Gate:
    items = load_eval_items(cfg.eval.eval_file).records[: cfg.eval.max_items]
    done = {r["id"] for r in read_predictions(run_dir / "eval" / which / "predictions.jsonl")}
    missing = [i.id for i in items if i.id not in done]
    source = f"eval/{which}/predictions.jsonl"
    return Gate(
        name,
        not missing,
        len(items) - len(missing),
        len(items),
        source,
        detail=f"missing {missing[:5]}" if missing else "",
    )


COMPARISON_GATES = {"finetuned_beats_baseline": "accuracy", "finetuned_verified_beats_baseline": "verified accuracy"}


def gate_beats_baseline(name: str, run_dir: Path, cfg: Config) -> Gate:
    """The fine-tuned model against the strongest baseline (eval/comparison.json), on accuracy or on verified
    accuracy: the paired difference must be at least gates.min_accuracy_gain."""
    threshold = f"difference >= {cfg.gates.min_accuracy_gain}"
    if not cfg.eval.run_base:
        reason = "eval.run_base is false: no baseline was evaluated to compare with"
        return Gate(name, True, None, threshold, "config.yaml", status="skip", detail=reason)
    comparison = json.loads((run_dir / "eval" / "comparison.json").read_text(encoding="utf-8"))
    paired = comparison if COMPARISON_GATES[name] == "accuracy" else comparison["verified"]
    value = {
        "baseline": comparison["strongest_baseline"],
        "baseline_value": paired["base_accuracy"],
        "finetuned_value": paired["final_accuracy"],
        "difference": paired["difference"],
        "difference_ci95": paired["difference_ci95"],
    }
    detail = f"{COMPARISON_GATES[name]} against the {comparison['strongest_baseline'].replace('_', '-')} base model"
    passed = paired["difference"] >= cfg.gates.min_accuracy_gain
    return Gate(name, passed, value, threshold, "eval/comparison.json", detail=detail)


def expected_files(cfg: Config) -> list[str]:
    """Files every complete run directory holds when the gates are computed."""
    files = [
        "config.yaml",
        "run.json",
        "env.json",
        "env_snapshot.txt",
        "gpu_snapshot.txt",
        "logs/train.log",
        "metrics.jsonl",
        "training.json",
    ]
    files += ["final_model/config.json", "final_model/tokenizer_config.json", "final_model/generation_config.json"]
    if cfg.train.method == "lora":
        files += ["adapter/adapter_config.json"]
    if cfg.eval.eval_file is not None:
        files += ["logs/eval.log", "eval/final/predictions.jsonl", "eval/final/scores.json"]
        if cfg.eval.run_base:
            files += [
                f"eval/{BASELINE_DIRS[b]}/{f}" for b in cfg.eval.baselines for f in ("predictions.jsonl", "scores.json")
            ]
            files += ["eval/comparison.json"]
    return files


def gate_evidence_complete(name: str, run_dir: Path, cfg: Config) -> Gate:
    missing = [f for f in expected_files(cfg) if not (run_dir / f).is_file()]
    if not list((run_dir / "final_model").glob("*.safetensors")):
        missing.append("final_model/*.safetensors")
    return Gate(name, not missing, missing, [], "run directory", detail=", ".join(missing))


def gate_table(cfg: Config) -> list[tuple[str, Callable[[str, Path, Config], Gate]]]:
    """Every gate this run's config calls for, by name: the one place a gate is named."""
    table = [
        ("training_completed", gate_training_completed),
        ("loss_decreased", gate_loss_decreased),
        ("no_nan_or_inf", gate_no_nan_or_inf),
        ("checkpoint_reloads", gate_checkpoint_reloads),
        ("final_model_loads", gate_final_model_loads),
        ("gpu_used", gate_gpu_used),
    ]
    if cfg.eval.eval_file is not None:
        table.append(("eval_final_complete", partial(gate_eval_complete, which="final")))
        if cfg.eval.run_base:
            for baseline in cfg.eval.baselines:
                which = BASELINE_DIRS[baseline]
                table.append((f"eval_{which}_complete", partial(gate_eval_complete, which=which)))
        table += [(name, gate_beats_baseline) for name in COMPARISON_GATES]
    table.append(("evidence_complete", gate_evidence_complete))
    return table


def compute_gates(run_dir: Path) -> list[Gate]:
    """Every gate, from files; a gate whose inputs are missing fails rather than raising."""
    cfg = load_config(run_dir / "config.yaml")
    gates = []
    for name, check in gate_table(cfg):
        try:
            gates.append(check(name, run_dir, cfg))
        except (OSError, KeyError, ValueError, IndexError) as exc:
            gates.append(Gate(name, False, None, None, "", detail=f"could not compute: {type(exc).__name__}: {exc}"))
    return gates


def write_gates(run_dir: Path, gates: list[Gate]) -> dict:
    record = {"passed": all(g.passed for g in gates), "gates": [asdict(g) for g in gates]}
    write_json(run_dir / "gates.json", record)
    return record
