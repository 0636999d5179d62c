"""Scoring without a model: an item's answer and work (score_item), an evaluation's scores (compute_scores,
scores.json), and the paired comparisons (with the strongest baseline, on the keep set). Imports neither torch
nor transformers, so `tracetune verify`, the report and the rl rewards rescore text without them."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from pathlib import Path

from tracetune.data.render import parse_completion
from tracetune.data.traces import EvalItem
from tracetune.eval.baselines import SHOWS_WORK
from tracetune.eval.score import answers_match, extract_answer, normalize_text
from tracetune.eval.stats import bootstrap_interval, mcnemar_exact, paired_bootstrap, pass_at_k, wilson_interval
from tracetune.eval.steps import check_steps
from tracetune.layout import (
    BASELINE_DIRS,
    KEEP_DIRS,
    EvalDir,
    draw_dirs,
    keep_model_dirs,
    read_json,
    read_predictions,
    write_json,
)

log = logging.getLogger("tracetune")


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


def sample_seed(seed: int, item_id: str, index: int) -> int:
    """The generator seed of one sample of one item: the same whatever batch the item lands in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}:{index}".encode()).digest()[:8], "little")


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
    if any("samples" in r for r in rows):
        scores["sampled"] = sampled_scores(rows)
    seconds = sum(r["latency_ms"] for r in rows) / 1000
    tokens = sum(s["num_new_tokens"] for r in rows for s in r.get("samples", [r]))
    scores["throughput"] = {
        "generation_s": round(seconds, 2),
        "num_new_tokens": tokens,
        "new_tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "items_per_s": round(len(rows) / seconds, 3) if seconds else None,
    }
    return scores


def _majority_correct(item_row: dict) -> bool:
    """Whether the most common normalised answer among an item's untruncated samples is right (ties: the one
    reached first in sample order); no answer is wrong."""
    answers = [s["extracted_answer"] for s in item_row["samples"] if s["finish_reason"] != "length"]
    answers = [a for a in answers if a is not None]
    if not answers:
        return False
    counts = Counter(normalize_text(a) for a in answers)
    top = max(counts.values())
    winner = next(a for a in answers if counts[normalize_text(a)] == top)
    return answers_match(winner, item_row["expected_answer"])[0]


def sampled_scores(rows: list[dict]) -> dict:
    """mean@k, unbiased pass@k (k = 1, 2, 4, ... up to the samples per item) and maj@k over sampled items, each
    with a bootstrap interval over items; a truncated sample counts as wrong, and the truncation rate is
    reported apart."""
    k = min(len(r["samples"]) for r in rows)

    def good(sample: dict, key: str) -> bool:
        return bool(sample[key]) and sample["finish_reason"] != "length"

    def summary(values: list[float]) -> dict:
        low, high = bootstrap_interval(values)
        return {"value": sum(values) / len(values), "ci95": [low, high]}

    result = {"num_samples": k, "ci_method": "bootstrap over items, 10000 resamples"}
    for key, label in (("correct", ""), ("verified", "verified_")):
        correct = [sum(good(s, key) for s in r["samples"][:k]) for r in rows]
        result[f"{label}mean_at_k"] = summary([c / k for c in correct])
        sizes = [2**e for e in range(k.bit_length()) if 2**e <= k]
        result[f"{label}pass_at"] = {str(n): summary([pass_at_k(k, c, n) for c in correct]) for n in sizes}
    result["maj_at_k"] = summary([float(_majority_correct(r)) for r in rows])
    samples = [s for r in rows for s in r["samples"][:k]]
    result["truncation_rate"] = sum(s["finish_reason"] == "length" for s in samples) / len(samples)
    return result


def write_scores(out_dir: Path, items: list[EvalItem], model_name: str) -> dict:
    """Score the predictions of exactly `items` (in their order) and write scores.json."""
    files = EvalDir(out_dir)
    by_id = {row["id"]: row for row in read_predictions(files.predictions)}
    rows = [by_id[item.id] for item in items if item.id in by_id]
    scores = {"model": model_name, **compute_scores(rows)}
    scores["baseline"] = read_json(files.baseline)
    scores["batch_invariance"] = read_json(files.batch_invariance)
    write_json(files.scores, scores)
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
    base = {r["id"]: r for r in read_predictions(EvalDir(base_dir).predictions)}
    final = {r["id"]: r for r in read_predictions(EvalDir(final_dir).predictions)}
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


def compare_with_baselines(eval_dir: Path, seed: int = 0) -> dict:
    """comparison.json: every baseline's accuracy; the strongest (highest accuracy, then verified accuracy),
    against which the fine-tuned model's accuracy is paired; and the strongest that shows its work (highest
    verified accuracy, then accuracy; an answer-only baseline has no steps to check), against which its verified
    accuracy is paired."""
    found = {}
    for name, sub in BASELINE_DIRS.items():
        draws = []
        for directory in draw_dirs(eval_dir / sub):
            rows = read_predictions(EvalDir(directory).predictions)
            if rows:
                draws.append({"dir": directory.relative_to(eval_dir.parent).as_posix(), **_accuracy(rows)})
        if draws:  # the best draw stands for the baseline: conservative for the claim that fine-tuning helped
            best = max(draws, key=lambda d: (d["accuracy"], d["verified_accuracy"]))
            found[name] = {**best, "draws": [{k: d[k] for k in ("dir", "accuracy", "ci95")} for d in draws]}
    strongest = max(found, key=lambda n: (found[n]["accuracy"], found[n]["verified_accuracy"]))
    working = [n for n in found if n in SHOWS_WORK] or [strongest]
    verified_against = max(working, key=lambda n: (found[n]["verified_accuracy"], found[n]["accuracy"]))
    final = eval_dir / "final"
    return {
        "strongest_baseline": strongest,
        "verified_baseline": verified_against,
        "baselines": found,
        **compare_predictions(eval_dir.parent / found[strongest]["dir"], final, seed),
        "verified": compare_predictions(eval_dir.parent / found[verified_against]["dir"], final, seed, key="verified"),
    }


def compare_keep(keep_dir: Path, seed: int = 0, stages: list[str] | tuple[str, ...] = ()) -> dict:
    """eval/keep/comparison.json: what the run's model kept of what the base model answered on the keep set,
    both prompted answer-only few-shot (paired, the gate's), and what its trained format costs beside that;
    per category, the accuracy before and after and the items lost. `stages` are the run's earlier stages
    (all but the last), each compared with the base the same way under `stages`."""
    base_dir = keep_dir / KEEP_DIRS["base"]
    base = {r["id"]: r for r in read_predictions(EvalDir(base_dir).predictions)}
    after = {r["id"]: r for r in read_predictions(EvalDir(keep_dir / KEEP_DIRS["answer_only"]).predictions)}
    known = [i for i, r in base.items() if r["correct"]]
    by_category: dict[str, dict] = {}
    kept = [i for i in known if after.get(i, {}).get("correct")]
    for item_id, row in base.items():
        category = by_category.setdefault(row.get("category") or "all", {"num_items": 0, "base": 0, "final": 0})
        category["num_items"] += 1
        category["base"] += bool(row["correct"])
        category["final"] += bool(after.get(item_id, {}).get("correct"))
        if row["correct"] and item_id not in kept:
            category.setdefault("lost_ids", []).append(item_id)
    return {
        "num_items": len(base),
        "num_base_correct": len(known),
        **_kept_by(keep_dir, KEEP_DIRS, known, seed),
        "by_category": by_category,
        "stages": {stage: _kept_by(keep_dir, keep_model_dirs(stage), known, seed) for stage in stages},
    }


def _kept_by(keep_dir: Path, dirs: dict[str, str], known: list[str], seed: int) -> dict:
    """One trained model on the keep set against the base: how many of the base's right answers it kept
    (prompted answer-only), the paired change, and the change in its trained format (None where not evaluated)."""
    base_dir, answer_only, trained = (
        keep_dir / KEEP_DIRS["base"],
        keep_dir / dirs["answer_only"],
        keep_dir / dirs["trained_format"],
    )
    right = {r["id"] for r in read_predictions(EvalDir(answer_only).predictions) if r["correct"]}
    return {
        "num_kept": sum(i in right for i in known),
        "answer_only": compare_predictions(base_dir, answer_only, seed),
        "trained_format": compare_predictions(base_dir, trained, seed)
        if read_predictions(EvalDir(trained).predictions)
        else None,
    }
