"""Training throughput of tracetune's own modes, side by side: {full, LoRA} x {fp32, bf16 autocast}.

Each mode trains the same model on the same examples for the same number of optimizer steps; modes are
interleaved (A B C D A B C D ...) for --repeats rounds so drift on the machine hits all of them alike.
The first --warmup steps of every run are excluded. Writes bench/results/<--out>.{json,md} (default train_modes).

    python bench/train_modes.py --steps 8 --repeats 2            # Gemma 3 270M on this machine
    python bench/train_modes.py --source tiny:gemma3 --steps 4   # a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

from tracetune.config import load_config
from tracetune.lifecycle import new_run_dir
from tracetune.pipeline import load_for_training, load_inputs
from tracetune.train.loop import fit

MODES = ["full/fp32", "full/bf16-autocast", "lora/fp32", "lora/bf16-autocast"]
RESULTS = Path(__file__).resolve().parent / "results"


def run_once(source: str, method: str, precision: str, steps: int, root: Path, name: str, *extra: str) -> list[dict]:
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml",
        [
            f"model.source={source}",
            f"train.method={method}",
            f"train.precision={precision}",
            f"train.max_steps={steps}",
            "train.log_every_steps=1",
            "train.eval_every_steps=null",
            "train.save_every_steps=null",
            "data.val_fraction=0",
            "train.lr=1e-5",
            f"output.root={root}",
            f"output.run_name={name}",
            *extra,
        ],
    )
    inputs = load_inputs(cfg)
    tokenizer, model, train, val, _ = load_for_training(cfg, inputs)
    run_dir = new_run_dir(cfg)
    fit(cfg, run_dir, model, tokenizer, train, val)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="packaged:gemma3-270m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--modes", nargs="+", default=MODES, help="method/precision[/compile] keys, the first is the baseline"
    )
    parser.add_argument("--out", default="train_modes", help="result file stem under bench/results")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {mode: [] for mode in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for key in args.modes:
                method, precision, *options = key.split("/")
                extra = ["train.compile=true"] if "compile" in options else []
                name = key.replace("/", "-") + f"-{repeat}"
                rows = run_once(args.source, method, precision, args.steps, Path(tmp), name, *extra)
                timed = rows[args.warmup :]
                tokens = sum(r["num_tokens"] for r in timed)
                seconds = sum(r["num_tokens"] / r["tokens_per_s"] for r in timed)
                samples[key].append(tokens / seconds)
                print(f"{key} repeat {repeat}: {tokens / seconds:.1f} tokens/s", flush=True)
    baseline = statistics.median(samples[args.modes[0]])
    table = {
        key: {
            "median_tokens_per_s": statistics.median(v),
            "runs": v,
            "ratio_vs_first": statistics.median(v) / baseline,
        }
        for key, v in samples.items()
    }
    result = {
        "source": args.source,
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup,
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}",
        "results": table,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    # All modes share one process, so peak RSS would be the maximum over modes: bench/run.py measures memory.
    lines = [f"| mode | median tokens/s | vs {args.modes[0]} |", "|---|---|---|"]
    lines += [f"| {k} | {v['median_tokens_per_s']:.1f} | {v['ratio_vs_first']:.2f}x |" for k, v in table.items()]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
