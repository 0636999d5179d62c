"""GGUF out: a fine-tuned model's weights written with the `gguf` package, for llama.cpp and Ollama.

A GGUF holds, besides the tensors, the architecture's hyper-parameters and the whole tokenizer (tokens,
scores, types, special ids). Fine-tuning changes neither. For a model that came from a GGUF (the packaged
Gemma 3 and SmolLM2, a Llama) they are copied from that file; for any other (a Hub or local Gemma 2, Gemma 3
or Llama directory) they are written from its config and tokenizer.json (models/gguf_meta.py). Each Hugging
Face tensor goes under the GGUF name transformers' own GGUF loader maps it from (`get_gguf_hf_weights_map`),
with the inverse of that loader's transforms (Gemma's norms are stored as 1 + w; Llama's q and k rows are in
llama.cpp's rotary order), in f16, bf16 or q8_0 (1-D tensors stay f32, as llama.cpp keeps them). The chat
template the model was trained with is added. The file is checked by loading it back (evidence/gguf_check).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tracetune.errors import ExportError

TYPES = ("f16", "bf16", "q8_0")


def _qtype(kind: str):
    from gguf import GGMLQuantizationType

    return {"f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}[kind]


def _stored(arch: str, gguf_name: str, weights: np.ndarray, kind: str, config) -> np.ndarray:
    """A tensor as the file stores it: in llama.cpp's layout, f32 where 1-D, else f16, bf16 or q8_0."""
    from gguf import quants

    weights = _to_gguf_layout(arch, gguf_name, weights, config)
    if weights.ndim == 1:
        return weights.astype(np.float32)
    return quants.quantize(weights.astype(np.float32), _qtype(kind))


# Fields that describe the file rather than the model: written anew.
_OWN_FIELDS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def source_gguf(model_source: str) -> Path | None:
    """The GGUF a run's base model came from, whose metadata and tokenizer an export copies; None when the
    model came from a Hugging Face directory (its metadata is then written from that directory)."""
    from tracetune.models.sources import PACKAGED

    kind, _, name = model_source.partition(":")
    if kind == "packaged" and name in PACKAGED:
        return Path(PACKAGED[name].locate_gguf())
    return None


def _to_gguf_layout(arch: str, gguf_name: str, weights: np.ndarray, config) -> np.ndarray:
    """The inverse of transformers' GGUF tensor processors for the architectures exported here."""
    if arch in ("gemma", "gemma2", "gemma3") and "norm.weight" in gguf_name:
        return weights + 1
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
        dim = weights.shape[0] // heads // 2
        return weights.reshape(heads, 2, dim, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
    return weights


def _copy_metadata(reader, writer, chat_template: str | None) -> None:
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith(_OWN_FIELDS) or key == "tokenizer.chat_template":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    if chat_template:
        writer.add_chat_template(chat_template)


def _tensor_names(model, template) -> dict[str, str]:
    """GGUF name -> Hugging Face name of every tensor to write: the template's, or else every mapped tensor
    but a tied output matrix (llama.cpp reads the embedding for it)."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    by_gguf = get_gguf_hf_weights_map(model, TensorProcessor())
    if template is None:
        tied = model.config.get_text_config().tie_word_embeddings
        return {g: hf for g, hf in by_gguf.items() if not (tied and g == "output.weight")}
    missing = [t.name for t in template.tensors if t.name not in by_gguf]
    if missing:
        raise ExportError(f"no Hugging Face tensor for the GGUF tensors {missing[:5]} of the base model's GGUF")
    return {t.name: by_gguf[t.name] for t in template.tensors}


def export_gguf(model_dir: Path, out: Path, kind: str, template: Path | None = None) -> dict:
    """Write `out` from the Hugging Face model in `model_dir`, with `template`'s metadata (the GGUF the base
    model came from) or, without one, metadata written from the directory; returns what was written."""
    import torch
    from gguf import GGUFReader, GGUFWriter, LlamaFileType
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetune.models.gguf_meta import gguf_architecture, write_hparams, write_tokenizer

    ftype = {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
    reader = GGUFReader(str(template)) if template is not None else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    arch = gguf_architecture(model.config)
    state = model.state_dict()
    by_gguf = _tensor_names(model, reader)
    chat_template = AutoTokenizer.from_pretrained(model_dir).chat_template
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".staging")
    writer = GGUFWriter(str(staging), arch)
    if reader is not None:
        _copy_metadata(reader, writer, chat_template)
    else:
        write_hparams(writer, arch, model.config)
        write_tokenizer(writer, arch, model_dir, model.get_input_embeddings().weight.shape[0])
        if chat_template:
            writer.add_chat_template(chat_template)
    writer.add_file_type(int(ftype[kind]))
    writer.add_quantization_version(2)
    for name in by_gguf:
        data = _stored(arch, name, state[by_gguf[name]].detach().numpy(), kind, model.config)
        writer.add_tensor(name, data, raw_dtype=None if data.dtype == np.float32 else _qtype(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.rename(out)
    return {
        "file": out.name,
        "type": kind,
        "num_tensors": len(by_gguf),
        "bytes": out.stat().st_size,
        "architecture": arch,
        "metadata": f"copied from {template.name}" if template is not None else f"written from {model_dir.name}",
    }


def round_as_exported(model, kind: str, template: Path | None = None) -> None:
    """Replace, in place, every weight an export of `model` at `kind` writes with what a reader of that file gets
    back (stored as `export_gguf` stores it, then dequantized and transformed by transformers' own GGUF loader
    code): the trained model at the file's precision, so that a correct file answers exactly as it does."""
    import torch
    from gguf import GGMLQuantizationType, GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from tracetune.models.gguf_meta import gguf_architecture

    arch = gguf_architecture(model.config)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.get_text_config().to_dict())
    state = model.state_dict()
    by_gguf = _tensor_names(model, GGUFReader(str(template)) if template is not None else None)
    with torch.no_grad():
        for name, hf_name in by_gguf.items():
            target = state[hf_name]
            data = _stored(arch, name, target.float().numpy(), kind, model.config)
            back = dequantize(data, GGMLQuantizationType.F32 if data.dtype == np.float32 else _qtype(kind))
            back = processor.process(weights=back, name=name).weights
            target.copy_(torch.from_numpy(np.ascontiguousarray(back)).reshape(target.shape))


def ollama_modelfile(gguf_name: str, chat_template: str | None, user_turn: str = "{{ .Prompt }}") -> str:
    """An Ollama Modelfile for the exported file: its turn template and stop tokens (Gemma or ChatML). The
    user turn is `user_turn` around Ollama's `{{ .Prompt }}`: the model answers best to the user message it
    was trained and evaluated on (the prompt, then the run's instruction)."""
    if chat_template and "<start_of_turn>" in chat_template:
        template = f"<start_of_turn>user\n{user_turn}<end_of_turn>\n<start_of_turn>model\n"
        stops = ["<end_of_turn>"]
    else:
        template = f"<|im_start|>user\n{user_turn}<|im_end|>\n<|im_start|>assistant\n"
        stops = ["<|im_end|>"]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""', *(f'PARAMETER stop "{s}"' for s in stops)]
    return "\n".join([*lines, "PARAMETER temperature 0", ""])
