"""A GGUF file evaluated under llama.cpp (the llama-cpp-python binding), the engine Ollama and LM Studio run.

Each eval prompt is rendered with the trained model's chat template, then tokenized, decoded greedily and
detokenized by llama.cpp from the file alone, and scored like any prediction. The trained tokenizer's ids for
the same text are recorded beside llama.cpp's, so a tokenizer that llama.cpp reads differently shows up as such.
Optional: `pip install llama-cpp-python` (built from source where no wheel fits; about 10 minutes on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from tracetune.chat import end_of_turn_ids
from tracetune.config import EvalConfig
from tracetune.data.render import render_prompt
from tracetune.data.traces import EvalItem
from tracetune.eval.generate import finish
from tracetune.eval.scoring import score_item
from tracetune.layout import EvalDir


def is_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _greedy(llm, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    new: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        new.append(token)
        if token in stop_ids or len(new) == max_new_tokens:
            break
    return new


def llama_cpp_predictions(
    gguf: Path, tokenizer, items: list[EvalItem], cfg: EvalConfig, instruction: str, out_dir: Path
) -> Path:
    """out_dir/predictions.jsonl: one greedy llama.cpp prediction per item, scored, with `prompt_tokens_match`
    (llama.cpp's prompt ids equal the trained tokenizer's)."""
    from llama_cpp import Llama

    rendered = [render_prompt(tokenizer, item.prompt, instruction) for item in items]
    reference = [tokenizer(text, add_special_tokens=False).input_ids for text in rendered]
    context = max(map(len, reference), default=0) + cfg.max_new_tokens + 16
    threads = len(os.sched_getaffinity(0))
    llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, seed=0, verbose=False)
    stop_ids = end_of_turn_ids(tokenizer)

    def detokenize(ids: list[int]) -> str:
        return llm.detokenize(ids).decode("utf-8", errors="replace")

    out_dir.mkdir(parents=True, exist_ok=True)
    path = EvalDir(out_dir).predictions
    try:
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for item, text, ids in zip(items, rendered, reference, strict=True):
                started = time.perf_counter()
                prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
                new = _greedy(llm, prompt_ids, cfg.max_new_tokens, set(stop_ids))
                latency_ms = round(1000 * (time.perf_counter() - started), 1)
                gen = finish(new, stop_ids, None, cfg.stop_strings, detokenize)
                row = {"id": item.id, "prompt": item.prompt, "expected_answer": item.expected_answer}
                row |= {"completion": gen.completion, **score_item(item, gen.completion)}
                row |= {
                    "num_new_tokens": gen.num_new_tokens,
                    "finish_reason": gen.finish_reason,
                    "latency_ms": latency_ms,
                }
                row |= {"section": item.section, "category": item.category, "difficulty": item.difficulty}
                row["prompt_tokens_match"] = prompt_ids == ids
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        llm.close()
    return path
