"""Batched greedy generation for evaluation.

Prompts are built exactly as training builds them (``format_prompt`` and the same BOS rule as
``data.encode.encode_record``), left-padded so every row ends at the same column and the
first new token of each row is predicted from its own last prompt token. Rows are grouped
by prompt length so a batch holds prompts of similar length (less padding), then put back
in the caller's order.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.encode import _adds_bos
from ..data.records import Record
from ..data.templates import format_prompt


def prompt_token_ids(record: Record, tokenizer, template: str) -> list[int]:
    """The token ids the model continues from: the formatted prompt, with BOS in front when the
    tokenizer would add one and the template is not the chat template (which writes its own)."""
    ids = tokenizer(format_prompt(record, template, tokenizer), add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "bos_token_id", None) is not None and template != "chat" and _adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation-config EOS
    (chat models often stop on an end-of-turn token that differs from the tokenizer's EOS)."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if value is None:
            continue
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if i not in ids:
                ids.append(int(i))
    return ids


@contextmanager
def _padding_side(tokenizer, side: str):
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def generate(
    model,
    tokenizer,
    records: Sequence[Record],
    template: str,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
    suppress_tokens: Sequence[int] = (),
) -> list[str]:
    """Greedy answers to `records`, in their order, without the prompt and special tokens.

    Works for a plain HF causal LM and for a peft ``PeftModel``. The model is put in eval mode
    for the call and its previous mode restored; the tokenizer's padding side is restored too.
    Each answer stops at the first stop token (see ``stop_token_ids``) or after
    `max_new_tokens` tokens. The decoded text is returned as is (not stripped).
    `suppress_tokens`: token ids never generated (their logits set to −inf at every step), to
    read what a collapsed model writes with its collapse token taken away.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    records = list(records)
    if not records:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    stops = stop_token_ids(model, tokenizer)
    device = _model_device(model)

    encoded = [prompt_token_ids(r, tokenizer, template) for r in records]
    # Longest first: an out-of-memory error shows on the first batch, not after an hour.
    order = sorted(range(len(records)), key=lambda i: -len(encoded[i]))
    answers: list[str | None] = [None] * len(records)

    was_training = model.training
    model.eval()
    try:
        with _padding_side(tokenizer, "left"), torch.inference_mode():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="generating", disable=not progress, leave=False):
                rows = order[start:start + batch_size]
                batch = tokenizer.pad([{"input_ids": encoded[i]} for i in rows], padding=True,
                                      return_tensors="pt")
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch["attention_mask"].to(device)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=stops or None,
                    pad_token_id=pad_id,
                    suppress_tokens=list(suppress_tokens) or None,
                )
                new_tokens = out[:, input_ids.shape[1]:].tolist()
                for row, tokens in zip(rows, new_tokens):
                    answers[row] = tokenizer.decode(_cut_at_stop(tokens, stops), skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [a if a is not None else "" for a in answers]


def _cut_at_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """Tokens before the first stop token (rows that finished early are padded after it)."""
    for k, t in enumerate(tokens):
        if t in stops:
            return tokens[:k]
    return tokens
