"""The exported GGUF, checked: loaded back with its own tokenizer and chat template, evaluated on the run's
eval set with the evaluation's code, and compared item by item with the trained model (export/gguf_check.json).
The users of other tools' GGUF exports most often find the file answers worse than the model they trained;
here a gate says whether it does."""

from __future__ import annotations

import logging
from pathlib import Path

from tracetune.runfiles import write_json

log = logging.getLogger("tracetune")


def gguf_check(final_rows: list[dict], gguf_rows: list[dict], kind: str, paired: dict) -> dict:
    """How the exported file answers against the trained model, item by item, and the gate: f16 and bf16
    must give at least 98% identical extracted answers; q8_0's accuracy difference must be within its own
    paired interval of zero."""
    final = {r["id"]: r for r in final_rows}
    shared = [r for r in gguf_rows if r["id"] in final]
    same_answer = sum(r["extracted_answer"] == final[r["id"]]["extracted_answer"] for r in shared)
    same_text = sum(r["completion"] == final[r["id"]]["completion"] for r in shared)
    low, high = paired["difference_ci95"]
    result = {
        "num_items": len(shared),
        "identical_answer_share": same_answer / max(len(shared), 1),
        "identical_completion_share": same_text / max(len(shared), 1),
        "accuracy_final_model": paired["base_accuracy"],
        "accuracy_gguf": paired["final_accuracy"],
        "accuracy_difference": paired["difference"],
        "accuracy_difference_ci95": [low, high],
    }
    if kind in ("f16", "bf16"):
        result |= {"gate": "identical_answer_share >= 0.98", "passed": result["identical_answer_share"] >= 0.98}
    else:
        result |= {"gate": "0 within the accuracy difference's 95% CI", "passed": low <= 0 <= high}
    return result


def _llama_cpp_check(gguf: Path, model_dir: Path, items, cfg, eval_dir: Path, final_rows, kind: str, run_dir) -> dict:
    """The same check with llama.cpp running the file (eval/llama_cpp.py), where it is installed and the
    evaluation is greedy; otherwise why it did not run."""
    from transformers import AutoTokenizer

    from tracetune.eval.evaluate import compare_predictions, write_scores
    from tracetune.eval.llama_cpp import is_available, llama_cpp_predictions
    from tracetune.runfiles import read_predictions

    if not is_available():
        return {"ran": False, "reason": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    if cfg.eval.do_sample:
        return {"ran": False, "reason": "the evaluation samples; llama.cpp is compared on greedy answers only"}
    log.info("evaluating %s under llama.cpp", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the trained tokenizer: its ids are the reference
    llama_cpp_predictions(gguf, tokenizer, items, cfg.eval, cfg.data.instruction, eval_dir)
    write_scores(eval_dir, items, f"{gguf.name} under llama.cpp")
    paired = compare_predictions(run_dir / "eval" / "final", eval_dir, cfg.seed)
    rows = read_predictions(eval_dir / "predictions.jsonl")
    same_prompt = sum(r["prompt_tokens_match"] for r in rows) / max(len(rows), 1)
    return {"ran": True, "identical_prompt_tokens_share": same_prompt, **gguf_check(final_rows, rows, kind, paired)}


def export_and_check(run_dir: Path, kind: str) -> dict:
    """export/model-<kind>.gguf and its Ollama Modelfile from the run's final model, then the file loaded back
    (its own tokenizer and chat template) and evaluated on the run's eval set (export/eval-<kind>/) against
    eval/final, and again under llama.cpp where it is installed (export/eval-<kind>-llama-cpp/):
    export/gguf_check.json (the latest export's, which the gate reads; each type's stays in its eval-<kind>/),
    which passes when every runtime that ran passes. Returns the check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetune.config import load_config
    from tracetune.data.render import user_message
    from tracetune.data.traces import load_eval_items
    from tracetune.eval.evaluate import compare_predictions, generate_predictions, write_scores
    from tracetune.evidence.card import final_model_dir
    from tracetune.models.export import export_gguf, ollama_modelfile, source_gguf
    from tracetune.runfiles import read_predictions

    cfg = load_config(run_dir / "config.yaml")
    out_dir = run_dir / "export"
    name = f"model-{kind}.gguf"
    model_dir = final_model_dir(run_dir)
    log.info("exporting %s to %s", model_dir, out_dir / name)
    info = export_gguf(model_dir, out_dir / name, kind, source_gguf(cfg.model.source))
    tokenizer = AutoTokenizer.from_pretrained(out_dir, gguf_file=name)
    user_turn = user_message("{{ .Prompt }}", cfg.data.instruction)
    (out_dir / "Modelfile").write_text(ollama_modelfile(name, tokenizer.chat_template, user_turn), encoding="utf-8")
    check = dict(info)
    if cfg.eval.eval_file is not None and (run_dir / "eval" / "final" / "predictions.jsonl").is_file():
        model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=name, dtype=torch.float32)
        if cfg.eval.precision == "bf16":
            model.to(torch.bfloat16)
        items = load_eval_items(cfg.eval.eval_file).records[: cfg.eval.max_items]
        eval_dir = out_dir / f"eval-{kind}"
        generate_predictions(model, tokenizer, items, cfg.eval, cfg.data.instruction, eval_dir, cfg.seed)
        write_scores(eval_dir, items, name)
        paired = compare_predictions(run_dir / "eval" / "final", eval_dir, cfg.seed)
        final_rows = read_predictions(run_dir / "eval" / "final" / "predictions.jsonl")
        check |= gguf_check(final_rows, read_predictions(eval_dir / "predictions.jsonl"), kind, paired)
        llama = _llama_cpp_check(
            out_dir / name, model_dir, items, cfg, out_dir / f"eval-{kind}-llama-cpp", final_rows, kind, run_dir
        )
        check["llama_cpp"] = llama
        if llama["ran"]:
            check["gate"] += ", under transformers and under llama.cpp"
            check["passed"] = check["passed"] and llama["passed"]
        write_json(eval_dir / "gguf_check.json", check)  # kept when another type is exported after this one
    write_json(out_dir / "gguf_check.json", check)
    return check
