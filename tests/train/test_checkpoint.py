import pytest

from tracetune.models.checkpoints import committed_checkpoints, latest_good_checkpoint, verify_checkpoint
from tracetune.models.sources import load_model, load_tokenizer
from tracetune.train import checkpoint
from tracetune.train.checkpoint import CheckpointError, save_checkpoint


@pytest.fixture
def saved(tmp_path):
    tokenizer = load_tokenizer("tiny:gemma3")
    model = load_model("tiny:gemma3", tokenizer, 0)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(root, step, model, {"o": step}, {"step": step}, "seed: 0\n", {"argmax": []}, keep_last=3)
    return root, model


def test_truncated_flipped_or_uncommitted_checkpoints_are_never_loaded(saved):
    root, _ = saved
    step3, step2 = root / "step-000003", root / "step-000002"
    weights = step3 / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert latest_good_checkpoint(root) == step2
    assert verify_checkpoint(step3) == ["step-000003/model/model.safetensors: sha256 mismatch (altered or truncated)"]
    data = bytearray((step2 / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit
    (step2 / "optimizer.pt").write_bytes(bytes(data))
    assert latest_good_checkpoint(root) == root / "step-000001"
    assert "step-000002/optimizer.pt" in verify_checkpoint(step2)[0]
    (root / "step-000001" / "COMMITTED").unlink()
    assert latest_good_checkpoint(root) is None
    assert verify_checkpoint(root / "step-000001") == ["step-000001: no COMMITTED marker (incomplete write)"]


def test_keep_last_n_prunes_only_after_commit(saved):
    root, model = saved
    save_checkpoint(root, 4, model, {}, {}, "", {}, keep_last=2)
    assert [p.name for p in committed_checkpoints(root)] == ["step-000003", "step-000004"]


def test_failed_save_removes_staging_and_keeps_the_previous(saved, monkeypatch):
    root, model = saved

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def no_permission(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model, "save_pretrained", disk_full)
    with pytest.raises(CheckpointError, match="could not write checkpoint step-000009: .*No space left.*intact"):
        save_checkpoint(root, 9, model, {}, {}, "", {}, keep_last=1)
    assert not list(root.glob("*.staging"))
    assert latest_good_checkpoint(root) == root / "step-000003"
    assert [p.name for p in committed_checkpoints(root)] == ["step-000001", "step-000002", "step-000003"]
    monkeypatch.setattr(model, "save_pretrained", no_permission)
    with pytest.raises(CheckpointError, match="Permission denied"):
        save_checkpoint(root, 10, model, {}, {}, "", {}, keep_last=1)
    assert latest_good_checkpoint(root) == root / "step-000003" and not list(root.glob("*.staging"))


def test_torch_save_failing_on_a_full_disk_is_reported_with_the_free_space(saved, monkeypatch):
    """torch.save's zip writer reports a full disk as a RuntimeError, not an OSError (seen in a real run)."""
    root, model = saved

    def zip_writer_out_of_space(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 55424 vs 55316")

    monkeypatch.setattr(checkpoint.torch, "save", zip_writer_out_of_space)
    match = r"could not write checkpoint step-000011: .*unexpected pos.* GB free on .*; earlier checkpoints are intact"
    with pytest.raises(CheckpointError, match=match):
        save_checkpoint(root, 11, model, {}, {}, "", {}, keep_last=1)
    assert latest_good_checkpoint(root) == root / "step-000003" and not list(root.glob("*.staging"))
