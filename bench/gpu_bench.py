"""Training throughput and MFU of tracetune's step on the Gemma-2B architecture (random weights), seq 128.

The step is the loop's own `train_step` (train/step.py): `loss_sum` (LM head only at loss positions), backward,
clip, fused AdamW over fp32 master weights of bf16 parameters (`train.precision=bf16-weights`). Every position is a loss position,
as in full-sequence pretraining-style fine-tuning, so the FLOP count below is exact for the work done.

MFU = tokens x (6 N + 12 L H Q T) / (seconds x peak), with N the parameters that do matmuls (the input
embedding lookup excluded; the tied LM head counted once), L layers, H heads, Q head dim, T sequence length
(PaLM's formula, attention not halved for causality). Two peaks: the datasheet's dense bf16 figure for the
detected GPU, and a bf16 matmul peak measured in the same run.

    python bench/gpu_bench.py --device cuda --arch gemma-2b --batch 32 --steps 30   # what bench/gpu.sh runs
    python bench/gpu_bench.py --device cpu --arch tiny --batch 2 --steps 3           # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from tracetune.config import load_config
from tracetune.train.step import build_state, train_step

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "RTX 5090": 209.5}


def build(arch: str, device: torch.device, vocab_size: int = 256000):
    from transformers import AutoModelForCausalLM, GemmaConfig

    if arch == "gemma-2b":  # google/gemma-2b's config.json (vocab_size: its tokenizer's, unless told)
        config = GemmaConfig(
            vocab_size=vocab_size,
            hidden_size=2048,
            intermediate_size=16384,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            max_position_embeddings=8192,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    else:  # tracetune's own 2-layer test model, for a smoke test anywhere
        from tracetune.models.sources import load_model, load_tokenizer

        model = load_model("tiny:gemma3", load_tokenizer("tiny:gemma3")).to(torch.bfloat16)
        return model, model.config
    torch.manual_seed(0)
    with device:  # initialise on the GPU: 2.5B parameters initialised on the host take minutes
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), config


def matmul_peak_tflops(device: torch.device, size: int, repeats: int = 20) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="gemma-2b", choices=["gemma-2b", "tiny"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of the last step to stderr")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, config = build(args.arch, device)
    settings = ["data.train_file=null", "eval.eval_file=null", "train.precision=bf16-weights", "train.lr=2e-5"]
    settings += ["train.weight_decay=0.01", "train.max_grad_norm=1.0", f"train.compile={args.compile}"]
    state = build_state(load_config(None, settings), model, device, args.warmup + args.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times = []
    for step in range(args.warmup + args.steps):
        profiling = args.profile and step == args.warmup + args.steps - 1
        activity = (
            torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
        )
        profiler = torch.profiler.profile(activities=[activity]) if profiling else None
        if profiler:
            profiler.start()
        sync(device)
        started = time.perf_counter()
        train_step(state, [batch] * args.accum, step + 1)
        state.scheduler.step()
        sync(device)
        if profiler:
            profiler.stop()
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            table = profiler.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
            print(table, file=sys.stderr)
        elif step >= args.warmup:
            times.append(time.perf_counter() - started)
    seconds = sum(times) / len(times)
    embedding = model.get_input_embeddings().weight.numel()
    matmul_params = sum(p.numel() for p in params) - embedding + config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * args.seq
    samples_per_step = args.batch * args.accum
    flops_per_step = samples_per_step * args.seq * (6 * matmul_params + attention)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    # CPU: a smoke test; 256 keeps it to seconds where bf16 is emulated (AVX2 only: under 1 GFLOP/s at 1024)
    measured = matmul_peak_tflops(device, 8192 if device.type == "cuda" else 256)
    achieved = flops_per_step / seconds / 1e12
    result = {
        "device": name,
        "arch": args.arch,
        "batch": args.batch,
        "accum": args.accum,
        "compile": args.compile,
        "seq": args.seq,
        "steps_timed": len(times),
        "seconds_per_step": seconds,
        "samples_per_s": samples_per_step / seconds,
        "tokens_per_s": samples_per_step * args.seq / seconds,
        "matmul_params": matmul_params,
        "achieved_tflops": achieved,
        "datasheet_bf16_tflops": datasheet,
        "mfu_vs_datasheet": achieved / datasheet if datasheet else None,
        "measured_matmul_tflops": measured,
        "mfu_vs_measured_matmul": achieved / measured,
        "peak_cuda_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
