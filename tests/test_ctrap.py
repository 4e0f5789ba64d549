"""CTRAP's math on the tiny model: the gradient equals a hand computation from its three passes,
the simulated step leaves parameters untouched, the second-order option matches torch.func,
and the collapse loss is the cross-entropy to the collapse target."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from inoculate.data.encode import collate, encode_record
from inoculate.data.records import Record
from inoculate.defenses.base import token_ce
from inoculate.defenses.ctrap import CTRAP, CTRAPConfig, collapse_loss, concat_batches
from inoculate.models import add_lora, load_model

HARMFUL = [Record(prompt=f"How do I break into house number {i}?", response=f"Sure, step {i}: find a way in.",
                  refusal="I'm sorry, I can't help with that.") for i in range(4)]
GENERAL = [Record(prompt=f"What is {i} plus {i}?", response=f"{i} plus {i} is {2 * i}.") for i in range(4)]


def _batches(tok):
    enc = lambda rs, t: collate([encode_record(r, tok, "alpaca", 64, t) for r in rs], tok.pad_token_id)
    return {"align": enc(HARMFUL[:2], "refusal"), "general": enc(GENERAL[:2], "response"),
            "harmful": enc(HARMFUL, "response")}


def _model(lora=True, attn=None, dtype="float32"):
    torch.manual_seed(0)
    loaded = load_model("tiny-llama", attn_implementation=attn, dtype=dtype)
    model = loaded.model
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0)
        # LoRA B starts at zero, which makes many gradients vanish: give it values
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    else:
        model.requires_grad_(True)
    return model, loaded.tokenizer


def _defense(model, tok, **kw):
    d = CTRAP(CTRAPConfig(**kw), batch_size=2)
    d.setup(model, tok)
    return d


def _grads(model, params, loss):
    return [g.detach().clone() for g in torch.autograd.grad(loss, params)]


@pytest.mark.parametrize("lora,collapse_data", [(True, "retain"), (False, "retain"), (True, "general")])
def test_first_order_gradient_matches_three_passes_by_hand(lora, collapse_data):
    model, tok = _model(lora)
    b = _batches(tok)
    d = _defense(model, tok, alpha=0.1, lambda_collapse=0.1, collapse_data=collapse_data)
    params = d.params
    before = [p.detach().clone() for p in params]
    logs = d.accumulate(b, scale=1.0)
    got = [p.grad.clone() for p in params]
    # parameters are bit-identical after the simulated step and its restore
    assert all(torch.equal(p, q) for p, q in zip(params, before))

    # by hand
    fwd = lambda batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_h = _grads(model, params, token_ce(fwd(b["harmful"]), b["harmful"]["labels"]))
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
    with torch.no_grad():
        for p, g in zip(params, g_h):
            p.sub_(0.1 * g / (norm + 1e-7))
    e = tok(" error", add_special_tokens=False)["input_ids"][-1]
    trap = retain if collapse_data == "retain" else b["general"]
    relabelled = torch.where(trap["labels"] != -100, e, -100)
    g_c = _grads(model, params, token_ce(fwd(trap), relabelled))
    with torch.no_grad():
        for p, q in zip(params, before):
            p.copy_(q)
    g_a = _grads(model, params, token_ce(fwd(retain), retain["labels"]))
    # the dormancy monitor is the collapse loss at θ on the retain batch
    at_theta = token_ce(fwd(retain), torch.where(retain["labels"] != -100, e, -100))
    assert logs["collapse_loss_at_theta"] == pytest.approx(float(at_theta), rel=1e-5)
    expected = [a + 0.1 * c for a, c in zip(g_a, g_c)]
    assert sum(float(g.abs().sum()) for g in g_c) > 0
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)

    # the optimizer step is the only change
    opt = torch.optim.SGD(params, lr=0.5)
    opt.step()
    for p, q, g in zip(params, before, got):
        assert torch.equal(p.detach(), q - 0.5 * g)


def test_collapse_token_is_last_token_of_an_error():
    _, tok = _model()
    d = _defense(*_model())
    assert tok.convert_ids_to_tokens(d.token) == "Ġerror"


def test_collapse_loss_targets():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 2, -100, -100]])
    mask = labels[:, 1:] != -100
    lp = F.log_softmax(logits[:, :-1][mask], -1)
    assert torch.allclose(collapse_loss(logits, labels, "token", 7), -lp[:, 7].mean())
    assert torch.allclose(collapse_loss(logits, labels, "uniform", 7), -lp.mean())
    q = torch.softmax(torch.randn(11), 0)
    assert torch.allclose(collapse_loss(logits, labels, "random", 7, q), -(lp * q).sum(-1).mean())
    # the token target is minimized by predicting the token everywhere
    peaked = torch.full((2, 5, 11), -20.0)
    peaked[..., 7] = 20.0
    assert collapse_loss(peaked, labels, "token", 7) < 1e-6


def test_unnormalized_step_uses_raw_gradient():
    model, tok = _model()
    d = _defense(model, tok, alpha=0.1, normalize=False)
    g = [torch.ones(2), torch.ones(3)]
    direction, step = d.simulated_step(g)
    assert step == -0.1 and direction is g
    d2 = _defense(model, tok, alpha=0.1)
    _, step2 = d2.simulated_step(g)
    assert step2 == pytest.approx(-0.1 / (5 ** 0.5 + 1e-7))


def test_second_order_matches_torch_func_reference():
    from torch.func import functional_call, grad

    model, tok = _model(lora=True, attn="eager")
    b = _batches(tok)
    alpha, lam = 0.1, 1.0
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, second_order=True)
    d.accumulate(b, scale=1.0)
    got = [p.grad.clone() for p in d.params]

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    e = d.token
    relabelled = torch.where(retain["labels"] != -100, e, -100)

    def logits_at(params, batch):
        return functional_call(model, params, args=(), kwargs={
            "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).logits

    def harmful_loss(params):
        return token_ce(logits_at(params, b["harmful"]), b["harmful"]["labels"])

    def trap(params):
        g = grad(harmful_loss)(params)
        norm = torch.sqrt(sum((g[n] ** 2).sum() for n in names))
        moved = {n: params[n] - alpha * g[n] / (norm + 1e-7) for n in names}
        return token_ce(logits_at(moved, retain), relabelled)

    def align_loss(params):
        return token_ce(logits_at(params, retain), retain["labels"])

    g_trap = grad(trap)(theta)
    g_align = grad(align_loss)(theta)
    for n, x in zip(names, got):
        torch.testing.assert_close(x, g_align[n] + lam * g_trap[n], rtol=1e-3, atol=1e-6)

    # and the reference really is different from the first-order gradient
    for p in d.params:
        p.grad = None
    _defense(model, tok, alpha=alpha, lambda_collapse=lam).accumulate(b, scale=1.0)
    first = torch.cat([p.grad.flatten() for p in d.params])
    exact = torch.cat([(g_align[n] + lam * g_trap[n]).flatten() for n in names])
    assert (first - exact).norm() > 1e-3 * exact.norm()


def test_amortized_mode_reuses_the_trap_gradient():
    model, tok = _model()
    b = _batches(tok)
    d = _defense(model, tok, trap_every=3, lambda_collapse=0.5)
    d.accumulate(b, scale=1.0)
    cached = [g.clone() for g in d.cached_trap]
    for p in d.params:
        p.grad = None
    logs = d.accumulate(b, scale=1.0)  # second step: no new trap passes
    assert "collapse_loss" not in logs
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_a = _grads(model, d.params, d.lm_loss(retain))
    for p, a, c in zip(d.params, g_a, cached):  # the cache holds λ·g_c
        torch.testing.assert_close(p.grad, a + c, rtol=1e-5, atol=1e-8)
    assert all(torch.equal(x, y) for x, y in zip(cached, d.cached_trap))


def test_trap_direction_is_freed_before_the_pass_at_theta_prime():
    from test_baselines import _moved_pass_holds_direction
    model, tok = _model(lora=False)
    d = _defense(model, tok)
    assert _moved_pass_holds_direction(d, _batches(tok)) == [False]
    assert _defense(model, tok, trap_every=4).passes_per_step == 1.5


def test_bad_collapse_data_is_rejected():
    from inoculate.config import ConfigError
    with pytest.raises(ConfigError, match="collapse_data"):
        CTRAPConfig(collapse_data="harmful")


def test_bad_collapse_target_is_rejected():
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match="collapse_target"):
        CTRAPConfig(collapse_target="noise")


def test_answer_logits_trimming_gives_the_same_loss():
    model, tok = _model()
    b = _batches(tok)["align"]
    d = _defense(model, tok)
    logits, labels = d.answer_logits(b)
    assert logits.shape[1] < b["input_ids"].shape[1]  # the prompt positions were skipped
    full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(d.lm_loss(b), token_ce(full, b["labels"]))


def test_simulated_step_takes_effect_under_bf16_autocast():
    """Autocast caches bf16 copies of the weights for the length of its context: the move to θ'
    must invalidate them, or the collapse pass silently runs at θ (alpha would do nothing)."""
    losses = []
    for alpha in (0.1, 10.0):
        model, tok = _model()
        d = _defense(model, tok, alpha=alpha)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(d.accumulate(_batches(tok), scale=1.0)["collapse_loss"])
    assert losses[0] != losses[1]


# ---------------------------------------------------------------------------------------------
# trap_steps = K (a deviation from the paper, off by default): the collapse term is the mean over
# K simulated normalized harmful steps θ_1..θ_K, the harmful gradient recomputed at each θ_k
# ---------------------------------------------------------------------------------------------

def _fwd(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _accumulate_restored(d, b, scale=1.0):
    """One accumulate; asserts that every parameter is bit-identical afterwards (all moves
    restored) and returns the logs and the gradient it left in p.grad."""
    before = [p.detach().clone() for p in d.params]
    logs = d.accumulate(b, scale=scale)
    assert all(torch.equal(p, q) for p, q in zip(d.params, before))
    return logs, [p.grad.clone() for p in d.params]


def _trajectory_by_hand(model, params, b, trap, e, alpha, K, normalize=True, sign=False, away=None, extra=None):
    """The passes of K simulated steps written out: returns the collapse gradients and losses at
    θ_1..θ_K and the harmful losses at θ_0..θ_{K-1}; θ is restored at the end. `sign` moves along
    sign(g_h) (step_direction=sign) instead of g_h; `away` (project_out_general) is removed from
    every g_h first; `extra()`, if given, is a loss added to the collapse loss at each point (the
    gradients include it, the logged collapse losses do not)."""
    theta = [p.detach().clone() for p in params]
    relabelled = torch.where(trap["labels"] != -100, e, -100)
    g_c, collapse, harmful = [], [], []
    for _ in range(K):
        loss_h = token_ce(_fwd(model, b["harmful"]), b["harmful"]["labels"])
        harmful.append(float(loss_h))
        g_h = _grads(model, params, loss_h)
        if away is not None:
            coef = sum((g * a).sum() for g, a in zip(g_h, away)) / sum((a * a).sum() for a in away)
            g_h = [g - coef * a for g, a in zip(g_h, away)]
        if sign:
            g_h = [torch.sign(g) for g in g_h]
        norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
        with torch.no_grad():
            for p, g in zip(params, g_h):
                p.sub_(alpha * g / (norm + 1e-7) if normalize else alpha * g)
        loss_c = token_ce(_fwd(model, trap), relabelled)
        collapse.append(float(loss_c))
        g_c.append(_grads(model, params, loss_c if extra is None else loss_c + extra()))
    with torch.no_grad():
        for p, q in zip(params, theta):
            p.copy_(q)
    return g_c, collapse, harmful


def test_trap_steps_1_is_the_official_step_bit_for_bit():
    """trap_steps=1 runs the pre-option code's operations in its order: the reference below is
    that code written out with the defense's own helpers, compared with torch.equal."""
    model, tok = _model()
    b = _batches(tok)
    d = _defense(model, tok, alpha=0.3, lambda_collapse=0.2, trap_steps=1)
    logs = d.accumulate(b, scale=0.5)
    got = [p.grad.clone() for p in d.params]
    for p in d.params:
        p.grad = None
    ref = _defense(model, tok, alpha=0.3, lambda_collapse=0.2)
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    loss_h = ref.lm_loss(b["harmful"])
    direction, step = ref.simulated_step(ref.grads(loss_h))
    with ref.moved(direction, step, release=True):
        loss_c = ref.collapse(*ref.answer_logits(retain))
        ref.backward(loss_c, 0.5 * 0.2)
    loss_a = token_ce(*ref.answer_logits(retain))
    ref.backward(loss_a, 0.5)
    assert all(torch.equal(x, p.grad) for x, p in zip(got, ref.params))
    assert list(logs) == ["harmful_loss", "collapse_loss_harmful_at_theta", "collapse_loss", "align_loss",
                          "collapse_loss_at_theta", "trap_gap"]
    assert (logs["harmful_loss"], logs["collapse_loss"], logs["align_loss"]) == (
        loss_h.item(), loss_c.item(), loss_a.item())
    assert d.passes_per_step == 3


@pytest.mark.parametrize("lora,normalize,collapse_data", [(True, True, "retain"), (False, True, "retain"),
                                                          (True, False, "general")])
def test_two_trap_steps_gradient_matches_the_passes_by_hand(lora, normalize, collapse_data):
    model, tok = _model(lora)
    b = _batches(tok)
    alpha, lam, scale = (0.5, 0.3, 0.5) if normalize else (0.05, 0.3, 0.5)
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, normalize=normalize,
                 collapse_data=collapse_data, trap_steps=2)
    assert d.passes_per_step == 5
    params = d.params
    logs, got = _accumulate_restored(d, b, scale)  # θ bit-identical after the two moves

    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    trap = retain if collapse_data == "retain" else b["general"]
    g_c, collapse, harmful = _trajectory_by_hand(model, params, b, trap, d.token, alpha, 2, normalize)
    g_a = _grads(model, params, token_ce(_fwd(model, retain), retain["labels"]))
    expected = [scale * (a + lam * (c1 + c2) / 2) for a, c1, c2 in zip(g_a, *g_c)]
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    assert logs["harmful_loss"] == pytest.approx(harmful[0], rel=1e-5)
    assert logs["harmful_loss_step1"] == pytest.approx(harmful[1], rel=1e-5)  # at θ_1
    assert logs["collapse_loss_step1"] == pytest.approx(collapse[0], rel=1e-5)
    assert logs["collapse_loss_step2"] == pytest.approx(collapse[1], rel=1e-5)
    assert logs["collapse_loss"] == pytest.approx((collapse[0] + collapse[1]) / 2, rel=1e-5)
    assert "collapse_loss_step3" not in logs and "harmful_loss_step2" not in logs
    # the second point is a real second step: its collapse gradient differs from the first's,
    # so the K=2 gradient is not K=1's
    c1 = torch.cat([g.flatten() for g in g_c[0]])
    c2 = torch.cat([g.flatten() for g in g_c[1]])
    assert (c1 - c2).norm() > 1e-2 * c1.norm()


@pytest.mark.parametrize("lora", [True, False])
def test_collapse_from_step_takes_the_collapse_term_at_the_later_points_only(lora):
    """collapse_from_step = F: the simulated attacker takes all K steps, but the collapse term is
    the mean over θ_F..θ_K only (λ/(K − F + 1) each); no collapse pass at the earlier points,
    whose losses are not logged; trap_gap reads the collapse points; the probe still answers at
    every point; θ is restored bit-exactly."""
    model, tok = _model(lora)
    b = _batches(tok)
    alpha, lam, scale = 0.5, 0.3, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, trap_steps=3, collapse_from_step=2)
    assert d.passes_per_step == 1 + 3 + 2
    params = d.params
    logs, got = _accumulate_restored(d, b, scale)
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_c, collapse, harmful = _trajectory_by_hand(model, params, b, retain, d.token, alpha, 3)
    g_a = _grads(model, params, token_ce(_fwd(model, retain), retain["labels"]))
    expected = [scale * (a + lam * (c2 + c3) / 2) for a, _, c2, c3 in zip(g_a, *g_c)]
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    assert "collapse_loss_step1" not in logs
    assert logs["collapse_loss_step2"] == pytest.approx(collapse[1], rel=1e-5)
    assert logs["collapse_loss_step3"] == pytest.approx(collapse[2], rel=1e-5)
    assert logs["collapse_loss"] == pytest.approx((collapse[1] + collapse[2]) / 2, rel=1e-5)
    assert logs["harmful_loss_step2"] == pytest.approx(harmful[2], rel=1e-5)
    deepest = min(collapse[1:])
    at_theta = logs["collapse_loss_at_theta"]
    assert logs["trap_gap"] == pytest.approx(math.exp(-deepest) - math.exp(-at_theta), rel=1e-4)
    before = [p.detach().clone() for p in params]
    seen = []
    probe = d.probe(b, at_point=lambda: seen.append(1) or {"collapse_token_share": float(len(seen))})
    assert len(seen) == 3 and probe["point/step1/collapse_token_share"] == 1.0
    assert "collapse_loss_step1" not in probe and "collapse_loss_step2" in probe
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("value", [0, 4, 1.5, True])
def test_bad_collapse_from_step_is_rejected_and_old_hashes_stay(value):
    from inoculate import pipeline
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match=r"ctrap.collapse_from_step must be an integer from 1 to trap_steps \(3\)"):
        CTRAPConfig(trap_steps=3, collapse_from_step=value)
    _, _, resolved = pipeline.align_config(dict(model="tiny-llama", defense="ctrap", **{"ctrap.trap_steps": 2}))
    assert "collapse_from_step" not in resolved["ctrap"]


@pytest.mark.parametrize("step_direction", ["gradient", "adam"])
def test_trap_steps_restore_parameters_exactly_and_free_each_direction(step_direction):
    """K=3 on full weights: θ is bit-identical afterwards, and at every forward pass no direction
    of an earlier move is alive (each is freed once applied, as for K=1; Adam's moments are
    fp32 copies of their own, not the directions)."""
    import gc
    import weakref

    model, tok = _model(lora=False)
    d = _defense(model, tok, alpha=0.5, trap_steps=3, step_direction=step_direction)
    before = [p.detach().clone() for p in d.params]
    refs, alive, made = [], [], []
    original = d.simulated_step

    def recording(g_h, away=None, moments=None):
        direction, step = original(g_h, away, moments)
        refs.extend(weakref.ref(t) for t in direction)
        made.append(len(direction))
        return direction, step

    def hook(module, args, kwargs):
        gc.collect()
        alive.append(any(r() is not None for r in refs))

    d.simulated_step = recording
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        logs = d.accumulate(_batches(tok), scale=1.0)
    finally:
        handle.remove()
    assert made == [len(d.params)] * 3  # g at θ, θ_1, θ_2
    # harmful θ, collapse θ_1, harmful θ_1, collapse θ_2, harmful θ_2, collapse θ_3, align θ
    assert alive == [False] * 7
    assert all(torch.equal(p, q) for p, q in zip(d.params, before))
    assert [f"collapse_loss_step{k}" in logs for k in (1, 2, 3)] == [True] * 3


def test_trap_steps_all_reduce_every_harmful_gradient(monkeypatch):
    """With several processes each g_k must be the global-batch gradient, as g_h is for K=1:
    every harmful gradient goes through average_across_processes."""
    import inoculate.defenses.base as base

    calls = []
    monkeypatch.setattr(base, "average_across_processes", lambda ts: calls.append(len(ts)))
    for K in (1, 3):
        calls.clear()
        model, tok = _model()
        d = _defense(model, tok, trap_steps=K)
        d.accumulate(_batches(tok), scale=1.0)
        assert calls == [len(d.params)] * K


def test_trap_steps_amortized_mode_caches_the_mean_over_the_points():
    model, tok = _model()
    b = _batches(tok)
    lam, alpha = 0.5, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, trap_every=2, trap_steps=2)
    assert d.passes_per_step == 3  # 1 + 2K/k
    d.accumulate(b, scale=1.0)
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_c, _, _ = _trajectory_by_hand(model, d.params, b, retain, d.token, alpha, 2)
    for x, c1, c2 in zip(d.cached_trap, *g_c):
        torch.testing.assert_close(x, lam * (c1 + c2) / 2, rtol=1e-4, atol=1e-8)
    cached = [g.clone() for g in d.cached_trap]
    for p in d.params:
        p.grad = None
    logs = d.accumulate(b, scale=1.0)  # second micro-step: the cache is reused, no trap passes
    assert not any(k.startswith(("collapse_loss_step", "harmful_loss")) for k in logs)
    assert "collapse_loss" not in logs
    g_a = _grads(model, d.params, d.lm_loss(retain))
    for p, a, c in zip(d.params, g_a, cached):
        torch.testing.assert_close(p.grad, a + c, rtol=1e-5, atol=1e-8)


def test_trap_steps_each_move_takes_effect_under_bf16_autocast():
    """Autocast's cached bf16 weights must be dropped after every in-place move, or the passes at
    θ_2 would run at θ_1 (and give exactly the same losses)."""
    model, tok = _model()
    d = _defense(model, tok, alpha=1.0, trap_steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logs = d.accumulate(_batches(tok), scale=1.0)
    assert logs["collapse_loss_step1"] != logs["collapse_loss_step2"]
    assert logs["harmful_loss_step1"] != logs["harmful_loss"]


@pytest.mark.parametrize("value", [0, -1])
def test_bad_trap_steps_is_rejected(value):
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match="trap_steps"):
        CTRAPConfig(trap_steps=value)


def test_trap_steps_with_second_order_is_refused():
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match="second_order and trap_steps"):
        CTRAPConfig(second_order=True, trap_steps=2)
    CTRAPConfig(second_order=True, trap_steps=1)  # the default K is fine


def test_trap_steps_from_the_command_line_and_old_config_hashes():
    """`ctrap.trap_steps` is typed from strings and rejected when bad; at its default it stays out
    of the resolved config, so CTRAP runs made before the option keep their config hash."""
    from dataclasses import fields

    from inoculate import pipeline
    from inoculate.config import ConfigError

    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2)
    _, dcfg, resolved = pipeline.align_config(values)
    assert dcfg.trap_steps == 1 and "trap_steps" not in resolved["ctrap"]
    assert set(resolved["ctrap"]) == {f.name for f in fields(CTRAPConfig)} - {
        "trap_steps", "step_direction", "benign_guard", "project_out_general",
        "adam_beta1", "adam_beta2", "adam_epsilon", "trap_fresh_batches", "benign_guard_task",
        "dormancy", "dormancy_bound", "trap_lora_r", "trap_lora_alpha", "trap_lora_targets", "trap_lora_seed",
        "dormancy_harmful", "collapse_margin", "collapse_rms", "collapse_harmful_head", "dormancy_variants",
        "collapse_from_step", "point_compliance", "point_compliance_head", "self_destruct",
        "self_destruct_epsilon"}
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.trap_steps": "2"})
    assert dcfg.trap_steps == 2 and resolved["ctrap"]["trap_steps"] == 2
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.step_direction": "adam",
                                               "ctrap.adam_beta2": "0.99"})
    assert dcfg.adam_beta2 == 0.99 and resolved["ctrap"]["adam_beta2"] == 0.99
    assert "adam_beta1" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.step_direction": "lora", "ctrap.normalize": "false",
                                               "ctrap.trap_lora_targets": "q_proj,v_proj", "ctrap.trap_lora_r": "8"})
    assert dcfg.trap_lora_targets == ["q_proj", "v_proj"] and resolved["ctrap"]["trap_lora_r"] == 8
    with pytest.raises(ConfigError, match="trap_steps"):
        pipeline.align_config({**values, "ctrap.trap_steps": "0"})


# ---------------------------------------------------------------------------------------------
# step_direction = sign (a deviation, off by default): the simulated step follows sign(g_h), the
# direction of Adam's first update, instead of g_h
# ---------------------------------------------------------------------------------------------

def test_sign_step_direction_and_length():
    model, tok = _model()
    g = lambda: [torch.tensor([3.0, -0.5, 0.0]), torch.tensor([-2e-6])]
    direction, step = _defense(model, tok, alpha=0.3, step_direction="sign").simulated_step(g())
    assert [d.tolist() for d in direction] == [[1.0, -1.0, 0.0], [-1.0]]
    assert step == pytest.approx(-0.3 / (3 ** 0.5 + 1e-7))  # length α over the 3 nonzero coordinates
    # unnormalized: every moving coordinate moves by α, one Adam step at learning rate α
    direction, step = _defense(model, tok, alpha=0.3, step_direction="sign", normalize=False).simulated_step(g())
    assert step == -0.3 and direction[0].tolist() == [1.0, -1.0, 0.0]
    # the default is the gradient itself
    raw = g()
    direction, _ = _defense(model, tok, alpha=0.3).simulated_step(raw)
    assert direction is raw and raw[0].tolist() == [3.0, -0.5, 0.0]


def test_adam_first_update_is_the_sign_step():
    """What the option models: one AdamW step (no weight decay) from fresh state moves θ by
    -lr·g/(|g| + eps) = -lr·sign(g) up to eps, the unnormalized sign step with α = lr."""
    model, tok = _model()
    d = _defense(model, tok, alpha=1e-3, step_direction="sign", normalize=False)
    b = _batches(tok)
    before = [p.detach().clone() for p in d.params]
    g_h = d.grads(d.lm_loss(b["harmful"]))
    for p, g in zip(d.params, g_h):
        p.grad = g.clone()
    torch.optim.AdamW(d.params, lr=1e-3, weight_decay=0.0, eps=1e-12).step()
    direction, step = d.simulated_step(g_h)
    for p, q, s in zip(d.params, before, direction):
        torch.testing.assert_close(p.detach(), q + step * s, rtol=0, atol=1e-7)


@pytest.mark.parametrize("lora,trap_steps,normalize", [(True, 1, True), (False, 1, True), (True, 2, True),
                                                        (True, 1, False)])
def test_sign_step_gradient_matches_the_passes_by_hand(lora, trap_steps, normalize):
    model, tok = _model(lora)
    b = _batches(tok)
    alpha = 0.5 if normalize else 0.01
    d = _defense(model, tok, alpha=alpha, lambda_collapse=0.3, step_direction="sign",
                 trap_steps=trap_steps, normalize=normalize)
    params = d.params
    _, got = _accumulate_restored(d, b)
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_c, _, _ = _trajectory_by_hand(model, params, b, retain, d.token, alpha, trap_steps,
                                    normalize=normalize, sign=True)
    g_a = _grads(model, params, token_ce(_fwd(model, retain), retain["labels"]))
    expected = [a + 0.3 * sum(cs) / trap_steps for a, *cs in zip(g_a, *g_c)]
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    # and it is not the gradient-direction trap
    g_grad, _, _ = _trajectory_by_hand(model, params, b, retain, d.token, alpha, trap_steps, normalize=normalize)
    diff = sum(float((x - y).norm()) for x, y in zip(g_c[0], g_grad[0]))
    assert diff > 1e-3 * sum(float(x.norm()) for x in g_c[0])


def test_bad_step_direction_is_rejected():
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match="step_direction"):
        CTRAPConfig(step_direction="adamw")
    for direction in ("sign", "adam"):
        with pytest.raises(ConfigError, match="second_order and step_direction"):
            CTRAPConfig(step_direction=direction, second_order=True)
    for field, value in [("adam_beta1", 1.0), ("adam_beta2", -0.1), ("adam_beta2", "0.9"), ("adam_epsilon", 0.0)]:
        with pytest.raises(ConfigError, match=field):
            CTRAPConfig(step_direction="adam", **{field: value})
    with pytest.raises(ConfigError, match="trap_fresh_batches needs trap_steps > 1"):
        CTRAPConfig(trap_fresh_batches=True)
    with pytest.raises(ConfigError, match="trap_fresh_batches must be"):
        CTRAPConfig(trap_fresh_batches="yes", trap_steps=2)


def test_fresh_batches_stream_draws_one_batch_per_simulated_step():
    model, tok = _model()
    d = _defense(model, tok, harmful_batch_size=3, trap_steps=2, trap_fresh_batches=True)
    assert d.streams()["harmful"].batch_size == 6
    assert _defense(model, tok, harmful_batch_size=3, trap_steps=2).streams()["harmful"].batch_size == 3
    one = {k: v[:1] for k, v in _batches(tok)["harmful"].items()}
    with pytest.raises(ValueError, match="fewer than trap_steps=2"):
        d.harmful_batches(one)


# step_direction = adam (a deviation, off by default): the trap_steps simulated steps are Adam
# steps with the moments carried across them, the first K iterates of an AdamW attacker
# ---------------------------------------------------------------------------------------------

def _adam_iterates(d, batches, lr, betas=(0.9, 0.999), eps=1e-8):
    """θ_1..θ_K of torch.optim.AdamW (no weight decay) from θ, step k on the loss of batches[k-1];
    θ is restored at the end."""
    theta = [p.detach().clone() for p in d.params]
    opt = torch.optim.AdamW(d.params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    points = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        d.lm_loss(batch).backward()
        opt.step()
        points.append([p.detach().clone() for p in d.params])
    with torch.no_grad():
        for p, q in zip(d.params, theta):
            p.copy_(q)
            p.grad = None
    return points


@pytest.mark.parametrize("lora,fresh", [(True, False), (False, False), (True, True)])
def test_adam_trap_follows_the_adamw_attackers_first_iterates(lora, fresh):
    """With normalize=false the K simulated points are torch.optim.AdamW's first K iterates at
    lr α on the harmful batch (with trap_fresh_batches: step k on the k-th part of it, as an
    attacker drawing a new batch each step), and the gradient is g_a + λ·mean_k ∇ℓ_collapse(θ_k)."""
    model, tok = _model(lora)
    b = _batches(tok)
    alpha, lam, K, betas = 0.02, 0.3, 3, (0.8, 0.95)
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, step_direction="adam", normalize=False,
                 trap_steps=K, adam_beta1=betas[0], adam_beta2=betas[1], trap_fresh_batches=fresh)
    h = b["harmful"]
    parts = [{k: v[i:j] for k, v in h.items()} for i, j in [(0, 2), (2, 3), (3, 4)]] if fresh else [h] * K
    assert [p["input_ids"].shape[0] for p in d.harmful_batches(h)] == [p["input_ids"].shape[0] for p in parts]
    points = _adam_iterates(d, parts, alpha, betas)
    if fresh:  # not the iterates on one batch
        same = _adam_iterates(d, [h] * K, alpha, betas)[-1]
        assert sum(float((x - y).norm()) for x, y in zip(points[-1], same)) > 1e-4
    # the probe's deepest point is the AdamW attacker's K-th iterate
    seen = d.probe(b, at_point=lambda: {"theta": [p.detach().clone() for p in d.params]})["point/theta"]
    for x, y in zip(seen, points[-1]):  # (coordinates whose gradient is near ε amplify rounding)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # the gradient: the collapse gradients at those iterates, averaged, plus the alignment gradient
    _, got = _accumulate_restored(d, b)
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    relabelled = torch.where(retain["labels"] != -100, d.token, -100)
    theta = [p.detach().clone() for p in d.params]
    g_c = []
    for point in points:
        with torch.no_grad():
            for p, q in zip(d.params, point):
                p.copy_(q)
        g_c.append(_grads(model, d.params, token_ce(_fwd(model, retain), relabelled)))
    with torch.no_grad():
        for p, q in zip(d.params, theta):
            p.copy_(q)
    g_a = _grads(model, d.params, token_ce(_fwd(model, retain), retain["labels"]))
    expected = [a + lam * sum(cs) / K for a, *cs in zip(g_a, *g_c)]
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    # beyond the first step it is not the fresh-sign trajectory
    sign = _trajectory_by_hand(model, d.params, b, retain, d.token, alpha, K, normalize=False, sign=True)[0]
    diff = sum(float((x - y).norm()) for x, y in zip(sign[-1], g_c[-1]))
    assert diff > 1e-3 * sum(float(x.norm()) for x in g_c[-1])


def test_adam_direction_first_step_is_the_sign_and_normalize_sets_the_length():
    model, tok = _model()
    g = lambda: [torch.tensor([3.0, -0.5, 0.0]), torch.tensor([-2e-3])]
    d = _defense(model, tok, alpha=0.3, step_direction="adam", adam_epsilon=1e-12)
    direction, step = d.simulated_step(g())
    torch.testing.assert_close(torch.cat(direction), torch.tensor([1.0, -1.0, 0.0, -1.0]))
    assert step == pytest.approx(-0.3 / 3 ** 0.5, rel=1e-6)  # length α, as for the other directions
    # a second step with the same moments is no longer a sign: m̂/√v̂ mixes the two gradients
    moments = {}
    d.simulated_step(g(), moments=moments)
    direction, _ = d.simulated_step([torch.tensor([-3.0, -0.5, 1.0]), torch.tensor([-2e-3])], moments=moments)
    assert moments["t"] == 2 and abs(float(direction[0][0])) < 0.5 and float(direction[0][1]) == pytest.approx(-1.0)


# step_direction = lora (a deviation, off by default): the simulated steps are the AdamW iterates
# of a fresh LoRA adapter, the path of a customer's LoRA fine-tuning
# ---------------------------------------------------------------------------------------------

def test_peft_draws_lora_a_as_the_lora_trap_does():
    """The simulated adapter draws A from U(−1/√in, 1/√in), peft's kaiming-uniform (a = √5)."""
    model, _ = _model(lora=True)
    a = [p.detach() for n, p in model.named_parameters() if "lora_A" in n]
    fan_in = a[0].shape[1]
    values = torch.cat([x.flatten() for x in a])
    assert float(values.abs().max()) <= 1 / fan_in ** 0.5
    assert float(values.std()) == pytest.approx(1 / (3 * fan_in) ** 0.5, rel=0.1)


@pytest.mark.parametrize("K", [1, 3])
def test_lora_trap_follows_a_fresh_lora_adapters_adamw_iterates(K):
    """The K simulated points are the merged weights after K steps of torch.optim.AdamW (no
    weight decay) on a fresh peft adapter (B = 0, the same A) at lr α on the harmful batch:
    only the adapted q/k/v weights move, and θ is restored."""
    import copy

    model, tok = _model(lora=False)
    b = _batches(tok)
    lr, r, lora_alpha = 0.05, 4, 8
    d = _defense(model, tok, alpha=lr, step_direction="lora", normalize=False, trap_steps=K,
                 trap_lora_r=r, trap_lora_alpha=lora_alpha)
    seen = d.probe(b, at_point=lambda: {"theta": [p.detach().clone() for p in d.params]})["point/theta"]
    # the probe's adapter: its A, drawn from the probe's seed (the first step leaves A as drawn)
    moments = {"seed": (0, -1)}
    d.simulated_step(d.grads(d.lm_loss(b["harmful"])), moments=moments)
    attacker = add_lora(copy.deepcopy(model), r=r, alpha=lora_alpha, dropout=0.0)
    lora_a = [p for n, p in attacker.named_parameters() if "lora_A" in n]
    assert len(lora_a) == len(moments["A"]) == len(d._lora_sites)
    with torch.no_grad():
        for p, a in zip(lora_a, moments["A"]):
            p.copy_(a)
    opt = torch.optim.AdamW([p for p in attacker.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for _ in range(K):
        opt.zero_grad()
        token_ce(_fwd(attacker, b["harmful"]), b["harmful"]["labels"]).backward()
        opt.step()
    merged = dict(attacker.merge_and_unload().named_parameters())
    adapted = {i for i, _ in d._lora_sites}
    moved = 0
    for i, (name, p, x) in enumerate(zip(d._names, d.params, seen)):
        if i in adapted:
            torch.testing.assert_close(x, merged[name], rtol=1e-4, atol=1e-6)
            moved += not torch.equal(x, p)
        else:
            assert torch.equal(x, p), name
    assert moved == len(adapted)


def test_lora_trap_gradient_and_fresh_adapter_per_refresh():
    """accumulate leaves θ bit-identical, adds λ·∇ℓ_collapse at the LoRA point to g_a, and draws
    a new adapter at every refresh (two micro-steps, two different points)."""
    model, tok = _model(lora=False)
    b = _batches(tok)
    d = _defense(model, tok, alpha=0.05, lambda_collapse=0.3, step_direction="lora", normalize=False,
                 trap_lora_r=4, trap_lora_alpha=8)
    _, first = _accumulate_restored(d, b)
    for p in d.params:
        p.grad = None
    _, second = _accumulate_restored(d, b)
    assert sum(float((x - y).norm()) for x, y in zip(first, second)) > 1e-6
    # the first micro-step by hand: its adapter is drawn from (seed 0, micro-step 1)
    moments = {"seed": (0, 1)}
    direction, step = d.simulated_step(d.grads(d.lm_loss(b["harmful"])), moments=moments)
    assert step == 1.0
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    relabelled = torch.where(retain["labels"] != -100, d.token, -100)
    with d.moved(direction, step):
        g_c = _grads(model, d.params, token_ce(_fwd(model, retain), relabelled))
    g_a = _grads(model, d.params, token_ce(_fwd(model, retain), retain["labels"]))
    for x, a, c in zip(first, g_a, g_c):
        torch.testing.assert_close(x, a + 0.3 * c, rtol=1e-4, atol=1e-6)


def test_lora_trap_seed_chooses_the_adapter():
    """trap_lora_seed picks the simulated adapter's A: another seed, another point; the same
    seed, the same point."""
    model, tok = _model(lora=False)
    b = _batches(tok)
    point = lambda seed: _defense(model, tok, alpha=0.05, step_direction="lora", normalize=False,
                                  trap_lora_r=2, trap_lora_seed=seed).probe(
        b, at_point=lambda: {"theta": [p.detach().clone() for p in model.parameters() if p.requires_grad]})["point/theta"]
    a, again, other = point(0), point(0), point(1)
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert sum(float((x - y).norm()) for x, y in zip(a, other)) > 1e-6


def test_lora_trap_needs_full_parameter_alignment_and_its_own_step_length():
    model, tok = _model(lora=True)
    with pytest.raises(ValueError, match="full-parameter alignment"):
        _defense(model, tok, alpha=1e-3, step_direction="lora", normalize=False)
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match="normalize: false"):
        CTRAPConfig(step_direction="lora")
    with pytest.raises(ConfigError, match="trap_lora_r"):
        CTRAPConfig(step_direction="lora", normalize=False, trap_lora_r=0)
    with pytest.raises(ConfigError, match="trap_lora_targets"):
        CTRAPConfig(step_direction="lora", normalize=False, trap_lora_targets="q_proj")
    full, tok = _model(lora=False)
    with pytest.raises(ValueError, match="no Linear layer has that name"):
        _defense(full, tok, alpha=1e-3, step_direction="lora", normalize=False, trap_lora_targets=["nope"])


# ---------------------------------------------------------------------------------------------
# benign_guard = μ (a deviation, off by default): μ·CE(retain batch) at θ_b = θ − α·ĝ_general
# ---------------------------------------------------------------------------------------------

def _guard_by_hand(model, params, b, retain, alpha, sign=False):
    """The guard's two passes written out: the retain-batch CE gradient and loss at θ_b, and the
    collapse loss there; θ is restored at the end."""
    theta = [p.detach().clone() for p in params]
    g_b = _grads(model, params, token_ce(_fwd(model, b["general"]), b["general"]["labels"]))
    if sign:
        g_b = [torch.sign(g) for g in g_b]
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_b))
    with torch.no_grad():
        for p, g in zip(params, g_b):
            p.sub_(alpha * g / (norm + 1e-7))
    logits = _fwd(model, retain)
    loss = token_ce(logits, retain["labels"])
    g = _grads(model, params, loss)
    with torch.no_grad():
        for p, q in zip(params, theta):
            p.copy_(q)
    return g, float(loss), logits.detach()


@pytest.mark.parametrize("lora,sign,trap_steps", [(True, False, 1), (False, False, 1), (True, True, 2)])
def test_benign_guard_gradient_matches_the_passes_by_hand(lora, sign, trap_steps):
    model, tok = _model(lora)
    b = _batches(tok)
    alpha, lam, mu, scale = 0.5, 0.3, 2.0, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, benign_guard=mu, trap_steps=trap_steps,
                 step_direction="sign" if sign else "gradient")
    assert d.passes_per_step == 1 + 2 * trap_steps + 2
    params = d.params
    logs, got = _accumulate_restored(d, b, scale)

    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_c, _, _ = _trajectory_by_hand(model, params, b, retain, d.token, alpha, trap_steps, sign=sign)
    g_g, guard, logits_b = _guard_by_hand(model, params, b, retain, alpha, sign=sign)
    g_a = _grads(model, params, token_ce(_fwd(model, retain), retain["labels"]))
    expected = [scale * (a + lam * sum(cs) / trap_steps + mu * g) for a, g, *cs in zip(g_a, g_g, *g_c)]
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    assert logs["guard_loss"] == pytest.approx(guard, rel=1e-5)
    at_b = token_ce(logits_b, torch.where(retain["labels"] != -100, d.token, -100))
    assert logs["collapse_loss_benign"] == pytest.approx(float(at_b), rel=1e-4)
    # the guard really acts at a moved point: its gradient is not the alignment gradient at θ
    diff = sum(float((x - y).norm()) for x, y in zip(g_g, g_a))
    assert diff > 1e-3 * sum(float(x.norm()) for x in g_a)


def test_benign_guard_in_the_amortized_cache():
    model, tok = _model()
    b = _batches(tok)
    lam, mu, alpha = 0.5, 2.0, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, benign_guard=mu, trap_every=2)
    assert d.passes_per_step == 1 + 4 / 2
    d.accumulate(b, scale=1.0)
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_c, _, _ = _trajectory_by_hand(model, d.params, b, retain, d.token, alpha, 1)
    g_g, _, _ = _guard_by_hand(model, d.params, b, retain, alpha)
    for x, c, g in zip(d.cached_trap, g_c[0], g_g):
        torch.testing.assert_close(x, lam * c + mu * g, rtol=1e-4, atol=1e-8)
    cached = [g.clone() for g in d.cached_trap]
    for p in d.params:
        p.grad = None
    logs = d.accumulate(b, scale=1.0)  # between refreshes: no guard passes, the cache is reused
    assert "guard_loss" not in logs
    g_a = _grads(model, d.params, d.lm_loss(retain))
    for p, a, c in zip(d.params, g_a, cached):
        torch.testing.assert_close(p.grad, a + c, rtol=1e-5, atol=1e-8)


LABELS = [Record(prompt=f"Sentiment of: a film with {i} great scenes", response="positive") for i in range(2)]


@pytest.mark.parametrize("project_out_general", [False, True])
def test_benign_guard_task_steps_along_the_task_batch(project_out_general):
    """benign_guard_task: the guard's simulated benign step is taken on the task batch ("guard"
    stream), not the general batch; the projection (if on) still uses the general batch, and the
    guard then needs its own gradient pass."""
    model, tok = _model()
    b = _batches(tok)
    b["guard"] = collate([encode_record(r, tok, "alpaca", 64, "response") for r in LABELS], tok.pad_token_id)
    alpha, lam, mu, scale = 0.5, 0.3, 2.0, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, benign_guard=mu, benign_guard_task="sst2",
                 project_out_general=project_out_general)
    assert d.streams()["guard"].role == "task" and d.streams()["guard"].task == "sst2"
    assert d.passes_per_step == 1 + 2 + 2 + int(project_out_general)
    params = d.params
    logs, got = _accumulate_restored(d, b, scale)

    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    away = None
    if project_out_general:
        away = _grads(model, params, token_ce(_fwd(model, b["general"]), b["general"]["labels"]))
    g_c, _, _ = _trajectory_by_hand(model, params, b, retain, d.token, alpha, 1, away=away)
    g_g, guard, _ = _guard_by_hand(model, params, {"general": b["guard"]}, retain, alpha)
    g_a = _grads(model, params, token_ce(_fwd(model, retain), retain["labels"]))
    expected = [scale * (a + lam * c + mu * g) for a, c, g in zip(g_a, g_c[0], g_g)]
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    assert logs["guard_loss"] == pytest.approx(guard, rel=1e-5)
    # and it is not the guard along the general batch
    _, on_general, _ = _guard_by_hand(model, params, b, retain, alpha)
    assert abs(on_general - guard) > 1e-4 * abs(guard)


@pytest.mark.parametrize("tasks", ["ag_news", "ag_news, gsm8k"])
def test_benign_guard_task_stream_reads_the_tasks_train_split(tasks):
    """One task's train split, or (comma-separated) every named task's, in one stream."""
    from inoculate import pipeline
    from inoculate.config import ConfigError

    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2, max_length=160,
                  per_device_train_batch_size=2, **{"ctrap.benign_guard": "0.1", "ctrap.benign_guard_task": tasks})
    cfg, dcfg, resolved = pipeline.align_config(values)
    assert resolved["ctrap"]["benign_guard_task"] == tasks
    tok = load_model("tiny-llama").tokenizer
    d = CTRAP(dcfg, batch_size=2)
    streams = pipeline.build_align_streams(d, cfg, tok)
    expected = set()
    for task in ("ag_news", "gsm8k"):
        records = pipeline.task_records(cfg, task, train=True, limit=cfg.num_general_samples)
        encoded = {tuple(encode_record(r, tok, cfg.template, cfg.max_length, "response")["input_ids"])
                   for r in records}
        assert encoded
        if task in tasks:
            expected |= encoded
        else:
            assert not encoded & {tuple(e["input_ids"]) for e in streams["guard"].examples}
    guard = streams["guard"]
    got = {tuple(e["input_ids"]) for e in guard.examples}
    assert got == expected and streams["guard"].batch_size == 2
    general = {tuple(e["input_ids"]) for e in streams["general"].examples}
    assert not got & general
    with pytest.raises(ConfigError, match="task 'imdb' is not in data suite"):
        pipeline.build_align_streams(CTRAP(CTRAPConfig(benign_guard=0.1, benign_guard_task="imdb"), 2), cfg, tok)


def test_benign_guard_task_end_to_end_with_the_monitor(tmp_path):
    """A short alignment with the guard on a batch of two tasks and the held-out monitor (which
    builds the task stream from their test splits) logs the guard's values at every step."""
    import json

    from inoculate import pipeline

    run = pipeline.align(dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2, save_steps=0,
                              logging_steps=1, per_device_train_batch_size=2, num_samples=8, max_length=160,
                              lora_r=4, lora_alpha=8.0, monitor_samples=2, monitor_new_tokens=2,
                              **{"ctrap.benign_guard": "0.1", "ctrap.benign_guard_task": "sst2,gsm8k"}),
                         tmp_path / "run", progress=False)
    rows = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]
    trained = [r for r in rows if r["step"] > 0]
    assert len(trained) == 2 and all(math.isfinite(r["guard_loss"]) and math.isfinite(r["collapse_loss_benign"])
                                     for r in trained)
    assert all("monitor/ctrap/trap_gap" in r for r in rows)


@pytest.mark.parametrize("value", [-0.1, "1", True])
def test_bad_benign_guard_is_rejected(value):
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match="benign_guard"):
        CTRAPConfig(benign_guard=value)
    with pytest.raises(ConfigError, match="second_order and benign_guard"):
        CTRAPConfig(benign_guard=1.0, second_order=True)
    with pytest.raises(ConfigError, match="benign_guard_task='sst2' needs benign_guard > 0"):
        CTRAPConfig(benign_guard_task="sst2")
    for bad in (3, "ag_news,", "sst2,,gsm8k"):
        with pytest.raises(ConfigError, match="benign_guard_task must be a task name"):
            CTRAPConfig(benign_guard=1.0, benign_guard_task=bad)


# ---------------------------------------------------------------------------------------------
# project_out_general (a deviation, off by default): the harmful gradient loses its component
# along the general batch's gradient before each simulated step
# ---------------------------------------------------------------------------------------------

def test_projected_step_is_orthogonal_to_the_general_gradient():
    model, tok = _model()
    d = _defense(model, tok, alpha=0.3, project_out_general=True)
    g_h = [torch.tensor([3.0, -1.0]), torch.tensor([2.0])]
    away = [torch.tensor([1.0, 1.0]), torch.tensor([0.0])]
    direction, step = d.simulated_step([g.clone() for g in g_h], away)
    # g_h·away = 2, ‖away‖² = 2: g_h − away
    assert [x.tolist() for x in direction] == [[2.0, -2.0], [2.0]]
    assert step == pytest.approx(-0.3 / (12 ** 0.5 + 1e-7))
    # without `away` (the guard's step, the default) nothing is projected
    direction, _ = d.simulated_step([g.clone() for g in g_h])
    assert [x.tolist() for x in direction] == [[3.0, -1.0], [2.0]]


@pytest.mark.parametrize("lora,sign,trap_steps", [(True, False, 1), (False, False, 1), (True, True, 2)])
def test_project_out_general_gradient_matches_the_passes_by_hand(lora, sign, trap_steps):
    model, tok = _model(lora)
    b = _batches(tok)
    alpha, lam, scale = 0.5, 0.3, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, trap_steps=trap_steps, project_out_general=True,
                 step_direction="sign" if sign else "gradient")
    assert d.passes_per_step == 1 + 2 * trap_steps + 1
    params = d.params
    logs, got = _accumulate_restored(d, b, scale)

    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_b = _grads(model, params, token_ce(_fwd(model, b["general"]), b["general"]["labels"]))
    g_c, _, _ = _trajectory_by_hand(model, params, b, retain, d.token, alpha, trap_steps, sign=sign, away=g_b)
    g_a = _grads(model, params, token_ce(_fwd(model, retain), retain["labels"]))
    expected = [scale * (a + lam * sum(cs) / trap_steps) for a, *cs in zip(g_a, *g_c)]
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    g_h = _grads(model, params, token_ce(_fwd(model, b["harmful"]), b["harmful"]["labels"]))
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    cos = F.cosine_similarity(flat(g_h), flat(g_b), dim=0)
    assert logs["harmful_general_cos"] == pytest.approx(float(cos), rel=1e-4)
    # the projection changes the trap: its collapse gradient is not the unprojected one's
    plain, _, _ = _trajectory_by_hand(model, params, b, retain, d.token, alpha, trap_steps, sign=sign)
    assert (flat(g_c[0]) - flat(plain[0])).norm() > 1e-3 * flat(plain[0]).norm()


def test_project_out_general_in_the_amortized_cache_and_with_the_guard():
    model, tok = _model()
    b = _batches(tok)
    lam, mu, alpha = 0.5, 2.0, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, benign_guard=mu, trap_every=2,
                 project_out_general=True)
    assert d.passes_per_step == 1 + 4 / 2  # the guard's general-gradient pass is the projection's
    d.accumulate(b, scale=1.0)
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_b = _grads(model, d.params, token_ce(_fwd(model, b["general"]), b["general"]["labels"]))
    g_c, _, _ = _trajectory_by_hand(model, d.params, b, retain, d.token, alpha, 1, away=g_b)
    g_g, _, _ = _guard_by_hand(model, d.params, b, retain, alpha)  # the guard's step is not projected
    for x, c, g in zip(d.cached_trap, g_c[0], g_g):
        torch.testing.assert_close(x, lam * c + mu * g, rtol=1e-4, atol=1e-8)


def test_bad_project_out_general_is_rejected_and_old_hashes_stay():
    from inoculate import pipeline
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match="project_out_general must be"):
        CTRAPConfig(project_out_general="yes")
    with pytest.raises(ConfigError, match="second_order and project_out_general"):
        CTRAPConfig(project_out_general=True, second_order=True)
    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2)
    _, dcfg, resolved = pipeline.align_config(values)
    assert not dcfg.project_out_general and "project_out_general" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.project_out_general": "true"})
    assert dcfg.project_out_general is True and resolved["ctrap"]["project_out_general"] is True


@pytest.mark.parametrize("trap_steps,target", [(1, "token"), (2, "token"), (1, "uniform")])
def test_trap_gap_from_the_collapse_losses_at_theta_and_the_deepest_point(trap_steps, target):
    """trap_gap = exp(−KL) at the deepest of θ_1..θ_K − exp(−KL) at θ, KL = collapse loss − the
    target's entropy (0 for the token, log V for the uniform target), by hand from the collapse
    losses at θ and at each simulated point; logged only on micro-steps that ran the trap."""
    model, tok = _model()
    b = _batches(tok)
    alpha = 0.5
    d = _defense(model, tok, alpha=alpha, trap_steps=trap_steps, trap_every=2, collapse_target=target)
    logs = d.accumulate(b, scale=1.0)
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    h = 0.0 if target == "token" else math.log(model.get_output_embeddings().weight.shape[0])
    with torch.no_grad():
        at_theta = d.collapse(*d.answer_logits(retain)).item()
    if target == "token":
        _, losses, _ = _trajectory_by_hand(model, d.params, b, retain, d.token, alpha, trap_steps)
    else:
        losses = [logs["collapse_loss"]]
    assert len(losses) == trap_steps
    assert math.isclose(logs["collapse_loss_at_theta"], at_theta, rel_tol=1e-4)
    want = math.exp(-(min(losses) - h)) - math.exp(-(at_theta - h))
    assert math.isclose(logs["trap_gap"], want, rel_tol=1e-3, abs_tol=1e-6)
    assert -1.0 <= logs["trap_gap"] <= 1.0
    for p in d.params:
        p.grad = None
    assert "trap_gap" not in d.accumulate(b, scale=1.0), "no trap this micro-step, no gap"


def test_point_logs_name_each_point_the_deepest_and_the_shallowest():
    """point/<key> is θ_K's; with K > 1 each point's values are logged under point/step<k>/, the
    point with the largest collapse-token share (NaN: no answers) under point/deepest/ and the one
    with the smallest under point/shallowest/."""
    nan = float("nan")
    points = [{"collapse_token_share": 0.2, "r": "a"}, {"collapse_token_share": 0.9, "r": "b"},
              {"collapse_token_share": 0.9, "r": "c"}, {"collapse_token_share": nan, "r": "d"}]
    logs = CTRAP._point_logs(points)
    assert logs["point/r"] == "d" and logs["point/step2/r"] == "b" and logs["point/step4/r"] == "d"
    assert logs["point/deepest/r"] == "b" and logs["point/deepest_step"] == 2  # the first of ties
    assert logs["point/deepest/collapse_token_share"] == 0.9
    # the shallowest read point (NaN is not read): a step whose whole simulated path is collapsed
    assert logs["point/shallowest/r"] == "a" and logs["point/shallowest_step"] == 1
    assert logs["point/shallowest/collapse_token_share"] == 0.2
    tied = CTRAP._point_logs([{"collapse_token_share": 0.1}, {"collapse_token_share": 0.1}])
    assert tied["point/shallowest_step"] == 2 and tied["point/deepest_step"] == 1  # last / first of ties
    assert CTRAP._point_logs([{"collapse_token_share": 0.2}]) == {"point/collapse_token_share": 0.2}
    unread = CTRAP._point_logs([{"collapse_token_share": nan}, {"x": 1.0}])
    assert "point/deepest_step" not in unread and "point/shallowest_step" not in unread
    assert unread["point/x"] == 1.0
    assert CTRAP._point_logs([]) == {}
    # the uniform and random targets write no collapse token: their deepest point is the most degenerate
    points = [{"collapse_token_share": 0.5, "degenerate_rate": 0.25}, {"collapse_token_share": 0.0, "degenerate_rate": 1.0}]
    assert CTRAP._point_logs(points)["point/deepest_step"] == 1
    assert CTRAP._point_logs(points, "degenerate_rate")["point/deepest_step"] == 2
    assert CTRAP._point_logs(points, "degenerate_rate")["point/shallowest_step"] == 1


@pytest.mark.parametrize("target,deepest", [("token", 1), ("uniform", 2), ("random", 2)])
def test_probe_deepest_point_follows_the_collapse_target(target, deepest):
    """The probe's point/deepest/ is the point with the most "error" for the token target and the
    most degenerate answers for the uniform and random targets, which write no collapse token."""
    model, tok = _model()
    d = _defense(model, tok, alpha=0.5, trap_steps=2, collapse_target=target)
    answers = iter([{"collapse_token_share": 0.5, "degenerate_rate": 0.0},
                    {"collapse_token_share": 0.0, "degenerate_rate": 0.75}])
    probed = d.probe(_batches(tok), at_point=lambda: next(answers))
    assert probed["point/deepest_step"] == deepest


@pytest.mark.parametrize("options", [{}, {"trap_steps": 2, "step_direction": "sign", "project_out_general": True},
                                     {"trap_every": 3}, {"self_destruct": 0.5}])
def test_probe_measures_the_trap_of_a_training_step_and_changes_nothing(options):
    """The held-out probe (the alignment monitor's) logs what a training micro-step on the
    same batches logs (same simulated points, same collapse losses at θ and at them, same
    trap_gap), calls at_point() once at each simulated point, and leaves parameters
    bit-identical, p.grad empty and the amortized cache and step count as they were."""
    model, tok = _model()
    b = _batches(tok)
    d = _defense(model, tok, alpha=0.5, **options)
    K = options.get("trap_steps", 1)
    before = [p.detach().clone() for p in d.params]
    seen = []  # the parameters at_point() was called on
    probed = d.probe(b, at_point=lambda: seen.append([p.detach().clone() for p in d.params]) or {"x": len(seen)})
    assert len(seen) == K and probed["point/x"] == K  # point/<key>: the last point's values
    if K > 1:
        assert [probed[f"point/step{k}/x"] for k in range(1, K + 1)] == list(range(1, K + 1))
        assert any(not torch.equal(p, q) for p, q in zip(seen[0], seen[1])), "a different point each call"
    assert any(not torch.equal(p, q) for p, q in zip(seen[0], before)), "called at a moved point"
    if not options:  # K = 1: the point is θ − α·g_h/‖g_h‖, the harmful gradient's step
        g_h = _grads(model, d.params, token_ce(_fwd(model, b["harmful"]), b["harmful"]["labels"]))
        norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
        for p, q, g in zip(seen[0], before, g_h):
            torch.testing.assert_close(p, q - 0.5 * g / (norm + 1e-7), rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in d.params)
    assert all(torch.equal(p, q) for p, q in zip(d.params, before))
    assert d.cached_trap is None and d.steps_seen == 0
    trained = d.accumulate(b, scale=1.0)
    keys = {"trap_gap", "collapse_loss", "collapse_loss_at_theta", "harmful_loss", "align_loss"}
    if options.get("trap_steps"):
        keys |= {"collapse_loss_step1", "collapse_loss_step2", "harmful_loss_step1", "harmful_general_cos"}
    if options.get("self_destruct"):
        keys |= {"cos_sd", "harmful_grad_norm", "benign_grad_norm", "harmful_ce", "benign_ce"}
    assert keys <= set(probed)
    for k in keys:
        assert math.isclose(probed[k], trained[k], rel_tol=1e-5, abs_tol=1e-6), k
    assert probed["trap_gap"] != 0.0


# ---------------------------------------------------------------------------------------------
# the dormancy term (ctrap.dormancy, a deviation)

def _dormancy_by_hand(logits, labels, e, bound):
    """mean over answer positions of max(0, log p_e − log bound), position by position; `e` a
    list of tokens: p their summed probability."""
    terms = []
    for i in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[i, t] != -100:  # the token at t is predicted from position t − 1
                probs = torch.softmax(logits[i, t - 1].float(), dim=-1)
                log_p = torch.log(probs[e] if isinstance(e, int) else probs[e].sum())
                terms.append(torch.clamp(log_p - math.log(bound), min=0.0))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("lora", [True, False])
def test_dormancy_term_gradient_matches_the_hinge_by_hand(lora):
    """With dormancy = ν the gradient is the official step's plus ν·∇D(θ), D the hinge on the
    collapse token's log-probability at θ over the retain batch's answer positions; the bound is
    set at the median log-probability so that the hinge is active at about half of them."""
    model, tok = _model(lora)
    b = _batches(tok)
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    e = _defense(model, tok).token
    with torch.no_grad():
        logits = _fwd(model, retain)
        shift, mask = logits[:, :-1], retain["labels"][:, 1:] != -100
        log_p = torch.log_softmax(shift[mask].float(), dim=-1)[:, e]
    middle = log_p.sort().values[len(log_p) // 2 - 1: len(log_p) // 2 + 1]
    bound = math.exp(float(middle.mean()))  # between two positions: none sits on the hinge's kink
    active = float((log_p > math.log(bound)).float().mean())
    assert 0.2 < active < 0.8
    nu, scale = 3.0, 0.5
    _, plain = _accumulate_restored(_defense(model, tok, alpha=0.5), b, scale)
    for p in model.parameters():
        p.grad = None
    d = _defense(model, tok, alpha=0.5, dormancy=nu, dormancy_bound=bound)
    logs, got = _accumulate_restored(d, b, scale)
    hinge = _dormancy_by_hand(_fwd(model, retain), retain["labels"], e, bound)
    assert logs["dormancy_loss"] == pytest.approx(hinge.item(), rel=1e-4)
    g_d = _grads(model, d.params, hinge)
    assert sum(float(g.abs().sum()) for g in g_d) > 0
    for x, y, g in zip(got, plain, g_d):
        torch.testing.assert_close(x, y + scale * nu * g, rtol=1e-4, atol=1e-7)
    # the held-out probe logs the same value, without gradients
    for p in d.params:
        p.grad = None
    assert d.probe(b)["dormancy_loss"] == pytest.approx(logs["dormancy_loss"], rel=1e-5)
    assert all(p.grad is None for p in d.params)


def test_dormancy_term_is_zero_below_the_bound():
    """Where the collapse token is less likely than the bound everywhere the term is 0 and the
    gradient is the official step's, bit for bit."""
    model, tok = _model()
    b = _batches(tok)
    _, plain = _accumulate_restored(_defense(model, tok, alpha=0.5), b)
    for p in model.parameters():
        p.grad = None
    logs, got = _accumulate_restored(_defense(model, tok, alpha=0.5, dormancy=1.0, dormancy_bound=0.5), b)
    assert logs["dormancy_loss"] == 0.0
    assert all(torch.equal(x, y) for x, y in zip(got, plain))


def _median_bound(model, batch, e):
    """A bound at the median log-probability of the collapse token over the batch's answer
    positions, between two positions, so that the hinge is active at about half of them and
    none sits on its kink."""
    with torch.no_grad():
        logits = _fwd(model, batch)
        mask = batch["labels"][:, 1:] != -100
        log_p = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)[:, e]
    middle = log_p.sort().values[len(log_p) // 2 - 1: len(log_p) // 2 + 1]
    bound = math.exp(float(middle.mean()))
    assert 0.2 < float((log_p > math.log(bound)).float().mean()) < 0.8
    return bound


@pytest.mark.parametrize("lora,second_order", [(True, False), (False, False), (True, True)])
def test_dormancy_on_harmful_answers_adds_the_hinge_on_step_one_logits(lora, second_order):
    """dormancy_harmful = ν_h adds ν_h·∇D(θ; harmful answers) to the step's gradient (first and
    second order), D the hinge written out position by position on the harmful batch; the logs
    and the held-out probe report D and the collapse loss on the harmful answers at θ."""
    model, tok = _model(lora, attn="eager" if second_order else None)
    b = _batches(tok)
    e = _defense(model, tok).token
    bound = _median_bound(model, b["harmful"], e)
    nu, scale = 2.0, 0.5
    kw = dict(alpha=0.5, second_order=second_order, dormancy_bound=bound)
    _, plain = _accumulate_restored(_defense(model, tok, **kw), b, scale)
    for p in model.parameters():
        p.grad = None
    d = _defense(model, tok, dormancy_harmful=nu, **kw)
    logs, got = _accumulate_restored(d, b, scale)
    logits = _fwd(model, b["harmful"])
    hinge = _dormancy_by_hand(logits, b["harmful"]["labels"], e, bound)
    assert logs["dormancy_harmful_loss"] == pytest.approx(hinge.item(), rel=1e-4)
    relabelled = torch.where(b["harmful"]["labels"] != -100, e, -100)
    assert logs["collapse_loss_harmful_at_theta"] == pytest.approx(token_ce(logits, relabelled).item(), rel=1e-4)
    g_d = _grads(model, d.params, hinge)
    assert sum(float(g.abs().sum()) for g in g_d) > 0
    for x, y, g in zip(got, plain, g_d):
        torch.testing.assert_close(x, y + scale * nu * g, rtol=1e-4, atol=1e-7)
    if second_order:
        return
    for p in d.params:
        p.grad = None
    probed = d.probe(b)
    for key in ("dormancy_harmful_loss", "collapse_loss_harmful_at_theta"):
        assert probed[key] == pytest.approx(logs[key], rel=1e-5)
    assert all(p.grad is None for p in d.params)


def test_dormancy_on_harmful_answers_acts_at_refresh_steps_in_amortized_mode():
    """With trap_every = k the harmful pass, and so the hinge on its answers, runs at the refresh
    micro-steps only; in between the step's gradient is the amortized one's without it."""
    model, tok = _model()
    b = _batches(tok)
    e = _defense(model, tok).token
    bound = _median_bound(model, b["harmful"], e)
    runs = []
    for nu in (0.0, 2.0):
        d = _defense(model, tok, alpha=0.5, trap_every=2, dormancy_harmful=nu, dormancy_bound=bound)
        steps = []
        for _ in range(2):
            for p in model.parameters():
                p.grad = None
            steps.append(_accumulate_restored(d, b))
        runs.append(steps)
    (plain_refresh, plain_reuse), (refresh, reuse) = runs
    assert refresh[0]["dormancy_harmful_loss"] > 0 and "dormancy_harmful_loss" not in reuse[0]
    assert any(not torch.equal(x, y) for x, y in zip(refresh[1], plain_refresh[1]))
    assert all(torch.equal(x, y) for x, y in zip(reuse[1], plain_reuse[1]))


def test_bad_dormancy_is_rejected_and_old_hashes_stay():
    from inoculate import pipeline
    from inoculate.config import ConfigError

    for name in ("dormancy", "dormancy_harmful"):
        for bad in (-1.0, "much", True):
            with pytest.raises(ConfigError, match=f"ctrap.{name} must be"):
                CTRAPConfig(**{name: bad})
        with pytest.raises(ConfigError, match=f"ctrap.{name} is defined for collapse_target=token"):
            CTRAPConfig(**{name: 1.0}, collapse_target="uniform")
    for bad in (0.0, 1.0, 2.0):
        with pytest.raises(ConfigError, match="dormancy_bound must be a probability"):
            CTRAPConfig(dormancy=1.0, dormancy_bound=bad)
    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2)
    _, dcfg, resolved = pipeline.align_config(values)
    assert dcfg.dormancy == 0.0 and "dormancy" not in resolved["ctrap"]
    assert dcfg.dormancy_harmful == 0.0 and "dormancy_harmful" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.dormancy": "0.5", "ctrap.dormancy_bound": "0.01"})
    assert (dcfg.dormancy, dcfg.dormancy_bound) == (0.5, 0.01)
    assert resolved["ctrap"]["dormancy"] == 0.5


def test_collapse_margin_loss_is_softplus_of_the_margin_minus_the_log_odds():
    """collapse_margin = m: the mean over answer positions of softplus(m − d), d = log p/(1 − p)
    of the collapse token, written out position by position in float64; m = 0 is the CE to the
    token; where the token is near certain the CE has stopped pushing and the margin loss has not."""
    from inoculate.defenses.ctrap import token_log_odds

    torch.manual_seed(2)
    logits = torch.randn(2, 5, 11) * 3
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 2, -100, -100]])
    d_hand = []
    for i in range(2):
        for t in range(1, 5):
            if labels[i, t] != -100:
                p = torch.softmax(logits[i, t - 1].double(), -1)[7]
                d_hand.append(torch.log(p) - torch.log1p(-p))
    d_hand = torch.stack(d_hand)
    torch.testing.assert_close(token_log_odds(logits, labels, 7).double(), d_hand, rtol=1e-5, atol=1e-5)
    for m in (0.0, 3.0):
        want = F.softplus(m - d_hand).mean()
        assert collapse_loss(logits, labels, "token", 7, margin=m).item() == pytest.approx(want.item(), rel=1e-5)
    assert collapse_loss(logits, labels, "token", 7, margin=0.0).item() == pytest.approx(
        collapse_loss(logits, labels, "token", 7).item(), rel=1e-5)
    with pytest.raises(ValueError, match="no answer tokens"):
        collapse_loss(logits, torch.full_like(labels, -100), "token", 7, margin=3.0)
    # near certain (log-odds 30): the CE's gradient has vanished, the margin's at m = 40 has not
    peaked = torch.zeros(2, 5, 11)
    peaked[..., 7] = 30.0
    for m, pushes in ((0.0, False), (40.0, True)):
        x = peaked.clone().requires_grad_(True)
        collapse_loss(x, labels, "token", 7, margin=m).backward()
        assert (float(x.grad.abs().max()) > 0.01) is pushes


@pytest.mark.parametrize("lora", [True, False])
def test_collapse_margin_gradient_matches_the_margin_loss_at_the_simulated_point(lora):
    """With collapse_margin = m the step's gradient is the alignment gradient at θ plus λ·∇ of
    softplus(m − d) at θ' (the same simulated step as the official one); collapse_loss still logs
    the CE to the token at θ', and θ is restored bit-exactly."""
    model, tok = _model(lora)
    b = _batches(tok)
    m, lam, alpha = 4.0, 0.3, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, collapse_margin=m)
    logs, got = _accumulate_restored(d, b)
    params, e = d.params, d.token
    before = [p.detach().clone() for p in params]
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    g_h = _grads(model, params, token_ce(_fwd(model, b["harmful"]), b["harmful"]["labels"]))
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
    with torch.no_grad():
        for p, g in zip(params, g_h):
            p.sub_(alpha * g / (norm + 1e-7))
    logits = _fwd(model, retain)
    mask = retain["labels"][:, 1:] != -100
    logp = torch.log_softmax(logits[:, :-1][mask].float(), -1)[:, e]
    log_odds = logp - torch.log(-torch.expm1(logp))
    g_c = _grads(model, params, F.softplus(m - log_odds).mean())
    ce = token_ce(logits, torch.where(retain["labels"] != -100, e, -100))
    assert logs["collapse_loss"] == pytest.approx(ce.item(), rel=1e-5)
    with torch.no_grad():
        for p, q in zip(params, before):
            p.copy_(q)
    g_a = _grads(model, params, token_ce(_fwd(model, retain), retain["labels"]))
    assert sum(float(g.abs().sum()) for g in g_c) > 0
    for x, a, c in zip(got, g_a, g_c):
        torch.testing.assert_close(x, a + lam * c, rtol=1e-4, atol=1e-7)
    # the held-out probe logs the same CE
    assert d.probe(b)["collapse_loss"] == pytest.approx(logs["collapse_loss"], rel=1e-5)


def test_bad_collapse_margin_is_rejected_and_old_hashes_stay():
    from inoculate import pipeline
    from inoculate.config import ConfigError

    for bad in (-1.0, "deep", True):
        with pytest.raises(ConfigError, match="ctrap.collapse_margin must be"):
            CTRAPConfig(collapse_margin=bad)
    with pytest.raises(ConfigError, match="ctrap.collapse_margin is defined for collapse_target=token"):
        CTRAPConfig(collapse_margin=2.0, collapse_target="random")
    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2)
    _, dcfg, resolved = pipeline.align_config(values)
    assert dcfg.collapse_margin == 0.0 and "collapse_margin" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.collapse_margin": "12"})
    assert dcfg.collapse_margin == 12.0 and resolved["ctrap"]["collapse_margin"] == 12.0


def _last_residual(model, run):
    """(run()'s result, the last decoder layer's output): the final norm's input, taken from the
    layer before it rather than from the norm, which the defense hooks."""
    from inoculate.defenses._layers import decoder_layers, first_tensor

    seen = []
    handle = decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: seen.append(first_tensor(out)))
    try:
        return run(), seen[-1]
    finally:
        handle.remove()


def test_rms_loss_is_softplus_of_log_target_over_the_answer_rms():
    """collapse_rms = R: the mean over answer-predicting positions of softplus(log R − log r_t),
    r_t the RMS over features, written out position by position in float64; it pulls r_t up
    while r_t < R and fades above."""
    from inoculate.defenses.ctrap import answer_log_rms, rms_loss

    torch.manual_seed(3)
    hidden = torch.randn(2, 5, 6) * 4
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 2, -100, -100]])
    want = []
    for i in range(2):
        for t in range(1, 5):
            if labels[i, t] != -100:
                r = hidden[i, t - 1].double().pow(2).mean().sqrt()
                want.append(F.softplus(math.log(50.0) - torch.log(r)))
    assert rms_loss(hidden, labels, 50.0).item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-6)
    assert answer_log_rms(hidden, labels).shape == (len(want),)
    with pytest.raises(ValueError, match="no answer tokens"):
        rms_loss(hidden, torch.full_like(labels, -100), 50.0)
    x = hidden.clone().requires_grad_(True)
    rms_loss(x, labels, 50.0).backward()
    assert float((x.grad * x.detach()).sum()) < 0  # descending it scales the answer positions' states up
    assert rms_loss(hidden * 1e3, labels, 50.0).item() < 0.05 < 1.0 < rms_loss(hidden, labels, 50.0).item()


@pytest.mark.parametrize("lora", [True, False])
def test_collapse_rms_gradient_matches_the_term_at_the_simulated_point(lora):
    """With collapse_rms = R the step's gradient is the alignment gradient at θ plus λ·∇ of
    (CE to the token + softplus(log R − log r)) at θ', r the RMS of the last residual stream at
    the answer positions; collapse_loss logs the CE alone, collapse_rms and rms_at_theta the
    RMS at θ' and θ; θ is restored bit-exactly and no hook is left on the model."""
    from inoculate.defenses._layers import final_norm

    model, tok = _model(lora)
    b = _batches(tok)
    R, lam, alpha = 40.0, 0.3, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, collapse_rms=R)
    logs, got = _accumulate_restored(d, b)
    assert not final_norm(model)._forward_pre_hooks
    params, e = d.params, d.token
    before = [p.detach().clone() for p in params]
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    mask = retain["labels"][:, 1:] != -100
    rms = lambda h: h[:, :-1][mask].float().pow(2).mean(-1).sqrt()
    g_h = _grads(model, params, token_ce(_fwd(model, b["harmful"]), b["harmful"]["labels"]))
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
    with torch.no_grad():
        for p, g in zip(params, g_h):
            p.sub_(alpha * g / (norm + 1e-7))
    logits, hidden = _last_residual(model, lambda: _fwd(model, retain))
    ce = token_ce(logits, torch.where(retain["labels"] != -100, e, -100))
    term = F.softplus(math.log(R) - torch.log(rms(hidden))).mean()
    assert logs["collapse_loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert logs["collapse_rms_loss"] == pytest.approx(term.item(), rel=1e-5)
    assert logs["collapse_rms"] == pytest.approx(torch.log(rms(hidden)).mean().exp().item(), rel=1e-5)
    g_c = _grads(model, params, ce + term)
    g_ce = _grads(model, params, token_ce(_fwd(model, retain), torch.where(retain["labels"] != -100, e, -100)))
    with torch.no_grad():
        for p, q in zip(params, before):
            p.copy_(q)
    logits, hidden = _last_residual(model, lambda: _fwd(model, retain))
    assert logs["rms_at_theta"] == pytest.approx(torch.log(rms(hidden)).mean().exp().item(), rel=1e-5)
    g_a = _grads(model, params, token_ce(logits, retain["labels"]))
    assert max(float((c - x).abs().max()) for c, x in zip(g_c, g_ce)) > 1e-6  # the term is in it
    for x, a, c in zip(got, g_a, g_c):
        torch.testing.assert_close(x, a + lam * c, rtol=1e-4, atol=1e-7)
    probe = d.probe(b)  # the held-out probe measures the same point, without a gradient
    assert probe["collapse_rms"] == pytest.approx(logs["collapse_rms"], rel=1e-5)
    assert probe["rms_at_theta"] == pytest.approx(logs["rms_at_theta"], rel=1e-5)
    assert not final_norm(model)._forward_pre_hooks


def test_collapse_rms_second_order_matches_torch_func_reference():
    """second_order with collapse_rms: λ·∇_θ of (CE + the RMS term) at θ'(θ), differentiated
    through the simulated step, against torch.func."""
    from torch.func import functional_call, grad

    model, tok = _model(lora=True, attn="eager")
    b = _batches(tok)
    alpha, lam, R = 0.1, 1.0, 40.0
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, second_order=True, collapse_rms=R)
    logs = d.accumulate(b, scale=1.0)
    assert logs["collapse_rms_loss"] > 0
    got = [p.grad.clone() for p in d.params]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    relabelled = torch.where(retain["labels"] != -100, d.token, -100)
    mask = retain["labels"][:, 1:] != -100
    call = lambda params, batch: functional_call(model, params, args=(), kwargs={
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).logits

    def trap(params):
        g = grad(lambda q: token_ce(call(q, b["harmful"]), b["harmful"]["labels"]))(params)
        norm = torch.sqrt(sum((g[n] ** 2).sum() for n in names))
        moved = {n: params[n] - alpha * g[n] / (norm + 1e-7) for n in names}
        logits, hidden = _last_residual(model, lambda: call(moved, retain))
        r = hidden[:, :-1][mask].pow(2).mean(-1).sqrt()
        return token_ce(logits, relabelled) + F.softplus(math.log(R) - torch.log(r)).mean()

    g_trap = grad(trap)(theta)
    g_align = grad(lambda q: token_ce(call(q, retain), retain["labels"]))(theta)
    for n, x in zip(names, got):
        torch.testing.assert_close(x, g_align[n] + lam * g_trap[n], rtol=1e-3, atol=1e-6)


def test_bad_collapse_rms_is_rejected_and_old_hashes_stay():
    from inoculate import pipeline
    from inoculate.config import ConfigError

    for bad in (-1.0, "big", True, float("inf")):
        with pytest.raises(ConfigError, match="ctrap.collapse_rms must be"):
            CTRAPConfig(collapse_rms=bad)
    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2)
    _, dcfg, resolved = pipeline.align_config(values)
    assert dcfg.collapse_rms == 0.0 and "collapse_rms" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.collapse_rms": "1000"})
    assert dcfg.collapse_rms == 1000.0 and resolved["ctrap"]["collapse_rms"] == 1000.0


def test_trap_probe_follows_a_fresh_lora_attacker_on_a_full_weight_run(tmp_path):
    """scripts/trap_probe.py on a full-weight CTRAP run with collapse_rms: --fresh-lora adds the
    merge-mode attacker's adapter, and each printed step of the AdamW path carries the final
    norm's input RMS, the step's gradient norm and the length of the step taken."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from inoculate import pipeline

    run = pipeline.align(dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=1, save_steps=0,
                              logging_steps=1, per_device_train_batch_size=2, num_samples=8, max_length=96,
                              lora=False, **{"ctrap.collapse_rms": "30"}), tmp_path / "run", progress=False)
    script = Path(__file__).resolve().parents[1] / "scripts" / "trap_probe.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(run), "--fresh-lora", "4:8", "--attack",
                           "adamw:1e-3:3", "--every", "2"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line for line in done.stdout.splitlines() if line.strip().startswith("step")]
    assert [int(line.split()[1]) for line in steps] == [0, 2, 3]
    assert "‖g‖" not in steps[0]  # no step taken yet
    for line in steps[1:]:
        rms_h, rms_g, g, length = (float(re.search(pat, line).group(1)) for pat in
                                   (r"RMS harmful ([\d.e+-]+)", r"general ([\d.e+-]+)", r"‖g‖ ([\d.]+)",
                                    r"step length ([\d.e+-]+)"))
        assert rms_h > 0 and rms_g > 0 and g > 0 and 0 < length < 1


# ---------------------------------------------------------------------------------------------
# collapse_harmful_head (a deviation, off by default): the collapse term at each simulated point
# also covers the first H answer tokens of the harmful batch
# ---------------------------------------------------------------------------------------------

def test_answer_head_keeps_the_first_answer_tokens_and_cuts_the_rest():
    from inoculate.defenses.ctrap import answer_head

    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, -100],
                           [-100, -100, -100, -100, 9, 10, 11]])
    batch = {"input_ids": torch.arange(14).view(2, 7), "attention_mask": torch.ones(2, 7, dtype=torch.long),
             "labels": labels}
    head = answer_head(batch, 2)
    assert head["labels"].tolist() == [[-100, -100, 5, 6, -100, -100], [-100, -100, -100, -100, 9, 10]]
    assert torch.equal(head["input_ids"], batch["input_ids"][:, :6])
    assert torch.equal(head["attention_mask"], batch["attention_mask"][:, :6])
    assert answer_head(batch, 1)["labels"].tolist() == [[-100, -100, 5, -100, -100], [-100] * 4 + [9]]
    assert torch.equal(answer_head(batch, 10)["labels"], labels)  # H beyond every answer: all kept


@pytest.mark.parametrize("lora,trap_steps", [(True, 1), (False, 1), (True, 2)])
def test_collapse_harmful_head_gradient_matches_the_passes_by_hand(lora, trap_steps):
    """With collapse_harmful_head = H each simulated point's collapse term is the CE to the token
    on the retain batch plus the CE to the token on the harmful batch's first H answer tokens; the
    gradient is the alignment gradient at θ plus λ/K times the sum of their gradients at the
    points, θ is restored bit-exactly, and the probe logs the same head loss."""
    model, tok = _model(lora)
    b = _batches(tok)
    H, lam, alpha = 2, 0.3, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, collapse_harmful_head=H, trap_steps=trap_steps)
    assert d.passes_per_step == 1 + 3 * trap_steps
    logs, got = _accumulate_restored(d, b)
    params, e = d.params, d.token
    theta = [p.detach().clone() for p in params]
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    harmful = b["harmful"]
    answer = harmful["labels"] != -100
    head_labels = torch.where(answer & (answer.long().cumsum(1) <= H), e, -100)
    assert (head_labels == e).sum(1).tolist() == [H] * harmful["labels"].shape[0]
    heads = []

    def head():  # the CE to the token on the harmful answers' first H tokens, at θ_k
        heads.append(token_ce(_fwd(model, harmful), head_labels))
        return heads[-1]

    g_c, _, _ = _trajectory_by_hand(model, params, b, retain, e, alpha, trap_steps, extra=head)
    assert logs["collapse_loss_harmful_head"] == pytest.approx(sum(map(float, heads)) / trap_steps, rel=1e-5)
    g_a = _grads(model, params, token_ce(_fwd(model, retain), retain["labels"]))
    for x, a, *c in zip(got, g_a, *g_c):
        torch.testing.assert_close(x, a + lam / trap_steps * sum(c), rtol=1e-4, atol=1e-7)
    probe = d.probe(b)
    assert probe["collapse_loss_harmful_head"] == pytest.approx(logs["collapse_loss_harmful_head"], rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(params, theta))


def test_bad_collapse_harmful_head_is_rejected_and_old_hashes_stay():
    from inoculate import pipeline
    from inoculate.config import ConfigError

    for bad in (-1, 1.5, "two", True):
        with pytest.raises(ConfigError, match="ctrap.collapse_harmful_head must be"):
            CTRAPConfig(collapse_harmful_head=bad)
    with pytest.raises(ConfigError, match="second_order and collapse_harmful_head"):
        CTRAPConfig(collapse_harmful_head=2, second_order=True)
    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2)
    _, dcfg, resolved = pipeline.align_config(values)
    assert dcfg.collapse_harmful_head == 0 and "collapse_harmful_head" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.collapse_harmful_head": "3"})
    assert dcfg.collapse_harmful_head == 3 and resolved["ctrap"]["collapse_harmful_head"] == 3


# ---------------------------------------------------------------------------------------------
# point_compliance (a deviation, off by default): at each collapse point the harmful answers' CE
# with the collapse word taken out of the vocabulary
# ---------------------------------------------------------------------------------------------

def test_suppressed_ce_is_the_ce_over_the_vocabulary_without_the_suppressed_tokens():
    from inoculate.defenses.ctrap import suppressed_ce

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 1, 3, 2], [-100, 4, 6, 0, -100]])
    suppress = [2, 5]
    # by hand: drop the suppressed columns, renumber the labels, leave out positions labelled 2 or 5
    keep_cols = [j for j in range(7) if j not in suppress]
    terms = []
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t + 1])
            if y == -100 or y in suppress:
                continue
            z = logits[b, t, keep_cols]
            terms.append(-(z[keep_cols.index(y)] - torch.logsumexp(z, 0)))
    assert len(terms) == 5  # the position labelled 2 left out
    torch.testing.assert_close(suppressed_ce(logits, labels, suppress), torch.stack(terms).mean())
    with pytest.raises(ValueError, match="answer"):
        suppressed_ce(logits, torch.tensor([[-100, -100, 2, 5, -100]] * 2), suppress)


@pytest.mark.parametrize("lora,trap_steps,from_step,head", [(True, 1, 1, 0), (False, 1, 1, 0), (True, 3, 2, 0),
                                                             (True, 3, 2, 2), (False, 1, 1, 3)])
def test_point_compliance_gradient_matches_the_passes_by_hand(lora, trap_steps, from_step, head):
    """With point_compliance = μ each collapse point's term is the CE to the token on the retain
    batch plus μ times the harmful answers' CE with every token that begins the collapse word
    taken out of the vocabulary (with point_compliance_head = H, on their first H answer tokens
    only); the gradient is the alignment gradient at θ plus λ/n times the sum of their gradients
    at the n collapse points; θ is restored bit-exactly; the probe logs the same loss."""
    from inoculate.defenses.ctrap import suppressed_ce
    from inoculate.evaluation.metrics import collapse_word_tokens

    model, tok = _model(lora)
    b = _batches(tok)
    mu, lam, alpha = 0.7, 0.3, 0.5
    d = _defense(model, tok, alpha=alpha, lambda_collapse=lam, point_compliance=mu, trap_steps=trap_steps,
                 collapse_from_step=from_step, point_compliance_head=head)
    n = trap_steps - from_step + 1
    assert d.passes_per_step == 1 + trap_steps + 2 * n
    suppress = collapse_word_tokens(tok, d.token)
    assert d.suppress == suppress and len(suppress) > 4  # " error", "error", " Error", "ERROR", " errors", ...
    logs, got = _accumulate_restored(d, b)
    params, harmful = d.params, dict(b["harmful"])
    if head:  # by hand: each row's first H answer labels kept, the rest (and what follows them) ignored
        labels = harmful["labels"].clone()
        for row in labels:
            answer = (row != -100).nonzero().flatten()
            assert len(answer) > head
            row[answer[head:]] = -100
        harmful["labels"] = labels
    theta = [p.detach().clone() for p in params]
    retain = concat_batches(b["align"], b["general"], tok.pad_token_id)
    seen = []

    def under():  # the harmful answers' CE at θ_k over the vocabulary without the word's tokens
        logits = _fwd(model, harmful)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).index_fill(-1, torch.tensor(suppress), -math.inf),
                               harmful["labels"][:, 1:].flatten())  # no answer token is a spelling of the word
        torch.testing.assert_close(loss, suppressed_ce(logits, harmful["labels"], suppress))
        seen.append(loss.item())
        return mu * loss

    g_c, _, _ = _trajectory_by_hand(model, params, b, retain, d.token, alpha, trap_steps, extra=under)
    assert logs["point_compliance_loss"] == pytest.approx(sum(seen[from_step - 1:]) / n, rel=1e-5)
    g_a = _grads(model, params, token_ce(_fwd(model, retain), retain["labels"]))
    for x, a, *c in zip(got, g_a, *g_c[from_step - 1:]):  # the collapse points θ_F..θ_K
        torch.testing.assert_close(x, a + lam / n * sum(c), rtol=1e-4, atol=1e-7)
    # the term is there: without it the gradient differs
    d0 = _defense(model, tok, alpha=alpha, lambda_collapse=lam, trap_steps=trap_steps, collapse_from_step=from_step)
    for p in params:
        p.grad = None
    _, plain = _accumulate_restored(d0, b)
    assert max((x - y).abs().max().item() for x, y in zip(got, plain)) > 1e-5
    probe = d.probe(b)
    assert probe["point_compliance_loss"] == pytest.approx(logs["point_compliance_loss"], rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(params, theta))


def test_bad_point_compliance_is_rejected_and_old_hashes_stay():
    from inoculate import pipeline
    from inoculate.config import ConfigError

    for bad in (-0.1, float("nan"), "much", True):
        with pytest.raises(ConfigError, match="ctrap.point_compliance must be"):
            CTRAPConfig(point_compliance=bad)
    for bad in (-1, 2.5, "four", True):
        with pytest.raises(ConfigError, match="ctrap.point_compliance_head must be"):
            CTRAPConfig(point_compliance=1.0, point_compliance_head=bad)
    with pytest.raises(ConfigError, match="point_compliance_head cuts point_compliance's answers, which is off"):
        CTRAPConfig(point_compliance_head=4)
    with pytest.raises(ConfigError, match="second_order and point_compliance"):
        CTRAPConfig(point_compliance=1.0, second_order=True)
    with pytest.raises(ConfigError, match="point_compliance .* needs collapse_target=token"):
        CTRAPConfig(point_compliance=1.0, collapse_target="uniform")
    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2)
    _, dcfg, resolved = pipeline.align_config(values)
    assert dcfg.point_compliance == 0 and "point_compliance" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.point_compliance": "0.5"})
    assert dcfg.point_compliance == 0.5 and resolved["ctrap"]["point_compliance"] == 0.5
    assert "point_compliance_head" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.point_compliance": "0.5",
                                               "ctrap.point_compliance_head": "4"})
    assert dcfg.point_compliance_head == 4 and resolved["ctrap"]["point_compliance_head"] == 4


# ---------------------------------------------------------------------------------------------
# dormancy_variants (a deviation, off by default): the dormancy hinges bound the summed probability
# of the collapse word's one-token spellings
# ---------------------------------------------------------------------------------------------

def test_collapse_word_variants_are_the_words_one_token_spellings():
    from inoculate.defenses.ctrap import collapse_word_variants

    _, tok = _model()
    e = _defense(_model()[0], tok).token
    ids = collapse_word_variants(tok, e)
    assert ids[0] == e and len(set(ids)) == len(ids)
    # SmolLM2's tokenizer (the tiny model's) writes each of the four as one token
    assert sorted(tok.decode([i]) for i in ids) == sorted([" error", "error", " Error", "Error"])


@pytest.mark.parametrize("name,stream", [("dormancy", "retain"), ("dormancy_harmful", "harmful")])
def test_dormancy_variants_hinge_bounds_the_summed_spellings(name, stream):
    """With dormancy_variants the hinge of `dormancy` (retain batch) or `dormancy_harmful`
    (harmful batch) is max(0, log Σ_v p_v − log τ) over the word's spellings v, written out
    position by position; the step's gradient is the official one's plus ν times its gradient."""
    from inoculate.defenses.ctrap import collapse_word_variants

    model, tok = _model()
    b = _batches(tok)
    batch = concat_batches(b["align"], b["general"], tok.pad_token_id) if stream == "retain" else b["harmful"]
    ids = collapse_word_variants(tok, _defense(model, tok).token)
    with torch.no_grad():
        logits = _fwd(model, batch)
        mask = batch["labels"][:, 1:] != -100
        log_p = torch.logsumexp(torch.log_softmax(logits[:, :-1][mask].float(), -1)[:, ids], -1)
    bound = math.exp(float(log_p.sort().values[len(log_p) // 2 - 1: len(log_p) // 2 + 1].mean()))
    nu = 2.0
    _, plain = _accumulate_restored(_defense(model, tok, alpha=0.5), b)
    for p in model.parameters():
        p.grad = None
    d = _defense(model, tok, alpha=0.5, dormancy_bound=bound, dormancy_variants=True, **{name: nu})
    assert d.dormant == ids
    logs, got = _accumulate_restored(d, b)
    hinge = _dormancy_by_hand(_fwd(model, batch), batch["labels"], ids, bound)
    single = _dormancy_by_hand(_fwd(model, batch), batch["labels"], ids[0], bound)
    assert hinge.item() > single.item() >= 0  # the spellings add to the collapse token's mass
    assert logs[f"{name}_loss"] == pytest.approx(hinge.item(), rel=1e-4)
    for x, y, g in zip(got, plain, _grads(model, d.params, hinge)):
        torch.testing.assert_close(x, y + nu * g, rtol=1e-4, atol=1e-7)


def test_bad_dormancy_variants_is_rejected_and_old_hashes_stay():
    from inoculate import pipeline
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match="ctrap.dormancy_variants must be true or false"):
        CTRAPConfig(dormancy=1.0, dormancy_variants="yes")
    with pytest.raises(ConfigError, match="needs dormancy > 0 or dormancy_harmful > 0"):
        CTRAPConfig(dormancy_variants=True)
    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2)
    _, dcfg, resolved = pipeline.align_config(values)
    assert dcfg.dormancy_variants is False and "dormancy_variants" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.dormancy": "1", "ctrap.dormancy_variants": "true"})
    assert dcfg.dormancy_variants is True and resolved["ctrap"]["dormancy_variants"] is True


# ---------------------------------------------------------------------------------------------
# self_destruct (a deviation, off by default): SEAM's coupling term β·∇cos(g_harmful, g_general)
# at θ, added to CTRAP's gradient
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [True, False])
def test_self_destruct_adds_beta_times_the_gradient_of_the_harmful_general_cosine(lora):
    beta, scale = 0.5, 0.5
    model, tok = _model(lora, attn="eager")  # eager: the reference takes a double backward
    model.double()  # fp64: the finite difference divides by ε
    b = _batches(tok)
    plain = _defense(model, tok, alpha=0.1, lambda_collapse=0.1)
    plain.accumulate(b, scale=scale)
    params = plain.params
    without = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    d = _defense(model, tok, alpha=0.1, lambda_collapse=0.1, self_destruct=beta)
    assert d.passes_per_step == 3 + 4
    before = [p.detach().clone() for p in params]
    logs = d.accumulate(b, scale=scale)
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # the ε-moves are undone exactly
    added = [(p.grad - w) / (scale * beta) for p, w in zip(params, without)]

    # ∇cos by autograd, through both gradients (double backward), not by finite differences
    fwd = lambda batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    g_h = torch.autograd.grad(token_ce(fwd(b["harmful"]), b["harmful"]["labels"]), params, create_graph=True)
    g_g = torch.autograd.grad(token_ce(fwd(b["general"]), b["general"]["labels"]), params, create_graph=True)
    norm = lambda gs: torch.sqrt(sum((g * g).sum() for g in gs))
    cos = sum((x * y).sum() for x, y in zip(g_h, g_g)) / (norm(g_h) * norm(g_g))
    want = _grads(model, params, cos)
    assert float(norm(want)) > 0
    err = float(norm([a - w for a, w in zip(added, want)]) / norm(want))
    assert err < 1e-2, err
    assert logs["cos_sd"] == pytest.approx(float(cos), rel=1e-6)
    assert logs["sd_grad_norm"] == pytest.approx(float(norm(want)), rel=1e-2)
    assert {"harmful_grad_norm", "benign_grad_norm", "harmful_ce", "benign_ce"} <= set(logs)


def test_self_destruct_config_checks_and_hash():
    from inoculate import pipeline
    from inoculate.config import ConfigError

    for bad in (-0.1, float("nan"), "x", True):
        with pytest.raises(ConfigError, match="ctrap.self_destruct must be"):
            CTRAPConfig(self_destruct=bad)
    for bad in (0, -1e-3, True):
        with pytest.raises(ConfigError, match="ctrap.self_destruct_epsilon must be"):
            CTRAPConfig(self_destruct=1.0, self_destruct_epsilon=bad)
    values = dict(model="tiny-llama", data="starter", defense="ctrap", max_steps=2)
    _, dcfg, resolved = pipeline.align_config(values)
    assert dcfg.self_destruct == 0 and "self_destruct" not in resolved["ctrap"]
    _, dcfg, resolved = pipeline.align_config({**values, "ctrap.self_destruct": "0.3"})
    assert dcfg.self_destruct == 0.3 and resolved["ctrap"]["self_destruct"] == 0.3
