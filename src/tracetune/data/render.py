"""Trace -> chat-formatted prompt and completion -> token ids with a loss mask; and the inverse parse.

Training and evaluation both call `render_prompt`, so the model sees identical formatting in both. The
completion is `Reasoning:\\n1. ...\\nAnswer: <final_answer>` followed by the end-of-turn token and EOS,
which are inside the loss so the model learns to stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tracetune.chat import end_of_turn_ids
from tracetune.errors import Issue

ANSWER_MARKER = "Answer:"
_STEP_LINE = re.compile(r"^\s*(\d+)[.)]\s+(.*\S)\s*$")


@dataclass(frozen=True)
class Example:
    """One tokenized training example: loss is taken on input_ids[num_prompt_tokens:]."""

    id: str
    input_ids: tuple[int, ...]
    num_prompt_tokens: int

    @property
    def num_loss_tokens(self) -> int:
        return len(self.input_ids) - self.num_prompt_tokens


def user_message(prompt: str, instruction: str) -> str:
    return f"{prompt}\n\n{instruction}" if instruction else prompt


def render_prompt(tokenizer, prompt: str, instruction: str) -> str:
    """The user turn plus the generation prompt, via the tokenizer's chat template."""
    messages = [{"role": "user", "content": user_message(prompt, instruction)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_completion(steps, final_answer: str) -> str:
    """The model turn's text, without the end-of-turn token."""
    lines = ["Reasoning:", *(f"{n}. {s.content}" for n, s in enumerate(steps, 1))] if steps else []
    return "\n".join([*lines, f"{ANSWER_MARKER} {final_answer}"])


def parse_completion(text: str) -> tuple[list[str], str | None]:
    """Split a completion into its numbered reasoning steps and the text after the last 'Answer:'."""
    head, marker, tail = text.rpartition(ANSWER_MARKER)
    answer = tail.strip().splitlines()[0].strip() if marker and tail.strip() else None
    body = head if marker else text
    steps = [m.group(2) for m in map(_STEP_LINE.match, body.splitlines()) if m]
    return steps, answer


def tokenize_trace(tokenizer, trace, instruction: str, end_ids: list[int]) -> Example:
    """Prompt and completion are tokenized separately so the loss-mask boundary is exact."""
    prompt_ids = tokenizer(render_prompt(tokenizer, trace.prompt, instruction), add_special_tokens=False).input_ids
    completion_ids = tokenizer(render_completion(trace.steps, trace.final_answer), add_special_tokens=False).input_ids
    return Example(trace.id, tuple(prompt_ids + completion_ids + end_ids), len(prompt_ids))


@dataclass
class TokenizeReport:
    """Tokenized examples plus what the length policy did, for the data report and metrics."""

    examples: list[Example]
    num_overlength: int = 0
    num_dropped: int = 0
    num_truncated: int = 0
    num_no_loss_tokens: int = 0
    issues: list = None


def tokenize_traces(tokenizer, traces, instruction: str, max_seq_length: int, policy: str, path: str) -> TokenizeReport:
    """Tokenize every trace and apply the over-length policy (error | drop | truncate).

    Truncation cuts the completion's tail; an example left with no loss tokens is always dropped and counted,
    because it would teach nothing and divide by zero in a loss average.
    """

    end_ids = end_of_turn_ids(tokenizer)
    report = TokenizeReport([], issues=[])
    for trace in traces:
        example = tokenize_trace(tokenizer, trace, instruction, end_ids)
        if len(example.input_ids) > max_seq_length:
            report.num_overlength += 1
            if policy == "error":
                report.issues.append(
                    Issue(
                        path,
                        trace.line,
                        "<record>",
                        f"{len(example.input_ids)} tokens > data.max_seq_length={max_seq_length}",
                        "raise data.max_seq_length, shorten the record, or set data.overlength_policy=drop|truncate",
                    )
                )
                continue
            if policy == "drop":
                report.num_dropped += 1
                continue
            report.num_truncated += 1
            example = Example(example.id, example.input_ids[:max_seq_length], example.num_prompt_tokens)
        if example.num_loss_tokens <= 0:
            report.num_no_loss_tokens += 1
            continue
        report.examples.append(example)
    return report
