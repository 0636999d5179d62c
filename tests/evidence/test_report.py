import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium chromium-driver)")
def test_report_plots_render_in_headless_chromium(tiny_run_dir, tmp_path):
    page = tiny_run_dir / "report.html"
    assert "http://" not in page.read_text() and "https://" not in page.read_text()  # self-contained
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    expected = re.search(r'data-plots-expected="(\d+)"', result.stdout)
    rendered = re.search(r'data-plots-rendered="(\w+)"', result.stdout)
    assert expected and rendered, result.stderr[-2000:]
    assert int(expected.group(1)) == 4
    assert rendered.group(1) == expected.group(1), "some plots did not decode"


def test_report_has_the_plots_inline(tiny_run_dir):
    html = (tiny_run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    for title in ("Training and validation loss", "Learning rate", "Throughput", "Accuracy per category"):
        assert title in html
    assert (tiny_run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _scores(accuracy: float, verified: float, sampled: dict | None = None) -> dict:
    return {
        "accuracy": accuracy,
        "ci95": [max(0.0, accuracy - 0.1), min(1.0, accuracy + 0.1)],
        "verified_accuracy": verified,
        "verified_ci95": [0.0, 1.0],
        "lucky_answer_rate": accuracy - verified,
        "num_items": 10,
        "steps": {"step_validity": 0.9},
        "format": {"extraction_rate": 1.0, "answer_marker_rate": 1.0, "truncation_rate": 0.0, "mean_steps": 2.0},
        "throughput": {"new_tokens_per_s": 10.0, "items_per_s": 1.0},
        "by_category": {},
        "by_difficulty": {},
        **({"sampled": sampled} if sampled else {}),
    }


def _comparison(base: float, final: float) -> dict:
    paired = {"base_accuracy": base, "final_accuracy": final, "difference": final - base}
    return {
        "strongest_baseline": "few_shot",
        **paired,
        "difference_ci95": [final - base - 0.1, final - base + 0.1],
        "ci_method": "paired bootstrap",
        "mcnemar_p": 0.5,
        "improved_ids": [],
        "regressed_ids": [],
        "num_paired_items": 10,
        "verified": {**paired, "difference_ci95": [-0.1, 0.1]},
    }


def _data(comparison, failed=()):
    import dataclasses

    from tracetune.evidence.view import read_run

    data = read_run(Path("/nonexistent"))
    gates = [
        {"name": n, "passed": n not in failed, "status": "fail" if n in failed else "pass", "value": 1}
        for n in ("a", "b", "c")
    ]
    gates = {"passed": not failed, "gates": [{**g, "threshold": 1, "source": "x"} for g in gates]}
    scores = {**data.scores, "final": _scores(0.3, 0.2)}
    return dataclasses.replace(data, scores=scores, comparison=comparison, gates=gates)


def test_verdict_reads_the_interval_better_worse_or_no_detectable_difference():
    from tracetune.evidence.report import verdict, verdict_class

    better = verdict(_data(_comparison(0.12, 0.31)))
    assert better.startswith(
        "Fine-tuning raised accuracy from 12.0% (worked few-shot base) to 31.0% (+19.0 points, 95% CI +9.0"
    )
    assert "verified accuracy (right answer, every checked step valid) went from 12.0% (worked few-shot base)" in better
    assert better.endswith("3 of 3 gates passed.") and verdict_class(_data(_comparison(0.12, 0.31))) == "good"
    worse = verdict(_data(_comparison(0.22, 0.07), failed=("b",)))
    assert worse.startswith(
        "Fine-tuning did worse than prompting: accuracy went from 22.0% (worked few-shot base) to 7.0%"
    )
    assert worse.endswith("2 of 3 gates passed; failed: b.")
    # +5 points with an interval of [-5, +15] is not a gain: it says so and how many items would tell.
    unclear = _comparison(0.20, 0.25)
    text = verdict(_data(unclear))
    assert text.startswith("No detectable difference between fine-tuning and prompting: accuracy went from 20.0%")
    assert "; about 40 items would tell a difference this size" in text and verdict_class(_data(unclear)) == "neutral"
    answer_only = {**_comparison(0.12, 0.31), "strongest_baseline": "few_shot_answer", "verified_baseline": "zero_shot"}
    text = verdict(_data(answer_only))
    assert "from 12.0% (answer-only few-shot base)" in text and "went from 12.0% (zero-shot base)" in text
    assert verdict(_data(None)).startswith("The fine-tuned model scored 30.0% accuracy")
    assert "eval.batch_size" not in better
    moving = _data(_comparison(0.12, 0.31))
    probe = {"batch_invariant": False, "dtype": "bfloat16", "cpu_capability": "AVX512", "amx": True}
    moving.scores["final"] = {**moving.final, "batch_invariance": probe}
    assert "(bfloat16, AVX512, AMX) batched logits differ from one-at-a-time ones, so answers may move with " in (
        verdict(moving)
    )


def test_summary_shows_sampled_scores_and_failure_examples(tmp_path):
    from tracetune.evidence.report import write_summary

    value = {"value": 0.5, "ci95": [0.3, 0.7]}
    sampled = {"num_samples": 4, "mean_at_k": value, "pass_at": {"1": value, "2": value, "4": value}, "maj_at_k": value}
    data = _data(_comparison(0.1, 0.3))
    data.scores["final"] = _scores(0.3, 0.2, sampled)
    row = {"id": "x1", "expected_answer": "5", "extracted_answer": "5", "correct": True, "finish_reason": "eos"}
    data.predictions = {"final": [{**row, "work_valid": False, "first_bad_step": 2, "completion": "1. 2 + 2 = 5"}]}
    text = write_summary(tmp_path, data)
    for line in (
        "| mean@4 [95% CI] | 50.0% [30.0%, 70.0%] |",
        "| pass@2 |",
        "| maj@4 |",
        "### Examples: right answer, invalid step",
    ):
        assert line in text
    assert "first invalid step: 2" in text and "  1. 2 + 2 = 5" in text
