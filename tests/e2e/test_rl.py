"""RFT and GRPO as stages of a run on the tiny model: the files, the gates, and exact resume after kill -9.

The tiny model is first taught (the sft stage) traces answering 7 or 3, so its samples differ within a group
and GRPO has rewards to learn from; without that a random model's rewards are all 0 and nothing would train.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_CONFIG, write_jsonl
from tests.reliability.test_faults import cli

GRPO = [
    "stages=[sft,grpo]",
    "grpo.num_steps=4",
    "grpo.prompts_per_step=3",
    "grpo.group_size=4",
    "grpo.eval_every_steps=2",
    "grpo.save_every_steps=2",
    "grpo.lr=3e-3",
    "grpo.sampling.temperature=1.5",
    "grpo.sampling.max_new_tokens=12",
    # The tiny model's traces have no steps, so no sample is ever verified (the default reward): the shaped
    # correct-answer term gives its groups rewards that differ.
    "grpo.reward.verified=0",
    "grpo.reward.correct=1",
    # 12 characters cut most samples off; they are trained on here (the default masks them: tests/rl).
    "grpo.truncated=train",
]
RFT = [
    "stages=[sft,rft]",
    "rft.num_rounds=2",
    "rft.prompts_per_round=12",
    "rft.num_samples=3",
    "rft.sampling.temperature=0.5",
    "train.max_steps=80",
    "rft.sampling.max_new_tokens=40",  # "Reasoning:\n1. 3 + 4 = 7\nAnswer: 7", a character per token
]


def _traces(tmp_path):
    records = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text().splitlines()[:64]]
    work = {"7": "3 + 4 = 7", "3": "1 + 2 = 3"}  # one checked step: rft keeps only samples with one
    lines = [
        {"id": r["id"], "prompt": r["prompt"], "steps": [{"i": 1, "type": "calc", "content": work[answer]}],
         "final_answer": answer}
        for k, r in enumerate(records)
        for answer in ["7" if k % 2 else "3"]
    ]  # fmt: skip
    return write_jsonl(tmp_path / "train73.jsonl", lines)


def _args(tmp_path, name, *extra):
    return [
        "run", str(TINY_CONFIG), f"output.root={tmp_path}", f"output.run_name={name}",
        f"data.train_file={_traces(tmp_path)}", "train.max_steps=30", "train.save_every_steps=null",
        "train.eval_every_steps=null", "eval.max_items=4", "eval.max_new_tokens=12", "eval.baselines=[zero_shot]",
        *extra,
    ]  # fmt: skip


def _gates(run_dir):
    return {g["name"]: g for g in json.loads((run_dir / "gates.json").read_text())["gates"]}


def _weights(path):
    return load_file(path / "model.safetensors")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_grpo_run(run_dir):
    """What an sft-then-grpo run leaves: a line per step with every statistic, held-out points, a changed model,
    stages.json, and the stage's gates."""
    rows = [json.loads(x) for x in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps, held = [r for r in rows if "reward" in r], [r for r in rows if r.get("split") == "heldout"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in held] == [0, 2, 4]
    assert sum(r["num_trained_completions"] for r in steps) > 0, steps  # groups with signal were trained on
    for key in ("reward_verified", "reward_correct", "reward_steps_valid", "reward_format", "zero_variance_fraction", "truncation_ratio",
                "clip_fraction", "kl", "entropy"):  # fmt: skip
        assert all(key in r for r in steps)
    assert not _same(_weights(run_dir / "final_model"), _weights(run_dir / "grpo" / "final_model"))
    stages = json.loads((run_dir / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["sft", "grpo"] and stages[-1]["model"] == "grpo/final_model"
    gates = _gates(run_dir)
    for name in ("grpo_completed", "grpo_no_nan_or_inf", "grpo_heldout_not_below_start",
                 "grpo_truncation_below_limit", "grpo_reward_agrees_with_heldout", "evidence_complete"):  # fmt: skip
        assert name in gates
    assert gates["grpo_completed"]["passed"] and gates["evidence_complete"]["passed"], gates["evidence_complete"]
    assert gates["grpo_heldout_not_below_start"]["source"] == "eval/sft, eval/final"
    assert (run_dir / "eval" / "sft" / "scores.json").is_file() and (
        run_dir / "eval" / "final" / "scores.json"
    ).is_file()
    assert (run_dir / "grpo" / "final_model" / "README.md").is_file()  # the run's model carries the card


def test_sft_then_grpo_logs_gates_and_resumes_after_kill_9_bit_for_bit(tmp_path):
    assert cli(*_args(tmp_path, "ref", *GRPO)).returncode in (0, 3)
    _check_grpo_run(tmp_path / "ref")
    killed = cli(*_args(tmp_path, "k", *GRPO), env={"TRACETUNE_KILL_AT_POINT": "grpo-3/updated"})
    assert killed.returncode == -9
    assert cli("resume", str(tmp_path / "k")).returncode in (0, 3)
    assert _same(_weights(tmp_path / "ref" / "grpo" / "final_model"), _weights(tmp_path / "k" / "grpo" / "final_model"))

    def without_times(run):
        rows = [json.loads(x) for x in (tmp_path / run / "grpo" / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]

    assert without_times("ref") == without_times("k")


def test_rft_keeps_verified_samples_and_resumes_after_kill_9(tmp_path):
    assert cli(*_args(tmp_path, "ref", *RFT)).returncode in (0, 3)
    run_dir = tmp_path / "ref"
    rounds = [json.loads(x) for x in (run_dir / "rft" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all("heldout" in r for r in rounds)
    kept = [json.loads(x) for x in (run_dir / "rft" / "round-1" / "kept.jsonl").read_text().splitlines()]
    sampled = [json.loads(x) for x in (run_dir / "rft" / "round-1" / "sampled.jsonl").read_text().splitlines()]
    assert kept and len(sampled) == 36 and rounds[0]["num_kept"] == len(kept)
    eligible = {(s["id"], s["sample"]) for s in sampled if s["kept_eligible"]}
    assert all((t["meta"]["of"], t["meta"]["sample"]) in eligible for t in kept)  # only verified samples are kept
    assert all(s["verified"] for s in sampled if s["kept_eligible"])
    assert "rft_heldout_not_below_start" in _gates(run_dir)

    killed = cli(*_args(tmp_path, "k", *RFT), env={"TRACETUNE_KILL_AT_POINT": "rft-round-2/sampled"})
    assert killed.returncode == -9
    assert cli("resume", str(tmp_path / "k")).returncode in (0, 3)
    assert _same(_weights(run_dir / "rft" / "final_model"), _weights(tmp_path / "k" / "rft" / "final_model"))
    for name in ("kept.jsonl", "sampled.jsonl"):
        assert (run_dir / "rft" / "round-2" / name).read_text() == (
            tmp_path / "k" / "rft" / "round-2" / name
        ).read_text()


def test_rl_stages_run_on_untidy_data_and_score_only_the_validation_split(tmp_path, monkeypatch):
    """Records without ids, exact duplicates and prompts repeated with other answers, as real datasets have:
    sft -> rft -> grpo runs (the duplicates get ids of their own, so RFT's kept samples never collide), and the
    stages' held-out points score the validation split of the training traces, never an eval item; the eval set
    is scored once per stage (eval/<stage>) for the report."""
    from tracetune.cli import main
    from tracetune.data.traces import load_eval_items, load_traces, split_train_val
    from tracetune.rl import grpo, rft, rollout

    records = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text().splitlines()[:24]]
    untidy = []
    for k, r in enumerate(records):
        answer = "7" if k % 2 else "3"
        record = {"prompt": r["prompt"], "steps": [{"i": 1, "type": "calc", "content": f"{answer} = {answer}"}],
                  "final_answer": answer}  # fmt: skip
        untidy += [record] * (3 if k % 4 == 0 else 1)  # exact duplicates, no ids
        if k % 6 == 0:
            untidy.append({**record, "final_answer": "5"})  # the same prompt, another answer
    path = write_jsonl(tmp_path / "untidy.jsonl", untidy)
    keep = [{"id": f"k{n}", "prompt": f"What is {n} + {n}?", "expected_answer": str(2 * n)} for n in range(9)]
    keep_file = write_jsonl(tmp_path / "keep.jsonl", keep)
    scored: list[str] = []

    def recording(sampler, cfg, items, out_dir):
        scored.extend(i.id for i in items)
        return rollout.heldout(sampler, cfg, items, out_dir)

    monkeypatch.setattr(grpo, "heldout", recording)
    monkeypatch.setattr(rft, "heldout", recording)
    args = ["run", str(TINY_CONFIG), f"output.root={tmp_path}", "output.run_name=untidy", f"data.train_file={path}"]
    args += ["train.max_steps=20", "eval.max_items=4", "eval.max_new_tokens=8", "train.save_every_steps=null"]
    args += ["train.eval_every_steps=null", "eval.baselines=[zero_shot]", "data.val_fraction=0.2"]
    args += ["train.val_accuracy_items=5", "stages=[sft,rft,grpo]", "rft.num_rounds=1", "rft.num_samples=2"]
    args += ["rft.prompts_per_round=null", "rft.sampling.max_new_tokens=8", "grpo.num_steps=2"]
    args += [
        "grpo.prompts_per_step=3",
        "grpo.group_size=3",
        "grpo.sampling.max_new_tokens=8",
        "grpo.eval_every_steps=1",
        f"eval.keep_file={keep_file}",
    ]
    assert main(args) in (0, 3)  # 3: a gate may fail on a 2-layer model
    run = tmp_path / "untidy"
    assert (run / "grpo" / "final_model" / "model.safetensors").is_file()
    assert (run / "eval" / "sft" / "scores.json").is_file() and (run / "eval" / "rft" / "scores.json").is_file()
    eval_ids = {i.id for i in load_eval_items(REPO / "data" / "eval.jsonl").records}
    _, val = split_train_val(load_traces(path).records, 0.2, 0)
    assert scored and set(scored) <= {t.id for t in val[:5]} and not set(scored) & eval_ids
    # Every stage's model is evaluated on the keep set, both ways; verify recomputes each stage's row.
    keep_json = json.loads((run / "eval" / "keep" / "comparison.json").read_text())
    assert list(keep_json["stages"]) == ["sft", "rft"]
    assert all(keep_json["stages"][s]["answer_only"]["num_paired_items"] == 4 for s in ("sft", "rft"))
    assert all((run / "eval" / "keep" / d / "predictions.jsonl").is_file() for d in ("sft", "sft_format", "rft_format"))
    assert "Each stage's model on the keep set" in (run / "summary.md").read_text()
    keep_json["stages"]["sft"]["num_kept"] += 1  # a stage's row written by hand is caught
    (run / "eval" / "keep" / "comparison.json").write_text(json.dumps(keep_json))
    from tracetune.evidence.manifest import recheck_scores

    assert any("stage sft kept" in p for p in recheck_scores(run))


@pytest.mark.slow
def test_grpo_with_lora_frozen_embedding_and_sft_anchor_resumes_after_kill_9(tmp_path):
    """The conservative GRPO options on an SFT LoRA start: grpo.method=lora merges its adapter into the stage's
    model (grpo/adapter/ kept), the anchor trains beside the policy loss, and kill -9 then resume gives the same
    weights; with grpo.method=full and freeze_embeddings the embedding matrix is the SFT model's, bit for bit."""
    lora = [*GRPO, "train.method=lora", "train.lr=3e-2", "grpo.method=lora", "grpo.sft_coef=0.5", "grpo.num_steps=3"]
    lora += ["gates.max_truncation_rate=1"]  # 12 characters cut the tiny model's answers off
    assert cli(*_args(tmp_path, "ref", *lora)).returncode in (0, 3)
    ref = tmp_path / "ref"
    assert (ref / "grpo" / "adapter" / "adapter_config.json").is_file()
    assert not _same(_weights(ref / "final_model"), _weights(ref / "grpo" / "final_model"))
    assert cli("verify", str(ref)).returncode == 0
    killed = cli(*_args(tmp_path, "k", *lora), env={"TRACETUNE_KILL_AT_POINT": "grpo-2/updated"})
    assert killed.returncode == -9
    assert cli("resume", str(tmp_path / "k")).returncode in (0, 3)
    assert _same(_weights(ref / "grpo" / "final_model"), _weights(tmp_path / "k" / "grpo" / "final_model"))
    frozen = [*GRPO, "grpo.freeze_embeddings=true", "grpo.num_steps=2", "grpo.eval_every_steps=null"]
    assert cli(*_args(tmp_path, "fr", *frozen)).returncode in (0, 3)
    sft, grpo = _weights(tmp_path / "fr" / "final_model"), _weights(tmp_path / "fr" / "grpo" / "final_model")
    embedding = next(k for k in sft if "embed_tokens" in k)
    assert torch.equal(sft[embedding], grpo[embedding]) and not _same(sft, grpo)
