"""Vaccine, Booster, RepNoise, NPO and TAR on tiny models: each defense's gradient equals a hand
computation written independently here (Booster also in its amortized mode, and with the move
direction freed before the pass at the moved point), the generic layer finder works across
architectures. That every defense trains through the engine, LoRA and full-parameter, on the
tiny Llama and other families is in test_architectures.py."""
import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from inoculate.config import ConfigError
from inoculate.data.encode import collate, collate_paired
from inoculate.defenses import get_defense
from inoculate.defenses._layers import (LayerLookupError, attention_modules, decoder_layers,
                                        final_norm, logit_lens_ce, mlp_modules)
from inoculate.defenses.booster import BoosterConfig
from inoculate.defenses.npo import NPOConfig
from inoculate.defenses.repnoise import RepNoiseConfig, gaussian_mmd
from inoculate.defenses.tar import TARConfig, tamper_weights
from inoculate.defenses.vaccine import VaccineConfig
from inoculate.models import add_lora, load_model

PAD = 0


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny Llama, a tiny GPT-2, synthetic token batches, and a hand-written CE
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama").model


def _model(base, lora: bool, targets=None):
    model = copy.deepcopy(base)
    model.train()
    if lora:
        torch.manual_seed(1)
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=targets)
        with torch.no_grad():  # LoRA B starts at zero, which hides many gradients
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    else:
        model.requires_grad_(True)
    return model


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg)


def _seq(g, lo, hi, vocab):
    return torch.randint(10, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()


def _examples(n, seed, vocab=1000, paired=False):
    """Encoded examples: random prompt, random answer (label -100 on the prompt). With paired,
    (harmful, refusal) examples that share the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = _seq(g, 3, 7, vocab)
        answers = [_seq(g, 3, 8, vocab) for _ in range(2 if paired else 1)]
        enc = [{"input_ids": prompt + a, "labels": [-100] * len(prompt) + a} for a in answers]
        out.append({"harmful": enc[0], "refusal": enc[1]} if paired else enc[0])
    return out


def _batch(n, seed, vocab=1000):
    return collate(_examples(n, seed, vocab), PAD)


def _paired(n, seed, vocab=1000):
    ex = _examples(n, seed, vocab, paired=True)
    return collate_paired([e["harmful"] for e in ex], [e["refusal"] for e in ex], PAD)


def hand_ce(logits, labels):
    """Token-mean CE over answer tokens, written out: position t predicts token t+1."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    picked = lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _grad(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, gs)]


def _assert_close(got, want, rtol=1e-4, atol=1e-6):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _rel(a, b):
    num = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)))
    return num / math.sqrt(sum(float((y ** 2).sum()) for y in b))


def _defense(name, model, batch_size=3, **cfg):
    cls = get_defense(name)
    d = cls(cls.config_class(**cfg), batch_size)
    d.setup(model, tokenizer=None)
    return d


# ---------------------------------------------------------------------------------------------
# Generic layer lookup
# ---------------------------------------------------------------------------------------------

def _names(model, modules):
    by_id = {id(m): n for n, m in model.named_modules()}
    return [by_id[id(m)] for m in modules]


def test_layer_lookup_is_generic_across_architectures(llama):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

    assert _names(llama, attention_modules(llama)) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert _names(llama, mlp_modules(llama)) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert final_norm(llama) is llama.model.norm
    peft = _model(llama, lora=True)
    assert [type(m).__name__ for m in attention_modules(peft)] == ["LlamaAttention"] * 2
    assert decoder_layers(peft) is peft.get_base_model().model.layers

    gpt2 = _gpt2()
    assert _names(gpt2, attention_modules(gpt2)) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert _names(gpt2, mlp_modules(gpt2)) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert final_norm(gpt2) is gpt2.transformer.ln_f

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=100))
    assert _names(neox, attention_modules(neox)) == [f"gpt_neox.layers.{i}.attention" for i in range(3)]
    assert final_norm(neox) is neox.gpt_neox.final_layer_norm

    with pytest.raises(LayerLookupError, match="Sequential"):
        attention_modules(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)))
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64,
                                   vocab_size=100, word_embed_proj_dim=32))
    assert len(attention_modules(opt)) == 2
    with pytest.raises(LayerLookupError, match="MLP block in OPTDecoderLayer of OPTForCausalLM"):
        mlp_modules(opt)


def test_final_norm_by_name_or_after_the_layers_through_peft():
    from transformers import OPTConfig, OPTForCausalLM

    # OPT registers final_layer_norm before the layer list: found by name
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64,
                                   vocab_size=100, word_embed_proj_dim=32))
    assert final_norm(opt) is opt.model.decoder.final_layer_norm
    peft = _model(_gpt2(), lora=True, targets=["c_attn"])
    assert final_norm(peft) is peft.get_base_model().transformer.ln_f

    class Stack(torch.nn.Module):  # unknown names: the first vector-only child after the layers
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
                                              for _ in range(2))
            self.dropout = torch.nn.Dropout(0.0)
            self.last_ln = torch.nn.LayerNorm(4)
            self.proj = torch.nn.Linear(4, 4)

    stack = Stack()
    assert final_norm(stack) is stack.last_ln
    del stack.last_ln
    with pytest.raises(LayerLookupError, match="final norm of Stack"):
        final_norm(stack)


def test_logit_lens_ce_matches_hand_loop(llama):
    b = _batch(3, 0)
    out = llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    hs = out.hidden_states
    terms = [hand_ce(out.logits, b["labels"])]
    terms += [hand_ce(llama.lm_head(llama.model.norm(h)), b["labels"]) for h in hs[:-1]]
    terms += [hand_ce(llama.lm_head(hs[-1]), b["labels"])]  # already normed: normed once
    want = sum(terms) / len(hs)
    torch.testing.assert_close(logit_lens_ce(llama, out, b["labels"]), want, rtol=1e-5, atol=1e-6)
    # transformers' last hidden state is already normed: its lens is the final logits
    torch.testing.assert_close(llama.lm_head(hs[-1]), out.logits)
    # logits kept only from the first answer position on give the same value
    short = llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                  logits_to_keep=b["input_ids"].shape[1] - 2)
    assert short.logits.shape[1] < out.logits.shape[1]
    torch.testing.assert_close(logit_lens_ce(llama, short, b["labels"]), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_logit_lens_is_checkpointed_with_activation_checkpointing(llama, lora):
    """With gradient checkpointing on, each depth's head and CE keep only their rows for backward
    (the targets x vocabulary logits are recomputed): the same S and the same gradients (the head
    and norm weights' too, full-parameter), and a fraction of the bytes saved for backward."""
    from inoculate.defenses._layers import logit_lens_sum

    b = _batch(3, 0)

    def lens(checkpointed):
        model = _model(llama, lora=lora)
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            s, _ = logit_lens_sum(model, out, b["labels"])
        return s, _grad(s, _params(model)), sum(saved)

    s_plain, g_plain, bytes_plain = lens(False)
    s_ckpt, g_ckpt, bytes_ckpt = lens(True)
    torch.testing.assert_close(s_ckpt, s_plain, rtol=0, atol=0)
    _assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-7)
    targets = int((b["labels"][:, 1:] != -100).sum())
    depth_logits = targets * llama.config.vocab_size * 4  # one depth's targets x vocabulary, fp32
    # plain: the 3 hidden states' head outputs and log-softmaxes (measured: 12.7 and 18.1 units,
    # LoRA and full); checkpointed: only the final logits' CE, on the model's own logits (2.0)
    assert bytes_plain >= 2 * 3 * depth_logits
    assert bytes_ckpt <= 2.1 * depth_logits


# ---------------------------------------------------------------------------------------------
# Vaccine
# ---------------------------------------------------------------------------------------------

def _vaccine_by_hand(model, attn, batch, rho):
    """Perturbations ρ·g_l/‖g‖ from retained attention-output gradients, and the gradient of
    the loss with those perturbations added by separate hooks."""
    acts = {}

    def keep(i):
        def hook(mod, args, out):
            acts[i] = out[0]
        return hook

    hs = [m.register_forward_hook(keep(i)) for i, m in enumerate(attn)]
    loss = hand_ce(_logits(model, batch), batch["labels"])
    for h in hs:
        h.remove()
    g = torch.autograd.grad(loss, [acts[i] for i in range(len(attn))], retain_graph=True)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    deltas = [rho * x / (norm + 1e-7) for x in g]

    def add(d):
        return lambda mod, args, out: (out[0] + d,) + tuple(out[1:])

    hs = [m.register_forward_hook(add(d)) for m, d in zip(attn, deltas)]
    perturbed = hand_ce(_logits(model, batch), batch["labels"])
    for h in hs:
        h.remove()
    params = _params(model)
    return deltas, _grad(perturbed, params), _grad(loss, params)


def test_vaccine_adds_rho_normalized_gradient_to_each_attention_output(llama):
    model = _model(llama, lora=True)
    layers = model.get_base_model().model.layers
    attn = [l.self_attn for l in layers]
    b = _batch(3, 1)
    deltas, want, clean = _vaccine_by_hand(model, attn, b, rho=2.0)

    # observe, in each layer, residual + attention output (what post_attention_layernorm gets)
    # and the unperturbed attention output (this hook is registered before Vaccine's)
    seen = {"res": [], "attn": [], "sum": []}
    hooks = []
    for l in layers:
        hooks.append(l.input_layernorm.register_forward_pre_hook(lambda m, a: seen["res"].append(a[0])))
        hooks.append(l.self_attn.register_forward_hook(lambda m, a, o: seen["attn"].append(o[0])))
        hooks.append(l.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen["sum"].append(a[0])))
    d = _defense("vaccine", model, rho=2.0)
    logs = d.accumulate({"align": b}, scale=1.0)
    for h in hooks:
        h.remove()
    n = len(layers)
    for i in range(n):  # second pass: entries n..2n-1
        added = seen["sum"][n + i] - seen["res"][n + i] - seen["attn"][n + i]
        torch.testing.assert_close(added, deltas[i], rtol=1e-4, atol=1e-6)
        # first pass: nothing added
        torch.testing.assert_close(seen["sum"][i], seen["res"][i] + seen["attn"][i])
    assert abs(math.sqrt(sum(float((x ** 2).sum()) for x in deltas)) - 2.0) < 1e-4
    got = [p.grad for p in d.params]
    _assert_close(got, want)
    assert _rel(want, clean) > 1e-2  # the perturbation changes the update
    assert logs["loss"] > logs["clean_loss"]  # an ascent direction


def test_vaccine_on_gpt2_full_parameter_and_frozen_first_layers(llama):
    model = _gpt2()
    model.train()
    b = _batch(3, 2, vocab=300)
    attn = [blk.attn for blk in model.transformer.h]
    _, want, _ = _vaccine_by_hand(model, attn, b, rho=5.0)
    d = _defense("vaccine", model, rho=5.0)
    d.accumulate({"align": b}, scale=0.5)
    _assert_close([p.grad for p in d.params], [0.5 * g for g in want])

    # LoRA only on the MLPs: the first attention output depends on nothing trainable, and its
    # gradient must still be taken (a leaf is made for it)
    model = _model(llama, lora=True, targets=["down_proj"])
    d = _defense("vaccine", model)
    _, grads = d.attention_gradients(_batch(3, 3))
    assert float(grads[0].abs().sum()) > 0
    deltas = d.perturbations(grads)
    assert abs(math.sqrt(sum(float((x ** 2).sum()) for x in deltas)) - 2.0) < 1e-4


# ---------------------------------------------------------------------------------------------
# Booster
# ---------------------------------------------------------------------------------------------

def _booster_by_hand(model, align, harmful, alpha=0.1):
    """(g_f, g_h − g_h'): the alignment gradient and the regularizer's bracket, by hand."""
    params = _params(model)
    g_f = _grad(hand_ce(_logits(model, align), align["labels"]), params)
    g_h = _grad(hand_ce(_logits(model, harmful), harmful["labels"]), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
    moved = copy.deepcopy(model)
    mparams = _params(moved)
    with torch.no_grad():
        for p, g in zip(mparams, g_h):
            p.sub_(alpha * g / (norm + 1e-7))
    g_h2 = _grad(hand_ce(_logits(moved, harmful), harmful["labels"]), mparams)
    assert _rel(g_h2, g_h) > 1e-3  # the moved gradient differs: the regularizer is not zero
    return g_f, [a - b for a, b in zip(g_h, g_h2)]


@pytest.mark.parametrize("lora", [True, False])
def test_booster_gradient_matches_three_passes_by_hand(llama, lora):
    model = _model(llama, lora)
    align, harmful = _batch(3, 4), _batch(4, 5)
    d = _defense("booster", model, lam=5.0, alpha=0.1)
    params = d.params
    before = [p.detach().clone() for p in params]
    logs = d.accumulate({"align": align, "harmful": harmful}, scale=1.0)
    got = [p.grad.clone() for p in params]
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # restored bit-exactly

    g_f, bracket = _booster_by_hand(model, align, harmful)
    want = [f + 5.0 * r for f, r in zip(g_f, bracket)]
    _assert_close(got, want)
    assert logs["harmful_reduction"] > 0  # the simulated harmful step lowers h
    assert d.cached is None and d.passes_per_step == 3  # every-step mode keeps no cache


def _moved_pass_holds_direction(d, batches) -> list:
    """Run one micro-step; for each forward pass inside Defense.moved, whether a tensor of that
    move's direction was still alive (held by the caller or by moved itself)."""
    import contextlib
    import gc
    import weakref

    original, state, alive = d.moved, {"refs": None}, []

    @contextlib.contextmanager
    def recording(direction, step, **kw):
        state["refs"] = [weakref.ref(t) for t in direction]
        try:
            with original(direction, step, **kw):
                yield
        finally:
            state["refs"] = None

    def hook(module, args, kwargs):
        if state["refs"] is not None:
            gc.collect()
            alive.append(any(r() is not None for r in state["refs"]))

    d.moved = recording
    handle = d.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        d.accumulate(batches, scale=1.0)
    finally:
        handle.remove()
        del d.moved
    return alive


def test_booster_frees_the_harmful_gradient_before_the_pass_at_the_moved_point(llama):
    model = _model(llama, lora=False)
    d = _defense("booster", model)
    # the pass at θ' runs with p.grad and the restore copy only; g_h (the direction) is gone
    assert _moved_pass_holds_direction(d, {"align": _batch(3, 4), "harmful": _batch(4, 5)}) == [False]


def test_booster_amortized_mode_reuses_the_regularizer_gradient(llama):
    model = _model(llama, lora=True)
    d = _defense("booster", model, lam=5.0, alpha=0.1, lookahead_every=2)
    assert d.passes_per_step == 2.0 and type(d).passes_per_step == 3  # 1 + 2/k on average
    steps = [(_batch(3, 4), _batch(4, 5)), (_batch(3, 6), _batch(4, 7)), (_batch(3, 8), _batch(4, 9))]
    grads, caches, logs = [], [], []
    for align, harmful in steps:
        for p in d.params:
            p.grad = None
        logs.append(d.accumulate({"align": align, "harmful": harmful}, scale=0.5))
        grads.append([p.grad.clone() for p in d.params])
        caches.append([c.clone() for c in d.cached])
    # step 1 computes g_h − g_h' and caches it (unscaled); the step's gradient is as with k=1
    g_f, bracket = _booster_by_hand(model, *steps[0])
    _assert_close(caches[0], bracket)
    _assert_close(grads[0], [0.5 * (f + 5.0 * r) for f, r in zip(g_f, bracket)])
    assert "harmful_loss" in logs[0]
    # step 2: no harmful passes; the fresh alignment gradient plus exactly the cached vector
    assert set(logs[1]) == {"loss"}
    assert all(torch.equal(a, b) for a, b in zip(caches[0], caches[1]))
    align = steps[1][0]
    g_f2 = _grad(hand_ce(_logits(model, align), align["labels"]), d.params)
    _assert_close(grads[1], [0.5 * (f + 5.0 * c) for f, c in zip(g_f2, caches[0])])
    # step 3 refreshes on its own harmful batch
    assert "harmful_loss" in logs[2]
    _assert_close(caches[2], _booster_by_hand(model, *steps[2])[1])
    assert _rel(caches[2], caches[0]) > 1e-3


def _recording_point(d, seen):
    """An at_point() that records the parameters it was called on."""
    return lambda: seen.append([p.detach().clone() for p in d.params]) or {"x": 1.0}


def test_booster_probe_measures_a_training_step_and_changes_nothing(llama):
    """The held-out probe (the alignment monitor's) logs what a training micro-step on the same
    batches logs, calls at_point() once at θ' = θ − α·g_h/(‖g_h‖ + eps), and leaves θ
    bit-identical, p.grad empty and the amortized cache and step count as they were."""
    model = _model(llama, lora=True)
    align, harmful = _batch(3, 4), _batch(4, 5)
    d = _defense("booster", model, lam=5.0, alpha=0.1, lookahead_every=2)
    before = [p.detach().clone() for p in d.params]
    seen = []
    probed = d.probe({"align": align, "harmful": harmful}, at_point=_recording_point(d, seen))
    assert len(seen) == 1 and probed["point/x"] == 1.0
    g_h = _grad(hand_ce(_logits(model, harmful), harmful["labels"]), d.params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g_h))
    _assert_close(seen[0], [q - 0.1 * g / (norm + 1e-7) for q, g in zip(before, g_h)], rtol=1e-5, atol=1e-7)
    assert all(torch.equal(p, q) for p, q in zip(d.params, before))
    assert all(p.grad is None for p in d.params) and d.cached is None and d.steps_seen == 0
    trained = d.accumulate({"align": align, "harmful": harmful}, scale=1.0)
    for k in ("loss", "harmful_loss", "harmful_loss_moved", "harmful_reduction", "harmful_grad_norm"):
        assert math.isclose(probed[k], trained[k], rel_tol=1e-5, abs_tol=1e-6), k
    assert probed["harmful_reduction"] > 0


def test_booster_config_checks():
    with pytest.raises(ConfigError, match="lookahead_every"):
        BoosterConfig(lookahead_every=0)


# ---------------------------------------------------------------------------------------------
# RepNoise
# ---------------------------------------------------------------------------------------------

def naive_mmd(x, y, kernels=5, mul=2.0):
    z = torch.cat([x, y]).double()
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    n = z.shape[0]
    base = d2.sum() / (n * n - n)
    k = sum(torch.exp(-d2 / (base * mul ** (i - 2))) for i in range(kernels))
    m = x.shape[0]
    return k[:m, :m].mean() + k[m:, m:].mean() - 2 * k[:m, m:].mean()


def test_gaussian_mmd():
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    assert abs(float(gaussian_mmd(x, x.clone()))) < 1e-5
    same = float(gaussian_mmd(x, y))
    shifted = float(gaussian_mmd(x, y + 2.0))
    assert shifted > 0.5 and shifted > 20 * abs(same)
    torch.testing.assert_close(gaussian_mmd(x, y + 1.0).double(), naive_mmd(x, y + 1.0), rtol=1e-4, atol=1e-6)


def test_repnoise_loss_and_gradient_match_the_formula_by_hand(llama):
    model = _model(llama, lora=True)
    paired = _paired(4, 6)
    h, r = paired["harmful"], paired["refusal"]
    assert h["answer_mask"].any() and not h["answer_mask"][:, :3].any()  # prompts are shared
    d = _defense("repnoise", model, beta=0.5, alpha=1.0)  # a large β so the MMD term shows
    torch.manual_seed(123)
    logs = d.accumulate({"paired": paired}, scale=1.0)
    got = [p.grad.clone() for p in d.params]

    layers = model.get_base_model().model.layers
    ce = hand_ce(_logits(model, r), r["labels"])
    mlp_out = []
    hooks = [l.mlp.register_forward_hook(lambda m, a, o: mlp_out.append(o)) for l in layers]
    out = model(input_ids=h["input_ids"], attention_mask=h["attention_mask"], output_hidden_states=True)
    for hk in hooks:
        hk.remove()
    torch.manual_seed(123)
    mask = h["answer_mask"].float().unsqueeze(-1)
    mmd = sum(naive_mmd((a * mask).flatten(1), (torch.randn(a.shape) * mask).flatten(1))
              for a in mlp_out) / len(mlp_out)
    base = model.get_base_model()
    hs = out.hidden_states
    s = (hand_ce(out.logits, h["labels"])
         + sum(hand_ce(base.lm_head(base.model.norm(x)), h["labels"]) for x in hs[:-1])
         + hand_ce(base.lm_head(hs[-1]), h["labels"])) / len(hs)  # the last state is already normed
    loss = ce + 0.5 * mmd.float() - 1.0 * torch.log(1 + s)
    assert abs(logs["loss"] - loss.item()) < 1e-4
    assert abs(logs["noise_mmd"] - mmd.item()) < 1e-5 and logs["noise_mmd"] > 1e-3
    # the defense's MMD is fp32 through a Gram matrix, the hand one fp64 pairwise: compare the
    # whole gradient by relative norm
    assert _rel(got, _grad(loss, d.params)) < 1e-3


# ---------------------------------------------------------------------------------------------
# NPO
# ---------------------------------------------------------------------------------------------

def _seq_nll(logits, labels):
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    return -(lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep).sum(1)


def test_npo_at_reference_with_lora(llama):
    torch.manual_seed(2)
    model = add_lora(copy.deepcopy(llama), r=4, alpha=8, dropout=0.0)  # B = 0: θ equals the reference
    harmful, align = _batch(3, 7), _batch(3, 8)
    d = _defense("npo", model, beta=0.1, retain_weight=0.0)
    logs = d.accumulate({"harmful": harmful, "align": align}, scale=1.0)
    assert abs(logs["npo_loss"] - (2 / 0.1) * math.log(2)) < 1e-4
    # at θ = ref the gradient is −mean_i ∇NLL_i (σ(0)·2 = 1): gradient ascent on the NLL
    nll = _seq_nll(_logits(model, harmful), harmful["labels"])
    want = _grad(-nll.mean(), d.params)
    _assert_close([p.grad for p in d.params], want)
    assert any(float(p.grad.abs().sum()) > 0 for p in d.params)


def test_npo_full_parameter_matches_formula_and_raises_harmful_nll(llama):
    model = _model(llama, lora=False)
    ref = copy.deepcopy(model)
    harmful, align = _batch(3, 9), _batch(3, 10)
    d = _defense("npo", model, beta=0.1, retain_weight=0.7)
    with torch.no_grad():  # move away from the reference so that NLL_θ ≠ NLL_ref
        for p in d.params:
            p.add_(0.01 * torch.randn_like(p))
    d.accumulate({"harmful": harmful, "align": align}, scale=1.0)
    nll = _seq_nll(_logits(model, harmful), harmful["labels"])
    with torch.no_grad():
        nll_ref = _seq_nll(_logits(ref, harmful), harmful["labels"])
    assert (nll - nll_ref).abs().max() > 1e-3
    loss = (-(2 / 0.1) * F.logsigmoid(0.1 * (nll - nll_ref)).mean()
            + 0.7 * hand_ce(_logits(model, align), align["labels"]))
    _assert_close([p.grad for p in d.params], _grad(loss, d.params))

    # sign: one SGD step on the NPO loss alone raises the NLL of the harmful answers
    d = _defense("npo", _model(llama, lora=False), beta=0.1, retain_weight=0.0)
    before = float(_seq_nll(_logits(d.model, harmful), harmful["labels"]).sum())
    d.accumulate({"harmful": harmful, "align": align}, scale=1.0)
    with torch.no_grad():
        for p in d.params:
            p.sub_(0.5 * p.grad)
    after = float(_seq_nll(_logits(d.model, harmful), harmful["labels"]).sum())
    assert after > before + 1e-3
    assert d.reference is not None and not any(p.requires_grad for p in d.reference.parameters())


@pytest.mark.parametrize("name,batches", [
    ("vaccine", lambda: {"align": _batch(3, 11)}),
    ("repnoise", lambda: {"paired": _paired(4, 12)}),
    ("npo", lambda: {"harmful": _batch(3, 13), "align": _batch(3, 14)})])
def test_probe_logs_a_training_step_and_changes_nothing(llama, name, batches):
    """Vaccine's, RepNoise's and NPO's held-out probes (the alignment monitor's) log what a
    training micro-step on the same batches logs (RepNoise: with the same noise, drawn from a
    generator seeded PROBE_NOISE_SEED), draw no random number from the global stream, and leave
    θ bit-identical and p.grad empty."""
    from inoculate.defenses.repnoise import PROBE_NOISE_SEED

    model = _model(llama, lora=True)
    b = batches()
    d = _defense(name, model)
    with torch.no_grad():  # NPO: away from the reference, so its terms are not at their start values
        for p in d.params:
            p.add_(0.01 * torch.randn_like(p))
    before = [p.detach().clone() for p in d.params]
    rng = torch.get_rng_state()
    probed = d.probe(b, at_point=lambda: pytest.fail(f"{name} simulates no attack"))
    assert torch.equal(torch.get_rng_state(), rng), "the probe drew a random number"
    assert all(torch.equal(p, q) for p, q in zip(d.params, before))
    assert all(p.grad is None for p in d.params)
    torch.manual_seed(PROBE_NOISE_SEED)
    trained = d.accumulate(b, scale=1.0)
    assert set(trained) <= set(probed)
    for k, v in trained.items():
        assert math.isclose(probed[k], v, rel_tol=1e-5, abs_tol=1e-6), k
    if name == "vaccine":
        assert probed["perturbation_gap"] == pytest.approx(probed["loss"] - probed["clean_loss"])
        assert probed["perturbation_gap"] > 0


# ---------------------------------------------------------------------------------------------
# TAR
# ---------------------------------------------------------------------------------------------

def _neg_entropy(logits, labels):
    keep = labels[:, 1:] != -100
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)[keep]
    return (lp.exp() * lp).sum(-1).mean()


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_tar_gradient_matches_hand_inner_loop(llama, opt):
    model = _model(llama, lora=True)
    K, b, lr = 2, 2, (0.5 if opt == "sgd" else 0.01)
    adv_ex = _examples(K * b, 11)
    tamper, retain = _batch(3, 12), _batch(3, 13)
    d = _defense("tar", model, inner_steps=K, tamper_every=1, inner_lrs=[lr], inner_optimizer=opt,
                 adversary_batch_size=b, tamper_weight=4.0, retain_weight=1.0)
    assert d.passes_per_step == K + K + 1
    params = d.params
    before = [p.detach().clone() for p in params]
    d.accumulate({"adversary": collate(adv_ex, PAD), "tamper": tamper, "retain": retain}, scale=1.0)
    got = [p.grad.clone() for p in params]
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # restored bit-exactly

    adv = copy.deepcopy(model)
    aparams = _params(adv)
    inner = (torch.optim.SGD(aparams, lr=lr) if opt == "sgd"
             else torch.optim.AdamW(aparams, lr=lr, weight_decay=0.0))
    w = [math.exp(0.0625 * (k - K + 1)) for k in range(K)]
    w = [x / sum(w) for x in w]
    acc = [torch.zeros_like(p) for p in aparams]
    for k in range(K):
        batch = collate(adv_ex[k * b:(k + 1) * b], PAD)
        inner.zero_grad()
        hand_ce(_logits(adv, batch), batch["labels"]).backward()
        inner.step()
        gt = _grad(_neg_entropy(_logits(adv, tamper), tamper["labels"]), aparams)
        acc = [a + w[k] * g for a, g in zip(acc, gt)]
    g_r = _grad(hand_ce(_logits(model, retain), retain["labels"]), params)
    want = [4.0 * a + r for a, r in zip(acc, g_r)]
    _assert_close(got, want, rtol=1e-3, atol=1e-6)
    # the adversary moved: the tamper gradient at its weights differs from the one at θ
    g_at_theta = _grad(_neg_entropy(_logits(model, tamper), tamper["labels"]), params)
    assert _rel(acc, g_at_theta) > 1e-2


def test_tar_probe_runs_the_strongest_adversary_without_drawing_a_random_number(llama):
    """TAR's probe: K AdamW steps at the largest inner lr, each on the whole held-out harmful
    batch (torch's AdamW by hand), the tamper loss at the adversary's last weights, at_point()
    called there once; θ restored bit-exactly, p.grad empty, the RNG stream untouched."""
    model = _model(llama, lora=True)
    adversary, tamper, retain = _batch(3, 11), _batch(3, 12), _batch(3, 13)
    d = _defense("tar", model, inner_steps=2, tamper_every=1, inner_lrs=[1e-3, 1e-2], inner_optimizer="adamw")
    before = [p.detach().clone() for p in d.params]
    rng = torch.get_rng_state()
    seen = []
    probed = d.probe({"adversary": adversary, "tamper": tamper, "retain": retain},
                     at_point=_recording_point(d, seen))
    assert torch.equal(torch.get_rng_state(), rng), "the probe drew a random number"
    assert all(torch.equal(p, q) for p, q in zip(d.params, before))
    assert all(p.grad is None for p in d.params)
    adv = copy.deepcopy(model)
    aparams = _params(adv)
    inner = torch.optim.AdamW(aparams, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(2):
        inner.zero_grad()
        loss = hand_ce(_logits(adv, adversary), adversary["labels"])
        losses.append(loss.item())
        loss.backward()
        inner.step()
    assert len(seen) == 1 and probed["point/x"] == 1.0
    _assert_close(seen[0], [p.detach() for p in aparams], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        end = _neg_entropy(_logits(adv, tamper), tamper["labels"]).item()
        start = _neg_entropy(_logits(model, tamper), tamper["labels"]).item()
        retain_loss = hand_ce(_logits(model, retain), retain["labels"]).item()
    want = {"tamper_loss_end": end, "tamper_loss_start": start, "retain_loss": retain_loss,
            "adversary_loss_first": losses[0], "adversary_loss_last": losses[1]}
    for k, v in want.items():
        assert math.isclose(probed[k], v, rel_tol=1e-4), k
    assert probed["adversary_loss_last"] < probed["adversary_loss_first"]


def test_tar_weights_and_config_checks():
    w = tamper_weights(64, 4, 0.0625)
    assert sorted(w) == list(range(3, 64, 4)) and abs(sum(w.values()) - 1) < 1e-12
    assert w[63] / w[59] == pytest.approx(math.exp(0.25))
    from inoculate.config import ConfigError

    with pytest.raises(ConfigError, match="never take"):
        TARConfig(inner_steps=2, tamper_every=4)
    assert TARConfig().inner_lrs == [2e-6, 2e-5, 4e-5] and BoosterConfig().lam == 5.0
    assert VaccineConfig().rho == 2.0 and RepNoiseConfig().beta == 0.001 and NPOConfig().beta == 0.1

