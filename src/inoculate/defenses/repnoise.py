"""RepNoise (Rosati et al. 2024): push harmful representations towards Gaussian noise.

Besides learning refusals, RepNoise makes the MLP outputs of every layer on harmful answers
indistinguishable (in MMD) from standard Gaussian noise, and ascends the harmful loss at every
depth (logit lens), damped by a log. A later harmful fine-tune then has little harmful
information left to recover. See docs/methods/repnoise.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ..config import doc
from ._layers import answer_labels, first_tensor, logit_lens_ce, mlp_modules
from .base import (Defense, DefenseConfig, StreamSpec, accepts_logits_to_keep, keep_positions,
                   register_defense)


@dataclass
class RepNoiseConfig(DefenseConfig):
    beta: float = doc(0.001, "β, weight of the noise MMD term (RepNoise paper/code default 0.001)")
    alpha: float = doc(
        1.0,
        "α, weight of the −log(1 + S_harm) ascent term. RepNoise default 1; the Booster repo's "
        "RepNoise baseline scripts use 0.1")
    kernels: int = doc(5, "number of Gaussian kernels in the MMD (RepNoise code: 5)")
    kernel_multiplier: float = doc(2.0, "ratio between successive kernel bandwidths (RepNoise code: 2)")


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, kernels: int = 5,
                 multiplier: float = 2.0) -> torch.Tensor:
    """Biased squared MMD between samples x (n, d) and y (m, d) with a sum of Gaussian kernels.

    D_ij = ‖z_i − z_j‖² over the pooled samples z = [x; y]; base = mean of D over the
    N(N−1) off-diagonal pairs (detached: the bandwidth is a statistic, not a path for
    gradients); bandwidths b_k = base·multiplier^(k − kernels//2), k = 0..kernels−1;
    K = Σ_k exp(−D/b_k); MMD² = mean K_xx + mean K_yy − 2 mean K_xy. Computed in fp32 via the
    Gram matrix, so memory is O(N·d + N²)."""
    n = x.shape[0]
    z = torch.cat([x.float(), y.float()], dim=0)
    sq = (z * z).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
    pairs = z.shape[0] * (z.shape[0] - 1)
    base = (d2.detach().sum() / max(pairs, 1)).clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (base * multiplier ** (i - kernels // 2))) for i in range(kernels))
    return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()


@register_defense("repnoise")
class RepNoise(Defense):
    """RepNoise, 2 forward passes and one backward per step, on a paired batch (the same
    harmful prompts answered harmfully and with a refusal; answer_mask marks the harmful
    answer's tokens that differ from the refusal's).

    Step 1: CE(refusal): token cross-entropy of the refusal version (labels -100 on prompt).
    Step 2: forward the harmful version with output_hidden_states and forward hooks on every
            layer's MLP block (found by :func:`mlp_modules`) keeping its output h_l (B, T, d).
    Step 3: for each layer, x_l = (h_l ⊙ m) flattened per sequence to (B, T·d), m the answer
            mask; y_l = (ε ⊙ m) flattened, ε ~ N(0, I) of h_l's shape (fresh each step, drawn
            layer by layer from torch's global generator); noise = mean_l MMD(x_l, y_l) with
            :func:`gaussian_mmd`.
    Step 4: S_harm = logit-lens CE of the harmful answer tokens (those in the answer mask, as
            SEAM's L_ul), averaged over depths (:func:`logit_lens_ce`: the final logits plus
            lm_head(norm(h)) of the embeddings and of every layer but the last, over the number
            of hidden states; the sum is the one SEAM uses, ``_layers.logit_lens_sum``).
    Step 5: L = CE(refusal) + β·noise − α·log(1 + S_harm); one backward of scale·L.
    """

    config_class = RepNoiseConfig
    passes_per_step = 2

    def streams(self):
        return {"paired": StreamSpec("paired", self.batch_size)}

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        self.mlps = mlp_modules(model)

    def mlp_outputs_and_forward(self, batch: dict):
        """Forward with output_hidden_states; returns (outputs, [MLP output of each layer])."""
        captured: Dict[int, torch.Tensor] = {}

        def keep(index):
            def hook(module, args, output):
                captured.setdefault(index, first_tensor(output))
            return hook

        # the LM head only needs the positions from the first answer token on
        n_keep = keep_positions(batch["labels"])
        kw = ({"logits_to_keep": n_keep}
              if n_keep < batch["labels"].shape[1] and accepts_logits_to_keep(self.model) else {})
        handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(self.mlps)]
        try:
            outputs = self.forward(batch, output_hidden_states=True, **kw)
        finally:
            for h in handles:
                h.remove()
        return outputs, [captured[i] for i in range(len(self.mlps))]

    def noise_mmd(self, mlp_outputs, mask: torch.Tensor, generator=None) -> torch.Tensor:
        """Mean over layers of MMD(h_l, ε_l), ε drawn from `generator` (None: the global one)."""
        m = mask.unsqueeze(-1)
        total = 0.0
        for h in mlp_outputs:
            x = (h.float() * m).reshape(h.shape[0], -1)
            eps = torch.randn(h.shape, device=h.device, dtype=torch.float32, generator=generator)
            y = (eps * m).reshape(h.shape[0], -1)
            total = total + gaussian_mmd(x, y, self.config.kernels, self.config.kernel_multiplier)
        return total / len(mlp_outputs)

    def loss_terms(self, paired: dict, generator=None):
        harmful, refusal = paired["harmful"], paired["refusal"]
        ce_refusal = self.lm_loss(refusal)                                     # Step 1
        outputs, mlp_out = self.mlp_outputs_and_forward(harmful)               # Step 2
        if not harmful["answer_mask"].any():
            raise ValueError("repnoise: the paired batch's harmful answers never differ from "
                             "the refusals (answer_mask is empty)")
        noise = self.noise_mmd(mlp_out, harmful["answer_mask"].float(), generator)  # Step 3
        s_harm = logit_lens_ce(self.model, outputs, answer_labels(harmful))    # Step 4
        cfg = self.config
        loss = ce_refusal + cfg.beta * noise - cfg.alpha * torch.log1p(s_harm)  # Step 5
        return loss, ce_refusal, noise, s_harm

    def accumulate(self, batches, scale):
        loss, ce, noise, s_harm = self.loss_terms(batches["paired"])
        self.backward(loss, scale)
        return _logs(loss, ce, noise, s_harm)

    def probe(self, batches, at_point=None):
        """RepNoise's terms on the held-out paired batch (the alignment monitor), as a training
        micro-step logs them: the loss, the refusal CE, the noise MMD and the harmful answers'
        logit-lens CE. The noise comes from a generator seeded with PROBE_NOISE_SEED, the same
        draw at every logging step and none from the global stream; no gradient is taken."""
        device = batches["paired"]["harmful"]["input_ids"].device
        generator = torch.Generator(device).manual_seed(PROBE_NOISE_SEED)
        with torch.no_grad():
            return _logs(*self.loss_terms(batches["paired"], generator))


#: seed of the probe's noise (any fixed value: the monitor compares steps, not seeds)
PROBE_NOISE_SEED = 0


def _logs(loss, ce, noise, s_harm) -> dict:
    return {"loss": loss.item(), "refusal_loss": ce.item(), "noise_mmd": noise.item(),
            "harmful_lens_loss": s_harm.item()}
