"""GGUF export: the tensor layouts invert transformers' GGUF loader; the check's gate; the real round trip
(slow: the packaged models)."""

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tracetune.evidence.gguf_check import gguf_check
from tracetune.models.export import ExportError, _to_gguf_layout, ollama_modelfile, source_gguf


class _Config:
    num_attention_heads, num_key_value_heads = 4, 2


@pytest.mark.parametrize(
    ("arch", "name", "shape", "processor"),
    [
        ("gemma3", "blk.0.attn_norm.weight", (8,), "gemma3"),
        ("gemma3", "blk.0.attn_q.weight", (8, 4), "gemma3"),
        ("llama", "blk.0.attn_q.weight", (16, 6), "llama"),
        ("llama", "blk.0.attn_k.weight", (8, 6), "llama"),
        ("llama", "blk.0.ffn_up.weight", (8, 6), "llama"),
    ],
)
def test_layouts_are_what_transformers_loader_undoes(arch, name, shape, processor):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    weights = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    config = {"num_attention_heads": 4, "num_key_value_heads": 2}
    back = TENSOR_PROCESSORS[processor](config=config).process(_to_gguf_layout(arch, name, weights, _Config()), name)
    np.testing.assert_allclose(back.weights, weights, rtol=0, atol=1e-6)


def _rows(answers: list[str]) -> list[dict]:
    return [{"id": str(k), "extracted_answer": a, "completion": f"Answer: {a}"} for k, a in enumerate(answers)]


def test_the_check_gates_f16_on_identical_answers_and_q8_0_on_its_interval():
    paired = {"base_accuracy": 0.5, "final_accuracy": 0.45, "difference": -0.05, "difference_ci95": [-0.12, 0.02]}
    final = _rows([str(k) for k in range(50)])
    one_off = _rows([str(k) for k in range(49)] + ["x"])
    two_off = _rows([str(k) for k in range(48)] + ["x", "y"])
    assert (
        gguf_check(final, one_off, "f16", paired)["passed"]
        and gguf_check(final, one_off, "f16", paired)["identical_answer_share"] == 0.98
    )
    assert not gguf_check(final, two_off, "bf16", paired)["passed"]
    assert gguf_check(final, two_off, "q8_0", paired)["passed"]  # -5 points, but 0 is within [-12, +2]
    assert not gguf_check(final, two_off, "q8_0", paired | {"difference_ci95": [-0.2, -0.01]})["passed"]


def test_modelfile_has_the_turn_template_and_stop():
    gemma = ollama_modelfile("m.gguf", "{{ '<start_of_turn>user' }}")
    assert (
        gemma.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<end_of_turn>"' in gemma and "{{ .Prompt }}" in gemma
    )
    assert 'PARAMETER stop "<|im_end|>"' in ollama_modelfile("m.gguf", "<|im_start|>")


def test_a_model_without_a_source_gguf_is_refused_with_the_fix():
    with pytest.raises(ExportError, match="convert_hf_to_gguf.py"):
        source_gguf("tiny:gemma3")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kind"), [("gemma3-270m", "bf16"), ("smollm2-135m", "f16"), ("gemma3-270m", "q8_0")])
def test_exported_file_loads_back_with_the_same_tokenizer_and_close_logits(tmp_path, name, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetune.models.export import export_gguf
    from tracetune.models.sources import prepare_packaged

    model_dir = prepare_packaged(name)
    export_gguf(model_dir, source_gguf(f"packaged:{name}"), tmp_path / "m.gguf", kind)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    reference = AutoTokenizer.from_pretrained(model_dir)
    text = (REPO / "data" / "train.jsonl").read_text().splitlines()[1]  # about 150 tokens of a trace
    assert tokenizer(text).input_ids == reference(text).input_ids and tokenizer.chat_template
    ids = torch.tensor([reference(text).input_ids])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    relative = float((got - want).norm() / want.norm())
    # q8_0 rounds every weight to 8 bits per 32-value block: near-ties in the argmax may flip.
    assert agree >= (0.85 if kind == "q8_0" else 0.95) and relative < (0.1 if kind == "q8_0" else 0.02), (
        agree,
        relative,
    )
