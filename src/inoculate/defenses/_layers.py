"""Finding a decoder's layers, attention blocks, MLP blocks and logit lens, without class names.

Defenses that act on activations (Vaccine perturbs attention outputs, RepNoise reads MLP
outputs, the SEAM/RepNoise ascent term reads every hidden state through the output head) need
these modules for any causal LM. Hard-coding paths such as ``model.model.layers[i].self_attn``
ties a defense to one family, so the modules are found from the structure:

* decoder layers: the outermost ``nn.ModuleList`` whose length is the config's
  ``num_hidden_layers`` and whose entries are all of one class and hold weight matrices
  (Llama/Mistral/Qwen/Gemma ``model.layers``, GPT-2 ``transformer.h``, GPT-NeoX
  ``gpt_neox.layers``, ...). A list of experts inside a layer is never chosen, as the outer
  list wins.
* attention block of a layer: among the layer's direct children that hold at least two weight
  matrices (norms hold only vectors, so ``post_attention_layernorm`` is never a candidate), the
  one that carries a head count/size attribute (``head_dim``, ``num_heads``, ...) or whose name
  says attention (``self_attn``, ``attn``, ``attention``, ``self_attention``); cross-attention
  is excluded by name.
* MLP block: the one remaining child with weight matrices once the attention is removed; when
  several remain, the one named like an MLP (``mlp``, ``ffn``, ``feed_forward``, ``moe``).
* final norm: a child with a known norm name (``norm``, ``final_layernorm``,
  ``final_layer_norm``, ``ln_f``, ``norm_f``) and no weight matrix, on the layers' parent module
  (``model.norm``, ``transformer.ln_f``, OPT's ``decoder.final_layer_norm``, which sits *before*
  the layer list), or on the decoder stack or the LM when the layers are not found; else the
  first child of the layers' parent after the layer list that holds only vector parameters.
* logit lens: :func:`logit_lens_sum`, the one implementation of the per-depth answer CE that
  SEAM's L_ul and RepNoise's S_harm share.
* the final norm's input (the last residual stream): :func:`final_norm_input`, a forward pre-hook
  held for one block, which CTRAP's collapse_rms term and scripts/trap_probe.py read.

Everything works through PEFT wrappers (``PeftModel``): LoRA layers wrap the projections but
keep the attention/MLP modules and their names. When a rule finds nothing, or finds two
things, the error names the model class and what was seen.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, List, Optional, Tuple

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from ..data.encode import IGNORE_INDEX

_ATTN_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_CROSS_NAME = re.compile(r"cross|encdec|encoder", re.IGNORECASE)
_MLP_NAME = re.compile(r"mlp|ffn|feed_?forward|moe", re.IGNORECASE)
_HEAD_ATTRS = ("head_dim", "head_size", "num_heads", "num_attention_heads", "n_head", "n_heads")
#: attribute names of the final norm (Llama/Mistral/Qwen/Gemma: norm; Phi: final_layernorm;
#: GPT-NeoX, OPT's decoder: final_layer_norm; GPT-2/Falcon/Bloom: ln_f; Mamba: norm_f)
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


class LayerLookupError(ValueError):
    """The module structure does not fit the rules; the message names the model class."""


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT wrappers (PeftModel -> LoraModel -> XForCausalLM)."""
    seen = 0
    while hasattr(model, "get_base_model") and seen < 4:
        inner = model.get_base_model()
        if inner is model:
            break
        model, seen = inner, seen + 1
    return model


def _n_matrices(module: nn.Module) -> int:
    return sum(1 for p in module.parameters() if p.dim() >= 2)


def _num_layers(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def _layers_with_name(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    base = unwrap(model)
    n = _num_layers(base)
    candidates = []
    for name, mod in base.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if n is not None and len(mod) != n:
            continue
        if len({type(m) for m in mod}) != 1 or not all(_n_matrices(m) >= 2 for m in mod):
            continue
        candidates.append((name, mod))
    # outermost lists only: a list nested inside a candidate (MoE experts) is part of a layer
    outer = [(n_, m) for n_, m in candidates
             if not any(n_ != o and n_.startswith(o + ".") for o, _ in candidates)]
    if n is None and outer:  # no layer count in the config: the longest homogeneous list
        longest = max(len(m) for _, m in outer)
        outer = [(n_, m) for n_, m in outer if len(m) == longest]
    if len(outer) != 1:
        found = ", ".join(f"{n_} ({len(m)} x {type(m[0]).__name__})" for n_, m in outer) or "none"
        raise LayerLookupError(
            f"cannot find the decoder layers of {type(base).__name__}: looked for one ModuleList "
            f"of {n if n is not None else 'any number of'} identical blocks with weight matrices; "
            f"found {found}")
    return outer[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (one per ``num_hidden_layers``)."""
    return _layers_with_name(model)[1]


def _blocks(layer: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Direct children of a layer that hold at least two weight matrices."""
    return [(n, c) for n, c in layer.named_children() if _n_matrices(c) >= 2]


def _is_attention(name: str, module: nn.Module) -> bool:
    if _CROSS_NAME.search(name):
        return False
    return bool(_ATTN_NAME.search(name)) or any(
        isinstance(getattr(module, a, None), int) for a in _HEAD_ATTRS)


def _attention_of(model: nn.Module, layer: nn.Module) -> Tuple[str, nn.Module]:
    blocks = _blocks(layer)
    found = [(n, c) for n, c in blocks if _is_attention(n, c)]
    if len(found) > 1:  # prefer the one both named and shaped like attention
        both = [(n, c) for n, c in found if _ATTN_NAME.search(n)
                and any(isinstance(getattr(c, a, None), int) for a in _HEAD_ATTRS)]
        found = both if both else found
    if len(found) != 1:
        raise LayerLookupError(
            f"cannot find the attention block in {type(layer).__name__} of "
            f"{type(unwrap(model)).__name__}: children with weight matrices are "
            f"{[f'{n}: {type(c).__name__}' for n, c in blocks]}, of which "
            f"{[n for n, _ in found] or 'none'} look like self-attention")
    return found[0]


def attention_modules(model: nn.Module) -> List[nn.Module]:
    """One self-attention block per decoder layer, in order."""
    return [_attention_of(model, layer)[1] for layer in decoder_layers(model)]


def mlp_modules(model: nn.Module) -> List[nn.Module]:
    """One MLP (feed-forward, or mixture-of-experts) block per decoder layer, in order."""
    out = []
    for layer in decoder_layers(model):
        attn_name, _ = _attention_of(model, layer)
        rest = [(n, c) for n, c in _blocks(layer) if n != attn_name and not _is_attention(n, c)]
        if len(rest) > 1:
            rest = [(n, c) for n, c in rest if _MLP_NAME.search(n)]
        if len(rest) != 1:
            raise LayerLookupError(
                f"cannot find the MLP block in {type(layer).__name__} of "
                f"{type(unwrap(model)).__name__}: children with weight matrices besides the "
                f"attention are {[f'{n}: {type(c).__name__}' for n, c in _blocks(layer) if n != attn_name]}"
                f" (an MLP that is not one submodule, as in OPT, is not supported)")
        out.append(rest[0][1])
    return out


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last layer's output before the LM head (through PEFT wrappers).

    Looked up by name (:data:`_FINAL_NORM_NAMES`, a module without weight matrices) on the parent
    of the decoder layers, then on the decoder stack (``base_model``, its ``decoder``) and on the
    LM itself; failing that, the first child of the layers' parent after the layer list that
    holds only vector parameters. The error names the model class and where it looked."""
    base = unwrap(model)
    try:
        name, layers = _layers_with_name(base)
        parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
    except LayerLookupError:
        layers = parent = None
    inner = getattr(base, "base_model", None)
    owners = [parent, inner, getattr(inner, "decoder", None), base]
    for owner in owners:
        if not isinstance(owner, nn.Module):
            continue
        for attr in _FINAL_NORM_NAMES:
            module = getattr(owner, attr, None)
            if isinstance(module, nn.Module) and _n_matrices(module) == 0:
                return module
    if parent is not None:
        after = False
        for _, child in parent.named_children():
            if child is layers:
                after = True
                continue
            params = list(child.parameters())
            if after and params and all(p.dim() == 1 for p in params):
                return child
    seen = sorted({type(o).__name__ for o in owners if isinstance(o, nn.Module)})
    raise LayerLookupError(
        f"cannot find the final norm of {type(base).__name__}: no module named "
        f"{', '.join(_FINAL_NORM_NAMES)} on {', '.join(seen)}"
        + (f", and no child of {type(parent).__name__} after the layer list holds only vector "
           f"parameters" if parent is not None else ", and its decoder layers were not found")
        + "; the logit lens (SEAM's L_ul, RepNoise's S_harm) reads every hidden state through it")


def output_head(model: nn.Module) -> nn.Module:
    """The LM head (``get_output_embeddings()``), through PEFT wrappers."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise LayerLookupError(f"{type(base).__name__} has no output embeddings (LM head)")
    return head


def first_tensor(output):
    """A module's output tensor: the output itself, or the first element of a tuple/ModelOutput."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(f"module output of type {type(output).__name__} has no leading tensor")


def replace_first(output, tensor):
    """The same output structure with its leading tensor replaced."""
    if torch.is_tensor(output):
        return tensor
    if isinstance(output, tuple):
        return (tensor,) + tuple(output[1:])
    output = list(output)
    output[0] = tensor
    return output


def answer_rows(hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of `hidden` at positions that predict an answer token, and those tokens.

    Position t predicts token t+1 (causal LM), so a row is kept where labels[:, t+1] != -100."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def answer_labels(batch: dict) -> torch.Tensor:
    """The batch's labels with -100 wherever ``answer_mask`` is off: in a paired batch, the answer
    tokens where the harmful and refusal sequences differ. Without an answer mask, the labels."""
    labels = batch["labels"]
    if "answer_mask" in batch:
        labels = labels.masked_fill(~batch["answer_mask"].bool(), IGNORE_INDEX)
    return labels


def ce_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of rows of logits [N, V]; half precisions are upcast to fp32 (fp64 stays)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets)


@contextlib.contextmanager
def recorded_outputs(module: nn.Module) -> Iterator[list]:
    """A list that collects `module`'s forward outputs while the block runs."""
    captured: list = []
    handle = module.register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def final_norm_input(model, active: bool = True):
    """A list that collects the input of `model`'s final norm (:func:`final_norm`: the last
    residual stream, before the LM head) while the block runs; nothing is hooked when not
    `active`. CTRAP's collapse_rms term reads it."""
    seen: list = []
    if not active:
        yield seen
        return
    handle = final_norm(model).register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(args[0] if args else next(iter(kwargs.values()))),
        with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def logit_lens_sum(model: nn.Module, outputs, labels: torch.Tensor, *,
                   normed: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """(S, n): the target-token cross-entropy read at every depth through the logit lens, summed,
    and the number of hidden states.

        S = CE(final logits) + Σ_{h ∈ H} CE(head(norm(h))),   n = len(outputs.hidden_states)

    H is every entry of ``outputs.hidden_states`` (the embedding output h_0, then each layer's
    output; run the model with ``output_hidden_states=True``). Each CE is the token mean over the
    targets of `labels` [B, T] (-100 elsewhere): the caller chooses the target tokens. The final
    layer counts twice (once as the logits, once as the last hidden state), as in the SEAM and
    RepNoise code: SEAM's L_ul = −log(1 + S/n), RepNoise's S_harm = S/n (:func:`logit_lens_ce`).

    The last hidden state is normed exactly once: transformers (4.x and 5.x) return it with the
    final norm already applied (5.x replaces the last layer's raw output by ``last_hidden_state``),
    so it goes through the head as is. Pass `normed`, the final norm's output recorded during the
    forward (:func:`recorded_outputs` on :func:`final_norm`), to check this rather than assume it:
    the entry that is that tensor skips the norm and every other entry is normed. Without it the
    last entry is taken as normed.

    Only the rows that predict a target go through the norm and the head (both act per token, so
    the numbers are those of the full sequence). Memory: each depth's targets x vocabulary logits
    are kept for backward, n of them: with a large vocabulary this is most of the step's memory
    (SmolLM2-135M at batch 4: about 4.9 GB of the step's 6.9 GB peak). When the model trains with
    activation checkpointing (`gradient_checkpointing=true`), each depth's head and cross-entropy
    are checkpointed too: only its rows are kept and the logits are recomputed in backward, one
    depth at a time; the values and gradients are the same. ``outputs.logits`` may cover only the
    last positions (a forward with ``logits_to_keep``) as long as those include every position
    that predicts a target; the hidden states and `labels` cover the whole sequence."""
    hidden_states = getattr(outputs, "hidden_states", None)
    if not hidden_states:
        raise ValueError("the logit lens needs the model run with output_hidden_states=True")
    norm, head = final_norm(model), output_head(model)
    logits, targets = answer_rows(outputs.logits, labels[:, -outputs.logits.shape[1]:])
    if targets.numel() == 0:
        raise ValueError("batch has no target tokens for the logit-lens loss (all labels are -100)")
    total = ce_rows(logits, targets)
    last = len(hidden_states) - 1

    def depth_ce(rows: torch.Tensor, already_normed: bool) -> torch.Tensor:
        return ce_rows(head(rows if already_normed else norm(rows)), targets)

    recompute = checkpointing(model) and torch.is_grad_enabled()
    for i, h in enumerate(hidden_states):
        if normed is None:
            already_normed = i == last
        else:
            already_normed = h is normed or (h.shape == normed.shape and torch.equal(h, normed))
        rows, _ = answer_rows(h, labels)
        if recompute:
            total = total + torch.utils.checkpoint.checkpoint(depth_ce, rows, already_normed, use_reentrant=False)
        else:
            total = total + depth_ce(rows, already_normed)
    return total, len(hidden_states)


def checkpointing(model: nn.Module) -> bool:
    """Whether the model trains with activation checkpointing (transformers marks the modules it
    checkpoints with `gradient_checkpointing = True`, in 4.x and 5.x alike)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def logit_lens_ce(model: nn.Module, outputs, labels: torch.Tensor) -> torch.Tensor:
    """RepNoise's S_harm, the same quantity as SEAM's L_ul sum over the number of hidden states:

    S = [CE(final logits) + Σ_{every hidden state h} CE(lm_head(norm(h)))] / n_hidden_states

    as in the RepNoise code and the method reference (the last hidden state, already normed,
    counts beside the final logits)."""
    s, n = logit_lens_sum(model, outputs, labels)
    return s / n
