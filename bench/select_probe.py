"""Narrow to broad: does choosing the model by held-out accuracy with the keep monitor (train.select=val_accuracy)
lose less of what the base model knew than keeping the last step (train.select=last)?

    python bench/select_probe.py [--families unit_conversion sequence] [--out select_probe]

One `tracetune run` of the embedded Gemma 3 270M, fully fine-tuned on a few narrow families of the bundled
traces (default: unit conversion and sequences), evaluated on the bundled eval items of the other families,
with the keep set (data/keep.jsonl) monitored while training (its monitor half) and reported on its other half.
The run chooses its final model by held-out accuracy among steps whose keep monitor held (select=val_accuracy);
its last checkpoint holds what select=last would have returned (the same training: one seed, one data order), and
is evaluated here with the run's own keep and eval code. Paired differences (bootstrap 95%) of the chosen model
against the last step's on the keep set's report half and on the eval items. Writes bench/results/<out>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def split_data(work: Path, families: list[str]) -> tuple[Path, Path]:
    """(narrow training traces, eval items of every other family)."""
    train = [json.loads(x) for x in (REPO / "data" / "train.jsonl").read_text().splitlines()]
    items = [json.loads(x) for x in (REPO / "data" / "eval.jsonl").read_text().splitlines()]
    narrow = [r for r in train if r["meta"]["category"] in families]
    broad = [r for r in items if r.get("category") not in families]
    work.mkdir(parents=True, exist_ok=True)
    paths = work / "narrow_train.jsonl", work / "broad_eval.jsonl"
    for path, rows in zip(paths, (narrow, broad), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def evaluate_last(run_dir: Path) -> None:
    """The last checkpoint (what select=last returns) on the keep report half and the eval items, by the run's
    own code, into eval/keep/last/ and eval/last/."""
    from tracetune.config import load_config
    from tracetune.layout import RunLayout
    from tracetune.models.checkpoints import committed_checkpoints, load_checkpoint_model
    from tracetune.models.sources import load_tokenizer
    from tracetune.pipeline import evaluate_keep, evaluate_model, load_inputs

    files = RunLayout(run_dir)
    cfg = load_config(files.config)
    inputs = load_inputs(cfg)
    last = committed_checkpoints(files.checkpoints)[-1]
    tokenizer, model = load_tokenizer(cfg.model.source), load_checkpoint_model(last, cfg).eval()
    loaded = (tokenizer, model)
    evaluate_keep(cfg, str(last), inputs.keep, run_dir, ("answer_only",), loaded, {"answer_only": "last"})
    evaluate_model(cfg, str(last), inputs.eval_items, files.eval("last").path, loaded=loaded)


def paired(run_dir: Path, chosen: str, other: str) -> dict:
    """`chosen` against `other` (directories of the run), paired on their shared items: the evaluation's own
    comparison (final = chosen, base = other)."""
    from tracetune.eval.scoring import compare_predictions

    result = compare_predictions(run_dir / other, run_dir / chosen)
    return {"a": chosen, "b": other} | {k: v for k, v in result.items() if not k.endswith("_ids")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["unit_conversion", "sequence"])
    parser.add_argument("--out", default="select_probe")
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"), help="the run's config")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides of the run")
    args = parser.parse_args()
    work = REPO / "runs" / args.out
    train, broad = split_data(work, args.families)
    overrides = [
        f"data.train_file={train}", f"eval.eval_file={broad}", "data.max_train_records=null", "data.val_fraction=0.1",
        "train.method=full", "train.lr=1e-4", "train.num_epochs=1", "train.eval_every_steps=15",
        "train.save_every_steps=null", "train.val_accuracy=true", "train.select=val_accuracy",
        "eval.max_items=60", "eval.baselines=[few_shot_answer]", f"output.root={work}", "output.run_name=run",
        *args.overrides,
    ]  # fmt: skip
    started = time.perf_counter()
    command = [sys.executable, "-m", "tracetune", "run", args.config, *overrides]
    result = subprocess.run(command, cwd=REPO)
    if result.returncode not in (0, 3):
        raise SystemExit(f"the run failed: exit {result.returncode}")
    run_dir = work / "run"
    evaluate_last(run_dir)
    training = json.loads((run_dir / "training.json").read_text())
    record = {
        "families": args.families,
        "overrides": overrides,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "selected_step": training.get("selected_step"),
        "last_step": training["num_steps"],
        "keep_floor": training.get("keep_floor"),
        "keep": paired(run_dir, "eval/keep/final", "eval/keep/last"),
        "keep_base": paired(run_dir, "eval/keep/last", "eval/keep/base"),
        "eval": paired(run_dir, "eval/final", "eval/last"),
        "points": [
            json.loads(x)
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("split") == "val_accuracy"
        ],  # fmt: skip
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"# select=val_accuracy (keep monitor) against select=last: narrow ({', '.join(args.families)}) to broad",
        "",
        f"Chosen step {record['selected_step']} of {record['last_step']} ({record['minutes']} min in all).",
        "",
        "| comparison | items | chosen (a) | other (b) | a - b | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("keep", "keep_base", "eval"):
        p = record[key]
        low, high = p["difference_ci95"]
        lines.append(f"| {p['a']} vs {p['b']} | {p['num_paired_items']} | {p['final_accuracy']:.1%} | "
                     f"{p['base_accuracy']:.1%} | {p['difference']:+.1%} | [{low:+.1%}, {high:+.1%}] |")  # fmt: skip
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
