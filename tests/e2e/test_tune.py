"""`tracetune tune`: trials are ordinary run directories chosen by held-out accuracy on the validation split, the
study survives kill -9, and only the best trial is evaluated on the eval set, once, after the search."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, TINY_CONFIG

FAST = [
    "train.max_steps=null", "train.eval_every_steps=3", "train.val_accuracy_items=4", "eval.max_items=4",
    "eval.max_new_tokens=8", "eval.baselines=[zero_shot]", "tune.num_epochs=[1,2]", "tune.lr_full=[1e-3,3e-3]",
    "tune.lr_lora=[1e-3,1e-2]", f"data.train_file={REPO}/data/train.jsonl", f"eval.eval_file={REPO}/data/eval.jsonl",
]  # fmt: skip


def _tune(study, root, *extra, env=None):
    args = [sys.executable, "-m", "tracetune", "tune", str(TINY_CONFIG), "--study", str(study), "--budget", "10m"]
    args += [*extra, f"output.root={root}", *FAST]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def _trials(study):
    with sqlite3.connect(study / "study.db") as db:
        return db.execute("SELECT number, state, value FROM trials LEFT JOIN trial_values USING (trial_id)").fetchall()


@pytest.mark.slow
def test_tune_survives_kill_9_and_evaluates_only_the_best_trial_once(tmp_path):
    study, root = tmp_path / "study", tmp_path / "runs"
    first = _tune(study, root, "--trials", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    trial0 = _trials(study)
    assert [(n, s) for n, s, _ in trial0] == [(0, "COMPLETE")]
    env = os.environ | {"TRACETUNE_KILL_AT_POINT": "step-2/updated"}  # trial 1 dies mid-training
    killed = _tune(study, root, "--trials", "3", env=env)
    assert killed.returncode == -9
    assert [(n, s) for n, s, _ in _trials(study)] == [(0, "COMPLETE"), (1, "RUNNING")]
    resumed = _tune(study, root, "--trials", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _trials(study)
    assert rows[0] == trial0[0]  # the finished trial is kept as it was
    assert [s for _, s, _ in rows] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    record = json.loads((study / "tune.json").read_text())
    assert record["states"] == {"complete": 3, "pruned": 0, "fail": 1} and record["spent_s"] < 600
    best = record["best_trial"]
    assert record["evaluation"]["trial"] == best and record["evaluation"]["accuracy"] is not None
    evaluated = [d.name for d in (study / "trials").iterdir() if (d / "eval" / "final" / "scores.json").is_file()]
    assert evaluated == [f"trial-{best}"] or (best != 0 and set(evaluated) == {"trial-0", f"trial-{best}"})
    trials = (study / "trials").iterdir()
    assert [d.name for d in trials if (d / "checkpoints").exists()] == [f"trial-{best}"]  # the others' are gone
    gates = json.loads((study / "trials" / f"trial-{best}" / "gates.json").read_text())["gates"]
    assert next(g for g in gates if g["name"] == "checkpoint_reloads")["passed"]
    table = (study / "trials.md").read_text()
    assert table.count("| complete |") == 3 and "| fail |" in table and (study / "trials.png").stat().st_size > 0
    rerun_cfg = yaml.safe_load((study / "best.yaml").read_text())
    assert rerun_cfg["output"] == rerun_cfg["output"] | {"root": str(root), "run_name": "study-best"}
    rerun = subprocess.run([sys.executable, "-m", "tracetune", "run", str(study / "best.yaml")], capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert rerun.returncode in (0, 3), rerun.stderr[-3000:]  # 3: a gate failed, as the tiny model's do

    def answers(run):
        return [json.loads(x)["completion"] for x in (run / "eval" / "final" / "predictions.jsonl").open()]

    assert answers(root / "study-best") == answers(study / "trials" / f"trial-{best}")  # it reproduces


def test_a_retried_trial_repeats_the_interrupted_recipe(tmp_path):
    """The recipe of a trial killed mid-run is queued again, so the search does not lose it."""
    import optuna

    from tracetune.tune import _open_study, _recover_interrupted

    study = _open_study(tmp_path, seed=0, prune_after=2)
    study.enqueue_trial({"lr_full": 3e-5}, user_attrs={"from_config": True})
    trial = study.ask({"lr_full": optuna.distributions.FloatDistribution(1e-5, 1e-4, log=True)})
    _recover_interrupted(_open_study(tmp_path, seed=0, prune_after=2))
    again = _open_study(tmp_path, seed=0, prune_after=2)
    assert again.trials[0].state == optuna.trial.TrialState.FAIL
    retry = again.ask()
    assert retry.suggest_float("lr_full", 1e-5, 1e-4, log=True) == trial.params["lr_full"]
    assert retry.user_attrs["retry_of"] == 0 and retry.user_attrs["from_config"]  # still the config's recipe


def test_budget_words_and_a_changed_search_is_refused(tmp_path):
    import pytest

    from tracetune.errors import ConfigError
    from tracetune.tune import TUNE_JSON, parse_budget, tune

    assert [parse_budget(t) for t in ("30m", "2h", "90s", "45")] == [1800, 7200, 90, 45]
    with pytest.raises(ConfigError):
        parse_budget("half an hour")
    (tmp_path / TUNE_JSON).write_text(json.dumps({"config": "other.yaml", "overrides": [], "space": {}}))
    with pytest.raises(ConfigError, match="another config"):
        tune(str(TINY_CONFIG), FAST, tmp_path, 60, 1)


def test_the_config_recipe_stands_unless_another_trial_is_detectably_better(tmp_path):
    """choose_best: a trial more accurate on the validation split by an item or two (the interval reaches 0)
    does not replace the first trial, the config's own recipe; one better on most items does."""
    import optuna

    from tracetune.layout import RunLayout
    from tracetune.tune import choose_best

    def trial(number, value, right, from_config=False):
        out = RunLayout(tmp_path / f"trials/trial-{number}").heldout(10).path
        out.mkdir(parents=True)
        rows = [{"id": f"v{i}", "correct": i < right} for i in range(40)]
        (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        attrs = {"run_dir": f"trials/trial-{number}", "selected_step": 10} | (
            {"from_config": True} if from_config else {}
        )
        return optuna.trial.create_trial(value=value, user_attrs=attrs)

    study = optuna.create_study(direction="maximize")
    study.add_trials([trial(0, 12 / 40, 12, from_config=True), trial(1, 13 / 40, 13)])
    best, why = choose_best(study, tmp_path)
    assert best.number == 0 and why["kept_config_recipe"] and why["difference_ci95"][0] <= 0
    study.add_trial(trial(2, 30 / 40, 30))
    best, why = choose_best(study, tmp_path)
    assert best.number == 2 and not why["kept_config_recipe"] and why["difference_ci95"][0] > 0


def test_a_recipe_trained_already_is_not_trained_again(tmp_path, monkeypatch):
    """A drawn recipe that an ended trial trained (as applied: an lr equal to 3 digits) is marked and skipped
    without training; a space that holds only such recipes ends the search instead of spinning until the budget."""
    import optuna

    from tracetune import pipeline
    from tracetune.config import TuneConfig
    from tracetune.tune import MAX_DUPLICATES_IN_A_ROW, _open_study, _stop_rule, objective_for, suggest

    def train_stage(*args, **kwargs):
        raise AssertionError("a recipe trained twice")

    monkeypatch.setattr(pipeline, "train_stage", train_stage)
    space = TuneConfig(methods=["full"], lr_full=(1e-3, 1e-3), num_epochs=(1, 1))
    study = _open_study(tmp_path, seed=0, prune_after=2)
    first = study.ask()
    first.set_user_attr("overrides", suggest(first, space))
    study.tell(first, 0.25)
    study.optimize(objective_for(None, [], space, tmp_path), timeout=60, callbacks=[_stop_rule(None)])
    later = study.trials[1:]
    assert len(later) == MAX_DUPLICATES_IN_A_ROW
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["duplicate_of"] == 0 for t in later)
