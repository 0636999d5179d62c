"""The model card: Hugging Face metadata and text from the run's files; verify catches a card that drifted."""

import json
import shutil

import yaml

from tracetune.evidence.card import base_model, build_card, check_card


def test_the_card_carries_the_runs_numbers(tiny_run_dir):
    card = (tiny_run_dir / "final_model" / "README.md").read_text()
    assert card == build_card(tiny_run_dir)
    meta = yaml.safe_load(card.split("---\n")[1])
    scores = json.loads((tiny_run_dir / "eval" / "final" / "scores.json").read_text())
    comparison = json.loads((tiny_run_dir / "eval" / "comparison.json").read_text())
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    baseline = comparison["strongest_baseline"].replace("_", "-")
    assert metrics["accuracy"] == round(scores["accuracy"], 4)
    assert metrics["verified accuracy"] == round(scores["verified_accuracy"], 4)
    assert metrics[f"{baseline} base model accuracy"] == round(comparison["base_accuracy"], 4)
    assert meta["library_name"] == "transformers" and "tracetune" in meta["tags"] and "base_model" not in meta
    assert "## Quality gates" in card and "| evidence_complete | pass |" in card


def test_verify_reports_a_card_that_does_not_match(tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    assert check_card(run) == []
    path = run / "final_model" / "README.md"
    path.write_text(path.read_text().replace("value: ", "value: 9"))
    assert check_card(run) == [
        "final_model/README.md does not match the run's files (rebuild it with `tracetune report`)"
    ]
    path.unlink()
    assert check_card(run) == ["final_model/README.md missing"]


def test_base_model_and_license_where_known():
    assert base_model("packaged:gemma3-270m") == {"base_model": "google/gemma-3-270m", "license": "gemma"}
    assert base_model("packaged:smollm2-135m")["license"] == "apache-2.0"
    assert base_model("google/gemma-2b") == {"base_model": "google/gemma-2b"}
    assert base_model("tiny:gemma3") == {}
