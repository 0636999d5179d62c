"""The CLI end to end on the tiny model: `tracetune run`, then verify, report and compare on its directory."""

import json
import shutil

import pytest

from tests.conftest import REPO
from tests.conftest import tiny_run_args as _args
from tracetune.cli import main
from tracetune.evidence.manifest import verify_run

EXPECTED_FILES = {
    "config.yaml",
    "run.json",
    "env.json",
    "env_snapshot.txt",
    "gpu_snapshot.txt",
    "metrics.jsonl",
    "training.json",
    "logs/train.log",
    "logs/eval.log",
    "gates.json",
    "summary.md",
    "report.html",
    "loss.png",
    "MANIFEST.sha256",
    "final_model/config.json",
    "final_model/README.md",  # the model card
    "final_model/generation_config.json",
    "final_model/model.safetensors",
    "final_model/tokenizer.json",
    "final_model/tokenizer_config.json",
    "final_model/chat_template.jinja",
    "eval/base/predictions.jsonl",
    "eval/base/scores.json",
    "eval/base/batch_invariance.json",
    "eval/final/predictions.jsonl",
    "eval/final/scores.json",
    "eval/final/batch_invariance.json",
    "eval/few_shot/predictions.jsonl",
    "eval/few_shot/scores.json",
    "eval/few_shot/batch_invariance.json",
    "eval/few_shot/baseline.json",
    "eval/few_shot_answer/predictions.jsonl",
    "eval/few_shot_answer/scores.json",
    "eval/few_shot_answer/batch_invariance.json",
    "eval/few_shot_answer/baseline.json",
    "eval/comparison.json",
} | {
    f"checkpoints/{step}/{name}"
    for step in ("step-000004", "step-000008")
    for name in (
        "model/config.json",
        "model/generation_config.json",
        "model/model.safetensors",
        "optimizer.pt",
        "trainer_state.pt",
        "config.yaml",
        "probe.json",
        "MANIFEST.json",
        "COMMITTED",
    )
}


@pytest.fixture
def run_dir(tiny_run_dir):
    return tiny_run_dir


def _files(run_dir):
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


def test_run_directory_holds_exactly_the_expected_files(run_dir):
    assert _files(run_dir) == EXPECTED_FILES


def test_metrics_and_predictions_line_counts(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len([r for r in rows if r.get("split") != "val"]) == 8  # log_every_steps=1, max_steps=8
    assert [r["step"] for r in rows if r.get("split") == "val"] == [0, 4, 8]
    for which in ("base", "final"):
        assert len((run_dir / "eval" / which / "predictions.jsonl").read_text().splitlines()) == 8


def test_run_json_and_env_record_the_run(run_dir):
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["ended_at"].endswith("Z") and run["started_at"] <= run["ended_at"]
    assert set(run["data_sha256"]) == {f"{REPO}/data/train.jsonl", f"{REPO}/data/eval.jsonl"}
    assert set(run["git"]) == {"commit", "dirty"} and run["argv"]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["device"] == "cpu" and "torch" in env["packages"] and env["ram_gb"] > 0
    kernels = env["cpu_kernels"]  # checked in the evaluation's precision (fp32 here: no packed bf16 linears)
    assert kernels["dtype"] == "float32" and set(kernels["checks"]) == {"matmul_rows", "attention_padding"}
    assert env["evaluation_numerics"]
    for which in ("base", "final"):  # every evaluation records whether its batches were exact here
        probe = json.loads((run_dir / "eval" / which / "scores.json").read_text())["batch_invariance"]
        assert isinstance(probe["batch_invariant"], bool) and probe["num_steps"] == 4 and probe["dtype"] == "float32"
        assert probe["kernels"]["dtype"] == "float32" and isinstance(probe["probes_agree"], bool)
    assert "No GPU was used" in (run_dir / "gpu_snapshot.txt").read_text()
    for log in ("train.log", "eval.log"):
        data = (run_dir / "logs" / log).read_bytes()
        assert data and b"\r\n" not in data
        data.decode("utf-8")


def test_gates_are_computed_and_pass(run_dir):
    gates = json.loads((run_dir / "gates.json").read_text())
    by_name = {g["name"]: g for g in gates["gates"]}
    assert gates["passed"] and set(by_name) == {
        "training_completed",
        "loss_decreased",
        "no_nan_or_inf",
        "checkpoint_reloads",
        "final_model_loads",
        "gpu_used",
        "eval_final_complete",
        "eval_base_complete",
        "eval_few_shot_complete",
        "eval_few_shot_answer_complete",
        "finetuned_beats_baseline",
        "finetuned_verified_beats_baseline",
        "kept_what_base_knew",
        "evidence_complete",
    }
    assert by_name["gpu_used"]["status"] == "skip"
    keep = by_name["kept_what_base_knew"]  # the tiny config sets no keep set: skipped, saying why
    assert keep["status"] == "skip" and keep["detail"].startswith("eval.keep_file is not set")
    assert by_name["checkpoint_reloads"]["value"] == 0.0
    assert by_name["training_completed"]["value"] == 8


def test_summary_reads_the_files(run_dir):
    text = (run_dir / "summary.md").read_text()
    for heading in (
        "## Configuration",
        "## Training results",
        "### Loss per epoch",
        "## Evaluation",
        "## Quality gates",
        "## Artifacts",
    ):
        assert heading in text
    metrics_last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' not in x][
        -1
    ]
    assert f"{metrics_last['loss']:.4f}" in text


def test_verify_passes_then_catches_tampering(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["verify", str(copy)]) == 0
    metrics = copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"loss": ', '"loss": 1', 1))
    (copy / "eval" / "final" / "scores.json").unlink()
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "altered: metrics.jsonl" in out and "missing: eval/final/scores.json" in out
    assert "gate evidence_complete fails" in out


def test_verify_rescores_every_prediction(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    path = copy / "eval" / "final" / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["correct"] = not rows[0]["correct"]  # a hand-edited score, hashes left alone
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = verify_run(copy)[0]
    assert f"eval/final/predictions.jsonl: item {rows[0]['id']}: rescoring changes correct" in problems
    assert any(p.startswith("eval/final/scores.json: accuracy is") for p in problems)
    assert any(p.startswith("eval/comparison.json: final_accuracy is") for p in problems)


def test_report_regenerates_from_files(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "summary.md").unlink()
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "summary.md").read_text() == (run_dir / "summary.md").read_text()
    assert 'data-plots-expected="4"' in (copy / "report.html").read_text()


def test_compare_two_runs(run_dir, tmp_path, capsys):
    assert main(_args(tmp_path, "output.run_name=r2", "train.max_steps=4", "eval.run_base=false")) == 0
    capsys.readouterr()
    assert main(["compare", str(run_dir), str(tmp_path / "r2"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config_differences"]["train.max_steps"] == [8, 4]
    assert result["config_differences"]["eval.run_base"] == [True, False]
    assert result["metrics"]["steps"] == [8, 4]
    assert main(["compare", str(run_dir), str(tmp_path / "r2")]) == 0
    assert "| train.max_steps | 8 | 4 |" in capsys.readouterr().out


def test_failing_gate_exits_3_after_writing_everything(tmp_path, capsys):
    assert (
        main(
            _args(
                tmp_path,
                "output.run_name=g",
                "gates.min_accuracy_gain=0.5",
                "train.max_steps=2",
                "train.save_every_steps=null",
                "train.eval_every_steps=null",
            )
        )
        == 3
    )
    run_dir = tmp_path / "g"
    gates = json.loads((run_dir / "gates.json").read_text())
    failed = [g["name"] for g in gates["gates"] if not g["passed"]]
    assert not gates["passed"] and failed == ["finetuned_beats_baseline", "finetuned_verified_beats_baseline"]
    assert (run_dir / "MANIFEST.sha256").is_file() and (run_dir / "report.html").is_file()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "gates_failed"
    assert "quality gates failed: finetuned_beats_baseline" in capsys.readouterr().err


def test_bad_config_fails_before_anything_is_created(tmp_path, capsys):
    assert main(_args(tmp_path, "output.run_name=bad", "train.lr=-1", "train.bogus=1")) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "train.bogus: unknown key" in err
    assert not (tmp_path / "bad").exists()


def test_bad_data_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import tracetune.models.sources as sources

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "final_answer": "1"}\n{"prompt": "q2"}\n', encoding="utf-8")
    monkeypatch.setattr(sources, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(sources, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was loaded"))
    assert main(_args(tmp_path, "output.run_name=bad", f"data.train_file={bad}")) == 2
    assert f"{bad}:2: error: final_answer: missing" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_existing_run_directory_is_refused_and_untouched(run_dir, capsys):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    assert main(_args(run_dir.parent, "output.run_name=r1")) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
