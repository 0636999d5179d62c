"""Baselines end to end on the tiny model: a fine-tuned model worse than its few-shot base model fails the run."""

import json

import pytest

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


@pytest.mark.slow
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


def _skill(kind: str, n: int) -> dict:
    """Two skills a tiny model can learn: the colour of a numbered box is red; the count of a numbered jar is 9."""
    if kind == "colour":
        return {"prompt": f"What colour is box {n}?", "final_answer": "red"}
    return {"prompt": f"How many coins are in jar {n}?", "final_answer": "9"}


def _skill_traces(path, kinds: tuple[str, ...]):
    records = [{"id": f"{k}-{n}", **_skill(k, n), "steps": []} for n in range(40) for k in kinds]
    return write_jsonl(path, records)


def test_fine_tuning_on_one_of_two_skills_trips_the_keep_gate_and_on_both_keeps(tmp_path, capsys):
    """A tiny model taught two skills, then fine-tuned on one of them alone: it forgets the other, and
    kept_what_base_knew fails; fine-tuned on both, it keeps what it knew and the gate passes."""
    both = _skill_traces(tmp_path / "both.jsonl", ("colour", "count"))
    keep_items = [
        {"id": f"keep-{k}-{n}", "prompt": s["prompt"], "expected_answer": s["final_answer"], "category": k}
        for n in range(100, 115)
        for k in ("colour", "count")
        for s in [_skill(k, n)]
    ]
    keep = write_jsonl(tmp_path / "keep.jsonl", keep_items)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", keep_items[:8])
    # No instruction: a 2-layer model answers a few-shot prompt only in the exact format it was trained on.
    common = [f"eval.eval_file={eval_file}", "eval.baselines=[zero_shot]", "eval.max_new_tokens=12"]
    common += ['data.instruction=""']
    assert _run(tmp_path, "base", f"data.train_file={both}", *common, "eval.run_base=false", "train.max_steps=60") == 0
    base = [f"model.source={tmp_path / 'base' / 'final_model'}", f"eval.keep_file={keep}", *common]
    narrow = _skill_traces(tmp_path / "count.jsonl", ("count",))
    assert _run(tmp_path, "narrow", *base, f"data.train_file={narrow}", "train.max_steps=30") == 3
    keep_json = json.loads((tmp_path / "narrow" / "eval" / "keep" / "comparison.json").read_text())
    assert keep_json["num_items"] == 25 and keep_json["num_base_correct"] >= 20  # the base knew both skills
    assert keep_json["by_category"]["colour"]["final"] < keep_json["by_category"]["colour"]["base"]
    gates = {g["name"]: g for g in json.loads((tmp_path / "narrow" / "gates.json").read_text())["gates"]}
    assert (
        not gates["kept_what_base_knew"]["passed"]
        and gates["kept_what_base_knew"]["value"]["difference_ci95"][1] < -0.05
    )
    summary = (tmp_path / "narrow" / "summary.md").read_text()
    assert "On the keep set it kept " in summary and "Fell: **colour**" in summary
    assert main(["verify", str(tmp_path / "narrow")]) == 1 and "keep/comparison.json" not in capsys.readouterr().out
    assert _run(tmp_path, "wide", *base, f"data.train_file={both}", "train.max_steps=30") == 0
    gates = {g["name"]: g for g in json.loads((tmp_path / "wide" / "gates.json").read_text())["gates"]}
    assert gates["kept_what_base_knew"]["passed"] and gates["kept_what_base_knew"]["status"] == "pass"
