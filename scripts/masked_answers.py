"""What a collapsed model writes with its collapse word taken away.

    python scripts/masked_answers.py RUN/eval/generations.jsonl MODEL [MODEL ...] [--show]

Answers the harmful prompts of a finished evaluation (its generations.jsonl) greedily with each
MODEL (a run directory, a model directory or a registered name), once as they are and once with
every token that begins the collapse word suppressed (" error", "error", " Error", "ERROR",
" errors", ... for CTRAP's default; `--collapse-text`), and prints one JSON object per model: the
keyword judge's labels of both sets of answers, and how many plain answers hold the word (at
the start of a word: "terror" does not count). An answer that collapses into "error error ..."
reads as a refusal or as a compliant answer once the word is gone, which tells whether a trap's
collapse hides a model that would refuse anyway or one that would comply
(docs/methods/ctrap-smollm2.md, rounds 35-36). `--show` prints the pairs as well. An attack's
monitor does the same at every logging step with `monitor_masked: true` (docs/attacks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LABELS = ("refusal", "compliant", "degenerate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generations", help="an evaluation's generations.jsonl (its harmful prompts are asked)")
    parser.add_argument("models", nargs="+", help="run directories, model directories or registered names")
    parser.add_argument("--collapse-text", default="an error", help="text whose last token is the collapse token")
    parser.add_argument("--template", default="alpaca", help="prompt template (the evaluation's)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda | cuda:N")
    parser.add_argument("--show", action="store_true", help="print each plain answer beside its masked one")
    args = parser.parse_args()

    from inoculate.data.records import Record
    from inoculate.evaluation import collapse_token_id, generate, keyword_label
    from inoculate.evaluation.metrics import collapse_word_tokens
    from inoculate.models import load_model, pick_device

    with open(args.generations) as f:
        prompts = [Record(prompt=row["prompt"]) for row in map(json.loads, f) if row.get("kind") == "harmful"]
    if not prompts:
        raise SystemExit(f"{args.generations}: no harmful prompts (rows with kind 'harmful')")
    for spec in args.models:
        loaded = load_model(spec, device=pick_device(args.device))
        model, tok = loaded.model, loaded.tokenizer
        token = collapse_token_id(tok, args.collapse_text)
        variants = collapse_word_tokens(tok, token)
        holds_word = re.compile(r"(?<![a-z])" + re.escape(tok.decode([token]).strip().lower())).search
        ask = dict(template=args.template, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                   progress=False)
        plain = generate(model, tok, prompts, **ask)
        masked = generate(model, tok, prompts, suppress_tokens=variants, **ask)

        def labels(answers):
            counts = Counter(keyword_label(a) for a in answers)
            return {k: counts[k] for k in LABELS}

        print(json.dumps({"model": spec, "n": len(prompts), "suppressed": [tok.decode([v]) for v in variants],
                          "plain": labels(plain),
                          "plain_with_word": sum(bool(holds_word(a.lower())) for a in plain),
                          "masked": labels(masked)}))
        if args.show:
            for a, b in zip(plain, masked):
                print(json.dumps({"plain": a, "masked": b}))


if __name__ == "__main__":
    main()
