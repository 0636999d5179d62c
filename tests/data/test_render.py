import pytest

from tracetune.data.render import (
    Example,
    end_of_turn_ids,
    parse_completion,
    render_completion,
    render_prompt,
    tokenize_trace,
    tokenize_traces,
)
from tracetune.data.traces import Step, Trace
from tracetune.models.sources import load_tokenizer

TRACE = Trace("t1", "What is 6 * 7?", (Step(1, "calc", "6 * 7 = 42"), Step(2, "calc", "Check: 42 / 7 = 6")), "42")


def test_completion_format_and_its_inverse():
    text = render_completion(TRACE.steps, TRACE.final_answer)
    assert text == "Reasoning:\n1. 6 * 7 = 42\n2. Check: 42 / 7 = 6\nAnswer: 42"
    assert parse_completion(text) == (["6 * 7 = 42", "Check: 42 / 7 = 6"], "42")
    assert render_completion((), "7") == "Answer: 7"
    assert parse_completion("no marker here") == ([], None)


def _check_boundary(tokenizer, trace=TRACE):
    end_ids = end_of_turn_ids(tokenizer)
    example = tokenize_trace(tokenizer, trace, "Think.", end_ids)
    prompt_text = render_prompt(tokenizer, trace.prompt, "Think.")
    completion_text = render_completion(trace.steps, trace.final_answer)
    joint = tokenizer(prompt_text + completion_text, add_special_tokens=False).input_ids
    # The separately tokenized prompt + completion equal the joint tokenization: the mask boundary is exact.
    assert list(example.input_ids[: len(joint)]) == joint
    assert tokenizer.decode(example.input_ids[: example.num_prompt_tokens]) == prompt_text
    loss_part = example.input_ids[example.num_prompt_tokens :]
    assert tokenizer.decode(loss_part[: -len(end_ids)]) == completion_text
    assert list(loss_part[-len(end_ids) :]) == end_ids  # end-of-turn and EOS are inside the loss
    assert tokenizer.eos_token_id in loss_part
    return end_ids


@pytest.mark.parametrize("arch,end_token", [("gemma3", "<end_of_turn>"), ("llama", "<|im_end|>")])
def test_mask_boundary_is_exact_for_both_templates(arch, end_token):
    tokenizer = load_tokenizer(f"tiny:{arch}")
    end_ids = _check_boundary(tokenizer)
    assert tokenizer.convert_ids_to_tokens(end_ids[0]) == end_token


@pytest.mark.slow
@pytest.mark.parametrize("source,end_ids", [("packaged:gemma3-270m", [106, 1]), ("packaged:smollm2-135m", None)])
def test_mask_boundary_is_exact_for_real_tokenizers(source, end_ids):
    tokenizer = load_tokenizer(source)
    got = _check_boundary(tokenizer)
    if end_ids:
        assert got == end_ids
    assert tokenizer.convert_ids_to_tokens(got[0]) in ("<end_of_turn>", "<|im_end|>")


def test_length_policies_count_and_never_leave_zero_loss_examples():
    tokenizer = load_tokenizer("tiny:gemma3")
    long = Trace("long", "x" * 40, TRACE.steps, "42")
    short = Trace("short", "Hi?", (), "1")
    prompt_len = tokenize_trace(tokenizer, long, "", end_of_turn_ids(tokenizer)).num_prompt_tokens
    limit = prompt_len + 5
    dropped = tokenize_traces(tokenizer, [long, short], "", limit, "drop", "f.jsonl")
    assert [e.id for e in dropped.examples] == ["short"] and dropped.num_dropped == 1
    truncated = tokenize_traces(tokenizer, [long, short], "", limit, "truncate", "f.jsonl")
    assert truncated.num_truncated == 1 and len(truncated.examples[0].input_ids) == limit
    assert truncated.examples[0].num_loss_tokens == 5
    errors = tokenize_traces(tokenizer, [long, short], "", limit, "error", "f.jsonl")
    assert len(errors.issues) == 1 and "max_seq_length" in str(errors.issues[0])
    no_loss = tokenize_traces(tokenizer, [long], "", prompt_len - 1, "truncate", "f.jsonl")
    assert no_loss.examples == [] and no_loss.num_no_loss_tokens == 1
    assert all(e.num_loss_tokens > 0 for e in truncated.examples)


def test_example_counts_loss_tokens():
    assert Example("a", (1, 2, 3, 4), 3).num_loss_tokens == 1
