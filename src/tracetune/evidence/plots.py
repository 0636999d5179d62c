"""The report's plots as PNG bytes, from the `RunView` (evidence/view.py) the report reads (files only)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_loss(data: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in data.train], [r["loss"] for r in data.train], label="train")
    if data.val:
        ax.plot([r["step"] for r in data.val], [r["loss"] for r in data.val], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss (per loss token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_series(data: dict, key: str, title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in data.train], [r.get(key) for r in data.train])
    ax.set(xlabel="optimizer step", ylabel=key, title=title)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_val_accuracy(data: dict) -> bytes:
    """Held-out accuracy while training (and the keep set's monitor half) against steps, the validation loss on
    a second axis, the chosen step marked."""
    points = [r for r in data.val_accuracy if "accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["step"] for r in points], [r["accuracy"] for r in points], "o-", label="held-out accuracy")
    ax.plot([r["step"] for r in points], [r["verified_accuracy"] for r in points], "s--", label="held-out verified")
    keep = [r for r in points if "keep_accuracy" in r]
    if keep:
        ax.plot([r["step"] for r in keep], [r["keep_accuracy"] for r in keep], "^-", label="keep monitor")
    if (chosen := data.training.get("selected_step")) is not None:
        ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen (step {chosen})")
    ax.set(xlabel="optimizer step", ylabel="accuracy", ylim=(0, 1), title="Answers while training")
    if data.val:
        loss_ax = ax.twinx()
        loss_ax.plot([r["step"] for r in data.val], [r["loss"] for r in data.val], color="black", alpha=0.3)
        loss_ax.set_ylabel("validation loss (grey)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def plot_curves(curves: list[tuple[str, list, list]], ylabel: str, title: str) -> bytes:
    """One line per (label, steps, values): e.g. each search trial's held-out accuracy by step."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, steps, values in curves:
        ax.plot(steps, values, "o-", label=label)
    ax.set(xlabel="optimizer step", ylabel=ylabel, ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    return _png(fig)


def plot_grpo(data: dict) -> bytes:
    rows = data.grpo_rows
    steps, held = [r for r in rows if "reward" in r], [r for r in rows if r.get("split") == "heldout"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["step"] for r in steps], [r["reward"]["mean"] for r in steps], label="mean reward (train samples)")
    ax.plot([r["step"] for r in held], [r["verified_accuracy"] for r in held], "o-", label="held-out verified accuracy")
    ax.set(xlabel="GRPO step", title="Reward against held-out verified accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_accuracy(columns: list[tuple[str, dict]]) -> bytes:
    """Accuracy per category for every evaluated model (label, scores; the last is the fine-tuned one), with 95%
    intervals."""
    final = columns[-1][1]
    names = sorted(final["by_category"]) or ["all"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(columns)
    for k, (label, scores) in enumerate(columns):
        groups = [scores["by_category"].get(n, scores) if n != "all" else scores for n in names]
        values = [g["accuracy"] for g in groups]
        errors = [  # clamped: a Wilson bound can round a hair past the value at 0% or 100%
            [max(0.0, v - g["ci95"][0]) for v, g in zip(values, groups, strict=True)],
            [max(0.0, g["ci95"][1] - v) for v, g in zip(values, groups, strict=True)],
        ]
        xs = [x - 0.4 + width * (k + 0.5) for x in range(len(names))]
        ax.bar(xs, values, width=width, yerr=errors, capsize=2, label=label)
    ax.set_xticks(list(range(len(names))), names, rotation=20)
    ax.set(ylabel="accuracy (95% CI)", ylim=(0, 1), title="Accuracy per category")
    ax.legend()
    return _png(fig)


def plot_runs(names: list[str], runs: list[dict]) -> bytes:
    """Each run's final accuracy and verified accuracy with their 95% intervals."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, (key, ci, label) in enumerate(
        (("accuracy", "ci95", "accuracy"), ("verified_accuracy", "verified_ci95", "verified"))
    ):
        finals = [r.final or {} for r in runs]
        values = [f.get(key, 0.0) for f in finals]
        errors = [[v - f.get(ci, [v, v])[0] for v, f in zip(values, finals, strict=True)],
                  [f.get(ci, [v, v])[1] - v for v, f in zip(values, finals, strict=True)]]  # fmt: skip
        ax.bar([x - 0.2 + 0.4 * k for x in range(len(names))], values, width=0.4, yerr=errors, capsize=3, label=label)
    ax.set_xticks(list(range(len(names))), names, rotation=15)
    ax.set(ylabel="final model (95% CI)", ylim=(0, 1), title="Final accuracy per run")
    ax.legend()
    return _png(fig)
