"""`tracetune run ... export.gguf=f16` and `tracetune export RUN --gguf` on a model from a Hugging Face
directory (a tiny Gemma 2 with a SentencePiece tokenizer): the file, its Modelfile, the check against the
trained model and its gate, the manifest, and verify."""

import json

import pytest

from tests.conftest import tiny_run_args
from tests.hf_models import tiny_model_dir
from tracetune.cli import main
from tracetune.eval.llama_cpp import is_available


def test_a_run_exports_and_checks_its_gguf_then_exports_again_at_q8_0(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "gemma2")
    args = tiny_run_args(tmp_path / "runs", "output.run_name=r", f"model.source={model_dir}", "export.gguf=f16")
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "r"
    export = run_dir / "export"
    check = json.loads((export / "gguf_check.json").read_text())
    assert check["architecture"] == "gemma2" and check["metadata"] == "written from final_model"
    assert check["num_items"] == 8 and check["passed"] and check["identical_answer_share"] >= 0.98
    # Like with like: the file's logits are the trained model's rounded to f16 (only float32 metadata differs).
    assert check["logit_relative_error"] <= 1e-5 and check["identical_completion_share"] == 1.0
    modelfile = (export / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\n") and "{{ .Prompt }}\n\nThink step by step" in modelfile
    llama = check["llama_cpp"]
    if is_available():  # the file under llama.cpp: its own tokenizer, greedy decoding, detokenizer
        assert llama["ran"] and llama["identical_prompt_tokens_share"] == 1.0 and llama["passed"], llama
        assert len((export / "eval-f16-llama-cpp" / "predictions.jsonl").read_text().splitlines()) == 8
    else:
        assert not llama["ran"] and "pip install llama-cpp-python" in llama["reason"]
    assert len((export / "eval-f16" / "predictions.jsonl").read_text().splitlines()) == 8
    manifest = (run_dir / "MANIFEST.sha256").read_text()
    gates = {g["name"]: g for g in json.loads((run_dir / "gates.json").read_text())["gates"]}
    assert gates["gguf_export_matches"]["passed"]
    assert "export/model-f16.gguf" in manifest and "export/gguf_check.json" in manifest
    assert main(["verify", str(run_dir)]) == 0

    assert main(["export", str(run_dir), "--gguf", "--type", "q8_0"]) in (0, 3)
    q8 = json.loads((export / "gguf_check.json").read_text())
    assert q8["type"] == "q8_0" and q8["gate"].endswith("and 0 within the accuracy difference's 95% CI")
    assert q8["logit_relative_error"] <= 1e-5  # q8_0's reference is rounded to q8_0 too
    assert (export / "model-q8_0.gguf").stat().st_size < (export / "model-f16.gguf").stat().st_size
    assert json.loads((export / "eval-f16" / "gguf_check.json").read_text()) == check  # the f16 check is kept
    assert json.loads((export / "eval-q8_0" / "gguf_check.json").read_text()) == q8
    assert main(["verify", str(run_dir)]) == 0


def test_exporting_a_model_gguf_cannot_hold_exits_2_and_names_the_fix(tiny_run_dir, capsys):
    assert main(["export", str(tiny_run_dir), "--gguf"]) == 2  # tiny:gemma3's character tokenizer
    assert "convert_hf_to_gguf.py" in capsys.readouterr().err
    assert not (tiny_run_dir / "export" / "model-f16.gguf").exists()


@pytest.mark.slow
def test_a_file_with_one_tensor_corrupted_fails_its_check(tmp_path, monkeypatch, capsys):
    """An export whose one tensor is written wrong (here: its columns reversed after writing, as a transposed or
    mis-permuted tensor would be) must fail the check, whatever the tiny model's answers look like."""
    from gguf import GGUFReader

    from tracetune.models import export as export_module

    model_dir = tiny_model_dir(tmp_path, "gemma2")
    assert main(tiny_run_args(tmp_path / "runs", "output.run_name=r", f"model.source={model_dir}")) == 0
    run_dir = tmp_path / "runs" / "r"
    write = export_module.export_gguf

    def corrupted(model_dir, out, kind, template=None):
        info = write(model_dir, out, kind, template)
        tensor = next(t for t in GGUFReader(str(out), "r+").tensors if t.name == "blk.0.ffn_down.weight")
        tensor.data[...] = tensor.data[:, ::-1].copy()
        return info

    monkeypatch.setattr(export_module, "export_gguf", corrupted)
    assert main(["export", str(run_dir), "--gguf", "--type", "f16"]) == 3
    check = json.loads((run_dir / "export" / "gguf_check.json").read_text())
    assert not check["passed"] and check["logit_relative_error"] > 1e-3
    assert "fails (export/gguf_check.json)" in capsys.readouterr().err
