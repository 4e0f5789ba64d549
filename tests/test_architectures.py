"""Every defense trains through the engine on tiny random models of the families users bring
(Llama, the tiny-llama test model; Qwen2; Gemma2 with its logit soft-capping and (1 + w) norms;
Phi-3 with its fused qkv_proj; GPT-NeoX and Falcon with their fused query_key_value and parallel
residual), LoRA on the default targets and all weights: the engine runs, every loss is finite and
every trainable parameter moves. GPT-2's and OPT's layer lookup is in test_baselines.py."""
import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import transformers as T

from inoculate.defenses import get_defense
from inoculate.models import add_lora, load_model
from inoculate.training import Stream, TrainingArgs, train

PAD = 0
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "llama": lambda v: load_model("tiny-llama").model,
    "qwen2": lambda v: T.Qwen2ForCausalLM(T.Qwen2Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True, **SHAPE)),
    "gemma2": lambda v: T.Gemma2ForCausalLM(T.Gemma2Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, head_dim=8, **SHAPE)),
    "phi3": lambda v: T.Phi3ForCausalLM(T.Phi3Config(
        vocab_size=v, intermediate_size=64, num_key_value_heads=2, pad_token_id=PAD, **SHAPE)),
    "gpt_neox": lambda v: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=v, intermediate_size=64, **SHAPE)),
    "falcon": lambda v: T.FalconForCausalLM(T.FalconConfig(vocab_size=v, **SHAPE)),
}
DEFENSES = ["sft", "ctrap", "seam", "vaccine", "booster", "repnoise", "npo", "tar"]
SMALL = {"tar": dict(inner_steps=2, tamper_every=2, inner_lrs=[1e-3]), "repnoise": dict(beta=0.01),
         "ctrap": dict(harmful_batch_size=2)}


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-llama").tokenizer  # CTRAP's collapse token comes from a real tokenizer


@pytest.fixture(scope="module")
def bases(tokenizer):
    out = {}
    for name, build in FAMILIES.items():
        torch.manual_seed(0)
        out[name] = build(len(tokenizer))
    return out


def _examples(n, seed, paired=False):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(10, 1000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    out = []
    for _ in range(n):
        prompt = seq(3, 7)
        enc = [{"input_ids": prompt + a, "labels": [-100] * len(prompt) + a}
               for a in [seq(3, 8) for _ in range(2 if paired else 1)]]
        out.append({"harmful": enc[0], "refusal": enc[1]} if paired else enc[0])
    return out


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("defense", DEFENSES)
def test_every_defense_trains_on_each_family(bases, tokenizer, tmp_path, family, defense, lora):
    model = copy.deepcopy(bases[family])
    model.train()
    if lora:
        torch.manual_seed(0)
        model = add_lora(model, r=4, alpha=8, dropout=0.0)  # the default targets of this family
    else:
        model.requires_grad_(True)
    cls = get_defense(defense)
    d = cls(cls.config_class(**SMALL.get(defense, {})), batch_size=2)
    d.setup(model, tokenizer)
    pairs = _examples(8, 1, paired=True)
    data = {"align": [p["refusal"] for p in pairs], "harmful": [p["harmful"] for p in pairs],
            "general": _examples(8, 2), "paired": pairs}
    streams = {k: Stream(k, data[s.role], s.batch_size, PAD, seed=0, paired=s.role == "paired")
               for k, s in d.streams().items()}
    before = [(n, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad]
    steps = 2 if lora else 1  # LoRA's B starts at zero: A gets its first gradient at step 2
    args = TrainingArgs(max_steps=steps, learning_rate=1e-3, weight_decay=0.0, save_steps=0,
                        logging_steps=1, bf16="false")
    result = train(model, d, streams, args, tmp_path, main_stream=next(iter(d.streams())), progress=False)
    assert result.steps == steps
    assert all(math.isfinite(v) for v in result.last_logs.values() if isinstance(v, float))
    now = dict(model.named_parameters())
    unchanged = [n for n, p in before if torch.equal(now[n].detach(), p)]
    assert not unchanged, f"{defense} on {family}: parameters not trained: {unchanged[:3]}"
