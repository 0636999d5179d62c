"""Baselines end to end on the tiny model: a fine-tuned model worse than its few-shot base model fails the run."""

import json

from tests.conftest import REPO, TINY_CONFIG, write_jsonl
from tracetune.cli import main


def _traces(path, answer: str):
    records = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text().splitlines()[:64]]
    return write_jsonl(
        path, [{"id": r["id"], "prompt": r["prompt"], "steps": [], "final_answer": answer} for r in records]
    )


def _run(tmp_path, name: str, *overrides: str) -> int:
    args = ["run", str(TINY_CONFIG), f"output.root={tmp_path}", f"output.run_name={name}"]
    return main([*args, "train.save_every_steps=null", "train.eval_every_steps=null", *overrides])


def test_a_finetuned_model_worse_than_its_few_shot_base_fails_with_exit_3(tmp_path, capsys):
    """The base model is a tiny model taught to answer 7 (which the eval set expects); fine-tuning it on traces
    that answer 3 makes it worse than that base model shown five demonstrations."""
    items = [json.loads(line) for line in (REPO / "data" / "eval.jsonl").read_text().splitlines()[:8]]
    eval_file = write_jsonl(tmp_path / "eval7.jsonl", [{**i, "expected_answer": "7"} for i in items])
    teach = [f"data.train_file={_traces(tmp_path / 'train7.jsonl', '7')}", f"eval.eval_file={eval_file}"]
    assert _run(tmp_path, "base", *teach, "eval.run_base=false", "train.max_steps=40") == 0
    base = tmp_path / "base" / "final_model"
    worse = [f"model.source={base}", f"data.train_file={_traces(tmp_path / 'train3.jsonl', '3')}"]
    draws = "eval.baseline_draws=2"
    assert _run(tmp_path, "worse", *worse, f"eval.eval_file={eval_file}", "train.max_steps=20", draws) == 3
    run_dir = tmp_path / "worse"
    comparison = json.loads((run_dir / "eval" / "comparison.json").read_text())
    assert comparison["baselines"]["few_shot"]["accuracy"] == 1.0 and comparison["final_accuracy"] == 0.0
    assert comparison["baselines"]["few_shot_answer"]["accuracy"] == 1.0
    # Two draws of demonstrations per few-shot baseline, each its own seed; the best is compared with.
    for name in ("few_shot", "few_shot_answer"):
        assert [d["dir"] for d in comparison["baselines"][name]["draws"]] == [f"eval/{name}", f"eval/{name}/draw-2"]
    first, second = (
        json.loads((run_dir / d / "baseline.json").read_text()) for d in ("eval/few_shot", "eval/few_shot/draw-2")
    )
    assert first["demonstration_ids"] != second["demonstration_ids"]
    assert comparison["difference"] == -1.0 and comparison["difference_ci95"][1] < 0
    gates = {g["name"]: g for g in json.loads((run_dir / "gates.json").read_text())["gates"]}
    assert not gates["finetuned_beats_baseline"]["passed"] and not gates["finetuned_verified_beats_baseline"]["passed"]
    assert gates["finetuned_beats_baseline"]["value"]["baseline_value"] == 1.0
    summary = (run_dir / "summary.md").read_text().splitlines()
    assert (
        summary[2].startswith("**Fine-tuning did worse than prompting")
        and "failed: finetuned_beats_baseline" in summary[2]
    )
    shot = json.loads((run_dir / "eval" / "few_shot" / "baseline.json").read_text())
    assert shot["format"] == "chat" and len(shot["demonstration_ids"]) == 5  # the base was chat-trained by run 1
    assert "quality gates failed: finetuned_beats_baseline" in capsys.readouterr().err
    assert "Accuracy over 2 draws of demonstrations: 100.0% [" in (run_dir / "summary.md").read_text()
    assert main(["verify", str(run_dir)]) == 1  # every draw rescored and the comparison recomputed: only the gates
    assert f"{run_dir}: 2 problem(s)" in capsys.readouterr().out


def test_without_base_evaluation_the_comparison_gates_are_skipped_with_the_reason(tiny_cfg, tmp_path):
    from tests.conftest import tiny_run_args

    assert main(tiny_run_args(tmp_path, "output.run_name=nb", "eval.run_base=false", "train.max_steps=2")) == 0
    gates = {g["name"]: g for g in json.loads((tmp_path / "nb" / "gates.json").read_text())["gates"]}
    for name in ("finetuned_beats_baseline", "finetuned_verified_beats_baseline"):
        assert gates[name]["status"] == "skip" and "eval.run_base is false" in gates[name]["detail"]


def test_eval_few_shot_baseline_alone(tmp_path, capsys):
    args = ["eval", "--model", "tiny:gemma3", "--eval-set", "data/eval.jsonl", "--out", str(tmp_path / "fs")]
    assert main([*args, "--baseline", "few_shot", "eval.max_items=3"]) == 2
    assert "--demos TRAIN.jsonl" in capsys.readouterr().err
    demos = ["--demos", "data/train.jsonl", "eval.max_items=3", "eval.max_new_tokens=8", "eval.num_shots=2"]
    assert main([*args, "--baseline", "few_shot", *demos]) == 0
    scores = json.loads((tmp_path / "fs" / "scores.json").read_text())
    assert scores["num_items"] == 3 and scores["baseline"]["format"] == "plain"
    assert scores["baseline"]["num_shots"] == 2 and scores["batch_invariance"]["batch_invariant"] is None
    answer_only = [*args[:-1], str(tmp_path / "fsa"), "--baseline", "few_shot_answer", *demos]
    assert main(answer_only) == 0
    scores = json.loads((tmp_path / "fsa" / "scores.json").read_text())
    assert scores["baseline"]["baseline"] == "few_shot_answer"
    assert (
        scores["baseline"]["demonstration_ids"]
        == json.loads((tmp_path / "fs" / "baseline.json").read_text())["demonstration_ids"]
    )
