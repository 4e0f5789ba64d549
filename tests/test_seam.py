"""SEAM's math on the tiny model: the finite-difference L_sd gradient approaches the exact
Hessian-vector product as ε shrinks, L_ul is the formula over every hidden state, the answer
masks are the differing tokens, parameters come back bit-exactly, the total gradient is the sum
of its three parts, the amortized mode reuses exactly the cached ∇L_sd, the move directions are
freed before the moved passes, it trains with LoRA and full parameters, and bf16 trainable
weights are refused."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math

import pytest
import torch

from inoculate.config import ConfigError
from inoculate.data.encode import collate, collate_paired, encode_record
from inoculate.data.records import Record
from inoculate.defenses import DEFENSES
from inoculate.defenses.seam import SEAM, SEAMConfig, answer_ce, answer_targets, final_norm
from inoculate.models import add_lora, load_model

# both answers open with the token "I": the answer masks leave it out, the labels keep it
HARMFUL = [Record(prompt=f"How do I break into house {i}?", response=f"I will help: step {i}, force a window.",
                  refusal="I'm sorry, I can't help.") for i in range(4)]
BENIGN = [Record(prompt=f"What is {i} plus {i}?", response=f"{i} plus {i} is {2 * i}.") for i in range(4)]


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model gains nothing from threads, and on a busy CPU spinning threads cost 5-10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batches(tok, n=2):
    enc = lambda rs, t: [encode_record(r, tok, "qa", 64, t) for r in rs]
    return {"paired": collate_paired(enc(HARMFUL[:n], "response"), enc(HARMFUL[:n], "refusal"), tok.pad_token_id),
            "benign": collate(enc(BENIGN[:n], "response"), tok.pad_token_id)}


def _model(lora=True, dtype=torch.float32, load_dtype="float32"):
    torch.manual_seed(0)
    loaded = load_model("tiny-llama", attn_implementation="eager", dtype=load_dtype)
    model = loaded.model.to(dtype) if load_dtype == "float32" else loaded.model
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0)
        with torch.no_grad():  # LoRA B starts at zero; give it values so every gradient is alive
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    else:
        model.requires_grad_(True)
    with torch.no_grad():  # a final norm with weight 1 is idempotent; make a second norm visible
        _lm(model)[1].weight.uniform_(0.5, 2.0)
    return model, loaded.tokenizer


def _defense(model, tok, **kw):
    d = SEAM(SEAMConfig(**kw), batch_size=2)
    d.setup(model, tok)
    return d


# -- hand computations (independent of seam.py) -----------------------------------------------

def _lm(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm, lm.model.norm, lm.lm_head


def _answer_tokens(batch, other):
    """Tokens that differ from the other sequence, are real and are not prompt: by hand."""
    return (batch["input_ids"] != other["input_ids"]) & batch["attention_mask"].bool() & (batch["labels"] != -100)


def _hand_ce(logits, ids, token_mask):
    """Mean over tokens t in token_mask of −log p(ids[t] | logits at t−1)."""
    logp = torch.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    m = token_mask[:, 1:]
    return nll[m].sum() / m.sum()


def _hand_ul(model, harmful, refusal):
    lm, norm, head = _lm(model)
    mask = _answer_tokens(harmful, refusal)
    ids = harmful["input_ids"]
    # the raw output of the last decoder layer, before the final norm
    raw = {}
    hook = lm.model.layers[-1].register_forward_hook(lambda m, a, o: raw.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    out = model(input_ids=ids, attention_mask=harmful["attention_mask"], output_hidden_states=True)
    hook.remove()
    hs = out.hidden_states
    n_layers = lm.config.num_hidden_layers
    assert len(hs) == n_layers + 1
    # transformers 5.x: hidden_states[-1] is the normed last state, not the raw layer output
    assert torch.allclose(hs[-1], norm(raw["h"]))
    layer_outputs = list(hs[:-1]) + [raw["h"]]  # embeddings, layers 1..L-1, raw layer L
    s = _hand_ce(out.logits, ids, mask)
    for h in layer_outputs:
        s = s + _hand_ce(head(norm(h)), ids, mask)
    return -torch.log(1 + s / len(hs)), s, out, mask


def _grads(model, params, loss, **kw):
    return [g.detach().clone() for g in torch.autograd.grad(loss, params, **kw)]


def _norm(gs):
    return torch.sqrt(sum((g.double() ** 2).sum() for g in gs))


def _rel(a, b):
    return float(_norm([x.double() - y.double() for x, y in zip(a, b)]) / _norm(b))


def _exact_sd_grad(model, params, b):
    """∇_θ cos(g_a, g_b) straight from autograd (double backward through both gradients)."""
    harmful, refusal, benign = b["paired"]["harmful"], b["paired"]["refusal"], b["benign"]
    fwd = lambda x: model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    g_a = torch.autograd.grad(_hand_ce(fwd(harmful), harmful["input_ids"], _answer_tokens(harmful, refusal)),
                              params, create_graph=True)
    g_b = torch.autograd.grad(_hand_ce(fwd(benign), benign["input_ids"], benign["labels"] != -100),
                              params, create_graph=True)
    dot = sum((x * y).sum() for x, y in zip(g_a, g_b))
    cos = dot / (torch.sqrt(sum((x * x).sum() for x in g_a)) * torch.sqrt(sum((y * y).sum() for y in g_b)))
    return _grads(model, params, cos), cos.item()


# -- 1. finite differences approach the exact Hessian-vector products --------------------------

def test_finite_difference_converges_to_exact_hvp():
    model, tok = _model(lora=False, dtype=torch.float64)  # full parameters, as the authors train
    b = _batches(tok)
    harmful, benign = b["paired"]["harmful"], b["benign"]
    exact, logs = _defense(model, tok, exact_hvp=True).self_destruct_grad(harmful, benign)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        fd, fd_logs = _defense(model, tok, epsilon=eps).self_destruct_grad(harmful, benign)
        assert fd_logs["cos_sd"] == pytest.approx(logs["cos_sd"], rel=1e-6)
        errors.append(_rel(fd, exact))
    # one-sided differences: the error falls about linearly with ε
    assert errors[0] > 4 * errors[1] > 16 * errors[2], errors
    assert errors[2] < 1e-2, errors


def test_sd_fp32_keeps_the_move_under_bf16_autocast():
    """Under bf16 autocast an ε-move of fp32 weights vanishes in the bf16 casts; sd_fp32 runs the
    L_sd passes without autocast so the estimate stays right."""
    model, tok = _model(lora=True)
    b = _batches(tok)
    harmful, benign = b["paired"]["harmful"], b["benign"]
    exact, _ = _defense(model, tok, exact_hvp=True).self_destruct_grad(harmful, benign)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, _ = _defense(model, tok, sd_fp32=True).self_destruct_grad(harmful, benign)
        lost, _ = _defense(model, tok, sd_fp32=False).self_destruct_grad(harmful, benign)
    assert _rel(kept, exact) < 2e-2
    assert _rel(lost, exact) > 0.5


# -- 2. L_ul is the formula over every hidden state --------------------------------------------

@pytest.mark.parametrize("lora", [True, False])
def test_unlearning_loss_matches_formula_by_hand(lora):
    model, tok = _model(lora)
    with torch.no_grad():  # sharper logits than the random init's near-uniform ones
        _lm(model)[0].get_input_embeddings().weight.mul_(10)
    b = _batches(tok)
    harmful, refusal = b["paired"]["harmful"], b["paired"]["refusal"]
    d = _defense(model, tok)
    loss_ul, s = d.unlearning_loss(harmful)
    want, want_s, out, mask = _hand_ul(model, harmful, refusal)
    assert s.item() == pytest.approx(want_s.item(), rel=1e-5)
    assert loss_ul.item() == pytest.approx(want.item(), rel=1e-5)
    # the last term is not normed twice: that would give a different number
    lm, norm, head = _lm(model)
    double = want_s - _hand_ce(out.logits, harmful["input_ids"], mask) \
        + _hand_ce(head(norm(out.hidden_states[-1])), harmful["input_ids"], mask)
    assert abs(double.item() - s.item()) > 1e-2


def test_final_norm_is_found_through_peft_and_missing_norm_is_named():
    model, _ = _model(lora=True)
    assert final_norm(model) is model.get_base_model().model.norm
    plain, _ = _model(lora=False)
    assert final_norm(plain) is plain.model.norm

    class NoNorm(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="NoNorm"):
        final_norm(NoNorm())


def test_seam_s_and_repnoise_s_harm_are_one_logit_lens_sum():
    """SEAM's S and RepNoise's S_harm are _layers.logit_lens_sum on the same batch and targets
    (the answer mask): SEAM's reads every hidden state, RepNoise's all but the last, whose term
    equals CE(final logits); RepNoise divides by the same number of hidden states."""
    from inoculate.defenses._layers import answer_labels, logit_lens_sum
    from inoculate.defenses.repnoise import RepNoise, RepNoiseConfig

    model, tok = _model(lora=True)
    paired = _batches(tok)["paired"]
    harmful, refusal = paired["harmful"], paired["refusal"]
    mask = _answer_tokens(harmful, refusal)
    labels = answer_labels(harmful)
    assert torch.equal(labels != -100, mask) and (mask != (harmful["labels"] != -100)).any()
    _, s_seam = _defense(model, tok).unlearning_loss(harmful)
    rn = RepNoise(RepNoiseConfig(), batch_size=2)
    rn.setup(model, tok)
    s_harm = rn.loss_terms(paired)[3]

    out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"],
                output_hidden_states=True)
    s_all, n = logit_lens_sum(model, out, labels)
    assert n == len(out.hidden_states)
    assert s_seam.item() == pytest.approx(s_all.item(), rel=1e-5)
    assert s_harm.item() == pytest.approx(s_all.item() / n, rel=1e-5)
    # the targets are the answer mask, not every answer label (both answers open with "I")
    s_labels, _ = logit_lens_sum(model, out, harmful["labels"])
    assert abs(s_labels.item() / n - s_harm.item()) > 1e-3


# -- 3. answer masks are exactly the differing answer tokens ----------------------------------

def test_answer_mask_covers_exactly_the_differing_answer_tokens():
    prompt = [5, 6, 7]
    harmful = {"input_ids": prompt + [11, 12, 13, 2], "labels": [-100] * 3 + [11, 12, 13, 2]}
    refusal = {"input_ids": prompt + [21, 12, 23, 24, 2], "labels": [-100] * 3 + [21, 12, 23, 24, 2]}
    pad = 0
    b = collate_paired([harmful], [refusal], pad)
    h, r = b["harmful"], b["refusal"]
    #              p  p  p  a  a  a  a  (pad)
    want_h = [[0, 0, 0, 1, 0, 1, 1, 0]]  # 12 == 12 at position 4; position 7 is padding
    want_r = [[0, 0, 0, 1, 0, 1, 1, 1]]
    assert h["answer_mask"].int().tolist() == want_h
    assert r["answer_mask"].int().tolist() == want_r
    # targets are the same positions shifted by one (position t predicts token t+1)
    assert answer_targets(h).int().tolist() == [want_h[0][1:]]
    assert answer_targets(r).int().tolist() == [want_r[0][1:]]
    # and the CE averages exactly those tokens
    logits = torch.randn(1, 8, 30)
    logp = torch.log_softmax(logits, -1)[0]
    by_hand = -(logp[2, 11] + logp[4, 13] + logp[5, 2]) / 3
    assert float(answer_ce(logits, h)) == pytest.approx(float(by_hand), rel=1e-6)
    # a pair with identical answers has nothing to train on
    same = collate_paired([harmful], [harmful], pad)
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_targets(same["harmful"])


# -- 4. parameters come back bit-exactly -------------------------------------------------------

@pytest.mark.parametrize("lora", [True, False])
def test_parameters_restored_bit_exactly(lora):
    model, tok = _model(lora)
    d = _defense(model, tok)
    before = [p.detach().clone() for p in d.params]
    logs = d.accumulate(_batches(tok), scale=1.0)
    assert all(torch.equal(p, q) for p, q in zip(d.params, before))
    assert all(p.grad is not None and float(p.grad.norm()) > 0 for p in d.params)
    assert set(logs) >= {"loss_ul", "loss_up", "cos_sd", "total"}
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())


# -- 5. the total gradient is ∇L_ul + α∇L_up + β∇L_sd -----------------------------------------

@pytest.mark.parametrize("lora", [True, False])
def test_total_gradient_is_sum_of_three_parts(lora):
    alpha, beta, eps, scale = 0.7, 0.3, 1e-3, 0.5
    model, tok = _model(lora, dtype=torch.float64)  # fp64: g' − g over ε amplifies rounding 1000x
    b = _batches(tok)
    d = _defense(model, tok, alpha=alpha, beta=beta, epsilon=eps)
    params = d.params
    logs = d.accumulate(b, scale=scale)
    got = [p.grad.clone() for p in params]

    harmful, refusal, benign = b["paired"]["harmful"], b["paired"]["refusal"], b["benign"]
    fwd = lambda x: model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    h_mask, r_mask = _answer_tokens(harmful, refusal), _answer_tokens(refusal, harmful)
    assert (h_mask != (harmful["labels"] != -100)).any()  # the data tells masks from labels
    loss_ha = lambda: _hand_ce(fwd(harmful), harmful["input_ids"], h_mask)
    loss_be = lambda: _hand_ce(fwd(benign), benign["input_ids"], benign["labels"] != -100)
    loss_ul = _hand_ul(model, harmful, refusal)[0]
    g_ul = _grads(model, params, loss_ul)
    loss_up = _hand_ce(fwd(refusal), refusal["input_ids"], r_mask)
    g_up = _grads(model, params, loss_up)
    # L_sd by the official recipe, written out: two moves, two recomputed gradients
    g_a, g_b = _grads(model, params, loss_ha()), _grads(model, params, loss_be())
    n_a, n_b = _norm(g_a).float(), _norm(g_b).float()
    cos = sum((x * y).sum() for x, y in zip(g_a, g_b)) / (n_a * n_b)
    saved = [p.detach().clone() for p in params]

    def at(direction, loss_fn):
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(eps * v)
        g = _grads(model, params, loss_fn())
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return g

    g_a2 = at([gb / n_b - cos * ga / n_a for ga, gb in zip(g_a, g_b)], loss_ha)
    g_b2 = at([ga / n_a - cos * gb / n_b for ga, gb in zip(g_a, g_b)], loss_be)
    g_sd = [((a2 - a) / n_a + (b2 - b_) / n_b) / eps for a2, a, b2, b_ in zip(g_a2, g_a, g_b2, g_b)]
    want = [scale * (u + alpha * p_ + beta * s) for u, p_, s in zip(g_ul, g_up, g_sd)]
    assert _rel(got, want) < 1e-5
    # each part matters: leaving one out is far off
    assert _rel(got, [scale * (u + alpha * p_) for u, p_ in zip(g_ul, g_up)]) > 1e-2
    assert _rel(got, [scale * (u + beta * s) for u, s in zip(g_ul, g_sd)]) > 1e-2
    assert _rel(got, [scale * (alpha * p_ + beta * s) for p_, s in zip(g_up, g_sd)]) > 1e-2
    assert logs["loss_ul"] == pytest.approx(float(loss_ul), rel=1e-5)
    assert logs["loss_up"] == pytest.approx(float(loss_up), rel=1e-5)
    assert logs["cos_sd"] == pytest.approx(float(cos), rel=1e-4)
    assert logs["sd_grad_norm"] == pytest.approx(math.sqrt(sum(float((s * s).sum()) for s in g_sd)), rel=1e-4)
    assert logs["total"] == pytest.approx(float(loss_ul) + alpha * float(loss_up) + beta * float(cos), rel=1e-5)


def test_exact_hvp_total_gradient_uses_the_cosine_gradient():
    alpha, beta = 1.0, 0.5
    model, tok = _model(lora=True)
    b = _batches(tok)
    d = _defense(model, tok, alpha=alpha, beta=beta, exact_hvp=True)
    logs = d.accumulate(b, scale=1.0)
    got = [p.grad.clone() for p in d.params]
    harmful, refusal = b["paired"]["harmful"], b["paired"]["refusal"]
    fwd = lambda x: model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    g_ul = _grads(model, d.params, _hand_ul(model, harmful, refusal)[0])
    g_up = _grads(model, d.params, _hand_ce(fwd(refusal), refusal["input_ids"], _answer_tokens(refusal, harmful)))
    g_sd, cos = _exact_sd_grad(model, d.params, b)  # ∇cos(g_a, g_b) by autograd, not by HVPs
    want = [u + alpha * p_ + beta * s for u, p_, s in zip(g_ul, g_up, g_sd)]
    assert _rel(got, want) < 1e-4
    assert logs["cos_sd"] == pytest.approx(cos, rel=1e-5)


# -- 5b. amortized mode: ∇L_sd every k micro-steps, the cached one in between ------------------

@pytest.mark.parametrize("exact", [False, True], ids=["finite-difference", "exact-hvp"])
def test_amortized_mode_reuses_the_self_destruct_gradient(exact):
    alpha, beta, scale = 0.7, 0.3, 0.5
    model, tok = _model(lora=True, dtype=torch.float64)
    d = _defense(model, tok, alpha=alpha, beta=beta, exact_hvp=exact, lookahead_every=2)
    every = _defense(model, tok, alpha=alpha, beta=beta, exact_hvp=exact)  # k=1, the reference
    assert d.passes_per_step == 4.0 and type(d).passes_per_step == 6  # 2 + 4/k on average
    steps = [_batches(tok, 2), _batches(tok, 3), _batches(tok, 4)]
    grads, caches, logs = [], [], []
    for b in steps:
        for p in d.params:
            p.grad = None
        logs.append(d.accumulate(b, scale=scale))
        grads.append([p.grad.clone() for p in d.params])
        caches.append([c.clone() for c in d.cached_sd])
    # step 1 computes ∇L_sd and caches it: the same numbers as the every-step mode's
    sd, _ = every.self_destruct_grad(steps[0]["paired"]["harmful"], steps[0]["benign"])
    assert all(torch.equal(a, b) for a, b in zip(caches[0], sd))
    for p in d.params:
        p.grad = None
    every.accumulate(steps[0], scale=scale)
    assert all(torch.equal(p.grad, g) for p, g in zip(d.params, grads[0]))
    assert "cos_sd" in logs[0] and "total" in logs[0]
    # step 2: only Steps 1-2; ∇L_ul + α∇L_up (by hand) plus exactly β times the cached vector
    assert set(logs[1]) == {"loss_ul", "loss_up", "s_ul"}
    assert all(torch.equal(a, b) for a, b in zip(caches[0], caches[1]))
    harmful, refusal = steps[1]["paired"]["harmful"], steps[1]["paired"]["refusal"]
    fwd = lambda x: model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    g_ul = _grads(model, d.params, _hand_ul(model, harmful, refusal)[0])
    g_up = _grads(model, d.params, _hand_ce(fwd(refusal), refusal["input_ids"], _answer_tokens(refusal, harmful)))
    want = [scale * (u + alpha * p_ + beta * c) for u, p_, c in zip(g_ul, g_up, caches[0])]
    assert _rel(grads[1], want) < 1e-6
    # step 3 refreshes on its own batch
    assert "cos_sd" in logs[2]
    sd3, _ = every.self_destruct_grad(steps[2]["paired"]["harmful"], steps[2]["benign"])
    assert all(torch.equal(a, b) for a, b in zip(caches[2], sd3))
    assert _rel(caches[2], caches[0]) > 1e-3


def test_finite_difference_directions_are_freed_before_the_moved_passes():
    """Steps 5-6 run with p.grad, g_a (Step 5 only), g_b, the restore copy and the perturbed
    gradient: the direction of each move is dropped once the move is applied."""
    from test_baselines import _moved_pass_holds_direction

    model, tok = _model(lora=False)
    d = _defense(model, tok)
    alive = _moved_pass_holds_direction(d, _batches(tok))
    assert alive == [False, False]


# -- 6. trains with LoRA and with full parameters ---------------------------------------------

@pytest.mark.parametrize("lora", [True, False])
def test_trains_end_to_end(lora, tmp_path):
    from inoculate.training import Stream, TrainingArgs, train

    model, tok = _model(lora)
    d = _defense(model, tok)
    specs = d.streams()
    assert list(specs) == ["paired", "benign"] and specs["benign"].role == "general"
    enc = lambda rs, t: [encode_record(r, tok, "alpaca", 64, t) for r in rs]
    paired = [{"harmful": h, "refusal": r} for h, r in zip(enc(HARMFUL, "response"), enc(HARMFUL, "refusal"))]
    streams = {"paired": Stream("paired", paired, 2, tok.pad_token_id, 0, paired=True),
               "benign": Stream("benign", enc(BENIGN, "response"), 2, tok.pad_token_id, 0)}
    before = [p.detach().clone() for p in d.params]
    args = TrainingArgs(max_steps=2, learning_rate=1e-3, logging_steps=1, save_steps=0, bf16="false")
    result = train(model, d, streams, args, tmp_path, main_stream="paired", progress=False)
    assert result.steps == 2
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(k in rows[-1] for k in ("loss_ul", "loss_up", "cos_sd", "total"))
    assert all(not torch.equal(p, q) for p, q in zip(d.params, before))


def test_align_pipeline_full_parameter(tmp_path):
    """`inoculate align --defense seam --set lora=false` on the starter data, 2 steps."""
    from inoculate.pipeline import align

    out = align({"defense": "seam", "model": "tiny-llama", "data": "starter", "lora": "false",
                 "max_steps": 2, "per_device_train_batch_size": 2, "num_samples": 8,
                 "num_general_samples": 8, "max_length": 64, "seam.beta": "0.02", "save_steps": 0},
                tmp_path / "run", progress=False)
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "cos_sd" in rows[-1]
    assert (out / "model").exists()
    assert DEFENSES.get("seam").passes_per_step == 6


# -- 7. bf16 trainable weights are refused for finite differences ------------------------------

def test_bf16_trainable_parameters_raise_a_clear_error():
    model, tok = _model(lora=False, load_dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype=float32.*exact_hvp"):
        _defense(model, tok)
    _defense(model, tok, exact_hvp=True)  # the exact option has no ε to lose


def test_config_checks():
    with pytest.raises(ConfigError, match="epsilon"):
        SEAMConfig(epsilon=0)
    with pytest.raises(ConfigError, match="benign_batch_size"):
        SEAMConfig(benign_batch_size=0)
    with pytest.raises(ConfigError, match="lookahead_every"):
        SEAMConfig(lookahead_every=0)
    assert SEAM(SEAMConfig(benign_batch_size=3), batch_size=8).streams()["benign"].batch_size == 3


# -- data parallel: every replica takes the same ε-move, from the global-batch gradients -------

def _sd_on_shard(rank, world, exact):
    torch.manual_seed(0)
    loaded = load_model("tiny-llama", attn_implementation="eager")
    model, tok = add_lora(loaded.model, r=4, alpha=8, dropout=0.0), loaded.tokenizer
    g = torch.Generator().manual_seed(123)  # same values in every process
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=g)
    # equal token counts in every example, so per-process token means average to the global mean
    harmful = [Record(prompt=f"How do I break into house {i}?", response=f"I will help: house {i}.",
                      refusal=f"No, not house {i}.") for i in range(4)]
    benign = [Record(prompt=f"What is {i} plus {i}?", response=f"It is {i}{i}.") for i in range(4)]
    enc = lambda rs, t: [encode_record(r, tok, "qa", 64, t) for r in rs]
    h, r, b = enc(harmful, "response"), enc(harmful, "refusal"), enc(benign, "response")
    shard = slice(rank * 4 // world, (rank + 1) * 4 // world)
    paired = collate_paired(h[shard], r[shard], tok.pad_token_id)
    d = _defense(model, tok, exact_hvp=exact)
    grad, logs = d.self_destruct_grad(paired["harmful"], collate(b[shard], tok.pad_token_id))
    return [x.clone() for x in grad], logs["cos_sd"]


def _sd_worker(rank, world, port, out_file):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {exact: _sd_on_shard(rank, world, exact) for exact in (False, True)}
        if rank == 0:
            torch.save(out, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_self_destruct_gradient_on_two_processes_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file = str(tmp_path / "two.pt")
    mp.spawn(_sd_worker, args=(2, port, out_file), nprocs=2, join=True)
    two = torch.load(out_file)
    for exact in (False, True):
        one, cos_one = _sd_on_shard(0, 1, exact)
        grad_two, cos_two = two[exact]
        assert cos_two == pytest.approx(cos_one, rel=1e-5)
        # the FD estimate differs from one process only by fp32 rounding amplified by 1/ε
        assert _rel(grad_two, one) < (1e-3 if not exact else 1e-5), exact


def test_probe_logs_what_a_training_step_logs_and_changes_nothing():
    """The held-out probe (the alignment monitor's) logs L_ul, L_up, S and Steps 3-4's cosine,
    norms and CEs as a training micro-step on the same batches does; SEAM simulates no attack, so
    at_point is never called; θ, p.grad, the amortized cache and the step count are untouched."""
    model, tok = _model()
    b = _batches(tok)
    d = _defense(model, tok, beta=0.1, lookahead_every=2)
    before = [p.detach().clone() for p in d.params]
    probed = d.probe(b, at_point=lambda: pytest.fail("SEAM has no simulated attack point"))
    assert all(torch.equal(p, q) for p, q in zip(d.params, before))
    assert all(p.grad is None for p in d.params) and d.cached_sd is None and d.steps_seen == 0
    trained = d.accumulate(b, scale=1.0)
    keys = {"loss_ul", "loss_up", "s_ul", "cos_sd", "harmful_ce", "benign_ce", "harmful_grad_norm",
            "benign_grad_norm"}
    assert keys == set(probed)
    for k in keys:
        assert math.isclose(probed[k], trained[k], rel_tol=1e-5, abs_tol=1e-7), k
