"""`tracetune compare`: config, environment, training and eval side by side for two or more runs."""

from __future__ import annotations

import json
from pathlib import Path

from tracetune.config import flatten
from tracetune.evidence.report import _pct, training_totals, verdict
from tracetune.evidence.view import read_run


def _differences(dicts: list[dict]) -> dict[str, list]:
    keys = sorted(set().union(*dicts))
    return {
        k: [d.get(k) for d in dicts] for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in dicts}) > 1
    }


def compare_runs(run_dirs: list[Path]) -> dict:
    runs = [read_run(d) for d in run_dirs]
    envs = [{k: v for k, v in r.env.items() if k not in ("packages", "hostname")} for r in runs]
    packages = [r.env.get("packages", {}) for r in runs]
    rows = {}
    for r in runs:
        totals = training_totals(r)
        for key, value in totals.items():
            rows.setdefault(key, []).append(value)
        for which in ("base", "final"):
            scores = r.scores.get(which)
            rows.setdefault(f"{which}_accuracy", []).append(scores["accuracy"] if scores else None)
            rows.setdefault(f"{which}_accuracy_ci95", []).append(scores["ci95"] if scores else None)
        gates = r.gates
        rows.setdefault("gates_passed", []).append(gates["passed"] if gates else None)
    return {
        "runs": [str(d) for d in run_dirs],
        "config_differences": _differences([flatten(r.config) for r in runs]),
        "environment_differences": _differences(envs),
        "package_differences": _differences(packages),
        "metrics": rows,
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{_pct(value[0])}, {_pct(value[1])}]"
    return str(value)


def to_markdown(result: dict) -> str:
    names = [Path(r).name for r in result["runs"]]
    header = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    out = []
    for title, key in (
        ("Config differences", "config_differences"),
        ("Environment differences", "environment_differences"),
        ("Package differences", "package_differences"),
        ("Training and evaluation", "metrics"),
    ):
        out.append(f"## {title}\n")
        rows = result[key]
        if not rows:
            out.append("(none)\n")
            continue
        out.append(
            header + "".join(f"| {k} | " + " | ".join(_cell(v) for v in values) + " |\n" for k, values in rows.items())
        )
    return "\n".join(out)


def best_run_sentence(run_dirs: list[Path], runs: list[dict]) -> str:
    """Which run's fine-tuned model scored the highest verified accuracy (then accuracy), from its scores."""
    scored = [(d.name, r.final) for d, r in zip(run_dirs, runs, strict=True) if r.final]
    if not scored:
        return f"{len(run_dirs)} runs compared; none has a final evaluation."
    name, best = max(scored, key=lambda x: (x[1].get("verified_accuracy", 0.0), x[1]["accuracy"]))
    low, high = best.get("verified_ci95", [0.0, 0.0])
    return (
        f"{len(run_dirs)} runs compared; the highest verified accuracy is {name}'s: "
        f"{_pct(best.get('verified_accuracy', 0.0))} (95% CI {_pct(low)} to {_pct(high)}), "
        f"accuracy {_pct(best['accuracy'])}."
    )


def write_compare_html(run_dirs: list[Path], result: dict, path: Path) -> None:
    """A page for several runs: which did best, each run's verdict, final accuracies with intervals, and the
    comparison's tables as HTML tables."""
    import html

    from tracetune.evidence import page
    from tracetune.evidence.plots import plot_runs

    runs = [read_run(d) for d in run_dirs]
    verdicts = "".join(
        f"<li><strong>{html.escape(d.name)}</strong>: {html.escape(verdict(r))}</li>"
        for d, r in zip(run_dirs, runs, strict=True)
    )
    plots = [("Final accuracy per run", plot_runs([d.name for d in run_dirs], runs))]
    body = "\n".join(
        [f"<h2>Runs</h2><ul>{verdicts}</ul>", page.plots_html(plots), page.markdown_html(to_markdown(result))]
    )
    title = "tracetune compare: " + ", ".join(d.name for d in run_dirs)
    path.write_text(page.page(title, best_run_sentence(run_dirs, runs), "neutral", body, len(plots)), encoding="utf-8")
