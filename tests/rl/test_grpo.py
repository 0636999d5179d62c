"""GRPO's step on the tiny model: the rewarded completion gains probability, the other loses it; groups with
one reward for all carry nothing; a clipped ratio stops the gradient; the policy loss's gradient is autograd's."""

import pytest
import torch

from tracetune.data.traces import EvalItem
from tracetune.eval.generate import Generation
from tracetune.eval.scoring import score_item
from tracetune.models.sources import load_model, load_tokenizer
from tracetune.rl.grpo import add_logprobs, learn, policy_batches, score_groups, stage_config, step_prompts
from tracetune.rl.rollout import Rollout
from tracetune.train.checkpoint import Progress
from tracetune.train.loss import PolicySettings, token_logprobs
from tracetune.train.step import build_state

ITEM = EvalItem("q1", "Jun buys 2 notebooks at $5 each. How many dollars?", "10")
RIGHT = "Reasoning:\n1. Cost: 2 * 5 = 10\nAnswer: 10"
WRONG = "Reasoning:\n1. Cost: 2 * 5 = 12\nAnswer: 12"


def _rollout(tokenizer, text: str, index: int) -> Rollout:
    ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
    prompt_ids = tuple(tokenizer("Q: " + ITEM.prompt + "\nA: ", add_special_tokens=False).input_ids)
    return Rollout(ITEM, index, prompt_ids, Generation(text, len(ids), "eos", ids), score_item(ITEM, text))


def _setup(tiny_cfg, *overrides):
    cfg = tiny_cfg("stages=[grpo]", "grpo.lr=0.01", "train.warmup_steps=0", "train.max_grad_norm=null", *overrides)
    tokenizer = load_tokenizer(cfg.model.source)
    model = load_model(cfg.model.source, tokenizer, cfg.seed)
    policy = PolicySettings(cfg.grpo.epsilon_low, cfg.grpo.epsilon_high, cfg.grpo.kl_coef)
    state = build_state(stage_config(cfg), model, torch.device("cpu"), 4, policy)
    return cfg, tokenizer, state, policy


def _sequence_logprobs(state, batches) -> list[float]:
    out = []
    for batch in batches:
        logp = token_logprobs(state.model, batch)
        out += [float(row.sum()) for row in logp]
    return out


def _batches(cfg, tokenizer, texts):
    groups = score_groups([[_rollout(tokenizer, t, n) for n, t in enumerate(texts)]], cfg)
    return groups, policy_batches(groups, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_a_step_raises_the_rewarded_completion_and_lowers_the_other(tiny_cfg):
    cfg, tokenizer, state, policy = _setup(tiny_cfg, "grpo.lr=1e-4")
    groups, batches = _batches(cfg, tokenizer, [RIGHT, WRONG])
    assert groups[0].rewards[0] > groups[0].rewards[1] and groups[0].advantages[0] > 0 > groups[0].advantages[1]
    before = _sequence_logprobs(state, batches)
    results, stats = learn(state, cfg, batches, Progress(), policy, None)
    after = _sequence_logprobs(state, batches)
    assert results[0].finite and stats["tokens"] > 0 and stats["clipped"] == 0 and stats["entropy"] > 0
    assert after[0] > before[0] and after[1] < before[1], (before, after)


def test_zero_variance_groups_contribute_nothing(tiny_cfg):
    cfg, tokenizer, state, policy = _setup(tiny_cfg)
    _, batches = _batches(cfg, tokenizer, [RIGHT, RIGHT.replace("Cost", "Total")])  # both fully rewarded
    assert batches == []
    cfg, tokenizer, state, policy = _setup(tiny_cfg, "grpo.drop_zero_variance_groups=false")
    _, batches = _batches(cfg, tokenizer, [RIGHT, RIGHT.replace("Cost", "Total")])
    assert batches and all(float(b["advantages"].abs().sum()) == 0 for b in batches)
    weights = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    results, _ = learn(state, cfg, batches, Progress(), policy, None)
    assert results[0].grad_norm == 0
    assert all(torch.equal(weights[n], p) for n, p in state.model.named_parameters())


def test_a_clipped_ratio_stops_the_gradient(tiny_cfg):
    cfg, tokenizer, state, policy = _setup(tiny_cfg)
    _, batches = _batches(cfg, tokenizer, [RIGHT, WRONG])
    add_logprobs(state, batches, "old_logprobs")
    for batch in batches:  # the sampling policy gave the rewarded sample e^-1 of today's probability: ratio e
        rewarded = batch["advantages"] > 0
        batch["old_logprobs"] = torch.where(rewarded, batch["old_logprobs"] - 1, batch["old_logprobs"] + 1)
    from tracetune.train.step import train_step

    result = train_step(state, batches, 1)
    stats = policy.reset()
    assert result.grad_norm == 0 and stats["clipped"] == stats["tokens"] > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_gradient_equals_autograd(tiny_cfg, temperature):
    """d/dtheta of sum_t -A_t * r_t over the step (r = exp(logp - old)), by autograd on full logits divided by
    the sampling temperature, against the chunked policy loss (mu > 1: old log-probs differ from today's,
    nothing clipped); the old log-probabilities are the tempered ones too."""
    cfg, tokenizer, state, policy = _setup(tiny_cfg, "grpo.epsilon_low=0.9", "grpo.epsilon_high=9")
    policy.temperature = temperature
    _, batches = _batches(cfg, tokenizer, [RIGHT, WRONG])
    add_logprobs(state, batches, "old_logprobs", temperature=temperature)
    batch = batches[0] | {"old_logprobs": batches[0]["old_logprobs"] - 0.05}
    model = state.model
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = (logits / temperature).log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(-1)
    assert torch.allclose((logp - 0.05)[mask], batch["old_logprobs"][:, 1:][mask], atol=1e-4)  # tempered, both
    ratio = (logp - batch["old_logprobs"][:, 1:]).exp()
    (-(ratio * batch["advantages"][:, 1:])[mask].sum()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    state.net(**batch).backward()
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else state.tied.grad if state.tied else None
        torch.testing.assert_close(grad, expected[name], rtol=1e-3, atol=5e-5, msg=name)  # fp32 sums in other orders


def test_step_prompts_cover_the_split_once_per_epoch():
    traces = list(range(10))
    seen = [t for step in range(5) for t in step_prompts(traces, step, 2, seed=0)]
    assert sorted(seen) == traces and seen == [t for step in range(5) for t in step_prompts(traces, step, 2, 0)]


@pytest.mark.parametrize("override", ["grpo.group_size=1", "grpo.reward.correct=-1", "rft.num_samples=0"])
def test_bad_rl_settings_are_config_errors_naming_the_field(tiny_cfg, override):
    from tracetune.errors import ConfigError

    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        tiny_cfg(override)


@pytest.mark.parametrize(
    ("mode", "trained", "truncated_reward"), [("mask", 1, 1.0), ("penalize", 2, 0.0), ("train", 2, 1.0)]
)
def test_truncated_completions_are_masked_penalized_or_trained(tiny_cfg, mode, trained, truncated_reward):
    """grpo.truncated: a completion cut off at the token limit is left out of the loss (mask, the default), earns
    0 (penalize), or is trained on as any other; `trained` counts the completions in the step's batches."""
    cfg, tokenizer, _, _ = _setup(tiny_cfg, f"grpo.truncated={mode}")
    cut = _rollout(tokenizer, RIGHT, 0)
    cut = Rollout(cut.item, 0, cut.prompt_ids, Generation(RIGHT, 9, "length", cut.generation.token_ids), cut.score)
    groups = score_groups([[cut, _rollout(tokenizer, WRONG, 1)]], cfg)
    assert groups[0].rewards[0] == truncated_reward
    batches = policy_batches(groups, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert sum(int(b["input_ids"].shape[0]) for b in batches) == (trained if truncated_reward else 0)


class _FixedSampler:
    """Samples each prompt's group as the prompt says: 'solved' all right, 'hard' all wrong, 'mixed' one of each."""

    def refresh(self):
        pass

    def sample(self, items, k, sampling, key):
        tokenizer = load_tokenizer("tiny:gemma3")
        texts = {"solved": [RIGHT] * k, "hard": [WRONG] * k, "mixed": [RIGHT] + [WRONG] * (k - 1)}
        return [[_rollout(tokenizer, t, n) for n, t in enumerate(texts[i.prompt])] for i in items]


@pytest.mark.parametrize("fill", [False, True])
def test_dynamic_sampling_draws_until_the_step_holds_informative_groups(tiny_cfg, fill):
    """grpo.fill_informative: extra seeded draws until prompts_per_step groups have rewards that differ (capped
    by max_fill_draws); without it a step keeps whatever its prompts gave."""
    from tracetune.data.traces import Trace
    from tracetune.rl.grpo import sample_step

    cfg = tiny_cfg("stages=[grpo]", "grpo.prompts_per_step=2", "grpo.group_size=2", f"grpo.fill_informative={fill}",
                   "grpo.max_fill_draws=40")  # fmt: skip
    train = [Trace(f"t{n}", kind, (), "10") for n, kind in enumerate(["solved", "hard"] * 6 + ["mixed"] * 2)]
    groups, draws = sample_step(_FixedSampler(), cfg, train, 0)
    informative = sum(not g.zero_variance for g in groups)
    again = sample_step(_FixedSampler(), cfg, train, 0)
    assert [g.rollouts[0].item.id for g in groups] == [g.rollouts[0].item.id for g in again[0]]  # seeded
    if fill:  # the step's own prompts held fewer than 2 informative groups; the draws found both
        assert informative == 2 and draws > 1 and len(groups) <= 2 * draws
    else:
        assert informative < 2 and draws == 1 and len(groups) == 2


def test_sft_anchor_adds_its_mean_cross_entropy_with_its_weight(tiny_cfg):
    """grpo.sft_coef: the step's loss (train_step divides by all its loss tokens) is the policy loss's mean per
    token plus sft_coef times the gold trace's mean cross-entropy, in value and gradient."""
    from tracetune.data.batching import collate
    from tracetune.data.render import Example
    from tracetune.rl.grpo import add_anchor
    from tracetune.train.loss import num_loss_tokens

    cfg, tokenizer, state, _ = _setup(tiny_cfg, "grpo.sft_coef=0.5")
    groups, batches = _batches(cfg, tokenizer, [RIGHT, WRONG])
    prompt = groups[0].rollouts[0].prompt_ids
    gold = Example(ITEM.id, prompt + tuple(tokenizer(RIGHT, add_special_tokens=False).input_ids), len(prompt))
    policy_only = [dict(b) | {"advantages": b["advantages"].clone()} for b in batches]
    add_anchor(batches, groups, {ITEM.id: gold}, cfg, tokenizer.pad_token_id)
    assert len(batches) == len(policy_only) + 1 and "loss_scale" in batches[-1]
    weight = next(p for n, p in state.model.named_parameters() if "q_proj" in n)

    def loss_and_grad(total):
        return total.detach(), torch.autograd.grad(total, weight)[0]

    step = loss_and_grad(sum(state.net(**b) for b in batches) / sum(num_loss_tokens(b) for b in batches))
    policy_mean = sum(state.net(**b) for b in policy_only) / sum(num_loss_tokens(b) for b in policy_only)
    anchor_mean = state.net(**collate([gold], tokenizer.pad_token_id)) / gold.num_loss_tokens
    expected = loss_and_grad(policy_mean + 0.5 * anchor_mean)
    assert torch.allclose(step[0], expected[0], atol=1e-5) and torch.allclose(step[1], expected[1], atol=1e-6)
