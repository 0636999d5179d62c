"""Held-out accuracy while training (train.val_accuracy): the validation split's prompts answered and scored at
every validation, beside the loss, never the eval set."""

import json

from tests.conftest import tiny_run_args
from tracetune import layout


def test_val_accuracy_points_score_the_validation_split_at_every_validation(tmp_path, capsys):
    from tracetune.cli import main
    from tracetune.data.traces import load_eval_items

    args = tiny_run_args(tmp_path, "output.run_name=va", "train.max_steps=8", "train.eval_every_steps=4")
    args += ["train.val_accuracy=true", "train.val_accuracy_items=6", "eval.max_items=4", "eval.max_new_tokens=8"]
    args += ["eval.baselines=[zero_shot]", "train.select=val_accuracy"]
    assert main(args) == 0
    run = tmp_path / "va"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    points = [r for r in rows if r.get("split") == "val_accuracy"]
    val = [r["step"] for r in rows if r.get("split") == "val"]
    assert [p["step"] for p in points] == val == [0, 4, 8]  # beside every validation loss
    assert all(p["num_items"] == 6 and 0 <= p["accuracy"] <= 1 for p in points)
    scored = [json.loads(x)["id"] for x in (run / "heldout" / "step-8" / "predictions.jsonl").read_text().splitlines()]
    eval_ids = {i.id for i in load_eval_items(tiny_run_args(tmp_path)[4].split("=", 1)[1]).records}
    assert len(scored) == 6 and not set(scored) & eval_ids
    summary = (run / "summary.md").read_text()
    assert "Held-out accuracy while training" in summary
    training = json.loads((run / "training.json").read_text())
    best = max(points, key=lambda p: (p["accuracy"], -next(r["loss"] for r in rows if r.get("split") == "val"
                                                          and r["step"] == p["step"]), -p["step"]))  # fmt: skip
    assert training["selected_step"] == best["step"] and f"The final model is step {best['step']}'s" in summary
    listed = [line.split("  ", 1)[1] for line in (run / layout.MANIFEST).read_text().splitlines()]
    assert [f for f in listed if layout.describe(f) is None] == []
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0, capsys.readouterr().out  # the points are rescored too


def test_val_accuracy_is_refused_with_fsdp_or_without_a_validation_split():
    from tracetune.config import load_config
    from tracetune.errors import ConfigError

    for bad in (["train.distributed=fsdp"], ["data.val_fraction=0"]):
        try:
            load_config(None, ["train.val_accuracy=true", *bad])
        except ConfigError as exc:
            assert "train.val_accuracy" in str(exc)
        else:
            raise AssertionError(bad)


def test_select_keeps_the_best_held_out_step_and_puts_it_back_at_the_end(tmp_path):
    """train.select=val_accuracy: a better point keeps that step's weights; at the end the best step's weights
    replace the last step's; a resumed run (no best in memory) finds the best among its points so far."""
    import torch

    from tracetune.layout import append_jsonl
    from tracetune.train.loop import RunContext, keep_if_best, select_weights

    model = torch.nn.Linear(3, 2)
    ctx = RunContext(None, tmp_path, [], 8)
    metrics = tmp_path / "metrics.jsonl"

    def point(step, accuracy, loss):
        append_jsonl(metrics, {"split": "val", "step": step, "loss": loss})
        append_jsonl(metrics, {"split": "val_accuracy", "step": step, "accuracy": accuracy})
        keep_if_best(ctx, model, step, accuracy, loss)

    point(0, 0.0, 2.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    point(4, 0.5, 1.0)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    point(6, 0.5, 1.2)  # as accurate, higher validation loss: not kept
    point(8, 0.25, 0.8)
    assert select_weights(ctx, model, 8)["selected_step"] == 4
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)
    resumed = RunContext(None, tmp_path, [], 8)  # after a resume: read from metrics.jsonl and selected.safetensors
    with torch.no_grad():
        model.weight.add_(5.0)
    assert select_weights(resumed, model, 8)["selected_step"] == 4
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)


def test_early_stopping_counts_the_points_since_the_best(tmp_path):
    """train.early_stopping_patience: the held-out points after the best one (by accuracy, then validation
    loss) are counted from metrics.jsonl, so a resumed run counts the same."""
    from tracetune.layout import append_jsonl
    from tracetune.train.loop import RunContext, _points_since_best

    ctx = RunContext(None, tmp_path, [], 8)
    for step, accuracy, loss in [(0, 0.0, 2.0), (2, 0.5, 1.5), (4, 0.5, 1.4), (6, 0.25, 1.0), (8, 0.5, 1.6)]:
        append_jsonl(tmp_path / "metrics.jsonl", {"split": "val", "step": step, "loss": loss})
        append_jsonl(tmp_path / "metrics.jsonl", {"split": "val_accuracy", "step": step, "accuracy": accuracy})
    assert _points_since_best(ctx) == 2  # the best is step 4 (0.5 at the lower loss); steps 6 and 8 came after


def test_early_stopping_ends_the_run_and_the_gates_read_where_it_stopped(tmp_path, monkeypatch):
    """With held-out accuracy falling after step 0 and patience 2, training stops at step 2 of 8; training.json
    says so, training_completed passes on the step it stopped at, the summary explains it."""
    from tracetune import pipeline
    from tracetune.cli import main

    def falling(cfg, inputs, run_dir, tokenizer):
        return lambda model, step: {"accuracy": 0.5 if step == 0 else 0.25, "verified_accuracy": 0.0}

    monkeypatch.setattr(pipeline, "_answer_accuracy", falling)
    args = tiny_run_args(tmp_path, "output.run_name=es", "train.max_steps=8", "train.eval_every_steps=1")
    args += ["train.val_accuracy=true", "train.early_stopping_patience=2", "eval.max_items=2", "eval.max_new_tokens=4"]
    args += ["eval.baselines=[zero_shot]", "train.save_every_steps=null"]
    main(args)
    run = tmp_path / "es"
    training = json.loads((run / "training.json").read_text())
    assert training["stopped_early"] and training["num_steps"] == 2 and training["planned_steps"] == 8
    gates = {g["name"]: g for g in json.loads((run / "gates.json").read_text())["gates"]}
    assert (
        gates["training_completed"]["passed"]
        and "stopped early at step 2 of 8" in gates["training_completed"]["detail"]
    )
    assert "Training stopped early at step 2 of 8" in (run / "summary.md").read_text()
