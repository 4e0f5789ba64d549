"""SEAM's self-destructive coupling term, shared by SEAM and (as a deviation) CTRAP.

L_sd = cos(g_a, g_b), g_a = ∇(harmful loss), g_b = ∇(benign loss), and

    ∇L_sd = H_a (ĝ_b − c·ĝ_a)/‖g_a‖ + H_b (ĝ_a − c·ĝ_b)/‖g_b‖,   ĝ = g/‖g‖, c = cos(g_a, g_b),

by the official code's finite differences (θ moved by ε along each direction, the gradient
recomputed, θ restored bit-exactly: 4 passes) or by exact Hessian-vector products (one double
backward). Each function takes the defense (for its parameters, `grads` and `moved`) and the two
loss functions, batch -> scalar, so each defense says what its harmful and benign losses are.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Tuple

import torch

from .base import Defense, average_across_processes, dot, global_norm

LossFn = Callable[[dict], torch.Tensor]


def fp32(g: torch.Tensor) -> torch.Tensor:
    """Detached, in at least fp32 (fp64 stays fp64)."""
    return g.detach().to(torch.promote_types(g.dtype, torch.float32))


def precision(defense: Defense, keep_fp32: bool):
    """Autocast off for the L_sd passes (keep_fp32), wherever the engine turned it on: an ε-move
    of fp32 master weights would otherwise be rounded away by autocast's bf16 casts."""
    device = defense.params[0].device
    if keep_fp32 and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def norms_and_cosine(defense: Defense, g_a, g_b):
    """‖g_a‖, ‖g_b‖ and c = g_a·g_b / (‖g_a‖‖g_b‖ + 1e-8), as the code (fp32)."""
    n_a, n_b = global_norm(g_a), global_norm(g_b)
    for name, n in (("harmful", n_a), ("benign", n_b)):
        if not (float(n) > 0 and math.isfinite(float(n))):
            raise FloatingPointError(f"{defense.name}: the {name} gradient norm is {float(n)}; the "
                                     f"self-destructive term needs a non-zero finite gradient (check "
                                     f"the data and learning rate)")
    return n_a, n_b, dot(g_a, g_b) / (n_a * n_b + 1e-8)


def _direction(g_x, n_x, g_y, n_y, cos):
    """ĝ_x − c·ĝ_y (fp32): H_y acts on it, i.e. θ moves this way to re-measure g_y."""
    return [x / n_x - cos * y / n_y for x, y in zip(g_x, g_y)]


def gradients(defense: Defense, harmful: dict, benign: dict, harmful_loss: LossFn, benign_loss: LossFn):
    """(loss_a, g_a, loss_b, g_b) with the gradients in fp32, and the RNG states the two passes
    started from (for the moved passes to replay their dropout masks)."""
    device = defense.params[0].device
    rng_a = _rng_state(device)
    loss_a = harmful_loss(harmful)
    g_a = [fp32(g) for g in defense.grads(loss_a)]
    rng_b = _rng_state(device)
    loss_b = benign_loss(benign)
    g_b = [fp32(g) for g in defense.grads(loss_b)]
    return loss_a, g_a, loss_b, g_b, (rng_a, rng_b)


def sd_logs(cos, n_a, n_b, loss_a, loss_b) -> dict:
    return {"cos_sd": float(cos), "harmful_ce": loss_a.item(), "benign_ce": loss_b.item(),
            "harmful_grad_norm": float(n_a), "benign_grad_norm": float(n_b)}


def self_destruct_grad(defense: Defense, harmful: dict, benign: dict, harmful_loss: LossFn,
                       benign_loss: LossFn, epsilon: float, exact: bool = False,
                       keep_fp32: bool = True) -> Tuple[List[torch.Tensor], dict]:
    """∇_θ cos(g_a, g_b) (without β) as fp32 tensors aligned with defense.params, and the logs
    (cos_sd, harmful_ce, benign_ce, harmful_grad_norm, benign_grad_norm)."""
    with precision(defense, keep_fp32):
        if exact:
            return _exact(defense, harmful, benign, harmful_loss, benign_loss)
        return _finite_difference(defense, harmful, benign, harmful_loss, benign_loss, epsilon)


def _finite_difference(defense, harmful, benign, harmful_loss, benign_loss, eps):
    device = defense.params[0].device
    loss_a, g_a, loss_b, g_b, (rng_a, rng_b) = gradients(defense, harmful, benign, harmful_loss, benign_loss)
    n_a, n_b, cos = norms_and_cosine(defense, g_a, g_b)
    # g_a' at θ + ε(ĝ_b − c·ĝ_a), same dropout masks as g_a's pass; restored on exit (the
    # direction list is released once the move is applied, before the pass at θ')
    with defense.moved(_direction(g_b, n_b, g_a, n_a, cos), eps, release=True), _replayed_rng(rng_a, device):
        out = [fp32(g) for g in defense.grads(harmful_loss(harmful))]
    for o, g in zip(out, g_a):                                    # (g_a' − g_a)/(ε‖g_a‖), in place
        o.sub_(g).div_(eps * n_a)
    # the second direction ĝ_a − c·ĝ_b, built in g_a's storage (g_a is not needed any more);
    # the same operations as _direction, so the same numbers
    for x, y in zip(g_a, g_b):
        x.div_(n_a).sub_(cos * y / n_b)
    v, g_a = g_a, None
    del o, g, x, y  # loop variables would keep one tensor of the direction alive
    # g_b' at θ + ε(ĝ_a − c·ĝ_b), same dropout masks as g_b's pass; restored on exit
    with defense.moved(v, eps, release=True), _replayed_rng(rng_b, device):
        g_b2 = [fp32(g) for g in defense.grads(benign_loss(benign))]
    for o, g2, g in zip(out, g_b2, g_b):                          # + (g_b' − g_b)/(ε‖g_b‖)
        o.add_(g2.sub_(g), alpha=1.0 / float(eps * n_b))
    return out, sd_logs(cos, n_a, n_b, loss_a, loss_b)


def _exact(defense, harmful, benign, harmful_loss, benign_loss):
    loss_a = harmful_loss(harmful)
    g_a = defense.grads(loss_a, retain_graph=True, create_graph=True)
    loss_b = benign_loss(benign)
    g_b = defense.grads(loss_b, retain_graph=True, create_graph=True)
    # the directions come from the global-batch gradients when several processes train
    fixed_a, fixed_b = [g.detach().clone() for g in g_a], [g.detach().clone() for g in g_b]
    average_across_processes(fixed_a + fixed_b)
    fixed_a, fixed_b = [fp32(g) for g in fixed_a], [fp32(g) for g in fixed_b]
    n_a, n_b, cos = norms_and_cosine(defense, fixed_a, fixed_b)
    v_a = _direction(fixed_b, n_b, fixed_a, n_a, cos)  # H_a acts on ĝ_b − c·ĝ_a
    v_b = _direction(fixed_a, n_a, fixed_b, n_b, cos)  # H_b acts on ĝ_a − c·ĝ_b
    del fixed_a, fixed_b
    # one double backward for both: ∇[g_a·v_a/‖g_a‖ + g_b·v_b/‖g_b‖] with v, norms held fixed
    objective = dot(g_a, v_a) / n_a + dot(g_b, v_b) / n_b
    out = [fp32(g) for g in defense.grads(objective)]
    return out, sd_logs(cos, n_a, n_b, loss_a, loss_b)


# Same dropout masks in the perturbed pass as in the unperturbed one

def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def _replayed_rng(state: dict, device: torch.device):
    """Run a block with the RNG as it was in `state` (so dropout draws the same masks and
    g' − g measures the move, not a new mask), then continue the global stream untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        yield
