"""Does training past imitation beat more imitation? RFT, GRPO and plain SFT continued for the same minutes,
each from the same SFT model, scored on the held-out eval set by the evaluation's own code, in one invocation.

    python bench/rl_quality.py [--start runs/<sft run>/final_model] [--arms rft grpo grpo-anchor control]
                               [--arm-overrides key=value ...]

Without --start, the start is trained first (`tracetune train` of --start-config on all 1,000 bundled traces,
held-out accuracy on the validation split every --start-eval-every steps, stopped when it has not risen for two
points, the best point kept): RL earns its minutes on top of SFT that has stopped improving. Each arm is a real
`tracetune run` of configs/reasoning_rl.yaml from the start (stages=[rft] or [grpo]) with --arm-overrides on
top; the first arm also evaluates the start itself on the eval set in the run's chat format (eval/base), and every
arm's answers are paired against it. The control is `stages=[sft]` on all the traces for the minutes the
longest RL arm's stage took (steps = those minutes / the start run's seconds per SFT step), its curve from its
held-out points on the validation split (train.val_accuracy), as the rl arms' curves are. Writes
bench/results/<out>.json, .md and .png: held-out accuracy and verified accuracy against minutes for every arm
(GRPO's reward, completion length and informative fraction per step beside them), and each arm's final answers
paired against the start and against the control.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "reasoning_rl.yaml"
COMMON = ["eval.baselines=[zero_shot]", "output.root={root}"]


def tracetune(*args: str) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tracetune", *args], cwd=REPO, capture_output=True, text=True)
    name = next(a.split("=", 1)[1] for a in args if a.startswith("output.run_name="))
    print(
        f"  tracetune {args[0]} {name}: exit {result.returncode} in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    if result.returncode not in (0, 3):  # 3: gates failed, still a finished run worth measuring
        raise SystemExit(result.stderr[-4000:])
    return result


def run_arm(name: str, start: Path, root: Path, overrides: list[str]) -> Path:
    args = [f"model.source={start}", *(c.format(root=root) for c in COMMON), f"output.run_name={name}", *overrides]
    tracetune("run", str(CONFIG), *args)
    return root / name


def train_start(config: Path, root: Path, eval_every: int, overrides: list[str]) -> Path:
    """The race's start: SFT on all the traces until its held-out accuracy stops rising (early stopping on the
    validation split, the best point selected); returns its final_model."""
    run_dir = root / "start"
    if not (run_dir / "final_model").is_dir():
        args = [f"output.root={root}", "output.run_name=start", "data.max_train_records=null",
                "train.val_accuracy=true", "train.select=val_accuracy", "train.early_stopping_patience=2",
                f"train.eval_every_steps={eval_every}", f"train.save_every_steps={eval_every}", *overrides]  # fmt: skip
        tracetune("train", str(config), *args)
    return run_dir / "final_model"


def _scores(path: Path) -> dict:
    scores = json.loads((path / "scores.json").read_text())
    return {"accuracy": scores["accuracy"], "verified_accuracy": scores["verified_accuracy"]}


# Arms besides rft, grpo and control: a stage and its overrides (a lower GRPO learning rate, say).
# bench/results/rl_quality.* were measured when the config's grpo.lr was 1e-5 (arm "grpo"); it is now 3e-6.
# grpo-anchor and grpo-lora (issue 30's conservative updates) are not measured yet.
VARIANTS = {
    "grpo-lr3e-6": ("grpo", ["grpo.lr=3e-6"]),
    "grpo-lr1e-5": ("grpo", ["grpo.lr=1e-5"]),
    "grpo-anchor": ("grpo", ["grpo.sft_coef=0.5", "grpo.fill_informative=true"]),
    "grpo-lora": ("grpo", ["grpo.method=lora", "grpo.lr=1e-5", "grpo.fill_informative=true"]),
}


def rft_curve(run_dir: Path) -> list[dict]:
    rounds = [json.loads(x) for x in (run_dir / "rft" / "rounds.jsonl").read_text().splitlines()]
    return [
        {"minutes": r["elapsed_s"] / 60, **{k: r["heldout"][k] for k in ("accuracy", "verified_accuracy")}}
        for r in rounds
    ]


def grpo_curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "reward" in r}
    held = [r for r in rows if r.get("split") == "heldout" and r["step"] > 0]
    return [
        {"minutes": elapsed[r["step"]] / 60, "accuracy": r["accuracy"], "verified_accuracy": r["verified_accuracy"]}
        for r in held
    ]


def grpo_steps(run_dir: Path) -> list[dict]:
    """GRPO's per-step curves: mean reward, mean completion length, informative fraction, prompts drawn."""
    rows = [json.loads(x) for x in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    keys = ("informative_fraction", "mean_completion_tokens", "truncation_ratio", "num_draws")
    return [
        {
            "step": r["step"],
            "minutes": r["elapsed_s"] / 60,
            "reward": r["reward"]["mean"],
            **{k: r.get(k) for k in keys},
        }
        for r in rows
        if "reward" in r
    ]


def control_curve(run_dir: Path) -> list[dict]:
    """The control's held-out points (train.val_accuracy: the validation split, as the rl arms' curves; never the
    eval set), against its training minutes."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r}
    points = [r for r in rows if r.get("split") == "val_accuracy" and r["step"] > 0]
    logged = sorted(elapsed)  # the control logs every step; another run's point takes the next logged step's time
    return [
        {"minutes": elapsed[next((s for s in logged if s >= r["step"]), logged[-1])] / 60, "accuracy": r["accuracy"],
         "verified_accuracy": r["verified_accuracy"]}
        for r in points
    ]  # fmt: skip


def paired(a: Path, b: Path, key: str) -> dict:
    from tracetune.eval.scoring import compare_predictions

    result = compare_predictions(a, b, key=key)
    return {
        k: result[k] for k in ("base_accuracy", "final_accuracy", "difference", "difference_ci95", "num_paired_items")
    }


def seconds_per_sft_step(start: Path) -> float:
    training = json.loads((start.parent / "training.json").read_text())
    return training["elapsed_s"] / training["num_steps"]


def stage_minutes(run_dir: Path, stage: str) -> float:
    return json.loads((run_dir / stage / "training.json").read_text())["elapsed_s"] / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=Path, default=None, help="an SFT run's final_model; default: train one")
    parser.add_argument("--start-config", type=Path, default=REPO / "configs" / "quickstart.yaml")
    parser.add_argument("--start-eval-every", type=int, default=60, help="the start's held-out points, in steps")
    parser.add_argument("--start-overrides", nargs="*", default=[], help="key=value for the start's training")
    parser.add_argument("--arms", nargs="+", default=["rft", "grpo", "grpo-anchor", "control"])
    parser.add_argument("--arm-overrides", nargs="*", default=[], help="key=value for every arm, after its own")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "rl_quality")
    parser.add_argument("--out", default="rl_quality")
    parser.add_argument("--control-minutes", type=float, default=None, help="default: the longest RL stage's")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = (args.start or train_start(args.start_config, root, args.start_eval_every, args.start_overrides)).resolve()
    arms = [a for a in args.arms if a != "control"] + (["control"] if "control" in args.arms else [])
    curves, runs, steps_of = {}, {}, {}
    for i, arm in enumerate(arms):  # the first arm evaluates the start (eval/base); the others pair against it
        base = [] if i == 0 else ["eval.run_base=false"]
        if arm == "control":
            minutes = args.control_minutes or max(stage_minutes(runs[a], VARIANTS.get(a, (a,))[0]) for a in runs)
            steps = max(1, round(minutes * 60 / seconds_per_sft_step(start)))
            overrides = ["stages=[sft]", "data.max_train_records=null", "train.num_epochs=10", f"train.max_steps={steps}",
                         f"train.eval_every_steps={max(1, steps // 4)}", "train.val_accuracy=true",
                         "train.warmup_steps=0", "train.scheduler=constant", "train.lr=2.0e-5",
                         "train.log_every_steps=1"]  # fmt: skip
        else:
            stage, extra = VARIANTS.get(arm, (arm, []))
            overrides = [f"stages=[{stage}]", *extra]
        if not (root / arm / "gates.json").is_file():
            run_arm(arm, start, root, [*overrides, *base, *args.arm_overrides])
        runs[arm] = root / arm
        stage = VARIANTS.get(arm, (arm,))[0]
        curves[arm] = {"rft": rft_curve, "grpo": grpo_curve, "control": control_curve}[stage](runs[arm])
        if stage == "grpo":
            steps_of[arm] = grpo_steps(runs[arm])
    start_eval = runs[arms[0]] / "eval" / "base"
    result = {
        "start": str(start),
        "start_scores": {"minutes": 0.0, **_scores(start_eval)},
        "start_curve": control_curve(start.parent) if (start.parent / "metrics.jsonl").is_file() else None,
        "arm_overrides": args.arm_overrides,
        "curves": curves,
        "grpo_steps": steps_of,
        "paired": {},
    }
    for arm, run_dir in runs.items():
        final = run_dir / "eval" / "final"
        result["paired"][arm] = {
            "vs_start": {k: paired(start_eval, final, k) for k in ("correct", "verified")},
            "minutes": stage_minutes(run_dir, VARIANTS.get(arm, (arm,))[0])
            if arm != "control"
            else json.loads((run_dir / "training.json").read_text())["elapsed_s"] / 60,
        }
        if "control" in runs and arm != "control":
            control = runs["control"] / "eval" / "final"
            result["paired"][arm]["vs_control"] = {k: paired(control, final, k) for k in ("correct", "verified")}
    out = REPO / "bench" / "results" / args.out
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table(result), encoding="utf-8")
    plot(result, out.with_suffix(".png"))
    print(table(result))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _diff(p: dict) -> str:
    low, high = p["difference_ci95"]
    return f"{100 * p['difference']:+.0f} [{100 * low:+.0f}, {100 * high:+.0f}]"


def table(result: dict) -> str:
    s = result["start_scores"]
    lines = [
        f"Start: {result['start']} (eval set: accuracy {_pct(s['accuracy'])}, verified {_pct(s['verified_accuracy'])})",
    ]
    if result.get("start_curve"):
        lines.append(
            "Start's held-out points (validation split; minutes: accuracy / verified): "
            + ", ".join(_point(p) for p in result["start_curve"])
        )
    if result.get("arm_overrides"):
        lines.append(f"Every arm: `{' '.join(result['arm_overrides'])}`")
    lines += [
        "",
        "| arm | minutes | accuracy | verified | verified vs start (points, 95% CI) | verified vs control |",
        "|---|---|---|---|---|---|",
    ]
    for arm, p in result["paired"].items():
        v = p["vs_start"]["verified"]
        control = _diff(p["vs_control"]["verified"]) if "vs_control" in p else ""
        accuracy = _pct(p["vs_start"]["correct"]["final_accuracy"])
        lines.append(
            f"| {arm} | {p['minutes']:.1f} | {accuracy} | {_pct(v['final_accuracy'])} | {_diff(v)} | {control} |"
        )
    lines += ["", "Held-out curves (validation split; minutes: accuracy / verified):"]
    for arm, points in result["curves"].items():
        lines.append(f"- {arm}: " + ", ".join(_point(p) for p in points))
    for arm, steps in result.get("grpo_steps", {}).items():
        lines += ["", f"{arm} per step:", "", "| step | minutes | reward | completion tokens | informative | draws |"]
        lines.append("|---|---|---|---|---|---|")
        for r in steps:
            informative = "" if r["informative_fraction"] is None else f"{r['informative_fraction']:.2f}"
            lines.append(
                f"| {r['step']} | {r['minutes']:.1f} | {r['reward']:.3f} | {r['mean_completion_tokens']:.1f} "
                f"| {informative} | {r['num_draws'] if r['num_draws'] is not None else ''} |"
            )
    return "\n".join(lines) + "\n"


def _point(p: dict) -> str:
    return f"{p['minutes']:.1f}: {_pct(p['accuracy'])} / {_pct(p['verified_accuracy'])}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_len) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, points in result["curves"].items():
        xs = [p["minutes"] for p in points]
        ax.plot(xs, [p["verified_accuracy"] for p in points], marker="o", label=arm)
    ax.set_xlabel("minutes on 2 CPU cores")
    ax.set_ylabel("held-out verified accuracy (validation split)")
    ax.legend()
    for arm, steps in result.get("grpo_steps", {}).items():
        ax_len.plot([r["step"] for r in steps], [r["mean_completion_tokens"] for r in steps], marker=".", label=arm)
    ax_len.set_xlabel("GRPO step")
    ax_len.set_ylabel("mean completion tokens")
    if result.get("grpo_steps"):
        ax_len.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
