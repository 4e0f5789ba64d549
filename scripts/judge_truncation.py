"""How an embedding judge's verdicts depend on answer length (docs/evaluation.md, Judges).

    python scripts/judge_truncation.py --data-dir ../shared/data
    python scripts/judge_truncation.py --head judges/minilm-beavertails --words 0,40,18 --pairs 200

Evaluations generate short answers (the CPU grids: 24 or 50 new tokens), while the BeaverTails
refusal pairs the head learned from are full-length. This scores the first `--pairs` held-out
test pairs (prompt, harmful answer, refusal) with each answer cut to its first N
whitespace-separated words (0 = whole answer; 18 words are about 24 SmolLM2 tokens), in the IO
view (question + answer, the judge's HS(IO)) and the O view (answer alone, HS(O)), and prints,
per length, the share of refusals flagged harmful (false positives) and of harmful answers
flagged (recall) at the head's threshold, as one JSON object per length.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cut(text: str, words: int) -> str:
    return text if words == 0 else " ".join(text.split()[:words])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="judges/minilm-beavertails")
    parser.add_argument("--data-dir", default=None, help="folder with beavertails_refusals_test (default: the hub)")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--words", default="0,40,18", help="comma list of answer lengths in words (0 = whole)")
    args = parser.parse_args()

    from inoculate.data.sources import load_records
    from inoculate.evaluation.embedding_judge import EmbeddingJudge
    from inoculate.evaluation.metrics import BLANK_QUESTION

    judge = EmbeddingJudge(args.head)
    records = load_records("beavertails_refusals", "test", data_dir=args.data_dir, limit=args.pairs)
    prompts = [r.prompt for r in records]
    for words in (int(w) for w in args.words.split(",")):
        row = {"words": words or "whole", "pairs": len(records), "head": args.head}
        for kind, answers in (("refusal", [cut(r.refusal, words) for r in records]),
                              ("harmful", [cut(r.response, words) for r in records])):
            for view, questions in (("io", prompts), ("o", [BLANK_QUESTION] * len(records))):
                flagged = judge.scores(questions, answers) > judge.threshold
                row[f"{kind}_flagged_{view}"] = round(float(flagged.float().mean()), 3)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
