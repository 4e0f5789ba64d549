"""CTRAP's math on the tiny model: the gradient equals a hand computation from its three passes,
the simulated step leaves parameters untouched, the second-order option matches torch.func,
and the collapse loss is the cross-entropy to the collapse target."""
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
    for p, a, c in zip(d.params, g_a, cached):
        torch.testing.assert_close(p.grad, a + 0.5 * c, rtol=1e-5, atol=1e-8)
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
