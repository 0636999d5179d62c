"""Whether this machine's kernels keep batched greedy generation exact: checked at run time, never assumed.

`generate.decode_compacting` gives one-at-a-time decoding's tokens in a batch only if every kernel it calls
rounds a row the same way whatever rows and padding share its call: a property of the CPU (or GPU), its
oneDNN/MKL build, the dtype and the thread count, not of tracetune (docs/PERFORMANCE.md has what was measured
on each CPU kind). So every evaluation probes instead of claiming:

- `probe_kernels` checks the kernels alone, in the evaluation's dtype, at the shapes generation uses: every
  linear layer's shape at the row counts generation uses (multiples of `generate.ROW_MULTIPLE`, decode and
  prefill sized), every row against the same row computed in a block of ROW_MULTIPLE, and attention for single
  queries (decoding) and whole prompts (prefill, queries = length) at `ATTENTION_LENGTHS` behind
  `PADDING_BLOCKS` of extra padding. A check that fails at any one shape says false, and names the shape.
- `probe_generation` decodes a few of an evaluation's own prompts in one batch and each alone and compares the
  logits bitwise; the result goes into batch_invariance.json (and scores.json) with the kernel checks, and says
  which of the two is weaker where they disagree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from tracetune.eval import generate

PROBE_PROMPTS = 4
PROBE_STEPS = 4
# Prompt lengths (tokens) for the attention checks: past one 256-key chunk, and at its edges.
ATTENTION_LENGTHS = (*range(1, 200, 7), 255, 256, 257, 300)
PADDING_BLOCKS = (1, 3, 10, 25)  # extra left padding, in multiples of generate.PAD_MULTIPLE
# Rows a linear layer sees, multiples of ROW_MULTIPLE: decode batches, then prefill-sized (rows x prompt tokens).
ROW_COUNTS = tuple(generate.ROW_MULTIPLE * n for n in (1, 2, 3, 5, 16, 75, 250))
LARGE_LAYER = 2**24  # weights with more elements (an LM head) are checked at decode row counts only


@dataclass(frozen=True)
class KernelShapes:
    """The shapes generation runs: linear layers as (out_features, in_features), query heads per key/value head,
    and the head width. The default is Gemma 3 270M's."""

    linears: tuple[tuple[int, int], ...] = ((1024, 640), (256, 640), (640, 1024), (2048, 640), (640, 2048))
    groups: tuple[int, ...] = (1, 4)
    head_dim: int = 256


def model_shapes(model) -> KernelShapes:
    """The kernel shapes of `model`'s own layers."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    linears = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KernelShapes(tuple(sorted(linears)), (heads // kv_heads,), head_dim)


def describe_cpu() -> dict:
    """The CPU features that decide which oneDNN kernels run."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "onednn_bf16": generate.can_pack(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "num_threads": torch.get_num_threads(),
    }


_probed: dict[tuple, dict] = {}


def _machine_key(dtype: torch.dtype, shapes: KernelShapes) -> str:
    """What a kernel probe's answer depends on: the CPU (model, flags, capability, AMX, the oneDNN ISA limit),
    threads, torch's build (version, MKL, oneDNN), dtype, shapes, and the probe's and generation's own code."""
    cpu = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else platform.processor()
    lines = sorted({line for line in cpu.splitlines() if line.startswith(("model name", "flags", "vendor_id"))})
    code = [Path(module.__file__).read_bytes() for module in (generate, sys.modules[__name__])]
    parts = [dtype, shapes, describe_cpu(), lines, torch.__version__, torch.__config__.show(), *code]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _probe_cache(dtype: torch.dtype, shapes: KernelShapes) -> Path | None:
    """Where this machine's answer for (dtype, shapes) is kept across processes: $TRACETUNE_KERNEL_PROBES
    (default $TRACETUNE_CACHE/kernel_probes; "off" measures in every process)."""
    where = os.environ.get("TRACETUNE_KERNEL_PROBES")
    if where == "off":
        return None
    root = Path(where) if where else Path(os.environ.get("TRACETUNE_CACHE", Path.home() / ".cache" / "tracetune"))
    return (root if where else root / "kernel_probes").expanduser() / f"{_machine_key(dtype, shapes)}.json"


def probe_kernels(dtype: torch.dtype = torch.bfloat16, shapes: KernelShapes = KernelShapes()) -> dict:
    """Kernel-level checks, no model needed (env.json's cpu_kernels, and beside every generation probe): does a
    matmul round a row the same way at every row count generation uses, does `generate.batch_invariant_attention`
    ignore leading padding for decoding and prefill, and (bf16) do packed linear layers equal `F.linear`. Each
    check is True or False as measured here, with the first shapes that failed. Measured once per dtype, shapes
    and thread count in a process, and kept on disk for later processes on the same machine, torch build and
    code (`_machine_key`; the record says `"cached": true` and when it was measured)."""
    key = (dtype, shapes, torch.get_num_threads())
    cache = _probe_cache(dtype, shapes) if key not in _probed else None
    if cache is not None and cache.is_file():
        with contextlib.suppress(OSError, ValueError):
            _probed[key] = json.loads(cache.read_text(encoding="utf-8")) | {"cached": True}
    if key not in _probed:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        failures = {
            "matmul_rows": matmul_row_failures(dtype, shapes.linears, generator),
            "attention_padding": [
                case for group in shapes.groups for case in attention_failures(dtype, group, shapes.head_dim, generator)
            ],
        }
        checks = {name: not failed for name, failed in failures.items()}
        if dtype == torch.bfloat16:
            linears = [torch.nn.Linear(i, o, bias=False, device="meta") for o, i in shapes.linears]  # shapes only
            checks["packed_linear"] = generate.can_pack() and generate.packs_exactly(linears)
        _probed[key] = {
            **describe_cpu(),
            "dtype": str(dtype).removeprefix("torch."),
            "checks": checks,
            "first_failures": {name: failed[:5] for name, failed in failures.items() if failed},
            "batch_invariant": checks["matmul_rows"] and checks["attention_padding"],
            "seconds": round(time.perf_counter() - started, 3),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "cached": False,
        }
        if cache is not None:
            with contextlib.suppress(OSError):  # a read-only cache only costs the next process the measurement
                cache.parent.mkdir(parents=True, exist_ok=True)
                staging = cache.with_suffix(f".{os.getpid()}.tmp")
                staging.write_text(json.dumps(_probed[key], indent=1) + "\n", encoding="utf-8")
                staging.rename(cache)
    return _probed[key]


def matmul_row_failures(dtype: torch.dtype, linears, generator: torch.Generator) -> list[dict]:
    """The (layer shape, row count) pairs at which any row of a linear layer's product differs from the same row
    computed in a block of ROW_MULTIPLE rows (as a lone prompt's copies run it)."""
    block = generate.ROW_MULTIPLE
    failed = []
    for out_features, in_features in linears:
        weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
        counts = ROW_COUNTS[:4] if out_features * in_features > LARGE_LAYER else ROW_COUNTS
        x = torch.randn(max(counts), in_features, generator=generator).to(dtype)
        blocks = torch.cat([F.linear(x[i : i + block], weight) for i in range(0, max(counts), block)])
        for rows in counts[1:]:
            if not torch.equal(F.linear(x[:rows], weight), blocks[:rows]):
                failed.append({"shape": [out_features, in_features], "rows": rows})
    return failed


def attention_failures(dtype: torch.dtype, group: int, head_dim: int, generator: torch.Generator) -> list[dict]:
    """The (length, queries, padding blocks) cases at which one row's attention output (`group` query heads on one
    key/value head, `head_dim` wide) differs between running alone with its own alignment padding and running
    among three rows behind more padding; queries are 1 (a decode step) and the whole prompt (prefill)."""
    failed = []
    for length in ATTENTION_LENGTHS:
        key, value = (torch.randn(1, 1, length, head_dim, generator=generator).to(dtype) for _ in range(2))
        query = torch.randn(1, group, length, head_dim, generator=generator).to(dtype)
        aligned = -length % generate.PAD_MULTIPLE  # the padding a lone prompt gets
        for queries in sorted({1, length}):
            alone = _attend(query, key, value, aligned, queries, 1, generator)
            for blocks in PADDING_BLOCKS:
                padded = _attend(query, key, value, aligned + blocks * generate.PAD_MULTIPLE, queries, 3, generator)
                if not torch.equal(padded, alone):
                    difference = (padded.float() - alone.float()).abs().max().item()
                    failed.append(
                        {
                            "group": group,
                            "length": length,
                            "queries": queries,
                            "blocks": blocks,
                            "max_abs_difference": difference,
                        }
                    )
    return failed


def _attend(query, key, value, pad: int, queries: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """The first row's attention output for the last `queries` positions (causal) behind `pad` masked
    positions, in a batch of `rows` rows (the others random)."""
    length, dim, dtype = key.shape[2], key.shape[3], key.dtype
    total = pad + length
    k, v = (torch.randn(rows, 1, total, dim, generator=generator).to(dtype) for _ in range(2))
    k[0, :, pad:], v[0, :, pad:] = key[0], value[0]
    q = torch.randn(rows, query.shape[1], queries, dim, generator=generator).to(dtype)
    q[0] = query[0, :, -queries:]
    positions = torch.arange(total)
    allowed = (positions >= pad) & (positions <= torch.arange(total - queries, total)[:, None])
    mask = torch.zeros(queries, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    out, _ = generate.batch_invariant_attention(None, q, k, v, mask.expand(rows, 1, queries, total))
    return out[0]


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
    parameter = next(model.parameters())
    device = parameter.device.type
    # The few prompts sample some row counts; the kernel probe covers others (CPU kernels only).
    kernels = probe_kernels(parameter.dtype, model_shapes(model)) if device == "cpu" else None
    generation = max(differences) == 0.0
    return {
        "batch_invariant": generation and (kernels is None or kernels["batch_invariant"]),
        "max_abs_logit_difference": max(differences),
        "kernels": kernels,
        **_agreement(generation, kernels),
        "num_prompts": len(chosen),
        "num_steps": PROBE_STEPS,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": device,
        "packed_linears": generate.will_pack(model),
        **describe_cpu(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _agreement(generation: bool, kernels: dict | None) -> dict:
    """Whether the generation probe and the kernel checks agree, and where they do not, which is weaker and why."""
    if kernels is None or kernels["batch_invariant"] == generation:
        return {"probes_agree": True}
    if generation:
        why = (
            "the kernel checks found shapes that round by batch (first_failures) which this probe's few prompts and "
            "steps did not reach: the generation probe is the weaker one, and other prompts' answers may move"
        )
    else:
        why = (
            "the model's own logits moved with the batch although every kernel check passed: a kernel or shape the "
            "checks do not cover rounds by batch here, so the kernel checks are the weaker ones"
        )
    return {"probes_agree": False, "disagreement": why}


def _step_logits(model, tokenizer, prompts: list[str]) -> list[list[torch.Tensor]]:
    """Each prompt's last-position logits at every greedy step, decoded together as generation does."""
    encoded = generate.encode(tokenizer, prompts, next(model.parameters()).device)
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode(), generate.packed_linears(model):
        generate.decode_compacting(
            model, encoded["input_ids"], encoded["attention_mask"], PROBE_STEPS, [], step_logits=recorded
        )
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    for owner, logits in recorded:
        for row, values in zip(owner.tolist(), logits, strict=True):
            if row >= 0:
                rows[row].append(values)
    return rows
