"""The final model's README.md: a Hugging Face model card built from the run directory's files alone.

YAML metadata first (huggingface_hub's ModelCardData: base model and its license where known, the datasets
where they are Hub datasets, `model-index` with the fine-tuned model's accuracy and verified accuracy and the
strongest baseline's), then
what was trained, how and on what, the verdict, the evaluation and the gates. `tracetune verify` builds it
again from the files and reports any difference, so the card cannot drift from the evidence.
"""

from __future__ import annotations

from pathlib import Path

from tracetune.evidence.report import _pct, baseline_columns, verdict
from tracetune.evidence.view import RunView, read_run
from tracetune.layout import RunLayout
from tracetune.models.sources import PACKAGED


def base_model(source: str) -> dict:
    """base_model and license of a model source where they are known: a packaged model's origin, a hub id."""
    kind, _, name = source.partition(":")
    if kind == "packaged" and name in PACKAGED:
        return {"base_model": PACKAGED[name].hub_id, "license": PACKAGED[name].license}
    if kind != "tiny" and "/" in source and not Path(source).exists():
        return {"base_model": source}
    return {}


def metadata(data: RunView, run_id: str) -> str:
    """The card's YAML metadata, through huggingface_hub's ModelCardData (which shapes `model-index`)."""
    from huggingface_hub import EvalResult, ModelCardData

    cfg, final, comparison = data.config, data.final, data.comparison
    datasets = [str(f).removeprefix("hf:") for f in (cfg["data"]["train_file"],) if str(f).startswith("hf:")]
    results = []
    if final:
        metrics = [("accuracy", final["accuracy"]), ("verified accuracy", final["verified_accuracy"])]
        if comparison:
            name = comparison["strongest_baseline"].replace("_", "-")
            metrics += [(f"{name} base model accuracy", comparison["base_accuracy"])]
            metrics += [(f"{name} base model verified accuracy", comparison["verified"]["base_accuracy"])]
        eval_name = Path(str(cfg["eval"]["eval_file"])).name
        sets = [(eval_name, "reasoning with checked steps", metrics)]
        if keep := data.keep:
            kept = [("keep-set accuracy (answer-only few-shot)", keep["answer_only"]["final_accuracy"])]
            kept += [("base model keep-set accuracy", keep["answer_only"]["base_accuracy"])]
            sets.append((Path(str(cfg["eval"]["keep_file"])).name, "what the base model knew (keep set)", kept))
        results = [
            EvalResult(
                task_type="text-generation",
                task_name=task,
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type="accuracy",
                metric_name=name,
                metric_value=round(value, 4),
            )  # fmt: skip
            for dataset, task, pairs in sets
            for name, value in pairs
        ]
    card = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["tracetune", "reasoning", *cfg.get("stages", ["sft"])],
        datasets=datasets or None,
        model_name=run_id,
        eval_results=results or None,
        **base_model(cfg["model"]["source"]),
    )
    return card.to_yaml()


def _rows(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _interval(scores: dict, key: str, ci: str) -> str:
    low, high = scores[ci]
    return f"{_pct(scores[key])} [{_pct(low)}, {_pct(high)}]"


def build_card(run_dir: Path) -> str:
    """The card's text, from config.yaml, run.json, training.json, stages.json, eval/ and gates.json."""
    data = read_run(run_dir)
    cfg, run, training = data.config, data.run, data.training
    run_id = run.get("run_id", run_dir.name)
    t = cfg["train"]
    lines = ["---", metadata(data, run_id).strip(), "---", ""]
    lines += [f"# {run_id}", "", f"Fine-tuned from `{cfg['model']['source']}` with tracetune "]
    lines[-1] += f"(stages: {', '.join(cfg.get('stages', ['sft']))}; tracetune {run.get('tracetune_version')})."
    lines += ["", f"**{verdict(data)}**", "", "## Training", ""]
    lines += _rows(
        ["setting", "value"],
        [
            ["train data", f"`{cfg['data']['train_file']}` ({training.get('num_train_examples')} examples)"],
            ["method / precision", f"{t['method']} / {t['precision']}"],
            ["optimizer, lr", f"{t['optimizer']}, {t['lr']}"],
            ["steps", f"{training.get('num_steps')} of {training.get('planned_steps')}"],
            ["seed", cfg["seed"]],
            ["data sha256", ", ".join(f"`{Path(p).name}`: {d[:16]}" for p, d in run.get("data_sha256", {}).items())],
        ],
    )
    columns = baseline_columns(data) + ([("fine-tuned", data.final)] if data.final else [])
    if columns:
        lines += ["", "## Evaluation", "", f"On `{cfg['eval']['eval_file']}`, greedy, answers and steps checked:", ""]
        lines += _rows(
            ["model", "accuracy [95% CI]", "verified accuracy [95% CI]", "items"],
            [
                [
                    n,
                    _interval(s, "accuracy", "ci95"),
                    _interval(s, "verified_accuracy", "verified_ci95"),
                    s["num_items"],
                ]
                for n, s in columns
            ],
        )
    if data.gates:
        lines += ["", "## Quality gates", ""]
        lines += _rows(["gate", "status"], [[g["name"], g["status"]] for g in data.gates["gates"]])
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    lines += ['tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")']
    lines += ['model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")', "```", ""]
    lines += ["Prompts follow the tokenizer's chat template; completions end with a line `Answer: ...`."]
    return "\n".join(lines) + "\n"


def write_card(run_dir: Path) -> Path:
    path = RunLayout(run_dir).card
    path.write_text(build_card(run_dir), encoding="utf-8")
    return path


def check_card(run_dir: Path) -> list[str]:
    """The card on disk against the card the files give now."""
    path = RunLayout(run_dir).card
    if not path.is_file():
        return [f"{path.relative_to(run_dir)} missing"]
    if path.read_text(encoding="utf-8") != build_card(run_dir):
        return [f"{path.relative_to(run_dir)} does not match the run's files (rebuild it with `tracetune report`)"]
    return []
