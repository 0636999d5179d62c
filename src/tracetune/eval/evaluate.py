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
from tracetune.eval.baselines import FewShot
from tracetune.eval.generate import generate_batch, prefill_prefix, timed
from tracetune.eval.invariance import probe_generation
from tracetune.eval.score import answers_match, extract_answer
from tracetune.eval.stats import mcnemar_exact, paired_bootstrap, wilson_interval
from tracetune.eval.steps import check_steps
from tracetune.faults import STOP, crash_point
from tracetune.runfiles import read_json, read_predictions, write_json
from tracetune.train import distributed

log = logging.getLogger("tracetune")


def _trim_torn_line(path: Path) -> None:
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def score_item(item: EvalItem, completion: str) -> dict:
    """The answer's correctness and the work's validity: `verified` is a right answer with no failed checked
    step (eval/steps.py); a right answer after invalid work is counted as lucky in scores.json."""
    answer, rule = extract_answer(completion)
    correct, match_rule = answers_match(answer, item.expected_answer)
    steps, _ = parse_completion(completion)
    work = check_steps(steps, answer).as_row()
    return {
        "extracted_answer": answer,
        "extraction_rule": rule,
        "correct": correct,
        "match_rule": match_rule,
        "num_steps": len(steps),
        **work,
        "verified": bool(correct) and work["work_valid"],
    }


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
        _probe(model, tokenizer, todo, cfg, instruction, out_dir, few_shot)
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
    gathered = [row for rows in distributed.gather_to_all(mine) for row in rows]
    if d.is_main:
        order = {item.id: k for k, item in enumerate(items)}
        with open(path, "a", encoding="utf-8", newline="\n") as handle:
            for row in sorted(gathered, key=lambda r: order[r["id"]]):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    distributed.barrier()
    return path


def _probe(model, tokenizer, items, cfg: EvalConfig, instruction: str, out_dir: Path, few_shot) -> None:
    """Write batch_invariance.json: whether batched greedy answers are one-at-a-time ones on this machine (and
    baseline.json for a few-shot evaluation)."""
    model.eval()
    if few_shot is not None:
        write_json(out_dir / "baseline.json", few_shot.evidence())
        probe = {"batch_invariant": None, "reason": "few-shot prompts follow a shared cached prefix"}
    else:
        prompts = [render_prompt(tokenizer, item.prompt, instruction) for item in items]
        probe = probe_generation(model, tokenizer, prompts, cfg)
    write_json(out_dir / "batch_invariance.json", probe)
    if probe["batch_invariant"] is False:
        log.warning(
            "%s: batched greedy logits differ from one-at-a-time ones on this machine (max %.3g): answers may "
            "depend on eval.batch_size here. ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 keeps oneDNN off AMX, where "
            "this comes from on Intel CPUs (README, 'How a trace is rendered').",
            out_dir.name,
            probe["max_abs_logit_difference"],
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
        if items:
            prefix, stop_strings = prefill_prefix(model, tokenizer, few_shot.prefix), few_shot.stop_strings
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
        prompts = [rendered[i.id] for i in batch]
        generations, seconds = timed(generate_batch, model, tokenizer, prompts, cfg, stop_ids, prefix, stop_strings)
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
    verified = sum(bool(r.get("verified")) for r in rows)
    low, high = wilson_interval(correct, len(rows))
    v_low, v_high = wilson_interval(verified, len(rows))
    n = max(len(rows), 1)
    return {
        "num_items": len(rows),
        "num_correct": correct,
        "accuracy": correct / n,
        "ci95": [low, high],
        "num_verified": verified,
        "verified_accuracy": verified / n,
        "verified_ci95": [v_low, v_high],
        "lucky_answer_rate": (correct - verified) / n,
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
    checked = sum(r.get("steps_checked", 0) for r in rows)
    scores["steps"] = {
        "num_steps_checked": checked,
        "step_validity": sum(r.get("steps_valid", 0) for r in rows) / checked if checked else None,
        "items_with_checked_steps": sum(r.get("steps_checked", 0) > 0 for r in rows) / n,
        "items_with_invalid_work": sum(r.get("work_valid") is False for r in rows) / n,
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
    scores["baseline"] = read_json(out_dir / "baseline.json")
    scores["batch_invariance"] = read_json(out_dir / "batch_invariance.json")
    write_json(out_dir / "scores.json", scores)
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


def compare_predictions(base_dir: Path, final_dir: Path, seed: int = 0, key: str = "correct") -> dict:
    """Paired comparison of two prediction files on their shared ids, by `key` (correct or verified)."""
    base = {r["id"]: r for r in read_predictions(base_dir / "predictions.jsonl")}
    final = {r["id"]: r for r in read_predictions(final_dir / "predictions.jsonl")}
    ids = [i for i in final if i in base]
    a = [bool(base[i].get(key)) for i in ids]
    b = [bool(final[i].get(key)) for i in ids]
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


BASELINE_DIRS = {"zero_shot": "base", "few_shot": "few_shot"}  # baseline name -> directory under eval/


def compare_with_baselines(eval_dir: Path, seed: int = 0) -> dict:
    """comparison.json: every baseline's accuracy, the strongest one (highest accuracy, then verified
    accuracy), and the fine-tuned model paired against it on accuracy and on verified accuracy."""
    found = {}
    for name, sub in BASELINE_DIRS.items():
        rows = read_predictions(eval_dir / sub / "predictions.jsonl")
        if rows:
            found[name] = {"dir": f"eval/{sub}", **_accuracy(rows)}
    strongest = max(found, key=lambda n: (found[n]["accuracy"], found[n]["verified_accuracy"]))
    against = eval_dir / BASELINE_DIRS[strongest]
    final = eval_dir / "final"
    return {
        "strongest_baseline": strongest,
        "baselines": found,
        **compare_predictions(against, final, seed),
        "verified": compare_predictions(against, final, seed, key="verified"),
    }
