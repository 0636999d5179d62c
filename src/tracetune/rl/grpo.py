"""GRPO: sample a group of completions per prompt, reward them with the checkers, step on the group-relative
advantages through the one `train_step`.

Each step: the step's prompts (a seeded pass over the training split), `group_size` samples each from the
current weights (rl/rollout.py), their rewards (rl/rewards.py), advantages relative to their group, groups
whose rewards are all equal left out, then `num_iterations` optimizer steps on the policy loss
(train/loss.py: PolicyTerms). Everything goes to the stage directory: metrics.jsonl (a line per step, and
`"split": "heldout"` lines from the evaluation's own code), checkpoints/, final_model/ and training.json.
Under torchrun each rank samples every world-size-th prompt and all ranks then hold the whole step, so the
step's micro-batches and their normalisation are those of one process.
"""

from __future__ import annotations

import copy
import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tracetune import dist
from tracetune.config import Config
from tracetune.data.batching import collate
from tracetune.data.render import Example, end_of_turn_ids
from tracetune.data.traces import EvalItem, Trace
from tracetune.faults import STOP, crash_point
from tracetune.layout import TrainingDir
from tracetune.rl.rewards import TERMS, group_advantages, reward_terms, total_reward
from tracetune.rl.rollout import Rollout, Sampler, as_item, heldout
from tracetune.train.checkpoint import Progress
from tracetune.train.loop import (
    NonFiniteLossError,
    RunContext,
    after_step,
    append_on_main,
    finish_training,
    open_bar,
    restore,
)
from tracetune.train.loss import PolicySettings, token_logprobs
from tracetune.train.step import TrainState, autocast_context, build_state, to_device, train_step

log = logging.getLogger("tracetune")


def stage_config(cfg: Config) -> Config:
    """The config `build_state` and checkpoints see in the GRPO stage: its learning rate and method (full or
    LoRA), a constant schedule and one optimizer step per sampled batch and iteration."""
    g, staged = cfg.grpo, cfg.model_copy(deep=True)
    staged.train.lr, staged.train.scheduler, staged.train.method = g.lr, "constant", g.method
    staged.train.max_steps = g.num_steps * g.num_iterations
    staged.train.save_every_steps = g.save_every_steps
    return staged


def step_prompts(traces: list[Trace], step: int, per_step: int, seed: int) -> list[Trace]:
    """The prompts of sampling step `step` (from 0): consecutive slices of seeded per-epoch permutations."""
    orders: dict[int, list[int]] = {}  # an epoch's permutation, made once per call
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(position, len(traces))
        if epoch not in orders:
            orders[epoch] = list(range(len(traces)))
            random.Random(f"{seed}:grpo:{epoch}").shuffle(orders[epoch])
        out.append(traces[orders[epoch][index]])
    return out


@dataclass
class Group:
    """One prompt's samples with their reward terms, rewards and advantages."""

    rollouts: list[Rollout]
    terms: list[dict]
    rewards: list[float]
    advantages: list[float]

    @property
    def zero_variance(self) -> bool:
        return max(self.rewards) == min(self.rewards)


def score_groups(groups: list[list[Rollout]], cfg: Config) -> list[Group]:
    g = cfg.grpo
    out = []
    for rollouts in groups:
        terms = [reward_terms(r.score, r.generation.finish_reason) for r in rollouts]
        rewards = [total_reward(t, g.reward) for t in terms]
        if g.truncated == "penalize":
            rewards = [
                0.0 if r.generation.finish_reason == "length" else x for r, x in zip(rollouts, rewards, strict=True)
            ]
        out.append(Group(rollouts, terms, rewards, group_advantages(rewards, g.scale_rewards)))
    return out


def policy_batches(groups: list[Group], cfg: Config, end_id: int, pad_id: int) -> list[dict]:
    """The step's micro-batches (train.batch_size completions each): prompt + sampled tokens (+ the end of
    turn where the sample ended), loss on the sampled tokens, `advantages` per token with the configured
    normalisation folded in (train_step divides every step by its loss tokens)."""
    masked = cfg.grpo.truncated == "mask"  # a cut-off completion's tokens are left out of the loss
    rows = [
        (r, a)
        for group in groups
        for r, a in zip(group.rollouts, group.advantages, strict=True)
        if not (cfg.grpo.drop_zero_variance_groups and group.zero_variance)
        and not (masked and r.generation.finish_reason == "length")
    ]
    examples = []
    for r, _ in rows:
        ended = r.generation.finish_reason != "length"
        completion = r.generation.token_ids + ((end_id,) if ended else ())
        examples.append(Example(f"{r.item.id}:{r.index}", r.prompt_ids + completion, len(r.prompt_ids)))
    lengths = [e.num_loss_tokens for e in examples]
    step_tokens, n = sum(lengths), len(examples)
    norm = cfg.grpo.loss_normalization
    scales = [
        1.0
        if norm == "token"
        else step_tokens / (length * n if norm == "sequence" else cfg.grpo.sampling.max_new_tokens * n)
        for length in lengths
    ]
    size, batches = cfg.train.batch_size, []
    for start in range(0, len(examples), size):
        part = examples[start : start + size]
        batch = collate(part, pad_id)
        advantages = torch.zeros(batch["labels"].shape, dtype=torch.float32)
        for row, example in enumerate(part):
            _, advantage = rows[start + row]
            advantages[row, example.num_prompt_tokens : len(example.input_ids)] = advantage * scales[start + row]
        batches.append(batch | {"advantages": advantages})
    return batches


def add_anchor(batches: list[dict], groups: list[Group], gold: dict[str, Example], cfg: Config, pad_id: int) -> None:
    """GRPO's SFT anchor (grpo.sft_coef): the gold traces of the step's prompts appended as cross-entropy
    micro-batches, weighted so the step's loss is the policy loss's mean per token plus sft_coef times the
    anchor's mean per token (train_step divides the whole step by its loss tokens); a step whose groups were all
    left out trains on the anchor alone."""
    from tracetune.train.loss import num_loss_tokens

    examples = [gold[i] for i in dict.fromkeys(g.rollouts[0].item.id for g in groups) if i in gold]
    if not examples:
        return
    policy_tokens = sum(num_loss_tokens(b) for b in batches)
    anchor_tokens = sum(e.num_loss_tokens for e in examples)
    total = policy_tokens + anchor_tokens
    for batch in batches:
        batch["advantages"] *= total / policy_tokens
    size = cfg.train.batch_size
    for start in range(0, len(examples), size):
        batch = collate(examples[start : start + size], pad_id)
        batches.append(batch | {"loss_scale": torch.tensor(cfg.grpo.sft_coef * total / anchor_tokens)})


@torch.no_grad()
def add_logprobs(state: TrainState, batches: list[dict], key: str, model=None, temperature: float = 1.0) -> None:
    """Each micro-batch's per-token log-probabilities under `model` (the trained one by default) as `key`, of
    softmax(logits / temperature): the distribution the samples were drawn from."""
    model = model or state.model
    for batch in batches:
        on_device = to_device(batch, state.device)
        with autocast_context(state.autocast, state.device):
            batch[key] = token_logprobs(model, on_device, temperature).cpu()


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values)} if values else {"mean": None}


def step_record(groups: list[Group], policy_stats: dict, results: list, step: int, seconds: dict) -> dict:
    """One metrics.jsonl line: the rewards (total and per term), groups, truncation, clip, KL, entropy."""
    rollouts = [r for g in groups for r in g.rollouts]
    tokens = max(policy_stats["tokens"], 1)
    record = {
        "step": step,
        "reward": _spread([x for g in groups for x in g.rewards]),
        **{f"reward_{t}": _spread([terms[t] for g in groups for terms in g.terms]) for t in TERMS},
        "num_groups": len(groups),
        "zero_variance_fraction": sum(g.zero_variance for g in groups) / max(len(groups), 1),
        "informative_fraction": sum(not g.zero_variance for g in groups) / max(len(groups), 1),
        "truncation_ratio": sum(r.generation.finish_reason == "length" for r in rollouts) / max(len(rollouts), 1),
        "mean_completion_tokens": statistics.fmean(r.generation.num_new_tokens for r in rollouts),
        "num_trained_completions": int(policy_stats.get("completions", 0)),
        "clip_fraction": policy_stats["clipped"] / tokens,
        "kl": policy_stats["kl"] / tokens,
        "entropy": policy_stats["entropy"] / tokens,
    }
    if results:
        record.update(loss=results[-1].loss_sum / max(results[-1].num_loss_tokens, 1), grad_norm=results[-1].grad_norm)
        record["finite"] = all(r.finite for r in results)
    return record | {k: round(v, 3) for k, v in seconds.items()}


def log_heldout(ctx: RunContext, sampler: Sampler, items: list[EvalItem], step: int) -> None:
    sampler.refresh()
    result = heldout(sampler, ctx.cfg, items, TrainingDir(ctx.run_dir).heldout(step).path)
    append_on_main(ctx.metrics_path, {"split": "heldout", "step": step, **result})
    log.info(
        "grpo step %d: held-out accuracy %.3f, verified %.3f", step, result["accuracy"], result["verified_accuracy"]
    )


def sample_step(sampler: Sampler, cfg: Config, train: list[Trace], step: int) -> tuple[list[Group], int]:
    """Every group of sampling step `step` (from 0), on every rank, and how many draws of prompts it took. With
    grpo.fill_informative, seeded extra draws follow until prompts_per_step groups have rewards that differ
    (informative groups past that many are left out); every draw is a pure function of the step, so a resumed
    run samples the same."""
    g = cfg.grpo
    sampler.refresh()
    prompts = step_prompts(train, step, g.prompts_per_step, cfg.seed)
    groups, draws = _sample_groups(sampler, cfg, prompts, f"grpo:step-{step}"), 1
    while g.fill_informative and _informative(groups) < g.prompts_per_step and draws < g.max_fill_draws:
        extra = random.Random(f"{cfg.seed}:grpo:fill:{step}:{draws}").sample(train, min(g.prompts_per_step, len(train)))
        groups += _sample_groups(sampler, cfg, extra, f"grpo:step-{step}:fill-{draws}")
        draws += 1
    if g.fill_informative:
        informative = [k for k, group in enumerate(groups) if not group.zero_variance]
        surplus = set(informative[g.prompts_per_step :])
        groups = [group for k, group in enumerate(groups) if k not in surplus]
    return groups, draws


def _informative(groups: list[Group]) -> int:
    return sum(not group.zero_variance for group in groups)


def _sample_groups(sampler: Sampler, cfg: Config, prompts: list[Trace], key: str) -> list[Group]:
    """The groups of `prompts`; each rank samples its share, and every rank gets all of them in prompt order."""
    d = dist.current()
    mine = [as_item(t) for t in prompts[d.rank :: d.world_size]]
    rollouts = sampler.sample(mine, cfg.grpo.group_size, cfg.grpo.sampling, key)
    shares = dist.gather_to_all(rollouts)
    ordered = [None] * len(prompts)  # back in the prompts' order, whatever the world size
    for rank, share in enumerate(shares):
        ordered[rank :: d.world_size] = share
    return score_groups(ordered, cfg)


def learn(
    state: TrainState, cfg: Config, batches: list[dict], progress: Progress, policy: PolicySettings, ref
) -> tuple[list, dict]:
    """num_iterations optimizer steps on the step's micro-batches (none when every group was left out; the
    schedule advances all the same); (step results, policy statistics summed over ranks)."""
    policy.reset()
    sampled = [b for b in batches if "advantages" in b]  # not the SFT anchor's
    if sampled and cfg.grpo.num_iterations > 1:
        add_logprobs(state, sampled, "old_logprobs", temperature=cfg.grpo.sampling.temperature)
    if sampled and ref is not None:
        add_logprobs(state, sampled, "ref_logprobs", ref, cfg.grpo.sampling.temperature)
    results = []
    for iteration in range(cfg.grpo.num_iterations):
        if batches:
            results.append(train_step(state, batches, progress.step * cfg.grpo.num_iterations + iteration + 1))
        state.scheduler.step()
    stats = dist.sum_across_ranks([policy.stats[k] for k in ("tokens", "clipped", "kl", "entropy")])
    policy.reset()
    completions = sum(int(b["input_ids"].shape[0]) for b in sampled)
    return results, dict(zip(("tokens", "clipped", "kl", "entropy"), stats, strict=True)) | {"completions": completions}


def fit_grpo(
    cfg: Config,
    stage_dir: Path,
    model,
    tokenizer,
    train: list[Trace],
    heldout_items: list[EvalItem] | None,
    resume_from: Path | None = None,
) -> Path:
    """The GRPO stage on `model`; returns its final_model directory."""
    staged, g = stage_config(cfg), cfg.grpo
    device = dist.rank_device(dist.resolve_device(cfg.train.device))
    torch.manual_seed(cfg.seed)
    ref = copy.deepcopy(model).eval().requires_grad_(False).to(device) if g.kl_coef else None
    if g.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    gold = gold_examples(cfg, tokenizer, train) if g.sft_coef else {}
    policy = PolicySettings(g.epsilon_low, g.epsilon_high, g.kl_coef, g.sampling.temperature)
    state = build_state(staged, model, device, staged.train.max_steps, policy)
    end_id = end_of_turn_ids(tokenizer)[0]  # the sampler stopped at it; the SFT traces end with it too
    probe = [list(tokenizer(train[0].prompt, add_special_tokens=False).input_ids[:32])]
    ctx = RunContext(staged, stage_dir, probe, g.num_steps, name="grpo")
    progress = restore(state, resume_from, ctx) if resume_from is not None else Progress()
    sampler = Sampler(state.model, tokenizer, cfg)
    evaluate = (lambda: log_heldout(ctx, sampler, heldout_items, progress.step)) if heldout_items else None
    if evaluate and progress.step == 0:
        evaluate()
    open_bar(ctx, progress)
    with STOP:
        while progress.step < g.num_steps:
            started = time.perf_counter()
            groups, draws = sample_step(sampler, cfg, train, progress.step)
            sampled = time.perf_counter()
            batches = policy_batches(groups, cfg, end_id, tokenizer.pad_token_id)
            if gold:
                add_anchor(batches, groups, gold, cfg, tokenizer.pad_token_id)
            results, stats = learn(state, cfg, batches, progress, policy, ref)
            progress.step += 1
            crash_point(f"grpo-{progress.step}/updated")
            progress.elapsed_s = time.perf_counter() - ctx.started
            seconds = {
                "sample_s": sampled - started,
                "train_s": time.perf_counter() - sampled,
                "elapsed_s": progress.elapsed_s,
            }
            record = step_record(groups, stats, results, progress.step, seconds) | {"num_draws": draws}
            append_on_main(ctx.metrics_path, record | {"lr": state.scheduler.get_last_lr()[0]})
            ctx.bar.set_postfix(reward=f"{record['reward']['mean']:.2f}")
            ctx.bar.update(1)
            if results and not record["finite"]:
                raise NonFiniteLossError(
                    f"non-finite policy loss or gradient at grpo step {progress.step}; no update was applied; "
                    "fix: lower grpo.lr"
                )
            after_step(ctx, state, progress, evaluate, g.eval_every_steps, g.save_every_steps)
    return finish_training(ctx, state, progress, tokenizer, g.method, stage="grpo")


def gold_examples(cfg: Config, tokenizer, train: list[Trace]) -> dict[str, Example]:
    """The training traces tokenized as SFT tokenizes them, by id: what the SFT anchor trains on."""
    from tracetune.data.render import tokenize_traces

    d = cfg.data
    report = tokenize_traces(tokenizer, train, d.instruction, d.max_seq_length, "drop", str(d.train_file))
    return {e.id: e for e in report.examples}
