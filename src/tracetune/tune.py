"""`tracetune tune`: a budgeted, seeded search of the recipe (method, LoRA rank, lr, epochs) through Optuna.

Every trial is an ordinary run directory trained by `tracetune train` with held-out accuracy points on the
validation split of the training data (train.val_accuracy) and the final model chosen by them
(train.select=val_accuracy, within the keep monitor's limit); the objective is the chosen step's held-out accuracy,
and each point is reported to Optuna so an unpromising trial is pruned there. The eval set is never read while
searching: when the search ends, the best trial alone is evaluated on it with the baselines and gates, once.

The study directory (STUDY):
  study.db             Optuna's SQLite storage: a killed `tune` resumes with its finished trials intact
  tune.json            what was searched, the budget, the best trial, its evaluation
  trials/trial-<n>/    each trial's run directory (checkpoints removed once it ends); the best one's is evaluated
  trials.md, trials.png  every trial: settings, minutes, held-out accuracy, keep monitor, state; curves by step
  best.yaml            the best trial's config: `tracetune run best.yaml` trains and evaluates it again
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

from tracetune.config import Config, TuneConfig, dump_config, load_config
from tracetune.errors import ConfigError
from tracetune.layout import RunLayout, read_json, read_jsonl, write_json

log = logging.getLogger("tracetune")

STUDY_DB, TUNE_JSON, TRIALS, TABLE, PLOT, BEST_YAML = (
    "study.db",
    "tune.json",
    "trials",
    "trials.md",
    "trials.png",
    "best.yaml",
)
MAX_DUPLICATES_IN_A_ROW = 20
SEARCH_OVERRIDES = ["train.val_accuracy=true", "train.select=val_accuracy", "eval.run_base=true"]


def parse_budget(text: str) -> float:
    """'30m', '2h', '90s' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise ConfigError("tracetune tune", [f"--budget {text!r}: fix: write e.g. 30m, 2h or 900s"])
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def suggest(trial, space: TuneConfig) -> list[str]:
    """The trial's recipe as dotted overrides, drawn from the config's tune section."""
    method = trial.suggest_categorical("method", space.methods)
    overrides = [f"train.method={method}"]
    if method == "lora":
        rank = trial.suggest_categorical("lora_r", space.lora_ranks)
        overrides += [f"train.lora.r={rank}", f"train.lora.alpha={2 * rank}"]
    lr = trial.suggest_float(f"lr_{method}", *getattr(space, f"lr_{method}"), log=True)
    epochs = trial.suggest_int("num_epochs", *space.num_epochs)
    return overrides + [f"train.lr={lr:.3g}", f"train.num_epochs={epochs}"]


def trial_config(config: str | None, overrides: list[str], recipe: list[str], root: Path, name: str) -> Config:
    """A trial's config: the user's config and overrides, the search's settings, the trial's recipe and where it
    writes."""
    extra = [*SEARCH_OVERRIDES, *recipe, f"output.root={root}", f"output.run_name={name}"]
    return load_config(config, [*overrides, *extra])


def _open_study(study_dir: Path, seed: int, prune_after: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / STUDY_DB}")
    return optuna.create_study(
        study_name="tracetune",
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=prune_after, n_warmup_steps=1),
        load_if_exists=True,
    )


def _recover_interrupted(study) -> None:
    """Trials left running by a killed `tune` are marked failed and their recipe is queued again, so the resumed
    search tries it from the start (its partial run directory stays, named by its trial number)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        kept = {k: v for k, v in trial.user_attrs.items() if k == "from_config"}  # a retried config recipe is one
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number} | kept)
        log.info("trial %d was interrupted; its recipe is queued again", trial.number)


def config_recipe(cfg: Config) -> dict | None:
    """The config's own recipe as trial parameters, where the search space holds it: the first trial, so the
    search's best is never a recipe that did worse on held-out accuracy than the one the user started from."""
    t, space = cfg.train, cfg.tune
    low, high = getattr(space, f"lr_{t.method}")
    inside = (
        t.method in space.methods and low <= t.lr <= high and space.num_epochs[0] <= t.num_epochs <= space.num_epochs[1]
    )
    if not inside or (t.method == "lora" and t.lora.r not in space.lora_ranks) or t.max_steps is not None:
        return None
    params = {"method": t.method, f"lr_{t.method}": t.lr, "num_epochs": t.num_epochs}
    return params | ({"lora_r": t.lora.r} if t.method == "lora" else {})


def _spent_s(study) -> float:
    """Seconds the study's ended trials took: what a resumed `tune` has already spent of its budget."""
    return sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.trials
        if t.datetime_complete is not None and t.datetime_start is not None
    )


def objective_for(config: str | None, overrides: list[str], space: TuneConfig, study_dir: Path):
    """The Optuna objective: train one trial's run directory, report its held-out points for pruning, return
    the chosen step's held-out accuracy."""
    import optuna

    from tracetune.pipeline import train_stage

    def objective(trial) -> float:
        recipe = suggest(trial, space)
        trial.set_user_attr("overrides", recipe)
        if (same := _trained_before(trial.study, recipe)) is not None:  # no minutes spent on a recipe twice
            trial.set_user_attr("duplicate_of", same)
            raise optuna.TrialPruned(f"the recipe of trial {same}, trained already")
        name = f"trial-{trial.number}"
        cfg = trial_config(config, overrides, recipe, study_dir / TRIALS, name)
        trial.set_user_attr("run_dir", f"{TRIALS}/{name}")
        log.info("trial %d: %s", trial.number, " ".join(recipe))

        def prune(step: int, scored: dict) -> bool:
            trial.report(scored["accuracy"], step)
            return trial.should_prune()

        started = time.perf_counter()
        run_dir = train_stage(cfg, ["tracetune", "tune", f"trial {trial.number}", *recipe], prune=prune)
        trial.set_user_attr("minutes", round((time.perf_counter() - started) / 60, 2))
        training = read_json(RunLayout(run_dir).training) or {}
        trial.set_user_attr("selected_step", training.get("selected_step"))
        trial.set_user_attr("keep_accuracy", training.get("selected_keep_accuracy"))
        if training.get("pruned"):
            raise optuna.TrialPruned(f"pruned at step {training['num_steps']}")
        return training["selected_accuracy"]

    return objective


def _trained_before(study, recipe: list[str]) -> int | None:
    """The number of an ended trial that trained this very recipe (as applied: the lr as written, 3 significant
    digits), if any; a failed one does not count, so an interrupted recipe is retried."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if "duplicate_of" not in t.user_attrs and t.user_attrs.get("overrides") == recipe:
            return t.number
    return None


def _stop_rule(max_trials: int | None):
    """An Optuna callback: stop once `max_trials` trials in all have trained (failed ones and duplicates do not
    count), or when the sampler has drawn only recipes trained already MAX_DUPLICATES_IN_A_ROW times running
    (the space is spent; a duplicate costs no time, so the budget alone would never end the search)."""
    from optuna.trial import TrialState

    def callback(study, _trial) -> None:
        ended = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        trained = [t for t in ended if t.state != TrialState.FAIL and "duplicate_of" not in t.user_attrs]
        in_a_row = 0
        for t in reversed(ended):
            if "duplicate_of" not in t.user_attrs:
                break
            in_a_row += 1
        if (max_trials is not None and len(trained) >= max_trials) or in_a_row >= MAX_DUPLICATES_IN_A_ROW:
            study.stop()

    return callback


def _drop_checkpoints(run_dir: Path) -> None:
    """A finished trial that is not the best needs no resume and no reload gate: its checkpoints and the
    selection's copy go (final_model/ stays)."""
    files = RunLayout(run_dir)
    shutil.rmtree(files.checkpoints, ignore_errors=True)
    files.selected.unlink(missing_ok=True)


def tune(config: str | None, overrides: list[str], study_dir: Path, budget_s: float, max_trials: int | None) -> dict:
    """Search within `budget_s` seconds (counting what earlier invocations of the same study spent) and at most
    `max_trials` trials in all; then evaluate the best trial on the eval set. Returns tune.json's record."""
    from optuna.trial import TrialState

    cfg = load_config(config, [*overrides, *SEARCH_OVERRIDES])  # every problem before any work
    if cfg.eval.eval_file is None:
        raise ConfigError("tracetune tune", ["eval.eval_file: the best trial is evaluated on it; fix: set it"])
    study_dir.mkdir(parents=True, exist_ok=True)
    settings = {"config": config, "overrides": overrides, "space": cfg.tune.model_dump(mode="json")}
    previous = read_json(study_dir / TUNE_JSON)
    if previous and {k: previous.get(k) for k in settings} != settings:
        raise ConfigError(
            str(study_dir / TUNE_JSON),
            ["this study searched another config, overrides or space; fix: name a new study with --study DIR"],
        )
    study = _open_study(study_dir, cfg.seed, cfg.tune.prune_after_trials)
    if not study.trials and (start := config_recipe(cfg)) is not None:
        study.enqueue_trial(start, user_attrs={"from_config": True})
    _recover_interrupted(study)
    ended = [t for t in study.trials if t.state.is_finished()]
    remaining_s = budget_s - _spent_s(study)
    trained = [t for t in ended if t.state != TrialState.FAIL and "duplicate_of" not in t.user_attrs]
    remaining_trials = None if max_trials is None else max_trials - len(trained)
    record = settings | {"budget_s": budget_s}
    write_json(study_dir / TUNE_JSON, record)
    if remaining_s > 0 and (remaining_trials is None or remaining_trials > 0):
        log.info("searching for %.1f more minutes (%s trials left)", remaining_s / 60, remaining_trials or "any")
        from tracetune.train.loop import NonFiniteLossError

        study.optimize(  # a trial whose loss went NaN is a failed trial, not the end of the search
            objective_for(config, overrides, cfg.tune, study_dir),
            timeout=remaining_s,
            catch=(NonFiniteLossError,),
            callbacks=[_stop_rule(max_trials)],
        )
    write_table(study_dir, study)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        raise ConfigError("tracetune tune", ["no trial finished within the budget; fix: raise --budget"])
    best, choice = choose_best(study, study_dir)
    for trial in study.trials:  # the best keeps its checkpoints: its evaluation's reload gate reads the last one
        if trial.number != best.number and trial.state.is_finished() and "run_dir" in trial.user_attrs:
            _drop_checkpoints(study_dir / trial.user_attrs["run_dir"])
    record |= {
        "spent_s": round(_spent_s(study), 1),
        "num_trials": len(study.trials),
        "states": {s.name.lower(): sum(t.state == s for t in study.trials) for s in TrialState if s.is_finished()},
        "num_duplicates_not_run": sum("duplicate_of" in t.user_attrs for t in study.trials),
        "best_trial": best.number,
        "choice": choice,
        "best_value": best.value,
        "best_overrides": best.user_attrs["overrides"],
        "best_run_dir": best.user_attrs["run_dir"],
    }
    record["evaluation"] = evaluate_best(config, overrides, study_dir, best, (previous or {}).get("evaluation"))
    write_json(study_dir / TUNE_JSON, record)
    return record


def heldout_dir(study_dir: Path, trial) -> Path:
    """Where a finished trial's chosen step answered the validation split."""
    return RunLayout(study_dir / trial.user_attrs["run_dir"]).heldout(trial.user_attrs["selected_step"]).path


def choose_best(study, study_dir: Path) -> tuple:
    """(the trial to evaluate, why). The most accurate trial on the validation split replaces the first one, the
    config's own recipe, only where it is detectably better there: the paired 95% interval over the same
    validation items above 0. A few dozen items cannot tell a point or two apart, and an argmax over noise
    would hand the user a recipe that is not better."""
    from optuna.trial import TrialState

    from tracetune.eval.scoring import compare_predictions

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    top = max(done, key=lambda t: (t.value, -t.number))
    config = next((t for t in done if t.user_attrs.get("from_config")), None)
    if config is None or config.number == top.number:
        return top, {"rule": "highest held-out accuracy"}
    paired = compare_predictions(heldout_dir(study_dir, config), heldout_dir(study_dir, top))
    low, high = paired["difference_ci95"]
    kept = low <= 0
    return (config if kept else top), {
        "rule": "the most accurate trial replaces the config's recipe only where the paired 95% interval on the "
        "validation split is above 0",
        "config_trial": config.number,
        "most_accurate_trial": top.number,
        "difference": paired["difference"],
        "difference_ci95": [low, high],
        "num_items": paired["num_paired_items"],
        "kept_config_recipe": kept,
    }


def evaluate_best(config: str | None, overrides: list[str], study_dir: Path, best, done: dict | None) -> dict:
    """The best trial's run directory completed as `tracetune run` completes one: baselines, the eval set
    scored once, comparison, gates, report. best.yaml is its config, pointed at a fresh run directory."""
    from tracetune.evidence.view import read_run
    from tracetune.pipeline import run_stage

    run_dir = study_dir / best.user_attrs["run_dir"]
    cfg = trial_config(config, overrides, best.user_attrs["overrides"], run_dir.parent, run_dir.name)
    rerun = cfg.model_copy(deep=True)
    rerun.output.root, rerun.output.run_name = (
        Path(load_config(config, overrides).output.root),
        f"{study_dir.name}-best",
    )
    (study_dir / BEST_YAML).write_text(dump_config(rerun), encoding="utf-8")
    if done and done.get("trial") == best.number:
        return done  # a resumed tune whose search had already ended: evaluated once, not again
    _, gates = run_stage(cfg, ["tracetune", "tune", "evaluate the best trial"], resume=True)
    view = read_run(run_dir)
    final, comparison = view.final or {}, view.comparison or {}
    return {
        "trial": best.number,
        "run_dir": str(run_dir.relative_to(study_dir)),
        "accuracy": final.get("accuracy"),
        "ci95": final.get("ci95"),
        "verified_accuracy": final.get("verified_accuracy"),
        "strongest_baseline": comparison.get("strongest_baseline"),
        "baseline_accuracy": comparison.get("base_accuracy"),
        "difference_ci95": comparison.get("difference_ci95"),
        "gates_passed": gates["passed"],
    }


def write_table(study_dir: Path, study) -> None:
    """trials.md (a row per trial) and trials.png (each trial's held-out accuracy by step)."""
    rows = []
    for t in study.trials:
        minutes = t.user_attrs.get("minutes")
        keep = t.user_attrs.get("keep_accuracy")
        state = t.state.name.lower()
        if "duplicate_of" in t.user_attrs:
            state = f"not run: the recipe of trial {t.user_attrs['duplicate_of']}"
        rows.append(
            f"| {t.number} | {state} | {' '.join(t.user_attrs.get('overrides', []))} | "
            f"{'' if minutes is None else minutes} | {'' if t.value is None else f'{t.value:.1%}'} | "
            f"{t.user_attrs.get('selected_step', '')} | {'' if keep is None else f'{keep:.1%}'} |"
        )
    header = [
        "# tracetune tune: trials",
        "",
        "Held-out accuracy: the chosen step's, on the validation split of the training data (never the eval set).",
        "",
        "| trial | state | recipe | minutes | held-out accuracy | chosen step | keep monitor |",
        "|---|---|---|---|---|---|---|",
    ]
    (study_dir / TABLE).write_text("\n".join(header + rows) + "\n", encoding="utf-8")
    (study_dir / PLOT).write_bytes(plot_trials(study_dir, study))


def plot_trials(study_dir: Path, study) -> bytes:
    from tracetune.evidence.plots import plot_curves

    curves = []
    for t in study.trials:
        metrics = RunLayout(study_dir / t.user_attrs.get("run_dir", "-")).metrics
        points = [r for r in read_jsonl(metrics) if r.get("split") == "val_accuracy" and "accuracy" in r]
        if points:
            label = f"{t.number}: {' '.join(o.split('=', 1)[1] for o in t.user_attrs.get('overrides', []))}"
            curves.append((label, [r["step"] for r in points], [r["accuracy"] for r in points]))
    return plot_curves(curves, "held-out accuracy", "Trials: held-out accuracy by step")
