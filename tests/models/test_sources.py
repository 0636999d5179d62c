import json
import os

import pytest
import torch

from tracetune.errors import SourceError
from tracetune.models.sources import load_model, load_tokenizer


def test_tiny_models_are_real_architectures_and_deterministic():
    for arch, cls in (("gemma3", "Gemma3ForCausalLM"), ("llama", "LlamaForCausalLM")):
        tokenizer = load_tokenizer(f"tiny:{arch}")
        a, b = load_model(f"tiny:{arch}", tokenizer, seed=0), load_model(f"tiny:{arch}", tokenizer, seed=0)
        assert type(a).__name__ == cls and a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), name
        assert tokenizer.decode(tokenizer("Answer: 42\n").input_ids) == "Answer: 42\n"


def test_unknown_tiny_arch():
    tokenizer = load_tokenizer("tiny:gemma3")
    with pytest.raises(SourceError, match="unknown tiny architecture"):
        load_model("tiny:bert", tokenizer)


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SourceError) as info:
        load_tokenizer("no-such-org/no-such-model")
    text = str(info.value)
    assert "no-such-org/no-such-model" in text and "not in the Hugging Face cache" in text and "hf download" in text


def test_local_directory_source(tmp_path):
    tokenizer = load_tokenizer("tiny:llama")
    load_model("tiny:llama", tokenizer, 0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), load_tokenizer(str(tmp_path)))
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.slow
def test_converted_gemma_matches_the_gguf_and_loads_with_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetune.models.sources import PACKAGED, prepare_packaged

    target = prepare_packaged("gemma3-270m")
    record = json.loads((target / "tracetune_source.json").read_text())
    assert len(record["gguf_sha256"]) == 64
    converted = AutoModelForCausalLM.from_pretrained(target)  # plain transformers, no tracetune code
    tokenizer = AutoTokenizer.from_pretrained(target)
    gguf = PACKAGED["gemma3-270m"].locate_gguf()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for prompt in ("The capital of France is", "2 + 2 =", "Once upon a time"):
        ids = tokenizer(prompt, return_tensors="pt")
        a = converted.generate(**ids, max_new_tokens=12, do_sample=False)
        b = original.generate(**ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(a, b), prompt
    assert os.path.getsize(next(target.glob("*.safetensors"))) > 500_000_000
