"""TAR (Tamirisa et al. 2025): tamper-resistant training by first-order meta-learning.

Each outer step simulates a fine-tuning adversary: K inner optimizer steps on harmful data,
starting from the current weights, at a learning rate sampled per step. Along that
trajectory the gradient of a tamper-resistance loss (keep the adversary's model from
predicting harmful answers: maximal output entropy, or refusals) is taken at the adversary's
weights and applied to the defender's weights (first order, as in MAML's first-order
approximation). A retain loss keeps the model useful. See docs/methods/tar.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from ..config import ConfigError, doc
from ._layers import answer_rows
from .base import Defense, DefenseConfig, StreamSpec, register_defense


@dataclass
class TARConfig(DefenseConfig):
    inner_steps: int = doc(64, "K, adversary steps per outer step (TAR: 64)")
    tamper_every: int = doc(4, "take the tamper-resistance gradient every this many inner steps (TAR: 4)")
    inner_lrs: list[float] = doc(
        [2e-6, 2e-5, 4e-5], "adversary learning rates, one drawn uniformly per outer step (TAR)")
    inner_optimizer: str = doc(
        "adamw", "adversary optimizer: adamw | sgd. ASSUMPTION: adamw, the optimizer of "
        "TAR's training adversaries as we read the paper; sgd is the cheaper option")
    inner_weight_decay: float = doc(0.0, "adversary AdamW weight decay. ASSUMPTION: 0")
    inner_betas: list[float] = doc([0.9, 0.999], "adversary AdamW betas (torch defaults)")
    inner_eps: float = doc(1e-8, "adversary AdamW epsilon (torch default)")
    adversary_batch_size: int = doc(
        0, "harmful examples per inner step; 0 = the run's per_device_train_batch_size. "
        "ASSUMPTION: TAR's adversary batch is not reproduced exactly")
    tamper_loss: str = doc(
        "entropy", "tamper-resistance loss at the adversary's weights: entropy (negative "
        "entropy of the next-token distribution over harmful answer positions; minimizing it "
        "maximizes entropy; TAR's weaponization setting) | refusal (CE toward refusals)")
    tamper_batch_size: int = doc(0, "held-out examples for the tamper loss; 0 = the run's batch size")
    schedule_lambda: float = doc(
        0.0625, "tamper gradient at inner step k (0-based) weighs exp(λ(k − K + 1)), "
        "normalized to sum to 1 (TAR: λ = 0.0625; the normalization is our choice)")
    tamper_weight: float = doc(4.0, "weight of the tamper-resistance gradient. ASSUMPTION: 4.0, "
                               "as we read TAR's config")
    retain_weight: float = doc(1.0, "weight of the retain CE (TAR: 1.0)")
    retain_stream: str = doc(
        "general", "retain data: general (benign instruction -> answer) | align (harmful "
        "prompt -> refusal)")

    def __post_init__(self):
        if self.inner_steps < 1 or self.tamper_every < 1:
            raise ConfigError("tar: inner_steps and tamper_every must be >= 1")
        if self.tamper_every > self.inner_steps:
            raise ConfigError(f"tar: tamper_every={self.tamper_every} > inner_steps="
                             f"{self.inner_steps} would never take a tamper-resistance gradient")
        if self.inner_optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"tar: inner_optimizer must be adamw or sgd, got {self.inner_optimizer!r}")
        if self.tamper_loss not in ("entropy", "refusal"):
            raise ConfigError(f"tar: tamper_loss must be entropy or refusal, got {self.tamper_loss!r}")
        if self.retain_stream not in ("general", "align"):
            raise ConfigError(f"tar: retain_stream must be general or align, got {self.retain_stream!r}")
        if not self.inner_lrs or any(lr <= 0 for lr in self.inner_lrs):
            raise ConfigError(f"tar: inner_lrs must be positive, got {self.inner_lrs}")


def tamper_weights(inner_steps: int, every: int, lam: float) -> Dict[int, float]:
    """{k: w_k} for the inner steps k (0-based) after which the tamper gradient is taken:
    k = every−1, 2·every−1, ...; w_k ∝ exp(lam·(k − K + 1)), summing to 1."""
    ks = [k for k in range(inner_steps) if (k + 1) % every == 0]
    raw = {k: math.exp(lam * (k - inner_steps + 1)) for k in ks}
    total = sum(raw.values())
    return {k: w / total for k, w in raw.items()}


def negative_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer positions of Σ_v p_v log p_v (fp32); its minimum is −log |V|."""
    rows, _ = answer_rows(logits, labels)
    if rows.shape[0] == 0:
        raise ValueError("tar: tamper batch has no answer positions (all labels are -100)")
    logp = F.log_softmax(rows.float(), dim=-1)
    return (logp.exp() * logp).sum(dim=-1).mean()


@register_defense("tar")
class TAR(Defense):
    """TAR, first order. Per outer step: K adversary passes, K/tamper_every tamper passes and
    1 retain pass, all forward/backward: ``passes_per_step`` = K + K/4 + 1 = 81 at the defaults.

    Step 1: draw the adversary's learning rate uniformly from inner_lrs (torch's global
            generator, so resumed runs draw the same sequence).
    Step 2: save a copy of the trainable parameters θ.
    Step 3: for k = 0..K−1: one adversary step on harmful batch k (harmful CE; SGD, or AdamW
            with its own fresh moments), in place, using gradients from autograd (p.grad is
            left to the engine). After step k, when (k+1) % tamper_every == 0, take
            g_k = ∇ L_TR at the adversary's current weights on the held-out tamper batch
            and add w_k·g_k to an fp32 accumulator (w_k from :func:`tamper_weights`).
    Step 4: restore θ bit-exactly from the copy.
    Step 5: g_r = ∇ CE(θ; retain batch).
    Step 6: grad = tamper_weight·Σ_k w_k g_k + retain_weight·g_r, times scale, into p.grad.

    Memory beyond SFT: one copy of the trainable parameters, the fp32 tamper accumulator,
    the adversary's AdamW moments (two fp32 copies; none with SGD), and one gradient list.
    """

    config_class = TARConfig

    def __init__(self, config, batch_size):
        super().__init__(config, batch_size)
        self.passes_per_step = config.inner_steps + config.inner_steps // config.tamper_every + 1
        self.adversary_batch = config.adversary_batch_size or batch_size
        self.tamper_batch = config.tamper_batch_size or batch_size

    def streams(self):
        cfg = self.config
        return {
            "retain": StreamSpec(cfg.retain_stream, self.batch_size),
            # one draw holds all K adversary batches, split in accumulate
            "adversary": StreamSpec("harmful", self.adversary_batch * cfg.inner_steps),
            "tamper": StreamSpec("harmful" if cfg.tamper_loss == "entropy" else "align",
                                 self.tamper_batch),
        }

    # -- pieces -----------------------------------------------------------------------------------
    def adversary_batches(self, batch: dict) -> List[dict]:
        k, b = self.config.inner_steps, self.adversary_batch
        n = batch["input_ids"].shape[0]
        if n < k * b:
            raise ConfigError(f"tar: the adversary draw holds {n} examples but inner_steps x "
                             f"adversary_batch_size = {k * b}; use more harmful data or fewer steps")
        out = []
        for i in range(k):
            part = {key: v[i * b:(i + 1) * b] for key, v in batch.items()}
            width = int(part["attention_mask"].sum(dim=1).max())  # right padding: trim columns
            out.append({key: v[:, :width] for key, v in part.items()})
        return out

    def tamper_loss(self, batch: dict) -> torch.Tensor:
        if self.config.tamper_loss == "entropy":
            return negative_entropy(*self.answer_logits(batch))
        return self.lm_loss(batch)

    @torch.no_grad()
    def _adversary_update(self, grads, lr: float, t: int, state) -> None:
        cfg = self.config
        if cfg.inner_optimizer == "sgd":
            for p, g in zip(self.params, grads):
                p.add_(g.to(p.dtype), alpha=-lr)
            torch.clear_autocast_cache()  # the next pass must see the moved weights under autocast
            return
        b1, b2 = cfg.inner_betas
        c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        for p, g, m, v in zip(self.params, grads, state["m"], state["v"]):
            g = g.float()
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            if cfg.inner_weight_decay:
                p.mul_(1.0 - lr * cfg.inner_weight_decay)
            step = (m / c1) / ((v / c2).sqrt() + cfg.inner_eps)
            p.add_(step.to(p.dtype), alpha=-lr)
        torch.clear_autocast_cache()  # the next pass must see the moved weights under autocast

    def _fresh_state(self):
        """The adversary's AdamW moments, zero (None for SGD)."""
        if self.config.inner_optimizer != "adamw":
            return None
        return {"m": [torch.zeros_like(p, dtype=torch.float32) for p in self.params],
                "v": [torch.zeros_like(p, dtype=torch.float32) for p in self.params]}

    def _adversary(self, batches: List[dict], lr: float, state, after_step) -> List[float]:
        """Step 3 in place: one adversary step per batch (harmful CE) at learning rate lr, calling
        after_step(k) at the adversary's weights after step k; returns the adversary's losses.
        The caller restores θ."""
        losses = []
        for k, batch in enumerate(batches):
            loss = self.lm_loss(batch)
            self._adversary_update(self.grads(loss), lr, k + 1, state)
            losses.append(loss.item())
            after_step(k)
        return losses

    @torch.no_grad()
    def _restore(self, saved) -> None:
        for p, s in zip(self.params, saved):
            p.copy_(s)
        torch.clear_autocast_cache()

    # -- one outer step ---------------------------------------------------------------------------
    def accumulate(self, batches, scale):
        cfg = self.config
        lr = cfg.inner_lrs[int(torch.randint(len(cfg.inner_lrs), ()))]               # Step 1
        weights = tamper_weights(cfg.inner_steps, cfg.tamper_every, cfg.schedule_lambda)
        adversary = self.adversary_batches(batches["adversary"])
        tamper_batch = batches["tamper"]
        saved = [p.detach().clone() for p in self.params]                            # Step 2
        accum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        state = self._fresh_state()
        tamper_losses = []

        def tamper(k):  # after inner step k, at the adversary's weights
            if k in weights:
                tl = self.tamper_loss(tamper_batch)
                for a, g in zip(accum, self.grads(tl)):
                    a.add_(g.float(), alpha=weights[k])
                tamper_losses.append(tl.item())

        try:
            adv_losses = self._adversary(adversary, lr, state, tamper)                # Step 3
        finally:
            self._restore(saved)                                                     # Step 4
        del saved, state
        retain = self.lm_loss(batches["retain"])                                     # Step 5
        g_r = self.grads(retain)
        self.add_to_grad(accum, scale * cfg.tamper_weight)                           # Step 6
        self.add_to_grad(g_r, scale * cfg.retain_weight)
        tamper = sum(w * l for w, l in zip(weights.values(), tamper_losses))
        return {"loss": cfg.retain_weight * retain.item() + cfg.tamper_weight * tamper,
                "retain_loss": retain.item(), "tamper_loss": tamper,
                "adversary_loss_first": adv_losses[0], "adversary_loss_last": adv_losses[-1],
                "inner_lr": lr}

    def probe(self, batches, at_point=None):
        """TAR's terms on held-out batches (the alignment monitor): the retain loss and the tamper
        loss at θ; then the simulated adversary, run as training runs it but deterministically
        (no random number is drawn): K steps of the inner optimizer at the largest of inner_lrs,
        each on the whole held-out harmful batch, followed by the tamper loss at the adversary's
        last weights (tamper_loss_end) and `at_point()`'s values there as point/<key>. K + 3
        passes, K of them with a backward. Nothing reaches p.grad; θ is restored bit-exactly."""
        cfg = self.config
        with torch.no_grad():
            logs = {"retain_loss": self.lm_loss(batches["retain"]).item(),
                    "tamper_loss_start": self.tamper_loss(batches["tamper"]).item()}
        saved = [p.detach().clone() for p in self.params]
        point = {}
        try:
            losses = self._adversary([batches["adversary"]] * cfg.inner_steps, max(cfg.inner_lrs),
                                     self._fresh_state(), lambda k: None)
            with torch.no_grad():
                logs["tamper_loss_end"] = self.tamper_loss(batches["tamper"]).item()
            if at_point is not None:
                point = at_point()
        finally:
            self._restore(saved)
        logs.update({"adversary_loss_first": losses[0], "adversary_loss_last": losses[-1]})
        logs.update({f"point/{k}": v for k, v in point.items()})
        return logs
