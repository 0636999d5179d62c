"""Tiny random models with real kinds of tokenizer, trained here on the traces in a second: a Gemma-style
SentencePiece BPE (as a Hub directory ships it, tokenizer.model) and a SmolLM-style byte-level BPE. Unlike the
character tokenizer of `tiny:` sources, GGUF can hold both, so they stand for a Hub model in export tests."""

import json
from pathlib import Path

from tests.conftest import REPO
from tracetune.chat import CHATML_TEMPLATE, GEMMA_CHAT_TEMPLATE


def _corpus(tmp_path) -> Path:
    lines = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text().splitlines()[:300]]
    text = "\n".join(f"{r['prompt']}\n" + "\n".join(s["content"] for s in r["steps"]) for r in lines)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    return tmp_path / "corpus.txt"


def _sentencepiece_tokenizer(tmp_path):
    """A Gemma-style tokenizer as a Hub directory ships it (tokenizer.model), trained here on the traces."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    source = tmp_path / "sentencepiece"
    source.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(_corpus(tmp_path)),
        model_prefix=str(source / "tokenizer"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        **dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>"),
        control_symbols=["<mask>"],
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2,
    )
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "chat_template": GEMMA_CHAT_TEMPLATE}
    (source / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return AutoTokenizer.from_pretrained(source)


def _byte_level_tokenizer(tmp_path):
    """A SmolLM-style byte-level BPE tokenizer (digits split one by one), trained here on the traces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train([str(_corpus(tmp_path))], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=specials[1], eos_token=specials[2], pad_token=specials[0]
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


TINY_EXPORTABLE = {  # transformers' GGUF loader reads no query_pre_attn_scalar: Gemma's stays at its default, 256
    "gemma2": (_sentencepiece_tokenizer, {"head_dim": 256, "query_pre_attn_scalar": 256}),
    "gemma3": (_sentencepiece_tokenizer, {"head_dim": 256, "query_pre_attn_scalar": 256}),
    "llama": (_byte_level_tokenizer, {"tie_word_embeddings": False}),
}


def tiny_model_dir(tmp_path: Path, arch: str, extra_rows: int = 0) -> Path:
    """A saved tiny random model of `arch` with a tokenizer GGUF can hold, as a Hugging Face directory; its
    embedding has `extra_rows` rows no token uses (as models padded to a multiple of 64 have)."""
    from tracetune.models.sources import tiny_model

    build_tokenizer, overrides = TINY_EXPORTABLE[arch]
    tokenizer = build_tokenizer(tmp_path)
    model_dir = tmp_path / "final_model"
    overrides = {**overrides, "vocab_size": len(tokenizer) + extra_rows}
    tiny_model(arch, tokenizer, seed=0, **overrides).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir
