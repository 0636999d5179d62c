"""The SFT recipe: build the state, then one loop over `train_step` (train/step.py): step, log, validate, save.

Read `fit` top to bottom. Everything it writes goes into the run directory: metrics.jsonl (one flushed
line per logging step, `"split": "val"` for validation), checkpoints/ and final_model/.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tracetune import allocator, dist, tracking
from tracetune.config import Config, dump_config
from tracetune.data.batching import collate, plan_batches
from tracetune.data.render import Example
from tracetune.errors import TracetuneError
from tracetune.faults import STOP, crash_point
from tracetune.layout import METRICS, TrainingDir, append_jsonl, read_jsonl, trim_jsonl, write_json
from tracetune.models.checkpoints import verify_checkpoint
from tracetune.models.probe import probe_outputs
from tracetune.train import distributed
from tracetune.train.checkpoint import (
    Progress,
    restore_checkpoint,
    restore_sharded_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from tracetune.train.loss import num_loss_tokens
from tracetune.train.step import StepResult, TrainState, autocast_context, build_state, to_device, train_step

log = logging.getLogger("tracetune")


class NonFiniteLossError(TracetuneError):
    """The loss or gradient norm was NaN/inf; no optimizer step was applied."""

    exit_code = 4


@dataclass
class FitResult:
    num_steps: int
    planned_steps: int
    elapsed_s: float
    final_model_dir: Path


def planned_steps(batches_per_epoch: int, cfg: Config, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps); a step takes accumulation x world size micro-batches."""
    per_epoch = math.ceil(batches_per_epoch / (cfg.train.grad_accum_steps * world_size))
    return per_epoch, cfg.train.max_steps or per_epoch * cfg.train.num_epochs


def _memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "cuda_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "cuda_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
        }
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


@torch.no_grad()
def validate(net, examples: list[Example], batch_size: int, pad_id: int, device, autocast: bool) -> tuple[float, int]:
    """Mean loss per loss token over the validation examples (each rank takes a share; sums are reduced)."""
    net.eval()
    chunks = [examples[start : start + batch_size] for start in range(0, len(examples), batch_size)]
    total, count = 0.0, 0.0
    for chunk, weight in distributed.shard_window(chunks, dist.current()):
        batch = to_device(collate(chunk, pad_id), device)
        with autocast_context(autocast, device):
            s = net(**batch)
        total, count = total + weight * s.item(), count + weight * num_loss_tokens(batch)
    total, count = dist.sum_across_ranks([total, count])
    net.train()
    return total / max(count, 1), int(count)


def _probe_ids(examples: list[Example]) -> list[list[int]]:
    return [list(examples[0].input_ids[:32])]


def append_on_main(path: Path, record: dict) -> None:
    """Rank 0 appends a line to a run file (metrics.jsonl, example_ids.jsonl); metrics lines also go to the
    configured trackers."""
    if dist.current().is_main:
        append_jsonl(path, record)
        if path.name == METRICS:
            tracking.mirror(path, record)


@dataclass
class RunContext:
    """The loop shell's state, shared by SFT and GRPO: where to write, what goes beside each checkpoint, the
    step counts, and the clocks behind metrics.jsonl's throughput."""

    cfg: Config
    run_dir: Path
    probe_ids: list[list[int]]
    total_steps: int
    name: str = "train"  # the stage, as the progress bar and a stop message name it
    started: float = field(default_factory=time.perf_counter)  # moved back by the elapsed time of a resume
    last_log_time: float = field(default_factory=time.perf_counter)
    last_saved: int = -1
    resumed: bool = False
    stopped_early: bool = False  # train.early_stopping_patience ran out, or a search pruned the run
    pruned: bool = False  # `tracetune tune` ended this trial at a held-out point (fit's `prune`)
    bar: tqdm | None = None

    @property
    def metrics_path(self) -> Path:
        return TrainingDir(self.run_dir).metrics

    @property
    def ids_path(self) -> Path:
        return TrainingDir(self.run_dir).example_ids


def save(ctx: RunContext, state: TrainState, progress: Progress) -> None:
    """A committed checkpoint of the step just taken (FSDP's sharded format where the config asks for it)."""
    progress.elapsed_s = time.perf_counter() - ctx.started
    trainer_state = {
        "step": progress.step,
        "progress": vars(progress) | {"window": dict(progress.window)},
        "data": {"epoch": progress.epoch, "next_batch": progress.next_batch},
        "scheduler": state.scheduler.state_dict(),
        "rng": rng_state(),
    }
    common = (trainer_state, dump_config(ctx.cfg))
    keep, root = ctx.cfg.train.keep_last_checkpoints, TrainingDir(ctx.run_dir).checkpoints
    if state.sharded_checkpoints:  # every rank runs the probe: FSDP gathers each layer's weights as it goes
        probe = probe_outputs(state.net, ctx.probe_ids, exact=state.strategy != "fsdp")
        path = save_sharded_checkpoint(root, progress.step, state.model, state.optimizer, *common, probe, keep)
    else:
        optimizer_state = {"optimizer": state.optimizer.state_dict()}
        if state.master:
            optimizer_state["master"] = [p.detach() for p in state.master.master]
        probe = probe_outputs(state.model, ctx.probe_ids) if dist.current().is_main else {}
        path = save_checkpoint(root, progress.step, state.model, optimizer_state, *common, probe, keep)
    ctx.last_saved = progress.step
    log.info("saved checkpoint %s", path.name)


def run_validation(ctx: RunContext, state: TrainState, progress: Progress, val: list[Example], pad_id: int,
                   num_batches: int) -> float:  # fmt: skip
    """One validation line in metrics.jsonl (num_batches: micro-batches per epoch, for the epoch it is in); the
    validation loss."""
    val_loss, n = validate(state.net, val, ctx.cfg.train.batch_size, pad_id, state.device, state.autocast)
    epoch = round(progress.epoch + progress.next_batch / max(1, num_batches), 4)
    record = {"split": "val", "step": progress.step, "epoch": epoch, "loss": val_loss, "num_loss_tokens": n}
    append_on_main(ctx.metrics_path, record)
    log.info("step %d val_loss %.4f", progress.step, val_loss)
    return val_loss


def restore(state: TrainState, resume_from: Path, ctx: RunContext) -> Progress:
    """Where a committed checkpoint left off, loaded into `state`; metrics lines after it are dropped."""
    problems = verify_checkpoint(resume_from)
    if problems:
        raise TracetuneError(f"cannot resume from {resume_from}: {'; '.join(problems)}")
    if (resume_from / "dcp").is_dir():
        progress = restore_sharded_checkpoint(resume_from, state.model, state.optimizer, state.scheduler)
    elif state.sharded_checkpoints:
        raise TracetuneError(f"{resume_from} was written without FSDP; fix: resume it with train.distributed=ddp")
    else:
        method = ctx.cfg.train.method
        progress = restore_checkpoint(resume_from, state.model, state.optimizer, state.scheduler, state.master, method)
    if dist.current().is_main:
        trim_jsonl(ctx.metrics_path, progress.step)
        trim_jsonl(ctx.ids_path, progress.step)
    log.info("resumed from %s at step %d", resume_from.name, progress.step)
    ctx.last_saved, ctx.resumed = progress.step, True
    ctx.started = time.perf_counter() - progress.elapsed_s  # elapsed_s continues across a resume
    return progress


def handle_nonfinite(ctx: RunContext, state: TrainState, progress: Progress, result: StepResult) -> None:
    """Count a skipped step; past the policy's limit, checkpoint the last good state and stop (exit 4)."""
    tc = ctx.cfg.train
    progress.num_skipped_steps += 1
    if tc.nonfinite_policy == "stop" or progress.num_skipped_steps > tc.max_skipped_steps:
        if ctx.last_saved != progress.step:
            save(ctx, state, progress)  # the weights are those after the last good step
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {progress.step + 1} (loss {result.loss_sum}, grad_norm "
            f"{result.grad_norm}); no update was applied and the last good state is checkpointed; "
            "fix: lower train.lr, use fp32, or set train.nonfinite_policy=skip"
        )
    log.warning("step %d: non-finite loss or gradient, update skipped", progress.step + 1)


def add_to_window(window: dict, micro_batches: list[dict], result: StepResult) -> None:
    """Sums since the last metrics line (kept in Progress, so a resumed run logs the same averages)."""
    for batch in micro_batches:
        window["tokens"] += int(batch["attention_mask"].sum())
        window["padded"] += batch["attention_mask"].numel()
        window["samples"] += batch["input_ids"].shape[0]
    if result.finite:
        window["loss_sum"] += result.loss_sum
        window["loss_tokens"] += result.num_loss_tokens


def metrics_line(
    state: TrainState, progress: Progress, epoch: float, result: StepResult, seconds: float, elapsed: float
) -> dict:
    window = progress.window
    return {
        "step": progress.step,
        "epoch": round(epoch, 4),
        "loss": window["loss_sum"] / window["loss_tokens"],
        "lr": state.scheduler.get_last_lr()[0],
        "grad_norm": result.grad_norm,
        "num_loss_tokens": window["loss_tokens"],
        "num_tokens": window["tokens"],
        "num_samples": window["samples"],
        "pad_fraction": round(1 - window["tokens"] / window["padded"], 4),
        "tokens_per_s": round(window["tokens"] / seconds, 2),
        "samples_per_s": round(window["samples"] / seconds, 3),
        "elapsed_s": round(elapsed, 3),
        **_memory(state.device),
    }


def log_step(ctx: RunContext, state: TrainState, progress: Progress, micro, result: StepResult, epoch: float) -> None:
    """Fold the step into the metrics window; write a metrics line when one is due (or a skipped-step event)."""
    tc = ctx.cfg.train
    add_to_window(progress.window, micro, result)
    if not result.finite:
        event = {"step": progress.step, "epoch": round(epoch, 4), "event": "skipped_nonfinite"}
        append_on_main(ctx.metrics_path, event)
    elif progress.step % tc.log_every_steps == 0 or progress.step == ctx.total_steps:
        now = time.perf_counter()
        seconds = max(now - ctx.last_log_time, 1e-9)
        record = metrics_line(state, progress, epoch, result, seconds, now - ctx.started)
        append_on_main(ctx.metrics_path, record)
        ctx.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        progress.window = Progress().window
        ctx.last_log_time = time.perf_counter()
        crash_point(f"step-{progress.step}/logged")


def after_step(
    ctx: RunContext, state: TrainState, progress: Progress, evaluate, eval_every: int | None, save_every: int | None
) -> None:
    """The loop shell, after every optimizer step of SFT and GRPO: `evaluate` (validation loss, held-out
    accuracy; None for none) and a checkpoint when due, then a stop signal honoured (after a save) if any rank
    saw one.

    The evaluation comes before the save, so a checkpoint at step N follows every line of step N. Their time is
    kept out of the next line's throughput, which measures training alone.
    """
    done = progress.step >= ctx.total_steps
    paused = time.perf_counter()
    if evaluate is not None and (done or (eval_every and progress.step % eval_every == 0)):
        evaluate()
    if done or (save_every and progress.step % save_every == 0):
        save(ctx, state, progress)
    ctx.last_log_time += time.perf_counter() - paused
    STOP.requested = dist.stop_agreed(STOP.requested)
    if STOP.requested is not None:
        if ctx.last_saved != progress.step:
            save(ctx, state, progress)
        ctx.bar.close()
        STOP.check(f"after {'' if ctx.name == 'train' else ctx.name + ' '}step {progress.step}")


def open_bar(ctx: RunContext, progress: Progress) -> None:
    ctx.bar = tqdm(
        total=ctx.total_steps, initial=progress.step, desc=ctx.name, unit="step", dynamic_ncols=True,
        disable=not dist.current().is_main,
    )  # fmt: skip


def keep_if_best(ctx: RunContext, model, step: int) -> None:
    """Rank 0, after step `step`'s held-out point is in metrics.jsonl: where it is the best so far, keep this
    step's weights (selected.safetensors), so the final model can be the best step's and a resume keeps the
    best-so-far."""
    from safetensors.torch import save_model

    if best_point(read_jsonl(ctx.metrics_path), ctx.cfg.gates.max_keep_drop)["step"] == step:
        save_model(model, str(TrainingDir(ctx.run_dir).selected))  # tied weights stored once


def best_point(rows: list[dict], max_keep_drop: float) -> dict:
    """The best held-out accuracy point of metrics.jsonl's rows: the highest accuracy, then the lowest validation
    loss at its step, then the earlier; among points whose keep-set monitor (`keep_accuracy`, where a keep set is
    configured) is at most `max_keep_drop` below the first point's (step 0: the model training started from)."""
    losses = {r["step"]: r["loss"] for r in rows if r.get("split") == "val"}
    points = [
        {"step": r["step"], "accuracy": r["accuracy"], "val_loss": losses.get(r["step"], math.inf)}
        | ({"keep_accuracy": r["keep_accuracy"]} if "keep_accuracy" in r else {})
        for r in rows
        if r.get("split") == "val_accuracy" and "accuracy" in r
    ]
    start_keep = points[0].get("keep_accuracy") if points else None
    floor = None if start_keep is None else start_keep - max_keep_drop
    eligible = [p for p in points if floor is None or p.get("keep_accuracy", 1.0) >= floor - 1e-9]
    default = {"step": -1, "accuracy": -1.0, "val_loss": math.inf}
    best = max(eligible, key=lambda p: (p["accuracy"], -p["val_loss"], -p["step"]), default=default)
    if floor is not None:
        best = best | {"keep_floor": round(floor, 6), "num_excluded_by_keep": len(points) - len(eligible)}
    return best


def _points_since_best(ctx: RunContext) -> int:
    """Held-out accuracy points after the best one (metrics.jsonl: the same answer after a resume)."""
    rows = read_jsonl(ctx.metrics_path)
    best = best_point(rows, ctx.cfg.gates.max_keep_drop)
    return sum(1 for r in rows if r.get("split") == "val_accuracy" and r["step"] > best["step"])


def select_weights(ctx: RunContext, model, last_step: int) -> dict:
    """Rank 0: the best held-out step's weights loaded back into `model` where it is not the last step; what
    training.json records of the choice."""
    from safetensors.torch import load_model

    if not dist.current().is_main:
        return {}
    best = best_point(read_jsonl(ctx.metrics_path), ctx.cfg.gates.max_keep_drop)
    if best["step"] < 0:
        return {}
    if best["step"] != last_step:
        load_model(model, str(TrainingDir(ctx.run_dir).selected), strict=True)
    log.info("final model: step %d, held-out accuracy %.3f (train.select=val_accuracy)", best["step"], best["accuracy"])
    if best["step"] == 0 and best.get("num_excluded_by_keep"):
        log.warning(
            "no trained step kept the keep set within gates.max_keep_drop (%d excluded): the final model is the "
            "starting model; fix: a gentler recipe (train.method=lora, a lower train.lr) or a larger max_keep_drop",
            best["num_excluded_by_keep"],
        )
    record = {
        "selected_by": "val_accuracy (then validation loss)",
        "selected_step": best["step"],
        "selected_accuracy": best["accuracy"],
        "selected_val_loss": best["val_loss"],
    }
    if "keep_floor" in best:
        record |= {
            "selected_by": "val_accuracy (then validation loss) among steps whose keep-set monitor stayed within "
            "gates.max_keep_drop of step 0's",
            "selected_keep_accuracy": best.get("keep_accuracy"),
            "keep_floor": best["keep_floor"],
            "num_excluded_by_keep": best["num_excluded_by_keep"],
        }
    return record


def finish_training(ctx: RunContext, state: TrainState, progress: Progress, tokenizer, method: str, **extra) -> Path:
    """The end of a training stage (SFT, GRPO): final_model/ and training.json (what was planned and done,
    on what, how; `extra` adds the stage's own fields). Every rank calls it."""
    ctx.bar.close()
    final_dir = save_final_model(state.model, tokenizer, ctx.run_dir, method, state.strategy == "fsdp")
    record = _training_record(ctx, state, progress) | extra  # a collective: every rank
    write_training(ctx.run_dir, record)
    return final_dir


def write_training(stage_dir: Path, record: dict) -> None:
    """training.json of a training stage, written by rank 0: the one writer (SFT, RFT and GRPO call it)."""
    if dist.current().is_main:
        write_json(TrainingDir(stage_dir).training, record)


def fit(
    cfg: Config,
    run_dir: Path,
    model,
    tokenizer,
    train: list[Example],
    val: list[Example],
    resume_from: Path | None = None,
    answers=None,
    prune=None,
) -> FitResult:
    """Train `model` on `train`, validating on `val`; write metrics, checkpoints and final_model. `answers`,
    when given, is called as answers(model, step) at every validation and returns held-out accuracy figures
    (the pipeline's generation and scoring; this layer neither generates nor scores), logged as a
    `"split": "val_accuracy"` line. `prune`, when given, is called as prune(step, figures) after each such
    line; True ends training there (a search's unpromising trial; training.json records pruned).

    With `resume_from` (a committed checkpoint), continue exactly where it left off: same weights, optimizer,
    schedule, RNG, data order and position; metrics.jsonl lines after the checkpoint are dropped first.
    """
    tc, d = cfg.train, dist.current()
    device = dist.rank_device(dist.resolve_device(tc.device))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    lengths = [len(e.input_ids) for e in train]
    num_batches = len(plan_batches(lengths, tc.batch_size, cfg.seed, 0))  # the same count every epoch
    steps_per_epoch, total_steps = planned_steps(num_batches, cfg, d.world_size)
    per_step = tc.grad_accum_steps * d.world_size  # micro-batches per optimizer step
    state = build_state(cfg, model, device, total_steps)
    pad_id = tokenizer.pad_token_id
    ctx = RunContext(cfg, run_dir, _probe_ids(val or train), total_steps)
    progress = restore(state, resume_from, ctx) if resume_from is not None else Progress()
    _log_start(cfg, state, len(train), len(val), total_steps, steps_per_epoch)
    open_bar(ctx, progress)

    def validation() -> None:
        run_validation(ctx, state, progress, val, pad_id, num_batches)
        if answers is not None:
            scored = answers(state.model, progress.step)
            append_on_main(ctx.metrics_path, {"split": "val_accuracy", "step": progress.step, **(scored or {})})
            if tc.select == "val_accuracy" and scored is not None and d.is_main:
                keep_if_best(ctx, state.model, progress.step)
            if tc.early_stopping_patience:
                since = _points_since_best(ctx) if d.is_main else 0
                ctx.stopped_early = dist.broadcast_from_main(since >= tc.early_stopping_patience)
                if ctx.stopped_early:
                    log.info("early stop at step %d: %d held-out points without a better one", progress.step, since)
            if prune is not None and scored is not None and dist.broadcast_from_main(prune(progress.step, scored)):
                ctx.stopped_early = ctx.pruned = True
                log.info("pruned at step %d: held-out accuracy %.3f", progress.step, scored["accuracy"])

    validation = validation if val else None
    if validation and progress.step == 0 and resume_from is None:
        validation()  # the baseline the loss_decreased gate compares against
    ctx.last_log_time = time.perf_counter()
    with STOP:
        while progress.step < total_steps and not ctx.stopped_early:
            batches = plan_batches(lengths, tc.batch_size, cfg.seed, progress.epoch)
            for start in range(progress.next_batch, len(batches), per_step):
                chunk = batches[start : start + per_step]
                # Every rank collates the whole step, so the step's totals need no communication.
                micro = [collate([train[i] for i in b], pad_id) for b in chunk]
                result = train_step(state, micro, progress.step + 1)
                if not result.finite:
                    handle_nonfinite(ctx, state, progress, result)
                state.scheduler.step()
                progress.step, progress.next_batch = progress.step + 1, start + len(chunk)
                crash_point(f"step-{progress.step}/updated")
                if tc.record_example_ids:
                    append_on_main(
                        ctx.ids_path, {"step": progress.step, "ids": [train[i].id for b in chunk for i in b]}
                    )
                log_step(ctx, state, progress, micro, result, progress.epoch + progress.next_batch / len(batches))
                ctx.bar.update(1)
                after_step(ctx, state, progress, validation, tc.eval_every_steps, tc.save_every_steps)
                if progress.step >= total_steps or ctx.stopped_early:
                    break
            else:
                progress.epoch, progress.next_batch = progress.epoch + 1, 0
                crash_point(f"epoch-{progress.epoch}/start")
    elapsed = time.perf_counter() - ctx.started
    selection = select_weights(ctx, state.model, progress.step) if tc.select == "val_accuracy" else {}
    final_dir = finish_training(
        ctx, state, progress, tokenizer, tc.method, **selection, stopped_early=ctx.stopped_early, pruned=ctx.pruned,
        steps_per_epoch=steps_per_epoch, num_train_examples=len(train),
        num_val_examples=len(val), global_batch_size=tc.batch_size * tc.grad_accum_steps * d.world_size,
        grad_accum_steps=tc.grad_accum_steps, precision=tc.precision,
    )  # fmt: skip
    log.info("training done: %d steps in %.1f s; final model in %s", progress.step, elapsed, final_dir)
    return FitResult(progress.step, total_steps, elapsed, final_dir)


def _training_record(ctx: RunContext, state: TrainState, progress: Progress) -> dict:
    """What every training stage's training.json holds. Every rank calls it (dist.describe gathers)."""
    device = state.device
    return {
        "planned_steps": ctx.total_steps,
        "num_steps": progress.step,
        "num_skipped_steps": progress.num_skipped_steps,
        "elapsed_s": round(time.perf_counter() - ctx.started, 3),
        "resumed": ctx.resumed,
        "num_trainable_params": state.num_trainable_params,
        "strategy": state.strategy,
        "checkpoint_format": "dcp" if state.sharded_checkpoints else "hf",
        **dist.describe(device),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "method": ctx.cfg.train.method,
    }


def _log_start(cfg: Config, state: TrainState, num_train: int, num_val: int, total: int, per_epoch: int) -> None:
    tc, world = cfg.train, dist.current().world_size
    log.info(
        "training %s on %s (%s, world size %d): %d examples, %d val, %d trainable params, %d steps (%d per epoch), "
        "global batch %d = %d per micro-batch x %d accumulation x %d ranks",
        tc.method,
        state.device,
        state.strategy,
        world,
        num_train,
        num_val,
        state.num_trainable_params,
        total,
        per_epoch,
        tc.batch_size * tc.grad_accum_steps * world,
        tc.batch_size,
        tc.grad_accum_steps,
        world,
    )
    if state.device.type == "cpu" and (hint := allocator.hint()):
        log.info(hint)


def save_final_model(model, tokenizer, run_dir: Path, method: str, fsdp: bool = False) -> Path:
    """final_model/ in Hugging Face format, written by rank 0 (every rank calls; they wait for it).

    A LoRA run also writes adapter/ and merges it into final_model/. An FSDP model is gathered to rank 0's
    CPU first, then saved from a plain model of the same architecture.
    """
    final_dir = TrainingDir(run_dir).final_model
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.current().is_main:
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(model.config)
            missing, unexpected = plain.load_state_dict(full, assign=True, strict=False)
            assert not unexpected and all("lm_head" in name for name in missing), (missing, unexpected)
            plain.tie_weights()
            plain.save_pretrained(final_dir)
            tokenizer.save_pretrained(final_dir)
        dist.barrier()
        return final_dir
    if not dist.current().is_main:
        dist.barrier()
        return final_dir
    if method == "lora":
        model.save_pretrained(run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    dist.barrier()
    return final_dir
