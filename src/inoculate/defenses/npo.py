"""NPO (Zhang et al. 2024): negative preference optimization, used as an alignment-stage
unlearning baseline on harmful answers.

NPO is DPO with only a rejected answer: it lowers the likelihood of harmful answers relative
to the starting model, with a loss that saturates (unlike plain gradient ascent, which
diverges) once the model is far below the reference. A retain term keeps refusals learned
(the "gradient difference" variant). See docs/methods/npo.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import doc
from ..data.encode import IGNORE_INDEX
from .base import (Defense, DefenseConfig, StreamSpec, accepts_logits_to_keep, keep_positions,
                   register_defense)


@dataclass
class NPOConfig(DefenseConfig):
    beta: float = doc(0.1, "β, inverse temperature of the NPO loss (NPO paper/code default 0.1)")
    retain_weight: float = doc(
        1.0,
        "weight of the retain CE on refusals (align stream), the grad-diff variant; 0 gives "
        "pure NPO. ASSUMPTION: 1.0 (NPO+RT in the paper adds the retain loss unweighted)")


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence negative log-likelihood of the answer, summed over answer tokens: (B,)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum(dim=1)


def npo_loss(nll: torch.Tensor, nll_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """−(2/β)·mean log σ(β·(NLL_θ − NLL_ref)). Equals (2/β)·log 2 at θ = ref; decreasing it
    raises NLL_θ, and it flattens out once NLL_θ ≫ NLL_ref."""
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - nll_ref)).mean()


def answer_logits_of(model, batch: dict):
    """(logits, labels) from the first answer position on (``logits_to_keep`` when the model
    takes it): the prompt positions carry no NLL."""
    labels = batch["labels"]
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    keep = keep_positions(labels)
    if keep < labels.shape[1] and accepts_logits_to_keep(model):
        return model(**kw, logits_to_keep=keep).logits, labels[:, -keep:]
    return model(**kw).logits, labels


@register_defense("npo")
class NPO(Defense):
    """NPO + retain CE. Per step: 2 forward/backward passes and 1 forward without gradient
    (the reference), so ``passes_per_step`` counts 3.

    Step 1: NLL_ref(y|x) of each harmful answer under the frozen starting model, no gradient:
            with LoRA, the same model with the adapter disabled (``disable_adapter``), so no
            copy is kept; full-parameter, a frozen deep copy made in ``setup`` (one extra full
            model in memory, same device and dtype).
    Step 2: NLL_θ(y|x) of the same answers under the trained model, summed over answer tokens.
    Step 3: L_npo = −(2/β)·mean log σ(β·(NLL_θ − NLL_ref)).
    Step 4: L_retain = CE on refusals (align stream), token mean.
    Step 5: backward of scale·(L_npo + retain_weight·L_retain).
    """

    config_class = NPOConfig
    passes_per_step = 3

    def streams(self):
        return {"harmful": StreamSpec("harmful", self.batch_size),
                "align": StreamSpec("align", self.batch_size)}

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        if self.config.beta <= 0:
            raise ValueError(f"npo: beta must be > 0, got {self.config.beta}")
        self.uses_adapter = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        self.reference = None
        if not self.uses_adapter:
            # full-parameter: the reference is a frozen copy of the starting weights
            self.reference = copy.deepcopy(model)
            self.reference.requires_grad_(False)

    @torch.no_grad()
    def reference_nll(self, batch: dict) -> torch.Tensor:
        if self.uses_adapter:
            with self.model.disable_adapter():
                return sequence_nll(*answer_logits_of(self.model, batch))
        self.reference.train(self.model.training)  # same dropout behaviour as the policy
        return sequence_nll(*answer_logits_of(self.reference, batch))

    def loss_and_logs(self, batches):
        harmful = batches["harmful"]
        nll_ref = self.reference_nll(harmful)                                    # Step 1
        nll = sequence_nll(*self.answer_logits(harmful))                         # Step 2
        loss = npo_loss(nll, nll_ref, self.config.beta)                          # Step 3
        logs = {"npo_loss": loss.item(), "harmful_nll": nll.mean().item(),
                "harmful_nll_ref": nll_ref.mean().item()}
        if self.config.retain_weight:
            retain = self.lm_loss(batches["align"])                              # Step 4
            loss = loss + self.config.retain_weight * retain
            logs["retain_loss"] = retain.item()
        logs["loss"] = loss.item()
        return loss, logs

    def accumulate(self, batches, scale):
        loss, logs = self.loss_and_logs(batches)
        self.backward(loss, scale)                                               # Step 5
        return logs

    def probe(self, batches, at_point=None):
        """NPO's terms on held-out batches (the alignment monitor): the NPO loss, the harmful
        answers' NLL under θ and under the reference, and the retain CE, as a training
        micro-step logs them; no gradient is taken."""
        with torch.no_grad():
            return self.loss_and_logs(batches)[1]
