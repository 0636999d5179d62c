"""MANIFEST.sha256 (written last) and `tracetune verify`: re-check every hash and recompute every gate."""

from __future__ import annotations

from pathlib import Path

from tracetune.hashing import hash_mismatches, sha256_file
from tracetune.layout import MANIFEST, RunLayout, read_json


def write_manifest(run_dir: Path) -> int:
    """sha256 of every file in the run directory, in `sha256sum` format; returns the file count."""
    files = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != MANIFEST and p.name != ".lock")
    lines = [f"{sha256_file(p)}  {p.relative_to(run_dir).as_posix()}" for p in files]
    (run_dir / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(files)


def check_manifest(run_dir: Path) -> list[str]:
    """Missing, altered and unlisted files."""
    path = run_dir / MANIFEST
    if not path.is_file():
        return [f"{MANIFEST} missing"]
    listed = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    problems = [f"{kind}: {name}" for name, kind in hash_mismatches(run_dir, listed)]
    present = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    problems += [f"not in manifest: {n}" for n in sorted(present - set(listed) - {MANIFEST, ".lock"})]
    return problems


def verify_run(run_dir: Path) -> tuple[list[str], list[dict]]:
    """(problems, recomputed gates). Problems: hash mismatches, gates that now fail or differ from gates.json."""
    from dataclasses import asdict

    from tracetune.evidence.card import check_card
    from tracetune.evidence.gates import compute_gates

    problems = check_manifest(run_dir)
    recorded = {}
    if (gates_json := read_json(RunLayout(run_dir).gates)) is not None:
        recorded = {g["name"]: g for g in gates_json["gates"]}
    else:
        problems.append(f"{RunLayout(run_dir).gates.name} missing")
    problems += recheck_scores(run_dir)
    problems += check_card(run_dir)
    gates = [asdict(g) for g in compute_gates(run_dir)]
    for gate in gates:
        if not gate["passed"]:
            problems.append(
                f"gate {gate['name']} fails: value {gate['value']}, threshold {gate['threshold']} {gate['detail']}"
            )
        old = recorded.get(gate["name"])
        if old is not None and old["passed"] != gate["passed"]:
            problems.append(f"gate {gate['name']}: recorded passed={old['passed']}, recomputed passed={gate['passed']}")
    return problems, gates


SCORE_KEYS = ("num_items", "accuracy", "verified_accuracy", "lucky_answer_rate")
COMPARISON_KEYS = ("strongest_baseline", "base_accuracy", "final_accuracy", "difference")


def recheck_scores(run_dir: Path) -> list[str]:
    """Score every prediction again from its completion and expected answer (the evaluations and the held-out
    points of rft and grpo stages), then scores.json and comparison.json from those rows; each disagreement
    with the files is a problem."""
    from tracetune.data.traces import EvalItem
    from tracetune.eval.scoring import compare_keep, compare_with_baselines, compute_scores, score_item
    from tracetune.layout import read_predictions

    problems, files = [], RunLayout(run_dir)
    seed = (read_json(files.run) or {}).get("seed", 0)
    for evaluation in files.evaluations():
        rows = read_predictions(evaluation.predictions)
        for row in rows:
            again = score_item(EvalItem(row["id"], row["prompt"], row["expected_answer"]), row["completion"])
            changed = sorted(k for k, v in again.items() if row.get(k) != v)
            if changed:
                where = files.relative(evaluation.predictions)
                problems.append(f"{where}: item {row['id']}: rescoring changes {', '.join(changed)}")
        recorded = read_json(evaluation.scores) or {}
        recomputed = compute_scores(rows)
        problems += [
            f"{files.relative(evaluation.scores)}: {k} is {recorded.get(k)}, predictions give {recomputed[k]}"
            for k in SCORE_KEYS
            if recorded.get(k) != recomputed[k]
        ]
    recorded, where = read_json(files.keep_comparison), files.relative(files.keep_comparison)
    if recorded is not None:
        stages = list(recorded.get("stages", {}))
        recomputed = compare_keep(files.keep_root, seed, stages)
        problems += [
            f"{where}: {k} is {recorded.get(k)}, predictions give {recomputed[k]}"
            for k in ("num_items", "num_base_correct", "num_kept")
            if recorded.get(k) != recomputed[k]
        ]
        problems += [
            f"{where}: stage {stage} kept {recorded['stages'][stage]['num_kept']}, "
            f"predictions give {recomputed['stages'][stage]['num_kept']}"
            for stage in stages
            if recorded["stages"][stage]["num_kept"] != recomputed["stages"][stage]["num_kept"]
        ]
    recorded = read_json(files.comparison)
    if recorded is not None:
        recomputed = compare_with_baselines(files.eval_root, seed)
        problems += [
            f"{files.relative(files.comparison)}: {k} is {recorded.get(k)}, predictions give {recomputed[k]}"
            for k in COMPARISON_KEYS
            if recorded.get(k) != recomputed[k]
        ]
    return problems
