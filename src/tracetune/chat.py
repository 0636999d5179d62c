"""Chat templates tracetune installs where a tokenizer has none, and the tokens that end a model turn: what
models (loading) and data (rendering) both need, on the ground floor."""

from __future__ import annotations

# Gemma's turn format. The packaged GGUF tokenizer carries no template, so we install this one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# ChatML, as used by SmolLM2.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end the model's turn: the template's end-of-turn token, then EOS if different."""
    probe = "\x00PROBE\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], tokenize=False
    )
    suffix = text.split(probe, 1)[1]
    ids = tokenizer(suffix, add_special_tokens=False).input_ids
    assert ids, "chat template must close the assistant turn"
    out = [ids[0]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out
