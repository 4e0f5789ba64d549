"""Step time and peak memory of every defense relative to SFT, measured in the same run.

    python benchmarks/step_cost.py --model tiny-llama                  # < 1 minute on CPU
    python benchmarks/step_cost.py --model smollm2-135m-instruct --steps 3 --defenses sft,ctrap
    python benchmarks/step_cost.py --model tiny-llama --set ctrap.trap_every=4 --label ctrap-amortized
    python benchmarks/step_cost.py --model tiny-llama --defenses ctrap,booster,seam --amortized 4 --equal-batch

Prints one JSON object per defense: seconds_per_step, peak_memory_mb, time_ratio_vs_sft,
memory_ratio_vs_sft, plus the device, weights_dtype (the base weights as loaded: --dtype),
step_seconds (the wall time of each timed step, which separates an amortized mode's refresh
steps from the others), and cpu_seconds_per_step / cpu_time_ratio_vs_sft (process CPU time:
on a shared CPU, run with OMP_NUM_THREADS=1 and read this ratio, which other processes do not
inflate); with --profile, operators_per_step and casts_per_step (count_operators). Each
defense runs in its own subprocess so that peak memory is its own: on CUDA the peak of
torch.cuda.max_memory_allocated during the timed steps, on CPU the peak resident set size of
the process (model, data and Python included, so CPU memory ratios understate the difference
in training state). Same model, data, batch size and sequence length for every defense; the
first step is a warm-up and is not timed. The timed steps cover --steps micro-steps, so for an
amortized row pick --steps as a multiple of k (the warm-up step is a refresh, the timed ones
start a new cycle).

--amortized K adds, after the every-step row of each defense that has an amortized mode
(CTRAP trap_every, Booster and SEAM lookahead_every), a row NAME-amortized-kK run with that
option set to K. passes_per_step is the defense instance's (the mean over a cycle where the
defense reports it).

--equal-batch adds ratios against SFT trained on as many examples per step as the defense's
retain batch, the examples it fits at θ: CTRAP's alignment + general batch (SFT then runs one
pass on the same concatenated alignment + general batch, i.e. CTRAP's Step 4 alone), TAR's
retain batch, and for every other defense its alignment batch (the refusal half of a paired
batch), which is the plain SFT reference. The rows gain equal_batch_sft (the reference's
streams) and time/cpu_time/memory_ratio_vs_sft_equal_batch; every reference SFT gets a row.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# TAR's adversary draws inner_steps x batch examples per step (64 x 4 = 256 at the defaults),
# more than the starter set's 100 harmful prompts: the benchmark runs it with 16 inner steps.
# Its cost grows linearly with inner_steps (inner_steps + inner_steps/4 + 1 passes per step).
SMALL_DATA_OVERRIDES = {"tar": ["tar.inner_steps=16"]}

# the amortized-mode option of each look-ahead defense (--amortized K sets it to K)
AMORTIZED = {"ctrap": "trap_every", "booster": "lookahead_every", "seam": "lookahead_every"}

# the streams that make up a defense's retain batch (--equal-batch); others: its "align"
# stream, else its first (main) stream, whose paired batch counts as its refusal half
RETAIN_STREAMS = {"ctrap": ("align", "general"), "tar": ("retain",)}


def retain_batch(name: str, args, overrides: list) -> list:
    """[(role, examples)] of the defense's retain batch, the equal-batch SFT reference's streams."""
    from inoculate.config import parse_overrides
    from inoculate.defenses import DEFENSES
    from inoculate.pipeline import align_config

    values = {"defense": name, "model": args.model, "per_device_train_batch_size": args.batch_size,
              **parse_overrides(overrides)}
    cfg, dcfg, _ = align_config(values)
    specs = DEFENSES.get(name)(dcfg, cfg.per_device_train_batch_size).streams()
    names = RETAIN_STREAMS.get(name) or (("align",) if "align" in specs else (next(iter(specs)),))
    sizes: dict = {}
    for n in names:
        role = "align" if specs[n].role == "paired" else specs[n].role
        sizes[role] = sizes.get(role, 0) + specs[n].batch_size
    return sorted(sizes.items())


def worker(args) -> dict:
    import torch

    from inoculate.config import parse_overrides
    from inoculate.defenses import DEFENSES
    from inoculate.models import add_lora, load_model, pick_device
    from inoculate.pipeline import _needs_eager, align_config, build_align_streams
    from inoculate.training import to_device, use_bf16

    values = {"defense": args.worker, "model": args.model, "data": args.data, "max_length": args.max_length,
              "per_device_train_batch_size": args.batch_size, "lora": not args.full,
              "num_samples": 100, "num_general_samples": 99, "bf16": args.bf16, "dtype": args.dtype,
              **parse_overrides(args.set or [])}
    cfg, dcfg, _ = align_config(values)
    device = pick_device(cfg.device)
    torch.manual_seed(0)
    loaded = load_model(cfg.model, device=device, dtype=cfg.dtype,
                        attn_implementation=cfg.attn_implementation or _needs_eager(dcfg))
    model = loaded.model
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    else:
        model.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    defense = DEFENSES.get(cfg.defense)(dcfg, cfg.per_device_train_batch_size)
    defense.setup(model, loaded.tokenizer)
    if args.sft_streams:  # equal-batch reference: SFT on the concatenated streams, one pass
        from inoculate.defenses.base import StreamSpec
        from inoculate.defenses.ctrap import concat_batches

        specs = {role: StreamSpec(role, int(n)) for role, n in
                 (part.split(":") for part in args.sft_streams.split(","))}
        pad_id = loaded.tokenizer.pad_token_id
        defense.streams = lambda: specs

        def sft_on_concatenation(batches, scale):
            parts = list(batches.values())
            batch = parts[0]
            for other in parts[1:]:
                batch = concat_batches(batch, other, pad_id)
            loss = defense.lm_loss(batch)
            defense.backward(loss, scale)
            return {"loss": loss.item()}

        defense.accumulate = sft_on_concatenation
    streams = build_align_streams(defense, cfg, loaded.tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    bf16 = use_bf16(cfg, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        batches = {n: to_device(s.next(), device) for n, s in streams.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            defense.accumulate(batches, 1.0)
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    each = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        each.append(round(time.perf_counter() - t, 4))
    cpu = (time.process_time() - c0) / args.steps
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        name = f"cpu ({torch.get_num_threads()} threads)"
    row = {"seconds_per_step": (time.perf_counter() - t0) / args.steps, "cpu_seconds_per_step": cpu,
           "peak_memory_mb": peak, "step_seconds": each,
           "device": name, "passes_per_step": defense.passes_per_step,
           "weights_dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
           "trainable_parameters": sum(p.numel() for p in params)}
    if args.profile:
        row.update(count_operators(step))
    return row


def count_operators(step) -> dict:
    """Operators one more step dispatches (torch.profiler, after the timed steps): those called
    from Python or autograd (an operator inside another, e.g. the mm inside a linear, is not
    counted again), and the dtype casts among all of them. Where a step is bound by per-step
    overhead (small models on a GPU), these counts, not the arithmetic, set its time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    outer = [e for e in ops if not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    return {"operators_per_step": len(outer),
            "casts_per_step": sum(e.name == "aten::_to_copy" for e in ops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--data", default="starter")
    parser.add_argument("--defenses", default=None, help="comma list (default: every registered defense)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per defense")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--full", action="store_true", help="full-parameter instead of LoRA")
    parser.add_argument("--bf16", default="auto")
    parser.add_argument("--dtype", default="float32",
                        help="dtype of the base weights for every row (LoRA on a large model: bfloat16)")
    parser.add_argument("--set", nargs="*", help="extra config overrides, e.g. ctrap.trap_every=4")
    parser.add_argument("--label", default=None, help="name for the extra row run with --set (compared to sft)")
    parser.add_argument("--amortized", type=int, default=0, metavar="K",
                        help="also run each defense with an amortized mode (ctrap trap_every, booster/seam "
                             "lookahead_every) at k=K, as a row NAME-amortized-kK")
    parser.add_argument("--equal-batch", action="store_true",
                        help="also compare with SFT on as many examples per step as the defense's retain "
                             "batch (CTRAP: alignment + general batch)")
    parser.add_argument("--profile", action="store_true",
                        help="also count the operators one more step dispatches (operators_per_step, "
                             "casts_per_step; torch.profiler, untimed)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sft-streams", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.amortized < 0:
        parser.error("--amortized must be >= 1 (0 = no amortized rows)")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from inoculate.defenses import DEFENSES

    names = args.defenses.split(",") if args.defenses else DEFENSES.names()
    names = ["sft"] + [n for n in names if n != "sft"]  # the reference runs first
    runs = []  # (row name, defense, overrides)
    for name in names:
        extra = list(SMALL_DATA_OVERRIDES.get(name, [])) + (list(args.set or []) if name != "sft" else [])
        runs.append((args.label if (args.label and name != "sft") else name, name, extra))
        if args.amortized and name in AMORTIZED:
            runs.append((f"{name}-amortized-k{args.amortized}", name,
                         extra + [f"{name}.{AMORTIZED[name]}={args.amortized}"]))

    def measure(name, extra, sft_streams=None):
        cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--data", args.data,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--bf16", args.bf16, "--dtype", args.dtype]
        if args.profile:
            cmd.append("--profile")
        if args.full:
            cmd.append("--full")
        if sft_streams:
            cmd += ["--sft-streams", sft_streams]
        if extra:
            cmd += ["--set", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def ratios(result, base, suffix=""):
        return {f"time_ratio_vs_sft{suffix}": result["seconds_per_step"] / base["seconds_per_step"],
                f"memory_ratio_vs_sft{suffix}": result["peak_memory_mb"] / base["peak_memory_mb"],
                f"cpu_time_ratio_vs_sft{suffix}": result["cpu_seconds_per_step"] / base["cpu_seconds_per_step"]}

    def common(extra, batch_size):
        return {"model": args.model, "overrides": extra, "batch_size": batch_size,
                "max_length": args.max_length, "mode": "full" if args.full else "lora", "dtype": args.dtype}

    base = None
    references = {}  # equal-batch SFT references by their streams
    for row_name, name, extra in runs:
        result = measure(name, extra)
        if "error" in result:
            print(json.dumps({"defense": row_name, **result}), flush=True)
            continue
        if name == "sft":
            base = result
            references[f"align:{args.batch_size}"] = result
        row = {"defense": row_name, **common(extra, args.batch_size), **result}
        if base:
            row.update(ratios(result, base))
        if args.equal_batch and name != "sft":
            key = ",".join(f"{role}:{n}" for role, n in retain_batch(name, args, extra))
            if key not in references:
                ref = measure("sft", [], sft_streams=key)
                references[key] = None if "error" in ref else ref
                print(json.dumps({"defense": "sft", "equal_batch_for": row_name, "sft_streams": key,
                                  **common([], sum(int(part.split(":")[1]) for part in key.split(","))),
                                  **ref}), flush=True)
            row["equal_batch_sft"] = key
            if references[key]:
                row.update(ratios(result, references[key], "_equal_batch"))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
