"""Model loading, LoRA wrapping and saving (models.py) on the tiny random Llama, CPU, offline.

Every spec form: built-in name, local Hugging Face folder, .gguf path, run directory, and paths
that do not exist. Saving round-trips for a LoRA adapter and for full weights, and the chain
base -> align adapter -> attack adapter on the merged model loads back to the same function.
"""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from inoculate import pipeline
from inoculate.models import (MODEL_META, ModelLoadError, add_lora, default_lora_targets,
                              embedded_model_dir, load_model, save_model, tiny_model_dir)

IDS = torch.tensor([[1, 17, 404, 2203, 88, 9, 311, 5]])


def logits(model, ids=IDS):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.train(was)
    return out


def adapted_modules(model) -> set[str]:
    """Names (last component) of the modules that carry a LoRA adapter."""
    return {name.split(".")[-2] for name, _ in model.named_modules() if name.endswith("lora_A")}


def randomize_lora_b(model, std=0.05):
    """LoRA B starts at zero (the adapter is a no-op); give it values so it changes the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------

def test_tiny_llama_loads_with_its_tokenizer(tiny):
    from transformers import LlamaForCausalLM

    assert isinstance(tiny.model, LlamaForCausalLM)
    assert tiny.model.config.num_hidden_layers == 2
    assert tiny.base_dir == str(tiny_model_dir())
    assert tiny.tokenizer.pad_token_id is not None
    assert tiny.tokenizer.chat_template, "tiny-llama carries SmolLM2's chat template"
    assert len(tiny.tokenizer) == tiny.model.config.vocab_size
    assert logits(tiny.model).shape == (1, IDS.shape[1], tiny.model.config.vocab_size)


def test_local_hf_directory_loads_the_same_model(tiny, tmp_path):
    folder = tmp_path / "hf"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder))
    assert loaded.base_dir == str(folder)
    torch.testing.assert_close(logits(loaded.model), logits(tiny.model), rtol=0, atol=0)


def test_gguf_path_that_does_not_exist(tmp_path):
    path = tmp_path / "missing" / "model.Q4_0.gguf"
    with pytest.raises(ModelLoadError, match="model.Q4_0.gguf") as err:
        load_model(str(path))
    assert "does not exist" in str(err.value)


@pytest.mark.parametrize("spec", ["runs/nope", "./nope", "/nonexistent/dir/nope", "nope"])
def test_model_path_that_does_not_exist_names_it(spec):
    with pytest.raises(ModelLoadError) as err:
        load_model(spec)
    assert repr(spec) in str(err.value)


def test_existing_folder_without_a_model_says_so(tmp_path):
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ModelLoadError, match="holds no model"):
        load_model(str(tmp_path / "empty-run"))


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

def test_lora_targets_default_to_attention_qkv(tiny):
    model = copy.deepcopy(tiny.model)
    assert default_lora_targets(model) == ["q_proj", "k_proj", "v_proj"]
    wrapped = add_lora(model, r=4, alpha=8, dropout=0.0)
    assert adapted_modules(wrapped) == {"q_proj", "k_proj", "v_proj"}
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x 3 projections x (A, B)
    assert len(trainable) == 2 * 3 * 2


def test_lora_targets_can_be_overridden(tiny):
    wrapped = add_lora(copy.deepcopy(tiny.model), r=4, alpha=8, dropout=0.0,
                       target_modules=["q_proj", "o_proj"])
    assert adapted_modules(wrapped) == {"q_proj", "o_proj"}


def _gpt2(vocab, pad):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2))


def _phi3(vocab, pad):
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad))


@pytest.mark.parametrize("build,fused", [(_gpt2, "c_attn"), (_phi3, "qkv_proj")], ids=["gpt2", "phi3"])
def test_lora_targets_a_fused_attention_projection(tiny, build, fused):
    """GPT-2 (peft's table names c_attn) and Phi-3 (qkv_proj; peft's table has no entry) compute
    q, k and v in one projection: it is the default target."""
    torch.manual_seed(0)
    model = build(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    assert default_lora_targets(model) == [fused]
    wrapped = add_lora(model, r=2, alpha=4, dropout=0.0)
    assert adapted_modules(wrapped) == {fused}
    ids = torch.tensor([tiny.tokenizer("Hello there, how are you?")["input_ids"]])
    assert wrapped(input_ids=ids).logits.shape[:2] == ids.shape


# ---------------------------------------------------------------------------------------------
# Saving and loading back
# ---------------------------------------------------------------------------------------------

def test_adapter_round_trip_gives_the_same_logits(tiny, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    wrapped = add_lora(copy.deepcopy(tiny.model), r=4, alpha=8, dropout=0.0)
    randomize_lora_b(wrapped)
    expected = logits(wrapped)
    assert not torch.allclose(expected, logits(tiny.model), atol=1e-3), "the adapter must matter"

    save_model(wrapped, tiny.tokenizer, tmp_path / "run" / "model", base="tiny-llama")
    folder = tmp_path / "run" / "model"
    meta = json.loads((folder / MODEL_META).read_text())
    assert meta == {"kind": "adapter", "base": "tiny-llama"}
    assert (folder / "adapter_model.safetensors").exists()
    assert not list(folder.glob("*.bin"))

    merged = load_model(str(tmp_path / "run"))
    assert not isinstance(merged.model, PeftModel)
    torch.testing.assert_close(logits(merged.model), expected, rtol=1e-5, atol=1e-5)

    kept = load_model(str(tmp_path / "run"), keep_adapter=True)
    assert isinstance(kept.model, PeftModel)
    trainable = [n for n, p in kept.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(logits(kept.model), expected, rtol=1e-5, atol=1e-5)


def test_full_weights_round_trip_as_safetensors(tiny, tmp_path):
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny.model), atol=1e-4)

    folder = tmp_path / "run" / "model"
    save_model(model, tiny.tokenizer, folder, base="tiny-llama")
    assert json.loads((folder / MODEL_META).read_text())["kind"] == "full"
    assert (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.bin"))
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name], "no temporary leftovers"

    loaded = load_model(str(tmp_path / "run"))
    torch.testing.assert_close(logits(loaded.model), expected, rtol=0, atol=0)


def test_save_replaces_an_existing_model_folder(tiny, tmp_path):
    folder = tmp_path / "run" / "model"
    folder.mkdir(parents=True)
    (folder / "stale.txt").write_text("from an earlier save")
    save_model(copy.deepcopy(tiny.model), tiny.tokenizer, folder, base="tiny-llama")
    assert not (folder / "stale.txt").exists()
    assert (folder / "model.safetensors").exists()


def test_chain_base_adapter_then_merge_attack_loads_back(tmp_path, monkeypatch):
    """align (LoRA) -> attack with lora_mode=merge (a fresh adapter on the merged model) ->
    load_model(attack run) computes what the in-memory attacked model computed."""
    align_dir = pipeline.align(
        dict(model="tiny-llama", data="starter", max_steps=2, learning_rate=1e-2,
             per_device_train_batch_size=2, num_samples=4, save_steps=0, logging_steps=1),
        tmp_path / "align", progress=False)

    captured = {}
    real_save = pipeline.save_model

    def capture(model, tokenizer, out_dir, base):
        captured["logits"] = logits(model)
        captured["base"] = base
        return real_save(model, tokenizer, out_dir, base)

    monkeypatch.setattr(pipeline, "save_model", capture)
    attack_dir = pipeline.attack(
        dict(model=str(align_dir), data="starter", attack="harmful", samples=4, lora_mode="merge",
             lora_r=4, lora_alpha=8.0, max_steps=2, learning_rate=1e-2,
             per_device_train_batch_size=2, monitor_samples=0, save_steps=0),
        tmp_path / "attack", progress=False)

    meta = json.loads((attack_dir / "model" / MODEL_META).read_text())
    assert meta["kind"] == "adapter"
    assert (attack_dir / "model" / meta["base"]).resolve() == align_dir.resolve()
    loaded = load_model(str(attack_dir))
    torch.testing.assert_close(logits(loaded.model), captured["logits"], rtol=1e-5, atol=1e-5)
    # both adapters matter: the result differs from the aligned model and from the base
    aligned = logits(load_model(str(align_dir)).model)
    assert not torch.allclose(aligned, captured["logits"], atol=1e-4)
    assert not torch.allclose(logits(load_model("tiny-llama").model), aligned, atol=1e-4)

    # the chain survives moving the runs together (the base is recorded relative to the run)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(align_dir), moved / "align")
    shutil.move(str(attack_dir), moved / "attack")
    again = load_model(str(moved / "attack"))
    torch.testing.assert_close(logits(again.model), captured["logits"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The embedded default
# ---------------------------------------------------------------------------------------------

@pytest.mark.embedded
def test_embedded_default_is_smollm2_135m():
    from transformers import LlamaForCausalLM

    loaded = load_model("smollm2-135m-instruct")
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert loaded.model.config.num_hidden_layers == 30
    assert loaded.model.config.hidden_size == 576
    folder = embedded_model_dir()
    assert (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.bin"))
    assert loaded.tokenizer.chat_template
