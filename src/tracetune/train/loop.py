"""The one training loop: forward, loss, backward, clip, step, schedule, log, validate, save.

Read `fit` top to bottom. Everything it writes goes into the run directory: metrics.jsonl (one flushed
line per logging step, `"split": "val"` for validation), checkpoints/ and final_model/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tracetune import allocator
from tracetune.config import Config, dump_config
from tracetune.data.batching import collate, plan_batches
from tracetune.data.render import Example
from tracetune.errors import TracetuneError
from tracetune.faults import STOP, crash_point, nan_injected
from tracetune.models.probe import probe_outputs
from tracetune.train import distributed
from tracetune.train.checkpoint import (
    Progress,
    restore_checkpoint,
    restore_sharded_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    verify_checkpoint,
)
from tracetune.train.loss import CausalLMLoss, TiedGradient, num_loss_tokens, unwrap_model
from tracetune.train.optim import MasterWeights, build_optimizer, lr_lambda, param_groups

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


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TracetuneError("train.device is cuda but no CUDA device is visible; fix: set train.device=cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def apply_lora(model, cfg: Config):
    from peft import LoraConfig, get_peft_model

    lora = cfg.train.lora
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    return get_peft_model(model, peft_config)


def planned_steps(batches_per_epoch: int, cfg: Config, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps); a step takes accumulation x world size micro-batches."""
    per_epoch = math.ceil(batches_per_epoch / (cfg.train.grad_accum_steps * world_size))
    return per_epoch, cfg.train.max_steps or per_epoch * cfg.train.num_epochs


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
    for chunk, weight in distributed.shard_window(chunks, distributed.current()):
        batch = _to(collate(chunk, pad_id), device)
        with _autocast(autocast, device):
            s = net(**batch)
        total, count = total + weight * s.item(), count + weight * num_loss_tokens(batch)
    total, count = distributed.sum_across_ranks([total, count])
    net.train()
    return total / max(count, 1), int(count)


def _probe_ids(examples: list[Example]) -> list[list[int]]:
    return [list(examples[0].input_ids[:32])]


def _append_jsonl(path: Path, record: dict) -> None:
    # One append per line: a crash leaves at most one torn last line, which a resume trims. Rank 0 writes.
    if not distributed.current().is_main:
        return
    with open(path, "a", encoding="utf-8", newline="\n") as handle:
        handle.write(json.dumps(record) + "\n")


def trim_jsonl(path: Path, last_step: int) -> None:
    """Keep the complete lines whose step is at most `last_step` (drops a torn line and anything later)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= last_step:
            kept.append(line + "\n")
    path.write_text("".join(kept), encoding="utf-8", newline="\n")


def fit(
    cfg: Config,
    run_dir: Path,
    model,
    tokenizer,
    train: list[Example],
    val: list[Example],
    resume_from: Path | None = None,
) -> FitResult:
    """Train `model` on `train`, validating on `val`; write metrics, checkpoints and final_model.

    With `resume_from` (a committed checkpoint), continue exactly where it left off: same weights, optimizer,
    schedule, RNG, data order and position; metrics.jsonl lines after the checkpoint are dropped first.
    """
    tc = cfg.train
    d = distributed.current()
    device = distributed.rank_device(resolve_device(tc.device))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if tc.method == "lora":
        model = apply_lora(model, cfg)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    strategy = distributed.choose_strategy(tc.distributed, num_params, device) if d.enabled else "single"
    fsdp = strategy == "fsdp"
    sharded_checkpoints = fsdp or tc.distributed == "fsdp"  # an FSDP config's format, at any world size
    # FSDP keeps fp32 sharded weights and computes in bf16 (its mixed-precision policy); one process running
    # an FSDP config does the same through autocast, so its checkpoints hold what an FSDP run's would.
    master_weights = tc.precision == "bf16-weights" and not sharded_checkpoints
    autocast = tc.precision != "fp32" and not fsdp and not master_weights
    if master_weights:
        model.to(torch.bfloat16)
    model.train()
    layers = unwrap_model(model).get_decoder().layers
    if tc.compile:  # one compiled region per decoder layer, before FSDP wraps the same layers (as torchtitan does)
        for layer in layers:
            layer.compile()
    # One CPU process: the tied embedding/head matrix's gradient accumulates in place (loss.TiedGradient).
    # Not on CUDA: its caching allocator has no page faults to save, and index_add_ there is nondeterministic.
    in_place = strategy == "single" and not master_weights and device.type == "cpu"
    tied = TiedGradient.for_model(model) if in_place else None
    net = distributed.wrap(CausalLMLoss(model, tied), layers, strategy, tc.precision, device)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # FSDP's sharded ones if wrapped
    master = MasterWeights([p for _, p in named]) if master_weights else None
    step_params = master.master if master else [p for _, p in named]
    groups = param_groups(list(zip([n for n, _ in named], step_params, strict=True)), tc.weight_decay)
    optimizer = build_optimizer(groups, tc, device)
    lengths = [len(e.input_ids) for e in train]
    num_batches = len(plan_batches(lengths, tc.batch_size, cfg.seed, 0))  # the same count every epoch
    steps_per_epoch, total_steps = planned_steps(num_batches, cfg, d.world_size)
    batches_per_step = tc.grad_accum_steps * d.world_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc, total_steps))
    pad_id = tokenizer.pad_token_id
    probe_ids = _probe_ids(val or train)
    config_yaml = dump_config(cfg)
    metrics_path, ids_path = run_dir / "metrics.jsonl", run_dir / "example_ids.jsonl"

    progress = Progress()
    if resume_from is not None:
        problems = verify_checkpoint(resume_from)
        if problems:
            raise TracetuneError(f"cannot resume from {resume_from}: {'; '.join(problems)}")
        if (resume_from / "dcp").is_dir():
            progress = restore_sharded_checkpoint(resume_from, model, optimizer, scheduler)
        elif sharded_checkpoints:
            raise TracetuneError(f"{resume_from} was written without FSDP; fix: resume it with train.distributed=ddp")
        else:
            progress = restore_checkpoint(resume_from, model, optimizer, scheduler, master, tc.method)
        if d.is_main:
            trim_jsonl(metrics_path, progress.step)
            trim_jsonl(ids_path, progress.step)
        log.info("resumed from %s at step %d", resume_from.name, progress.step)
    global_batch = tc.batch_size * tc.grad_accum_steps * d.world_size
    log.info(
        "training %s on %s (%s, world size %d): %d examples, %d val, %d trainable params, %d steps (%d per epoch), "
        "global batch %d = %d per micro-batch x %d accumulation x %d ranks",
        tc.method,
        device,
        strategy,
        d.world_size,
        len(train),
        len(val),
        num_params,
        total_steps,
        steps_per_epoch,
        global_batch,
        tc.batch_size,
        tc.grad_accum_steps,
        d.world_size,
    )
    if device.type == "cpu" and (hint := allocator.hint()):
        log.info(hint)
    last_saved = progress.step if resume_from is not None else -1
    clock = time.perf_counter() - progress.elapsed_s  # elapsed_s continues across a resume
    last_log_time = time.perf_counter()
    bar = tqdm(
        total=total_steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True, disable=not d.is_main
    )

    def save() -> None:
        nonlocal last_saved
        progress.elapsed_s = time.perf_counter() - clock
        trainer_state = {
            "step": progress.step,
            "progress": vars(progress) | {"window": dict(progress.window)},
            "data": {"epoch": progress.epoch, "next_batch": progress.next_batch},
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        }
        common = (trainer_state, config_yaml)
        if sharded_checkpoints:  # every rank runs the probe: FSDP gathers each layer's weights as it goes
            probe = probe_outputs(net, probe_ids, exact=not fsdp)
            path = save_sharded_checkpoint(
                run_dir / "checkpoints", progress.step, model, optimizer, *common, probe, tc.keep_last_checkpoints
            )
        else:
            optimizer_state = {"optimizer": optimizer.state_dict()}
            if master:
                optimizer_state["master"] = [p.detach() for p in master.master]
            probe = probe_outputs(model, probe_ids) if d.is_main else {}
            path = save_checkpoint(
                run_dir / "checkpoints", progress.step, model, optimizer_state, *common, probe, tc.keep_last_checkpoints
            )
        last_saved = progress.step
        log.info("saved checkpoint %s", path.name)

    def run_validation() -> None:
        val_loss, n = validate(net, val, tc.batch_size, pad_id, device, autocast)
        epoch = round(progress.epoch + progress.next_batch / max(1, num_batches), 4)
        record = {"split": "val", "step": progress.step, "epoch": epoch, "loss": val_loss, "num_loss_tokens": n}
        _append_jsonl(metrics_path, record)
        log.info("step %d val_loss %.4f", progress.step, val_loss)

    if val and progress.step == 0 and resume_from is None:
        run_validation()  # the baseline the loss_decreased gate compares against
    with STOP:
        while progress.step < total_steps:
            batches = plan_batches(lengths, tc.batch_size, cfg.seed, progress.epoch)
            for start in range(progress.next_batch, len(batches), batches_per_step):
                chunk = batches[start : start + batches_per_step]
                # Every rank collates the whole step, so the step's totals below need no communication.
                micro = [collate([train[i] for i in b], pad_id) for b in chunk]
                # Normalise by the loss tokens of the whole optimizer step, so accumulation equals one big batch;
                # DDP and FSDP average gradients over ranks, which the world-size factor undoes.
                step_tokens = sum(num_loss_tokens(m) for m in micro)
                share = distributed.shard_window(micro, d)
                step_loss = 0.0
                for k, (batch, weight) in enumerate(share):
                    with distributed.gradient_sync(net, k == len(share) - 1):
                        with _autocast(autocast, device):
                            s = net(**_to(batch, device))
                        if nan_injected(progress.step + 1):
                            s = s * float("nan")
                        (s * (weight * d.world_size) / step_tokens).backward()
                    step_loss += weight * s.item()
                    crash_point(f"step-{progress.step + 1}/micro-{k}")
                step_loss = distributed.sum_across_ranks([step_loss])[0]
                if tied:
                    tied.attach_grad()
                if master:
                    master.grads_to_master()
                grad_norm = _total_norm(torch.nn.utils.clip_grad_norm_(step_params, tc.max_grad_norm or float("inf")))
                finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if tied:
                    tied.reset()
                if not finite:
                    progress.num_skipped_steps += 1
                    if tc.nonfinite_policy == "stop" or progress.num_skipped_steps > tc.max_skipped_steps:
                        if last_saved != progress.step:
                            save()  # the weights are those after the last good step
                        raise NonFiniteLossError(
                            f"non-finite loss or gradient at step {progress.step + 1} (loss {step_loss}, grad_norm "
                            f"{grad_norm}); no update was applied and the last good state is checkpointed; "
                            "fix: lower train.lr, use fp32, or set train.nonfinite_policy=skip"
                        )
                    log.warning("step %d: non-finite loss or gradient, update skipped", progress.step + 1)
                if master and finite:
                    master.master_to_model()
                scheduler.step()
                progress.step += 1
                progress.next_batch = start + len(chunk)
                crash_point(f"step-{progress.step}/updated")
                if tc.record_example_ids:
                    _append_jsonl(ids_path, {"step": progress.step, "ids": [train[i].id for b in chunk for i in b]})
                window = progress.window
                for batch in micro:
                    window["tokens"] += int(batch["attention_mask"].sum())
                    window["padded"] += batch["attention_mask"].numel()
                    window["samples"] += batch["input_ids"].shape[0]
                if finite:
                    window["loss_sum"] += step_loss
                    window["loss_tokens"] += step_tokens
                epoch_progress = progress.epoch + progress.next_batch / len(batches)
                if not finite:
                    record = {"step": progress.step, "epoch": round(epoch_progress, 4), "event": "skipped_nonfinite"}
                    _append_jsonl(metrics_path, record)
                elif progress.step % tc.log_every_steps == 0 or progress.step == total_steps:
                    now = time.perf_counter()
                    seconds = max(now - last_log_time, 1e-9)
                    record = {
                        "step": progress.step,
                        "epoch": round(epoch_progress, 4),
                        "loss": window["loss_sum"] / window["loss_tokens"],
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "num_loss_tokens": window["loss_tokens"],
                        "num_tokens": window["tokens"],
                        "num_samples": window["samples"],
                        "pad_fraction": round(1 - window["tokens"] / window["padded"], 4),
                        "tokens_per_s": round(window["tokens"] / seconds, 2),
                        "samples_per_s": round(window["samples"] / seconds, 3),
                        "elapsed_s": round(now - clock, 3),
                        **_memory(device),
                    }
                    _append_jsonl(metrics_path, record)
                    log.debug(
                        "step %d/%d loss %.4f lr %.3g grad_norm %.3f tok/s %.1f",
                        progress.step,
                        total_steps,
                        record["loss"],
                        record["lr"],
                        grad_norm,
                        record["tokens_per_s"],
                    )
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    progress.window = Progress().window
                    last_log_time = time.perf_counter()
                    crash_point(f"step-{progress.step}/logged")
                bar.update(1)
                done = progress.step >= total_steps
                # Validation comes before the save, so a checkpoint at step N follows every line of step N.
                # Their time is kept out of the next line's tokens/s, which measures training alone.
                paused = time.perf_counter()
                if val and (done or (tc.eval_every_steps and progress.step % tc.eval_every_steps == 0)):
                    run_validation()
                if done or (tc.save_every_steps and progress.step % tc.save_every_steps == 0):
                    save()
                last_log_time += time.perf_counter() - paused
                STOP.requested = distributed.stop_agreed(STOP.requested)
                if STOP.requested is not None:
                    if last_saved != progress.step:
                        save()
                    bar.close()
                    STOP.check(f"after step {progress.step}")
                if done:
                    break
            else:
                progress.epoch += 1
                progress.next_batch = 0
                crash_point(f"epoch-{progress.epoch}/start")
    bar.close()
    elapsed = time.perf_counter() - clock
    final_dir = save_final_model(model, tokenizer, run_dir, tc.method, fsdp)
    summary = {
        "planned_steps": total_steps,
        "num_steps": progress.step,
        "num_skipped_steps": progress.num_skipped_steps,
        "steps_per_epoch": steps_per_epoch,
        "elapsed_s": round(elapsed, 3),
        "resumed": resume_from is not None,
        "num_train_examples": len(train),
        "num_val_examples": len(val),
        "num_trainable_params": num_params,
        "global_batch_size": global_batch,
        "grad_accum_steps": tc.grad_accum_steps,
        "strategy": strategy,
        "checkpoint_format": "dcp" if sharded_checkpoints else "hf",
        **distributed.describe(device),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "method": tc.method,
        "precision": tc.precision,
    }
    if d.is_main:
        (run_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("training done: %d steps in %.1f s; final model in %s", progress.step, elapsed, final_dir)
    return FitResult(progress.step, total_steps, elapsed, final_dir)


def _total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float; under FSDP it is a DTensor whose full value needs its shards."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def save_final_model(model, tokenizer, run_dir: Path, method: str, fsdp: bool = False) -> Path:
    """final_model/ in Hugging Face format, written by rank 0 (every rank calls; they wait for it).

    A LoRA run also writes adapter/ and merges it into final_model/. An FSDP model is gathered to rank 0's
    CPU first, then saved from a plain model of the same architecture.
    """
    final_dir = run_dir / "final_model"
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if distributed.current().is_main:
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(model.config)
            missing, unexpected = plain.load_state_dict(full, assign=True, strict=False)
            assert not unexpected and all("lm_head" in name for name in missing), (missing, unexpected)
            plain.tie_weights()
            plain.save_pretrained(final_dir)
            tokenizer.save_pretrained(final_dir)
        distributed.barrier()
        return final_dir
    if not distributed.current().is_main:
        distributed.barrier()
        return final_dir
    if method == "lora":
        model.save_pretrained(run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    distributed.barrier()
    return final_dir
