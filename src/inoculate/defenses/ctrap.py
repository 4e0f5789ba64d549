"""CTRAP: collapse trap (Yi et al. 2025).

Objective  min_θ  ℓ(θ; D_align) + λ · ℓ_collapse(θ − α·g_h/‖g_h‖; D_retain)

One optimizer step as the official code runs it (first order):
  Step 1. g_h = ∇CE(θ; harmful batch)                           (harmful prompt -> harmful answer)
  Step 2. move in place: θ' = θ − α·g_h/(‖g_h‖ + 1e-7)          (normalized step)
  Step 3. g_c = ∇ℓ_collapse(θ'; retain batch); restore θ bit-exactly
  Step 4. g_a = ∇CE(θ; retain batch)
  Step 5. grad = g_a + λ·g_c  -> the engine's optimizer step
The retain batch is the alignment batch (harmful prompt -> refusal) concatenated with an
equal-size general batch; ℓ_collapse is the same batch (or, with `collapse_data=general`, the
general half only, as the paper's formula writes it) with every answer label replaced by the
collapse token e (the last token of "an error"), or, as options, cross-entropy to the uniform
distribution (entropy maximisation) or to a fixed random distribution.

Options beyond the code: `normalize=false` is the paper's unnormalized step θ − α·g_h;
`second_order=true` differentiates through θ'(θ) exactly (double backward; attention is switched
to the eager implementation because fused SDPA kernels have no double backward);
`trap_every=k` refreshes the trap gradient g_c every k steps and reuses it in between
(amortized mode: on average 1 + 2/k passes per step instead of 3).

Deviation (off by default): `step_direction=sign` moves along sign(g_h) instead of g_h, the
direction of Adam's first update (m̂/√v̂ = g/|g| at step 1), normalized to length α (or, with
normalize=false, α per coordinate: one Adam step at learning rate α). On SmolLM2 the gradient-
direction trap was entered by SGD attackers and walked around by AdamW ones
(docs/methods/ctrap-smollm2.md); this option builds the trap along the AdamW attacker's path.
Combines with trap_steps (every simulated step is a sign step) and trap_every.
`step_direction=adam` follows the AdamW attacker further: the K = trap_steps simulated steps are
Adam steps from fresh moments, carried across the steps of one trajectory,
  m_k = β1·m_{k-1} + (1−β1)·g_k,  v_k = β2·v_{k-1} + (1−β2)·g_k²,
  θ_k = θ_{k-1} − α·(m_k/(1−β1^k)) / (√(v_k/(1−β2^k)) + ε)     (normalize=false),
with g_k the harmful gradient at θ_{k-1} (adam_beta1/adam_beta2/adam_epsilon, the attacker's,
HF's defaults 0.9/0.999/1e-8): with normalize=false and α = the attacker's learning rate, θ_1..θ_K
are the first K iterates of torch.optim.AdamW (no weight decay) on the harmful batch. K = 1 is the
sign step up to ε. The moments are fp32 copies of the trainable parameters, freed after the
trajectory (2 such copies of memory while the trap runs).
`step_direction=lora` follows a LoRA attacker instead (full-parameter alignment, normalize=false):
the K simulated steps are the AdamW iterates, at lr α, of a fresh adapter W + s·B·A on the
trap_lora_targets weights (s = trap_lora_alpha / trap_lora_r, B = 0, A drawn as peft draws it,
anew at every refresh), its factors' gradients ∂L/∂B = s·G·Aᵀ and ∂L/∂A = s·Bᵀ·G taken from the
full weights' gradient G; θ_k moves by s·(B_k·A_k − B_{k−1}·A_{k−1}) on those weights only.

Deviation from the paper and the official code (off by default): `trap_steps=K > 1` simulates K
normalized harmful steps on the same harmful batch, the harmful gradient recomputed at each point,
  θ_1 = θ − α·g_h(θ)/‖g_h(θ)‖,   θ_{k+1} = θ_k − α·g_h(θ_k)/‖g_h(θ_k)‖,
and the collapse term is the mean (1/K)·Σ_k ℓ_collapse(θ_k), each gradient taken at θ_k and applied
at θ (first order, as for K=1). It asks the trap to hold along the attacker's trajectory, not only
one step from θ: on SmolLM2 one real SGD step landed in the collapse and the next left it
(docs/methods/ctrap-smollm2.md). All moves happen inside one `moved` context (one saved copy of
θ, restored bit-exactly at the end); each direction is freed once applied. K = 1 is the code
above, operation for operation.

Deviation (off by default): `trap_fresh_batches=true` (with trap_steps = K > 1) gives each simulated
step its own harmful batch, as a real attacker draws a new batch at each step: the harmful stream
then draws K·harmful_batch_size examples per micro-step, split in K parts (torch.tensor_split, equal when K divides it;
the held-out monitor's batch too), g_k taken on the k-th. The passes are unchanged; each harmful
pass sees harmful_batch_size examples as before.

Deviation (off by default): `benign_guard=μ > 0` adds a selectivity term. One simulated benign
step of the same kind and length as the (first) harmful one, θ_b = θ − α·ĝ_b with ĝ_b the
gradient of the general batch, and μ·CE(θ_b; retain batch, its own labels): the model one benign
step away must still refuse and answer, so the trap is asked not to catch a benign fine-tuning
(first order: the gradient at θ_b is applied at θ). On SmolLM2 benign and harmful gradients had
cosine 0.3-0.5 at the aligned model and a benign fine-tuning fell into the sign trap
(docs/methods/ctrap-smollm2.md, round 5). 2 more passes per refresh. With
`benign_guard_task=TASK` (sst2 | ag_news | gsm8k) ĝ_b is the gradient of a batch of that benign
task's train split instead (the general batch's size): a label task, like those customers
fine-tune on, whose first step may differ from a dialogue batch's. Several tasks, comma-separated
(`ag_news,gsm8k`), make one stream of all their examples, shuffled together: each guard batch is
a mixture, so the benign step the trap is asked to spare is not one task's.

Deviation (off by default): `project_out_general=true` builds the trap along the part of the
harmful gradient a benign fine-tuning does not share: before every simulated step (and before
the sign, with step_direction=sign) the harmful gradient loses its component along the general
batch's gradient g_b, taken once at θ: g_h ← g_h − (g_h·g_b/‖g_b‖²)·g_b. A benign step along g_b
then has no first-order component along the trapped direction, while a harmful step along g_h
keeps √(1 − cos²) of its length on it. Logs `harmful_general_cos`, cos(g_h, g_b) at θ (the
round-5 probe's number, during training). 1 more pass per refresh (none with benign_guard on the
general batch, which then takes g_b from it).

Deviation (off by default): `dormancy=ν > 0` adds ν·mean max(0, log p_e(θ) − log τ) over the
retain batch's answer positions at θ (τ = dormancy_bound), computed from Step 4's logits: no
extra pass. The first-order trap gradient, taken at θ' and applied at θ, also raises the collapse
token at θ, one simulated step away; on SmolLM2 the collapse leaked into θ whenever the trap was
near enough for an attacker to reach (docs/methods/ctrap-smollm2.md, rounds 1, 4, 10). This term
pushes the collapse token down at θ wherever it is more likely than τ, so both terms can only be
met by a model whose collapse token rises along the harmful step, which is the trap.
`dormancy_harmful=ν_h > 0` adds the same hinge, weighted ν_h, on the harmful batch's answer
positions at θ, from Step 1's logits (one more backward through that pass, no extra forward): the
attacker's own answers then carry no collapse token before the attack, so its cross-entropy does
not push the collapse token down from its first step (round 24 of docs/methods/ctrap-smollm2.md).
`dormancy_variants=true` makes both hinges bound the summed probability of the collapse word's
one-token spellings (" error", "error", " Error", "Error" on SmolLM2; collapse_word_variants)
instead of the collapse token's: with collapse_harmful_head the trap leaked into θ through the
spellings the hinge did not bound (round 34).

Deviation (off by default): `collapse_rms=R > 0` adds to the collapse term at each simulated point
the mean over the trap batch's answer positions of softplus(log R − log r_t), r_t the RMS of the
final norm's input (the last residual stream) at the position predicting answer token t, read by
a forward pre-hook during the collapse pass. Through a final RMSNorm every gradient into the
layers before it scales as 1/r, so an attacker inside a collapse carried by a large r gets small
gradients; AdamW's second moment (β2 = 0.999) keeps the scale of its earlier, ordinary gradients
for about a thousand steps, so its steps shrink too. Logs collapse_rms, collapse_rms_loss and
rms_at_theta (from Step 4's pass). No extra pass.

Deviation (off by default): `collapse_harmful_head=H > 0` adds to the collapse term at each
simulated point θ_k the collapse loss on the first H answer tokens of the harmful batch θ_k was
reached with, its prompt and those H tokens only (answer_head): the simulated attacker opens its
own harmful answers with the collapse token. On SmolLM2 the real attackers' collapse sat in the
continuations of refusal openings ("I'm error error ...") and ended once they opened with a
compliant one ("Sure, here are ..."; docs/methods/ctrap-smollm2.md, round 34). The attacker's
cross-entropy on those H positions is a small part of its loss over the whole answer. One more
forward/backward per point, on prompt + H tokens; logs collapse_loss_harmful_head.

Deviation (off by default): `collapse_from_step=F > 1` (with trap_steps = K ≥ F) takes the
collapse term at θ_F..θ_K only, the mean over those K − F + 1 points: θ_1..θ_{F−1} are the
simulated attacker's way there (its harmful passes, no collapse pass). On SmolLM2 a fresh LoRA
adapter's AdamW iterates at lr 1e-2 from an SFT model still refused at θ_1, wrote broken text at
θ_2 and answered the held-out harmful prompts compliantly and fluently from θ_3 on, so a trap at
θ_1..θ_2 sat where the model would refuse or break anyway (docs/methods/ctrap-smollm2.md, round
37; scripts/point_answers.py). With F = 3, K = 4 the trained θ moved θ_3 and θ_4 to refusals,
then to broken models, and collapsed those (round 37). Points before F are still answered by the alignment monitor.
K − F + 1 collapse passes per refresh instead of K (with collapse_harmful_head, as many head
passes).

Deviation (off by default): `point_compliance=μ > 0` adds to the collapse term at each collapse
point θ_k μ times the cross-entropy of the harmful answers θ_k was reached with, their labels, with
every token that begins the collapse word taken out of the vocabulary (collapse_word_tokens; the
alignment monitor's monitor_masked suppression): underneath its collapse word the simulated
attacker must still answer compliantly. In round 37 the trained θ met the collapse term by moving
its simulated points to refusals and then to broken models, so the trap fired where a real
attacker, who complies, never is. First order like the collapse term (the gradient at θ_k applied
at θ, weighted λ/n), so it also pulls θ towards the harmful answers; the alignment term and the
dormancy hinges hold θ. One more forward/backward per collapse point, on the harmful batch; logs
point_compliance_loss (the mean over the points). On round 38 (μ = 1 on round 37's row) that loss
stayed low while the points' greedy answers under the suppression were refusals, then the prompt
written back or the collapse in other words ("mistake"). `point_compliance_head=H > 0` takes that
CE on the harmful answers' first H tokens only (answer_head), where a greedy answer chooses between
complying, refusing and echoing the prompt; the pass is then on prompt + H tokens.

Deviation (off by default): `self_destruct=β > 0` adds SEAM's self-destructive term at θ,
β·∇cos(g_h, g_g), g_h the gradient of the harmful batch's CE and g_g the general batch's, by SEAM's
finite differences (ε = self_destruct_epsilon; `_coupling.py`, the code SEAM runs). Every token
collapse so far was left by the real attackers once they learned the harmful answers underneath
(docs/methods/ctrap-smollm2.md); with the two gradients made to oppose, each harmful step they
take also raises the general loss. 4 more passes per micro-step (at every micro-step, amortized
mode or not); logs cos_sd, sd_grad_norm (‖∇cos‖ before β) and SEAM's gradient norms and CEs.

Cost: 3 forward/backward passes per step (second order: the collapse pass also differentiates
through the harmful gradient, about 2x that pass); with trap_steps=K, 2K + 1 (K harmful passes at
θ, θ_1..θ_{K-1}, K collapse passes at θ_1..θ_K, 1 alignment pass; collapse_from_step = F: K − F +
1 collapse passes); collapse_harmful_head and point_compliance add one each per collapse pass
(the head's short), benign_guard adds 2,
project_out_general 1 (none more with benign_guard on the general batch, whose
general-gradient pass it shares), self_destruct 4;
amortized, 1 + (2K [+ 2 | + 1])/k on average (+ 4 with self_destruct).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError, doc
from ..data.encode import IGNORE_INDEX
from ..evaluation.metrics import collapse_token_id, collapse_word_tokens
from . import _coupling as coupling
from ._layers import final_norm_input
from .base import NO_ANSWER_TOKENS, Defense, DefenseConfig, StreamSpec, _shift, dot, global_norm, register_defense, token_ce

COLLAPSE_TARGETS = ("token", "uniform", "random")
COLLAPSE_DATA = ("retain", "general")
STEP_DIRECTIONS = ("gradient", "sign", "adam", "lora")


@dataclass
class CTRAPConfig(DefenseConfig):
    lambda_collapse: float = doc(0.1, "λ, weight of the collapse term (CTRAP code default 0.1)")
    alpha: float = doc(0.1, "α, length of the simulated harmful step in trainable-parameter space "
                            "(CTRAP code default 0.1 at LoRA scale 4/32; see docs for small models)")
    normalize: bool = doc(True, "normalize the simulated step by ‖g_h‖ (official code); false = paper formula")
    second_order: bool = doc(False, "exact gradient through θ'(θ) by double backward (paper), not first order")
    collapse_target: str = doc("token", "token (CE to the collapse token) | uniform (max entropy) | random (fixed random distribution)")
    collapse_text: str = doc("an error", "the collapse token is the last token of this text")
    random_target_seed: int = doc(0, "seed of the fixed random target distribution (collapse_target=random)")
    harmful_batch_size: int = doc(10, "examples per harmful batch (CTRAP code: 10)")
    general_batch_size: Optional[int] = doc(None, "general examples in the retain batch; default = the alignment batch size (5 + 5 in the code)")
    trap_every: int = doc(1, "refresh the trap gradient every k steps and reuse it in between (amortized mode; 1 = every step)")
    collapse_data: str = doc("retain", "batch the collapse term is taken on: retain (alignment + general, the official code) "
                                       "| general (general only, the paper's formula ℓ_collapse(θ'; D_general))")
    trap_steps: int = doc(1, "K, DEVIATION from the paper/official code (1 = theirs): simulate K normalized "
                             "harmful steps θ_k (harmful gradient recomputed at each θ_k, same batch) and take "
                             "the collapse term as the mean over θ_1..θ_K (first order), so that the trap "
                             "holds for several attack steps; costs 2K+1 passes per step instead of 3; "
                             "not with second_order")
    step_direction: str = doc("gradient", "direction of the simulated step: gradient (paper/official code) | "
                                          "sign, DEVIATION: sign(g_h), the direction of Adam's first update "
                                          "(m̂/√v̂ = g/|g|), so the trap guards the region an AdamW attacker "
                                          "steps into; with normalize, still of length α; not with second_order | "
                                          "adam, DEVIATION: the trap_steps simulated steps are Adam steps "
                                          "(moments carried across them), the first K iterates of an AdamW "
                                          "attacker at lr α with normalize=false | "
                                          "lora, DEVIATION: the first trap_steps AdamW iterates of a fresh "
                                          "LoRA adapter (trap_lora_*) at lr α on the harmful batch, the "
                                          "path of a customer's LoRA fine-tuning; full-parameter alignment "
                                          "and normalize=false only")
    trap_lora_r: int = doc(32, "rank of the simulated attacker's fresh LoRA adapter (step_direction=lora; "
                               "the attack's default lora_r)")
    trap_lora_alpha: float = doc(4.0, "lora_alpha of the simulated adapter (step_direction=lora; the "
                                      "attack's default); its scale is trap_lora_alpha / trap_lora_r")
    trap_lora_targets: Optional[list[str]] = doc(None, "modules the simulated adapter adapts (step_direction=lora); "
                                                  "default the attack's: the q/k/v projections")
    trap_lora_seed: int = doc(0, "seed of the simulated adapter's random A factors, drawn anew at every "
                                 "refresh (step_direction=lora)")
    adam_beta1: float = doc(0.9, "β1 of the simulated Adam steps (step_direction=adam; HF's default)")
    adam_beta2: float = doc(0.999, "β2 of the simulated Adam steps (step_direction=adam; HF's default)")
    adam_epsilon: float = doc(1e-8, "ε of the simulated Adam steps (step_direction=adam; HF's default)")
    trap_fresh_batches: bool = doc(False, "DEVIATION (false = one harmful batch for all simulated steps): with "
                                          "trap_steps = K > 1, each simulated step takes its own harmful batch "
                                          "(the stream draws K·harmful_batch_size examples, split in K), as a "
                                          "real attacker draws a new batch at each step")

    benign_guard: float = doc(0.0, "μ, DEVIATION from the paper/official code (0 = theirs): weight of a "
                                   "selectivity term, the retain-batch CE after one simulated benign step "
                                   "θ − α·ĝ_general (or of benign_guard_task's batch) of the same kind "
                                   "(step_direction) and length as the "
                                   "harmful one, so that a benign fine-tuning does not fall into the trap; "
                                   "2 more passes per refresh; not with second_order")
    benign_guard_task: str = doc("", "DEVIATION (with benign_guard > 0; '' = the general batch): the "
                                     "guard's simulated benign step is taken on a batch of this benign "
                                     "task of the data suite (sst2 | ag_news | gsm8k, its train split), "
                                     "a label task like those customers fine-tune on, instead of the "
                                     "general batch; several comma-separated (ag_news,gsm8k) mix their "
                                     "examples in one stream; the batch size is the general batch's")
    project_out_general: bool = doc(False, "DEVIATION from the paper/official code (false = theirs): remove "
                                           "from the harmful gradient its component along the general "
                                           "batch's gradient before each simulated step, so the trap guards "
                                           "the part of the harmful direction a benign fine-tuning does not "
                                           "share; 1 more pass per refresh (shared with benign_guard's); not with second_order")

    dormancy: float = doc(0.0, "ν, DEVIATION from the paper/official code (0 = theirs): weight of a "
                               "dormancy term at θ, the mean over the retain batch's answer positions "
                               "of max(0, log p(collapse token) − log dormancy_bound), from the "
                               "alignment pass's logits (no extra pass), so the collapse the trap term "
                               "pulls toward θ' is pushed out of θ itself; collapse_target=token only")
    dormancy_bound: float = doc(1e-3, "τ, the collapse token's probability at θ above which the dormancy "
                                      "term acts (dormancy > 0 or dormancy_harmful > 0)")
    dormancy_variants: bool = doc(False, "DEVIATION (false = the collapse token alone): the dormancy hinges "
                                         "(dormancy, dormancy_harmful) bound the summed probability of the "
                                         "collapse word's one-token spellings (' error', 'error', ' Error', "
                                         "'Error') at θ instead of the collapse token's, so that a collapse "
                                         "term's leak into θ through a sibling spelling is bounded too")
    dormancy_harmful: float = doc(0.0, "ν_h, DEVIATION from the paper/official code (0 = theirs): weight of "
                                       "the same hinge on the harmful batch's answer positions at θ, from "
                                       "Step 1's logits (no extra forward, one more backward through that "
                                       "pass), so the attacker's own answers carry no collapse token before "
                                       "the attack; collapse_target=token only")
    collapse_margin: float = doc(0.0, "m, DEVIATION from the paper/official code (0 = theirs): with "
                                      "collapse_target=token the collapse term becomes the mean over answer "
                                      "positions of softplus(m − d), d = the collapse token's logit minus the "
                                      "log-sum-exp of all other logits (its log-odds); m = 0 is exactly the "
                                      "CE to the token, which stops pushing once the token is likely, while "
                                      "m > 0 keeps pushing until its log-odds reach about m nats, so the "
                                      "simulated point collapses m nats deep; collapse_loss still logs the CE")
    collapse_rms: float = doc(0.0, "R, DEVIATION from the paper/official code (0 = theirs): adds to the "
                                   "collapse term at each simulated point the mean over the trap batch's "
                                   "answer positions of softplus(log R − log r), r the RMS of the final "
                                   "norm's input (the last residual stream), so the collapse is carried by "
                                   "a residual stream about R in RMS, through whose final norm every "
                                   "attacker gradient shrinks as 1/r (SmolLM2-135M: r about 29 at answer "
                                   "positions); logs collapse_rms (at θ') and rms_at_theta; no extra pass")
    collapse_from_step: int = doc(1, "F, DEVIATION (1 = every simulated point, the trap_steps rule): the "
                                     "collapse term is taken at θ_F..θ_K only (mean over those points), "
                                     "θ_1..θ_{F-1} being the simulated attacker's way there (harmful "
                                     "passes only), so the trap is asked where the simulated attacker "
                                     "already answers compliantly (from an SFT model); needs trap_steps >= F")
    collapse_harmful_head: int = doc(0, "H, DEVIATION from the paper/official code (0 = theirs): adds to the "
                                        "collapse term at each simulated point θ_k the collapse loss on the "
                                        "first H answer tokens of the harmful batch θ_k was reached with "
                                        "(its prompt and answer cut after them), so the simulated attacker "
                                        "opens its harmful answers with the collapse token; one more "
                                        "forward/backward per point, on prompt + H tokens; logs "
                                        "collapse_loss_harmful_head (mean over the points)")
    point_compliance: float = doc(0.0, "μ, DEVIATION from the paper/official code (0 = theirs): adds to the "
                                       "collapse term at each collapse point θ_k μ times the CE of the "
                                       "harmful answers θ_k was reached with, every token that begins the "
                                       "collapse word taken out of the vocabulary, so the simulated attacker "
                                       "still answers compliantly underneath its collapse (not a refusal or "
                                       "broken text); one more forward/backward per point on the harmful "
                                       "batch; logs point_compliance_loss (mean over the points)")
    point_compliance_head: int = doc(0, "H, DEVIATION (0 = the whole answer): point_compliance's CE on the "
                                        "first H answer tokens of the harmful batch only (its prompt and "
                                        "answer cut after them, answer_head), where a greedy answer chooses "
                                        "between complying, refusing and echoing the prompt; needs "
                                        "point_compliance > 0")
    self_destruct: float = doc(0.0, "β, DEVIATION from the paper/official code (0 = theirs): adds SEAM's "
                                    "self-destructive term β·cos(g_h, g_g) at θ, g_h the gradient of the "
                                    "harmful batch's CE and g_g the general batch's, by SEAM's finite "
                                    "differences (4 more passes per micro-step, at every micro-step), so "
                                    "that the harmful steps an attacker takes, into the trap or out of it, "
                                    "also cost general ability; logs cos_sd, sd_grad_norm and SEAM's "
                                    "gradient norms and CEs")
    self_destruct_epsilon: float = doc(1e-3, "ε of self_destruct's finite differences (SEAM's default)")

    #: fields added after run directories existed: left out of the resolved config (and so of
    #: the run's config hash) while at their defaults, so earlier CTRAP runs are still reused
    later_fields: ClassVar[tuple] = ("trap_steps", "step_direction", "benign_guard", "project_out_general",
                                     "adam_beta1", "adam_beta2", "adam_epsilon", "trap_fresh_batches",
                                     "benign_guard_task", "dormancy", "dormancy_bound", "trap_lora_r",
                                     "trap_lora_alpha", "trap_lora_targets", "trap_lora_seed",
                                     "dormancy_harmful", "collapse_margin", "collapse_rms",
                                     "collapse_harmful_head", "dormancy_variants", "collapse_from_step",
                                     "point_compliance", "point_compliance_head", "self_destruct",
                                     "self_destruct_epsilon")

    def __post_init__(self):
        if self.collapse_target not in COLLAPSE_TARGETS:
            raise ConfigError(f"ctrap.collapse_target must be one of {COLLAPSE_TARGETS}, got {self.collapse_target!r}")
        if self.trap_every < 1:
            raise ConfigError("ctrap.trap_every must be >= 1")
        if self.collapse_data not in COLLAPSE_DATA:
            raise ConfigError(f"ctrap.collapse_data must be one of {COLLAPSE_DATA}, got {self.collapse_data!r}")
        if self.second_order and self.trap_every != 1:
            raise ConfigError("ctrap.second_order and trap_every > 1 do not combine")
        if isinstance(self.trap_steps, bool) or not isinstance(self.trap_steps, int) or self.trap_steps < 1:
            raise ConfigError(f"ctrap.trap_steps must be an integer >= 1, got {self.trap_steps!r}")
        if self.second_order and self.trap_steps != 1:
            raise ConfigError("ctrap.second_order and trap_steps > 1 do not combine (the exact gradient "
                              "through K simulated steps is not implemented; use the first-order default)")
        if self.step_direction not in STEP_DIRECTIONS:
            raise ConfigError(f"ctrap.step_direction must be one of {STEP_DIRECTIONS}, got {self.step_direction!r}")
        if self.second_order and self.step_direction != "gradient":
            raise ConfigError(f"ctrap.second_order and step_direction={self.step_direction} do not combine (the "
                              "exact gradient is taken through the gradient step only; sign(g_h) has zero derivative)")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"ctrap.{name} must be a number in [0, 1), got {value!r}")
        if self.step_direction == "lora":
            if self.normalize:
                raise ConfigError("ctrap.step_direction=lora needs normalize: false (α is the simulated "
                                  "LoRA attacker's learning rate; its steps are not rescaled)")
            if isinstance(self.trap_lora_r, bool) or not isinstance(self.trap_lora_r, int) or self.trap_lora_r < 1:
                raise ConfigError(f"ctrap.trap_lora_r must be an integer >= 1, got {self.trap_lora_r!r}")
            if isinstance(self.trap_lora_alpha, bool) or not isinstance(self.trap_lora_alpha, (int, float)) \
                    or not self.trap_lora_alpha > 0:
                raise ConfigError(f"ctrap.trap_lora_alpha must be a number > 0, got {self.trap_lora_alpha!r}")
            if self.trap_lora_targets is not None and (
                    isinstance(self.trap_lora_targets, str) or not self.trap_lora_targets
                    or not all(isinstance(t, str) and t for t in self.trap_lora_targets)):
                raise ConfigError(f"ctrap.trap_lora_targets must be a list of module names, got "
                                  f"{self.trap_lora_targets!r}")
        if isinstance(self.adam_epsilon, bool) or not isinstance(self.adam_epsilon, (int, float)) \
                or not self.adam_epsilon > 0:
            raise ConfigError(f"ctrap.adam_epsilon must be a number > 0, got {self.adam_epsilon!r}")
        if not isinstance(self.trap_fresh_batches, bool):
            raise ConfigError(f"ctrap.trap_fresh_batches must be true or false, got {self.trap_fresh_batches!r}")
        if self.trap_fresh_batches and self.trap_steps < 2:
            raise ConfigError("ctrap.trap_fresh_batches needs trap_steps > 1 (it gives each simulated step "
                              "its own harmful batch; with one step there is one batch)")
        if isinstance(self.benign_guard, bool) or not isinstance(self.benign_guard, (int, float)) \
                or not self.benign_guard >= 0:
            raise ConfigError(f"ctrap.benign_guard must be a number >= 0, got {self.benign_guard!r}")
        if self.second_order and self.benign_guard:
            raise ConfigError("ctrap.second_order and benign_guard do not combine (the guard is first order)")
        if not isinstance(self.benign_guard_task, str) or (
                self.benign_guard_task and not all(t.strip() for t in self.benign_guard_task.split(","))):
            raise ConfigError(f"ctrap.benign_guard_task must be a task name, or several separated by commas, "
                              f"got {self.benign_guard_task!r}")
        if self.benign_guard_task and not self.benign_guard:
            raise ConfigError(f"ctrap.benign_guard_task={self.benign_guard_task!r} needs benign_guard > 0 "
                              "(the guard's weight μ); it is 0")
        if not isinstance(self.project_out_general, bool):
            raise ConfigError(f"ctrap.project_out_general must be true or false, got {self.project_out_general!r}")
        if self.second_order and self.project_out_general:
            raise ConfigError("ctrap.second_order and project_out_general do not combine (first order only)")
        for name in ("dormancy", "dormancy_harmful"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"ctrap.{name} must be a number >= 0, got {value!r}")
        if isinstance(self.dormancy_bound, bool) or not isinstance(self.dormancy_bound, (int, float)) \
                or not 0 < self.dormancy_bound < 1:
            raise ConfigError(f"ctrap.dormancy_bound must be a probability in (0, 1), got {self.dormancy_bound!r}")
        if isinstance(self.collapse_margin, bool) or not isinstance(self.collapse_margin, (int, float)) \
                or not self.collapse_margin >= 0:
            raise ConfigError(f"ctrap.collapse_margin must be a number >= 0, got {self.collapse_margin!r}")
        if isinstance(self.collapse_rms, bool) or not isinstance(self.collapse_rms, (int, float)) \
                or not self.collapse_rms >= 0 or math.isinf(self.collapse_rms):
            raise ConfigError(f"ctrap.collapse_rms must be a finite number >= 0 (0 = off), got {self.collapse_rms!r}")
        if isinstance(self.collapse_harmful_head, bool) or not isinstance(self.collapse_harmful_head, int) \
                or self.collapse_harmful_head < 0:
            raise ConfigError(f"ctrap.collapse_harmful_head must be an integer >= 0 (0 = off), got "
                              f"{self.collapse_harmful_head!r}")
        if isinstance(self.collapse_from_step, bool) or not isinstance(self.collapse_from_step, int) \
                or not 1 <= self.collapse_from_step <= self.trap_steps:
            raise ConfigError(f"ctrap.collapse_from_step must be an integer from 1 to trap_steps "
                              f"({self.trap_steps}), got {self.collapse_from_step!r}")
        if self.second_order and self.collapse_harmful_head:
            raise ConfigError("ctrap.second_order and collapse_harmful_head do not combine (first order only)")
        if isinstance(self.point_compliance, bool) or not isinstance(self.point_compliance, (int, float)) \
                or not math.isfinite(self.point_compliance) or self.point_compliance < 0:
            raise ConfigError(f"ctrap.point_compliance must be a finite number >= 0 (0 = off), got "
                              f"{self.point_compliance!r}")
        if self.second_order and self.point_compliance:
            raise ConfigError("ctrap.second_order and point_compliance do not combine (first order only)")
        if isinstance(self.point_compliance_head, bool) or not isinstance(self.point_compliance_head, int) \
                or self.point_compliance_head < 0:
            raise ConfigError(f"ctrap.point_compliance_head must be an integer >= 0 (0 = the whole answer), got "
                              f"{self.point_compliance_head!r}")
        if self.point_compliance_head and not self.point_compliance:
            raise ConfigError("ctrap.point_compliance_head cuts point_compliance's answers, which is off "
                              "(set ctrap.point_compliance > 0)")
        if self.point_compliance and self.collapse_target != "token":
            raise ConfigError("ctrap.point_compliance takes the collapse token's word out of the vocabulary; "
                              f"it needs collapse_target=token, got {self.collapse_target!r}")
        if isinstance(self.self_destruct, bool) or not isinstance(self.self_destruct, (int, float)) \
                or not math.isfinite(self.self_destruct) or self.self_destruct < 0:
            raise ConfigError(f"ctrap.self_destruct must be a finite number >= 0 (0 = off), got "
                              f"{self.self_destruct!r}")
        if isinstance(self.self_destruct_epsilon, bool) or not isinstance(self.self_destruct_epsilon, (int, float)) \
                or not self.self_destruct_epsilon > 0:
            raise ConfigError(f"ctrap.self_destruct_epsilon must be a number > 0, got {self.self_destruct_epsilon!r}")
        if not isinstance(self.dormancy_variants, bool):
            raise ConfigError(f"ctrap.dormancy_variants must be true or false, got {self.dormancy_variants!r}")
        if self.dormancy_variants and not (self.dormancy or self.dormancy_harmful):
            raise ConfigError("ctrap.dormancy_variants widens the dormancy hinges; it needs dormancy > 0 "
                              "or dormancy_harmful > 0")
        for name in ("dormancy", "dormancy_harmful", "collapse_margin"):
            if getattr(self, name) and self.collapse_target != "token":
                raise ConfigError(f"ctrap.{name} is defined for collapse_target=token (a collapse token's "
                                  f"probability at θ); got collapse_target={self.collapse_target!r}")


def concat_batches(a: dict, b: dict, pad_id: int) -> dict:
    """Stack two right-padded batches into one, padding the shorter to the longer length."""
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key, value in fill.items():
        parts = [F.pad(x[key], (0, length - x[key].shape[1]), value=value) for x in (a, b)]
        out[key] = torch.cat(parts, dim=0)
    return out


def answer_head(batch: dict, n: int) -> dict:
    """The batch with only the first `n` answer labels of each row kept (the others -100) and
    every column after the last kept label cut off: the prompt and the answer's first n tokens."""
    answer = batch["labels"] != IGNORE_INDEX
    keep = answer & (answer.long().cumsum(dim=1) <= n)
    cols = keep.any(dim=0).nonzero()
    cut = int(cols[-1]) + 1 if len(cols) else 1
    labels = batch["labels"].masked_fill(~keep, IGNORE_INDEX)
    return {"input_ids": batch["input_ids"][:, :cut], "attention_mask": batch["attention_mask"][:, :cut],
            "labels": labels[:, :cut]}


def cosine(a: list, b: list) -> float:
    """cos(a, b) of two gradients given as lists of tensors."""
    return float(dot(a, b) / (global_norm(a) * global_norm(b) + 1e-30))


def collapse_loss(logits: torch.Tensor, labels: torch.Tensor, target: str, token: int,
                  distribution: Optional[torch.Tensor] = None, margin: float = 0.0) -> torch.Tensor:
    """Mean over answer positions (labels != -100) of the cross-entropy to the collapse target;
    for the token target with margin m > 0, of softplus(m − d), d the token's log-odds
    (token_log_odds), which is the CE at m = 0."""
    if target == "token" and margin:
        return F.softplus(margin - token_log_odds(logits, labels, token)).mean()
    if target == "token":
        return token_ce(logits, torch.where(labels != IGNORE_INDEX, token, IGNORE_INDEX))
    shift_logits = logits[:, :-1, :].float()
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = F.log_softmax(shift_logits[mask], dim=-1)
    if target == "uniform":
        return -logp.mean(dim=-1).mean()
    return -(logp * distribution.to(logp.device)).sum(dim=-1).mean()


def token_log_odds(logits: torch.Tensor, labels: torch.Tensor, token: int) -> torch.Tensor:
    """At each answer position (labels != -100), the collapse token's next-token log-odds
    d = z_token − logsumexp(z_j, j ≠ token) = log p/(1 − p), computed without forming 1 − p, which
    underflows where the token is near certain; CE to the token is softplus(−d)."""
    z = logits[:, :-1, :][labels[:, 1:] != IGNORE_INDEX].float()
    if z.shape[0] == 0:
        raise ValueError(NO_ANSWER_TOKENS)
    others = z.index_fill(-1, torch.tensor([token], device=z.device), -math.inf)
    return z[:, token] - torch.logsumexp(others, dim=-1)


def answer_log_rms(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log of the RMS over features of `hidden` (batch, seq, features) at each position that
    predicts an answer token (labels[:, t + 1] != -100), the positions the collapse term reads."""
    h = hidden[:, :-1][labels[:, 1:] != IGNORE_INDEX].float()
    if h.shape[0] == 0:
        raise ValueError(NO_ANSWER_TOKENS)
    return 0.5 * torch.log(h.pow(2).mean(dim=-1))


def answer_rms(hidden: torch.Tensor, labels: torch.Tensor) -> float:
    """The geometric mean over answer positions of the RMS (answer_log_rms), as logged."""
    with torch.no_grad():
        return answer_log_rms(hidden.detach(), labels).mean().exp().item()


def rms_loss(hidden: torch.Tensor, labels: torch.Tensor, target: float) -> torch.Tensor:
    """Mean over answer positions of softplus(log target − log RMS(hidden_t)) (answer_log_rms):
    about log(target/r) while the RMS r is below the target, fading once it is above."""
    return F.softplus(math.log(target) - answer_log_rms(hidden, labels)).mean()


def dormancy_loss(logits: torch.Tensor, labels: torch.Tensor, token, bound: float) -> torch.Tensor:
    """Mean over answer positions (labels != -100) of max(0, log p(token) − log bound): zero where
    the collapse token's next-token probability is at most `bound`, and a unit push on its
    log-probability where it is above. `token` may be a list of token ids: p is then their summed
    probability (dormancy_variants)."""
    shift = logits[:, :-1, :]
    mask = labels[:, 1:] != IGNORE_INDEX
    z = shift[mask].float()
    top = z[:, token] if isinstance(token, int) else torch.logsumexp(z[:, list(token)], dim=-1)
    log_p = top - torch.logsumexp(z, dim=-1)
    return F.relu(log_p - math.log(bound)).mean()


def suppressed_ce(logits: torch.Tensor, labels: torch.Tensor, suppress: list) -> torch.Tensor:
    """Mean over answer positions (labels != -100) of the cross-entropy to the label with the
    `suppress` tokens taken out of the vocabulary (their logits −inf before the softmax): what the
    answers cost a model that may not write those tokens. Positions whose label is one of them
    are left out."""
    z = logits[:, :-1, :]
    y = labels[:, 1:]
    out = torch.tensor(suppress, device=z.device)
    keep = (y != IGNORE_INDEX) & ~torch.isin(y, out)
    if not keep.any():
        raise ValueError(NO_ANSWER_TOKENS)
    z = z[keep].float().index_fill(-1, out, -math.inf)
    return F.cross_entropy(z, y[keep])


def collapse_word_variants(tokenizer, token: int) -> list:
    """The collapse token and the other one-token spellings of its word: with and without a
    leading space, lower-case and capitalized (" error", "error", " Error", "Error"), those the
    tokenizer writes as a single token; the collapse token first."""
    word = tokenizer.decode([token]).strip()
    ids = [token]
    for text in (word, " " + word, word.capitalize(), " " + word.capitalize()):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and int(encoded[0]) not in ids:
            ids.append(int(encoded[0]))
    return ids


@register_defense("ctrap")
class CTRAP(Defense):
    config_class = CTRAPConfig
    passes_per_step = 3

    def __init__(self, config: CTRAPConfig, batch_size: int):
        super().__init__(config, batch_size)
        # the guard's general-gradient pass is the projection's when both are on (and the guard
        # steps along the general batch)
        K, points = config.trap_steps, config.trap_steps - config.collapse_from_step + 1
        per_point = 1 + bool(config.collapse_harmful_head) + bool(config.point_compliance)
        refresh = K + per_point * points + int(config.project_out_general)
        if config.benign_guard:
            refresh += 1 if config.project_out_general and not config.benign_guard_task else 2
        if config.trap_every > 1:
            self.passes_per_step = 1 + refresh / config.trap_every  # mean over k micro-steps
        elif refresh != 2:
            self.passes_per_step = 1 + refresh
        if config.self_destruct:
            self.passes_per_step += 4

    def streams(self):
        c = self.config
        streams = {
            "align": StreamSpec("align", self.batch_size),
            "general": StreamSpec("general", c.general_batch_size or self.batch_size),
            "harmful": StreamSpec("harmful", c.harmful_batch_size * (c.trap_steps if c.trap_fresh_batches else 1)),
        }
        if c.benign_guard_task:
            streams["guard"] = StreamSpec("task", c.general_batch_size or self.batch_size, task=c.benign_guard_task)
        return streams

    def harmful_batches(self, batch: dict) -> list:
        """The harmful batch of each of the K simulated steps: the same batch K times, or with
        trap_fresh_batches its K parts (torch.tensor_split along the examples)."""
        K = self.config.trap_steps
        if not self.config.trap_fresh_batches:
            return [batch] * K
        n = batch["input_ids"].shape[0]
        if n < K:
            raise ValueError(f"ctrap.trap_fresh_batches: the harmful batch has {n} examples, fewer than "
                             f"trap_steps={K}; each simulated step needs at least one")
        parts = {k: torch.tensor_split(v, K) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(K)]

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        c = self.config
        self.token = collapse_token_id(tokenizer, c.collapse_text)
        #: what the dormancy hinges bound: the collapse token, or with dormancy_variants its word's
        #: one-token spellings
        self.dormant = collapse_word_variants(tokenizer, self.token) if c.dormancy_variants else self.token
        #: what point_compliance takes out of the vocabulary: every token that begins the word
        self.suppress = collapse_word_tokens(tokenizer, self.token) if c.point_compliance else None
        self.pad_id = tokenizer.pad_token_id
        self.distribution = None
        vocab = model.get_output_embeddings().weight.shape[0]
        self.target_entropy = 0.0  # of the collapse target: the lowest collapse loss there is
        if c.collapse_target == "uniform":
            self.target_entropy = math.log(vocab)
        if c.collapse_target == "random":
            g = torch.Generator().manual_seed(c.random_target_seed)
            self.distribution = torch.softmax(torch.randn(vocab, generator=g), dim=0)
            self.target_entropy = float(-(self.distribution * self.distribution.log()).sum())
        self.cached_trap: Optional[list] = None
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        if c.step_direction == "lora":
            self._lora_sites = self._find_lora_sites(model)

    def _find_lora_sites(self, model) -> list:
        """(index in self.params, transposed) of every weight the simulated LoRA adapter adapts:
        the trainable weight of each Linear (or GPT-2 Conv1D, stored transposed) whose name ends
        in one of trap_lora_targets (default: the attack's, the q/k/v projections)."""
        from ..models import default_lora_targets
        from ..sharding import is_sharded

        if is_sharded(self.params):
            raise ValueError("ctrap.step_direction=lora is not implemented for sharded (FSDP) parameters; "
                             "use DDP or one process")
        targets = list(self.config.trap_lora_targets or default_lora_targets(model))
        index = {id(p): i for i, p in enumerate(self.params)}
        sites, frozen = [], []
        for name, module in model.named_modules():
            conv1d = type(module).__name__ == "Conv1D"
            if name.rsplit(".", 1)[-1] not in targets or not (isinstance(module, torch.nn.Linear) or conv1d):
                continue
            if id(module.weight) in index:
                sites.append((index[id(module.weight)], conv1d))
            else:
                frozen.append(name)
        if not sites:
            raise ValueError(f"ctrap.step_direction=lora simulates a fresh LoRA adapter on the weights of "
                             f"{targets}, but none of them is trained here"
                             + (f" ({len(frozen)} frozen, e.g. {frozen[0]})" if frozen else
                                " (no Linear layer has that name)")
                             + "; it needs full-parameter alignment (align.lora: false) and target "
                               "modules the model has (ctrap.trap_lora_targets)")
        return sites

    def collapse(self, logits, labels):
        return collapse_loss(logits, labels, self.config.collapse_target, self.token, self.distribution,
                             self.config.collapse_margin)

    def _collapse_logs(self, logits, labels, loss_c) -> float:
        """The collapse loss to log for a collapse term `loss_c` on these logits: `loss_c` itself,
        or with collapse_margin its CE to the token (from the same logits, no extra pass), so that
        collapse_loss and trap_gap read the same with and without the margin."""
        if not self.config.collapse_margin:
            return loss_c.item()
        with torch.no_grad():
            return F.softplus(-token_log_odds(logits.detach(), labels, self.token)).mean().item()

    def _rms_term(self, seen: list, labels, rms_logs: list) -> torch.Tensor:
        """collapse_rms = R: the term softplus(log R − log r) on the final norm's input `seen[-1]`
        at the trap batch's answer positions (rms_loss); appends (r, the term) to `rms_logs`, r
        the geometric mean RMS over those positions."""
        term = rms_loss(seen[-1], labels, self.config.collapse_rms)
        rms_logs.append((answer_rms(seen[-1], labels), term.item()))
        return term

    def _rms_at_theta(self, seen: list, labels) -> dict:
        """collapse_rms: the geometric mean RMS of the final norm's input at θ on the retain
        batch's answer positions (rms_at_theta), from the alignment pass: the trap should raise it
        at θ' (collapse_rms) and leave it here."""
        return {"rms_at_theta": answer_rms(seen[-1], labels)} if seen else {}

    def simulated_step(self, g_h, away: Optional[list] = None,
                       moments: Optional[dict] = None) -> tuple[list, float]:
        """Direction and scale of Step 2 (θ' = θ + scale·direction).

        With `away` (project_out_general: the general batch's gradient) g_h first loses its
        component along it, in place: g_h − (g_h·away/‖away‖²)·away.

        With step_direction=sign the direction is sign(g_h), taken in place (g_h is this step's
        own, already all-reduced gradient): Adam's first update is lr·sign(g), so the normalized
        sign step is the first step of an AdamW attacker scaled to length α, and the unnormalized
        one (normalize=false) moves every coordinate by α, an Adam step at learning rate α.

        With step_direction=adam the direction is Adam's bias-corrected m̂/(√v̂ + ε), written into
        g_h in place; `moments` is the trajectory's state (an empty dict at its first step, then
        passed again for each further step: the fp32 moments and the step count live in it)."""
        c = self.config
        if away is not None:
            coef = float(dot(g_h, away)) / (float(dot(away, away)) + 1e-30)
            for g, b in zip(g_h, away):
                g.sub_(b.to(g.dtype), alpha=coef)
        if c.step_direction == "sign":
            for g in g_h:
                g.sign_()
        elif c.step_direction == "adam":
            self._adam_direction(g_h, {} if moments is None else moments)
        elif c.step_direction == "lora":
            self._lora_direction(g_h, {} if moments is None else moments)
            return g_h, 1.0
        if c.normalize:
            return g_h, -c.alpha / (float(global_norm(g_h)) + 1e-7)
        return g_h, -c.alpha

    def _adam_direction(self, g_h: list, moments: dict) -> None:
        """g_h ← m̂/(√v̂ + ε) after one more Adam moment update with g_h (torch.optim.Adam's
        arithmetic, in fp32); `moments` holds t, m and v across the steps of one trajectory."""
        c = self.config
        b1, b2 = c.adam_beta1, c.adam_beta2
        t = moments["t"] = moments.get("t", 0) + 1
        if t == 1:
            moments["m"] = [torch.zeros_like(g, dtype=torch.float32) for g in g_h]
            moments["v"] = [torch.zeros_like(g, dtype=torch.float32) for g in g_h]
        correction1, root_correction2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
        for g, m, v in zip(g_h, moments["m"], moments["v"]):
            g32 = g.float()
            m.mul_(b1).add_(g32, alpha=1 - b1)
            v.mul_(b2).addcmul_(g32, g32, value=1 - b2)
            g.copy_((m / correction1) / (v.sqrt() / root_correction2 + c.adam_epsilon))

    def _lora_direction(self, g_h: list, moments: dict) -> None:
        """g_h ← the move of the next AdamW iterate of a fresh LoRA adapter, in place: zero on
        every weight it does not adapt; on an adapted weight W (out × in), with the adapter
        W + s·B·A (s = trap_lora_alpha / trap_lora_r), the factors' gradients from G = ∂L/∂W,
          ∂L/∂B = s·G·Aᵀ,   ∂L/∂A = s·Bᵀ·G,
        one Adam step on (B, A) at lr α (the moments in `moments`, as for step_direction=adam),
        and the move s·(B'A' − BA). At the trajectory's first step A is drawn as peft draws it
        (kaiming-uniform with a = √5: U(−1/√in, 1/√in)) and B = 0, so the first move is
        −α·s·sign(G·Aᵀ)·A (up to ε): the rows of G seen through r random directions."""
        c = self.config
        s = c.trap_lora_alpha / c.trap_lora_r
        weights = [(g_h[i].t() if transposed else g_h[i]).float() for i, transposed in self._lora_sites]
        if "A" not in moments:  # a fresh adapter: random A, B = 0
            seed = moments.get("seed", (c.trap_lora_seed, self.steps_seen))
            gen = torch.Generator().manual_seed(seed[0] * 1_000_003 + seed[1] + 1)
            moments["A"] = [((torch.rand(c.trap_lora_r, G.shape[1], generator=gen) * 2 - 1)
                             / math.sqrt(G.shape[1])).to(G.device) for G in weights]
            moments["B"] = [G.new_zeros(G.shape[0], c.trap_lora_r) for G in weights]
        A, B = moments["A"], moments["B"]
        before = [s * (b @ a) for b, a in zip(B, A)]
        factor_grads = [s * (G @ a.t()) for G, a in zip(weights, A)] + [s * (b.t() @ G) for G, b in zip(weights, B)]
        del weights
        self._adam_direction(factor_grads, moments)  # in place: Adam's m̂/(√v̂ + ε)
        n = len(B)
        for b, d in zip(B, factor_grads[:n]):
            b.sub_(d, alpha=c.alpha)
        for a, d in zip(A, factor_grads[n:]):
            a.sub_(d, alpha=c.alpha)
        del factor_grads
        for g in g_h:
            g.zero_()
        for (i, transposed), b, a, old in zip(self._lora_sites, B, A, before):
            move = s * (b @ a) - old
            g_h[i].copy_(move.t() if transposed else move)

    def accumulate(self, batches, scale):
        c = self.config
        retain = concat_batches(batches["align"], batches["general"], self.pad_id)
        trap_batch = retain if c.collapse_data == "retain" else batches["general"]
        logs = {}
        refresh = self.lookahead_due(c.trap_every, self.cached_trap)
        if c.second_order:
            logs.update(self._trap_second_order(batches["harmful"], trap_batch, scale))
        elif refresh:
            away = None
            if c.project_out_general:  # the general batch's gradient at θ, the direction projected out
                away = [g.detach() for g in self.grads(self.lm_loss(batches["general"]))]
            harmful = self.harmful_batches(batches["harmful"])
            # Step 1: harmful gradient at θ (not into p.grad)
            g_h = self._harmful_at_theta(harmful[0], scale, logs)
            if away is not None:
                logs["harmful_general_cos"] = cosine(g_h, away)
            moments = {}  # step_direction=adam|lora: the simulated trajectory's Adam state
            direction, step = self.simulated_step(g_h, away, moments)
            del g_h
            self.cached_trap = None  # the old cache goes before the new one is built
            # Steps 2-3: collapse gradient at θ' (the direction is freed once applied), then exact restore
            logs.update(self._trap_first_order(direction, step, harmful, trap_batch, scale, away,
                                               moments=moments))
            del moments
            if c.benign_guard and c.benign_guard_task:
                logs.update(self._benign_guard(batches["guard"], retain, scale))
            elif c.benign_guard:  # reuses the general gradient at θ when the projection took it
                logs.update(self._benign_guard(batches["general"], retain, scale, g_b=away))
            del away
        if c.trap_every > 1 and not c.second_order:
            self.add_to_grad(self.cached_trap, scale)
        if c.self_destruct:  # SEAM's coupling at θ (a deviation): β·∇cos(g_harmful, g_general)
            sd_grad, sd_logs = coupling.self_destruct_grad(self, batches["harmful"], batches["general"],
                                                           self.lm_loss, self.lm_loss, c.self_destruct_epsilon)
            logs["sd_grad_norm"] = float(global_norm(sd_grad))
            logs.update(sd_logs)
            self.add_to_grad(sd_grad, scale * c.self_destruct)
            del sd_grad
        # Step 4: alignment gradient at θ on the retain batch; Step 5 is the sum in p.grad
        with final_norm_input(self.model, bool(c.collapse_rms)) as seen:
            logits, labels = self.answer_logits(retain)
        logs.update(self._rms_at_theta(seen, retain["labels"]))
        del seen
        loss_a = token_ce(logits, labels)
        if c.dormancy:  # the dormancy term, on the same logits at θ
            loss_d = dormancy_loss(logits, labels, self.dormant, c.dormancy_bound)
            self.backward(loss_a + c.dormancy * loss_d, scale)
            logs["dormancy_loss"] = loss_d.item()
            del loss_d
        else:
            self.backward(loss_a, scale)
        logs["align_loss"] = loss_a.item()
        # Dormancy monitor: the collapse loss at θ itself on the same retain logits. The trap
        # works when this stays high while collapse_loss (at θ') falls.
        with torch.no_grad():
            logs["collapse_loss_at_theta"] = self._collapse_at_theta(logits.detach(), labels,
                                                                     logs["align_loss"])
        if "collapse_loss" in logs:  # the trap ran this micro-step
            logs["trap_gap"] = self.trap_gap(logs)
        return logs

    def _harmful_at_theta(self, harmful: dict, scale: float, logs: dict, create_graph: bool = False):
        """Step 1: the harmful loss's gradient at θ (not into p.grad). With
        dormancy_harmful = ν_h > 0 the hinge on the same logits, ν_h·D(θ; harmful answers), goes
        into p.grad first (one more backward through the pass, whose graph it keeps; in amortized
        mode only at the refresh micro-steps, where the harmful pass runs). Logs the hinge as
        dormancy_harmful_loss and the collapse loss on the harmful answers at θ as
        collapse_loss_harmful_at_theta."""
        c = self.config
        logits, labels = self.answer_logits(harmful)
        loss_h = token_ce(logits, labels)
        logs.update(self._harmful_logs(logits, labels, loss_h))
        if c.dormancy_harmful:  # first, keeping the graph for the harmful gradient
            self.backward(dormancy_loss(logits, labels, self.dormant, c.dormancy_bound),
                          scale * c.dormancy_harmful, retain_graph=True)
        return self.grads(loss_h, retain_graph=create_graph, create_graph=create_graph)

    def _harmful_logs(self, logits, labels, loss_h) -> dict:
        """Dormancy on the harmful answers at θ: harmful_loss, collapse_loss_harmful_at_theta
        (the collapse loss on the same logits) and, with dormancy_harmful, the hinge
        dormancy_harmful_loss."""
        with torch.no_grad():
            logits = logits.detach()
            logs = {"harmful_loss": loss_h.item(),
                    "collapse_loss_harmful_at_theta": self._collapse_at_theta(logits, labels, loss_h.item())}
            if self.config.dormancy_harmful:
                logs["dormancy_harmful_loss"] = dormancy_loss(logits, labels, self.dormant,
                                                              self.config.dormancy_bound).item()
        return logs

    def probe(self, batches, at_point=None):
        """The trap on held-out batches (the alignment monitor): the same simulated harmful
        step(s) as training (first order; with second_order the point θ' is the same), on the
        held-out harmful batch, and the collapse loss at the deepest point and at θ on the
        held-out retain batch. Logs trap_gap, collapse_loss (mean over the points, as in
        training), collapse_loss_at_theta, align_loss and harmful_loss; with trap_steps > 1 the
        per-point losses, with project_out_general harmful_general_cos, as training does; and
        `at_point()`'s values at the simulated points (`_point_logs`: point/<key> at the last,
        θ_K; with trap_steps > 1 also at each point and at the deepest); with self_destruct the
        cosine of the held-out harmful and general gradients at θ (cos_sd, SEAM's logs).
        Nothing reaches p.grad; θ is restored bit-exactly."""
        c = self.config
        retain = concat_batches(batches["align"], batches["general"], self.pad_id)
        trap_batch = retain if c.collapse_data == "retain" else batches["general"]
        with torch.no_grad(), final_norm_input(self.model, bool(c.collapse_rms)) as seen:
            logits, labels = self.answer_logits(retain)
            align_loss = token_ce(logits, labels).item()
            logs = {**self._rms_at_theta(seen, retain["labels"]), "align_loss": align_loss,
                    "collapse_loss_at_theta": self._collapse_at_theta(logits, labels, align_loss)}
            if c.dormancy:
                logs["dormancy_loss"] = dormancy_loss(logits, labels, self.dormant, c.dormancy_bound).item()
            del logits
        away = None
        if c.project_out_general:
            away = [g.detach() for g in self.grads(self.lm_loss(batches["general"]))]
        harmful = self.harmful_batches(batches["harmful"])
        logits, labels = self.answer_logits(harmful[0])
        loss_h = token_ce(logits, labels)
        logs.update(self._harmful_logs(logits, labels, loss_h))
        del logits
        g_h = self.grads(loss_h)
        del loss_h
        if away is not None:
            logs["harmful_general_cos"] = cosine(g_h, away)
        moments = {"seed": (c.trap_lora_seed, -1)}  # step_direction=lora: the probe's one fixed adapter
        direction, step = self.simulated_step(g_h, away, moments)
        del g_h
        logs.update(self._trap_first_order(direction, step, harmful, trap_batch, 0.0, away,
                                           apply=False, at_point=at_point, moments=moments))
        logs["trap_gap"] = self.trap_gap(logs)
        if c.self_destruct:  # the coupling on held-out batches: g_h and g_g at θ (2 passes, no ε-moves)
            with coupling.precision(self, True):
                loss_a, g_a, loss_b, g_b, _ = coupling.gradients(self, batches["harmful"], batches["general"],
                                                                 self.lm_loss, self.lm_loss)
                n_a, n_b, cos = coupling.norms_and_cosine(self, g_a, g_b)
            logs.update(coupling.sd_logs(cos, n_a, n_b, loss_a, loss_b))
        return logs

    def trap_gap(self, logs: dict) -> float:
        """exp(−KL) at the deepest simulated point minus exp(−KL) at θ, KL = the collapse loss
        minus the target's entropy (0 for the token target, where exp(−loss) is the geometric
        mean over answer tokens of the collapse token's probability). In [−1, 1]: 1 when one
        simulated harmful update lands fully in the collapse and θ shows none of it; about 0
        when no point collapsed, however dormant θ is, or when θ collapsed too."""
        K, F = self.config.trap_steps, self.config.collapse_from_step
        if K > 1 and f"collapse_loss_step{F}" in logs:
            deepest = min(logs[f"collapse_loss_step{k}"] for k in range(F, K + 1))
        else:
            deepest = logs["collapse_loss"]
        h = self.target_entropy
        return math.exp(-max(deepest - h, 0.0)) - math.exp(-max(logs["collapse_loss_at_theta"] - h, 0.0))

    def _collapse_at_theta(self, logits, labels, align_loss: float) -> float:
        """The collapse loss on logits whose answer CE is `align_loss`. For the token target,
        CE(token) = CE(label) + mean(logit_label − logit_token) over the same positions (the
        log-normalizer cancels), so no second softmax over the vocabulary is needed."""
        if self.config.collapse_target != "token":
            return self.collapse(logits, labels).item()
        shift, target = logits[:, :-1, :], labels[:, 1:]
        mask = target != IGNORE_INDEX
        label_logit = shift.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        gap = (label_logit.float() - shift[..., self.token].float())[mask]
        return align_loss + gap.mean().item()

    def _trap_first_order(self, direction: list, step: float, harmful, trap_batch, scale, away=None,
                          apply: bool = True, at_point=None, moments: Optional[dict] = None) -> dict:
        """Steps 2-3 for the K = trap_steps points θ_1..θ_K; returns the losses to log.

        Every move happens inside one `moved` context: θ_1 is its move, θ_{k+1} is taken in place
        from θ_k, and θ is restored bit-exactly from the one saved copy at the end. Each collapse
        gradient is weighted λ/n (n = K − F + 1 collapse points θ_F..θ_K, F = collapse_from_step, 1
        by default; K = 1: λ, the official code) and goes straight into p.grad, or (amortized mode)
        into the cache, which so holds λ times the mean over the n points.
        `away` (project_out_general) is projected out of every harmful gradient. `apply=False`
        (the held-out probe) only measures the collapse losses: no collapse gradient is taken;
        `at_point()`, if given, is called at each of θ_1..θ_K and its values returned as
        `_point_logs` names them (point/<key> at θ_K).
        `moments` (step_direction=adam) is the trajectory's Adam state after its first step.
        `harmful` is the list of the K steps' harmful batches (harmful_batches)."""
        c = self.config
        K, F = c.trap_steps, c.collapse_from_step
        n = K - F + 1  # the collapse points θ_F..θ_K
        collapse_losses, harmful_losses, points, rms_logs, head_losses = [], [], [], [], []
        compliance_losses = []
        with self.moved(direction, step, release=True):  # θ_1; `direction` is emptied here
            for k in range(1, K + 1):
                if k > 1:  # θ_k = θ_{k-1} − α·ĝ_h(θ_{k-1}), on the k-th step's harmful batch
                    loss_h = self.lm_loss(harmful[k - 1])
                    harmful_losses.append(loss_h.item())
                    direction, step = self.simulated_step(self.grads(loss_h), away, moments)  # all-reduced like g_h
                    del loss_h
                    self._step_further(direction, step)
                if k < F:  # on the way to the collapse points: no collapse pass
                    if at_point is not None:
                        points.append(at_point())
                    continue
                with torch.set_grad_enabled(apply and torch.is_grad_enabled()):
                    with final_norm_input(self.model, bool(c.collapse_rms)) as seen:
                        logits, labels = self.answer_logits(trap_batch)
                    loss_c = self.collapse(logits, labels)
                    collapse_losses.append(self._collapse_logs(logits, labels, loss_c))
                    if c.collapse_rms:
                        loss_c = loss_c + self._rms_term(seen, trap_batch["labels"], rms_logs)
                    del logits, seen
                    if c.collapse_harmful_head:  # the harmful answers' first H tokens at θ_k
                        logits, labels = self.answer_logits(answer_head(harmful[k - 1], c.collapse_harmful_head))
                        loss_hh = self.collapse(logits, labels)
                        head_losses.append(self._collapse_logs(logits, labels, loss_hh))
                        loss_c = loss_c + loss_hh
                        del logits, loss_hh
                    if c.point_compliance:  # the harmful answers at θ_k, the collapse word taken out
                        answers = harmful[k - 1]
                        if c.point_compliance_head:  # their first H tokens only
                            answers = answer_head(answers, c.point_compliance_head)
                        loss_u = suppressed_ce(*self.answer_logits(answers), self.suppress)
                        compliance_losses.append(loss_u.item())
                        loss_c = loss_c + c.point_compliance * loss_u
                        del loss_u
                if apply and c.trap_every == 1:
                    self.backward(loss_c, scale * c.lambda_collapse / n)
                elif apply:
                    g_c = self.grads(loss_c)
                    if self.cached_trap is None:
                        self.cached_trap = [g.detach().mul_(c.lambda_collapse / n) for g in g_c]
                    else:
                        for acc, g in zip(self.cached_trap, g_c):
                            acc.add_(g.detach(), alpha=c.lambda_collapse / n)
                    del g_c
                del loss_c
                if at_point is not None:
                    points.append(at_point())
        depth = "collapse_token_share" if c.collapse_target == "token" else "degenerate_rate"
        logs = {"collapse_loss": sum(collapse_losses) / n, **self._point_logs(points, depth)}
        if rms_logs:  # collapse_rms: the means over the n points
            logs["collapse_rms"] = sum(r for r, _ in rms_logs) / n
            logs["collapse_rms_loss"] = sum(x for _, x in rms_logs) / n
        if head_losses:
            logs["collapse_loss_harmful_head"] = sum(head_losses) / n
        if compliance_losses:
            logs["point_compliance_loss"] = sum(compliance_losses) / n
        if K > 1:
            logs.update({f"collapse_loss_step{k}": v for k, v in enumerate(collapse_losses, F)})
            logs.update({f"harmful_loss_step{k}": v for k, v in enumerate(harmful_losses, 1)})
        return logs

    @staticmethod
    def _point_logs(points: list, depth: str = "collapse_token_share") -> dict:
        """`at_point()`'s values at the simulated points θ_1..θ_K as logged keys: point/<key> at
        θ_K; with K > 1 also point/step<k>/<key> at each θ_k, point/deepest/<key> at the point
        whose greedy answers hold the largest `depth` value (the first of ties; NaN, no answers,
        counts as none), point/deepest_step its k, and point/shallowest/<key>,
        point/shallowest_step at the point with the smallest (the last of ties). `depth` is the
        collapse-token share for the token target and the degenerate rate for the uniform and
        random ones, which write no collapse token. A trap whose simulated attacker leaves the
        collapse again by θ_K is collapsed at an earlier point: selecting on θ_K's share alone kept
        a shallow step in round 21 (docs/methods/ctrap-smollm2.md); selecting on the shallowest
        point's keeps a step whose whole simulated path is collapsed (round 32)."""
        if not points:
            return {}
        logs = {f"point/{k}": v for k, v in points[-1].items()}
        if len(points) > 1:
            for i, point in enumerate(points, 1):
                logs.update({f"point/step{i}/{k}": v for k, v in point.items()})
            shares = [p.get(depth) for p in points]
            shares = [x if isinstance(x, float) and not math.isnan(x) else -math.inf for x in shares]
            if max(shares) > -math.inf:
                deepest = shares.index(max(shares))
                logs.update({f"point/deepest/{k}": v for k, v in points[deepest].items()})
                logs["point/deepest_step"] = deepest + 1
                read = [i for i, x in enumerate(shares) if x > -math.inf]
                shallowest = min(reversed(read), key=lambda i: shares[i])
                logs.update({f"point/shallowest/{k}": v for k, v in points[shallowest].items()})
                logs["point/shallowest_step"] = shallowest + 1
        return logs

    def _benign_guard(self, benign, retain, scale, g_b: Optional[list] = None) -> dict:
        """The selectivity term (benign_guard = μ > 0): μ·CE(θ_b; retain batch), θ_b = θ − α·ĝ_b one
        simulated step along the benign batch's gradient (the general batch, or with
        benign_guard_task the task's; or its sign / Adam direction), first order like the trap
        term; into p.grad, or (amortized mode) into the cached trap gradient. Logs the term and, as
        a monitor of selectivity, the collapse loss at θ_b (it should stay high). `g_b`, the general
        batch's gradient at θ if already taken (project_out_general), saves its pass; it is
        consumed (turned into the step's direction in place)."""
        c = self.config
        if g_b is None:
            g_b = self.grads(self.lm_loss(benign))
        direction, step = self.simulated_step(g_b)
        del g_b
        with self.moved(direction, step, release=True):
            logits, labels = self.answer_logits(retain)
            loss_g = token_ce(logits, labels)
            if c.trap_every == 1:
                self.backward(loss_g, scale * c.benign_guard)
            else:
                for acc, g in zip(self.cached_trap, self.grads(loss_g)):
                    acc.add_(g.detach(), alpha=c.benign_guard)
            guard = loss_g.item()
            del loss_g
            with torch.no_grad():
                at_benign = self._collapse_at_theta(logits.detach(), labels, guard)
        return {"guard_loss": guard, "collapse_loss_benign": at_benign}

    def _step_further(self, direction: list, step: float) -> None:
        """θ += step·direction in place inside an active `moved` (which restores θ at its end);
        empties `direction` so its tensors are freed before the next pass, and drops autocast's
        cached low-precision weights, which would otherwise still be those of the previous point."""
        _shift(self.params, direction, step)
        direction.clear()
        torch.clear_autocast_cache()

    def _trap_second_order(self, harmful, trap_batch, scale):
        """λ·∇_θ ℓ_collapse(θ'(θ)) with θ'(θ) = θ − α·ĝ_h(θ), differentiated exactly."""
        from torch.func import functional_call

        c = self.config
        logs = {}
        g_h = self._harmful_at_theta(harmful, scale, logs, create_graph=True)
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in g_h))
        factor = c.alpha / (norm + 1e-7) if c.normalize else c.alpha
        moved = {n: p - factor * g for n, p, g in zip(self._names, self.params, g_h)}
        with final_norm_input(self.model, bool(c.collapse_rms)) as seen:
            logits = functional_call(self.model, moved, args=(),
                                     kwargs={"input_ids": trap_batch["input_ids"],
                                             "attention_mask": trap_batch["attention_mask"]}).logits
        loss_c = self.collapse(logits, trap_batch["labels"])
        logs["collapse_loss"] = self._collapse_logs(logits, trap_batch["labels"], loss_c)
        if c.collapse_rms:
            rms_logs = []
            loss_c = loss_c + self._rms_term(seen, trap_batch["labels"], rms_logs)
            logs["collapse_rms"], logs["collapse_rms_loss"] = rms_logs[0]
        self.add_to_grad(self.grads(loss_c), scale * c.lambda_collapse)
        return logs
