"""What subnormal floats cost on a CPU: SEAM's unlearning pass (the logit lens: every hidden state
through the output head and a softmax over the vocabulary, forward + backward) with subnormals
kept and with them flushed to zero (torch.set_flush_denormal, which training and evaluation turn
on for a CPU: training.flush_cpu_denormals), measured in the same run, the two alternating.

    python benchmarks/denormal_cost.py --model smollm2-135m-instruct --steps 2      # minutes
    python benchmarks/denormal_cost.py --model smollm2-135m-instruct \\
        --weights RUN/checkpoint/trainable.safetensors                             # a trained model
    python benchmarks/denormal_cost.py --model tiny-llama --steps 1                # seconds

--weights loads a safetensors state dict over the model (a run's checkpoint or saved weights,
matching parameter names; others are ignored): a sharper model puts more of its softmax
probabilities below fp32's smallest normal number (1.2e-38).
Prints one JSON object: model, weights, device, cpu_capability, threads, batch_size,
max_length, steps, subnormal_share (of the softmax probabilities the logit lens reads at every
depth at the answer positions, computed with subnormals kept), kept_seconds_per_step, flushed_seconds_per_step and
kept_time_ratio_vs_flushed (above 1: subnormals slow this pass down here). Input: the starter
harmful answers (the packaged starter data), labels on their answer tokens; the first pass of
each setting is a warm-up and is not timed. It always runs on the CPU: the setting does nothing
on a GPU.
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
    parser.add_argument("--weights", default=None, help="a safetensors state dict loaded over the model")
    parser.add_argument("--steps", type=int, default=2, help="timed passes per setting")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=112)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    import torch
    from safetensors.torch import load_file

    from inoculate.data.encode import collate, encode_record
    from inoculate.data.sources import load_records
    from inoculate.defenses._layers import final_norm, logit_lens_sum, output_head
    from inoculate.models import load_model

    device = torch.device("cpu")
    loaded = load_model(args.model, device=device)
    model, tok = loaded.model, loaded.tokenizer
    if args.weights:
        missing = model.load_state_dict(load_file(args.weights), strict=False).missing_keys
        if len(missing) == len(model.state_dict()):
            parser.error(f"--weights {args.weights}: no parameter name matches the model's")
    model.requires_grad_(True)
    model.train()
    records = load_records("starter", "train", limit=args.batch_size)
    batch = collate([encode_record(r, tok, "alpaca", args.max_length) for r in records], tok.pad_token_id)

    def one():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        s, n = logit_lens_sum(model, out, batch["labels"])
        (-torch.log1p(s / n)).backward()  # SEAM's L_ul
        model.zero_grad(set_to_none=True)

    with torch.no_grad():  # the logit lens's probabilities at every depth, subnormals kept
        torch.set_flush_denormal(False)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        answer = batch["labels"][:, 1:] != -100
        norm, head, last = final_norm(model), output_head(model), len(out.hidden_states) - 1
        subnormal = total = 0
        for i, h in enumerate(out.hidden_states):
            rows = h[:, :-1][answer]
            p = torch.softmax(head(rows if i == last else norm(rows)).float(), dim=-1)
            subnormal += int(((p > 0) & (p < torch.finfo(torch.float32).tiny)).sum())
            total += p.numel()
        subnormal /= total
        del out, p
    seconds = {False: 0.0, True: 0.0}
    for flush in (False, True):  # warm-up
        torch.set_flush_denormal(flush)
        one()
    for _ in range(args.steps):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            start = time.perf_counter()
            one()
            seconds[flush] += time.perf_counter() - start
    kept, flushed = seconds[False] / args.steps, seconds[True] / args.steps
    print(json.dumps({
        "model": args.model, "weights": args.weights, "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
        "subnormal_share": subnormal, "kept_seconds_per_step": kept, "flushed_seconds_per_step": flushed,
        "kept_time_ratio_vs_flushed": kept / flushed}))


if __name__ == "__main__":
    main()
