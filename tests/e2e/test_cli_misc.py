import json

import pytest

from tracetune.cli import main


def test_config_explain_and_show(capsys):
    assert main(["config", "explain"]) == 0
    out = capsys.readouterr().out
    assert "train.grad_accum_steps (int, default 1)" in out
    assert main(["config", "show", "configs/tiny_test.yaml", "train.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "packaged:gemma3-270m" in out and "packaged:smollm2-135m" in out and "tiny:gemma3" in out


def test_data_stats_reports_categories_and_histogram(capsys):
    assert main(["data", "stats", "data/train.jsonl", "--tokenizer", "tiny:gemma3"]) == 0
    out = capsys.readouterr().out
    assert "arithmetic" in out and "steps per record" in out and "p50" in out


def test_eval_command_writes_predictions_and_scores(tmp_path):
    out = tmp_path / "ev"
    assert (
        main(
            [
                "eval",
                "--model",
                "tiny:gemma3",
                "--eval-set",
                "data/eval.jsonl",
                "--out",
                str(out),
                "eval.max_items=3",
                "eval.max_new_tokens=4",
            ]
        )
        == 0
    )
    scores = json.loads((out / "scores.json").read_text())
    assert scores["num_items"] == 3 and (out / "logs" / "eval.log").is_file()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_eval_of_a_runs_model_uses_the_runs_settings(tiny_run_dir, tmp_path, caplog):
    """Without --config, a run's final_model is evaluated with the run's own evaluation settings (and the log says
    so), so it reproduces the run's final evaluation answer for answer."""
    out = tmp_path / "again"
    model = tiny_run_dir / "final_model"
    with caplog.at_level("INFO", logger="tracetune"):
        assert main(["eval", "--model", str(model), "--eval-set", "data/eval.jsonl", "--out", str(out)]) == 0
    assert f"evaluation settings from {tiny_run_dir / 'config.yaml'}: precision fp32, max_items 8" in caplog.text
    assert "max_new_tokens 24, batch_size 4" in caplog.text

    def answers(directory):
        return [(r["id"], r["completion"]) for r in map(json.loads, (directory / "predictions.jsonl").open())]

    assert answers(out) == answers(tiny_run_dir / "eval" / "final")
    other = tmp_path / "short"
    assert (
        main(["eval", "--model", str(model), "--eval-set", "data/eval.jsonl", "--out", str(other), "eval.max_items=2"])
        == 0
    )
    assert len(answers(other)) == 2


def test_train_command_writes_a_model_and_metrics(tmp_path):
    from tests.conftest import TINY_CONFIG

    args = ["train", str(TINY_CONFIG), f"output.root={tmp_path}", "output.run_name=t", "train.max_steps=2"]
    assert main(args) == 0
    run_dir = tmp_path / "t"
    assert (run_dir / "final_model" / "model.safetensors").is_file() and (run_dir / "logs" / "train.log").is_file()
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' not in x]
    assert steps == [1, 2]
    assert main(args) == 2  # never overwrites


def test_eval_works_outside_the_repository(tmp_path, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    args = ["eval", "--model", "tiny:llama", "--eval-set", str(REPO / "data" / "eval.jsonl"), "--out", "ev"]
    assert main([*args, "eval.max_items=2", "eval.max_new_tokens=2"]) == 0
    assert json.loads((tmp_path / "ev" / "scores.json").read_text())["num_items"] == 2


def test_train_without_a_training_file_is_a_clear_error(tmp_path, capsys):
    from tests.conftest import TINY_CONFIG

    assert main(["train", str(TINY_CONFIG), f"output.root={tmp_path}", "data.train_file=null"]) == 2
    assert "data.train_file: training needs a file" in capsys.readouterr().err


def test_a_torchrun_rank_exits_with_mains_code_and_its_output_flushed(tmp_path):
    """Under torchrun (WORLD_SIZE set) `python -m tracetune` leaves through os._exit: the exit code and the
    buffered stdout and stderr must survive it."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    env = {**os.environ, "WORLD_SIZE": "1", "PYTHONUNBUFFERED": ""}
    ok = subprocess.run([sys.executable, "-m", "tracetune", "models", "list"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "packaged:gemma3-270m" in ok.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "tracetune", "data", "validate", str(bad)], capture_output=True, text=True, env=env
    )
    assert failed.returncode == 1 and f"{bad}:1: error:" in failed.stdout, failed.stderr


def test_eval_with_samples_reports_pass_and_majority(tmp_path):
    args = ["eval", "--model", "tiny:gemma3", "--eval-set", "data/eval.jsonl", "--out", str(tmp_path / "s")]
    sampling = ["eval.do_sample=true", "eval.num_samples=3", "eval.temperature=2.0"]
    assert main([*args, "eval.max_items=4", "eval.max_new_tokens=6", *sampling]) == 0
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())
    sampled = scores["sampled"]
    assert sampled["num_samples"] == 3 and set(sampled["pass_at"]) == {"1", "2"}
    rows = [json.loads(line) for line in (tmp_path / "s" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["samples"]) == 3 and r["completion"] == r["samples"][0]["completion"] for r in rows)
    samples = [s for r in rows for s in r["samples"]]
    assert sampled["truncation_rate"] == sum(s["finish_reason"] == "length" for s in samples) / 12 > 0.5
    assert scores["throughput"]["num_new_tokens"] == sum(s["num_new_tokens"] for s in samples)
