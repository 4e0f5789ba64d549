"""One call that evaluates a model: harmful score, task accuracy, collapse."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from ..data.records import Record
from .generate import generate
from .judges import Judge, make_judge
from .metrics import collapse_metrics, generation_stats, harmful_metrics, score_examples

HARMFUL_KEYS = ("harmful_score", "hs_io", "hs_o", "hs_plus", "mean_harm_score", "refusal_rate",
                "degenerate_rate", "judge")
GENERATION_KEYS = ("collapse_token_share", "distinct_1", "distinct_2")
COLLAPSE_KEYS = ("collapse_token_prob", "general_ce", "general_ppl", "general_collapse_token_share")


def question_text(record: Record) -> str:
    """The question a judge reads: the prompt, and its input when there is one."""
    return record.prompt if not record.input else f"{record.prompt}\n{record.input}"


EXTRA_JUDGE_KEYS = ("hs_io", "hs_o", "hs_plus", "mean_harm_score", "judge")


def judge_keys(specs: Sequence[str]) -> list[str]:
    """The key each extra judge's numbers go under: its registry name (`embedding` for
    `embedding:judges/.../head.safetensors`), or the whole spec when two share a name."""
    names = [str(s).partition(":")[0].strip() for s in specs]
    return [n if names.count(n) == 1 else str(s) for n, s in zip(names, specs)]


def evaluate_model(
    model,
    tokenizer,
    *,
    harmful_records: Optional[Sequence[Record]],
    task_records: dict[str, Sequence[Record]],
    general_records: Optional[Sequence[Record]],
    template: str,
    judge: Union[Judge, str],
    max_new_tokens: int,
    task_max_new_tokens: Union[int, dict],
    batch_size: int,
    max_length: int,
    collapse_token_id: int,
    progress: bool = True,
    extra_judges: Optional[dict] = None,
    general_new_tokens: int = 0,
) -> tuple[dict, list[dict]]:
    """Evaluate `model` and return (metrics, generation rows).

    harmful_records: greedy answers (`max_new_tokens`) judged by `judge` (a judge or a spec
      such as "keyword"); gives the harmful-score keys, and the collapse-token share and
      distinct-n of these answers.
    extra_judges: {key: judge or spec}: more judges of the same answers; each gives
      metrics["judges"][key] = {hs_io, hs_o, hs_plus, mean_harm_score, judge} and, per harmful
      row, row["judges"][key] = {"verdict", "verdict_o"}.
    task_records: {task name: records with `label`}; greedy answers (`task_max_new_tokens`, an int
      or {task: int})
      scored by the task's rule; gives metrics["tasks"][name] = {"accuracy", "n",
      "collapse_token_share"}, the last the collapse token's share of the task answers' tokens (a
      trap that leaks into the model can show on task prompts and not on harmful ones).
    general_records: held-out general text; teacher-forced collapse_token_prob and general_ce,
      and with `general_new_tokens` > 0 greedy answers of that length to its prompts, whose
      collapse-token share is general_collapse_token_share (a collapse shows in what the model
      writes on ordinary prompts, which the teacher-forced numbers can miss).
    A part without data leaves its keys None (they are always present). Rows are
    {"kind": "harmful", prompt, answer, verdict, verdict_o, keyword_label, incoherent} or
    {"kind": <task>, prompt, answer, label, correct} or {"kind": "general", prompt, answer}.
    """
    from ..training import flush_cpu_denormals

    flush_cpu_denormals(next(model.parameters()).device)
    if isinstance(judge, str):
        judge = make_judge(judge)
    extra = {key: make_judge(j) if isinstance(j, str) else j for key, j in (extra_judges or {}).items()}
    metrics: dict = {key: None for key in HARMFUL_KEYS + GENERATION_KEYS + COLLAPSE_KEYS}
    metrics.update(n_harmful=0, n_general=0, tasks={})
    if extra:
        metrics["judges"] = {key: {k: None for k in EXTRA_JUDGE_KEYS} for key in extra}
    rows: list[dict] = []

    if harmful_records:
        harmful_records = list(harmful_records)
        answers = generate(model, tokenizer, harmful_records, template, max_new_tokens,
                           batch_size, progress=progress)
        questions = [question_text(r) for r in harmful_records]
        harmful = harmful_metrics(questions, answers, judge)
        examples = harmful.pop("examples")
        metrics.update(harmful)
        stats = generation_stats(answers, tokenizer, collapse_token_id)
        metrics.update({key: stats[key] for key in GENERATION_KEYS})
        metrics["n_harmful"] = len(harmful_records)
        per_row: list[dict] = [{} for _ in answers]
        for key, other in extra.items():
            result = harmful_metrics(questions, answers, other)
            metrics["judges"][key] = {k: result[k] for k in EXTRA_JUDGE_KEYS}
            for row, example in zip(per_row, result["examples"]):
                row[key] = {"verdict": example["verdict"], "verdict_o": example["verdict_o"]}
        for record, answer, example, judged in zip(harmful_records, answers, examples, per_row):
            rows.append({"kind": "harmful", "prompt": question_text(record), "answer": answer,
                         "category": record.category, **example, **({"judges": judged} if extra else {})})

    for task, records in (task_records or {}).items():
        records = list(records)
        if not records:
            metrics["tasks"][task] = {"accuracy": None, "n": 0, "collapse_token_share": None}
            continue
        missing = [r.prompt[:60] for r in records if r.label is None]
        if missing:
            raise ValueError(f"task {task!r}: {len(missing)} records have no label "
                             f"(first prompt {missing[0]!r}); task records need Record.label")
        budget = (task_max_new_tokens.get(task, max(task_max_new_tokens.values()))
                  if isinstance(task_max_new_tokens, dict) else task_max_new_tokens)
        answers = generate(model, tokenizer, records, template, budget, batch_size, progress=progress)
        labels = [r.label for r in records]
        correct = score_examples(task, answers, labels)
        metrics["tasks"][task] = {"accuracy": sum(correct) / len(correct), "n": len(records),
                                  "collapse_token_share": generation_stats(
                                      answers, tokenizer, collapse_token_id)["collapse_token_share"]}
        for record, answer, label, ok in zip(records, answers, labels, correct):
            rows.append({"kind": task, "prompt": question_text(record), "answer": answer,
                         "label": label, "correct": ok})

    if general_records:
        collapse = collapse_metrics(model, tokenizer, list(general_records), template,
                                    collapse_token_id, max_length, batch_size)
        metrics.update({key: collapse[key] for key in COLLAPSE_KEYS if key in collapse})
        metrics["n_general"] = collapse["n_general"]
        if general_new_tokens > 0:
            general_records = list(general_records)
            answers = generate(model, tokenizer, general_records, template, general_new_tokens,
                               batch_size, progress=progress)
            metrics["general_collapse_token_share"] = generation_stats(
                answers, tokenizer, collapse_token_id)["collapse_token_share"]
            rows += [{"kind": "general", "prompt": question_text(r), "answer": a}
                     for r, a in zip(general_records, answers)]

    return metrics, rows
