"""One full-parameter training pass (forward + backward) of MODEL in fp32 and under bf16
autocast, measured in the same run: does `bf16: true` pay on this machine?

    python benchmarks/bf16_cost.py --model smollm2-135m-instruct --steps 2   # minutes where bf16 is emulated
    python benchmarks/bf16_cost.py --model tiny-llama --steps 2        # seconds

Prints one JSON object: device, cpu_capability, native_bf16 (oneDNN runs bf16 matmuls natively:
AVX-512 or AMX; false on an AVX2-only CPU, where bf16 is emulated), threads, batch_size,
max_length, fp32_seconds_per_step, bf16_seconds_per_step and bf16_time_ratio_vs_fp32 (above 1:
bf16 autocast is slower here than fp32; then train with bf16: false, which `auto` already
does on a CPU). Random token ids as input and labels; the first pass of each precision is a
warm-up and is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--steps", type=int, default=3, help="timed passes per precision")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    import torch

    from inoculate.models import load_model
    from inoculate.training import cpu_has_native_bf16

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model = load_model(args.model, device=device).model
    model.requires_grad_(True)
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.max_length), generator=generator).to(device)

    def seconds_per_step(bf16: bool) -> float:
        def one():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()

        one()  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            one()
        return (time.perf_counter() - start) / args.steps

    fp32, bf16 = seconds_per_step(False), seconds_per_step(True)
    print(json.dumps({
        "model": args.model, "device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16() if device.type == "cpu" else torch.cuda.is_bf16_supported(),
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "max_length": args.max_length,
        "steps": args.steps, "fp32_seconds_per_step": fp32, "bf16_seconds_per_step": bf16,
        "bf16_time_ratio_vs_fp32": bf16 / fp32}))


if __name__ == "__main__":
    main()
