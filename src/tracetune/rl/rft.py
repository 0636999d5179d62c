"""Rejection-sampling fine-tuning (expert iteration, STaR): sample, keep what the checkers verify, fine-tune.

Each round: the round's training prompts (a seeded draw), `num_samples` seeded samples each from the current
model (rl/rollout.py); kept are the samples whose answer is right, whose checked steps all hold and which
ended before the token limit, distinct per prompt, at most `max_kept_per_prompt`. Optionally a prompt with
none gets one greedy try with its answer as a hint (kept without the hint, marked `rationalized`). The kept
traces (plus the original traces of the round's prompts, by default) are fine-tuned on with the SFT loop
(`fit`), continuing from the current weights. Everything of round N lives in `round-N/` of the stage
directory: kept.jsonl (native traces, loadable by `tracetune data validate`), sampled.jsonl (every sample
and its score), metrics.jsonl, checkpoints/, training.json, final_model/; rounds.jsonl has a line per round
(yield, train-prompt accuracy, held-out accuracy).

A round is resumed where it stopped: sampling is a pure function of (seed, round, prompt, sample), so a
round whose kept.jsonl is missing samples again and gets the same file; a round with kept.jsonl resumes
its fine-tuning from its newest checkpoint (`fit`'s exact resume).
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter
from pathlib import Path

from tracetune import dist, tracking
from tracetune.config import Config
from tracetune.data.render import parse_completion, tokenize_traces
from tracetune.data.traces import EvalItem, Trace, load_traces
from tracetune.errors import DataError, TracetuneError
from tracetune.faults import crash_point
from tracetune.layout import TrainingDir, append_jsonl, read_json, read_jsonl, write_json
from tracetune.rl.rollout import Rollout, Sampler, as_item, heldout

log = logging.getLogger("tracetune")


def round_prompts(
    train: list[Trace], round_number: int, count: int | None, seed: int, solved: frozenset[str] = frozenset()
) -> list[Trace]:
    """The training prompts of round `round_number` (from 1): all but the `solved` ones (all when every one is),
    or a seeded draw of `count` of them."""
    pool = [t for t in train if t.id not in solved] or list(train)
    if count is None or count >= len(pool):
        return pool
    return random.Random(f"{seed}:rft:{round_number}").sample(pool, count)


def solved_ids(stage_dir: Path, before: int, max_kept: int) -> frozenset[str]:
    """Prompts of which rounds before `before` kept `max_kept` verified samples (read from their kept.jsonl, so a
    resumed stage draws the same prompts)."""
    counts: Counter = Counter()
    for number in range(1, before):
        for row in read_jsonl(TrainingDir(stage_dir).round(number).kept):
            counts[row["meta"]["of"]] += 1
    return frozenset(i for i, n in counts.items() if n >= max_kept)


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def is_verified(rollout: Rollout) -> bool:
    """A right answer, at least one checked step and every one valid, an 'Answer:' line, and not cut off by the
    token limit (a truncated sample is never kept: grpo.truncated=mask's rule)."""
    score = rollout.score
    return (
        bool(score["verified"])
        and score["steps_checked"] > 0
        and score["extraction_rule"] == "answer_marker"
        and rollout.generation.finish_reason != "length"
    )


def keep_verified(rollouts: list[Rollout], max_kept: int) -> list[Rollout]:
    """One prompt's verified samples, distinct by their whitespace-normalised text, at most `max_kept`."""
    kept, seen = [], set()
    for rollout in rollouts:
        text = _normalised(rollout.generation.completion)
        if is_verified(rollout) and text not in seen:
            seen.add(text)
            kept.append(rollout)
        if len(kept) == max_kept:
            break
    return kept


def as_trace(item: EvalItem, completion: str, round_number: int, sample: int | None, rationalized: bool) -> dict:
    """A kept completion as a native trace record (its steps and answer parsed back out of the text)."""
    steps, answer = parse_completion(completion)
    return {
        "trace_version": "1.0",
        "id": f"{item.id}:rft-{round_number}:{'hint' if sample is None else sample}",
        "prompt": item.prompt,
        "steps": [{"i": n, "type": "reasoning", "content": s} for n, s in enumerate(steps, 1)],
        "final_answer": answer,
        "meta": {"source": "rft", "round": round_number, "sample": sample, "rationalized": rationalized, "of": item.id},
    }


def rationalize(sampler: Sampler, item: EvalItem, cfg: Config, round_number: int) -> dict | None:
    """One greedy try with the expected answer as a hint; its trace if the checkers verify it."""
    from tracetune.eval.scoring import score_item

    hint = f"(Hint: the answer is {item.expected_answer}. Show the work that reaches it.)"
    generation = sampler.hinted(item, hint, cfg.rft.sampling.max_new_tokens)
    score = score_item(item, generation.completion)
    rollout = Rollout(item, -1, (), generation, score)
    return as_trace(item, generation.completion, round_number, None, True) if is_verified(rollout) else None


def sample_round(
    sampler: Sampler, cfg: Config, prompts: list[Trace], round_number: int
) -> tuple[list[dict], list[dict], dict]:
    """(kept trace records, every sample's row for sampled.jsonl, the round's sampling summary)."""
    r, d = cfg.rft, dist.current()
    items = [as_item(t) for t in prompts]
    repeated = sorted(i for i, n in Counter(i.id for i in items).items() if n > 1)
    if repeated:  # checked where the samples' ids are made (item id, round, sample), before any sampling
        raise TracetuneError(
            f"rft round {round_number}: prompts share ids {repeated[:3]}; every trace needs its own id"
        )
    mine = items[d.rank :: d.world_size]
    groups = sampler.sample(mine, r.num_samples, r.sampling, f"rft:round-{round_number}")
    kept, rows = [], []
    for item, rollouts in zip(mine, groups, strict=True):
        chosen = keep_verified(rollouts, r.max_kept_per_prompt)
        kept += [as_trace(item, x.generation.completion, round_number, x.index, False) for x in chosen]
        if not chosen and r.rationalize:
            kept += [t for t in [rationalize(sampler, item, cfg, round_number)] if t]
        rows += [_sample_row(x) for x in rollouts]
    kept = [t for share in dist.gather_to_all(kept) for t in share]
    rows = [row for share in dist.gather_to_all(rows) for row in share]
    num = max(len(rows), 1)
    prompts_solved = len({row["id"] for row in rows if row["correct"]})
    summary = {
        "num_prompts": len(items),
        "num_sampled": len(rows),
        "num_verified": sum(row["kept_eligible"] for row in rows),
        "num_kept": len(kept),
        "num_rationalized": sum(t["meta"]["rationalized"] for t in kept),
        "yield": len(kept) / num,
        "sample_accuracy": sum(row["correct"] for row in rows) / num,
        "sample_verified_accuracy": sum(row["verified"] for row in rows) / num,
        "prompt_pass_rate": prompts_solved / max(len(items), 1),
        "truncation_ratio": sum(row["finish_reason"] == "length" for row in rows) / num,
    }
    return kept, rows, summary


def _sample_row(rollout: Rollout) -> dict:
    return {
        "id": rollout.item.id,
        "sample": rollout.index,
        "completion": rollout.generation.completion,
        "finish_reason": rollout.generation.finish_reason,
        "correct": bool(rollout.score["correct"]),
        "verified": bool(rollout.score["verified"]),
        "kept_eligible": is_verified(rollout),
    }


def round_config(cfg: Config) -> Config:
    """The SFT settings a round fine-tunes with: rft.num_epochs passes, rft.lr, a save at the end."""
    staged = cfg.model_copy(deep=True)
    staged.train.num_epochs, staged.train.max_steps = cfg.rft.num_epochs, None
    staged.train.lr = cfg.rft.lr or cfg.train.lr
    staged.train.eval_every_steps = None
    return staged


def _write_round_samples(round_dir: Path, kept: list[dict], rows: list[dict], summary: dict) -> None:
    """sampled.jsonl and sampling.json, then kept.jsonl through a rename: a round with kept.jsonl has finished
    sampling and has every file of it."""
    round_dir.mkdir(parents=True, exist_ok=True)
    files = TrainingDir(round_dir)
    files.sampled.unlink(missing_ok=True)
    for row in rows:
        append_jsonl(files.sampled, row)
    write_json(files.sampling, summary)
    staging = files.kept.with_suffix(".jsonl.tmp")
    staging.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in kept), encoding="utf-8")
    staging.rename(files.kept)


def round_examples(cfg: Config, tokenizer, round_dir: Path, prompts: list[Trace]):
    """Tokenized kept traces of a round (read back from kept.jsonl), plus the round prompts' originals."""
    d = cfg.data
    traces = list(prompts) if cfg.rft.include_original else []
    if TrainingDir(round_dir).kept.stat().st_size:  # an empty file: nothing was verified
        kept = load_traces(TrainingDir(round_dir).kept, "native")
        kept.raise_on_errors()
        traces = kept.records + traces
    if not traces:
        return []
    report = tokenize_traces(tokenizer, traces, d.instruction, d.max_seq_length, d.overlength_policy, str(round_dir))
    if report.issues:
        raise DataError(report.issues)
    return report.examples


def run_round(cfg, stage_dir: Path, model, tokenizer, train, val, heldout_items, round_number: int, resume: bool):
    """One round: sample and keep (unless kept.jsonl exists), fine-tune (resuming a checkpoint), evaluate."""
    from tracetune.models.checkpoints import latest_good_checkpoint
    from tracetune.train.loop import fit

    files = TrainingDir(stage_dir).round(round_number)
    round_dir = files.path
    solved = solved_ids(stage_dir, round_number, cfg.rft.max_kept_per_prompt) if cfg.rft.focus_unsolved else frozenset()
    prompts = round_prompts(train, round_number, cfg.rft.prompts_per_round, cfg.seed, solved)
    sampler = Sampler(model, tokenizer, cfg)
    summary = read_json(files.sampling) if files.kept.is_file() else None
    if summary is None:
        kept, rows, summary = sample_round(sampler, cfg, prompts, round_number)
        if dist.current().is_main:
            _write_round_samples(round_dir, kept, rows, summary)
        dist.barrier()
        crash_point(f"rft-round-{round_number}/sampled")
    log.info("rft round %d: kept %d of %d samples (yield %.3f)", round_number, summary["num_kept"],
             summary["num_sampled"], summary["yield"])  # fmt: skip
    examples = round_examples(cfg, tokenizer, round_dir, prompts)
    if examples:
        checkpoint = latest_good_checkpoint(files.checkpoints) if resume else None
        fit(round_config(cfg), round_dir, model, tokenizer, examples, val, resume_from=checkpoint)
    record = {"round": round_number, **summary, "num_train_examples": len(examples), "num_solved": len(solved)}
    if heldout_items:
        sampler.refresh()
        record["heldout"] = heldout(sampler, cfg, heldout_items, files.heldout().path)
    del sampler
    return record


def fit_rft(cfg: Config, stage_dir: Path, start_model: Path | str, tokenizer, train, val, heldout_items, resume: bool):
    """Every round not yet finished (rounds.jsonl has a line per finished one), from `start_model` or the
    newest finished round's weights; returns the stage's final_model directory (the last round's weights)."""
    from tracetune.models.sources import load_model
    from tracetune.train.loop import save_final_model, write_training

    stage = TrainingDir(stage_dir)
    done = [row["round"] for row in read_jsonl(stage.rounds)]
    source = stage.round(max(done)).final_model if done else start_model
    model = load_model(str(source), tokenizer, cfg.seed, cfg.model.attn_implementation)
    started = time.perf_counter() - (read_jsonl(stage.rounds) or [{"elapsed_s": 0.0}])[-1]["elapsed_s"]
    for number in range(len(done) + 1, cfg.rft.num_rounds + 1):
        record = run_round(cfg, stage_dir, model, tokenizer, train, val, heldout_items, number, resume)
        record["elapsed_s"] = round(time.perf_counter() - started, 3)
        if dist.current().is_main:
            append_jsonl(stage.rounds, record)
            tracking.mirror(stage.rounds, record)
    final_dir = save_final_model(model, tokenizer, stage_dir, "full")
    rounds = read_jsonl(stage.rounds)
    record = {"stage": "rft", "planned_steps": cfg.rft.num_rounds, "num_steps": len(rounds)}
    write_training(stage_dir, record | {"elapsed_s": rounds[-1]["elapsed_s"], "rounds": rounds})
    return final_dir
