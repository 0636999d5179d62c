"""Batched generation with a KV cache and left padding, stopping each sequence at end-of-turn/EOS or a stop string;
greedy, or sampled with one seeded generator per prompt. `decode_compacting` drops finished rows from the batch.

Greedy decoding is batch-invariant where this machine's kernels allow (eval/invariance.py probes it, never
assumes it): eager attention over fixed key chunks (`batch_invariant_attention`, `VALUE_CHUNK`), prompts
left-padded to a multiple of `PAD_MULTIPLE`, and every matmul with a multiple of `ROW_MULTIPLE` rows. Why each is
needed, and what was measured on each CPU kind: docs/PERFORMANCE.md, "How generation stays batch-invariant".
On CPU, bf16 linear layers run on weights packed once for oneDNN (`packed_linears`) where that is bitwise
`F.linear` on this machine.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from tracetune.config import EvalConfig
from tracetune.dist import cpu_has_bf16

PAD_MULTIPLE = 16  # tokens; the vector width of fp32 (AVX-512) reductions over key positions
VALUE_CHUNK = 256  # key positions per attention matmul: every one has this many keys, whatever the padding
ROW_MULTIPLE = 4  # every matmul of a generation step has a multiple of this many rows; see the module docstring
ATTENTION = "tracetune_batch_invariant"


@dataclass(frozen=True)
class Generation:
    completion: str
    num_new_tokens: int
    finish_reason: str  # eos | stop | length
    token_ids: tuple[int, ...] = field(default=(), compare=False)  # the new tokens before any stop (rl trains on them)


def _cut(new_ids: list[int], stop_ids: set[int], pad_id: int) -> tuple[list[int], bool]:
    """Tokens before the first stop id, and whether one was found."""
    for n, token in enumerate(new_ids):
        if token in stop_ids:
            return new_ids[:n], True
    while new_ids and new_ids[-1] == pad_id and pad_id not in stop_ids:
        new_ids = new_ids[:-1]
    return new_ids, False


@dataclass
class Prefix:
    """Text every prompt of an evaluation starts with (few-shot demonstrations), prefilled once: its KV cache
    is copied into each batch, so the prompts' forward pass covers only what follows it."""

    num_tokens: int
    cache: DynamicCache


def prefill_prefix(model, tokenizer, text: str) -> Prefix:
    """Run `text` through the model once and keep its KV cache."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], device=device)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), packed_linears(model), _attention(model, ATTENTION):
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_name(model): cache})
    return Prefix(ids.shape[1], cache)


def encode(tokenizer, prompts: list[str], device) -> dict:
    """Rendered prompts as ids, left-padded to a multiple of PAD_MULTIPLE tokens (see the module docstring)."""
    tokenizer.padding_side = "left"
    return tokenizer(
        prompts, return_tensors="pt", padding=True, pad_to_multiple_of=PAD_MULTIPLE, add_special_tokens=False
    ).to(device)


def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    cfg: EvalConfig,
    stop_ids: list[int],
    prefix: Prefix | None = None,
    stop_strings: list[str] | tuple[str, ...] = (),
    seeds: list[int] | None = None,
) -> list[Generation]:
    """Generate completions for already-rendered prompts (chat template applied) in one batch; with `prefix`,
    each prompt follows its text. Greedy unless `cfg.do_sample`; then each row samples with its own generator,
    seeded by `seeds` (one per prompt), so its tokens do not depend on its neighbours wherever greedy decoding's
    logits do not. A completion ends at a stop id, at any of `cfg.stop_strings` and `stop_strings` (cut off,
    finish_reason 'stop'), or after `cfg.max_new_tokens`."""
    stop_strings = [*cfg.stop_strings, *stop_strings]
    encoded = encode(tokenizer, prompts, next(model.parameters()).device)
    sampling = None
    if cfg.do_sample:
        assert seeds is not None and len(seeds) == len(prompts), "sampling needs one seed per prompt"
        sampling = Sampling(cfg.temperature, cfg.top_p, [torch.Generator().manual_seed(s) for s in seeds])
    stop_check = partial(_has_stop_string, tokenizer, stop_strings) if stop_strings else None
    with torch.inference_mode(), packed_linears(model):
        rows = decode_compacting(
            model,
            encoded["input_ids"],
            encoded["attention_mask"],
            cfg.max_new_tokens,
            stop_ids,
            prefix=prefix,
            stop_check=stop_check,
            choose=argmax_tokens if sampling is None else sampling.choose,
        )
    decode = partial(tokenizer.decode, skip_special_tokens=True)
    return [finish(row, stop_ids, tokenizer.pad_token_id, stop_strings, decode) for row in rows]


def finish(new_ids: list[int], stop_ids: list[int], pad_id: int | None, stop_strings, decode) -> Generation:
    """A generation from its new tokens: cut at the first stop id, decoded with `decode`, cut at the first stop
    string."""
    ids, stopped = _cut(new_ids, set(stop_ids), pad_id)
    text = decode(ids)
    reason = "eos" if stopped else "length"
    for stop in stop_strings:
        if stop in text:
            text, reason = text[: text.index(stop)], "stop"
    return Generation(text.strip(), len(ids), reason, tuple(ids))


@dataclass(frozen=True)
class Sampling:
    """Temperature and nucleus sampling, one CPU generator per prompt of the batch."""

    temperature: float
    top_p: float
    generators: list[torch.Generator]

    def choose(self, logits: torch.Tensor, owners: list[int]) -> torch.Tensor:
        """One token per batch row: rows owned by a prompt draw one uniform number from its generator (exactly
        one per step, so a row's draws do not depend on the batch); copies (owner -1) take the argmax."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        order = None
        if self.top_p < 1:
            probs, order = probs.sort(dim=-1, descending=True, stable=True)
            probs = probs * (probs.cumsum(-1) - probs < self.top_p)  # the smallest head holding top_p of the mass
        cdf = probs.cumsum(-1)
        draws = [float(torch.rand((), generator=self.generators[o])) if o >= 0 else 0.0 for o in owners]
        target = torch.tensor(draws, dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]
        chosen = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)
        if order is not None:
            chosen = order.gather(1, chosen)
        chosen = chosen.squeeze(1)
        copies = torch.tensor([o < 0 for o in owners], device=logits.device)
        return torch.where(copies, logits.max(-1).indices, chosen)


STOP_WINDOW = 12  # newest tokens decoded to look for a stop string; longer stop strings are found at the end


def _has_stop_string(tokenizer, stop_strings: list[str], ids: list[int]) -> bool:
    text = tokenizer.decode(ids[-STOP_WINDOW:], skip_special_tokens=True)
    return any(stop in text for stop in stop_strings)


def can_pack() -> bool:
    """Whether this torch build and CPU have oneDNN bf16 kernels, which `packed_linears` needs."""
    return cpu_has_bf16()


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_PACK_ROWS = (1, 2, 3, 17, 200, 1000)  # decode sizes, then prefill-sized ones
_packs_exactly: dict[tuple, bool] = {}


def packs_exactly(linears: list[torch.nn.Linear]) -> bool:
    """Whether oneDNN's packed product equals `F.linear` bitwise for each of these layers' shapes on this machine.

    They are two oneDNN primitives (inner product on the packed weight, matmul on the plain one). With AVX-512
    BF16 and no AMX both run one brgemm kernel and agree (measured); with AMX each primitive picks its own
    blocking, so equality is checked, once per shape and thread count, on random inputs at decode and prefill
    row counts.
    """
    shapes = sorted({(m.out_features, m.in_features, m.bias is not None) for m in linears})
    key = (tuple(shapes), torch.get_num_threads())
    if key not in _packs_exactly:
        generator = torch.Generator().manual_seed(0)
        exact = True
        for out_features, in_features, has_bias in shapes:
            weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
            bias = torch.randn(out_features, generator=generator).bfloat16() if has_bias else None
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            rows = _PACK_ROWS if out_features * in_features < 2**24 else _PACK_ROWS[:3]  # an LM head sees few rows
            for n in rows:
                x = torch.randn(n, in_features, generator=generator).bfloat16()
                exact = exact and torch.equal(F.linear(x, weight, bias), _packed_forward(packed, bias, x))
        _packs_exactly[key] = exact
    return _packs_exactly[key]


def _packable(model) -> list[torch.nn.Linear]:
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        and m.weight.dtype == torch.bfloat16
        and m.weight.device.type == "cpu"
        and "forward" not in vars(m)  # a forward already wrapped (such as by accelerate's hooks) stays as it is
    ]


def will_pack(model) -> bool:
    """Whether `packed_linears(model)` packs: bf16 CPU linear layers, oneDNN bf16 kernels, and packed products
    equal to `F.linear` bitwise on this machine."""
    return _packs(_packable(model))


def _packs(linears: list[torch.nn.Linear]) -> bool:
    return bool(linears) and can_pack() and packs_exactly(linears)


@contextmanager
def packed_linears(model):
    """Run `model`'s bf16 CPU linear layers on weights packed once into oneDNN's layout, then restore them.

    `F.linear` on bf16 CPU tensors calls oneDNN, which first reorders the weight into its blocked layout, on
    every call: at decode sizes that reorder costs about as much as the product (bench/packed_linears.py).
    Packing runs only where the packed product is bitwise `F.linear`'s on this machine (`packs_exactly`), so
    greedy answers do not change. The packed copies take as much memory as the weights, for the duration only.
    Other dtypes and devices, and torch builds without oneDNN, run unchanged.
    """
    linears = _packable(model)
    if not _packs(linears):
        yield
        return
    try:
        for m in linears:
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach())
            m.forward = partial(_packed_forward, packed, None if m.bias is None else m.bias.detach())
        yield
    finally:
        for m in linears:
            vars(m).pop("forward", None)  # back to nn.Linear.forward


def batch_invariant_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """Eager attention (transformers' AttentionInterface) whose output for a row is bitwise the same whatever
    masked padding precedes it, given `PAD_MULTIPLE` alignment.

    Every matmul here has a shape the padding cannot change, because a matmul kernel may pick its blocking (and
    so its order of summation) by shape: keys are left-padded with masked zeros to a multiple of `VALUE_CHUNK`,
    and both products (query x keys, weights x values) run over fixed chunks of `VALUE_CHUNK` key positions
    counted from the newest, so padding only adds whole chunks that contribute exact zeros after the real ones.
    Query heads sharing a key/value head go into one matmul (no repeated keys; a decode step's matmul has as
    many rows as heads per group, not one); softmax is in fp32 as in transformers' eager attention.
    """
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    short = -keys % VALUE_CHUNK
    key, value = (F.pad(t, (0, 0, short, 0)) for t in (key, value))
    query = query.reshape(batch, kv_heads, group * length, dim)
    chunks = range(0, keys + short, VALUE_CHUNK)
    scores = torch.cat([torch.matmul(query, key[:, :, c : c + VALUE_CHUNK].transpose(2, 3)) for c in chunks], -1)
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, group, length, keys + short)
    if attention_mask is not None:
        mask = attention_mask[:, :, None, :, :keys]
        scores = scores + F.pad(mask, (short, 0), value=torch.finfo(mask.dtype).min)
    elif short:
        scores[..., :short] = torch.finfo(scores.dtype).min
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype).flatten(2, 3)
    out = None
    for begin in reversed(chunks):
        part = torch.matmul(weights[..., begin : begin + VALUE_CHUNK], value[:, :, begin : begin + VALUE_CHUNK])
        out = part if out is None else out.float() + part
    out = out.to(value.dtype).view(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, batch_invariant_attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)  # an additive mask, always materialised


def _prefill(model, input_ids, attention_mask, positions, cache_name: str):
    """The prompts' forward pass in groups of rows whose prompts pad to the same multiple of PAD_MULTIPLE, so
    short prompts skip the longest one's padding; the groups' KV caches are then left-padded with zeros (masked,
    so they add exact zeros) into one batch. Returns the last position's logits, the cache (as `{cache_name:
    cache}`) and each batch row's row in `input_ids` (the groups one after another, shortest first).
    """
    width = input_ids.shape[1]
    padded = -(-attention_mask.sum(1) // PAD_MULTIPLE) * PAD_MULTIPLE
    padded = torch.where(padded >= padded.max(), width, padded.clamp(max=width))  # the longest group: all of it
    if width > (getattr(model.config, "sliding_window", None) or width):
        # A sliding-window layer keeps only its window: past it, one group (its cache layout is transformers').
        padded = torch.full_like(padded, width)
    logits, caches, order = [], [], []
    for length in padded.unique().tolist():
        rows = (padded == length).nonzero().squeeze(1)
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=input_ids[rows, -length:],
            attention_mask=attention_mask[rows, -length:],
            position_ids=positions[rows, -length:],
            use_cache=True,
            # the LM head's matmul sees a multiple of ROW_MULTIPLE rows
            logits_to_keep=min(ROW_MULTIPLE // math.gcd(len(rows), ROW_MULTIPLE), length),
            **{cache_name: cache},
        )
        logits.append(out.logits[:, -1:])
        caches.append(cache)
        order.append(rows)
    merged = caches[-1]  # the longest prompts' cache already spans the full width
    if len(caches) > 1:
        for k, layer in enumerate(merged.layers):
            parts = [c.layers[k] for c in caches]
            for attr in ("keys", "values"):
                tensors = [getattr(part, attr) for part in parts]
                padded_parts = [torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0)) for t in tensors]
                setattr(layer, attr, torch.cat(padded_parts))
    return torch.cat(logits), {cache_name: merged}, torch.cat(order)


@contextmanager
def _attention(model, name: str):
    """Run `model` with attention implementation `name`, then restore its own."""
    own = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


def _cache_name(model) -> str:
    # transformers renamed past_key_values to cache (the old name warns, then goes in 5.40).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill_after(prefix: Prefix, model, input_ids, attention_mask, cache_name: str):
    """The prompts' forward pass after a prefilled prefix: its cache copied into every row, the prompts'
    positions counting on from it. Returns what `_prefill` does, plus the mask and positions over both."""
    rows = input_ids.shape[0]
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(rows)
    positions = prefix.num_tokens + (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    attention_mask = torch.cat([attention_mask.new_ones(rows, prefix.num_tokens), attention_mask], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_name: cache},
    )
    order = torch.arange(rows, device=input_ids.device)
    return out.logits, {cache_name: cache}, order, attention_mask, positions


def argmax_tokens(logits: torch.Tensor, owners: list[int]) -> torch.Tensor:
    """Greedy decoding's choice: one token per row, the first maximum (max's indices follow argmax's rule and are
    much cheaper on bf16 CPU logits)."""
    return logits.max(-1).indices


def decode_compacting(
    model,
    input_ids,
    attention_mask,
    max_new_tokens: int,
    stop_ids: list[int],
    step_logits: list | None = None,
    prefix: Prefix | None = None,
    stop_check=None,
    choose=argmax_tokens,
) -> list[list[int]]:
    """Decoding with a KV cache that drops each sequence from the batch once it emits a stop id; `choose`
    (`argmax_tokens`, or `Sampling.choose`) picks each step's tokens from the last-position logits.

    transformers' generate keeps finished rows in the batch until the longest one ends, so a batch costs its
    longest completion times its size; here a step costs only the rows still running (and finished rows beside the
    last running ones, see the module docstring). Positions follow the left-padded attention mask exactly as
    generate computes them. Returns each row's new token ids, the stop id included. `step_logits`, when given,
    receives each step's (original row or -1, last-position logits) pair, for `invariance.probe_generation`.
    With `prefix`, the prompts follow its cached tokens (the padding then sits between the two, so such batches
    are not claimed batch-invariant). `stop_check(ids)`, when given, also ends a row whose new ids it accepts.
    """
    rows = input_ids.shape[0]
    input_ids, attention_mask = _fill_rows(input_ids, attention_mask)
    name = _cache_name(model)
    stops = torch.tensor(stop_ids, device=input_ids.device)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    new_ids: list[list[int]] = [[] for _ in range(rows)]
    with _attention(model, ATTENTION):
        if prefix is None:
            logits, cache, order = _prefill(model, input_ids, attention_mask, positions, name)
        else:
            logits, cache, order, attention_mask, positions = _prefill_after(
                prefix, model, input_ids, attention_mask, name
            )
        # The original row of each batch row while it runs; -1 once it has finished (or for a copy).
        owner = order.masked_fill(order >= rows, -1)
        attention_mask, positions = attention_mask[order], positions[order]
        next_position = positions[:, -1] + 1
        for step in range(max_new_tokens):
            tokens = choose(logits[:, -1], owner.tolist())
            if step_logits is not None:
                step_logits.append((owner.clone(), logits[:, -1].float()))
            for row, token in zip(owner.tolist(), tokens.tolist(), strict=True):
                if row >= 0:
                    new_ids[row].append(token)
            finished = torch.isin(tokens, stops)
            if stop_check is not None:
                texts = [row >= 0 and stop_check(new_ids[row]) for row in owner.tolist()]
                finished |= torch.tensor(texts, device=finished.device)
            owner = owner.masked_fill(finished, -1)
            running = owner >= 0
            if step == max_new_tokens - 1 or not running.any():
                break
            keep = _rows_to_keep(running)
            if not keep.all():
                cache[name].batch_select_indices(keep.nonzero().squeeze(1))
                owner, tokens, attention_mask, next_position = (
                    owner[keep],
                    tokens[keep],
                    attention_mask[keep],
                    next_position[keep],
                )
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            logits = model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_position[:, None],
                use_cache=True,
                **cache,
            ).logits
            next_position = next_position + 1
    return new_ids


def _fill_rows(input_ids, attention_mask):
    """The prompts, and copies of the first after them up to a multiple of ROW_MULTIPLE rows (their tokens are
    dropped)."""
    copies = [0] * (-input_ids.shape[0] % ROW_MULTIPLE)
    if not copies:
        return input_ids, attention_mask
    return torch.cat([input_ids, input_ids[copies]]), torch.cat([attention_mask, attention_mask[copies]])


def _rows_to_keep(running: torch.Tensor) -> torch.Tensor:
    """The rows of the next step: the running ones, and finished ones beside them up to a multiple of
    ROW_MULTIPLE."""
    keep, missing = running.clone(), -int(running.sum()) % ROW_MULTIPLE
    if missing > 0:
        keep[(~running).nonzero().squeeze(1)[:missing]] = True
    return keep


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started
