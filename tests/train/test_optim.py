import pytest
import torch

from tracetune.config import TrainConfig
from tracetune.train.optim import MasterWeights, lr_lambda, param_groups


@pytest.mark.parametrize(
    "scheduler,expected",
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", [0.5, 1.0, 0.8536, 0.5, 0.1464]),
    ],
)
def test_warmup_then_decay(scheduler, expected):
    f = lr_lambda(TrainConfig(scheduler=scheduler, warmup_steps=1), total_steps=5)
    assert [round(f(s), 4) for s in range(5)] == expected


def test_weight_decay_skips_norms_and_biases():
    layer = torch.nn.Linear(3, 3)
    norm = torch.nn.LayerNorm(3)
    named = list(layer.named_parameters()) + list(norm.named_parameters())
    decay, no_decay = param_groups(named, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([3, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_master_weights_keep_fp32_precision():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master = MasterWeights([p])
    opt = torch.optim.SGD(master.master, lr=1e-4)
    for _ in range(10):
        p.grad = torch.ones_like(p)
        master.grads_to_master()
        opt.step()
        master.master_to_model()
    # bf16 alone cannot represent 1 - 1e-3; the fp32 master does.
    assert master.master[0].dtype == torch.float32 and master.master[0][0].item() == pytest.approx(1 - 1e-3, abs=1e-6)
