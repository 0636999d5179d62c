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
from tracetune.data.traces import (
    EvalItem,
    LoadReport,
    Trace,
    find_leakage,
    load_eval_items,
    load_traces,
    split_train_val,
)
from tracetune.errors import ConfigError, DataError, Issue
from tracetune.layout import KEEP_DIRS, EvalDir, RunLayout, keep_model_dirs, stage_eval_dir, write_json
from tracetune.lifecycle import (
    close_run,
    end_training,
    new_run_dir,  # noqa: F401  bench/ab_commits.py runs earlier commits' workers, which import it here
    run_dir_of,
    run_life,
)

log = logging.getLogger("tracetune")


@dataclass
class Inputs:
    train: list[Trace]
    val: list[Trace]
    eval_items: list[EvalItem] | None
    reports: list[LoadReport] = field(default_factory=list)
    keep: Keep | None = None


@dataclass
class Keep:
    """The keep set: its question/answer demonstrations, the items the report scores and, with
    train.val_accuracy, the monitor half that training-time points score (so the reported keep score was
    never used to choose a checkpoint)."""

    demonstrations: list[Trace]
    items: list[EvalItem]
    monitor: list[EvalItem] = field(default_factory=list)

    def split_monitor(self) -> Keep:
        """Every other item moves to the monitor half; the report keeps the rest."""
        return Keep(self.demonstrations, self.items[0::2], self.items[1::2])


def load_keep(path, num_shots: int) -> tuple[Keep | None, LoadReport]:
    """The keep set in `path`: its first `num_shots` records are the demonstrations, the rest are scored."""
    report = load_eval_items(path)
    if not report.errors and len(report.records) <= num_shots:
        problem = f"a keep set needs more than eval.num_shots ({num_shots}) records"
        report.issues.append(Issue(str(path), 0, "records", problem, "add items, or set eval.keep_file=null"))
    if report.errors:
        return None, report
    demos = [Trace(i.id, i.prompt, (), i.expected_answer) for i in report.records[:num_shots]]
    return Keep(demos, report.records[num_shots:]), report


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
    keep = None
    if cfg.eval.keep_file is not None:
        keep, keep_report = load_keep(cfg.eval.keep_file, cfg.eval.num_shots)
        reports.append(keep_report)
        errors += keep_report.errors
        if keep is not None and cfg.train.val_accuracy:
            keep = keep.split_monitor()
    if errors:
        raise DataError(errors)
    for report in reports:
        for note in report.notes:
            log.info("%s: %s", report.path, note)
        for warning in report.warnings:
            log.warning("%s", warning)
    traces = train_report.records[: cfg.data.max_train_records]
    train, val = split_train_val(traces, cfg.data.val_fraction, cfg.seed)
    return Inputs(train, val, eval_items, reports, keep)


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
    precisions = {"train.precision": cfg.train.precision, "eval.precision": cfg.eval.precision}
    if warning := dist.emulated_bf16(device, precisions):
        log.warning(warning)
    return inputs, device


def train_stage(cfg: Config, argv: list[str], prune=None) -> Path:
    """`tracetune train`: validate inputs, create the run directory (run.json, env.json, the trackers), fine-tune,
    write final_model/; no evaluation, no gates. `prune` (a search's trial) goes to the SFT loop (train/loop.fit)."""
    from tracetune import dist
    from tracetune.faults import STOP

    inputs, device = prepare(cfg)
    run_dir = _agreed_run_dir(cfg)
    with run_life(cfg, run_dir, argv, False, device, dist.describe(device)) as record, STOP:
        _train_stages(cfg, inputs, run_dir, resume=False, prune=prune)
        dist.on_main(lambda: end_training(run_dir, record))
    return run_dir


def _agreed_run_dir(cfg: Config) -> Path:
    """The run directory, named by rank 0 (a timestamped name must not differ between ranks)."""
    from tracetune import dist

    cfg.output.run_name = dist.broadcast_from_main(run_dir_of(cfg).name)
    return run_dir_of(cfg)


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
    baseline: str = "few_shot",
    draw: int = 0,
) -> dict:
    """Generate predictions for `items` with a model (source string or directory; `loaded` when its (tokenizer,
    model) are already in memory), write scores.json. With `demonstrations` (training traces), evaluate it
    few-shot, worked or answer-only as `baseline` says, the demonstrations of draw `draw` (seed + draw)
    (eval/baselines.py)."""
    from tracetune import dist
    from tracetune.eval.baselines import build_few_shot
    from tracetune.eval.evaluate import generate_predictions
    from tracetune.eval.scoring import write_scores

    tokenizer, model = loaded or _load_for_eval(cfg, model_source)
    few_shot = None
    if demonstrations is not None:
        fmt = _few_shot_format(cfg, model_source)
        few_shot = build_few_shot(
            tokenizer, demonstrations, items, cfg.eval.num_shots, cfg.seed + draw, cfg.data.instruction, fmt, baseline
        )
    generate_predictions(model, tokenizer, items, cfg.eval, cfg.data.instruction, out_dir, cfg.seed, few_shot)
    return dist.on_main(lambda: write_scores(out_dir, items, model_source))


def evaluate_baselines(cfg: Config, inputs: Inputs, eval_dir: Path) -> None:
    """The base model, loaded once, under every configured baseline: zero-shot into eval/base, few-shot into
    eval/few_shot and eval/few_shot_answer (each eval.baseline_draws times, layout.draw_dir)."""
    from tracetune.layout import BASELINE_DIRS, draw_dir

    loaded = _load_for_eval(cfg, cfg.model.source)
    if inputs.keep is not None:
        evaluate_keep(cfg, cfg.model.source, inputs.keep, eval_dir.parent, ("base",), loaded)
    for name in cfg.eval.baselines:
        demonstrations = None if name == "zero_shot" else inputs.train
        for draw in range(1 if demonstrations is None else cfg.eval.baseline_draws):
            log.info("evaluating the base model %s (%s, draw %d)", cfg.model.source, name.replace("_", "-"), draw + 1)
            out_dir = draw_dir(eval_dir / BASELINE_DIRS[name], draw)
            evaluate_model(cfg, cfg.model.source, inputs.eval_items, out_dir, demonstrations, loaded, name, draw)


def _few_shot_format(cfg: Config, model_source: str) -> str:
    """eval.few_shot_format, `auto` resolved: chat where `model_source` was chat-trained, else plain."""
    from tracetune.models.sources import is_chat_model

    if cfg.eval.few_shot_format != "auto":
        return cfg.eval.few_shot_format
    return "chat" if is_chat_model(model_source) else "plain"


KEEP_ANSWER_TOKENS = 32  # an answer-only completion is one line


def _keep_eval_config(cfg: Config, answer_only: bool):
    """The eval settings of a keep-set evaluation: greedy, in the base model's few-shot format, and (answer-only)
    as long as one answer line."""
    fmt = _few_shot_format(cfg, cfg.model.source)
    greedy = cfg.eval.model_copy(update={"do_sample": False, "num_samples": 1, "few_shot_format": fmt})
    if not answer_only:
        return greedy
    return greedy.model_copy(update={"max_new_tokens": min(greedy.max_new_tokens, KEEP_ANSWER_TOKENS)})


def _keep_prompt(cfg: Config, tokenizer, keep: Keep, items: list[EvalItem]):
    """(few-shot prompt, eval settings) that ask `items` as the base model is asked the keep set: its own
    question/answer demonstrations, answer-only."""
    from tracetune.eval.baselines import build_few_shot

    settings = _keep_eval_config(cfg, answer_only=True)
    few_shot = build_few_shot(
        tokenizer, keep.demonstrations, items, cfg.eval.num_shots, cfg.seed, cfg.data.instruction,
        settings.few_shot_format, "few_shot_answer",
    )  # fmt: skip
    return few_shot, settings


def evaluate_keep(
    cfg: Config,
    model_source: str,
    keep: Keep,
    run_dir: Path,
    which: tuple[str, ...],
    loaded,
    dirs: dict[str, str] = KEEP_DIRS,
) -> None:
    """The keep set's report items (greedy) under each of `which` into run_dir/KEEP_DIR/dirs[which]: `base` and
    `answer_only` prompt the model with the keep set's own question/answer demonstrations in the base model's
    format (the same prompt for both), `trained_format` asks in the run's format."""
    for name in which:
        out_dir = RunLayout(run_dir).keep(dirs[name]).path
        log.info("evaluating %s on the keep set (%s)", model_source, name.replace("_", " "))
        answer_only = name != "trained_format"
        keep_cfg = cfg.model_copy(update={"eval": _keep_eval_config(cfg, answer_only)})
        demos = keep.demonstrations if answer_only else None
        evaluate_model(keep_cfg, model_source, keep.items, out_dir, demos, loaded, "few_shot_answer")


def eval_stage(cfg: Config, model_source: str, out_dir: Path | None, baseline: str = "zero_shot") -> Path:
    """`tracetune eval`: score one model on the eval set into out_dir (resumable: done ids are skipped); few-shot
    draws its demonstrations from data.train_file."""
    from tracetune import dist
    from tracetune.data.traces import load_eval_items
    from tracetune.logs import log_to_file

    report = load_eval_items(cfg.eval.eval_file)
    report.raise_on_errors()
    items = report.records[: cfg.eval.max_items]
    dist.init_from_env(cfg.train.device)
    out_dir = out_dir or cfg.output.root / dist.broadcast_from_main(datetime.now(UTC).strftime("eval-%Y%m%dT%H%M%SZ"))
    if dist.current().is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        EvalDir(out_dir).config.write_text(dump_config(cfg), encoding="utf-8")
    demonstrations = None
    if baseline != "zero_shot":
        train = load_traces(cfg.data.train_file, cfg.data.format)
        train.raise_on_errors()
        demonstrations = train.records
    with log_to_file(EvalDir(out_dir).logs / "eval.log"):
        device = dist.resolve_device(cfg.train.device)
        if warning := dist.emulated_bf16(device, {"eval.precision": cfg.eval.precision}):
            log.warning(warning)
        evaluate_model(cfg, model_source, items, out_dir, demonstrations, baseline=baseline)
    return out_dir


def _train_or_resume(cfg: Config, inputs: Inputs, run_dir: Path, resume: bool, prune=None):
    """Train, or continue from the newest intact checkpoint; a finished training (training.json) is kept."""
    import gc
    import json

    from tracetune import dist
    from tracetune.logs import log_to_file
    from tracetune.models.checkpoints import latest_good_checkpoint
    from tracetune.train.loop import fit

    files = RunLayout(run_dir)
    if resume and files.training.is_file():
        log.info("training already finished in %s", run_dir)
        return files.final_model
    checkpoint = latest_good_checkpoint(files.checkpoints) if resume else None
    if resume and checkpoint is None and dist.current().is_main:  # nothing committed: start over
        for path in (files.metrics, files.example_ids):
            path.unlink(missing_ok=True)
    with log_to_file(files.log("train")):
        tokenizer, model, train, val, counts = load_for_training(cfg, inputs)
        log.info("tokenized: %s", json.dumps(counts))
        answers = _answer_accuracy(cfg, inputs, run_dir, tokenizer) if cfg.train.val_accuracy else None
        result = fit(cfg, run_dir, model, tokenizer, train, val, checkpoint, answers, prune)
    del model
    gc.collect()
    return result.final_model_dir


def heldout_items(cfg: Config, inputs: Inputs):
    """What training-time accuracy points score: the validation split of the training traces (at most
    train.val_accuracy_items), never the eval set, which is scored once per stage for the report."""
    from tracetune.rl.rollout import as_item

    return [as_item(t) for t in inputs.val[: cfg.train.val_accuracy_items]] or None


def _answer_accuracy(cfg: Config, inputs: Inputs, run_dir: Path, tokenizer):
    """answers(model, step): the model being trained answers the validation split's prompts (greedy, the
    evaluation's code, RUN/heldout/step-N/) and is scored; with a keep set, it also answers the keep set's
    monitor half prompted as the base model is (RUN/heldout/step-N/keep/, `keep_accuracy`). Its figures."""
    from tracetune.eval.evaluate import heldout_accuracy

    items, greedy = heldout_items(cfg, inputs), cfg.eval.model_copy(update={"do_sample": False, "num_samples": 1})
    keep = inputs.keep if inputs.keep is not None and inputs.keep.monitor else None
    few_shot, keep_cfg = _keep_prompt(cfg, tokenizer, keep, keep.monitor) if keep is not None else (None, None)

    def answers(model, step: int) -> dict:
        model.eval()
        out = RunLayout(run_dir).heldout(step).path
        scored = heldout_accuracy(model, tokenizer, items, greedy, cfg.data.instruction, out, cfg.seed)
        if keep is not None:
            on_keep = heldout_accuracy(
                model, tokenizer, keep.monitor, keep_cfg, cfg.data.instruction, out / "keep", cfg.seed, few_shot
            )
            scored |= {"keep_accuracy": on_keep["accuracy"], "keep_num_items": on_keep["num_items"]}
        model.train()
        return scored

    return answers


def _rl_stage(cfg: Config, inputs: Inputs, run_dir: Path, stage: str, start: str, resume: bool) -> Path:
    """An RFT or GRPO stage in run_dir/<stage>/, from the model in `start`; a finished one (its
    training.json) is kept."""
    from tracetune.logs import log_to_file
    from tracetune.models.checkpoints import latest_good_checkpoint
    from tracetune.models.sources import load_model, load_tokenizer

    files = RunLayout(run_dir)
    stage_dir = files.stage(stage).path
    if resume and files.stage(stage).training.is_file():
        log.info("stage %s already finished in %s", stage, stage_dir)
        return files.stage(stage).final_model
    stage_dir.mkdir(exist_ok=True)
    with log_to_file(files.log(stage)):
        log.info("stage %s from %s", stage, start)
        tokenizer = load_tokenizer(start)
        if stage == "rft":
            from tracetune.rl.rft import fit_rft

            _, val, _ = tokenize_inputs(cfg, inputs, tokenizer)
            return fit_rft(cfg, stage_dir, start, tokenizer, inputs.train, val, heldout_items(cfg, inputs), resume)
        from tracetune.rl.grpo import fit_grpo

        model = load_model(start, tokenizer, cfg.seed, cfg.model.attn_implementation)
        checkpoint = latest_good_checkpoint(files.stage(stage).checkpoints) if resume else None
        return fit_grpo(cfg, stage_dir, model, tokenizer, inputs.train, heldout_items(cfg, inputs), checkpoint)


def _train_stages(cfg: Config, inputs: Inputs, run_dir: Path, resume: bool, prune=None) -> Path:
    """Every stage in order, each from the model the one before made (the first from model.source); every
    stage but the last is evaluated into eval/<stage> (the start the next stage's gate compares with).
    Returns the last stage's model directory; stages.json says where each stage's model is."""
    from tracetune import dist
    from tracetune.logs import log_to_file

    model_dir, record, files = cfg.model.source, [], RunLayout(run_dir)
    for stage in cfg.stages:
        if stage == "sft":
            model_dir = _train_or_resume(cfg, inputs, run_dir, resume, prune)
        else:
            model_dir = _rl_stage(cfg, inputs, run_dir, stage, str(model_dir), resume)
        if inputs.eval_items is not None and stage != cfg.stages[-1]:
            with log_to_file(files.log("eval")):
                log.info("evaluating the %s stage's model %s", stage, model_dir)
                loaded = _load_for_eval(cfg, str(model_dir))
                evaluate_model(cfg, str(model_dir), inputs.eval_items, files.eval(stage).path, loaded=loaded)
                if inputs.keep is not None and cfg.eval.run_base:
                    which, dirs = ("answer_only", "trained_format"), keep_model_dirs(stage)
                    evaluate_keep(cfg, str(model_dir), inputs.keep, run_dir, which, loaded, dirs)
                del loaded
        where = {
            "model": str(Path(model_dir).relative_to(run_dir)),
            "eval": str(files.eval(stage_eval_dir(cfg.stages, stage)).path.relative_to(run_dir)),
        }
        record.append({"stage": stage, **where})
    if cfg.stages != ["sft"]:
        dist.on_main(lambda: write_json(files.stages, record))
    return Path(model_dir)


def run_stage(cfg: Config, argv: list[str], resume: bool = False) -> tuple[Path, dict]:
    """`tracetune run`: baselines, train, final eval, comparison, gates, report, manifest. Returns (run_dir,
    gates record). With `resume`, continue the run directory the config names: finished items and steps are kept.
    """
    from tracetune import dist
    from tracetune.eval.scoring import compare_keep, compare_with_baselines
    from tracetune.evidence.env import write_gpu_snapshot
    from tracetune.faults import STOP
    from tracetune.logs import log_to_file

    inputs, device = prepare(cfg)
    d = dist.current()
    run_dir = _agreed_run_dir(cfg)
    files = RunLayout(run_dir)
    evaluate = inputs.eval_items is not None
    with run_life(cfg, run_dir, argv, resume, device, dist.describe(device)) as record, STOP:
        if evaluate and cfg.eval.run_base:
            with log_to_file(files.log("eval")):
                evaluate_baselines(cfg, inputs, files.eval_root)
        final_model = _train_stages(cfg, inputs, run_dir, resume)
        if evaluate:
            with log_to_file(files.log("eval")):
                log.info("evaluating the fine-tuned model %s", final_model)
                loaded = _load_for_eval(cfg, str(final_model))
                evaluate_model(cfg, str(final_model), inputs.eval_items, files.eval().path, loaded=loaded)
                if inputs.keep is not None and cfg.eval.run_base:
                    keep = ("answer_only", "trained_format")
                    evaluate_keep(cfg, str(final_model), inputs.keep, run_dir, keep, loaded)
                del loaded
        if d.is_main:
            if evaluate and cfg.eval.run_base:
                write_json(files.comparison, compare_with_baselines(files.eval_root, cfg.seed))
                if inputs.keep is not None:
                    write_json(files.keep_comparison, compare_keep(files.keep_root, cfg.seed, cfg.stages[:-1]))
            if cfg.export.gguf:
                from tracetune.export_stage import export_and_check

                with log_to_file(files.log("export")):
                    export_and_check(run_dir, cfg.export.gguf)
            write_gpu_snapshot(run_dir, device.type, "end")
        gates = dist.on_main(lambda: close_run(run_dir, record))
    return run_dir, gates
