"""Sampling from the model being trained, with the evaluation's generator and checkers.

A `Sampler` keeps a copy of the policy for generation in the evaluation's precision (`auto`: bf16 where the
hardware computes it natively, fp32 elsewhere; bench/results/cpu_precision.json has the measured speeds),
refreshed from the trained weights before each use. Every sample is seeded by (run seed, what it is for, prompt id, sample index) through the evaluation's
`sample_seed`, so a resumed run draws exactly the samples it would have drawn: the sampling RNG is a pure
function of where the run is, and nothing about it needs saving.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tracetune import dist
from tracetune.config import Config, EvalConfig, SamplingConfig
from tracetune.data.render import end_of_turn_ids, render_prompt
from tracetune.data.traces import EvalItem, Trace
from tracetune.eval.generate import Generation, generate_batch
from tracetune.eval.scoring import sample_seed, score_item

log = logging.getLogger("tracetune")


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of one prompt, scored."""

    item: EvalItem
    index: int  # sample number within its prompt
    prompt_ids: tuple[int, ...]
    generation: Generation
    score: dict  # eval.scoring.score_item's row


def as_item(trace: Trace) -> EvalItem:
    """A training trace as an eval item: its prompt and its final answer to check samples against."""
    return EvalItem(trace.id, trace.prompt, trace.final_answer, category=trace.meta.get("category"))


class Sampler:
    """Generation from a copy of `model` in `cfg.eval.precision`, seeded per sample."""

    def __init__(self, model, tokenizer, cfg: Config):
        self.source = model
        self.model = copy.deepcopy(model).eval()
        if cfg.eval.precision == "bf16":
            self.model.to(torch.bfloat16)
        self.tokenizer = tokenizer
        self.instruction = cfg.data.instruction
        self.seed = cfg.seed
        self.stop_ids = end_of_turn_ids(tokenizer)

    @torch.no_grad()
    def refresh(self) -> None:
        """The trained weights, copied into the generation copy."""
        for target, source in zip(self.model.parameters(), self.source.parameters(), strict=True):
            target.copy_(source)

    def sample(self, items: list[EvalItem], k: int, sampling: SamplingConfig, key: str) -> list[list[Rollout]]:
        """k scored samples of each item, in item order; `key` names what they are for (e.g. "grpo:step-3")."""
        gen_cfg = EvalConfig(
            eval_file=None,
            do_sample=True,
            num_samples=k,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            batch_size=sampling.batch_size,
        )
        rows = [(item, n) for item in items for n in range(k)]
        prompts = {item.id: render_prompt(self.tokenizer, item.prompt, self.instruction) for item in items}
        ids = {i: tuple(self.tokenizer(text, add_special_tokens=False).input_ids) for i, text in prompts.items()}
        flat: list[Rollout] = []
        bar = tqdm(total=len(rows), desc=key, unit="sample", leave=False, disable=not dist.current().is_main)
        for start in range(0, len(rows), sampling.batch_size):
            chunk = rows[start : start + sampling.batch_size]
            seeds = [sample_seed(self.seed, f"{key}:{item.id}", n) for item, n in chunk]
            texts = [prompts[item.id] for item, _ in chunk]
            generations = generate_batch(self.model, self.tokenizer, texts, gen_cfg, self.stop_ids, seeds=seeds)
            flat += [
                Rollout(item, n, ids[item.id], gen, score_item(item, gen.completion))
                for (item, n), gen in zip(chunk, generations, strict=True)
            ]
            verified = sum(bool(r.score["verified"]) for r in flat)
            bar.update(len(chunk))
            bar.set_postfix(verified=verified)
            log.info("%s: %d of %d samples, %d verified, %.0f s", key, len(flat), len(rows), verified,
                     bar.format_dict["elapsed"])  # fmt: skip
        bar.close()
        return [flat[i * k : (i + 1) * k] for i in range(len(items))]

    def hinted(self, item: EvalItem, hint: str, max_new_tokens: int) -> Generation:
        """One greedy completion of `item` with `hint` after its prompt (rationalisation)."""
        gen_cfg = EvalConfig(eval_file=None, max_new_tokens=max_new_tokens, batch_size=1)
        text = render_prompt(self.tokenizer, f"{item.prompt}\n\n{hint}", self.instruction)
        return generate_batch(self.model, self.tokenizer, [text], gen_cfg, self.stop_ids)[0]


def heldout(sampler: Sampler, cfg: Config, items: list[EvalItem], out_dir: Path) -> dict:
    """Greedy accuracy on the held-out items by the evaluation's own code (predictions and scores in out_dir)."""
    from tracetune.eval.evaluate import heldout_accuracy

    return heldout_accuracy(sampler.model, sampler.tokenizer, items, cfg.eval, cfg.data.instruction, out_dir, cfg.seed)
