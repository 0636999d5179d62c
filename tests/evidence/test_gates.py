import json
import math
import shutil

import pytest
import torch

from tracetune.config import load_config
from tracetune.evidence.gates import compute_gates, gate_table


def _gate(run, name: str):
    """One gate computed from the run's files, found by name in the gate table."""
    cfg = load_config(run / "config.yaml")
    return dict(gate_table(cfg))[name](name, run, cfg)


def test_every_gate_is_named_once_and_reports_its_table_name(tiny_run_dir):
    cfg = load_config(tiny_run_dir / "config.yaml")
    names = [name for name, _ in gate_table(cfg)]
    assert len(names) == len(set(names)) and [g.name for g in compute_gates(tiny_run_dir)] == names


def _copy(tiny_run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run_dir, copy)
    return copy


def _rewrite_metrics(run_dir, change):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = change(rows)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_flat_loss_fails_loss_decreased(tiny_run_dir, tmp_path):
    run = _copy(tiny_run_dir, tmp_path)
    _rewrite_metrics(run, lambda rows: [{**r, "loss": 2.0} for r in rows])
    gate = _gate(run, "loss_decreased")
    assert not gate.passed and gate.value["first_10pct_loss"] == gate.value["last_10pct_loss"] == 2.0


def test_nan_fails_the_finite_gate(tiny_run_dir, tmp_path):
    run = _copy(tiny_run_dir, tmp_path)
    _rewrite_metrics(
        run, lambda rows: [{**r, "loss": math.nan} if r["step"] == 3 and "split" not in r else r for r in rows]
    )
    gate = _gate(run, "no_nan_or_inf")
    assert not gate.passed and gate.value == 1 and "3" in gate.detail


def test_missing_steps_fail_training_completed(tiny_run_dir, tmp_path):
    run = _copy(tiny_run_dir, tmp_path)
    _rewrite_metrics(run, lambda rows: [r for r in rows if r["step"] < 6])
    gate = _gate(run, "training_completed")
    assert not gate.passed and (gate.value, gate.threshold) == (5, 8)


def test_corrupt_checkpoint_falls_back_then_fails(tiny_run_dir, tmp_path):
    run = _copy(tiny_run_dir, tmp_path)
    newest = run / "checkpoints" / "step-000008" / "model" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    gates = {g.name: g for g in compute_gates(run)}
    assert gates["checkpoint_reloads"].passed and "step-000004" in gates["checkpoint_reloads"].source
    (run / "checkpoints" / "step-000004" / "COMMITTED").unlink()
    gates = {g.name: g for g in compute_gates(run)}
    assert not gates["checkpoint_reloads"].passed


def _edit_probes(run, edit) -> None:
    """Apply `edit` to every checkpoint's probe.json and re-seal its manifest, as a writer would have."""
    from tracetune.hashing import sha256_file

    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        probe = json.loads((ckpt / "probe.json").read_text())
        edit(probe)
        (ckpt / "probe.json").write_text(json.dumps(probe))
        manifest = json.loads((ckpt / "MANIFEST.json").read_text())
        manifest["probe.json"] = sha256_file(ckpt / "probe.json")
        (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


def test_probe_mismatch_fails_checkpoint_reloads(tiny_run_dir, tmp_path):
    run = _copy(tiny_run_dir, tmp_path)
    _edit_probes(run, lambda probe: probe["max"][0].__setitem__(0, probe["max"][0][0] + 0.5))
    gate = {g.name: g for g in compute_gates(run)}["checkpoint_reloads"]
    assert not gate.passed and abs(gate.value - 0.5) < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to reload a CUDA probe on CPU")
def test_cuda_probe_reloads_on_cpu_within_the_cross_device_tolerance(tiny_run_dir, tmp_path):
    run = _copy(tiny_run_dir, tmp_path)

    def recorded_on_cuda(probe, shift):
        probe["device"] = "cuda"
        probe["argmax"][0][0] += 1  # a near-tie flipped by another device's rounding is not a failure
        probe["max"][0][0] += shift

    _edit_probes(run, lambda probe: recorded_on_cuda(probe, 0.05))
    gate = {g.name: g for g in compute_gates(run)}["checkpoint_reloads"]
    assert gate.passed and 0.04 < gate.value < 0.06 and gate.threshold == 0.1
    assert gate.detail == "probe recorded on cuda, reloaded on cpu"
    _edit_probes(run, lambda probe: recorded_on_cuda(probe, 0.5))  # beyond rounding: a different model
    assert not {g.name: g for g in compute_gates(run)}["checkpoint_reloads"].passed


def test_missing_file_fails_evidence_complete(tiny_run_dir, tmp_path):
    run = _copy(tiny_run_dir, tmp_path)
    (run / "env_snapshot.txt").unlink()
    gate = {g.name: g for g in compute_gates(run)}["evidence_complete"]
    assert not gate.passed and gate.value == ["env_snapshot.txt"]


def test_bf16_weights_checkpoint_reloads_bit_exactly(tmp_path):
    """Training casts the fp32-loaded model to bf16, buffers included; the reload must do the same."""
    from tests.conftest import tiny_run_args
    from tracetune.cli import main

    args = tiny_run_args(tmp_path, "output.run_name=b", "train.precision=bf16-weights", "eval.eval_file=null")
    assert main(args) == 0
    gate = {g.name: g for g in compute_gates(tmp_path / "b")}["checkpoint_reloads"]
    assert gate.passed and gate.value == 0.0


def _grpo_run(tmp_path, rewards: list[float], heldout: list[float]):
    """A run directory holding only what the GRPO reward gate reads: config.yaml and grpo/metrics.jsonl."""
    from tracetune.config import dump_config

    run = tmp_path / "grpo_run"
    (run / "grpo").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config(None, ["stages=[sft,grpo]"])))
    rows = [{"step": k + 1, "reward": {"mean": r, "std": 0.1}} for k, r in enumerate(rewards)]
    step = max(1, len(rewards) // max(1, len(heldout) - 1))
    rows += [{"split": "heldout", "step": k * step, "verified_accuracy": v} for k, v in enumerate(heldout)]
    (run / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.mark.parametrize(
    ("rewards", "heldout", "passed"),
    [
        ([0.2, 0.3, 0.5, 0.8], [0.30, 0.20], False),  # reward up, held-out down: the reward was gamed
        ([0.2, 0.3, 0.5, 0.8], [0.30, 0.35], True),  # both up
        ([0.8, 0.5, 0.3, 0.2], [0.30, 0.20], True),  # both down: bad, but not this gate's failure
        ([0.5, 0.5, 0.5, 0.5], [0.30, 0.30], True),
    ],
)
def test_a_rising_reward_with_falling_heldout_accuracy_fails(tmp_path, rewards, heldout, passed):
    gate = _gate(_grpo_run(tmp_path, rewards, heldout), "grpo_reward_agrees_with_heldout")
    assert gate.passed is passed
    assert ("reward rose by" in gate.detail) is (not passed)


def test_rl_stages_add_their_gates_and_sft_gates_only_with_sft():
    both = [name for name, _ in gate_table(load_config(None, ["stages=[sft,rft]"]))]
    assert {"training_completed", "rft_completed", "rft_heldout_not_below_start", "rft_truncation_below_limit"} <= set(
        both
    )
    alone = [name for name, _ in gate_table(load_config(None, ["stages=[grpo]"]))]
    assert "training_completed" not in alone and "grpo_reward_agrees_with_heldout" in alone


@pytest.mark.parametrize(
    ("interval", "require_gain", "outcome", "passed"),
    [
        ([0.02, 0.20], False, "better", True),
        ([-0.07, 0.09], False, "unclear", True),
        ([-0.07, 0.09], True, "unclear", False),  # configs meant for decisions ask for a detectable gain
        ([-0.11, -0.01], False, "worse", False),
    ],
)
def test_comparison_gates_read_the_interval_not_the_point(
    tiny_run_dir, tmp_path, interval, require_gain, outcome, passed
):
    run = _copy(tiny_run_dir, tmp_path)
    path = run / "eval" / "comparison.json"
    comparison = json.loads(path.read_text())
    comparison |= {"difference": 0.01, "difference_ci95": interval, "strongest_baseline": "few_shot_answer"}
    comparison |= {"verified_baseline": "zero_shot"}
    path.write_text(json.dumps(comparison))
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("require_gain: false", f"require_gain: {str(require_gain).lower()}"))
    gate = _gate(run, "finetuned_beats_baseline")
    assert (gate.passed, gate.value["outcome"], gate.value["baseline"]) == (passed, outcome, "few_shot_answer")
    assert gate.detail.endswith(f"against the few-shot-answer base model: {outcome}")
    assert _gate(run, "finetuned_verified_beats_baseline").value["baseline"] == "zero_shot"
