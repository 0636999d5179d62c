"""tracetune versus TRL SFTTrainer versus the old pipeline, side by side in one invocation (`make bench`).

Training: the same model, examples, learning rate, optimizer (AdamW), precision (bf16 autocast) and number
of optimizer steps, 4 examples per optimizer step for each system:
  tracetune  `fit`: length-bucketed dynamic padding, completion-only loss, LM head only at loss positions
  trl        SFTTrainer on prompt-completion conversations: completion-only loss, batch 4, its default padding
  old        transformers Trainer, every example padded (and truncated) to 128 tokens, batch 1 x accumulation 4,
             loss on every token, as the system we replace did
Each (system, repeat) is its own process, run interleaved A B C A B C ..., so peak RSS is per system and drift
hits all alike. The first --warmup steps are excluded from speeds. After training, every system's model is
scored with the same validation loss (completion tokens of the same held-out examples).

Generation: tracetune's batched generation versus the old way (transformers' generate one prompt at a time,
max_new_tokens 50, no stop strings), same model and dtype, interleaved --generation-repeats times: items/s, new
tokens/s and the share of identical extracted answers; then tracetune's settings one prompt at a time, which
must give the batched completions exactly (src/tracetune/eval/generate.py: batch-invariant greedy decoding).
Give it a fine-tuned model (--eval-model runs/<id>/final_model, after `make run`): a pretrained model never
emits end-of-turn, so tracetune generates its full 96 tokens per item where the old loop stops at 50.

Allocator: tracetune's workers run as `tracetune run` does, under tcmalloc when it is installed
(src/tracetune/allocator.py); TRL and the old pipeline on the system allocator, as their users run them.
--others-on-tcmalloc puts them on tcmalloc too, --system-allocator puts everyone on the system's; each
worker records the allocator it ran on.

Writes bench/results/bench.json and bench/results/bench.md.
    python bench/run.py --steps 6 --repeats 3 --eval-model runs/<id>/final_model   # about 25 minutes on 2 cores
    python bench/run.py --steps 3 --repeats 1 --eval-items 6 --source tiny:gemma3   # smoke test
    python bench/run.py --compile --steps 8 --warmup 3 --no-generation --out bench_compile   # compiled layers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

from harness import interleave, run_worker, spawn

from tracetune import allocator

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SYSTEMS = ("tracetune", "trl", "old")
LR = 5e-5


def _config(source: str, steps: int, root: Path, name: str, precision: str = "bf16-autocast", compile: bool = False):
    from tracetune.config import load_config

    return load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            f"model.source={source}",
            f"train.max_steps={steps}",
            "train.log_every_steps=1",
            "train.eval_every_steps=null",
            "train.save_every_steps=null",
            "train.warmup_steps=0",
            f"train.lr={LR}",
            "train.batch_size=4",
            "train.grad_accum_steps=1",
            f"train.precision={precision}",
            f"train.compile={str(compile).lower()}",
            "data.max_train_records=200",
            "data.val_fraction=0.1",
            f"output.root={root}",
            f"output.run_name={name}",
        ],
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _val_loss(model, cfg, tokenizer, val) -> float:
    import torch

    from tracetune.train.loop import validate
    from tracetune.train.loss import CausalLMLoss

    autocast = cfg.train.precision == "bf16-autocast"
    return validate(
        CausalLMLoss(model), val, cfg.train.batch_size, tokenizer.pad_token_id, torch.device("cpu"), autocast
    )[0]


class StepClock:
    """Wall time and token counts per optimizer step, for the transformers Trainer workers."""

    def __init__(self):
        self.step_times: list[float] = []
        self.tokens = self.padded = self.loss_tokens = self.samples = 0
        self.per_step: list[dict] = []
        self._last = time.perf_counter()

    def count(self, batch: dict) -> dict:
        self.tokens += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        self.loss_tokens += int((batch["labels"][:, 1:] != -100).sum())
        self.samples += batch["input_ids"].shape[0]
        return batch

    def step(self) -> None:
        now = time.perf_counter()
        self.per_step.append(
            {
                "seconds": now - self._last,
                "tokens": self.tokens,
                "loss_tokens": self.loss_tokens,
                "samples": self.samples,
                "padded": self.padded,
            }
        )
        self.tokens = self.padded = self.loss_tokens = self.samples = 0
        self._last = now


def matmul_params(model) -> int:
    """Parameters that do a matmul per token: all but the input embedding, plus the LM head (tied or not)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == embedding.data_ptr()
    return sum(p.numel() for p in model.parameters()) - embedding.numel() + (head.numel() if tied else 0)


def _summarise(per_step: list[dict], warmup: int, losses: list[float], val_loss: float, model) -> dict:
    timed = per_step[warmup:]
    seconds = sum(s["seconds"] for s in timed)
    real_tokens_per_s = sum(s["tokens"] for s in timed) / seconds
    return {
        "real_tokens_per_s": real_tokens_per_s,
        # forward and backward: 6 FLOPs per matmul parameter per real token (attention's own products left out)
        "achieved_gflops": 6 * matmul_params(model) * real_tokens_per_s / 1e9,
        "loss_tokens_per_s": sum(s["loss_tokens"] for s in timed) / seconds,
        "samples_per_s": sum(s["samples"] for s in timed) / seconds,
        "seconds_per_step": seconds / len(timed),
        "pad_fraction": 1 - sum(s["tokens"] for s in per_step) / sum(s["padded"] for s in per_step),
        "final_train_loss": losses[-1],
        "val_loss": val_loss,
        "peak_rss_mb": _peak_rss_mb(),
        "allocator": allocator.active(),
    }


def worker_tracetune(args, tmp: Path) -> dict:
    from tracetune.lifecycle import new_run_dir
    from tracetune.pipeline import load_for_training, load_inputs
    from tracetune.train.loop import fit

    cfg = _config(args.source, args.steps, tmp, "tt", args.precision, args.compile)
    inputs = load_inputs(cfg)
    tokenizer, model, train, val, _ = load_for_training(cfg, inputs)
    run_dir = new_run_dir(cfg)
    fit(cfg, run_dir, model, tokenizer, train, val)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("split") != "val"]
    per_step = [
        {
            "seconds": r["num_tokens"] / r["tokens_per_s"],
            "tokens": r["num_tokens"],
            "loss_tokens": r["num_loss_tokens"],
            "samples": r["num_samples"],
            "padded": r["num_tokens"] / (1 - r["pad_fraction"]),
        }
        for r in steps
    ]
    val_loss = [r for r in rows if r.get("split") == "val"][-1]["loss"]
    return _summarise(per_step, args.warmup, [r["loss"] for r in steps], val_loss, model)


def _hf_pieces(args, tmp: Path):
    """Config, traces in tracetune's epoch-0 batch order, tokenizer, model and tokenized val split.

    Feeding the transformers workers the examples in exactly the order tracetune consumes them (and sampling
    sequentially) makes every optimizer step see the same 4 examples, so the losses are comparable step by step.
    """
    from tracetune.data.batching import plan_batches
    from tracetune.models.sources import load_model, load_tokenizer
    from tracetune.pipeline import load_inputs, tokenize_inputs

    cfg = _config(args.source, args.steps, tmp, "hf")
    inputs = load_inputs(cfg)
    tokenizer = load_tokenizer(cfg.model.source)
    train, val, _ = tokenize_inputs(cfg, inputs, tokenizer)
    by_id = {t.id: t for t in inputs.train}
    plan = plan_batches([len(e.input_ids) for e in train], cfg.train.batch_size, cfg.seed, 0)
    ordered = [by_id[train[i].id] for batch in plan for i in batch]
    model = load_model(cfg.model.source, tokenizer)
    return cfg, ordered, tokenizer, model, val


def _sequential(trainer_cls):
    """The trainer class with shuffling off, so it consumes the dataset in the given order."""
    from torch.utils.data import SequentialSampler

    class Sequential(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return Sequential


def _clock_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            clock.step()

    return Clock()


def _training_args(cls, args, tmp: Path, batch: int, accum: int, **extra):
    return cls(
        output_dir=str(tmp / "out"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=LR,
        max_steps=args.steps,
        bf16=True,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        optim="adamw_torch",
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=0,
        weight_decay=0.01,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )


def worker_trl(args, tmp: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tracetune.data.render import render_completion, user_message

    cfg, traces, tokenizer, model, val = _hf_pieces(args, tmp)
    rows = [
        {
            "prompt": [{"role": "user", "content": user_message(t.prompt, cfg.data.instruction)}],
            "completion": [{"role": "assistant", "content": render_completion(t.steps, t.final_answer)}],
        }
        for t in traces
    ]
    config = _training_args(SFTConfig, args, tmp, 4, 1, max_length=cfg.data.max_seq_length)
    trainer = _sequential(SFTTrainer)(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    clock = StepClock()
    collator = trainer.data_collator
    trainer.data_collator = lambda features: clock.count(collator(features))
    trainer.add_callback(_clock_callback(clock))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _summarise(clock.per_step, args.warmup, losses, _val_loss(model, cfg, tokenizer, val), model)


def worker_old(args, tmp: Path) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from tracetune.data.render import render_completion, render_prompt

    cfg, traces, tokenizer, model, val = _hf_pieces(args, tmp)
    texts = [
        render_prompt(tokenizer, t.prompt, cfg.data.instruction) + render_completion(t.steps, t.final_answer)
        for t in traces
    ]
    encoded = tokenizer(texts, add_special_tokens=False, padding="max_length", truncation=True, max_length=128)
    rows = []
    for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True):
        labels = [i if m else -100 for i, m in zip(ids, mask, strict=True)]
        rows.append(
            {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
        )
    clock = StepClock()

    def collate(features):
        return clock.count({k: torch.stack([f[k] for f in features]) for k in features[0]})

    trainer = _sequential(Trainer)(
        model=model, args=_training_args(TrainingArguments, args, tmp, 1, 4), train_dataset=rows, data_collator=collate
    )
    trainer.add_callback(_clock_callback(clock))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _summarise(clock.per_step, args.warmup, losses, _val_loss(model, cfg, tokenizer, val), model)


def worker_generate(args, tmp: Path) -> dict:
    """Both generation ways on the same items and model, in this one process, interleaved --generation-repeats
    times (medians reported); then tracetune's settings one prompt at a time, to check batching changes nothing."""
    import torch

    from tracetune.config import EvalConfig
    from tracetune.data.render import end_of_turn_ids, render_prompt
    from tracetune.data.traces import load_eval_items
    from tracetune.eval.generate import generate_batch
    from tracetune.eval.score import extract_answer
    from tracetune.models.sources import load_model, load_tokenizer

    source = args.eval_model or args.source
    tokenizer = load_tokenizer(source)
    model = load_model(source, tokenizer).to(torch.bfloat16).eval()
    items = load_eval_items(REPO / "data" / "eval.jsonl").records[: args.eval_items]
    instruction = _config(args.source, 1, tmp, "g").data.instruction
    prompts = [render_prompt(tokenizer, i.prompt, instruction) for i in items]
    stops = end_of_turn_ids(tokenizer)
    cfg = EvalConfig(eval_file=None, max_new_tokens=96, batch_size=50)

    def tracetune_way() -> list:
        return [
            g
            for k in range(0, len(prompts), cfg.batch_size)
            for g in generate_batch(model, tokenizer, prompts[k : k + cfg.batch_size], cfg, stops)
        ]

    def old_way() -> list:
        """The old pipeline's loop: transformers' generate, one prompt at a time, its default (SDPA) attention,
        max_new_tokens 50, stopping only at EOS."""
        out = []
        for prompt in prompts:
            encoded = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                ids = model.generate(
                    **encoded,
                    max_new_tokens=50,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            new = ids[0, encoded["input_ids"].shape[1] :].tolist()
            out.append((tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)))
        return out

    times, results = {"tracetune": [], "old": []}, {}
    for _ in range(args.generation_repeats):  # interleaved A B A B ...
        for name, way in (("tracetune", tracetune_way), ("old", old_way)):
            started = time.perf_counter()
            results[name] = way()
            times[name].append(time.perf_counter() - started)
    batched, single = results["tracetune"], results["old"]
    # tracetune's settings one prompt at a time: does batching (padding, rows leaving the batch) change anything?
    alone = [generate_batch(model, tokenizer, [p], cfg, stops)[0] for p in prompts]

    def answer(text: str):
        return extract_answer(text)[0]

    def share_equal(pairs) -> float | None:
        pairs = list(pairs)
        return sum(a == b for a, b in pairs) / len(pairs) if pairs else None

    def speeds(seconds: list[float], new_tokens: int) -> dict:
        median = statistics.median(seconds)
        return {"seconds": seconds, "items_per_s": len(items) / median, "new_tokens_per_s": new_tokens / median}

    old_finished = [k for k, (_, n) in enumerate(single) if n < 50]  # stopped at EOS within its 50 tokens
    return {
        "model": source,
        "allocator": allocator.active(),  # both ways ran in this one process, on the same allocator
        "num_items": len(items),
        "batch_size": cfg.batch_size,
        "repeats": args.generation_repeats,
        "tracetune": speeds(times["tracetune"], sum(g.num_new_tokens for g in batched)),
        "old": speeds(times["old"], sum(n for _, n in single)),
        "identical_answer_share": share_equal(
            (answer(g.completion), answer(t)) for g, (t, _) in zip(batched, single, strict=True)
        ),
        "old_items_finished_within_50_tokens": len(old_finished),
        "identical_answer_share_where_old_finished": share_equal(
            (answer(batched[k].completion), answer(single[k][0])) for k in old_finished
        ),
        "identical_answer_share_same_settings_unbatched": share_equal(
            (answer(x.completion), answer(y.completion)) for x, y in zip(batched, alone, strict=True)
        ),
        "identical_completion_share_same_settings_unbatched": share_equal(zip(batched, alone, strict=True)),
    }


WORKERS = {"tracetune": worker_tracetune, "trl": worker_trl, "old": worker_old, "generate": worker_generate}


def _spawn(system: str, args) -> dict:
    argv = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--source", args.source]
    argv += ["--eval-items", str(args.eval_items), "--generation-repeats", str(args.generation_repeats)]
    argv += ["--precision", args.precision] + (["--compile"] if args.compile else [])
    argv += ["--eval-model", args.eval_model] if args.eval_model else []
    # tracetune runs where `tracetune run` would: under tcmalloc when it is installed (allocator.py). TRL and the
    # old pipeline run as their users run them, on the system allocator, unless --others-on-tcmalloc.
    tcmalloc = (system in ("tracetune", "generate") or args.others_on_tcmalloc) and not args.system_allocator
    return spawn(__file__, system, argv, tcmalloc)


def _table(result: dict) -> str:
    med = result["training_median"]
    keys = [
        ("real_tokens_per_s", "real tokens/s", ".1f"),
        ("achieved_gflops", "achieved GFLOP/s (6 x matmul params x real tokens/s)", ".1f"),
        ("loss_tokens_per_s", "loss tokens/s", ".1f"),
        ("samples_per_s", "samples/s", ".3f"),
        ("seconds_per_step", "s / optimizer step", ".2f"),
        ("peak_rss_mb", "peak RSS (MB)", ".0f"),
        ("pad_fraction", "pad fraction", ".3f"),
        ("final_train_loss", "final train loss", ".4f"),
        ("val_loss", "validation loss", ".4f"),
    ]
    lines = [
        "| metric | " + " | ".join(SYSTEMS) + " | tracetune / trl | tracetune / old |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, fmt in keys:
        values = [med[s][key] for s in SYSTEMS]
        ratios = [f"{values[0] / v:.2f}x" if v else "-" for v in values[1:]]
        lines.append(f"| {label} | " + " | ".join(format(v, fmt) for v in values) + " | " + " | ".join(ratios) + " |")
    peak = result["matmul_peak"]
    share = [f"{100 * med[s]['achieved_gflops'] / peak['gflops']:.1f}%" for s in SYSTEMS]
    lines.append(f"| share of the measured {peak['dtype']} matmul peak ({peak['gflops']:.1f} GFLOP/s) | "
                 + " | ".join(share) + " | | |")  # fmt: skip
    lines.append("| memory allocator | " + " | ".join("/".join(result["allocators"][s]) for s in SYSTEMS) + " | | |")
    gen = result["generation"]
    if gen is None:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Generation on {gen['num_items']} eval items ({gen['model']}, both ways on {gen['allocator']}):",
        "",
        "| metric | tracetune batched | old one-at-a-time | ratio |",
        "|---|---|---|---|",
    ]
    for key in ("items_per_s", "new_tokens_per_s"):
        a, b = gen["tracetune"][key], gen["old"][key]
        lines.append(f"| {key} (median of {gen['repeats']}) | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    lines.append(f"| identical extracted answers vs the old loop | {100 * gen['identical_answer_share']:.0f}% | | |")
    if gen["identical_answer_share_where_old_finished"] is not None:
        finished = gen["old_items_finished_within_50_tokens"]
        share = 100 * gen["identical_answer_share_where_old_finished"]
        lines.append(f"| ... where the old loop ended within its 50 tokens ({finished} items) | {share:.0f}% | | |")
    same = 100 * gen["identical_answer_share_same_settings_unbatched"]
    whole = 100 * gen["identical_completion_share_same_settings_unbatched"]
    lines.append(
        f"| identical answers (completions) vs one at a time, same settings | {same:.0f}% ({whole:.0f}%) | | |"
    )
    return "\n".join(lines) + "\n"


def matmul_peak(dtype: str, size: int = 512, seconds: float = 2.0) -> dict:
    """This machine's square-matmul throughput in the training's matmul dtype, measured in this invocation after
    the workers (so it never runs beside them), on the same threads: the ceiling the achieved FLOP/s is read
    against."""
    import torch

    a = torch.randn(size, size, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    b = torch.randn_like(a)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    elapsed = time.perf_counter() - started
    return {
        "dtype": dtype,
        "size": size,
        "gflops": 2 * size**3 * count / elapsed / 1e9,
        "threads": torch.get_num_threads(),
    }


def medians(rows: list[dict]) -> dict:
    """The median of every numeric field over the repeats (any number of them); text fields (the allocator) are
    reported apart."""
    numeric = [k for k, v in rows[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return {k: statistics.median(r[k] for r in rows) for k in numeric}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--source", default="packaged:gemma3-270m")
    parser.add_argument(
        "--eval-model", help="model for the generation comparison, best a fine-tuned one (default: --source)"
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-items", type=int, default=50)
    parser.add_argument("--generation-repeats", type=int, default=3, help="interleaved generation repeats")
    parser.add_argument(
        "--precision",
        default="bf16-autocast",
        help="tracetune's train.precision (TRL and the old pipeline use bf16 autocast, i.e. Trainer's bf16=True)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="tracetune with train.compile=true (compiling happens in the first steps: raise --warmup)",
    )
    parser.add_argument("--no-generation", action="store_true", help="training comparison only")
    parser.add_argument("--others-on-tcmalloc", action="store_true", help="TRL and the old pipeline under tcmalloc too")
    parser.add_argument(
        "--system-allocator", action="store_true", help="every worker on the system allocator (no tcmalloc)"
    )
    parser.add_argument("--out", default="bench", help="writes bench/results/<out>.{json,md}")
    args = parser.parse_args()
    if args.worker:
        run_worker(WORKERS[args.worker], args)
        return
    runs = interleave(SYSTEMS, args.repeats, lambda system: _spawn(system, args))
    median = {s: medians(rs) for s, rs in runs.items()}
    result = {
        "machine": {"processor": platform.processor(), "cores": os.cpu_count(), "python": platform.python_version()},
        "source": args.source,
        "steps": args.steps,
        "warmup_excluded": args.warmup,
        "repeats": args.repeats,
        "training_runs": runs,
        "training_median": median,
        "tracetune_options": {"precision": args.precision, "compile": args.compile},
        "allocators": {s: sorted({r["allocator"] for r in rs}) for s, rs in runs.items()},
        "generation": None if args.no_generation else _spawn("generate", args),
        "matmul_peak": matmul_peak("fp32" if args.precision == "fp32" else "bf16"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(_table(result))
    print(_table(result))


if __name__ == "__main__":
    main()
