"""Whether this machine's kernels keep batched greedy generation exact: checked at run time, never assumed.

`generate.greedy_compacting` gives one-at-a-time decoding's tokens in a batch only if every kernel it calls
rounds a row the same way whatever rows and padding share its call. That is a property of the CPU (or GPU),
its oneDNN build and the thread count, not of tracetune:

- On AVX-512 BF16 CPUs without AMX (AMD EPYC here) every bf16 matmul runs oneDNN's
  `brg_matmul:avx512_core_bf16` (ONEDNN_VERBOSE=1), whose order of summation over K is the same for every row
  count from two up; generation holds (tested).
- On CPUs with AMX, oneDNN runs `brg_matmul:avx512_core_amx`. Its blocking (K block, K chunk, brgemm batch and
  how many threads split K, then add their partial sums) comes from a cost model over M, N, K and the thread
  count (oneDNN `matmul_amx_blocking_params_t`), so a row's rounding can change with the rows beside it and
  with the number of keys: batched answers then part from one-at-a-time ones after a few tokens (issue 15,
  seen on a Xeon with AMX; `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` hides AMX from oneDNN and restores it).

So every evaluation probes instead of claiming: `probe_generation` decodes a few of its own prompts in one
batch and each alone and compares the logits bitwise; the result goes into scores.json. `probe_kernels` checks
the kernels alone (no model) for env.json. `generate.packs_exactly` decides whether linear layers are packed.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from tracetune.eval import generate

PROBE_PROMPTS = 4
PROBE_STEPS = 4


def describe_cpu() -> dict:
    """The CPU features that decide which oneDNN kernels run."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "onednn_bf16": generate.can_pack(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "num_threads": torch.get_num_threads(),
    }


def probe_kernels() -> dict:
    """Kernel-level checks for env.json, no model needed: does a bf16 matmul round a row
    the same way at other row counts, does `generate.batch_invariant_attention` ignore leading padding, and do
    packed linear layers equal `F.linear`. Each is True or False as measured here."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2048, 640, generator=generator).bfloat16()
    x = torch.randn(300, 640, generator=generator).bfloat16()
    two_rows = F.linear(x[:2], weight)
    matmul_rows = all(torch.equal(F.linear(x[:n], weight)[:2], two_rows) for n in (3, 7, 50, 300))
    attention = all(
        _attention_ignores_padding(length, queries, generator) for length, queries in ((37, 1), (300, 1), (37, 37))
    )
    checks = {
        "matmul_rows": matmul_rows,
        "attention_padding": attention,
        "packed_linear": generate.can_pack() and generate.packs_exactly([torch.nn.Linear(640, 2048)]),
    }
    return {
        **describe_cpu(),
        "checks": checks,
        "batch_invariant": checks["matmul_rows"] and checks["attention_padding"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def _attention_ignores_padding(length: int, queries: int, generator: torch.Generator) -> bool:
    """One row's bf16 attention (4 query heads on one key/value head, 256 wide; the last `queries` positions
    attend causally) with its own alignment padding and behind 48 more masked positions, among three rows."""
    query = torch.randn(1, 4, queries, 256, generator=generator).bfloat16()
    key, value = (torch.randn(1, 1, length, 256, generator=generator).bfloat16() for _ in range(2))
    outputs = []
    for pad in (-length % generate.PAD_MULTIPLE, -length % generate.PAD_MULTIPLE + 48):
        total = pad + length
        k, v = (torch.zeros(3, 1, total, 256).bfloat16() for _ in range(2))
        k[:, :, pad:], v[:, :, pad:] = key, value
        mask = torch.full((3, 1, queries, total), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16)
        for i in range(queries):
            mask[:, :, i, pad : total - queries + i + 1] = 0
        out, _ = generate.batch_invariant_attention(None, query.expand(3, -1, -1, -1), k, v, mask)
        outputs.append(out[0])
    return torch.equal(*outputs)


def probe_generation(model, tokenizer, prompts: list[str]) -> dict:
    """Decode up to PROBE_PROMPTS of `prompts` (rendered, spread over their lengths) for PROBE_STEPS greedy
    steps in one batch and each alone, and compare every step's logits bitwise: whether this model, precision
    and machine give batched greedy evaluation one-at-a-time answers. On CPU the kernel probe must agree too (a
    few prompts try only a few row counts)."""
    started = time.perf_counter()
    chosen = sorted(prompts, key=len)
    chosen = [chosen[round(k * (len(chosen) - 1) / max(PROBE_PROMPTS - 1, 1))] for k in range(PROBE_PROMPTS)]
    chosen = list(dict.fromkeys(chosen))
    together = _step_logits(model, tokenizer, chosen)
    alone = [_step_logits(model, tokenizer, [prompt])[0] for prompt in chosen]
    differences = [
        (a - b).abs().max().item()
        for row, single in zip(together, alone, strict=True)
        for a, b in zip(row, single, strict=True)
    ]
    device = next(model.parameters()).device.type
    # The few prompts sample some row counts; the kernel probe covers others (CPU kernels only).
    kernels = probe_kernels() if device == "cpu" else None
    return {
        "batch_invariant": max(differences) == 0.0 and (kernels is None or kernels["batch_invariant"]),
        "max_abs_logit_difference": max(differences),
        "kernels": kernels,
        "num_prompts": len(chosen),
        "num_steps": PROBE_STEPS,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": device,
        "packed_linears": generate.will_pack(model),
        **describe_cpu(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _step_logits(model, tokenizer, prompts: list[str]) -> list[list[torch.Tensor]]:
    """Each prompt's last-position logits at every greedy step, decoded together as generation does."""
    encoded = generate.encode(tokenizer, prompts, next(model.parameters()).device)
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode(), generate.packed_linears(model):
        generate.greedy_compacting(
            model, encoded["input_ids"], encoded["attention_mask"], PROBE_STEPS, [], step_logits=recorded
        )
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    for owner, logits in recorded:
        for row, values in zip(owner.tolist(), logits, strict=True):
            if row >= 0:
                rows[row].append(values)
    return rows
