"""Baselines for the base model: zero-shot in the run's own chat format, and few-shot with k examples, either
worked (`few_shot`: question, numbered reasoning, answer) or answer-only (`few_shot_answer`: question, answer).

A fine-tuned model is only worth its cost if it beats what its base model does when simply shown a few
examples, and for a small model the strongest such prompt is often the one without reasoning: imitating
reasoning costs a 270M model more than it gives (measured: 12% answer-only against 6% worked on the bundled
eval set). The few-shot prompt draws k training traces (seeded; never one whose prompt is an eval prompt) and
renders them in the format the base model can follow:

- `plain`, for a pretrained model that was never chat-trained (the packaged Gemma 3 270M): text blocks
  `Question: ...` / (`Reasoning: ...` /) `Answer: ...` separated by blank lines, with no chat template. A
  completion ends at the blank line (or the next `Question:`) the model writes after its answer.
- `chat`, for a chat model: the demonstrations are earlier user/assistant turns of the run's own format (or,
  answer-only, assistant turns holding just the `Answer: ...` line).

The demonstrations are the same for every item, so they form one prefix whose KV cache is computed once
(`generate.Prefix`); each item's question follows it.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

from tracetune.data.render import render_completion, user_message
from tracetune.data.traces import EvalItem, Trace, normalize_prompt

PLAIN_STOPS = ("\n\n", "\nQuestion:")
SHOWS_WORK = ("zero_shot", "few_shot")  # the baselines whose completions have steps to check


@dataclass(frozen=True, eq=False)
class FewShot:
    """A few-shot prompt: the shared prefix text, how each question is rendered after it, and its evidence."""

    baseline: str  # few_shot | few_shot_answer
    format: str  # plain | chat
    prefix: str
    demonstration_ids: tuple[str, ...]
    instruction: str
    stop_strings: tuple[str, ...]
    num_excluded: int  # training traces left out because their prompt is an eval prompt
    turns: tuple[dict, ...] = ()  # chat: the demonstrations as earlier turns

    def render(self, tokenizer, prompt: str) -> str:
        """What follows the prefix for one eval prompt."""
        if self.format == "plain":
            return f"Question: {prompt}\n"
        whole = tokenizer.apply_chat_template(
            [*self.turns, {"role": "user", "content": user_message(prompt, self.instruction)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert whole.startswith(self.prefix), "the chat template must render earlier turns the same way"
        return whole[len(self.prefix) :]

    def evidence(self) -> dict:
        """What baseline.json records: enough to rebuild and check the exact prompt."""
        return {
            "baseline": self.baseline,
            "format": self.format,
            "num_shots": len(self.demonstration_ids),
            "demonstration_ids": list(self.demonstration_ids),
            "prefix_sha256": hashlib.sha256(self.prefix.encode("utf-8")).hexdigest(),
            "num_excluded_for_leakage": self.num_excluded,
            "stop_strings": list(self.stop_strings),
        }


def draw_demonstrations(traces: list[Trace], items: list[EvalItem], k: int, seed: int) -> tuple[list[Trace], int]:
    """k training traces, seeded, none whose prompt (case and whitespace aside) is an eval prompt; and how
    many were excluded for that."""
    eval_prompts = {normalize_prompt(item.prompt) for item in items}
    allowed = [t for t in traces if normalize_prompt(t.prompt) not in eval_prompts]
    if len(allowed) < k:
        raise ValueError(f"few-shot needs {k} training traces that are not eval prompts; found {len(allowed)}")
    return random.Random(seed).sample(allowed, k), len(traces) - len(allowed)


def build_few_shot(
    tokenizer,
    traces: list[Trace],
    items: list[EvalItem],
    k: int,
    seed: int,
    instruction: str,
    fmt: str,
    baseline: str = "few_shot",
) -> FewShot:
    """The few-shot prompt for `items`: k demonstrations from `traces`, in `fmt` (plain or chat), worked
    (`few_shot`) or answer-only (`few_shot_answer`: the reasoning left out, and in chat the instruction too,
    since it asks for reasoning)."""
    demos, excluded = draw_demonstrations(traces, items, k, seed)
    ids = tuple(d.id for d in demos)
    answer_only = baseline == "few_shot_answer"

    def completion(d: Trace) -> str:
        return render_completion([] if answer_only else d.steps, d.final_answer)

    if fmt == "plain":
        bos = tokenizer.bos_token or ""
        blocks = [f"Question: {d.prompt}\n{completion(d)}\n\n" for d in demos]
        return FewShot(baseline, "plain", bos + "".join(blocks), ids, "", PLAIN_STOPS, excluded)
    instruction = "" if answer_only else instruction
    turns = []
    for d in demos:
        turns.append({"role": "user", "content": user_message(d.prompt, instruction)})
        turns.append({"role": "assistant", "content": completion(d)})
    prefix = _chat_prefix(tokenizer, turns, instruction)
    return FewShot(baseline, "chat", prefix, ids, instruction, (), excluded, tuple(turns))


def _chat_prefix(tokenizer, turns: list[dict], instruction: str) -> str:
    """The text two different questions' prompts share after the demonstration turns."""
    texts = [
        tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": user_message(q, instruction)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in ("A", "B")
    ]
    return os.path.commonprefix(texts)
