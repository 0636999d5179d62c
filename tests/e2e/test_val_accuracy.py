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

    from tracetune.config import Config
    from tracetune.layout import append_jsonl
    from tracetune.train.loop import RunContext, keep_if_best, select_weights

    model = torch.nn.Linear(3, 2)
    ctx = RunContext(Config(), tmp_path, [], 8)
    metrics = tmp_path / "metrics.jsonl"

    def point(step, accuracy, loss):
        append_jsonl(metrics, {"split": "val", "step": step, "loss": loss})
        append_jsonl(metrics, {"split": "val_accuracy", "step": step, "accuracy": accuracy})
        keep_if_best(ctx, model, step)

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
    resumed = RunContext(Config(), tmp_path, [], 8)  # after a resume: read from metrics.jsonl and selected.safetensors
    with torch.no_grad():
        model.weight.add_(5.0)
    assert select_weights(resumed, model, 8)["selected_step"] == 4
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)


def test_selection_skips_steps_whose_keep_monitor_dropped_past_the_limit():
    """A scripted curve: step 6 is the most accurate but its keep-set monitor fell 0.30 below step 0's, past
    gates.max_keep_drop (0.05 here), so step 4 (0.03 below) is chosen; with no keep monitor step 6 would be."""
    from tracetune.train.loop import best_point

    curve = [(0, 0.10, 0.50), (2, 0.30, 0.44), (4, 0.40, 0.47), (6, 0.60, 0.20), (8, 0.35, 0.50)]
    rows = []
    for step, accuracy, keep in curve:
        rows.append({"split": "val", "step": step, "loss": 1.0})
        rows.append({"split": "val_accuracy", "step": step, "accuracy": accuracy, "keep_accuracy": keep})
    best = best_point(rows, max_keep_drop=0.05)
    assert best["step"] == 4 and best["num_excluded_by_keep"] == 2 and best["keep_floor"] == 0.45
    assert best_point(rows, max_keep_drop=0.5)["step"] == 6
    plain = [{k: v for k, v in r.items() if k != "keep_accuracy"} for r in rows]
    assert best_point(plain, max_keep_drop=0.05)["step"] == 6 and "keep_floor" not in best_point(plain, 0.05)


def test_keep_monitor_half_is_scored_while_training_and_the_report_scores_the_other_half(tmp_path, capsys):
    """With a keep set and train.val_accuracy, every held-out point also scores the keep set's monitor half
    (prompted as the base model is); the final keep evaluations score the other half only, so no reported keep
    item was used to choose."""
    from tracetune.cli import main

    keep = tmp_path / "keep.jsonl"
    keep.write_text("".join(
        json.dumps({"id": f"k{i}", "prompt": f"What is {i} plus {i}?", "expected_answer": str(2 * i)}) + "\n"
        for i in range(13)
    ))  # fmt: skip
    args = tiny_run_args(tmp_path, "output.run_name=km", "train.max_steps=4", "train.eval_every_steps=2")
    args += ["train.val_accuracy=true", "train.val_accuracy_items=4", "eval.max_items=3", "eval.max_new_tokens=6"]
    args += ["eval.baselines=[zero_shot]", "train.select=val_accuracy", f"eval.keep_file={keep}", "eval.num_shots=3"]
    assert main(args) == 0
    run = tmp_path / "km"
    points = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    points = [r for r in points if r.get("split") == "val_accuracy"]
    assert [p["step"] for p in points] == [0, 2, 4] and all(p["keep_num_items"] == 5 for p in points)

    def ids(path):
        return {json.loads(x)["id"] for x in path.read_text().splitlines()}

    monitor = ids(run / "heldout" / "step-2" / "keep" / "predictions.jsonl")
    reported = ids(run / "eval" / "keep" / "final" / "predictions.jsonl")
    assert monitor == {f"k{i}" for i in range(4, 13, 2)} and reported == {f"k{i}" for i in range(3, 13, 2)}
    training = json.loads((run / "training.json").read_text())
    assert "keep_floor" in training and "keep-set monitor" in training["selected_by"]
    listed = [line.split("  ", 1)[1] for line in (run / layout.MANIFEST).read_text().splitlines()]
    assert [f for f in listed if layout.describe(f) is None] == []
    assert "keep monitor" in (run / "summary.md").read_text()
    assert "<figcaption>Held-out accuracy while training</figcaption>" in (run / "report.html").read_text()
    assert main(["verify", str(run)]) == 0


def test_early_stopping_counts_the_points_since_the_best(tmp_path):
    """train.early_stopping_patience: the held-out points after the best one (by accuracy, then validation
    loss) are counted from metrics.jsonl, so a resumed run counts the same."""
    from tracetune.config import Config
    from tracetune.layout import append_jsonl
    from tracetune.train.loop import RunContext, _points_since_best

    ctx = RunContext(Config(), tmp_path, [], 8)
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
