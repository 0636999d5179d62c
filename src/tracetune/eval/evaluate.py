"""Evaluate a model on eval items: predictions.jsonl written as batches finish, then scores.json.

A rerun into the same directory skips ids already in predictions.jsonl (a torn last line is dropped), so
a crash loses at most the batch in flight. Scores are computed from predictions.jsonl alone, beside
batch_invariance.json: whether this machine's batched greedy answers are one-at-a-time ones (eval/invariance.py).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from tracetune.config import EvalConfig
from tracetune.data.render import end_of_turn_ids, parse_completion, render_prompt
from tracetune.data.traces import EvalItem
from tracetune.eval.generate import generate_batch, timed
from tracetune.eval.invariance import probe_generation
from tracetune.eval.score import answers_match, extract_answer
from tracetune.eval.stats import mcnemar_exact, paired_bootstrap, wilson_interval
from tracetune.faults import STOP, crash_point
from tracetune.train import distributed

log = logging.getLogger("tracetune")


def read_predictions(path: Path) -> list[dict]:
    """Every complete line of a predictions file; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _trim_torn_line(path: Path) -> None:
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def score_item(item: EvalItem, completion: str) -> dict:
    answer, rule = extract_answer(completion)
    correct, match_rule = answers_match(answer, item.expected_answer)
    steps, _ = parse_completion(completion)
    return {
        "extracted_answer": answer,
        "extraction_rule": rule,
        "correct": correct,
        "match_rule": match_rule,
        "num_steps": len(steps),
    }


def generate_predictions(
    model, tokenizer, items: list[EvalItem], cfg: EvalConfig, instruction: str, out_dir: Path, seed: int
) -> Path:
    """Append one predictions.jsonl line per item not yet done, batch by batch.

    Under torchrun each rank generates every world_size-th remaining item; rank 0 gathers the rows and
    appends them in eval-set order once all are done (so a distributed evaluation resumes per run, not per batch).
    """
    d = distributed.current()
    path = out_dir / "predictions.jsonl"
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _trim_torn_line(path)
    done = distributed.broadcast_from_main({row["id"] for row in read_predictions(path)} if d.is_main else None)
    todo = [item for item in items if item.id not in done]
    if done:
        log.info("%s: %d items already done, %d to go", path, len(done), len(todo))
    if todo and d.is_main:
        _probe(model, tokenizer, todo, cfg, instruction, out_dir)
    batches = _predict(model, tokenizer, todo[d.rank :: d.world_size], cfg, instruction, seed, out_dir.name)
    if not d.enabled:
        with open(path, "a", encoding="utf-8", newline="\n") as handle:
            for k, rows in enumerate(batches):
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                handle.flush()
                crash_point(f"eval-{out_dir.name}/batch-{k}")
                STOP.check(f"during evaluation ({out_dir.name}); finished items are kept")
        return path
    mine = [row for rows in batches for row in rows]
    gathered = [row for rows in distributed.gather_to_all(mine) for row in rows]
    if d.is_main:
        order = {item.id: k for k, item in enumerate(items)}
        with open(path, "a", encoding="utf-8", newline="\n") as handle:
            for row in sorted(gathered, key=lambda r: order[r["id"]]):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    distributed.barrier()
    return path


def _probe(model, tokenizer, items: list[EvalItem], cfg: EvalConfig, instruction: str, out_dir: Path) -> None:
    """Write batch_invariance.json: whether batched greedy answers are one-at-a-time ones on this machine."""
    model.eval()
    prompts = [render_prompt(tokenizer, item.prompt, instruction) for item in items]
    probe = probe_generation(model, tokenizer, prompts, cfg)
    (out_dir / "batch_invariance.json").write_text(json.dumps(probe, indent=2) + "\n", encoding="utf-8")
    if probe["batch_invariant"] is False:
        log.warning(
            "%s: batched greedy logits differ from one-at-a-time ones on this machine (max %.3g): answers may "
            "depend on eval.batch_size here. ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 keeps oneDNN off AMX, where "
            "this comes from on Intel CPUs (README, 'How a trace is rendered').",
            out_dir.name,
            probe["max_abs_logit_difference"],
        )


def _predict(model, tokenizer, items: list[EvalItem], cfg: EvalConfig, instruction: str, seed: int, name: str):
    """Scored prediction rows for `items`, one list per generated batch (shortest prompts first)."""
    stop_ids = end_of_turn_ids(tokenizer)
    rendered = {item.id: render_prompt(tokenizer, item.prompt, instruction) for item in items}
    # Similar lengths in one batch waste less on left padding.
    items = sorted(items, key=lambda item: len(rendered[item.id]))
    model.eval()
    bar = tqdm(
        total=len(items),
        desc=f"eval {name}",
        unit="item",
        dynamic_ncols=True,
        disable=not distributed.current().is_main,
    )
    for start in range(0, len(items), cfg.batch_size):
        batch = items[start : start + cfg.batch_size]
        torch.manual_seed(seed + start)
        generations, seconds = timed(generate_batch, model, tokenizer, [rendered[i.id] for i in batch], cfg, stop_ids)
        rows = []
        for item, gen in zip(batch, generations, strict=True):
            row = {
                "id": item.id,
                "prompt": item.prompt,
                "expected_answer": item.expected_answer,
                "completion": gen.completion,
            }
            row.update(score_item(item, gen.completion))
            row.update(
                num_new_tokens=gen.num_new_tokens,
                finish_reason=gen.finish_reason,
                latency_ms=round(1000 * seconds / len(batch), 1),
                section=item.section,
                category=item.category,
                difficulty=item.difficulty,
            )
            rows.append(row)
        bar.update(len(batch))
        log.debug("eval batch of %d in %.1f s", len(batch), seconds)
        yield rows
    bar.close()


def _accuracy(rows: list[dict]) -> dict:
    correct = sum(bool(r["correct"]) for r in rows)
    low, high = wilson_interval(correct, len(rows))
    return {
        "num_items": len(rows),
        "num_correct": correct,
        "accuracy": correct / len(rows) if rows else 0.0,
        "ci95": [low, high],
    }


def compute_scores(rows: list[dict]) -> dict:
    """scores.json content from prediction rows alone."""
    scores = {**_accuracy(rows), "ci_method": "wilson"}
    for key in ("section", "category", "difficulty"):
        groups = defaultdict(list)
        for row in rows:
            if row.get(key) is not None:
                groups[row[key]].append(row)
        scores[f"by_{key}"] = {name: _accuracy(group) for name, group in sorted(groups.items())}
    n = max(len(rows), 1)
    reasons = defaultdict(int)
    for row in rows:
        reasons[row["finish_reason"]] += 1
    scores["format"] = {
        "extraction_rate": sum(r["extraction_rule"] != "none" for r in rows) / n,
        "answer_marker_rate": sum(r["extraction_rule"] == "answer_marker" for r in rows) / n,
        "truncation_rate": reasons["length"] / n,
        "mean_steps": sum(r["num_steps"] for r in rows) / n,
        "finish_reasons": dict(reasons),
    }
    seconds = sum(r["latency_ms"] for r in rows) / 1000
    tokens = sum(r["num_new_tokens"] for r in rows)
    scores["throughput"] = {
        "generation_s": round(seconds, 2),
        "num_new_tokens": tokens,
        "new_tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "items_per_s": round(len(rows) / seconds, 3) if seconds else None,
    }
    return scores


def write_scores(out_dir: Path, items: list[EvalItem], model_name: str) -> dict:
    """Score the predictions of exactly `items` (in their order) and write scores.json."""
    by_id = {row["id"]: row for row in read_predictions(out_dir / "predictions.jsonl")}
    rows = [by_id[item.id] for item in items if item.id in by_id]
    scores = {"model": model_name, **compute_scores(rows)}
    probe = out_dir / "batch_invariance.json"
    scores["batch_invariance"] = json.loads(probe.read_text(encoding="utf-8")) if probe.is_file() else None
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    low, high = scores["ci95"]
    log.info(
        "%s: accuracy %.1f%% (95%% CI %.1f-%.1f) on %d items",
        out_dir.name,
        100 * scores["accuracy"],
        100 * low,
        100 * high,
        scores["num_items"],
    )
    return scores


def compare_predictions(base_dir: Path, final_dir: Path, seed: int = 0) -> dict:
    """Paired comparison of two prediction files on their shared ids."""
    base = {r["id"]: r for r in read_predictions(base_dir / "predictions.jsonl")}
    final = {r["id"]: r for r in read_predictions(final_dir / "predictions.jsonl")}
    ids = [i for i in final if i in base]
    a = [bool(base[i]["correct"]) for i in ids]
    b = [bool(final[i]["correct"]) for i in ids]
    improved = [i for i, x, y in zip(ids, a, b, strict=True) if y and not x]
    regressed = [i for i, x, y in zip(ids, a, b, strict=True) if x and not y]
    diff, low, high = paired_bootstrap(a, b, seed=seed) if ids else (0.0, 0.0, 0.0)
    return {
        "num_paired_items": len(ids),
        "base_accuracy": sum(a) / len(ids) if ids else 0.0,
        "final_accuracy": sum(b) / len(ids) if ids else 0.0,
        "difference": diff,
        "difference_ci95": [low, high],
        "ci_method": "paired bootstrap, 10000 resamples",
        "mcnemar_p": mcnemar_exact(len(improved), len(regressed)),
        "improved_ids": improved,
        "regressed_ids": regressed,
    }
