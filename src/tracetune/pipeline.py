"""The stages a command strings together: validate inputs, prepare a run directory, train, evaluate.

Every check that needs no model runs first (`load_inputs`), so bad input fails before any weights load
and before a run directory exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tracetune.config import Config, dump_config, flatten
from tracetune.data.render import Example, tokenize_traces
from tracetune.data.traces import (
    EvalItem,
    LoadReport,
    Trace,
    find_leakage,
    load_eval_items,
    load_traces,
    split_train_val,
)
from tracetune.errors import ConfigError, DataError, RunDirError
from tracetune.runfiles import write_json

log = logging.getLogger("tracetune")


@dataclass
class Inputs:
    train: list[Trace]
    val: list[Trace]
    eval_items: list[EvalItem] | None
    reports: list[LoadReport] = field(default_factory=list)


def load_inputs(cfg: Config) -> Inputs:
    """Read and validate the training data and eval set; raise DataError listing every problem."""
    if cfg.data.train_file is None:
        raise ConfigError("config", ["data.train_file: training needs a file; fix: set data.train_file=PATH"])
    train_report = load_traces(cfg.data.train_file, cfg.data.format)
    reports, errors = [train_report], list(train_report.errors)
    eval_items = None
    if cfg.eval.eval_file is not None:
        eval_report = load_eval_items(cfg.eval.eval_file)
        reports.append(eval_report)
        errors += eval_report.errors
        eval_items = eval_report.records[: cfg.eval.max_items]
        errors += find_leakage(train_report.records, eval_report.records, str(cfg.eval.eval_file))
    if errors:
        raise DataError(errors)
    for report in reports:
        for note in report.notes:
            log.info("%s: %s", report.path, note)
        for warning in report.warnings:
            log.warning("%s", warning)
    traces = train_report.records[: cfg.data.max_train_records]
    train, val = split_train_val(traces, cfg.data.val_fraction, cfg.seed)
    return Inputs(train, val, eval_items, reports)


def tokenize_inputs(cfg: Config, inputs: Inputs, tokenizer) -> tuple[list[Example], list[Example], dict]:
    """Token ids and loss masks for the train and val splits, applying the over-length policy."""
    d = cfg.data
    counts = {}
    splits = []
    for name, traces in (("train", inputs.train), ("val", inputs.val)):
        report = tokenize_traces(
            tokenizer, traces, d.instruction, d.max_seq_length, d.overlength_policy, str(d.train_file)
        )
        if report.issues:
            raise DataError(report.issues)
        counts[name] = {
            "num_examples": len(report.examples),
            "num_overlength": report.num_overlength,
            "num_dropped": report.num_dropped,
            "num_truncated": report.num_truncated,
            "num_dropped_no_loss_tokens": report.num_no_loss_tokens,
        }
        if report.num_overlength or report.num_no_loss_tokens:
            log.warning("%s split: %s", name, counts[name])
        splits.append(report.examples)
    if not splits[0]:
        raise DataError(
            [f"{d.train_file}: no training examples left after tokenization; fix: raise data.max_seq_length"]
        )
    return splits[0], splits[1], counts


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
    import json

    from tracetune.config import load_config
    from tracetune.data.sources import describe as describe_source
    from tracetune.hashing import sha256_file

    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"nothing to resume: {run_dir} is not a run directory (no config.yaml)")
    # Where the run lives (output.*) may change, e.g. a moved directory; nothing else may, except the
    # accumulation when the world size changes (checked below as part of the global batch).
    saved_cfg = load_config(run_dir / "config.yaml")
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8")) if (run_dir / "run.json").is_file() else {}
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
    run_dir.mkdir(parents=True)
    (run_dir / "logs").mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return run_dir


def load_for_training(cfg: Config, inputs: Inputs):
    """Tokenizer, tokenized splits and model for a validated config."""
    from tracetune.models.sources import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.source)
    train, val, counts = tokenize_inputs(cfg, inputs, tokenizer)
    model = load_model(cfg.model.source, tokenizer, cfg.seed, cfg.model.attn_implementation)
    return tokenizer, model, train, val, counts


def prepare(cfg: Config):
    """Every check before a run directory exists: inputs, device, CPU threads; under torchrun, join the
    process group. Returns (inputs, this rank's device)."""
    import torch

    from tracetune import dist
    from tracetune.dist import resolve_device

    inputs = load_inputs(cfg)
    device = resolve_device(cfg.train.device)
    dist.init_from_env(cfg.train.device)
    device = dist.rank_device(device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    return inputs, device


def train_stage(cfg: Config) -> Path:
    """`tracetune train`: validate inputs, create the run directory, fine-tune, write final_model/."""
    from tracetune import dist

    inputs, _ = prepare(cfg)
    run_dir = _agreed_run_dir(cfg)
    with _main_lock(run_dir):
        dist.on_main(lambda: new_run_dir(cfg))
        _train_stages(cfg, inputs, run_dir, resume=False)
    return run_dir


def _agreed_run_dir(cfg: Config) -> Path:
    """The run directory, named by rank 0 (a timestamped name must not differ between ranks)."""
    from tracetune import dist

    cfg.output.run_name = dist.broadcast_from_main(run_dir_of(cfg).name)
    return run_dir_of(cfg)


def _main_lock(run_dir: Path):
    """The run lock, held by rank 0 (the one process that writes the run directory)."""
    from tracetune import dist

    return run_lock(run_dir) if dist.current().is_main else contextlib.nullcontext()


def _load_for_eval(cfg: Config, model_source: str):
    """(tokenizer, model) of a source or directory, on this rank's device in the evaluation's precision."""
    import torch

    from tracetune import dist
    from tracetune.dist import resolve_device
    from tracetune.models.sources import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_source)
    model = load_model(model_source, tokenizer, cfg.seed, cfg.model.attn_implementation)
    model.to(dist.rank_device(resolve_device(cfg.train.device)))
    if cfg.eval.precision == "bf16":
        model.to(torch.bfloat16)
    return tokenizer, model


def evaluate_model(
    cfg: Config,
    model_source: str,
    items: list[EvalItem],
    out_dir: Path,
    demonstrations: list[Trace] | None = None,
    loaded: tuple | None = None,
) -> dict:
    """Generate predictions for `items` with a model (source string or directory; `loaded` when its (tokenizer,
    model) are already in memory), write scores.json. With `demonstrations` (training traces), evaluate it
    few-shot (eval/baselines.py)."""
    from tracetune import dist
    from tracetune.eval.baselines import build_few_shot
    from tracetune.eval.evaluate import generate_predictions, write_scores
    from tracetune.models.sources import is_chat_model

    tokenizer, model = loaded or _load_for_eval(cfg, model_source)
    few_shot = None
    if demonstrations is not None:
        fmt = cfg.eval.few_shot_format
        if fmt == "auto":
            fmt = "chat" if is_chat_model(model_source) else "plain"
        few_shot = build_few_shot(
            tokenizer, demonstrations, items, cfg.eval.num_shots, cfg.seed, cfg.data.instruction, fmt
        )
    generate_predictions(model, tokenizer, items, cfg.eval, cfg.data.instruction, out_dir, cfg.seed, few_shot)
    return dist.on_main(lambda: write_scores(out_dir, items, model_source))


def evaluate_baselines(cfg: Config, inputs: Inputs, eval_dir: Path) -> None:
    """The base model, loaded once, under every configured baseline: zero-shot into eval/base, few-shot into
    eval/few_shot."""
    from tracetune.runfiles import BASELINE_DIRS

    loaded = _load_for_eval(cfg, cfg.model.source)
    for name in cfg.eval.baselines:
        log.info("evaluating the base model %s (%s)", cfg.model.source, name.replace("_", "-"))
        demonstrations = inputs.train if name == "few_shot" else None
        out_dir = eval_dir / BASELINE_DIRS[name]
        evaluate_model(cfg, cfg.model.source, inputs.eval_items, out_dir, demonstrations, loaded)


def eval_stage(cfg: Config, model_source: str, out_dir: Path | None, baseline: str = "zero_shot") -> Path:
    """`tracetune eval`: score one model on the eval set into out_dir (resumable: done ids are skipped); few-shot
    draws its demonstrations from data.train_file."""
    from tracetune import dist
    from tracetune.config import dump_config
    from tracetune.data.traces import load_eval_items
    from tracetune.logs import log_to_file

    report = load_eval_items(cfg.eval.eval_file)
    report.raise_on_errors()
    items = report.records[: cfg.eval.max_items]
    dist.init_from_env(cfg.train.device)
    out_dir = out_dir or cfg.output.root / dist.broadcast_from_main(datetime.now(UTC).strftime("eval-%Y%m%dT%H%M%SZ"))
    if dist.current().is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    demonstrations = None
    if baseline == "few_shot":
        train = load_traces(cfg.data.train_file, cfg.data.format)
        train.raise_on_errors()
        demonstrations = train.records
    with log_to_file(out_dir / "logs" / "eval.log"):
        evaluate_model(cfg, model_source, items, out_dir, demonstrations)
    return out_dir


def _git_state() -> dict:
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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _train_or_resume(cfg: Config, inputs: Inputs, run_dir: Path, resume: bool):
    """Train, or continue from the newest intact checkpoint; a finished training (training.json) is kept."""
    import gc
    import json

    from tracetune import dist
    from tracetune.logs import log_to_file
    from tracetune.models.checkpoints import latest_good_checkpoint
    from tracetune.train.loop import fit

    if resume and (run_dir / "training.json").is_file():
        log.info("training already finished in %s", run_dir)
        return run_dir / "final_model"
    checkpoint = latest_good_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and checkpoint is None and dist.current().is_main:  # nothing committed: start over
        for name in ("metrics.jsonl", "example_ids.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    with log_to_file(run_dir / "logs" / "train.log"):
        tokenizer, model, train, val, counts = load_for_training(cfg, inputs)
        log.info("tokenized: %s", json.dumps(counts))
        result = fit(cfg, run_dir, model, tokenizer, train, val, resume_from=checkpoint)
    del model
    gc.collect()
    return result.final_model_dir


def stage_eval_dir(cfg: Config, stage: str) -> str:
    """Where a stage's model is evaluated: the last stage's is the run's final model (eval/final)."""
    return "final" if stage == cfg.stages[-1] else stage


def _rl_stage(cfg: Config, inputs: Inputs, run_dir: Path, stage: str, start: str, resume: bool) -> Path:
    """An RFT or GRPO stage in run_dir/<stage>/, from the model in `start`; a finished one (its
    training.json) is kept."""
    from tracetune.logs import log_to_file
    from tracetune.models.checkpoints import latest_good_checkpoint
    from tracetune.models.sources import load_model, load_tokenizer

    stage_dir = run_dir / stage
    if resume and (stage_dir / "training.json").is_file():
        log.info("stage %s already finished in %s", stage, stage_dir)
        return stage_dir / "final_model"
    stage_dir.mkdir(exist_ok=True)
    with log_to_file(run_dir / "logs" / f"{stage}.log"):
        log.info("stage %s from %s", stage, start)
        tokenizer = load_tokenizer(start)
        if stage == "rft":
            from tracetune.rl.rft import fit_rft

            _, val, _ = tokenize_inputs(cfg, inputs, tokenizer)
            return fit_rft(cfg, stage_dir, start, tokenizer, inputs.train, val, inputs.eval_items, resume)
        from tracetune.rl.grpo import fit_grpo

        model = load_model(start, tokenizer, cfg.seed, cfg.model.attn_implementation)
        checkpoint = latest_good_checkpoint(stage_dir / "checkpoints") if resume else None
        return fit_grpo(cfg, stage_dir, model, tokenizer, inputs.train, inputs.eval_items, checkpoint)


def _train_stages(cfg: Config, inputs: Inputs, run_dir: Path, resume: bool) -> Path:
    """Every stage in order, each from the model the one before made (the first from model.source); every
    stage but the last is evaluated into eval/<stage> (the start the next stage's gate compares with).
    Returns the last stage's model directory; stages.json says where each stage's model is."""
    from tracetune import dist
    from tracetune.logs import log_to_file

    model_dir, record = cfg.model.source, []
    for stage in cfg.stages:
        if stage == "sft":
            model_dir = _train_or_resume(cfg, inputs, run_dir, resume)
        else:
            model_dir = _rl_stage(cfg, inputs, run_dir, stage, str(model_dir), resume)
        if inputs.eval_items is not None and stage != cfg.stages[-1]:
            with log_to_file(run_dir / "logs" / "eval.log"):
                log.info("evaluating the %s stage's model %s", stage, model_dir)
                evaluate_model(cfg, str(model_dir), inputs.eval_items, run_dir / "eval" / stage)
        where = {"model": str(Path(model_dir).relative_to(run_dir)), "eval": f"eval/{stage_eval_dir(cfg, stage)}"}
        record.append({"stage": stage, **where})
    if cfg.stages != ["sft"]:
        dist.on_main(lambda: write_json(run_dir / "stages.json", record))
    return Path(model_dir)


def _open_run(cfg: Config, run_dir: Path, argv: list[str], resume: bool, device, topology: dict) -> dict:
    """Rank 0: create (or reopen, on resume) the run directory and its records; returns run.json's record."""
    import tracetune
    from tracetune.data.sources import describe as describe_source
    from tracetune.data.sources import is_hub
    from tracetune.evidence.env import write_env, write_gpu_snapshot
    from tracetune.hashing import sha256_file
    from tracetune.runfiles import read_json

    if resume:
        check_resumable(run_dir, cfg, topology["world_size"])
        record = read_json(run_dir / "run.json")
        record.setdefault("resumed_at", []).append(_now())
        record.update(status="running", ended_at=None)
        record.pop("error", None)
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")  # accumulation may differ
    else:
        new_run_dir(cfg)
        data = [cfg.data.train_file] + ([cfg.eval.eval_file] if cfg.eval.eval_file else [])
        record = {
            "run_id": run_dir.name,
            "argv": argv,
            "started_at": _now(),
            "ended_at": None,
            "status": "running",
            "seed": cfg.seed,
            "tracetune_version": tracetune.__version__,
            "git": _git_state(),
            "data_sha256": {str(p): sha256_file(p) for p in data if not is_hub(p)},
        }
        if any(is_hub(p) for p in data):  # a Hub dataset has no file to hash: its name, fingerprint, rows
            record["datasets"] = {str(p): describe_source(p) for p in data if is_hub(p)}
    record.update(topology)
    write_json(run_dir / "run.json", record)
    if not (run_dir / "env.json").is_file():
        write_env(run_dir, device.type)
    write_gpu_snapshot(run_dir, device.type, "start")
    return record


def gguf_check(final_rows: list[dict], gguf_rows: list[dict], kind: str, paired: dict) -> dict:
    """How the exported file answers against the trained model, item by item, and the gate: f16 and bf16
    must give at least 98% identical extracted answers; q8_0's accuracy difference must be within its own
    paired interval of zero."""
    final = {r["id"]: r for r in final_rows}
    shared = [r for r in gguf_rows if r["id"] in final]
    same_answer = sum(r["extracted_answer"] == final[r["id"]]["extracted_answer"] for r in shared)
    same_text = sum(r["completion"] == final[r["id"]]["completion"] for r in shared)
    low, high = paired["difference_ci95"]
    result = {
        "num_items": len(shared),
        "identical_answer_share": same_answer / max(len(shared), 1),
        "identical_completion_share": same_text / max(len(shared), 1),
        "accuracy_final_model": paired["base_accuracy"],
        "accuracy_gguf": paired["final_accuracy"],
        "accuracy_difference": paired["difference"],
        "accuracy_difference_ci95": [low, high],
    }
    if kind in ("f16", "bf16"):
        result |= {"gate": "identical_answer_share >= 0.98", "passed": result["identical_answer_share"] >= 0.98}
    else:
        result |= {"gate": "0 within the accuracy difference's 95% CI", "passed": low <= 0 <= high}
    return result


def export_stage(run_dir: Path, kind: str) -> dict:
    """export/model-<kind>.gguf and its Ollama Modelfile from the run's final model, then the file loaded back
    (its own tokenizer and chat template) and evaluated on the run's eval set (export/eval/) against
    eval/final: export/gguf_check.json. Returns the check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetune.config import load_config
    from tracetune.data.traces import load_eval_items
    from tracetune.eval.evaluate import compare_predictions, generate_predictions, write_scores
    from tracetune.evidence.card import final_model_dir
    from tracetune.models.export import export_gguf, ollama_modelfile, source_gguf
    from tracetune.runfiles import read_predictions

    cfg = load_config(run_dir / "config.yaml")
    out_dir = run_dir / "export"
    name = f"model-{kind}.gguf"
    log.info("exporting %s to %s", final_model_dir(run_dir), out_dir / name)
    info = export_gguf(final_model_dir(run_dir), source_gguf(cfg.model.source), out_dir / name, kind)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, gguf_file=name)
    (out_dir / "Modelfile").write_text(ollama_modelfile(name, tokenizer.chat_template), encoding="utf-8")
    check = dict(info)
    if cfg.eval.eval_file is not None and (run_dir / "eval" / "final" / "predictions.jsonl").is_file():
        model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=name, dtype=torch.float32)
        if cfg.eval.precision == "bf16":
            model.to(torch.bfloat16)
        items = load_eval_items(cfg.eval.eval_file).records[: cfg.eval.max_items]
        generate_predictions(model, tokenizer, items, cfg.eval, cfg.data.instruction, out_dir / "eval", cfg.seed)
        write_scores(out_dir / "eval", items, name)
        paired = compare_predictions(run_dir / "eval" / "final", out_dir / "eval", cfg.seed)
        final_rows = read_predictions(run_dir / "eval" / "final" / "predictions.jsonl")
        check |= gguf_check(final_rows, read_predictions(out_dir / "eval" / "predictions.jsonl"), kind, paired)
    write_json(out_dir / "gguf_check.json", check)
    return check


def _final_numbers(run_dir: Path, gates: dict) -> dict[str, float]:
    """What the trackers get at the end: the final and strongest-baseline accuracies, the gates."""
    from tracetune.runfiles import read_json

    final, comparison = (
        read_json(run_dir / "eval" / "final" / "scores.json"),
        read_json(run_dir / "eval" / "comparison.json"),
    )
    numbers = {"gates_passed": float(gates["passed"])}
    if final:
        numbers |= {"accuracy": final["accuracy"], "verified_accuracy": final["verified_accuracy"]}
    if comparison:
        numbers |= {"baseline_accuracy": comparison["base_accuracy"], "difference": comparison["difference"]}
    return numbers


def _close_run(run_dir: Path, record: dict) -> dict:
    """Rank 0: gates, run.json's final status, report, model card, and the manifest (written last)."""
    from tracetune import tracking
    from tracetune.evidence.card import write_card
    from tracetune.evidence.gates import compute_gates, write_gates
    from tracetune.evidence.manifest import write_manifest
    from tracetune.evidence.report import write_report

    gates = write_gates(run_dir, compute_gates(run_dir))
    tracking.finish(_final_numbers(run_dir, gates))
    record.update(status="completed" if gates["passed"] else "gates_failed", ended_at=_now())
    write_json(run_dir / "run.json", record)
    write_report(run_dir)
    write_card(run_dir)
    write_manifest(run_dir)
    return gates


def run_stage(cfg: Config, argv: list[str], resume: bool = False) -> tuple[Path, dict]:
    """`tracetune run`: baselines, train, final eval, comparison, gates, report, manifest. Returns (run_dir,
    gates record). With `resume`, continue the run directory the config names: finished items and steps are kept.
    """
    from tracetune import dist, tracking
    from tracetune.eval.evaluate import compare_with_baselines
    from tracetune.evidence.env import write_gpu_snapshot
    from tracetune.faults import STOP, Interrupted
    from tracetune.logs import log_to_file

    inputs, device = prepare(cfg)
    d = dist.current()
    run_dir = _agreed_run_dir(cfg)
    topology = dist.describe(device)
    evaluate = inputs.eval_items is not None
    with _main_lock(run_dir), STOP:
        record = dist.on_main(lambda: _open_run(cfg, run_dir, argv, resume, device, topology))
        if d.is_main:
            tracking.start(cfg.output.report_to, run_dir, cfg.model_dump(mode="json"))
        try:
            if evaluate and cfg.eval.run_base:
                with log_to_file(run_dir / "logs" / "eval.log"):
                    evaluate_baselines(cfg, inputs, run_dir / "eval")
            final_model = _train_stages(cfg, inputs, run_dir, resume)
            if evaluate:
                with log_to_file(run_dir / "logs" / "eval.log"):
                    log.info("evaluating the fine-tuned model %s", final_model)
                    evaluate_model(cfg, str(final_model), inputs.eval_items, run_dir / "eval" / "final")
            if d.is_main:
                if evaluate and cfg.eval.run_base:
                    write_json(run_dir / "eval" / "comparison.json", compare_with_baselines(run_dir / "eval", cfg.seed))
                if cfg.export.gguf:
                    with log_to_file(run_dir / "logs" / "export.log"):
                        export_stage(run_dir, cfg.export.gguf)
                write_gpu_snapshot(run_dir, device.type, "end")
        except BaseException as exc:
            if d.is_main:
                tracking.finish({})
                status = "interrupted" if isinstance(exc, Interrupted | KeyboardInterrupt) else "failed"
                record.update(status=status, ended_at=_now(), error=f"{type(exc).__name__}: {exc}")
                write_json(run_dir / "run.json", record)
            raise
        gates = dist.on_main(lambda: _close_run(run_dir, record))
    return run_dir, gates
