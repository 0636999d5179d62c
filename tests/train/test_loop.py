import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tracetune.data.batching import collate
from tracetune.lifecycle import new_run_dir
from tracetune.pipeline import load_for_training, load_inputs
from tracetune.train.loop import fit
from tracetune.train.step import build_state, train_step

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_losses.json"


def run_fit(cfg):
    inputs = load_inputs(cfg)
    tokenizer, model, train, val, _ = load_for_training(cfg, inputs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_dir = new_run_dir(cfg)
    result = fit(cfg, run_dir, model, tokenizer, train, val)
    return run_dir, before, result


def losses(run_dir, split=None):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


def final_weights(run_dir):
    return load_file(run_dir / "final_model" / "model.safetensors")


def test_loss_falls_when_overfitting_a_small_set(tiny_cfg):
    cfg = tiny_cfg(
        "data.max_train_records=8",
        "data.val_fraction=0",
        "train.eval_every_steps=null",
        "train.max_steps=40",
        "train.lr=0.01",
    )
    run_dir, _, _ = run_fit(cfg)
    train = losses(run_dir)
    assert len(train) == 40
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]


def test_every_trainable_parameter_changes_in_full_fine_tuning(tiny_cfg):
    run_dir, before, _ = run_fit(tiny_cfg())
    after = final_weights(run_dir)
    for name, old in before.items():
        assert not torch.equal(after[name], old), f"{name} did not change"


def test_lora_trains_only_adapters_and_merges_exactly(tiny_cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tracetune.models.sources import load_model, load_tokenizer

    cfg = tiny_cfg("train.method=lora", "train.lora.r=4", "train.lr=0.01")
    run_dir, before, _ = run_fit(cfg)
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    merged = final_weights(run_dir)
    targets = set(cfg.train.lora.target_modules)
    for name, old in before.items():
        is_target = name.split(".")[-2] in targets
        assert torch.equal(merged[name], old) != is_target, name  # only adapter-targeted weights moved
    # The merged model's logits equal the base model with the adapter applied.
    tokenizer = load_tokenizer(cfg.model.source)
    base = load_model(cfg.model.source, tokenizer, cfg.seed)
    with_adapter = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(run_dir / "final_model").eval()
    ids = torch.tensor([tokenizer("What is 6 * 7?").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, with_adapter(ids).logits, rtol=1e-5, atol=1e-5)


def test_accumulation_equals_one_big_batch(tiny_cfg):
    common = ["data.max_train_records=8", "data.val_fraction=0", "train.eval_every_steps=null", "train.max_steps=1"]
    big, _, _ = run_fit(tiny_cfg(*common, "train.batch_size=8", "train.grad_accum_steps=1", "output.run_name=big"))
    acc, _, _ = run_fit(tiny_cfg(*common, "train.batch_size=2", "train.grad_accum_steps=4", "output.run_name=acc"))
    a, b = losses(big)[0], losses(acc)[0]
    assert a["num_loss_tokens"] == b["num_loss_tokens"]
    assert abs(a["loss"] - b["loss"]) < 1e-6
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-6 * max(1.0, a["grad_norm"])


def _one_step(cfg, micro_sizes: list[int]):
    """Fresh tiny model and state, then one real `train_step` over the first 8 examples split as given; returns
    (result, the gradients the optimizer stepped with, weights after the step, weights before)."""
    tokenizer, model, train, _, _ = load_for_training(cfg, load_inputs(cfg))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = build_state(cfg, model, torch.device("cpu"), total_steps=1)
    grads, optimizer_step = {}, state.optimizer.step

    def recording_step():
        grads.update({n: p.grad.clone() for n, p in state.model.named_parameters() if p.grad is not None})
        optimizer_step()

    state.optimizer.step = recording_step
    starts = [sum(micro_sizes[:k]) for k in range(len(micro_sizes))]
    micro = [collate(train[s : s + n], tokenizer.pad_token_id) for s, n in zip(starts, micro_sizes, strict=True)]
    result = train_step(state, micro, step=1)
    return result, grads, {n: p.detach().clone() for n, p in state.model.named_parameters()}, before


def test_the_step_over_micro_batches_equals_the_step_over_one_big_batch(tiny_cfg):
    cfg = tiny_cfg("data.max_train_records=8", "data.val_fraction=0", "train.eval_every_steps=null")
    one, grads_one, after, before = _one_step(cfg, [8])
    four, grads_four, _, _ = _one_step(cfg, [2, 2, 2, 2])
    assert one.num_loss_tokens == four.num_loss_tokens and one.finite and four.finite
    assert abs(one.loss_sum - four.loss_sum) < 1e-4 and abs(one.grad_norm - four.grad_norm) < 1e-5
    assert set(grads_one) == set(before)  # every parameter got a gradient (the tied one through TiedGradient)
    for name in grads_one:
        torch.testing.assert_close(grads_one[name], grads_four[name], rtol=0, atol=1e-6)
    assert all(not torch.equal(after[n], before[n]) for n in before)  # and the update reached it


def test_a_non_finite_step_applies_no_update(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("data.max_train_records=8", "data.val_fraction=0", "train.eval_every_steps=null")
    monkeypatch.setenv("TRACETUNE_NAN_AT_STEP", "1")
    result, _, after, before = _one_step(cfg, [4, 4])
    assert not result.finite and math.isnan(result.loss_sum)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_same_seed_gives_identical_losses_and_other_seed_differs(tiny_cfg):
    a, _, _ = run_fit(tiny_cfg("output.run_name=a"))
    b, _, _ = run_fit(tiny_cfg("output.run_name=b"))
    c, _, _ = run_fit(tiny_cfg("output.run_name=c", "seed=1"))
    assert [r["loss"] for r in losses(a)] == [r["loss"] for r in losses(b)]
    assert [r["loss"] for r in losses(a, "val")] == [r["loss"] for r in losses(b, "val")]
    assert [r["loss"] for r in losses(a)] != [r["loss"] for r in losses(c)]


def test_golden_losses(tiny_cfg):
    run_dir, _, _ = run_fit(tiny_cfg())
    got = {"train": [r["loss"] for r in losses(run_dir)], "val": [r["loss"] for r in losses(run_dir, "val")]}
    if os.environ.get("TRACETUNE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(got["train"]) == len(golden["train"]) == 8 and len(got["val"]) == len(golden["val"]) == 3
    for key in ("train", "val"):
        for step, (x, y) in enumerate(zip(got[key], golden[key], strict=True)):
            assert math.isclose(x, y, rel_tol=1e-5), (key, step, x, y)


def test_metrics_lines_carry_every_field(tiny_cfg):
    run_dir, _, result = run_fit(tiny_cfg("train.log_every_steps=3"))
    train = losses(run_dir)
    assert [r["step"] for r in train] == [3, 6, 8]  # every 3 steps and the last
    fields = {
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "num_loss_tokens",
        "num_tokens",
        "num_samples",
        "pad_fraction",
        "tokens_per_s",
        "samples_per_s",
        "elapsed_s",
        "peak_rss_mb",
    }
    assert all(set(r) == fields for r in train)
    val = losses(run_dir, "val")
    assert [r["step"] for r in val] == [0, 4, 8] and all(r["split"] == "val" for r in val)
    assert 0 <= train[0]["pad_fraction"] < 0.5 and train[-1]["epoch"] > 1
    assert result.num_steps == result.planned_steps == 8
    log = (run_dir / "logs" / "train.log").read_bytes() if (run_dir / "logs" / "train.log").exists() else b""
    assert b"\r\n" not in log


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-weights"])
def test_bf16_modes_train_on_cpu(tiny_cfg, precision):
    run_dir, _, _ = run_fit(tiny_cfg(f"train.precision={precision}", "train.max_steps=12", "train.lr=0.01"))
    train = losses(run_dir)
    assert all(math.isfinite(r["loss"]) for r in train) and train[-1]["loss"] < train[0]["loss"]


def test_adafactor_and_cosine_train(tiny_cfg):
    run_dir, _, _ = run_fit(
        tiny_cfg("train.optimizer=adafactor", "train.scheduler=cosine", "train.lr=0.01", "train.weight_decay=0.01")
    )
    train = losses(run_dir)
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_checkpoints_keep_last_n_and_are_committed(tiny_cfg):
    run_dir, _, _ = run_fit(tiny_cfg("train.save_every_steps=2", "train.keep_last_checkpoints=2"))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-000006", "step-000008"]
    for name in names:
        files = {p.name for p in (run_dir / "checkpoints" / name).iterdir()}
        assert files == {
            "model",
            "optimizer.pt",
            "trainer_state.pt",
            "config.yaml",
            "probe.json",
            "MANIFEST.json",
            "COMMITTED",
        }
    state = torch.load(run_dir / "checkpoints" / "step-000008" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 8 and set(state["rng"]) >= {"python", "torch"} and "epoch" in state["data"]


def test_new_run_dir_refuses_existing(tiny_cfg):
    from tracetune.errors import RunDirError

    cfg = tiny_cfg("output.run_name=same")
    new_run_dir(cfg)
    with pytest.raises(RunDirError, match="already exists"):
        new_run_dir(cfg)


@pytest.mark.slow
def test_compiled_layers_give_the_golden_losses(tiny_cfg):
    """torch.compile fuses each decoder layer's elementwise work; the losses must not move (about a minute
    of compilation on a CPU, hence slow)."""
    run_dir, _, _ = run_fit(tiny_cfg("train.compile=true"))
    golden = json.loads(GOLDEN.read_text())
    for x, y in zip([r["loss"] for r in losses(run_dir)], golden["train"], strict=True):
        assert math.isclose(x, y, rel_tol=1e-4), (x, y)
