"""SEAM: self-destructive model (Wang, Zhu, Wang 2025).

Objective   min_θ  L_ul + α·L_up + β·L_sd

  L_up = CE(θ; harmful prompt -> refusal)                       keeps the model safe and useful
  L_ul = −log(1 + S/n),  S = CE(logits) + Σ_{l=0..n-1} CE(head(norm(h_l)))
         over the n hidden states (embeddings included), harmful answers only: a damped
         gradient ascent on harmful answers at every depth (RepNoise's amplifier; S is
         ``_layers.logit_lens_sum``, shared with RepNoise's S_harm)
  L_sd = cos(g_a, g_b),  g_a = ∇CE(θ; harmful answers), g_b = ∇CE(θ; benign, Alpaca)
         minimizing it makes a harmful fine-tuning step work against benign ability

∇L_sd = H_a(ĝ_b − c·ĝ_a)/‖g_a‖ + H_b(ĝ_a − c·ĝ_b)/‖g_b‖   with ĝ = g/‖g‖, c = cos(g_a, g_b).

One optimizer step as the official trainer runs it (6 forward/backward passes):
  Step 1. ∇L_ul on the harmful batch (hidden states of every layer)      -> p.grad
  Step 2. α·∇L_up on the refusal batch                                    -> p.grad
  Step 3. g_a = ∇CE(θ; harmful answers)
  Step 4. g_b = ∇CE(θ; benign batch);  c = g_a·g_b / (‖g_a‖‖g_b‖ + 1e-8)
  Step 5. move θ by ε(ĝ_b − c·ĝ_a), g_a' = ∇CE(θ'; harmful); restore θ bit-exactly
  Step 6. move θ by ε(ĝ_a − c·ĝ_b), g_b' = ∇CE(θ'; benign);  restore θ bit-exactly
          p.grad += (β/ε)·[(g_a' − g_a)/‖g_a‖ + (g_b' − g_b)/‖g_b‖]
The harmful and refusal batches hold the same prompts; "answer tokens" are where the two token
sequences differ (``answer_mask`` from ``collate_paired``). L_ul, L_up and g_a are token-mean
cross-entropies over those positions, g_b over the benign answer (labels != -100).

Options beyond the code: ``exact_hvp=true`` replaces Steps 5-6 by exact Hessian-vector products
(double backward; attention is switched to eager by the pipeline). ``sd_fp32`` (default on) runs
Steps 3-6 with autocast off, so that the ε-move, which lives in the fp32 master weights, is not
rounded away by the bf16 casts inside autocast; directions and g' − g are always formed in fp32.
``lookahead_every=k`` (amortized mode) runs Steps 3-6 every k-th micro-step only, caches ∇L_sd and
adds β times the cached vector on the other micro-steps: 2 + 4/k passes per step on average
instead of 6, plus the cache (one fp32 copy of the trainable parameters; not checkpointed, so a
resumed run recomputes it first).
See docs/methods/seam.md for where this differs from the paper and the authors' code.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..config import ConfigError, doc
from ..data.encode import IGNORE_INDEX
from . import _coupling as coupling
from ._layers import answer_labels, ce_rows, final_norm, logit_lens_sum, output_head, recorded_outputs, unwrap
from .base import (Defense, DefenseConfig, StreamSpec, accepts_logits_to_keep, global_norm, keep_positions,
                   register_defense)

log = logging.getLogger(__name__)


@dataclass
class SEAMConfig(DefenseConfig):
    alpha: float = doc(1.0, "α, weight of L_up, the refusal CE (SEAM trainer seam_args.alpha; "
                            "paper's default α=1)")
    beta: float = doc(0.01, "β, weight of L_sd, the harmful/benign gradient cosine (SEAM trainer "
                            "seam_args.beta; paper's default β=0.01)")
    epsilon: float = doc(1e-3, "ε, finite-difference radius of the Hessian-vector products (SEAM "
                               "trainer seam_args.epsilon, passed as the step of its temporary "
                               "parameter update; paper's default 1e-3)")
    benign_batch_size: Optional[int] = doc(None, "examples per benign (Alpaca) batch; default = the run's "
                                                 "batch size (the SEAM trainer draws one benign batch "
                                                 "per harmful/refusal batch of the same size)")
    exact_hvp: bool = doc(False, "exact Hessian-vector products by double backward instead of the code's "
                                 "finite differences (switches attention to eager)")
    sd_fp32: bool = doc(True, "run the L_sd gradient passes with autocast off, so the ε-move is not "
                              "rounded away by bf16 casts (ours; false = every pass under the run's autocast, "
                              "cheaper but the finite difference then mostly measures bf16 rounding)")
    lookahead_every: int = doc(1, "recompute ∇L_sd (Steps 3-6, the four gradient passes) every k micro-steps "
                                  "and reuse the cached one in between (amortized mode, 2 + 4/k passes per "
                                  "step; 1 = every step, the code's)")

    def __post_init__(self):
        if not self.epsilon > 0:
            raise ConfigError(f"seam.epsilon must be > 0, got {self.epsilon}")
        if self.benign_batch_size is not None and self.benign_batch_size < 1:
            raise ConfigError(f"seam.benign_batch_size must be >= 1, got {self.benign_batch_size}")
        if self.lookahead_every < 1:
            raise ConfigError(f"seam.lookahead_every must be >= 1, got {self.lookahead_every}")


# ---------------------------------------------------------------------------------------------
# Model parts and losses
# ---------------------------------------------------------------------------------------------

def answer_targets(batch: dict) -> torch.Tensor:
    """Bool [B, T-1]: next-token targets that are answer tokens. Position t predicts token t+1;
    a target counts when token t+1 is in ``answer_mask`` (where the harmful and refusal
    sequences differ) and is not a prompt token (labels != -100): see ``_layers.answer_labels``."""
    target = answer_labels(batch)[:, 1:] != IGNORE_INDEX
    if not bool(target.any()):
        raise ValueError("seam: batch has no answer tokens to train on (the harmful and refusal "
                         "answers are identical, or truncated away by max_length)")
    return target


def answer_ce(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Token-mean causal-LM cross-entropy over :func:`answer_targets` of the batch."""
    target = answer_targets(batch)
    return ce_rows(logits[:, :-1][target], batch["input_ids"][:, 1:][target])


def _trim(batch: dict, keep: int) -> dict:
    """The batch's last `keep` positions (every [B, T] tensor)."""
    return {k: v[:, -keep:] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------

@register_defense("seam")
class SEAM(Defense):
    config_class = SEAMConfig
    passes_per_step = 6

    def __init__(self, config: SEAMConfig, batch_size: int):
        super().__init__(config, batch_size)
        if config.lookahead_every > 1:
            self.passes_per_step = 2 + 4 / config.lookahead_every  # mean over k micro-steps
        self.cached_sd: Optional[List[torch.Tensor]] = None  # ∇L_sd, amortized mode only

    def streams(self):
        # paired first: it is the main stream the engine counts epochs on
        return {
            "paired": StreamSpec("paired", self.batch_size),
            "benign": StreamSpec("general", self.config.benign_batch_size or self.batch_size),
        }

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        c = self.config
        low = [(n, p.dtype) for n, p in model.named_parameters()
               if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
        if low and not c.exact_hvp:
            name, dtype = low[0]
            raise ConfigError(
                f"seam: {len(low)} trainable parameters are {dtype} (e.g. {name}). The finite-difference "
                f"move of length ε={c.epsilon} along a unit direction is below {dtype} resolution and "
                f"would be rounded away. Load the model in fp32 (--set dtype=float32; the engine's "
                f"bf16 autocast still runs the other passes in bf16) or use --set seam.exact_hvp=true")
        frozen_low = sorted({str(p.dtype) for p in model.parameters()
                             if not p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
        if frozen_low and not c.exact_hvp:
            log.warning("seam: the frozen base weights are %s; the finite-difference L_sd passes then "
                        "run through %s matmuls and g' - g is mostly rounding (on the tiny test model "
                        "the estimate at epsilon=1e-3 was off by over 300%%). Prefer dtype=float32 or "
                        "seam.exact_hvp=true", ", ".join(frozen_low), ", ".join(frozen_low))
        self.norm = final_norm(model)  # L_ul reads every hidden state through the norm and the head
        output_head(model)
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if c.exact_hvp and attn not in (None, "eager"):
            log.warning("seam.exact_hvp differentiates through attention twice; %s attention kernels "
                        "may lack a double backward (use attn_implementation=eager)", attn)

    # -- the three losses ---------------------------------------------------------------------
    def answer_forward(self, batch: dict, **kw):
        """(outputs, batch cut to the same positions). Prompt positions carry no loss, so when the
        model takes `logits_to_keep` only the trailing positions from the one predicting the first
        answer token on go through the LM head; the batch is cut to match. Same numbers."""
        keep = keep_positions(batch["labels"])
        if keep < batch["labels"].shape[1] and accepts_logits_to_keep(self.model):
            return self.forward(batch, logits_to_keep=keep, **kw), _trim(batch, keep)
        return self.forward(batch, **kw), batch

    def unlearning_loss(self, harmful: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """(L_ul, S): S = CE(final logits) + Σ over every hidden state of CE(head(norm(h))), on the
        harmful answer tokens (``answer_labels``); L_ul = −log(1 + S/n) with n the number of hidden
        states. S is ``_layers.logit_lens_sum`` over every entry, the last included.

        In transformers (4.x and 5.x) ``hidden_states[-1]`` of a causal LM is the last hidden state
        *after* the final norm (5.x replaces the last layer's raw output by ``last_hidden_state``),
        so it is read through the head without a second norm: its term equals the final-logits term.
        The norm's output is captured with a hook and compared, so a model that returns the raw
        last state gets it normed like every other layer. The norm and head are applied only at the
        answer positions (both act per token): the same numbers as on the whole sequence."""
        answer_targets(harmful)  # a batch without answer tokens fails here, before the forward
        with recorded_outputs(self.norm) as normed:
            out, _ = self.answer_forward(harmful, output_hidden_states=True)
        if not normed:
            raise RuntimeError(f"seam: the final norm {type(self.norm).__name__} found on "
                               f"{type(unwrap(self.model)).__name__} did not run in the forward pass")
        total, n = logit_lens_sum(self.model, out, answer_labels(harmful), normed=normed[0])
        return -torch.log1p(total / n), total

    def utility_loss(self, refusal: dict) -> torch.Tensor:
        """L_up: CE of the refusals on their answer tokens (where they differ from the harmful answer)."""
        out, cut = self.answer_forward(refusal)
        return answer_ce(out.logits, cut)

    def harmful_loss(self, harmful: dict) -> torch.Tensor:
        """The attacker's loss whose gradient is g_a: CE of the harmful answers."""
        out, cut = self.answer_forward(harmful)
        return answer_ce(out.logits, cut)

    def benign_loss(self, benign: dict) -> torch.Tensor:
        """The benign loss whose gradient is g_b: CE over the answer (labels != -100)."""
        out, cut = self.answer_forward(benign)
        return answer_ce(out.logits, cut)

    # -- ∇L_sd (the shared coupling term, _coupling.py) ---------------------------------------
    def self_destruct_grad(self, harmful: dict, benign: dict) -> Tuple[List[torch.Tensor], dict]:
        """∇_θ cos(g_a, g_b) (without β), by finite differences (code) or exact HVPs (option).
        Returns the gradient as fp32 tensors aligned with self.params, and the logs."""
        c = self.config
        return coupling.self_destruct_grad(self, harmful, benign, self.harmful_loss, self.benign_loss,
                                           c.epsilon, exact=c.exact_hvp, keep_fp32=c.sd_fp32)

    # -- one micro-step -----------------------------------------------------------------------
    def accumulate(self, batches, scale):
        c = self.config
        harmful, refusal = batches["paired"]["harmful"], batches["paired"]["refusal"]
        loss_ul, s = self.unlearning_loss(harmful)                 # Step 1
        self.backward(loss_ul, scale)
        loss_up = self.utility_loss(refusal)                       # Step 2
        self.backward(loss_up, scale * c.alpha)
        k = c.lookahead_every
        refresh = self.lookahead_due(k, self.cached_sd)
        if not refresh:  # amortized mode: β times the cached ∇L_sd, no L_sd passes
            self.add_to_grad(self.cached_sd, scale * c.beta)
            return {"loss_ul": loss_ul.item(), "loss_up": loss_up.item(), "s_ul": s.item()}
        self.cached_sd = None  # the old cache goes before the new one is built
        sd_grad, logs = self.self_destruct_grad(harmful, batches["benign"])   # Steps 3-6
        logs["sd_grad_norm"] = float(global_norm(sd_grad))  # ‖∇L_sd‖, before β: is it what moves θ?
        self.add_to_grad(sd_grad, scale * c.beta)
        if k > 1:
            self.cached_sd = sd_grad
        del sd_grad
        total = loss_ul.item() + c.alpha * loss_up.item() + c.beta * logs["cos_sd"]
        return {"loss_ul": loss_ul.item(), "loss_up": loss_up.item(), **logs,
                "s_ul": s.item(), "total": total}

    def probe(self, batches, at_point=None):
        """SEAM's terms on held-out batches (the alignment monitor): L_ul and S on the held-out
        harmful answers, L_up on their refusals, and Steps 3-4 (g_a on the harmful answers, g_b
        on the benign batch, in the precision of training's L_sd passes) with cos_sd, the two
        gradient norms and CEs: what a training micro-step logs, minus the finite-difference
        passes. SEAM simulates no attack, so `at_point` is not called. Nothing reaches p.grad,
        the amortized cache is kept and θ is not moved."""
        harmful, refusal = batches["paired"]["harmful"], batches["paired"]["refusal"]
        with torch.no_grad():
            loss_ul, s = self.unlearning_loss(harmful)
            loss_up = self.utility_loss(refusal)
        with coupling.precision(self, self.config.sd_fp32):
            loss_a, g_a, loss_b, g_b, _ = coupling.gradients(self, harmful, batches["benign"],
                                                             self.harmful_loss, self.benign_loss)
            n_a, n_b, cos = coupling.norms_and_cosine(self, g_a, g_b)
        return {"loss_ul": loss_ul.item(), "loss_up": loss_up.item(), "s_ul": s.item(),
                **coupling.sd_logs(cos, n_a, n_b, loss_a, loss_b)}

