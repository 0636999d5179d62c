"""summary.md, report.html and loss.png, built from the run directory's files only, never live objects."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tracetune.eval.stats import difference_outcome, items_to_tell
from tracetune.evidence.plots import plot_accuracy, plot_grpo, plot_loss, plot_series, plot_val_accuracy
from tracetune.evidence.view import RunView, read_run
from tracetune.layout import BASELINE_DIRS, CARD, LOSS_PLOT, MANIFEST, REPORT, SUMMARY, RunLayout


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(scores: dict) -> str:
    low, high = scores["ci95"]
    return f"{_pct(scores['accuracy'])} [{_pct(low)}, {_pct(high)}]"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def training_totals(data: RunView) -> dict:
    train = data.train
    seconds = data.training.get("elapsed_s") or (train[-1]["elapsed_s"] if train else 0)
    tokens = sum(r["num_tokens"] for r in train)
    samples = sum(r.get("num_samples", 0) for r in train)
    return {
        "steps": train[-1]["step"] if train else 0,
        "runtime_s": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "samples_per_s": samples / seconds if seconds else 0.0,
        "final_loss": train[-1]["loss"] if train else None,
        "final_val_loss": data.val[-1]["loss"] if data.val else None,
    }


def loss_by_epoch(data: RunView) -> list[list]:
    groups = defaultdict(list)
    for row in data.train:
        groups[max(0, int(row["epoch"] - 1e-9))].append(row["loss"])
    vals = {}
    for row in data.val:
        vals[max(0, int(row["epoch"] - 1e-9))] = row["loss"]
    return [
        [e + 1, f"{sum(v) / len(v):.4f}", f"{v[0]:.4f}", f"{v[-1]:.4f}", f"{vals[e]:.4f}" if e in vals else "-"]
        for e, v in sorted(groups.items())
    ]


# Written after the summary, so they are not listed in it (and regenerating it gives the same text).
REPORT_OUTPUTS = (SUMMARY, REPORT, LOSS_PLOT, CARD, MANIFEST)  # CARD: the model card, README.md


def _artifacts(run_dir: Path) -> list[list]:
    rows = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name not in REPORT_OUTPUTS):
        rows.append([f"`{path.relative_to(run_dir)}`", _size(path.stat().st_size)])
    return rows


BASELINE_NAMES = {
    "zero_shot": "zero-shot base",
    "few_shot": "worked few-shot base",
    "few_shot_answer": "answer-only few-shot base",
}


def baseline_columns(data: RunView) -> list[tuple[str, dict]]:
    """(name, scores) of every baseline the run evaluated, in a fixed order."""
    return [
        (BASELINE_NAMES[name], data.scores[which]) for name, which in BASELINE_DIRS.items() if data.scores.get(which)
    ]


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def verdict(data: RunView) -> str:
    """One or two sentences, from the files, saying whether fine-tuning beat the strongest baseline and how
    the gates came out."""
    final, comp, gates = data.final, data.comparison, data.gates
    if not final:
        text = "No evaluation was run."
    elif not comp:
        text = f"The fine-tuned model scored {_pct(final['accuracy'])} accuracy; no baseline was evaluated."
    else:
        name = BASELINE_NAMES.get(comp.get("strongest_baseline"), "base")
        low, high = comp["difference_ci95"]
        margin = (data.config.get("gates") or {}).get("min_accuracy_gain", 0.0)
        outcome = difference_outcome(low, high, margin)
        change = (
            f"from {_pct(comp['base_accuracy'])} ({name}) to {_pct(comp['final_accuracy'])} "
            f"({_points(comp['difference'])} points, 95% CI {_points(low)} to {_points(high)})"
        )
        if outcome == "better":
            text = f"Fine-tuning raised accuracy {change}"
        elif outcome == "worse":
            text = f"Fine-tuning did worse than prompting: accuracy went {change}"
        else:
            needed = items_to_tell(comp["difference"], low, high, comp["num_paired_items"])
            text = f"No detectable difference between fine-tuning and prompting: accuracy went {change}"
            text += f"; about {needed} items would tell a difference this size" if needed else ""
        if verified := comp.get("verified"):
            against = BASELINE_NAMES.get(comp.get("verified_baseline", comp.get("strongest_baseline")), "base")
            text += (
                f"; verified accuracy (right answer, every checked step valid) went from "
                f"{_pct(verified['base_accuracy'])} ({against}) to {_pct(verified['final_accuracy'])}"
            )
        text += "."
    text += "".join(f" {sentence}" for sentence in _stage_sentences(gates))
    text += _keep_sentence(data.keep)
    text += _batch_sentence(final)
    if gates:
        failed = [g["name"] for g in gates["gates"] if not g["passed"]]
        counted = [g for g in gates["gates"] if g["status"] != "skip"]
        text += f" {len(counted) - len(failed)} of {len(counted)} gates passed"
        text += f"; failed: {', '.join(failed)}." if failed else "."
    return text


def _keep_sentence(keep: dict | None) -> str:
    """What the run's model kept of what the base model knew (the keep set), where one was evaluated."""
    if not keep:
        return ""
    paired = keep["answer_only"]
    text = (
        f" On the keep set it kept {keep['num_kept']} of {keep['num_base_correct']} items the base model answered "
        f"(answer-only few-shot: {_pct(paired['base_accuracy'])} to {_pct(paired['final_accuracy'])}"
    )
    if keep.get("trained_format"):
        text += f"; {_pct(keep['trained_format']['final_accuracy'])} in its trained format"
    return text + ")."


def _keep_section(data: RunView) -> list[str]:
    """The keep set: base and run's model side by side per category, the categories that fell, with the model's
    own answers."""
    keep = data.keep
    if not keep:
        return []
    paired, trained = keep["answer_only"], keep.get("trained_format")
    low, high = paired["difference_ci95"]
    lines = ["", "### Keep set: what the base model knew", ""]
    lines += [
        f"{keep['num_items']} general items, the base model and the run's model both prompted answer-only "
        f"few-shot: {_pct(paired['base_accuracy'])} to {_pct(paired['final_accuracy'])} "
        f"({_points(paired['difference'])} points, 95% CI {_points(low)} to {_points(high)}); kept "
        f"{keep['num_kept']} of {keep['num_base_correct']} items the base model answered."
        + (f" In its trained format the run's model scores {_pct(trained['final_accuracy'])}." if trained else ""),
        "",
    ]
    rows = [
        [
            name,
            c["num_items"],
            _pct(c["base"] / c["num_items"]),
            _pct(c["final"] / c["num_items"]),
            len(c.get("lost_ids", [])),
        ]
        for name, c in sorted(keep["by_category"].items())
    ]
    lines += _table(["category", "items", "base", "run's model", "lost"], rows)
    if keep.get("stages"):
        lines += ["", "Each stage's model on the keep set, against the base model:", ""]
        stages = [*keep["stages"].items(), ("final", keep)]
        lines += _table(["stage", "answer-only", "change (95% CI)", "kept", "trained format"], [
            [name, _pct(k["answer_only"]["final_accuracy"]), _change(k["answer_only"]),
             f"{k['num_kept']} of {keep['num_base_correct']}",
             _pct(k["trained_format"]["final_accuracy"]) if k.get("trained_format") else "-"]
            for name, k in stages
        ])  # fmt: skip
    final = {r["id"]: r for r in data.keep_predictions["answer_only"]}
    fell = [(n, c) for n, c in sorted(keep["by_category"].items()) if c["final"] < c["base"]]
    for name, category in fell:
        lines += [
            "",
            f"Fell: **{name}** ({category['base']} to {category['final']} of {category['num_items']}), e.g.:",
            "",
        ]
        for item_id in category.get("lost_ids", [])[:3]:
            row = final.get(item_id, {})
            lines += [f"- `{item_id}` {row.get('prompt', '')!r}: expected `{row.get('expected_answer')}`, "
                      f"now `{row.get('extracted_answer')}`"]  # fmt: skip
    return lines


def _change(paired: dict) -> str:
    low, high = paired["difference_ci95"]
    return f"{_points(paired['difference'])} ({_points(low)} to {_points(high)})"


def _batch_sentence(final: dict | None) -> str:
    """Where the final evaluation's probe found batched logits differ from one-at-a-time ones, say so."""
    probe = (final or {}).get("batch_invariance") or {}
    if probe.get("batch_invariant") is not False:
        return ""
    return (
        f" On this machine ({probe.get('dtype')}, {probe.get('cpu_capability') or probe.get('device')}"
        f"{', AMX' if probe.get('amx') else ''}) batched logits differ from one-at-a-time ones, so answers may move "
        "with eval.batch_size (eval/final/batch_invariance.json)."
    )


def _stage_sentences(gates: dict | None) -> list[str]:
    """What each rft/grpo stage did to held-out verified accuracy, and a reward that rose while it fell."""
    out = []
    for gate in (gates or {}).get("gates", []):
        if gate["name"].endswith("_heldout_not_below_start") and gate["status"] != "skip" and gate["value"]:
            v, stage = gate["value"], gate["name"].split("_")[0]
            low, high = v["difference_ci95"]
            out.append(
                f"The {stage} stage took held-out verified accuracy from {_pct(v['base_accuracy'])} to "
                f"{_pct(v['final_accuracy'])} ({_points(v['difference'])} points, 95% CI {_points(low)} to "
                f"{_points(high)})."
            )
        if gate["name"] == "grpo_reward_agrees_with_heldout" and not gate["passed"]:
            out.append(f"GRPO learned the reward, not the task: {gate['detail']}.")
    return out


def _stages_section(data: RunView) -> list[str]:
    """Each rft round and the grpo stage's steps and held-out points, from rft/rounds.jsonl and grpo/metrics.jsonl."""
    lines: list[str] = []
    rounds = data.rft_rounds
    if rounds:
        lines += ["", "## Rejection-sampling fine-tuning (rft)", ""]
        header = [
            "round",
            "sampled",
            "kept",
            "yield",
            "sample accuracy",
            "prompts solved",
            "held-out acc",
            "verified",
            "minutes",
        ]
        lines += _table(
            header,
            [
                [
                    r["round"],
                    r["num_sampled"],
                    r["num_kept"],
                    _pct(r["yield"]),
                    _pct(r["sample_accuracy"]),
                    _pct(r["prompt_pass_rate"]),
                    _pct(r["heldout"]["accuracy"]) if "heldout" in r else "-",
                    _pct(r["heldout"]["verified_accuracy"]) if "heldout" in r else "-",
                    f"{r['elapsed_s'] / 60:.1f}",
                ]  # fmt: skip
                for r in rounds
            ],
        )
        lines += ["", "Kept traces of round N: `rft/round-N/kept.jsonl`; every sample and its score: `sampled.jsonl`."]
    rows = data.grpo_rows
    steps, held = [r for r in rows if "reward" in r], [r for r in rows if r.get("split") == "heldout"]
    if steps:
        lines += ["", "## GRPO", ""]
        k = max(1, len(steps) // 4)

        def mean(key: str, part: list[dict]) -> str:
            values = [r[key]["mean"] if isinstance(r[key], dict) else r[key] for r in part]
            return f"{sum(values) / len(values):.3f}"

        keys = ["reward", *(f"reward_{t}" for t in ("verified", "correct", "steps_valid", "format")),
                "zero_variance_fraction", "truncation_ratio", "clip_fraction", "kl", "entropy"]  # fmt: skip
        keys = [key for key in keys if all(key in r for r in steps)]  # runs from before a term existed
        lines += _table(
            ["per step", f"first {k} steps", f"last {k} steps"],
            [[key, mean(key, steps[:k]), mean(key, steps[-k:])] for key in keys],
        )
        lines += ["", "### Held-out accuracy during GRPO (greedy, the evaluation's code)", ""]
        lines += _table(
            ["step", "accuracy", "verified", "truncated"],
            [[r["step"], _pct(r["accuracy"]), _pct(r["verified_accuracy"]), _pct(r["truncation_rate"])] for r in held],
        )
    return lines


def _configuration_section(data: RunView) -> list[str]:
    """The run's settings, from config.yaml and env.json."""
    cfg, t = data.config, data.config.get("train", {})
    lines: list[str] = []
    lines += ["## Configuration", ""]
    lines += _table(
        ["setting", "value"],
        [
            ["model", cfg.get("model", {}).get("source")],
            ["method / precision", f"{t.get('method')} / {t.get('precision')}"],
            ["optimizer, lr, weight decay", f"{t.get('optimizer')}, {t.get('lr')}, {t.get('weight_decay')}"],
            ["batch x accumulation", f"{t.get('batch_size')} x {t.get('grad_accum_steps')}"],
            ["epochs / max steps", f"{t.get('num_epochs')} / {t.get('max_steps')}"],
            ["max sequence length", cfg.get("data", {}).get("max_seq_length")],
            ["seed", cfg.get("seed")],
            ["device", f"{data.env.get('device')} ({data.env.get('device_name')})"],
            [
                "train data",
                f"{cfg.get('data', {}).get('train_file')} ({data.training.get('num_train_examples')} train / {data.training.get('num_val_examples')} val examples)",
            ],
        ],
    )
    return lines


def _training_section(data: RunView) -> list[str]:
    """Steps, throughput and losses, from metrics.jsonl and training.json."""
    totals = training_totals(data)
    lines: list[str] = []
    lines += ["", "## Training results", ""]
    lines += _table(
        ["steps", "runtime (s)", "samples/s", "tokens/s", "final train loss", "final val loss"],
        [
            [
                totals["steps"],
                f"{totals['runtime_s']:.1f}",
                f"{totals['samples_per_s']:.3f}",
                f"{totals['tokens_per_s']:.1f}",
                f"{totals['final_loss']:.4f}" if totals["final_loss"] is not None else "-",
                f"{totals['final_val_loss']:.4f}" if totals["final_val_loss"] is not None else "-",
            ]
        ],
    )
    lines += ["", "### Loss per epoch", ""]
    lines += _table(["epoch", "mean train loss", "first", "last", "val loss at epoch end"], loss_by_epoch(data))
    return lines


def _val_accuracy_section(data: RunView) -> list[str]:
    """Held-out accuracy while training (train.val_accuracy): the validation split, never the eval set; and
    which step's weights became the final model, and why."""
    if not data.val_accuracy:
        return []
    lines = ["", "### Held-out accuracy while training (validation split, greedy)", ""]
    if (chosen := data.training.get("selected_step")) is not None:
        last = data.training.get("num_steps")
        lines += [
            f"The final model is step {chosen}'s: the best held-out accuracy "
            f"({_pct(data.training['selected_accuracy'])}; ties go to the lower validation loss, "
            f"{data.training['selected_val_loss']:.4f}; train.select=val_accuracy)"
            + (f", not the last step {last}'s." if chosen != last else ", the last step's."),
            "",
        ]
    if data.training.get("pruned"):
        lines += [
            f"Training was pruned at step {data.training['num_steps']} of {data.training['planned_steps']} by "
            "`tracetune tune`: its held-out accuracy there was below the median of earlier trials' at that step.",
            "",
        ]
    elif data.training.get("stopped_early"):
        patience = (data.config.get("train") or {}).get("early_stopping_patience")
        lines += [
            f"Training stopped early at step {data.training['num_steps']} of {data.training['planned_steps']}: "
            f"{patience} held-out points in a row without a better one (train.early_stopping_patience).",
            "",
        ]
    if (floor := data.training.get("keep_floor")) is not None and chosen == 0 and data.training["num_excluded_by_keep"]:
        lines += [
            "**No trained step kept the keep set within gates.max_keep_drop: the final model is the starting "
            "model.** Every later point's keep monitor fell past the limit; a gentler recipe (LoRA, a lower "
            "learning rate, fewer steps) may learn the task without breaking what the model knew.",
            "",
        ]
    if floor is not None:
        lines += [
            f"Steps whose keep monitor (the keep set's monitor half, prompted as the base model is) fell below "
            f"{_pct(floor)} (step 0's less gates.max_keep_drop) were not eligible: "
            f"{data.training.get('num_excluded_by_keep', 0)} of them. The keep set's other half is what the report "
            "scores.",
            "",
        ]
    points = [r for r in data.val_accuracy if "accuracy" in r]
    monitored = any("keep_accuracy" in r for r in points)
    rows = [
        [r["step"], _pct(r["accuracy"]), _pct(r["verified_accuracy"]), r.get("num_items", "")]
        + ([_pct(r["keep_accuracy"]) if "keep_accuracy" in r else "-"] if monitored else [])
        for r in points
    ]
    return lines + _table(["step", "accuracy", "verified", "items"] + (["keep monitor"] if monitored else []), rows)


def _evaluation_section(data: RunView) -> list[str]:
    """Every evaluated model side by side, per category, examples of failures, and the comparison."""
    final, comp = data.final, data.comparison
    lines: list[str] = []
    lines += ["", "## Evaluation", ""]
    final, comp = data.final, data.comparison
    if final:
        columns = [*baseline_columns(data), ("fine-tuned", final)]
        pick = [scores for _, scores in columns]
        rows = [
            ["accuracy [95% CI]", *(_ci(s) for s in pick)],
            ["verified accuracy [95% CI]", *(_verified_ci(s) for s in pick)],
            ["lucky answers (right, invalid work)", *(_pct(s.get("lucky_answer_rate", 0.0)) for s in pick)],
            ["step validity", *(_maybe_pct(s.get("steps", {}).get("step_validity")) for s in pick)],
            ["items", *(s["num_items"] for s in pick)],
            ["answer extraction rate", *(_pct(s["format"]["extraction_rate"]) for s in pick)],
            ["'Answer:' marker rate", *(_pct(s["format"]["answer_marker_rate"]) for s in pick)],
            ["truncation rate", *(_pct(s["format"]["truncation_rate"]) for s in pick)],
            ["mean reasoning steps", *(f"{s['format']['mean_steps']:.2f}" for s in pick)],
            ["new tokens/s", *(s["throughput"]["new_tokens_per_s"] for s in pick)],
            ["items/s", *(s["throughput"]["items_per_s"] for s in pick)],
            *_sampled_rows(pick),
        ]
        lines += _table(["metric", *(n for n, _ in columns)], rows)
        for which, kind in (("few_shot", "worked"), ("few_shot_answer", "answer-only")):
            if not (data.scores.get(which) and data.scores[which].get("baseline")):
                continue
            shot = data.scores[which]["baseline"]
            lines += [
                "",
                f"Few-shot prompt ({kind}): {shot['num_shots']} training traces as demonstrations ({shot['format']} format; "
                f"ids {', '.join(shot['demonstration_ids'])}; prompt sha256 {shot['prefix_sha256'][:12]}...)."
                + _draws_sentence(data, which),
            ]
        for key in ("by_category", "by_difficulty"):
            names = sorted(final[key])
            if names:
                lines += ["", f"### Accuracy {key.replace('_', ' ')} [95% CI] (verified; lucky answers)", ""]
                lines += _table(
                    [key.removeprefix("by_"), *(n for n, _ in columns), "items"],
                    [
                        [n, *(_cell_accuracy(s[key].get(n)) for _, s in columns), final[key][n]["num_items"]]
                        for n in names
                    ],
                )
        lines += _failure_examples(data.predictions["final"])
    if comp:
        low, high = comp["difference_ci95"]
        name = BASELINE_NAMES.get(comp.get("strongest_baseline"), "base")
        lines += ["", f"### Fine-tuned versus the strongest baseline ({name})", ""]
        lines += [
            f"Paired difference {100 * comp['difference']:+.1f} points (95% CI {100 * low:+.1f} to {100 * high:+.1f}, "
            f"{comp['ci_method']}); exact McNemar p = {comp['mcnemar_p']:.3g}; {len(comp['improved_ids'])} items improved, "
            f"{len(comp['regressed_ids'])} regressed, out of {comp['num_paired_items']}.",
        ]
    return lines


def _draws_sentence(data: RunView, baseline: str) -> str:
    """The spread of a few-shot baseline's accuracy over its draws of demonstrations, where there were several."""
    found = ((data.comparison or {}).get("baselines") or {}).get(baseline) or {}
    draws = found.get("draws", [])
    if len(draws) < 2:
        return ""
    scores = ", ".join(f"{_pct(d['accuracy'])} [{_pct(d['ci95'][0])}, {_pct(d['ci95'][1])}]" for d in draws)
    return f" Accuracy over {len(draws)} draws of demonstrations: {scores}; the best ({found['dir']}) is compared with."


def _gates_section(data: RunView) -> list[str]:
    """The gate table, from gates.json."""
    lines: list[str] = []
    if data.gates:
        lines += ["", "## Quality gates", "", f"All passed: **{data.gates['passed']}**", ""]
        lines += _table(
            ["gate", "status", "value", "threshold", "from"],
            [
                [g["name"], g["status"], _short(g["value"]), _short(g["threshold"]), g["source"]]
                for g in data.gates["gates"]
            ],
        )
    return lines


def write_summary(run_dir: Path, data: RunView) -> str:
    """summary.md: the verdict first, then configuration, training, evaluation, gates and the file list."""
    run = data.run
    lines = [f"# tracetune run `{run.get('run_id', run_dir.name)}`", "", f"**{verdict(data)}**", ""]
    lines += [
        f"Status: **{run.get('status', 'unknown')}**; started {run.get('started_at')}, ended {run.get('ended_at')}.",
        "",
    ]
    lines += _configuration_section(data) + _training_section(data) + _stages_section(data)
    lines += _val_accuracy_section(data) + _evaluation_section(data) + _keep_section(data) + _gates_section(data)
    lines += ["", "## Artifacts", "", f"Besides {', '.join(REPORT_OUTPUTS)}, written after this list:", ""]
    lines += _table(["file", "size"], _artifacts(run_dir))
    text = "\n".join(lines) + "\n"
    RunLayout(run_dir).summary.write_text(text, encoding="utf-8")
    return text


def _maybe_pct(x: float | None) -> str:
    return "-" if x is None else _pct(x)


def _verified_ci(scores: dict) -> str:
    if "verified_accuracy" not in scores:
        return "-"
    low, high = scores["verified_ci95"]
    return f"{_pct(scores['verified_accuracy'])} [{_pct(low)}, {_pct(high)}]"


def _cell_accuracy(group: dict | None) -> str:
    """Accuracy [95% CI] (verified accuracy; lucky answers)."""
    if group is None:
        return "-"
    low, high = group["ci95"]
    verified, lucky = _pct(group.get("verified_accuracy", 0.0)), _pct(group.get("lucky_answer_rate", 0.0))
    return f"{_pct(group['accuracy'])} [{_pct(low)}, {_pct(high)}] ({verified}; {lucky})"


def _sampled_rows(pick: list[dict]) -> list[list]:
    """mean@k, pass@k and maj@k rows where any evaluated model was sampled."""
    if not any(s.get("sampled") for s in pick):
        return []

    def cell(scores: dict, *path: str) -> str:
        value = scores.get("sampled")
        for key in path:
            value = value.get(key) if value else None
        if not value:
            return "-"
        low, high = value["ci95"]
        return f"{_pct(value['value'])} [{_pct(low)}, {_pct(high)}]"

    k = max(s["sampled"]["num_samples"] for s in pick if s.get("sampled"))
    sizes = [str(2**e) for e in range(k.bit_length()) if 2**e <= k]
    rows = [[f"mean@{k} [95% CI]", *(cell(s, "mean_at_k") for s in pick)]]
    rows += [[f"pass@{n}", *(cell(s, "pass_at", n) for s in pick)] for n in sizes]
    rows += [[f"maj@{k}", *(cell(s, "maj_at_k") for s in pick)]]
    return rows


FAILURE_KINDS = {
    "wrong answer": lambda r: not r["correct"] and r["finish_reason"] != "length",
    "right answer, invalid step": lambda r: r["correct"] and r.get("work_valid") is False,
    "truncated": lambda r: r["finish_reason"] == "length",
}


def _failure_examples(rows: list[dict], per_kind: int = 2) -> list[str]:
    """A few of the fine-tuned model's completions for each kind of failure, the failing step named."""
    lines = []
    for kind, matches in FAILURE_KINDS.items():
        chosen = [r for r in rows if matches(r)][:per_kind]
        if not chosen:
            continue
        lines += ["", f"### Examples: {kind}", ""]
        for r in chosen:
            bad = f"; first invalid step: {r['first_bad_step']}" if r.get("first_bad_step") else ""
            lines += [f"- `{r['id']}`: expected `{r['expected_answer']}`, got `{r['extracted_answer']}`{bad}", ""]
            lines += ["  ```", *(f"  {line}" for line in r["completion"].splitlines()), "  ```"]
    return lines


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|")[:80]


def verdict_class(data: RunView) -> str:
    """good: the gates passed and fine-tuning beat the strongest baseline; bad: a gate failed or it did worse;
    neutral: nothing was compared, or no difference could be detected."""
    gates, comparison = data.gates, data.comparison
    outcome = difference_outcome(*comparison["difference_ci95"]) if comparison else None
    if (gates and not gates["passed"]) or outcome == "worse":
        return "bad"
    return "good" if outcome == "better" else "neutral"


def write_report(run_dir: Path) -> None:
    """Regenerate summary.md, loss.png and report.html from the run directory's files."""
    from tracetune.evidence import page

    data = read_run(run_dir)
    summary = write_summary(run_dir, data)
    plots = []
    if data.train:
        loss_png = plot_loss(data)
        RunLayout(run_dir).loss_plot.write_bytes(loss_png)
        plots += [
            ("Training and validation loss", loss_png),
            ("Learning rate", plot_series(data, "lr", "Learning rate")),
        ]
        plots.append(("Throughput", plot_series(data, "tokens_per_s", "Training tokens/s")))
    if any("accuracy" in r for r in data.val_accuracy):
        plots.append(("Held-out accuracy while training", plot_val_accuracy(data)))
    if any(r.get("split") == "heldout" for r in data.grpo_rows):
        plots.append(("GRPO reward and held-out verified accuracy", plot_grpo(data)))
    if data.final:
        plots.append(("Accuracy per category", plot_accuracy([*baseline_columns(data), ("fine-tuned", data.final)])))
    body = "\n".join(
        [
            page.gates_html(data.gates),
            page.examples_html(data),
            page.plots_html(plots),
            page.markdown_html(page.without_sections(summary, ("Quality gates",))),
        ]
    )
    html_text = page.page(f"tracetune run {run_dir.name}", verdict(data), verdict_class(data), body, len(plots))
    RunLayout(run_dir).report.write_text(html_text, encoding="utf-8")
