"""The export stage (`tracetune export`, and `run` with export.gguf): the run's model written as GGUF, then
checked: loaded back with its own tokenizer and chat template, evaluated on the run's
eval set with the evaluation's code, and compared item by item with the trained model rounded exactly as the
file stores it (export/gguf_check.json). The users of other tools' GGUF exports most often find the file
answers worse than the model they trained; here a gate says whether it does.

Like is compared with like: the reference is the trained model whose weights went through the file's own
rounding (f16, bf16 or q8_0, then transformers' GGUF loader), evaluated at the same precision, so a faithful
file gives the reference's answers on every CPU and at every `eval.precision` (an f16 file evaluated in bf16 is
rounded twice; so is its reference), and a file whose tensors, names, layout or tokenizer are wrong does not.
What the file's rounding costs is reported against the trained model itself (eval/final), and for q8_0 gated.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tracetune.layout import EvalDir, RunLayout, write_json

log = logging.getLogger("tracetune")


MIN_IDENTICAL = 0.98
MAX_LOGIT_ERROR = 1e-3  # relative; a faithful file's logits equal the reference's up to its metadata's float32s
LOGIT_PROMPTS = 8


def logit_error(reference, model, tokenizer, prompts: list[str]) -> float:
    """The largest difference between two models' next-token logits on the same token ids, relative to the
    reference's largest logit."""
    import torch

    from tracetune.eval.generate import encode

    encoded = encode(tokenizer, prompts, "cpu")
    with torch.inference_mode():
        expected, actual = (m(**encoded, logits_to_keep=1).logits.float() for m in (reference, model))
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def gguf_check(reference_rows: list[dict], gguf_rows: list[dict], kind: str, paired: dict, error: float | None) -> dict:
    """How the exported file answers against the reference (the trained model rounded as the file stores it),
    item by item, and the gate: logits within MAX_LOGIT_ERROR of the reference's (`error`, where compared) and 98%
    identical extracted answers; for q8_0, whose rounding is coarse, also an accuracy difference to the trained
    model (`paired`: eval/final against the file) whose paired interval holds zero."""
    reference = {r["id"]: r for r in reference_rows}
    shared = [r for r in gguf_rows if r["id"] in reference]
    same_answer = sum(r["extracted_answer"] == reference[r["id"]]["extracted_answer"] for r in shared)
    same_text = sum(r["completion"] == reference[r["id"]]["completion"] for r in shared)
    low, high = paired["difference_ci95"]
    result = {
        "num_items": len(shared),
        "compared_with": f"the trained model rounded as the {kind} file stores it",
        **({} if error is None else {"logit_relative_error": error}),
        "identical_answer_share": same_answer / max(len(shared), 1),
        "identical_completion_share": same_text / max(len(shared), 1),
        "accuracy_reference": sum(r["correct"] for r in reference.values()) / max(len(reference), 1),
        "accuracy_final_model": paired["base_accuracy"],
        "accuracy_gguf": paired["final_accuracy"],
        "accuracy_difference": paired["difference"],
        "accuracy_difference_ci95": [low, high],
    }
    gate, passed = f"identical_answer_share >= {MIN_IDENTICAL}", result["identical_answer_share"] >= MIN_IDENTICAL
    if error is not None:
        gate, passed = f"logit_relative_error <= {MAX_LOGIT_ERROR} and {gate}", passed and error <= MAX_LOGIT_ERROR
    if kind == "q8_0":
        gate, passed = gate + " and 0 within the accuracy difference's 95% CI", passed and low <= 0 <= high
    return result | {"gate": gate, "passed": passed}


def _llama_cpp_check(
    gguf: Path, model_dir: Path, items, cfg, eval_dir: Path, reference_rows, kind: str, run_dir
) -> dict:
    """The same check with llama.cpp running the file (eval/llama_cpp.py), where it is installed and the
    evaluation is greedy; otherwise why it did not run."""
    from transformers import AutoTokenizer

    from tracetune.eval.llama_cpp import is_available, llama_cpp_predictions
    from tracetune.eval.scoring import compare_predictions, write_scores
    from tracetune.layout import read_predictions

    if not is_available():
        return {"ran": False, "reason": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    if cfg.eval.do_sample:
        return {"ran": False, "reason": "the evaluation samples; llama.cpp is compared on greedy answers only"}
    log.info("evaluating %s under llama.cpp", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the trained tokenizer: its ids are the reference
    llama_cpp_predictions(gguf, tokenizer, items, cfg.eval, cfg.data.instruction, eval_dir)
    write_scores(eval_dir, items, f"{gguf.name} under llama.cpp")
    paired = compare_predictions(RunLayout(run_dir).eval().path, eval_dir, cfg.seed)
    rows = read_predictions(EvalDir(eval_dir).predictions)
    same_prompt = sum(r["prompt_tokens_match"] for r in rows) / max(len(rows), 1)
    check = gguf_check(reference_rows, rows, kind, paired, None)  # llama.cpp's logits are its own kernels'
    return {"ran": True, "identical_prompt_tokens_share": same_prompt, **check}


def _llama_cpp_dir(files: RunLayout, kind: str) -> EvalDir:
    return EvalDir(files.export / f"{files.export_eval(kind).path.name}-llama-cpp")


def _evaluate(model, tokenizer, items, cfg, out_dir: Path, name: str) -> list[dict]:
    """`model` evaluated on `items` into out_dir as the run evaluates; its prediction rows."""
    from tracetune.eval.evaluate import generate_predictions
    from tracetune.eval.scoring import write_scores
    from tracetune.layout import read_predictions

    generate_predictions(model, tokenizer, items, cfg.eval, cfg.data.instruction, out_dir, cfg.seed)
    write_scores(out_dir, items, name)
    return read_predictions(EvalDir(out_dir).predictions)


def export_and_check(run_dir: Path, kind: str) -> dict:
    """export/model-<kind>.gguf and its Ollama Modelfile from the run's final model, then the file loaded back
    (its own tokenizer and chat template) and evaluated on the run's eval set (export/eval-<kind>/) against the
    trained model rounded as the file stores it (export/eval-<kind>-reference/), and again under llama.cpp where
    it is installed (export/eval-<kind>-llama-cpp/):
    export/gguf_check.json (the latest export's, which the gate reads; each type's stays in its eval-<kind>/),
    which passes when every runtime that ran passes. Returns the check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetune.config import load_config
    from tracetune.data.render import render_prompt, user_message
    from tracetune.data.traces import load_eval_items
    from tracetune.eval.scoring import compare_predictions
    from tracetune.models.export import export_gguf, ollama_modelfile, round_as_exported, source_gguf

    files = RunLayout(run_dir)
    cfg = load_config(files.config)
    out_dir, name = files.export, files.gguf(kind).name
    model_dir = files.run_model
    log.info("exporting %s to %s", model_dir, files.gguf(kind))
    info = export_gguf(model_dir, files.gguf(kind), kind, source_gguf(cfg.model.source))
    tokenizer = AutoTokenizer.from_pretrained(out_dir, gguf_file=name)
    user_turn = user_message("{{ .Prompt }}", cfg.data.instruction)
    files.modelfile.write_text(ollama_modelfile(name, tokenizer.chat_template, user_turn), encoding="utf-8")
    check = dict(info)
    if cfg.eval.eval_file is not None and files.eval().predictions.is_file():
        for stale in (files.export_eval(kind, True), files.export_eval(kind), _llama_cpp_dir(files, kind)):
            shutil.rmtree(stale.path, ignore_errors=True)  # an earlier file's
        items = load_eval_items(cfg.eval.eval_file).records[: cfg.eval.max_items]
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        round_as_exported(reference, kind, source_gguf(cfg.model.source))
        model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=name, dtype=torch.float32)
        dtype = torch.bfloat16 if cfg.eval.precision == "bf16" else torch.float32
        reference.to(dtype), model.to(dtype)
        trained_tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = [render_prompt(trained_tokenizer, i.prompt, cfg.data.instruction) for i in items[:LOGIT_PROMPTS]]
        error = logit_error(reference, model, trained_tokenizer, prompts)
        reference_rows = _evaluate(
            reference, trained_tokenizer, items, cfg, files.export_eval(kind, reference=True).path,
            f"{model_dir.name} rounded as {name}",
        )  # fmt: skip
        del reference
        eval_dir = files.export_eval(kind).path
        rows = _evaluate(model, tokenizer, items, cfg, eval_dir, name)
        paired = compare_predictions(files.eval().path, eval_dir, cfg.seed)
        check |= gguf_check(reference_rows, rows, kind, paired, error)
        llama = _llama_cpp_check(
            files.gguf(kind), model_dir, items, cfg, _llama_cpp_dir(files, kind).path, reference_rows, kind, run_dir
        )
        check["llama_cpp"] = llama
        if llama["ran"]:
            check["gate"] += ", under transformers and under llama.cpp"
            check["passed"] = check["passed"] and llama["passed"]
        write_json(EvalDir(eval_dir).gguf_check, check)  # kept when another type is exported after this one
    write_json(files.gguf_check, check)
    return check
