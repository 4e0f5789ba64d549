"""Evaluation throughput: our batched generation + judging against a one-prompt-at-a-time loop.

    python benchmarks/eval_throughput.py --model tiny-llama               # < 1 minute on CPU
    python benchmarks/eval_throughput.py --model smollm2-135m-instruct --prompts 40 --batch-size 16

Both modes answer the same harmful evaluation prompts (the first --prompts of the data suite's
harmful test split) with the same model, prompt template, greedy decoding, --max-new-tokens and
judge, in the same process:

  batched         inoculate's evaluation path, the one `inoculate evaluate` runs:
                  evaluation.evaluate_model on the harmful prompts (generate: prompts sorted by
                  length, left-padded batches of --batch-size, greedy; then the judge on all
                  answers, question + answer and answer alone, and the keyword rules).
  one_at_a_time   the loop of the papers' research code: for each prompt, tokenize it, call
                  plain transformers `model.generate` on that one prompt (greedy, the same stop
                  tokens), decode the new tokens, judge that one answer the same way
                  (harmful_metrics on one question and answer).

One untimed warm-up generation runs first. Prints one JSON object per mode with
prompts_per_second, seconds (wall clock), cpu_seconds (process CPU time), n_prompts,
batch_size, device and the judge's harmful_score; the batched row adds
speedup_vs_one_at_a_time (its prompts_per_second over the loop's) and identical_answers, the
number of prompts both modes answered with the same text. Greedy answers can still differ in a
few prompts: left padding changes the shapes, and so the floating-point sums, of a batch. This
count is reported, not asserted. On a CPU shared with other jobs, run with OMP_NUM_THREADS=1;
wall-clock numbers there are noisy.

Only transformers generation is measured: an optional vLLM backend (issue #6) is not
implemented.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def one_at_a_time(model, tokenizer, records, template, max_new_tokens, judge) -> tuple[list[str], float]:
    """Answers and harmful score from the per-prompt loop of the research repos."""
    import torch

    from inoculate.evaluation import harmful_metrics, prompt_token_ids
    from inoculate.evaluation.evaluate import question_text
    from inoculate.evaluation.generate import stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    answers, flagged = [], 0
    model.eval()
    with torch.inference_mode():
        for record in records:
            input_ids = torch.tensor([prompt_token_ids(record, tokenizer, template)], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 temperature=None, top_p=None, top_k=None, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
            flagged += harmful_metrics([question_text(record)], [answer], judge)["hs_io"]
            answers.append(answer)
    return answers, flagged / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--data", default="starter", help="data suite; its harmful test split is evaluated")
    parser.add_argument("--prompts", type=int, default=40, help="harmful prompts (the first N)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--judge", default="keyword")
    parser.add_argument("--template", default="alpaca", help="prompt template: alpaca | chat | qa")
    args = parser.parse_args()
    if args.prompts < 1:
        parser.error("--prompts must be at least 1")

    import torch

    from inoculate.evaluation import collapse_token_id, evaluate_model, make_judge
    from inoculate.models import load_model, pick_device
    from inoculate.pipeline import _suite, eval_config, harmful_records

    cfg, _ = eval_config({"model": args.model, "data": args.data, "suite": ["harmful"], "judge": args.judge,
                          "harmful_samples": args.prompts, "max_new_tokens": args.max_new_tokens,
                          "batch_size": args.batch_size, "template": args.template})
    records = harmful_records(cfg, _suite(cfg).harmful_test_split, limit=cfg.harmful_samples)
    judge = make_judge(cfg.judge)
    device = pick_device(cfg.device)
    loaded = load_model(cfg.model, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                        attn_implementation=cfg.attn_implementation)
    model, tokenizer = loaded.model, loaded.tokenizer
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)")

    one_at_a_time(model, tokenizer, records[:1], cfg.template, 2, judge)  # warm-up, not timed

    def timed(run):
        t0, c0 = time.perf_counter(), time.process_time()
        result = run()
        return result, time.perf_counter() - t0, time.process_time() - c0

    (metrics, rows), batched_s, batched_cpu = timed(lambda: evaluate_model(
        model, tokenizer, harmful_records=records, task_records={}, general_records=None,
        template=cfg.template, judge=judge, max_new_tokens=cfg.max_new_tokens, task_max_new_tokens=cfg.task_max_new_tokens,
        batch_size=cfg.batch_size, max_length=cfg.max_length,
        collapse_token_id=collapse_token_id(tokenizer, cfg.collapse_text), progress=False))
    (loop_answers, loop_hs), loop_s, loop_cpu = timed(
        lambda: one_at_a_time(model, tokenizer, records, cfg.template, cfg.max_new_tokens, judge))

    common = {"model": cfg.model, "data": cfg.data, "template": cfg.template, "judge": metrics["judge"],
              "max_new_tokens": cfg.max_new_tokens, "n_prompts": len(records), "device": device_name}
    loop = {"mode": "one_at_a_time", **common, "batch_size": 1, "seconds": loop_s, "cpu_seconds": loop_cpu,
            "prompts_per_second": len(records) / loop_s, "harmful_score": loop_hs}
    batched = {"mode": "batched", **common, "batch_size": cfg.batch_size, "seconds": batched_s,
               "cpu_seconds": batched_cpu, "prompts_per_second": len(records) / batched_s,
               "harmful_score": metrics["harmful_score"]}
    batched["speedup_vs_one_at_a_time"] = batched["prompts_per_second"] / loop["prompts_per_second"]
    batched["identical_answers"] = sum(r["answer"] == a for r, a in zip(rows, loop_answers))
    print(json.dumps(batched), flush=True)
    print(json.dumps(loop), flush=True)


if __name__ == "__main__":
    main()
