"""Vaccine (Huang et al. 2024): alignment that stays put under perturbed hidden activations.

Harmful fine-tuning drifts the hidden embeddings of the alignment data ("harmful embedding
drift"). Vaccine trains the alignment loss at the worst-case drift of every attention block's
output inside a ball of radius ρ, so the alignment survives a later drift. Weights are never
perturbed; only activations are. See docs/methods/vaccine.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from ..config import doc
from ._layers import attention_modules, first_tensor, replace_first
from .base import Defense, DefenseConfig, StreamSpec, global_norm, register_defense, sum_across_processes


@dataclass
class VaccineConfig(DefenseConfig):
    rho: float = doc(
        2.0,
        "radius of the activation perturbation (global L2 norm over all layers' attention "
        "outputs). Vaccine repo scripts: 2; the Booster repo's Vaccine baseline: 5. Which one "
        "the CTRAP paper's comparison used is not stated: ASSUMPTION: 2, Vaccine's own value")
    eps: float = doc(1e-7, "added to the gradient norm before dividing. ASSUMPTION: 1e-7, the "
                      "small constant of the Huang-group code")


@register_defense("vaccine")
class Vaccine(Defense):
    """Vaccine, 2 forward/backward passes per step, all on the alignment batch.

    Step 1: forward the alignment batch with forward hooks on every attention block (found
            by :func:`attention_modules`, no class names) that keep its output tensor a_l;
            backpropagate the alignment CE to those outputs only: g_l = dL/da_l (no parameter
            gradient is formed in this pass).
    Step 2: ‖g‖ = sqrt(Σ_l ‖g_l‖²), the global norm over all layers (fp32), and with several
            processes over all of their examples (the global batch's norm).
    Step 3: δ_l = ρ·g_l/(‖g‖ + eps), the loss-increasing perturbation of radius ρ.
    Step 4: forward again with hooks that return a_l + δ_l (δ_l is a constant: no gradient
            flows through it), backpropagate the perturbed CE to the parameters; that gradient,
            times scale, is added to p.grad.

    Logs the clean loss (pass 1) and the perturbed loss (pass 2, the one trained on).
    """

    config_class = VaccineConfig
    passes_per_step = 2

    def streams(self):
        return {"align": StreamSpec("align", self.batch_size)}

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        self.attention = attention_modules(model)  # fails early with a clear error

    # Step 1 ---------------------------------------------------------------------------------------
    def attention_gradients(self, batch: dict):
        """(clean loss, [g_l]) with g_l the gradient of the alignment CE w.r.t. attention output l."""
        outputs: Dict[int, torch.Tensor] = {}

        def capture(index):
            def hook(module, args, output):
                if index in outputs:  # a recomputation (activation checkpointing): keep the first
                    return None
                a = first_tensor(output)
                if not a.requires_grad:
                    # nothing trainable upstream (e.g. LoRA only in later layers): make the
                    # activation a leaf so its gradient is still defined
                    a = a.detach().requires_grad_(True)
                    outputs[index] = a
                    return replace_first(output, a)
                outputs[index] = a
                return None
            return hook

        handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(self.attention)]
        try:
            loss = self.lm_loss(batch)
        finally:
            for h in handles:
                h.remove()
        acts = [outputs[i] for i in range(len(self.attention))]
        grads = torch.autograd.grad(loss, acts, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]
        return loss.detach(), grads

    # Steps 2-3 ------------------------------------------------------------------------------------
    def perturbations(self, grads: List[torch.Tensor]) -> List[torch.Tensor]:
        """δ_l = ρ·g_l/(‖g‖ + eps). With several processes each holds the gradients of its own
        examples, and ‖g‖ is taken over all of them (the squared norms summed across processes):
        then every example gets the perturbation one process with the whole batch would give it
        (that process's loss is the mean of the processes' losses, so its g_l are theirs divided
        by the number of processes, and the factor cancels in g_l/‖g‖)."""
        norm = sum_across_processes(global_norm(grads) ** 2).sqrt()
        return [(self.config.rho * g.float() / (norm + self.config.eps)).detach() for g in grads]

    # Step 4 ---------------------------------------------------------------------------------------
    def perturbed_loss(self, batch: dict, deltas: List[torch.Tensor]) -> torch.Tensor:
        def add(delta):
            def hook(module, args, output):
                a = first_tensor(output)
                return replace_first(output, a + delta.to(a.dtype))
            return hook

        handles = [m.register_forward_hook(add(d)) for m, d in zip(self.attention, deltas)]
        try:
            return self.lm_loss(batch)
        finally:
            for h in handles:
                h.remove()

    def accumulate(self, batches, scale):
        batch = batches["align"]
        clean, grads = self.attention_gradients(batch)
        deltas = self.perturbations(grads)
        loss = self.perturbed_loss(batch, deltas)
        self.backward(loss, scale)
        return {"loss": loss.item(), "clean_loss": clean.item()}

    def probe(self, batches, at_point=None):
        """Vaccine's two losses on the held-out alignment batch (the alignment monitor): clean
        and at the worst-case drift of radius ρ, as a training micro-step logs them, and their
        difference perturbation_gap, what Vaccine trains to keep small. Pass 1 differentiates to
        the attention outputs only, so nothing reaches p.grad; no weight moves."""
        batch = batches["align"]
        clean, grads = self.attention_gradients(batch)
        with torch.no_grad():
            perturbed = self.perturbed_loss(batch, self.perturbations(grads)).item()
        return {"loss": perturbed, "clean_loss": clean.item(), "perturbation_gap": perturbed - clean.item()}
