import torch

from tracetune.data.batching import IGNORE_INDEX, collate, plan_batches
from tracetune.data.render import Example
from tracetune.models.sources import load_model, load_tokenizer
from tracetune.train.loss import loss_sum


def test_plan_covers_every_example_once_and_is_seeded():
    lengths = [5, 50, 7, 33, 12, 9, 40, 41, 2, 18, 27]
    plan = plan_batches(lengths, 3, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert plan == plan_batches(lengths, 3, seed=0, epoch=0)
    assert plan != plan_batches(lengths, 3, seed=0, epoch=1)


def test_bucketing_reduces_padding():
    lengths = [10, 100] * 64
    plan = plan_batches(lengths, 4, seed=0, epoch=0)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    assert sum(lengths) / padded > 0.9


def test_collate_masks_prompt_and_padding():
    batch = collate([Example("a", (5, 6, 7, 8), 2), Example("b", (9, 10), 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 7, 8],
        [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX],
    ]


def test_no_cross_example_contamination():
    """An example's loss is the same alone and padded into a batch with a longer neighbour."""
    tokenizer = load_tokenizer("tiny:gemma3")
    model = load_model("tiny:gemma3", tokenizer, 0).eval()
    a = Example("a", tuple(tokenizer("What is 2 + 2? Answer: 4").input_ids), 10)
    b = Example(
        "b", tuple(tokenizer("A much longer neighbouring example with more tokens. Answer: 12345").input_ids), 20
    )
    with torch.no_grad():
        alone = [loss_sum(model, collate([e], tokenizer.pad_token_id))[0] for e in (a, b)]
        together, n = loss_sum(model, collate([a, b], tokenizer.pad_token_id))
    assert n == a.num_loss_tokens + b.num_loss_tokens  # every completion token is predicted once
    torch.testing.assert_close(together, alone[0] + alone[1], rtol=1e-5, atol=1e-5)
