from pathlib import Path

import pytest

from tests.conftest import REPO
from tracetune.config import Config, dump_config, explain, load_config
from tracetune.errors import ConfigError

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_every_shipped_config_validates():
    assert {p.name for p in SHIPPED} >= {"quickstart.yaml", "gemma2b_gpu.yaml", "tiny_test.yaml"}
    for path in SHIPPED:
        assert isinstance(load_config(path), Config), path


def test_gemma2b_config_matches_the_old_run():
    cfg = load_config(REPO / "configs" / "gemma2b_gpu.yaml")
    t = cfg.train
    assert cfg.model.source == "google/gemma-2b"
    assert (t.device, t.precision, t.batch_size, t.grad_accum_steps) == ("cuda", "bf16-autocast", 1, 4)
    assert (t.num_epochs, t.lr, t.weight_decay, t.optimizer) == (3, 2e-5, 0.01, "adafactor")
    assert (t.save_every_steps, t.log_every_steps, cfg.data.max_seq_length) == (100, 10, 128)


def test_unknown_keys_get_a_did_you_mean_hint_and_the_yaml_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  num_epoch: 3\nmodle:\n  source: tiny:gemma3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert any(f"{path}:3: train.num_epoch: unknown key; did you mean 'num_epochs'?" in p for p in problems)
    assert any(f"{path}:4: modle: unknown key; did you mean 'model'?" in p for p in problems)


def test_all_problems_are_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n  lr: -1\n  batch_size: two\n  precision: fp8\ndata:\n  train_file: nowhere.jsonl\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4, text
    for needle in ("train.lr", "train.batch_size", "train.precision", "data.train_file: file not found"):
        assert needle in text
    assert f"{path}:2: train.lr" in text


def test_dotted_overrides_apply_and_are_typed():
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        ["train.num_epochs=3", "model.source=packaged:smollm2-135m", "train.lr=1e-4"],
    )
    assert cfg.train.num_epochs == 3 and cfg.model.source == "packaged:smollm2-135m" and cfg.train.lr == 1e-4


def test_bad_override_is_reported():
    with pytest.raises(ConfigError, match="train.lrr: unknown key; did you mean 'lr'"):
        load_config(REPO / "configs" / "quickstart.yaml", ["train.lrr=3"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(REPO / "configs" / "quickstart.yaml", ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["seed=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path) == cfg
    assert "lora:" in path.read_text() and "probe_atol" in path.read_text()  # defaults are filled in


def _leaf_fields(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaf_fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_explain_describes_every_field():
    lines = explain()
    leaves = list(_leaf_fields(Config))
    assert len(leaves) > 40
    for dotted, field in leaves:
        assert field.description, dotted
        assert sum(line.strip().startswith(f"{dotted} (") for line in lines) == 1, dotted


def test_unknown_model_source_is_rejected():
    with pytest.raises(ConfigError, match="unknown model source"):
        load_config(None, ["model.source=not a model"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Path("nope.yaml"))


@pytest.mark.parametrize(("native", "train", "evaluation"), [(True, "bf16-autocast", "bf16"), (False, "fp32", "fp32")])
def test_auto_precision_is_chosen_by_the_hardware_when_the_config_loads(monkeypatch, native, train, evaluation):
    from tracetune import dist

    monkeypatch.setattr(dist, "native_bf16", lambda device: native)
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert (cfg.train.precision, cfg.eval.precision) == (train, evaluation)
    pinned = load_config(REPO / "configs" / "quickstart.yaml", ["train.precision=fp32", "eval.precision=bf16"])
    assert (pinned.train.precision, pinned.eval.precision) == ("fp32", "bf16")
