"""Booster (Huang et al. 2024): alignment plus attenuation of the harmful perturbation.

A harmful fine-tuning step lowers the harmful loss h. Booster adds a regularizer that makes
that step lower h as little as possible: h(θ) − h(θ − α·∇h/‖∇h‖), the loss drop of one
normalized harmful step, minimized with a first-order gradient. See docs/methods/booster.md.

Cost: 3 forward/backward passes per step; with `lookahead_every=k` (amortized mode) the two
harmful passes run every k-th step only, 1 + 2/k passes per step on average.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..config import ConfigError, doc
from .base import Defense, DefenseConfig, StreamSpec, global_norm, register_defense


@dataclass
class BoosterConfig(DefenseConfig):
    lam: float = doc(
        5.0,
        "λ, weight of the harmful-loss-reduction regularizer. Booster repo scripts pass "
        "--lamb 5; the argparse default there (0.001) is not what the paper's runs used")
    alpha: float = doc(0.1, "α, length of the simulated normalized harmful step (Booster scripts: 0.1)")
    harmful_batch_size: int = doc(10, "harmful examples per step for h (Booster code: 10)")
    eps: float = doc(1e-7, "added to ‖∇h‖ before dividing (the Huang-group code's guard, as in CTRAP)")
    lookahead_every: int = doc(1, "recompute the regularizer's gradient ∇h(θ) − ∇h(θ') (the two harmful "
                                  "passes) every k micro-steps and reuse the cached one in between "
                                  "(amortized mode, 1 + 2/k passes per step; 1 = every step, the code's)")

    def __post_init__(self):
        if self.lookahead_every < 1:
            raise ConfigError(f"booster.lookahead_every must be >= 1, got {self.lookahead_every}")


@register_defense("booster")
class Booster(Defense):
    """Booster, 3 forward/backward passes per step.

    Step 1: g_h = ∇h(θ), h the harmful CE on a harmful batch (prompt -> harmful answer).
    Step 2: g_f = ∇f(θ), f the alignment CE (harmful prompt -> refusal).
    Step 3: move in place to θ' = θ − α·g_h/(‖g_h‖ + eps) (global norm over all trainable
            tensors); g_h' = ∇h(θ') on the same harmful batch; restore θ bit-exactly.
    Step 4: grad = g_f + λ·(g_h − g_h'), times scale, added to p.grad.

    Each gradient list is added into p.grad (in the order g_f, λ·g_h, −λ·g_h') as soon as it
    exists and then dropped: g_f before Step 3, g_h as soon as the move is applied (it is the
    direction), so the pass at θ' runs with only p.grad and the restore copy alive.

    First order: ∇ of h(θ − α·ĝ_h) is taken as ∇h at θ' (no derivative through ĝ_h), as in the
    official code.

    Amortized mode (`lookahead_every=k > 1`): every k-th micro-step (and the first) Steps 1 and
    3 compute d = g_h − g_h' and cache it; the other micro-steps run Step 2 only. Every
    micro-step adds scale·(g_f + λ·d) with the cached d: 1 + 2/k passes per step on average
    (``passes_per_step`` of the instance); memory: the cache, one more copy of the trainable
    parameters. The cache is not checkpointed: after a resume the first step recomputes it.
    """

    config_class = BoosterConfig
    passes_per_step = 3

    def __init__(self, config: BoosterConfig, batch_size: int):
        super().__init__(config, batch_size)
        if config.lookahead_every > 1:
            self.passes_per_step = 1 + 2 / config.lookahead_every  # mean over k micro-steps
        self.cached: Optional[List[torch.Tensor]] = None  # g_h − ∇h(θ'), amortized mode only

    def streams(self):
        return {"align": StreamSpec("align", self.batch_size),
                "harmful": StreamSpec("harmful", self.config.harmful_batch_size)}

    def step_length(self, norm) -> float:
        """The factor of g_h in the simulated step θ' = θ − α·g_h/(‖g_h‖ + eps)."""
        return -self.config.alpha / (float(norm) + self.config.eps)

    def accumulate(self, batches, scale):
        cfg = self.config
        harmful, align = batches["harmful"], batches["align"]
        k = cfg.lookahead_every
        refresh = self.lookahead_due(k, self.cached)
        if not refresh:
            f = self.lm_loss(align)
            self.backward(f, scale)
            self.add_to_grad(self.cached, scale * cfg.lam)
            return {"loss": f.item()}
        # Step 1
        h = self.lm_loss(harmful)
        g_h = self.grads(h)
        norm = global_norm(g_h)
        step = self.step_length(norm)
        # Step 2, into p.grad at once (Step 4's first term)
        f = self.lm_loss(align)
        g_f = self.grads(f)
        self.add_to_grad(g_f, scale)
        del g_f
        # Step 3
        if k == 1:
            self.add_to_grad(g_h, scale * cfg.lam)
            with self.moved(g_h, step, release=True):  # g_h is freed before the pass at θ'
                h_moved = self.lm_loss(harmful)
                g_h_moved = self.grads(h_moved)
            self.add_to_grad(g_h_moved, -scale * cfg.lam)
        else:
            self.cached = None  # the old cache goes before the new one is built
            with self.moved(g_h, step):
                h_moved = self.lm_loss(harmful)
                g_h_moved = self.grads(h_moved)
            for a, b in zip(g_h, g_h_moved):
                a.sub_(b)
            del a, b
            self.cached = g_h  # g_h − g_h', unscaled
            self.add_to_grad(self.cached, scale * cfg.lam)
        del g_h_moved
        return {"loss": f.item(), "harmful_loss": h.item(), "harmful_loss_moved": h_moved.item(),
                "harmful_reduction": (h - h_moved).item(), "harmful_grad_norm": float(norm)}

    def probe(self, batches, at_point=None):
        """Booster's terms on held-out batches (the alignment monitor): the alignment loss, the
        harmful loss at θ and at θ' = θ − α·g_h/(‖g_h‖ + eps) on the held-out harmful batch, and
        their difference harmful_reduction (what the regularizer keeps small), as a training
        micro-step logs them; `at_point()`'s values at θ' as point/<key>. Nothing reaches p.grad,
        the amortized cache is kept, θ is restored bit-exactly."""
        harmful = batches["harmful"]
        with torch.no_grad():
            f = self.lm_loss(batches["align"]).item()
        h = self.lm_loss(harmful)
        g_h = self.grads(h)
        norm = global_norm(g_h)
        point = {}
        with self.moved(g_h, self.step_length(norm), release=True):
            with torch.no_grad():
                h_moved = self.lm_loss(harmful).item()
            if at_point is not None:
                point = at_point()
        logs = {"loss": f, "harmful_loss": h.item(), "harmful_loss_moved": h_moved,
                "harmful_reduction": h.item() - h_moved, "harmful_grad_norm": float(norm)}
        logs.update({f"point/{k}": v for k, v in point.items()})
        return logs
