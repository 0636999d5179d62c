"""GGUF metadata written from a Hugging Face model directory, for a model that did not come from a GGUF.

Two parts, each under llama.cpp's key names:
- the architecture's hyper-parameters, as llama.cpp's `convert_hf_to_gguf.py` writes them for Gemma 2,
  Gemma 3 and Llama (and as transformers' GGUF loader reads them back);
- the tokenizer, from `tokenizer.json`. A SentencePiece vocabulary (BPE with byte fallback: Gemma, Llama 2)
  becomes llama.cpp's "llama" tokenizer, whose merges follow each token's score; the scores are the
  vocabulary's order, as SentencePiece orders its pieces. A byte-level BPE (GPT-2 style: SmolLM2, Llama 3)
  becomes "gpt2" with its merges. Gemma's runs of two or more spaces are spelled with real spaces, as its
  own GGUF files spell them (transformers' loader respells them back).

A test writes both from the packaged models' directories and compares them with the GGUF files they came
from, which llama.cpp's converter wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tracetune.errors import ExportError

# Hugging Face model_type -> GGUF architecture, for the architectures written here.
GGUF_ARCHITECTURES = {"gemma2": "gemma2", "gemma3_text": "gemma3", "llama": "llama"}
_GEMMA = ("gemma2", "gemma3")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_CONVERTER_FIX = "fix: convert the model with llama.cpp's convert_hf_to_gguf.py"


def gguf_architecture(config) -> str:
    """The GGUF architecture name of a Hugging Face config, or a clear refusal."""
    arch = GGUF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ExportError(
            f"GGUF export writes the architectures {', '.join(GGUF_ARCHITECTURES)}; this model is "
            f"{config.model_type!r}; {_CONVERTER_FIX}"
        )
    return arch


def _rope_theta(config, arch: str) -> float:
    """The rotary base of the global-attention layers; anything but plain RoPE is refused."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if arch == "gemma3":  # local layers: a fixed base of 10000 in llama.cpp and transformers alike
        local = params.get("sliding_attention", {})
        params = params.get("full_attention", params)
        if local.get("rope_theta", 10000.0) != 10000.0 or local.get("rope_type", "default") != "default":
            raise ExportError(f"GGUF has no key for this model's local-attention RoPE {local}; {_CONVERTER_FIX}")
    if params.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export writes plain RoPE; this model uses {params['rope_type']!r}; {_CONVERTER_FIX}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _check_layer_pattern(config, arch: str) -> None:
    """GGUF has no key for which layers attend locally: llama.cpp and transformers assume Gemma 2 alternates
    (every 2nd layer global) and Gemma 3 has every 6th global. A model that differs is refused."""
    period = {"gemma2": 2, "gemma3": 6}[arch]
    assumed = [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(config.layer_types))
    ]
    if list(config.layer_types) != assumed:
        raise ExportError(
            f"this {arch} model's attention layers {config.layer_types} are not the pattern GGUF readers assume; {_CONVERTER_FIX}"
        )


def write_hparams(writer, arch: str, config) -> None:
    """The hyper-parameters llama.cpp reads for `arch`, from the Hugging Face config."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config, arch))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        return
    _check_layer_pattern(config, arch)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _vocabulary(spec: dict, vocab_size: int) -> tuple[list[str], dict[int, bool], set[int]]:
    """Tokens in id order, one per embedding row; which ids are added tokens (True when special); and the ids
    no token has (a padded embedding), which get llama.cpp's converter's `[PAD<id>]` placeholders."""
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    added = {}
    for token in spec.get("added_tokens", []):
        by_id[token["id"]] = token["content"]
        added[token["id"]] = token["special"]
    largest = max(by_id)
    if largest >= vocab_size:
        raise ExportError(
            f"tokenizer.json has token ids up to {largest}, the model's embedding {vocab_size} rows; "
            "fix: resize the model's token embeddings to the tokenizer (resize_token_embeddings) and save it again"
        )
    unused = set(range(vocab_size)) - set(by_id)
    return [by_id.get(index, f"[PAD{index}]") for index in range(vocab_size)], added, unused


def _sentencepiece_tokens(tokens: list[str], added: dict[int, bool], unused: set[int], arch: str, unk_id: int | None):
    """llama.cpp's "llama" vocabulary: texts, scores (merge priority) and types."""
    from gguf import TokenType

    texts, scores, types = [], [], []
    num_normal = 0
    for index, token in enumerate(tokens):
        if index in unused:
            texts.append(token)
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
            continue
        if arch in _GEMMA and len(token) > 1 and set(token) == {"\u2581"}:
            texts.append(" " * len(token))
            scores.append(-1000.0)
            types.append(TokenType.USER_DEFINED)
            continue
        texts.append(token)
        if index in added:
            kind = TokenType.CONTROL if added[index] else TokenType.USER_DEFINED
        elif index == unk_id:
            kind = TokenType.UNKNOWN
        elif _BYTE_TOKEN.fullmatch(token):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        types.append(kind)
        if kind == TokenType.NORMAL:
            scores.append(-float(num_normal))
            num_normal += 1
        else:
            scores.append(0.0 if kind == TokenType.BYTE else -1000.0)
    return texts, scores, types


def _byte_level_pre(spec: dict) -> str:
    """llama.cpp's name for the text splitting a byte-level tokenizer.json does before its merges."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    raise ExportError(
        f"tokenizer.json: GGUF export knows the byte-level pre-tokenizers of GPT-2 and SmolLM; this one is "
        f"{kinds}; {_CONVERTER_FIX}"
    )


def _merges(spec: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _adds(tokenizer, token_id: int | None) -> tuple[bool, bool]:
    """Whether the tokenizer puts `token_id` first and last around a plain text."""
    ids = tokenizer("a").input_ids
    return token_id is not None and ids[0] == token_id, token_id is not None and ids[-1] == token_id


def write_tokenizer(writer, arch: str, model_dir: Path, vocab_size: int) -> None:
    """The tokenizer of `model_dir` (tokenizer.json) as llama.cpp's tokenizer metadata, one token per row of
    the model's `vocab_size`-row embedding."""
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: no tokenizer.json; fix: save the tokenizer with save_pretrained")
    spec = json.loads(path.read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, added, unused = _vocabulary(spec, vocab_size)
    model = spec["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        texts, scores, types = _sentencepiece_tokens(tokens, added, unused, arch, tokenizer.unk_token_id)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(texts)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False).input_ids)[0]
        writer.add_add_space_prefix(first.startswith("\u2581"))
        writer.add_add_sep_token(False)
    elif model.get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        from gguf import TokenType

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_byte_level_pre(spec))
        writer.add_token_list(tokens)
        kinds = {True: TokenType.CONTROL, False: TokenType.USER_DEFINED}
        writer.add_token_types(
            [
                TokenType.UNUSED if i in unused else kinds[added[i]] if i in added else TokenType.NORMAL
                for i in range(len(tokens))
            ]
        )
        writer.add_token_merges(_merges(spec))
        writer.add_add_space_prefix(bool((spec.get("pre_tokenizer") or {}).get("add_prefix_space")))
    else:
        raise ExportError(
            f"{path}: GGUF export writes SentencePiece (BPE with byte fallback) and byte-level BPE tokenizers; "
            f"this one is {model.get('type')}; {_CONVERTER_FIX}"
        )
    for name, token_id in [
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ]:
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id)[0])
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id)[1])
