import pytest

from tracetune.config import EvalConfig
from tracetune.data.render import end_of_turn_ids, render_prompt
from tracetune.data.traces import EvalItem, load_eval_items, load_traces
from tracetune.eval.baselines import build_few_shot, draw_demonstrations
from tracetune.eval.generate import generate_batch, prefill_prefix
from tracetune.models.sources import is_chat_model, load_model, load_tokenizer

TRAIN = load_traces("data/train.jsonl").records[:40]
ITEMS = load_eval_items("data/eval.jsonl").records[:6]


def test_demonstrations_are_seeded_and_never_eval_prompts():
    leaked = [EvalItem("e", "  " + TRAIN[3].prompt.upper(), "1"), *ITEMS]  # the same prompt up to case and spaces
    demos, excluded = draw_demonstrations(TRAIN, leaked, 5, seed=1)
    assert excluded == 1 and TRAIN[3] not in demos and len(set(demos)) == 5
    assert demos == draw_demonstrations(TRAIN, leaked, 5, seed=1)[0] != draw_demonstrations(TRAIN, leaked, 5, 2)[0]
    with pytest.raises(ValueError, match="needs 40 training traces"):
        draw_demonstrations(TRAIN, leaked, 40, seed=1)


def test_plain_prompt_is_question_reasoning_answer_blocks():
    tokenizer = load_tokenizer("tiny:gemma3")
    shot = build_few_shot(tokenizer, TRAIN, ITEMS, 2, 0, "Think.", "plain")
    blocks = shot.prefix.removeprefix(tokenizer.bos_token).split("\n\n")
    assert len(blocks) == 3 and blocks[-1] == "" and all(b.startswith("Question: ") for b in blocks[:2])
    assert "\nReasoning:\n1. " in blocks[0] and "\nAnswer: " in blocks[0] and "<start_of_turn>" not in shot.prefix
    assert shot.render(tokenizer, "What is 2 + 2?") == "Question: What is 2 + 2?\n"
    assert (
        shot.evidence()["demonstration_ids"] == list(shot.demonstration_ids)
        and len(shot.evidence()["prefix_sha256"]) == 64
    )


def test_answer_only_prompt_is_the_same_demonstrations_without_their_reasoning():
    tokenizer = load_tokenizer("tiny:gemma3")
    worked = build_few_shot(tokenizer, TRAIN, ITEMS, 2, 0, "Think.", "plain")
    shot = build_few_shot(tokenizer, TRAIN, ITEMS, 2, 0, "Think.", "plain", "few_shot_answer")
    assert shot.demonstration_ids == worked.demonstration_ids and shot.evidence()["baseline"] == "few_shot_answer"
    demos = {t.id: t for t in TRAIN}
    expected = "".join(
        f"Question: {demos[i].prompt}\nAnswer: {demos[i].final_answer}\n\n" for i in shot.demonstration_ids
    )
    assert shot.prefix == tokenizer.bos_token + expected and "Reasoning" not in shot.prefix
    chat = build_few_shot(tokenizer, TRAIN, ITEMS, 2, 0, "Think.", "chat", "few_shot_answer")
    whole = chat.prefix + chat.render(tokenizer, "What is 2 + 2?")
    assert "Think." not in whole and "Reasoning" not in whole  # the instruction asks for reasoning: left out
    assert whole.count(f"<start_of_turn>model\nAnswer: {demos[chat.demonstration_ids[0]].final_answer}") == 1


def test_chat_prompt_puts_demonstrations_in_earlier_turns():
    tokenizer = load_tokenizer("tiny:gemma3")
    shot = build_few_shot(tokenizer, TRAIN, ITEMS, 3, 0, "Think.", "chat")
    whole = shot.prefix + shot.render(tokenizer, "What is 2 + 2?")
    assert whole.count("<start_of_turn>user") == 4 and whole.count("<start_of_turn>model") == 4
    assert whole.endswith(render_prompt(tokenizer, "What is 2 + 2?", "Think.").removeprefix(tokenizer.bos_token))
    assert is_chat_model("packaged:smollm2-135m") and not is_chat_model("packaged:gemma3-270m")


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_a_cached_prefix_gives_the_tokens_of_the_whole_prompt(fmt):
    tokenizer = load_tokenizer("tiny:gemma3")
    model = load_model("tiny:gemma3", tokenizer, seed=0).eval()
    shot = build_few_shot(tokenizer, TRAIN, ITEMS, 2, 0, "Think.", fmt)
    questions = [shot.render(tokenizer, item.prompt) for item in ITEMS]
    cfg = EvalConfig(eval_file=None, max_new_tokens=10)
    stops = end_of_turn_ids(tokenizer)
    cached = generate_batch(model, tokenizer, questions, cfg, stops, prefill_prefix(model, tokenizer, shot.prefix))
    whole = generate_batch(model, tokenizer, [shot.prefix + q for q in questions], cfg, stops)
    assert [g.completion for g in cached] == [g.completion for g in whole]


def test_a_stop_string_ends_greedy_rows_where_it_appears():
    tokenizer = load_tokenizer("tiny:gemma3")
    model = load_model("tiny:gemma3", tokenizer, seed=0).eval()
    prompts = [render_prompt(tokenizer, item.prompt, "") for item in ITEMS]
    cfg = EvalConfig(eval_file=None, max_new_tokens=12)
    free = generate_batch(model, tokenizer, prompts, cfg, [])
    stop = free[0].completion[3:5]
    stopped = generate_batch(model, tokenizer, prompts, cfg, [], stop_strings=(stop,))
    for before, after in zip(free, stopped, strict=True):
        if stop in before.completion:
            assert after.finish_reason == "stop" and before.completion.startswith(after.completion)
            assert after.num_new_tokens < before.num_new_tokens
        else:
            assert after == before
