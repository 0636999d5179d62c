"""Evaluate a model on eval items: predictions.jsonl written as batches finish, then scores.json.

A rerun into the same directory skips ids already in predictions.jsonl (a torn last line is dropped), so
a crash loses at most the batch in flight. Scores are computed from predictions.jsonl alone, beside
batch_invariance.json: whether this machine's batched greedy answers are one-at-a-time ones (eval/invariance.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from tracetune import dist
from tracetune.config import EvalConfig
from tracetune.data.render import end_of_turn_ids, render_prompt
from tracetune.data.traces import EvalItem
from tracetune.eval.baselines import FewShot
from tracetune.eval.generate import generate_batch, prefill_prefix, timed
from tracetune.eval.invariance import probe_generation
from tracetune.eval.scoring import sample_seed, score_item
from tracetune.faults import STOP, crash_point
from tracetune.layout import (
    EvalDir,
    read_predictions,
    trim_torn_line,
    write_json,
)

log = logging.getLogger("tracetune")


def generate_predictions(
    model,
    tokenizer,
    items: list[EvalItem],
    cfg: EvalConfig,
    instruction: str,
    out_dir: Path,
    seed: int,
    few_shot: FewShot | None = None,
) -> Path:
    """Append one predictions.jsonl line per item not yet done, batch by batch; with `few_shot`, each prompt
    follows its demonstrations (baseline.json records which).

    Under torchrun each rank generates every world_size-th remaining item; rank 0 gathers the rows and
    appends them in eval-set order once all are done (so a distributed evaluation resumes per run, not per batch).
    """
    d = dist.current()
    path = EvalDir(out_dir).predictions
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        trim_torn_line(path)
    done = dist.broadcast_from_main({row["id"] for row in read_predictions(path)} if d.is_main else None)
    todo = [item for item in items if item.id not in done]
    if done:
        log.info("%s: %d items already done, %d to go", path, len(done), len(todo))
    if todo and d.is_main:
        _probe(model, tokenizer, todo, instruction, out_dir, few_shot)
    batches = _predict(model, tokenizer, todo[d.rank :: d.world_size], cfg, instruction, seed, out_dir.name, few_shot)
    if not d.enabled:
        with open(path, "a", encoding="utf-8", newline="\n") as handle:
            for k, rows in enumerate(batches):
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                handle.flush()
                crash_point(f"eval-{out_dir.name}/batch-{k}")
                STOP.check(f"during evaluation ({out_dir.name}); finished items are kept")
        return path
    mine = [row for rows in batches for row in rows]
    gathered = [row for rows in dist.gather_to_all(mine) for row in rows]
    if d.is_main:
        order = {item.id: k for k, item in enumerate(items)}
        with open(path, "a", encoding="utf-8", newline="\n") as handle:
            for row in sorted(gathered, key=lambda r: order[r["id"]]):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    dist.barrier()
    return path


def _probe(model, tokenizer, items, instruction: str, out_dir: Path, few_shot) -> None:
    """Write batch_invariance.json: whether batched greedy answers are one-at-a-time ones on this machine (and
    baseline.json for a few-shot evaluation)."""
    model.eval()
    if few_shot is not None:
        write_json(EvalDir(out_dir).baseline, few_shot.evidence())
        probe = {"batch_invariant": None, "reason": "few-shot prompts follow a shared cached prefix"}
    else:
        prompts = [render_prompt(tokenizer, item.prompt, instruction) for item in items]
        probe = probe_generation(model, tokenizer, prompts)
    write_json(EvalDir(out_dir).batch_invariance, probe)
    if probe["batch_invariant"] is False:
        hint = (
            " ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 keeps oneDNN off AMX, which rounds by batch." if probe["amx"] else ""
        )
        log.warning(
            "%s: batched logits differ from one-at-a-time ones for this model, precision and machine (max %.3g): "
            "answers may depend on eval.batch_size here.%s",
            out_dir.name,
            probe["max_abs_logit_difference"],
            hint,
        )


def _predict(
    model, tokenizer, items: list[EvalItem], cfg: EvalConfig, instruction: str, seed: int, name: str, few_shot
):
    """Scored prediction rows for `items`, one list per generated batch (shortest prompts first)."""
    stop_ids = end_of_turn_ids(tokenizer)
    prefix, stop_strings = None, ()
    if few_shot is None:
        rendered = {item.id: render_prompt(tokenizer, item.prompt, instruction) for item in items}
    else:
        rendered = {item.id: few_shot.render(tokenizer, item.prompt) for item in items}
        stop_strings = few_shot.stop_strings
        if items and few_shot.prefix:
            prefix = prefill_prefix(model, tokenizer, few_shot.prefix)
    # Similar lengths in one batch waste less on left padding.
    items = sorted(items, key=lambda item: len(rendered[item.id]))
    model.eval()
    bar = tqdm(
        total=len(items),
        desc=f"eval {name}",
        unit="item",
        dynamic_ncols=True,
        disable=not dist.current().is_main,
    )
    k = cfg.num_samples
    per_batch = max(1, cfg.batch_size // k)  # eval.batch_size counts rows: an item's k samples are k rows
    for start in range(0, len(items), per_batch):
        batch = items[start : start + per_batch]
        prompts = [rendered[i.id] for i in batch for _ in range(k)]
        seeds = [sample_seed(seed, i.id, n) for i in batch for n in range(k)] if cfg.do_sample else None
        generations, seconds = timed(
            generate_batch, model, tokenizer, prompts, cfg, stop_ids, prefix, stop_strings, seeds
        )
        rows = []
        for n, item in enumerate(batch):
            samples = [_sample_row(item, gen) for gen in generations[n * k : (n + 1) * k]]
            row = {"id": item.id, "prompt": item.prompt, "expected_answer": item.expected_answer, **samples[0]}
            row.update(
                latency_ms=round(1000 * seconds / len(batch), 1),
                section=item.section,
                category=item.category,
                difficulty=item.difficulty,
            )
            if k > 1:
                row["samples"] = samples
            rows.append(row)
        bar.update(len(batch))
        log.debug("eval batch of %d in %.1f s", len(batch), seconds)
        yield rows
    bar.close()


def _sample_row(item: EvalItem, gen) -> dict:
    return {
        "completion": gen.completion,
        **score_item(item, gen.completion),
        "num_new_tokens": gen.num_new_tokens,
        "finish_reason": gen.finish_reason,
    }


def heldout_accuracy(model, tokenizer, items: list[EvalItem], cfg: EvalConfig, instruction: str, out_dir: Path,
                     seed: int, few_shot=None) -> dict:  # fmt: skip
    """`model` answers held-out items (prompted few-shot where `few_shot` is given) into out_dir and is scored by
    the evaluation's own code: the accuracy figures a training-time point logs (every rank gets them)."""
    from tracetune.eval.scoring import write_scores

    if dist.current().is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    generate_predictions(model, tokenizer, items, cfg, instruction, out_dir, seed, few_shot)
    scores = dist.on_main(lambda: write_scores(out_dir, items, str(out_dir)))
    keys = ("accuracy", "ci95", "verified_accuracy", "verified_ci95", "num_items")
    return {k: scores[k] for k in keys} | {"truncation_rate": scores["format"]["truncation_rate"]}
