"""The stages a command strings together: validate inputs, prepare a run directory, train, evaluate.

Every check that needs no model runs first (`load_inputs`), so bad input fails before any weights load
and before a run directory exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tracetune.config import Config, dump_config
from tracetune.data.render import Example, tokenize_traces
from tracetune.data.traces import EvalItem, LoadReport, Trace, find_leakage, load_eval_items, load_traces, split_train_val
from tracetune.errors import DataError, RunDirError

log = logging.getLogger("tracetune")


@dataclass
class Inputs:
    train: list[Trace]
    val: list[Trace]
    eval_items: list[EvalItem] | None
    reports: list[LoadReport] = field(default_factory=list)


def load_inputs(cfg: Config) -> Inputs:
    """Read and validate the training data and eval set; raise DataError listing every problem."""
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
        report = tokenize_traces(tokenizer, traces, d.instruction, d.max_seq_length, d.overlength_policy, str(d.train_file))
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
        raise DataError([f"{d.train_file}: no training examples left after tokenization; fix: raise data.max_seq_length"])
    return splits[0], splits[1], counts


def new_run_dir(cfg: Config) -> Path:
    """Create the run directory; refuse one that already exists so nothing is overwritten."""
    name = cfg.output.run_name or datetime.now(UTC).strftime("run-%Y%m%dT%H%M%SZ")
    run_dir = cfg.output.root / name
    if run_dir.exists():
        raise RunDirError(f"run directory {run_dir} already exists; fix: choose another output.run_name")
    run_dir.mkdir(parents=True)
    (run_dir / "logs").mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return run_dir


def load_for_training(cfg: Config, inputs: Inputs):
    """Tokenizer, tokenized splits and model for a validated config."""
    from tracetune.models.sources import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.source, cfg.seed)
    train, val, counts = tokenize_inputs(cfg, inputs, tokenizer)
    model = load_model(cfg.model.source, tokenizer, cfg.seed, cfg.model.attn_implementation)
    return tokenizer, model, train, val, counts


def train_stage(cfg: Config, argv: list[str]) -> Path:
    """`tracetune train`: validate inputs, create the run directory, fine-tune, write final_model/."""
    import torch

    from tracetune.logs import log_to_file
    from tracetune.train.loop import fit, resolve_device

    inputs = load_inputs(cfg)
    resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    run_dir = new_run_dir(cfg)
    with log_to_file(run_dir / "logs" / "train.log"):
        tokenizer, model, train, val, _ = load_for_training(cfg, inputs)
        fit(cfg, run_dir, model, tokenizer, train, val)
    return run_dir
