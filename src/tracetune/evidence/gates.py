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

from tracetune.config import Config, load_config
from tracetune.data.traces import load_eval_items
from tracetune.eval.stats import difference_outcome
from tracetune.layout import (
    BASELINE_DIRS,
    CHECKPOINTS,
    CONFIG,
    ENV,
    METRICS,
    TRAINING,
    RunLayout,
    expected_files,
    final_model_path,
    read_json,
    read_metrics,
    read_predictions,
    stage_eval_dir,
    write_json,
)
from tracetune.models.checkpoints import latest_good_checkpoint


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
    files = RunLayout(run_dir)
    training = read_json(files.training)
    train, _ = read_metrics(run_dir)
    last = train[-1]["step"] if train else 0
    if training.get("stopped_early"):  # train.early_stopping_patience: done is where it stopped
        detail = f"stopped early at step {training['num_steps']} of {training['planned_steps']}"
        return Gate(name, training["num_steps"] <= training["planned_steps"], training["num_steps"],
                    training["planned_steps"], f"{METRICS}, {TRAINING}", detail=detail)  # fmt: skip
    return Gate(
        name,
        last == training["planned_steps"],
        last,
        training["planned_steps"],
        f"{METRICS}, {TRAINING}",
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
    return Gate(name, passed, value, threshold, METRICS)


def gate_no_nan_or_inf(name: str, run_dir: Path, cfg: Config) -> Gate:
    train, val = read_metrics(run_dir)
    bad = [r["step"] for r in train + val for k in ("loss", "grad_norm") if k in r and not math.isfinite(r[k])]
    return Gate(name, not bad, len(bad), 0, METRICS, detail=f"steps {bad[:10]}" if bad else "")


def gate_checkpoint_reloads(name: str, run_dir: Path, cfg: Config) -> Gate:
    import torch

    from tracetune.models.checkpoints import load_checkpoint_model
    from tracetune.models.probe import probe_difference, probe_outputs

    path = latest_good_checkpoint(RunLayout(run_dir).checkpoints)
    if path is None:
        return Gate(
            name,
            False,
            None,
            f"max |diff| <= {cfg.gates.probe_atol}",
            f"{CHECKPOINTS}/",
            detail="no committed, intact checkpoint",
        )
    expected = json.loads((path / "probe.json").read_text(encoding="utf-8"))
    recorded = expected.get("device", "cpu")
    device = recorded if recorded == "cpu" or (recorded == "cuda" and torch.cuda.is_available()) else "cpu"
    actual = probe_outputs(load_checkpoint_model(path, cfg).to(device), expected["input_ids"])
    exact = device == recorded and expected.get("exact", True)
    diff = probe_difference(expected, actual, compare_argmax=exact)
    atol = cfg.gates.probe_atol if exact else cfg.gates.probe_cross_device_atol
    source = f"{RunLayout(run_dir).relative(path)}/probe.json"
    detail = f"probe recorded on {recorded}, reloaded on {device}" + (
        "" if expected.get("exact", True) else " (inexact)"
    )
    return Gate(name, diff <= atol, diff, atol, source, detail=detail)


def gate_final_model_loads(name: str, run_dir: Path, cfg: Config) -> Gate:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = RunLayout(run_dir)
    final = files.model(cfg.stages)
    source = f"{files.relative(final)}/"
    try:
        AutoTokenizer.from_pretrained(final)
        model = AutoModelForCausalLM.from_pretrained(final)
        detail = f"{type(model).__name__}, {sum(p.numel() for p in model.parameters())} params"
        return Gate(name, True, True, True, source, detail=detail)
    except (OSError, ValueError) as exc:
        return Gate(name, False, False, True, source, detail=str(exc)[:300])


def stage_start_eval(cfg: Config, stage: str) -> str | None:
    """The eval/ directory holding the model a stage started from: the stage before's, or the base model
    zero-shot (model.source in the run's own format) for a first stage; None where none was evaluated."""
    index = cfg.stages.index(stage)
    if index:
        return cfg.stages[index - 1]
    return "base" if cfg.eval.run_base and "zero_shot" in cfg.eval.baselines else None


def gate_stage_completed(name: str, run_dir: Path, cfg: Config, stage: str) -> Gate:
    files = RunLayout(run_dir)
    training = read_json(files.stage(stage).training)
    done, planned = training["num_steps"], training["planned_steps"]
    unit = "rounds" if stage == "rft" else "steps"
    source = files.relative(files.stage(stage).training)
    return Gate(name, done == planned, done, planned, source, detail=f"{unit} done of planned")


def gate_stage_finite(name: str, run_dir: Path, cfg: Config, stage: str) -> Gate:
    stage_dir = RunLayout(run_dir).stage(stage)
    dirs = [stage_dir.path, *sorted(p.parent for p in stage_dir.path.glob(f"round-*/{METRICS}"))]
    rows = [r for path in dirs for r in read_metrics(path)[0]]
    bad = [r["step"] for r in rows for k in ("loss", "grad_norm") if k in r and not math.isfinite(r[k])]
    bad += [r["step"] for r in rows if r.get("finite") is False]
    return Gate(name, not bad, len(bad), 0, f"{stage}/**/{METRICS}", detail=f"steps {bad[:10]}" if bad else "")


def gate_stage_not_below_start(name: str, run_dir: Path, cfg: Config, stage: str) -> Gate:
    """Held-out verified accuracy after the stage minus where it started, paired over items: at least 0."""
    from tracetune.eval.scoring import compare_predictions

    start, end = stage_start_eval(cfg, stage), stage_eval_dir(cfg.stages, stage)
    if start is None:
        reason = "nothing evaluated where the stage started (first stage, and eval.run_base is false)"
        return Gate(name, True, None, "difference >= 0", CONFIG, status="skip", detail=reason)
    files = RunLayout(run_dir)
    paired = compare_predictions(files.eval(start).path, files.eval(end).path, cfg.seed, key="verified")
    value = {k: paired[k] for k in ("base_accuracy", "final_accuracy", "difference", "difference_ci95")}
    detail = f"verified accuracy, eval/{start} -> eval/{end}, {paired['num_paired_items']} paired items"
    source = f"{files.relative(files.eval(start).path)}, {files.relative(files.eval(end).path)}"
    return Gate(
        name,
        paired["num_paired_items"] > 0 and paired["difference"] >= 0,
        value,
        "difference >= 0",
        source,
        detail=detail,
    )


def gate_stage_truncation(name: str, run_dir: Path, cfg: Config, stage: str) -> Gate:
    end = stage_eval_dir(cfg.stages, stage)
    files = RunLayout(run_dir)
    scores = read_json(files.eval(end).scores)
    rate, limit = scores["format"]["truncation_rate"], cfg.gates.max_truncation_rate
    source = files.relative(files.eval(end).scores)
    return Gate(name, rate <= limit, rate, f"<= {limit}", source, detail="held-out completions cut off")


def gate_reward_agrees_with_heldout(name: str, run_dir: Path, cfg: Config) -> Gate:
    """A rising reward with a falling held-out verified accuracy fails: the policy learned the reward, not the task."""
    from tracetune.layout import read_jsonl

    files = RunLayout(run_dir)
    rows = read_jsonl(files.stage("grpo").metrics)
    steps = [r for r in rows if "reward" in r]
    held = [r for r in rows if r.get("split") == "heldout"]
    k = max(1, len(steps) // 4)
    reward_change = _mean([r["reward"]["mean"] for r in steps[-k:]]) - _mean([r["reward"]["mean"] for r in steps[:k]])
    heldout_change = held[-1]["verified_accuracy"] - held[0]["verified_accuracy"] if len(held) >= 2 else 0.0
    value = {"reward_change": reward_change, "heldout_verified_change": heldout_change}
    failed = reward_change > 0 and heldout_change < 0
    detail = (
        f"reward rose by {reward_change:.3f} while held-out verified accuracy fell by {-heldout_change:.3f}"
        if failed
        else "reward and held-out verified accuracy do not diverge"
    )
    source = files.relative(files.stage("grpo").metrics)
    return Gate(name, not failed, value, "not (reward up and held-out down)", source, detail=detail)


def gate_gpu_used(name: str, run_dir: Path, cfg: Config) -> Gate:
    env = read_json(RunLayout(run_dir).env)
    if cfg.train.device != "cuda":
        return Gate(
            name,
            True,
            env["device"],
            "cuda (only when asked)",
            ENV,
            status="skip",
            detail=f"train.device is {cfg.train.device}",
        )
    train, _ = read_metrics(run_dir)
    on_gpu = env["device"] == "cuda" and all("cuda_allocated_mb" in r for r in train)
    return Gate(name, on_gpu, env.get("device_name"), "cuda", f"{ENV}, {METRICS}")


def gate_eval_complete(name: str, run_dir: Path, cfg: Config, which: str) -> Gate:
    items = load_eval_items(cfg.eval.eval_file).records[: cfg.eval.max_items]
    files = RunLayout(run_dir)
    done = {r["id"] for r in read_predictions(files.eval(which).predictions)}
    missing = [i.id for i in items if i.id not in done]
    source = files.relative(files.eval(which).predictions)
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
    """The fine-tuned model against the strongest baseline (eval/comparison.json) on accuracy, or against the
    strongest that shows its work on verified accuracy: the paired difference's 95% interval must not lie
    wholly below gates.min_accuracy_gain ('worse'), nor hold it when gates.require_gain ('unclear')."""
    margin = cfg.gates.min_accuracy_gain
    wanted = "better" if cfg.gates.require_gain else "better or no detectable difference"
    threshold = f"95% CI of the difference against {margin}: {wanted}"
    if not cfg.eval.run_base:
        reason = "eval.run_base is false: no baseline was evaluated to compare with"
        return Gate(name, True, None, threshold, CONFIG, status="skip", detail=reason)
    files = RunLayout(run_dir)
    comparison = read_json(files.comparison)
    verified = COMPARISON_GATES[name] != "accuracy"
    paired = comparison["verified"] if verified else comparison
    baseline = (
        comparison.get("verified_baseline", comparison["strongest_baseline"])
        if verified
        else comparison["strongest_baseline"]
    )
    outcome = difference_outcome(*paired["difference_ci95"], margin)
    value = {
        "baseline": baseline,
        "outcome": outcome,
        "baseline_value": paired["base_accuracy"],
        "finetuned_value": paired["final_accuracy"],
        "difference": paired["difference"],
        "difference_ci95": paired["difference_ci95"],
    }
    detail = f"{COMPARISON_GATES[name]} against the {baseline.replace('_', '-')} base model: {outcome}"
    passed = outcome == "better" or (outcome == "unclear" and not cfg.gates.require_gain)
    return Gate(name, passed, value, threshold, files.relative(files.comparison), detail=detail)


def gate_gguf_export(name: str, run_dir: Path, cfg: Config) -> Gate:
    files = RunLayout(run_dir)
    check, source = read_json(files.gguf_check), files.relative(files.gguf_check)
    if "passed" not in check:
        return Gate(name, True, check["file"], check.get("gate"), source, status="skip",
                    detail="no eval set: the file was written but not evaluated")  # fmt: skip
    value = {k: check[k] for k in ("identical_answer_share", "accuracy_difference", "accuracy_difference_ci95")}
    detail = f"{check['file']} ({check['type']}) against {check.get('compared_with', 'the trained model')} on {check['num_items']} items"
    llama = check.get("llama_cpp", {})
    if llama.get("ran"):
        value["llama_cpp_identical_answer_share"] = llama["identical_answer_share"]
        detail += f"; under llama.cpp too ({llama['identical_prompt_tokens_share']:.0%} identical prompt tokens)"
    return Gate(name, check["passed"], value, check["gate"], source, detail=detail)


def gate_kept_what_base_knew(name: str, run_dir: Path, cfg: Config) -> Gate:
    """The run's model against the base model on the keep set, both prompted answer-only few-shot
    (eval/keep/comparison.json): fails when the paired change's 95% interval lies wholly below
    -gates.max_keep_drop, i.e. the model surely lost more than that of what the base model knew."""
    limit = cfg.gates.max_keep_drop
    threshold = f"95% CI upper end of the keep-set change >= -{limit}"
    files = RunLayout(run_dir)
    source = files.relative(files.keep_comparison)
    if cfg.eval.keep_file is None or not cfg.eval.run_base:
        why = "eval.keep_file is not set" if cfg.eval.keep_file is None else "eval.run_base is false"
        return Gate(name, True, None, threshold, CONFIG, status="skip", detail=f"{why}: no keep set was evaluated")
    keep = read_json(files.keep_comparison)
    paired = keep["answer_only"]
    low, high = paired["difference_ci95"]
    value = {
        "base_accuracy": paired["base_accuracy"],
        "final_accuracy": paired["final_accuracy"],
        "difference": paired["difference"],
        "difference_ci95": [low, high],
        "kept": keep["num_kept"],
        "base_correct": keep["num_base_correct"],
    }
    detail = f"kept {keep['num_kept']} of {keep['num_base_correct']} keep-set items the base model answered"
    return Gate(name, high >= -limit, value, threshold, source, detail=detail)


def gate_evidence_complete(name: str, run_dir: Path, cfg: Config) -> Gate:
    missing = [f for f in expected_files(cfg) if not (run_dir / f).is_file()]
    if not list(RunLayout(run_dir).model(cfg.stages).glob("*.safetensors")):
        missing.append(f"{final_model_path(cfg.stages)}/*.safetensors")
    return Gate(name, not missing, missing, [], "run directory", detail=", ".join(missing))


def gate_table(cfg: Config) -> list[tuple[str, Callable[[str, Path, Config], Gate]]]:
    """Every gate this run's config calls for, by name: the one place a gate is named."""
    table = []
    if "sft" in cfg.stages:
        table += [
            ("training_completed", gate_training_completed),
            ("loss_decreased", gate_loss_decreased),
            ("no_nan_or_inf", gate_no_nan_or_inf),
            ("checkpoint_reloads", gate_checkpoint_reloads),
        ]
    for stage in (s for s in cfg.stages if s != "sft"):
        table += [
            (f"{stage}_completed", partial(gate_stage_completed, stage=stage)),
            (f"{stage}_no_nan_or_inf", partial(gate_stage_finite, stage=stage)),
        ]
        if cfg.eval.eval_file is not None:
            table += [
                (f"{stage}_heldout_not_below_start", partial(gate_stage_not_below_start, stage=stage)),
                (f"{stage}_truncation_below_limit", partial(gate_stage_truncation, stage=stage)),
            ]
            if stage == "grpo":
                table.append(("grpo_reward_agrees_with_heldout", gate_reward_agrees_with_heldout))
    table += [("final_model_loads", gate_final_model_loads), ("gpu_used", gate_gpu_used)]
    if cfg.export.gguf:
        table.append(("gguf_export_matches", gate_gguf_export))
    if cfg.eval.eval_file is not None:
        table.append(("eval_final_complete", partial(gate_eval_complete, which="final")))
        if cfg.eval.run_base:
            for baseline in cfg.eval.baselines:
                which = BASELINE_DIRS[baseline]
                table.append((f"eval_{which}_complete", partial(gate_eval_complete, which=which)))
        table += [(name, gate_beats_baseline) for name in COMPARISON_GATES]
        table.append(("kept_what_base_knew", gate_kept_what_base_knew))
    table.append(("evidence_complete", gate_evidence_complete))
    return table


def compute_gates(run_dir: Path) -> list[Gate]:
    """Every gate, from files; a gate whose inputs are missing fails rather than raising."""
    cfg = load_config(RunLayout(run_dir).config)
    gates = []
    for name, check in gate_table(cfg):
        try:
            gates.append(check(name, run_dir, cfg))
        except (OSError, KeyError, ValueError, IndexError) as exc:
            gates.append(Gate(name, False, None, None, "", detail=f"could not compute: {type(exc).__name__}: {exc}"))
    return gates


def write_gates(run_dir: Path, gates: list[Gate]) -> dict:
    record = {"passed": all(g.passed for g in gates), "gates": [asdict(g) for g in gates]}
    write_json(RunLayout(run_dir).gates, record)
    return record
