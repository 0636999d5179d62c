"""Typed configuration: YAML + dotted overrides -> validated pydantic models, every problem reported at once.

Each section is a pydantic model with `extra="forbid"`, so an unknown key is an error; we add a "did you
mean" hint and the YAML line. Paths are resolved against the working directory and stored absolute, so a
resolved config dumped into a run directory reloads to an equal object.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tracetune.errors import ConfigError


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"file not found: {path}; fix: point it at an existing file (relative paths start at the cwd)")
    return path.resolve()


ExistingFile = Annotated[Path, AfterValidator(_existing_file)]


def _data_source(value: str | Path) -> str | Path:
    """A Hub dataset name (hf:NAME[:CONFIG]:SPLIT, checked when read) as given; else an existing file."""
    text = str(value)
    if text.startswith("hf:"):
        parts = text[3:].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(
                "a Hub dataset is hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT; fix: e.g. hf:openai/gsm8k:main:train"
            )
        return text
    return _existing_file(Path(text).expanduser())


# A local JSONL, Parquet or CSV file, or a Hugging Face dataset by name (data/sources.py).
DataSource = Annotated[str | Path, AfterValidator(_data_source)]

_SOURCE_PATTERN = re.compile(r"^(packaged|tiny):[\w.-]+$|^[\w.-]+/[\w.-]+$")


def _model_source(value: str) -> str:
    if _SOURCE_PATTERN.match(value) or Path(value).expanduser().is_dir():
        return value
    raise ValueError(
        f"unknown model source {value!r}; fix: use packaged:gemma3-270m, packaged:smollm2-135m, tiny:<arch>, "
        "a local Hugging Face model directory, or a hub id like google/gemma-2b"
    )


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelConfig(Section):
    source: Annotated[str, AfterValidator(_model_source)] = Field(
        "packaged:gemma3-270m",
        description="Where weights come from: packaged:gemma3-270m | packaged:smollm2-135m | tiny:<gemma3|gemma2|llama> "
        "| a local Hugging Face directory | a hub id (downloaded where the network allows, else read from cache).",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="Attention kernel passed to transformers: sdpa where the architecture has it (Gemma 2, whose "
        "attention scores are soft-capped, runs eager), or eager.",
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear layers that get adapters.",
    )


# data.format: auto, or a record format a training file may be in (data/traces.py adapts each and adds `eval`,
# the eval set's own format; the CLI's --format lists them).
TraceFormat = Literal["auto", "native", "gsm8k", "chat", "alpaca"]


class DataConfig(Section):
    train_file: DataSource | None = Field(
        Path("data/train.jsonl"),
        description=(
            "Training traces: a JSONL, Parquet or CSV file, or a Hub dataset hf:NAME[:CONFIG]:SPLIT "
            "(e.g. hf:openai/gsm8k:main:train); needed by train and run, not by eval."
        ),
    )
    format: TraceFormat = Field(
        "auto", description="Record format of train_file; auto detects it from the first record."
    )
    val_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="Share of records held out for validation loss, chosen by a seeded id hash."
    )
    max_train_records: int | None = Field(None, ge=1, description="Use only the first N training records.")
    max_seq_length: int = Field(256, ge=8, le=131072, description="Longest tokenized example (prompt + completion).")
    overlength_policy: Literal["error", "drop", "truncate"] = Field(
        "drop", description="What to do with examples longer than max_seq_length."
    )
    instruction: str = Field(
        "Think step by step, then give the final answer on the last line as 'Answer: <answer>'.",
        description="Appended to every user prompt in training and evaluation alike; empty disables it.",
    )


class TrainConfig(Section):
    method: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA adapters (peft).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (used when method is lora).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available.")
    precision: Literal["auto", "fp32", "bf16-autocast", "bf16-weights"] = Field(
        "fp32",
        description="fp32; bf16 autocast over fp32 weights; or bf16 weights with fp32 master weights in the optimizer. "
        "auto: bf16-autocast where bf16 is native (CUDA, CPUs with AVX-512 BF16 or AMX), else fp32; chosen when the "
        "config loads, so the run's config.yaml records the choice.",
    )
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description=(
            "Under torchrun: ddp replicates the model on every rank; fsdp shards it (FSDP2, one unit per decoder "
            "layer, sharded checkpoints); auto picks fsdp on CUDA when a full replica's training state would not "
            "fit in 60% of a GPU, else ddp."
        ),
    )
    optimizer: Literal["adamw", "adafactor"] = Field("adamw", description="Optimizer.")
    lr: float = Field(2e-5, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay; norms and biases are skipped.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    num_epochs: int = Field(1, ge=1, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    log_every_steps: int = Field(1, ge=1, description="Write a metrics.jsonl line every N optimizer steps.")
    eval_every_steps: int | None = Field(None, ge=1, description="Validation loss every N steps (and at the end).")
    save_every_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps (and at the end).")
    val_accuracy: bool = Field(
        False,
        description=(
            "Held-out accuracy while training: at every eval_every_steps (and the end), besides validation loss, "
            "greedy answers to the validation split's prompts are generated and scored by the evaluation's code "
            "(metrics.jsonl 'split': 'val_accuracy', RUN/heldout/step-N/)."
        ),
    )
    select: Literal["last", "val_accuracy"] = Field(
        "last",
        description=(
            "The final model: the last step's weights, or (val_accuracy, with train.val_accuracy) those of the step "
            "with the best held-out accuracy (ties: the earlier); training.json and the summary say which and why."
        ),
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description=(
            "Stop when this many held-out accuracy points in a row (train.val_accuracy) have not beaten the best "
            "(ties: validation loss); training.json records stopped_early and the step."
        ),
    )
    val_accuracy_items: int = Field(
        50,
        ge=1,
        description=(
            "Held-out accuracy while training (the rl stages' points) scores at most this many traces of the "
            "validation split of the training data, never the eval set."
        ),
    )
    keep_last_checkpoints: int = Field(2, ge=1, description="Committed checkpoints to keep.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (fuses its elementwise work; the first steps pay the compile).",
    )
    nonfinite_policy: Literal["stop", "skip"] = Field(
        "stop", description="On a NaN/inf loss or gradient: stop (after checkpointing the last good state) or skip."
    )
    max_skipped_steps: int = Field(10, ge=0, description="With nonfinite_policy=skip, stop after this many skips.")
    record_example_ids: bool = Field(
        False, description="Write example_ids.jsonl: the ids of the examples each optimizer step consumed."
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; null keeps torch's default.")


class EvalConfig(Section):
    eval_file: DataSource | None = Field(
        Path("data/eval.jsonl"),
        description="Held-out eval items: a file or hf:NAME[:CONFIG]:SPLIT, as data.train_file; null skips evaluation.",
    )
    max_items: int | None = Field(None, ge=1, description="Evaluate only the first N items.")
    keep_file: DataSource | None = Field(
        None,
        description=(
            "A keep set: general questions the base model partly answers (eval items; the first eval.num_shots "
            "are its question/answer demonstrations, never scored), to see what fine-tuning kept. Evaluated on "
            "the base model and the run's model answer-only few-shot (eval/keep/base, eval/keep/final; the "
            "kept_what_base_knew gate) and on the run's model in its trained format (eval/keep/final_format). "
            "The shipped configs use data/keep.jsonl; null skips it."
        ),
    )
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")
    max_new_tokens: int = Field(256, ge=1, description="Longest completion before finish_reason is 'length'.")
    do_sample: bool = Field(
        False, description="Sample instead of greedy decoding (seeded per item and sample, not per batch)."
    )
    num_samples: int = Field(
        1, ge=1, description="Completions per item when sampling: mean@k, pass@k and maj@k go into scores.json."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (do_sample only).")
    stop_strings: list[str] = Field([], description="Extra strings that end a completion (finish_reason 'stop').")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32",
        description="Generation precision: bf16 casts the weights (about 2.5x faster on CPUs with bf16 instructions, "
        "3-5x slower than fp32 on an AVX2-only CPU, which emulates it). auto: bf16 where bf16 is native, else fp32; "
        "chosen when the config loads.",
    )
    run_base: bool = Field(
        True, description="In `tracetune run`, also evaluate the base model (eval.baselines) for comparison."
    )
    baselines: list[Literal["zero_shot", "few_shot", "few_shot_answer"]] = Field(
        ["zero_shot", "few_shot", "few_shot_answer"],
        min_length=1,
        description=(
            "How the base model is evaluated: zero_shot (the run's own chat format, eval/base/), few_shot "
            "(eval.num_shots training traces as worked examples: question, reasoning, answer; eval/few_shot/) and "
            "few_shot_answer (the same traces as question/answer pairs, no reasoning; eval/few_shot_answer/); "
            "accuracy gates compare the fine-tuned model with the strongest, verified accuracy with the strongest "
            "that shows its work."
        ),
    )
    num_shots: int = Field(5, ge=1, description="Demonstrations in the few-shot baseline (seeded, never eval items).")
    baseline_draws: int = Field(
        1,
        ge=1,
        description=(
            "Seeded draws of demonstrations per few-shot baseline (the first in eval/<baseline>/, the others in "
            "eval/<baseline>/draw-<n>/); the best draw is the baseline compared with, and the report shows the "
            "spread. A few-shot score moves with the draw: use 3 or more for decisions."
        ),
    )
    few_shot_format: Literal["auto", "plain", "chat"] = Field(
        "auto",
        description=(
            "plain: Question/Reasoning/Answer text blocks, for pretrained models; chat: earlier turns, for chat "
            "models; auto: chat where the base model is chat-trained."
        ),
    )

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> EvalConfig:
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("eval.num_samples > 1 needs sampling; fix: set eval.do_sample=true")
        return self


class GatesConfig(Section):
    min_loss_drop: float = Field(
        0.0, ge=0, description="Mean loss of the last 10% of steps must be below the first 10% by more than this."
    )
    min_accuracy_gain: float = Field(
        0.0,
        description=(
            "The margin the paired difference, fine-tuned accuracy (and verified accuracy) minus the strongest "
            "baseline's, is read against: its 95% interval wholly above it is better, wholly below it worse "
            "(the gate fails), holding it no detectable difference."
        ),
    )
    require_gain: bool = Field(
        False,
        description=(
            "Fail the comparison gates on 'no detectable difference' too, not only on worse (for configs meant "
            "for decisions)."
        ),
    )
    probe_atol: float = Field(
        0.0, ge=0, description="Max abs logit difference when a checkpoint is reloaded on the device it was saved on."
    )
    max_keep_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description=(
            "kept_what_base_knew fails when the keep set's paired accuracy drop (base to the run's model, both "
            "prompted answer-only few-shot) has its 95% interval's upper end below -max_keep_drop."
        ),
    )
    max_truncation_rate: float = Field(
        0.2,
        ge=0,
        le=1,
        description="After an rft or grpo stage, the share of held-out completions cut off by max_new_tokens must be at most this.",
    )
    probe_cross_device_atol: float = Field(
        0.1,
        ge=0,
        description=(
            "Max abs logit difference when a reload cannot be exact: a GPU run's checkpoint reloaded on CPU, or an "
            "FSDP checkpoint (bf16 compute over sharded weights) reloaded into a plain model."
        ),
    )


class RewardWeights(Section):
    verified: float = Field(
        1.0,
        ge=0,
        description="Weight of a verified completion: the answer right, at least one step checked, every one holding.",
    )
    correct: float = Field(
        0.0, ge=0, description="Weight of the answer being right alone (shaped; off: see rl/rewards.py)."
    )
    steps_valid: float = Field(
        0.0,
        ge=0,
        description="Weight of every checked step holding, whatever the answer (shaped; off: it pays for stopping early).",
    )
    format: float = Field(
        0.0, ge=0, description="Weight of the form: an 'Answer:' line present and the completion not truncated."
    )


class SamplingConfig(Section):
    temperature: float = Field(0.8, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    max_new_tokens: int = Field(128, ge=1, description="Longest sampled completion; longer ones count as truncated.")
    batch_size: int = Field(32, ge=1, description="Rows generated together (a prompt's k samples are k rows).")


class RFTConfig(Section):
    num_rounds: int = Field(2, ge=1, description="Rounds of sample -> keep the verified -> fine-tune.")
    num_samples: int = Field(4, ge=1, description="Completions sampled per training prompt per round (k).")
    prompts_per_round: int | None = Field(
        None, ge=1, description="Training prompts sampled each round (seeded, a new draw each round); null: all."
    )
    max_kept_per_prompt: int = Field(2, ge=1, description="Distinct verified completions kept per prompt.")
    focus_unsolved: bool = Field(
        True,
        description=(
            "From round 2 on, prompts that earlier rounds already kept max_kept_per_prompt verified samples of are "
            "left out of the draw, so sampling goes to the prompts the model still fails (rounds.jsonl: num_solved)."
        ),
    )
    include_original: bool = Field(
        True, description="Fine-tune on the original traces of the round's prompts beside the kept samples."
    )
    rationalize: bool = Field(
        False,
        description=(
            "Prompts with no verified sample get one more greedy try with the expected answer as a hint; a verified "
            "result is kept (trained on without the hint) and marked rationalized in the kept file."
        ),
    )
    num_epochs: int = Field(1, ge=1, description="Passes over each round's kept traces.")
    lr: float | None = Field(None, gt=0, le=1, description="Learning rate of the rounds; null: train.lr.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="How the rounds sample.")


class GRPOConfig(Section):
    num_steps: int = Field(20, ge=1, description="Optimizer steps (each on freshly sampled groups).")
    prompts_per_step: int = Field(4, ge=1, description="Training prompts per step (a seeded pass over the split).")
    group_size: int = Field(4, ge=2, description="Samples per prompt (G); advantages are relative within a group.")
    lr: float = Field(1e-6, gt=0, le=1, description="Learning rate (constant after train.warmup_steps).")
    num_iterations: int = Field(
        1, ge=1, description="Updates per sampled batch (mu); above 1 the ratio to the sampling policy is clipped."
    )
    epsilon_low: float = Field(0.2, ge=0, lt=1, description="Clip the ratio below at 1 - epsilon_low.")
    epsilon_high: float = Field(
        0.28, ge=0, description="Clip the ratio above at 1 + epsilon_high (DAPO's clip-higher)."
    )
    kl_coef: float = Field(0.0, ge=0, description="Weight of the k3 KL estimate to the starting model; 0 loads none.")
    scale_rewards: bool = Field(
        False, description="Divide advantages by the group's reward std (GRPO); false keeps the mean only (Dr. GRPO)."
    )
    loss_normalization: Literal["token", "sequence", "constant"] = Field(
        "token",
        description=(
            "token: every completion token of the step weighs the same (DAPO); sequence: each completion's mean, "
            "then their mean (GRPO); constant: divide by completions x max_new_tokens (Dr. GRPO)."
        ),
    )
    drop_zero_variance_groups: bool = Field(
        True, description="Leave groups whose rewards are all equal out of the step (they carry no signal)."
    )
    fill_informative: bool = Field(
        False,
        description=(
            "Dynamic sampling (DAPO): keep drawing seeded extra prompts until the step holds prompts_per_step groups "
            "whose rewards differ, at most max_fill_draws draws in all (logged: num_draws, informative_fraction)."
        ),
    )
    max_fill_draws: int = Field(4, ge=1, description="Draws of prompts_per_step prompts a step may take to fill.")
    truncated: Literal["mask", "penalize", "train"] = Field(
        "mask",
        description=(
            "Completions cut off at sampling.max_new_tokens: mask (left out of the loss, their rewards still count "
            "in their group, as DAPO's overlong filtering), penalize (reward 0, trained on), train (as any other)."
        ),
    )
    method: Literal["full", "lora"] = Field(
        "full",
        description=(
            "Train the policy's full weights, or LoRA adapters (train.lora's settings) merged into the stage's "
            "final_model: a smaller, more conservative update for a small model."
        ),
    )
    freeze_embeddings: bool = Field(
        False, description="Keep the (tied) embedding matrix fixed during GRPO: its 170M of Gemma 3 270M's weights."
    )
    sft_coef: float = Field(
        0.0,
        ge=0,
        description=(
            "SFT anchor: the step's prompts' gold traces' cross-entropy (mean per token) added to the policy loss "
            "(mean per token) with this weight; 0 adds none."
        ),
    )
    reward: RewardWeights = Field(default_factory=RewardWeights, description="Reward terms and their weights.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="How the groups are sampled.")
    eval_every_steps: int | None = Field(
        10, ge=1, description="Held-out accuracy (the evaluation's own code) every N steps and at the end."
    )
    save_every_steps: int | None = Field(10, ge=1, description="Checkpoint every N steps (and at the end).")


class ExportConfig(Section):
    gguf: Literal["f16", "bf16", "q8_0"] | None = Field(
        None,
        description=(
            "At the end of `tracetune run`, also write export/model-<type>.gguf and an Ollama Modelfile, then "
            "evaluate the file and gate on its answers matching the trained model's (export/gguf_check.json)."
        ),
    )


class OutputConfig(Section):
    root: Path = Field(Path("runs"), description="Directory that holds run directories.")
    run_name: str | None = Field(
        None, pattern=r"^[\w.-]+$", description="Run directory name; null uses a UTC timestamp."
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        [],
        description=(
            "Experiment trackers that mirror every metrics line, the config and the final scores (tracking.py): "
            "tensorboard (RUN/tensorboard), mlflow (MLFLOW_TRACKING_URI, else RUN/mlruns), wandb, trackio. "
            "pip install 'tracetune[trackers]'; one that fails warns and the run goes on."
        ),
    )

    @model_validator(mode="after")
    def _absolute(self) -> OutputConfig:
        self.root = self.root.expanduser().resolve()
        return self


class TuneConfig(Section):
    methods: list[Literal["full", "lora"]] = Field(
        ["lora", "full"], min_length=1, description="train.method values `tracetune tune` tries."
    )
    lr_full: tuple[float, float] = Field(
        (1e-5, 1e-4), description="Range of train.lr (log-uniform) for full fine-tuning: [low, high]."
    )
    lr_lora: tuple[float, float] = Field((5e-5, 5e-4), description="Range of train.lr (log-uniform) for LoRA.")
    lora_ranks: list[int] = Field([8, 16, 32], min_length=1, description="train.lora.r values tried (alpha = 2 r).")
    num_epochs: tuple[int, int] = Field((1, 3), description="Range of train.num_epochs: [low, high].")
    prune_after_trials: int = Field(
        2,
        ge=0,
        description=(
            "Trials that finish before any is pruned; after them, a trial whose held-out accuracy at a point is "
            "below the median of earlier trials' at the same step stops there (Optuna's MedianPruner)."
        ),
    )

    @model_validator(mode="after")
    def _ranges(self) -> TuneConfig:
        for name in ("lr_full", "lr_lora", "num_epochs"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(
                    f"tune.{name}: [{low}, {high}] is not a range; fix: write [low, high], 0 < low <= high"
                )
        return self


class Config(Section):
    seed: int = Field(0, ge=0, description="Seeds init, data order, dropout, sampling and the train/val split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model source.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Generation and scoring.")
    gates: GatesConfig = Field(default_factory=GatesConfig, description="Quality-gate thresholds.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where runs are written.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="GGUF export of the final model.")
    stages: list[Literal["sft", "rft", "grpo"]] = Field(
        ["sft"],
        min_length=1,
        description=(
            "Training stages in order, each starting from the one before: sft (supervised, the train section), rft "
            "(rejection-sampling fine-tuning) and grpo. Without sft the first stage starts from model.source, e.g. "
            "the final_model of an earlier run."
        ),
    )
    rft: RFTConfig = Field(default_factory=RFTConfig, description="Rejection-sampling fine-tuning (stage rft).")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="Group relative policy optimisation (stage grpo).")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="What `tracetune tune` searches.")

    @model_validator(mode="after")
    def _resolve_auto_precision(self) -> Config:
        """`auto` precisions become what this machine computes natively, before anything else reads them."""
        if "auto" in (self.train.precision, self.eval.precision):
            from tracetune.dist import native_bf16

            native = native_bf16(self.train.device)
            if self.train.precision == "auto":
                self.train.precision = "bf16-autocast" if native else "fp32"
            if self.eval.precision == "auto":
                self.eval.precision = "bf16" if native else "fp32"
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.train.val_accuracy and self.train.distributed == "fsdp":
            raise ValueError(
                "train.val_accuracy generates with the model being trained, which FSDP shards across ranks; "
                "fix: train.distributed=ddp, or train.val_accuracy=false"
            )
        if self.train.early_stopping_patience and not self.train.val_accuracy:
            raise ValueError(
                "train.early_stopping_patience counts held-out accuracy points; fix: train.val_accuracy=true"
            )
        if self.train.select == "val_accuracy" and not self.train.val_accuracy:
            raise ValueError("train.select=val_accuracy chooses by held-out accuracy; fix: train.val_accuracy=true")
        if self.train.val_accuracy and self.data.val_fraction == 0:
            raise ValueError("train.val_accuracy needs data.val_fraction > 0; fix: set data.val_fraction=0.05")
        if self.train.eval_every_steps and self.data.val_fraction == 0:
            raise ValueError("train.eval_every_steps needs data.val_fraction > 0; fix: set data.val_fraction=0.05")
        if self.train.distributed == "fsdp" and self.train.method == "lora":
            raise ValueError(
                "train.distributed=fsdp shards full fine-tuning only; fix: use train.distributed=ddp with lora"
            )
        if len(set(self.stages)) != len(self.stages) or "sft" in self.stages[1:]:
            raise ValueError(
                f"stages {self.stages}: each stage at most once, sft only first; fix: e.g. stages=[sft, grpo]"
            )
        rl = [s for s in self.stages if s != "sft"]
        if rl and self.train.distributed == "fsdp":
            raise ValueError("stages rft and grpo run replicated (ddp); fix: train.distributed=ddp")
        return self


# ---------------------------------------------------------------- loading


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as a YAML scalar) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError("command line", [f"override {item!r} is not key=value; fix: write e.g. train.lr=1e-4"])
        key, _, text = item.partition("=")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("command line", [f"override {key}: {part} is not a section"])
        node[leaf] = yaml.safe_load(text) if text.strip() else None
    return raw


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = (*path, key_node.value)
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    walk(root, ())
    return lines


def _field_names(model: type[BaseModel], path: tuple) -> list[str]:
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: dict, source: str, lines: dict[tuple, int]) -> str:
    path = tuple(str(p) for p in error["loc"])
    dotted = ".".join(path) or "<root>"
    where = f"{source}:{lines[path]}: " if path in lines else f"{source}: "
    if error["type"] == "extra_forbidden":
        known = _field_names(Config, path[:-1])
        guess = difflib.get_close_matches(path[-1], known, n=1)
        hint = f"did you mean '{guess[0]}'?" if guess else f"known keys: {', '.join(known)}"
        return f"{where}{dotted}: unknown key; {hint}"
    message = error["msg"].removeprefix("Value error, ")
    got = f" (got {error['input']!r})" if error["type"] not in ("missing",) and "input" in error else ""
    return f"{where}{dotted}: {message}{got}"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply dotted overrides, validate; raise ConfigError listing every problem."""
    source = str(path) if path else "<defaults>"
    text = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(source, [f"config file not found: {p}; fix: pass an existing YAML file"])
        text = p.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"invalid YAML: {exc}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the top level must be a mapping of sections (model, data, train, ...)"])
    apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = _yaml_lines(text)
        raise ConfigError(source, [_describe(e, source, lines) for e in exc.errors()]) from None


def dump_config(config: Config) -> str:
    """The resolved config (every default filled) as YAML that `load_config` reads back to an equal object."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: dotted keys, as overrides and diffs name them."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def explain(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted name, type, default and description."""
    lines = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{dotted}: {field.description}")
            lines.extend(explain(annotation, dotted + "."))
            continue
        default = field.default_factory() if field.default_factory else field.default
        type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        lines.append(f"  {dotted} ({type_name}, default {default!r}): {field.description}")
    return lines
