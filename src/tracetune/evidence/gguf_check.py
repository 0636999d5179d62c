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


def export_and_check(run_dir: Path, kind: str) -> dict:
    """export/model-<kind>.gguf and its Ollama Modelfile from the run's final model, then the file loaded back
    (its own tokenizer and chat template) and evaluated on the run's eval set (export/eval/) against
    eval/final: export/gguf_check.json. Returns the check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetune.config import load_config
    from tracetune.data.traces import load_eval_items
    from tracetune.eval.evaluate import compare_predictions, generate_predictions, write_scores
    from tracetune.evidence.card import final_model_dir
    from tracetune.models.export import export_gguf, ollama_modelfile, source_gguf
    from tracetune.runfiles import read_predictions

    cfg = load_config(run_dir / "config.yaml")
    out_dir = run_dir / "export"
    name = f"model-{kind}.gguf"
    log.info("exporting %s to %s", final_model_dir(run_dir), out_dir / name)
    info = export_gguf(final_model_dir(run_dir), out_dir / name, kind, source_gguf(cfg.model.source))
    tokenizer = AutoTokenizer.from_pretrained(out_dir, gguf_file=name)
    (out_dir / "Modelfile").write_text(ollama_modelfile(name, tokenizer.chat_template), encoding="utf-8")
    check = dict(info)
    if cfg.eval.eval_file is not None and (run_dir / "eval" / "final" / "predictions.jsonl").is_file():
        model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=name, dtype=torch.float32)
        if cfg.eval.precision == "bf16":
            model.to(torch.bfloat16)
        items = load_eval_items(cfg.eval.eval_file).records[: cfg.eval.max_items]
        generate_predictions(model, tokenizer, items, cfg.eval, cfg.data.instruction, out_dir / "eval", cfg.seed)
        write_scores(out_dir / "eval", items, name)
        paired = compare_predictions(run_dir / "eval" / "final", out_dir / "eval", cfg.seed)
        final_rows = read_predictions(run_dir / "eval" / "final" / "predictions.jsonl")
        check |= gguf_check(final_rows, read_predictions(out_dir / "eval" / "predictions.jsonl"), kind, paired)
    write_json(out_dir / "gguf_check.json", check)
    return check
