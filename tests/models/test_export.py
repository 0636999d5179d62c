"""GGUF export: the tensor layouts invert transformers' GGUF loader; the check's gate; models that did not come
from a GGUF (tiny Gemma 2, Gemma 3 and Llama with SentencePiece and byte-level tokenizers trained here) round
trip through the file; the real round trip and the written metadata against llama.cpp's own files (slow: the
packaged models)."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.hf_models import TINY_EXPORTABLE, tiny_model_dir
from tracetune.chat import GEMMA_CHAT_TEMPLATE
from tracetune.errors import ExportError
from tracetune.export_stage import gguf_check
from tracetune.models.export import _to_gguf_layout, export_gguf, ollama_modelfile, source_gguf


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
    return [
        {"id": str(k), "extracted_answer": a, "completion": f"Answer: {a}", "correct": a == "1"}
        for k, a in enumerate(answers)
    ]


def test_the_check_gates_on_logits_and_identical_answers_and_q8_0_also_on_its_interval():
    paired = {"base_accuracy": 0.5, "final_accuracy": 0.45, "difference": -0.05, "difference_ci95": [-0.12, 0.02]}
    final = _rows([str(k) for k in range(50)])
    one_off = _rows([str(k) for k in range(49)] + ["x"])
    two_off = _rows([str(k) for k in range(48)] + ["x", "y"])
    check = gguf_check(final, one_off, "f16", paired, 0.0)
    assert check["passed"] and check["identical_answer_share"] == 0.98 and check["accuracy_reference"] == 0.02
    assert not gguf_check(final, one_off, "f16", paired, 0.01)["passed"]  # a tensor off: the logits say so
    assert gguf_check(final, one_off, "f16", paired, None)["passed"]  # llama.cpp: answers only
    assert not gguf_check(final, two_off, "bf16", paired, 0.0)["passed"]
    assert gguf_check(final, final, "q8_0", paired, 1e-4)["passed"]  # -5 points, but 0 is within [-12, +2]
    assert not gguf_check(final, two_off, "q8_0", paired, 1e-4)["passed"]
    assert not gguf_check(final, final, "q8_0", paired | {"difference_ci95": [-0.2, -0.01]}, 1e-4)["passed"]


def test_modelfile_has_the_turn_template_and_stop():
    gemma = ollama_modelfile("m.gguf", "{{ '<start_of_turn>user' }}")
    assert (
        gemma.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<end_of_turn>"' in gemma and "{{ .Prompt }}" in gemma
    )
    assert 'PARAMETER stop "<|im_end|>"' in ollama_modelfile("m.gguf", "<|im_start|>")
    with_instruction = ollama_modelfile("m.gguf", "<start_of_turn>", "{{ .Prompt }}\n\nThink step by step.")
    assert "<start_of_turn>user\n{{ .Prompt }}\n\nThink step by step.<end_of_turn>" in with_instruction


def _same_tokens_and_logits(model_dir, gguf_dir, name: str, text: str) -> tuple[float, float]:
    """Asserts the file's tokenizer and chat template agree with the model's; returns (argmax agreement,
    relative logit error) of the file's model against the Hugging Face one on `text`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    reference = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer(text).input_ids == reference(text).input_ids
    chat = [{"role": "user", "content": text}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([reference(text).input_ids])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
    return float((got.argmax(-1) == want.argmax(-1)).float().mean()), float((got - want).norm() / want.norm())


@pytest.mark.parametrize("arch", sorted(TINY_EXPORTABLE))
def test_a_model_from_a_hugging_face_directory_round_trips(tmp_path, arch):
    model_dir = tiny_model_dir(tmp_path, arch)
    info = export_gguf(model_dir, tmp_path / "out" / "m.gguf", "f16")
    assert info["architecture"] == arch and info["metadata"] == "written from final_model"
    text = (REPO / "data" / "train.jsonl").read_text().splitlines()[2] + " 1234.5  ok"
    agree, relative = _same_tokens_and_logits(model_dir, tmp_path / "out", "m.gguf", text)
    assert agree >= 0.95 and relative < 0.01, (agree, relative)


def _rounded_reference_error(model_dir, gguf_path, text: str, kind: str, template=None) -> float:
    """The file's logits against the trained model's rounded as the file stores it (round_as_exported), relative
    to the reference's norm."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetune.models.export import round_as_exported

    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir)(text).input_ids])
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    round_as_exported(reference, kind, template)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    with torch.no_grad():
        want, got = reference(ids).logits, model(ids).logits
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", sorted(TINY_EXPORTABLE))
def test_the_file_answers_as_the_model_rounded_as_it_stores_it(tmp_path, arch, kind):
    """The GGUF check's reference: the trained model rounded exactly as the file is, whose logits the file's
    equal up to its float32 metadata (for every type, q8_0 included)."""
    model_dir = tiny_model_dir(tmp_path, arch)
    export_gguf(model_dir, tmp_path / "out" / "m.gguf", kind)
    text = (REPO / "data" / "train.jsonl").read_text().splitlines()[2]
    assert _rounded_reference_error(model_dir, tmp_path / "out" / "m.gguf", text, kind) < 1e-5


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_an_embedding_padded_past_the_tokenizer_gets_placeholder_tokens(tmp_path, arch):
    """One token per embedding row, as llama.cpp needs: the rows no token has get its converter's [PAD<id>]
    placeholders, typed unused, and the file still tokenizes and answers as the model does."""
    from gguf import GGUFReader, TokenType

    model_dir = tiny_model_dir(tmp_path, arch, extra_rows=8)
    export_gguf(model_dir, tmp_path / "out" / "m.gguf", "f16")
    fields = GGUFReader(str(tmp_path / "out" / "m.gguf")).fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    rows = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert len(tokens.data) == rows
    last = bytes(tokens.parts[tokens.data[-1]]).decode()
    assert last == f"[PAD{rows - 1}]" and int(types.parts[types.data[-1]][0]) == TokenType.UNUSED
    text = (REPO / "data" / "train.jsonl").read_text().splitlines()[3]
    agree, relative = _same_tokens_and_logits(model_dir, tmp_path / "out", "m.gguf", text)
    assert agree >= 0.95 and relative < 0.01, (agree, relative)


def test_a_tokenizer_larger_than_the_embedding_is_refused_with_the_fix(tmp_path):
    from tracetune.models.sources import tiny_model

    tokenizer = TINY_EXPORTABLE["llama"][0](tmp_path)
    tiny_model("llama", tokenizer, seed=0, vocab_size=len(tokenizer) - 1).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ExportError, match="resize_token_embeddings"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_gguf_cannot_hold_is_refused_with_the_fix(tmp_path):
    from tracetune.models.sources import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer(GEMMA_CHAT_TEMPLATE)  # character-level WordLevel
    tiny_model("gemma3", tokenizer, seed=0).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ExportError, match="tokenizer.json.*WordLevel.*convert_hf_to_gguf.py"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def test_only_packaged_models_have_a_source_gguf():
    assert source_gguf("tiny:gemma3") is None and source_gguf("google/gemma-2-2b") is None


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kind"), [("gemma3-270m", "bf16"), ("smollm2-135m", "f16"), ("gemma3-270m", "q8_0")])
def test_exported_file_loads_back_with_the_same_tokenizer_and_close_logits(tmp_path, name, kind):
    from tracetune.models.sources import prepare_packaged

    model_dir = prepare_packaged(name)
    export_gguf(model_dir, tmp_path / "m.gguf", kind, source_gguf(f"packaged:{name}"))
    text = (REPO / "data" / "train.jsonl").read_text().splitlines()[1]  # about 150 tokens of a trace
    agree, relative = _same_tokens_and_logits(model_dir, tmp_path, "m.gguf", text)
    # q8_0 rounds every weight to 8 bits per 32-value block: near-ties in the argmax may flip.
    assert agree >= (0.85 if kind == "q8_0" else 0.95) and relative < (0.1 if kind == "q8_0" else 0.02), (
        agree,
        relative,
    )
    template = source_gguf(f"packaged:{name}")
    assert _rounded_reference_error(model_dir, tmp_path / "m.gguf", text, kind, template) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_metadata_written_from_the_directory_is_what_llama_cpp_wrote(tmp_path, name):
    """The packaged models' directories, exported as if they had no GGUF, against the GGUF files llama.cpp's
    converter made of the same models: the same hyper-parameters, tokens, token types, merges and special ids."""
    from gguf import GGUFReader

    from tracetune.models.sources import prepare_packaged

    export_gguf(prepare_packaged(name), tmp_path / "m.gguf", "bf16")
    got, want = GGUFReader(str(tmp_path / "m.gguf")), GGUFReader(str(source_gguf(f"packaged:{name}")))
    ours = {k: f.contents() for k, f in got.fields.items()}
    theirs = {
        k: f.contents() for k, f in want.fields.items() if k.startswith(("tokenizer.", ours["general.architecture"]))
    }
    # The pre-tokenizer is named from the directory's tokenizer.json, which transformers rebuilt without
    # SmolLM's digit split; the chat template is the one tracetune trained with.
    different = {"tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.scores"}
    assert set(theirs) - set(ours) == set()
    for key in set(theirs) - different:
        assert (
            ours[key] == pytest.approx(theirs[key], rel=1e-6)
            if isinstance(theirs[key], float)
            else ours[key] == theirs[key]
        ), key
    assert sorted(t.name for t in got.tensors) == sorted(t.name for t in want.tensors)
    if "tokenizer.ggml.scores" in theirs:
        # llama.cpp merges the pair whose token scores highest: the order of the scores is what matters (the
        # single characters, never a merge's result, sit 31 places lower in Gemma's own scores).
        ours_scores, their_scores = np.array(ours["tokenizer.ggml.scores"]), np.array(theirs["tokenizer.ggml.scores"])
        normal = np.array(ours["tokenizer.ggml.token_type"]) == 1
        assert (ours_scores[~normal] == their_scores[~normal]).all()
        assert (
            np.argsort(-ours_scores[normal], kind="stable") == np.argsort(-their_scores[normal], kind="stable")
        ).all()
