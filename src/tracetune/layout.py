"""The run directory's layout, in one place: every file and directory a run writes is named here and nowhere
else. `RunLayout` (the run), `TrainingDir` (what a training stage writes), `EvalDir` (one evaluation) give the
paths; `FILES` lists every file with what it is (docs/ARCHITECTURE.md shows it); `expected_files` is what a
complete run holds. JSON is written one way everywhere (indented, UTF-8, a final newline) and JSONL read
tolerating a torn last line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracetune.config import Config

# baseline name -> directory under eval/
BASELINE_DIRS = {"zero_shot": "base", "few_shot": "few_shot", "few_shot_answer": "few_shot_answer"}
FINAL = "final"  # eval/final: the run's model (the last stage's)

CONFIG = "config.yaml"
RUN = "run.json"
ENV = "env.json"
ENV_SNAPSHOT = "env_snapshot.txt"
GPU_SNAPSHOT = "gpu_snapshot.txt"
GATES = "gates.json"
SUMMARY = "summary.md"
REPORT = "report.html"
LOSS_PLOT = "loss.png"
CARD = "README.md"  # the model card, in the run's model directory
MANIFEST = "MANIFEST.sha256"
STAGES = "stages.json"
TRAINING = "training.json"
METRICS = "metrics.jsonl"
EXAMPLE_IDS = "example_ids.jsonl"
ROUNDS = "rounds.jsonl"
CHECKPOINTS = "checkpoints"
SELECTED = "selected.safetensors"  # the weights of the best held-out step (train.select=val_accuracy)
FINAL_MODEL = "final_model"
PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
COMPARISON = "comparison.json"
BASELINE = "baseline.json"
BATCH_INVARIANCE = "batch_invariance.json"
GGUF_CHECK = "gguf_check.json"
SAMPLED = "sampled.jsonl"  # an rft round's samples, each scored
SAMPLING = "sampling.json"  # an rft round's sampling summary
KEPT = "kept.jsonl"  # an rft round's verified samples, the round's training traces
EVAL_CONFIG = "eval_config.yaml"  # `tracetune eval`'s own directory

ADAPTER_CONFIG = "adapter/adapter_config.json"  # a LoRA run's adapter, beside final_model/
KEEP_DIR = "eval/keep"  # the keep set's evaluations, relative to the run directory


def _any(*names: str) -> str:
    return "{" + ",".join(names) + "}"


@dataclass(frozen=True)
class EvalDir:
    """One evaluation: a model's predictions on a set of items, and what was computed from them."""

    path: Path

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    @property
    def scores(self) -> Path:
        return self.path / SCORES

    @property
    def baseline(self) -> Path:
        return self.path / BASELINE

    @property
    def batch_invariance(self) -> Path:
        return self.path / BATCH_INVARIANCE

    @property
    def gguf_check(self) -> Path:
        return self.path / GGUF_CHECK

    @property
    def config(self) -> Path:
        return self.path / EVAL_CONFIG

    @property
    def logs(self) -> Path:
        return self.path / "logs"


@dataclass(frozen=True)
class TrainingDir:
    """What one training stage writes: the run directory itself for sft, RUN/<stage> for rft and grpo."""

    path: Path

    @property
    def training(self) -> Path:
        return self.path / TRAINING

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def example_ids(self) -> Path:
        return self.path / EXAMPLE_IDS

    @property
    def rounds(self) -> Path:
        return self.path / ROUNDS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def final_model(self) -> Path:
        return self.path / FINAL_MODEL

    @property
    def selected(self) -> Path:
        return self.path / SELECTED

    def round(self, number: int) -> TrainingDir:
        """An rft round's own training directory."""
        return TrainingDir(self.path / f"round-{number}")

    def heldout(self, step: int | None = None) -> EvalDir:
        """Held-out points of an rl stage: heldout/ of an rft round, heldout/step-<n>/ of grpo."""
        return EvalDir(self.path / "heldout" / (f"step-{step}" if step is not None else ""))

    @property
    def sampled(self) -> Path:
        return self.path / SAMPLED

    @property
    def sampling(self) -> Path:
        return self.path / SAMPLING

    @property
    def kept(self) -> Path:
        return self.path / KEPT


@dataclass(frozen=True)
class RunLayout(TrainingDir):
    """Every path of a run directory."""

    def relative(self, path: Path) -> str:
        """A path of this run as the evidence names it (gates.json's sources): relative, with / separators."""
        return path.relative_to(self.path).as_posix()

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def run(self) -> Path:
        return self.path / RUN

    @property
    def env(self) -> Path:
        return self.path / ENV

    @property
    def env_snapshot(self) -> Path:
        return self.path / ENV_SNAPSHOT

    @property
    def gpu_snapshot(self) -> Path:
        return self.path / GPU_SNAPSHOT

    @property
    def gates(self) -> Path:
        return self.path / GATES

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def loss_plot(self) -> Path:
        return self.path / LOSS_PLOT

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def stages(self) -> Path:
        return self.path / STAGES

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @property
    def eval_root(self) -> Path:
        return self.path / "eval"

    def eval(self, name: str = FINAL) -> EvalDir:
        """eval/<name>: `final` (the run's model), a stage's name, or a baseline's directory."""
        return EvalDir(self.eval_root / name)

    def baseline(self, baseline: str, draw: int = 0) -> EvalDir:
        return EvalDir(draw_dir(self.eval_root / BASELINE_DIRS[baseline], draw))

    @property
    def comparison(self) -> Path:
        return self.eval_root / COMPARISON

    @property
    def keep_root(self) -> Path:
        return self.path / KEEP_DIR

    def keep(self, name: str) -> EvalDir:
        return EvalDir(self.keep_root / name)

    @property
    def keep_comparison(self) -> Path:
        return self.keep_root / COMPARISON

    def evaluations(self) -> list[EvalDir]:
        """Every evaluation that holds predictions: eval/ (baselines and their draws, stages, final, the keep set),
        then the held-out points while training (sft's, the rl stages')."""
        found = []
        for group in (
            (f"eval/*/{PREDICTIONS}", f"eval/*/draw-*/{PREDICTIONS}", f"{KEEP_DIR}/*/{PREDICTIONS}"),
            (f"heldout/*/{PREDICTIONS}", f"heldout/*/keep/{PREDICTIONS}", f"grpo/heldout/*/{PREDICTIONS}",
             f"rft/round-*/heldout/{PREDICTIONS}"),
        ):  # fmt: skip
            found += [EvalDir(p.parent) for p in sorted(p for pattern in group for p in self.path.glob(pattern))]
        return found

    def stage(self, stage: str) -> TrainingDir:
        """Where a training stage writes: sft into the run directory, the others into RUN/<stage>."""
        return self if stage == "sft" else TrainingDir(self.path / stage)

    def model(self, stages: list[str]) -> Path:
        """The run's model: the last stage's final_model."""
        return self.path / final_model_path(stages)

    @property
    def run_model(self) -> Path:
        """The run's model, by the stages its config.yaml names."""
        import yaml

        written = yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}
        return self.model(written.get("stages", ["sft"]))

    @property
    def card(self) -> Path:
        """The model card, in the run's model directory."""
        return self.run_model / CARD

    def tracker(self, name: str) -> Path:
        """Where a tracker writes inside the run: tensorboard/, mlruns/ (MLflow's file store), wandb/."""
        return self.path / name

    @property
    def export(self) -> Path:
        return self.path / "export"

    def export_eval(self, kind: str, reference: bool = False) -> EvalDir:
        """export/eval-<type>/ (the file's answers), export/eval-<type>-reference/ (the rounded model's)."""
        return EvalDir(self.export / f"eval-{kind}{'-reference' if reference else ''}")

    @property
    def gguf_check(self) -> Path:
        return self.export / GGUF_CHECK

    def gguf(self, kind: str) -> Path:
        return self.export / f"model-{kind}.gguf"

    @property
    def modelfile(self) -> Path:
        return self.export / "Modelfile"


def expected_files(cfg: Config) -> list[str]:
    """Files every complete run directory of this config holds when the gates are computed (relative paths)."""
    run = RunLayout(Path())
    files = [CONFIG, RUN, ENV, ENV_SNAPSHOT, GPU_SNAPSHOT]
    if "sft" in cfg.stages:
        files += [run.log("train"), METRICS, TRAINING]
    final = final_model_path(cfg.stages)
    files += [f"{final}/config.json", f"{final}/tokenizer_config.json", f"{final}/generation_config.json"]
    if cfg.train.method == "lora":
        files += [ADAPTER_CONFIG]
    if cfg.stages != ["sft"]:
        files += [STAGES]
    if cfg.export.gguf:
        files += [run.gguf(cfg.export.gguf), run.modelfile, run.gguf_check]
    for stage in cfg.stages[1:] if cfg.stages[0] == "sft" else cfg.stages:
        files += [run.log(stage), run.stage(stage).training]
        files += [run.stage(stage).rounds] if stage == "rft" else [run.stage(stage).metrics]
        if cfg.eval.eval_file is not None and stage != cfg.stages[-1]:
            files += [run.eval(stage).predictions, run.eval(stage).scores]
    if cfg.eval.eval_file is not None:
        files += [run.log("eval"), run.eval().predictions, run.eval().scores]
        if cfg.eval.run_base:
            files += [p for b in cfg.eval.baselines for p in (run.baseline(b).predictions, run.baseline(b).scores)]
            files += [run.comparison]
            if cfg.eval.keep_file is not None:
                dirs = [*KEEP_DIRS.values(), *(d for s in cfg.stages[:-1] for d in keep_model_dirs(s).values())]
                files += [run.keep(d).predictions for d in dirs] + [run.keep_comparison]
    return [Path(f).as_posix() for f in files]


# Every file a run directory may hold, as a pattern relative to it (`*`: one name, `**`: anything below), and
# what it is. docs/ARCHITECTURE.md shows this table; a test checks every file of a finished run matches a row.
_RL = _any("rft", "grpo")  # the rl stages' directories
_EVAL = _any(PREDICTIONS, SCORES, BATCH_INVARIANCE, BASELINE, GGUF_CHECK)
FILES: list[tuple[str, str]] = [
    (CONFIG, "the resolved config; `tracetune resume` reads it"),
    (RUN, "run id, argv, status, start and end times, seed, git state, data sha256, ranks"),
    (ENV, "versions, CPU and GPU, the kernel probes (cpu_kernels), the evaluation numerics"),
    (ENV_SNAPSHOT, "the environment as text, with every installed package"),
    (GPU_SNAPSHOT, "nvidia-smi at the start and the end (or that there is no GPU)"),
    ("logs/*.log", "UTF-8 logs: train, eval, export, one per rl stage"),
    (METRICS, "one line per logged step and validation point (grpo: held-out points too)"),
    (EXAMPLE_IDS, "the ids each step consumed (train.record_example_ids)"),
    (TRAINING, "what was planned and done, on what, how (one per training stage)"),
    (f"{CHECKPOINTS}/step-*/**", "committed checkpoints (train/checkpoint.py's layout)"),
    (SELECTED, "the best held-out step's weights so far (train.select=val_accuracy), kept for a resume"),
    (f"{FINAL_MODEL}/**", "the stage's model, Hugging Face format; the run's model carries the card, README.md"),
    ("adapter/**", "a LoRA run's adapter, before the merge"),
    (f"eval/*/{_EVAL}", "an evaluation: base-model baselines (base, few_shot, few_shot_answer), stages, final"),
    (f"eval/*/draw-*/{_EVAL}", "a few-shot baseline's further draws of demonstrations"),
    (f"eval/{COMPARISON}", "the strongest baseline against the run's model, paired"),
    (f"{KEEP_DIR}/*/{_EVAL}", "the keep set: base, final, final_format, <stage>, <stage>_format"),
    (f"{KEEP_DIR}/{COMPARISON}", "what the run's model (and each stage's) kept of what the base knew"),
    (STAGES, "where each stage's model and evaluation are (runs of several stages)"),
    (f"{_RL}/{_any(TRAINING, METRICS, ROUNDS)}", "an rl stage's records (rft: rounds.jsonl)"),
    (f"{_RL}/{CHECKPOINTS}/step-*/**", "an rl stage's checkpoints"),
    (f"{_RL}/{FINAL_MODEL}/**", "an rl stage's model"),
    ("grpo/adapter/**", "a LoRA GRPO stage's adapter (grpo.method=lora), before the merge"),
    (f"{_RL}/heldout/**", "an rl stage's held-out points (grpo: step-<n>/, rft: per round)"),
    (f"heldout/step-*/{_EVAL}", "held-out accuracy while training (train.val_accuracy): the validation split"),
    (f"heldout/step-*/keep/{_EVAL}", "the keep set's monitor half while training (train.val_accuracy, a keep set)"),
    ("rft/round-*/**", "an rft round: sampled.jsonl, sampling.json, kept.jsonl, its training and model"),
    ("export/**", "GGUF export: model-<type>.gguf, Modelfile, gguf_check.json, eval-<type>[-reference]/"),
    ("{tensorboard,mlruns,wandb}/**", "output.report_to's trackers, where they write into the run"),
    (GATES, "every quality gate: status, value, threshold, the file it read"),
    (SUMMARY, "the summary: verdict, tables"),
    (REPORT, "the same as a page, with plots"),
    (LOSS_PLOT, "training and validation loss"),
    (MANIFEST, "sha256 of every file, written last; `tracetune verify` checks it"),
]


def describe(relative: str) -> str | None:
    """What a file of a run directory is (FILES), or None where the layout does not name it."""
    import re

    for pattern, what in FILES:
        regex = (
            re.escape(pattern)
            .replace(r"\*\*", ".+")
            .replace(r"\*", "[^/]+")
            .replace(r"\{", "(")
            .replace(r"\}", ")")
            .replace(",", "|")
        )
        if re.fullmatch(regex, relative):
            return what
    return None


def keep_model_dirs(name: str) -> dict[str, str]:
    """A trained model's keep-set evaluations -> directory under KEEP_DIR: prompted answer-only few-shot as the
    base is, and in its trained format. `name` is the model's directory under eval/ (stage_eval_dir)."""
    return {"answer_only": name, "trained_format": f"{name}_format"}


# keep-set evaluation -> directory under KEEP_DIR: the base model, and the run's model (the last stage's)
KEEP_DIRS = {"base": "base", **keep_model_dirs(FINAL)}


def draw_dirs(baseline_dir: Path) -> list[Path]:
    """A few-shot baseline's evaluations, one per draw of demonstrations: the first draw's own directory, then
    its draw-<n>/ directories in order (those that hold predictions)."""
    extra = sorted(baseline_dir.glob(f"draw-*/{PREDICTIONS}"), key=lambda p: int(p.parent.name.split("-")[1]))
    return [baseline_dir, *(p.parent for p in extra)]


def draw_dir(baseline_dir: Path, draw: int) -> Path:
    """Where draw `draw` (0-based) of a few-shot baseline is evaluated."""
    return baseline_dir if draw == 0 else baseline_dir / f"draw-{draw + 1}"


def final_model_path(stages: list[str]) -> str:
    """The run's model, relative to the run directory: the last stage's final_model (SFT's is the run's own)."""
    return FINAL_MODEL if stages[-1] == "sft" else f"{stages[-1]}/{FINAL_MODEL}"


def run_dir_of_model(model: str | Path) -> Path | None:
    """The run directory a model directory belongs to (RUN/final_model, RUN/<stage>/final_model), or None."""
    path = Path(model)
    for parent in (path.parent, path.parent.parent):
        if path.is_dir() and (parent / CONFIG).is_file() and (parent / RUN).is_file():
            return parent
    return None


def stage_eval_dir(stages: list[str], stage: str) -> str:
    """The directory under eval/ that scores a stage's model: the last stage's is the run's final model."""
    return FINAL if stage == stages[-1] else stage


def write_json(path: Path, record) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path):
    """A JSON file's content, or None where it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict]:
    """Every complete line of a JSONL file; a torn last line (a crash mid-write) is ignored; no file, no rows."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


read_predictions = read_jsonl


def append_jsonl(path: Path, record: dict) -> None:
    """One line, appended and closed: a crash leaves at most one torn last line, which readers skip."""
    with open(path, "a", encoding="utf-8", newline="\n") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def trim_torn_line(path: Path) -> None:
    """Drop a torn last line (no newline: a crash mid-write) before appending more."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def trim_jsonl(path: Path, last_step: int) -> None:
    """Keep the complete lines whose step is at most `last_step` (drops a torn line and anything later)."""
    if path.is_file():
        kept = [json.dumps(row, ensure_ascii=False) + "\n" for row in read_jsonl(path) if row["step"] <= last_step]
        path.write_text("".join(kept), encoding="utf-8", newline="\n")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of metrics.jsonl; skipped-step events carry no loss and are left out."""
    rows = read_jsonl(run_dir / METRICS)
    train = [r for r in rows if r.get("split") != "val" and "loss" in r]
    return train, [r for r in rows if r.get("split") == "val"]
