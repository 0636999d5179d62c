"""Where one optimizer step's time goes (Gemma 3 270M, batch 4, bf16 autocast): decoder forward, LM head
and loss, backward, optimizer; with --ops, torch.profiler's top operators of one more step. Uses the loop's
own pieces (linear_cross_entropy with TiedGradient, fused AdamW); preload tcmalloc as tracetune does
(LD_PRELOAD=libtcmalloc_minimal.so.4) to profile what `tracetune run` runs.
Run: python bench/profile_step.py [--precision fp32] [--steps 4] [--ops]"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tracetune.config import load_config
from tracetune.data.batching import collate
from tracetune.pipeline import load_for_training, load_inputs
from tracetune.train.loss import TiedGradient, linear_cross_entropy, loss_sum, unwrap_model
from tracetune.train.optim import build_optimizer, param_groups

REPO = Path(__file__).resolve().parents[1]


def train_step(model, batch, tied, optimizer, autocast: bool) -> None:
    """One optimizer step of batch as `fit` takes it in one CPU process (with TiedGradient)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, count = loss_sum(model, batch, tied)
    (total / count).backward()
    tied.attach_grad()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tied.reset()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="bf16-autocast")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--source", default="packaged:gemma3-270m")
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators")
    args = parser.parse_args()
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml", [f"model.source={args.source}", "data.max_train_records=64"]
    )
    tokenizer, model, train, _, _ = load_for_training(cfg, load_inputs(cfg))
    model.train()
    optimizer = build_optimizer(param_groups(list(model.named_parameters()), 0.01), cfg.train, torch.device("cpu"))
    auto = args.precision == "bf16-autocast"
    tied = TiedGradient.for_model(model)  # as fit uses it in one CPU process
    totals: dict[str, float] = {}
    for step in range(args.steps + 1):
        batch = collate(train[4 * step : 4 * step + 4], tokenizer.pad_token_id)
        inner = unwrap_model(model)
        marks = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
            hidden = inner.get_decoder()(
                inputs_embeds=tied.embed(batch["input_ids"]), attention_mask=batch["attention_mask"]
            ).last_hidden_state
            marks.append(time.perf_counter())
            targets = batch["labels"][:, 1:]
            mask = targets != -100
            head = inner.get_output_embeddings().weight
            loss = linear_cross_entropy(hidden[:, :-1][mask], head, targets[mask], 0.0, tied) / int(mask.sum())
        marks.append(time.perf_counter())
        loss.backward()
        tied.attach_grad()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tied.reset()
        marks.append(time.perf_counter())
        if step == 0:
            continue  # warmup
        for name, a, b in zip(
            ["decoder forward", "head + loss", "backward", "clip + optimizer"], marks[:-1], marks[1:], strict=True
        ):
            totals[name] = totals.get(name, 0.0) + (b - a)
    if args.ops:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        batch = collate(train[:4], tokenizer.pad_token_id)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            train_step(model, batch, tied, optimizer, auto)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(totals.values())
    for name, seconds in totals.items():
        print(f"{name:<18} {seconds / args.steps:6.2f} s/step  {100 * seconds / total:5.1f}%")
    print(f"{'total':<18} {total / args.steps:6.2f} s/step")


if __name__ == "__main__":
    main()
