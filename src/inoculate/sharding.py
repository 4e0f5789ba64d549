"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``), and the few places the
engine and the defenses must know about it.

With ``fully_shard`` every parameter becomes a DTensor: each process holds one shard (dim 0
split across processes) and FSDP all-gathers a layer's weights just before its forward and
backward, then frees them. After a backward, FSDP has reduce-scattered the gradient with a
mean over processes, so ``p.grad`` is a DTensor sharded like ``p`` and holds this process's
shard of the *global-batch* gradient. What follows from that:

* gradients are never all-reduced again by our code (the engine's final all-reduce and the
  look-ahead defenses' all-reduce of intermediate gradients are skipped);
* a norm or a dot product over parameters is a sum over local shards followed by one
  all-reduce of that scalar (:func:`sum_over_shards`);
* element-wise updates (a move θ += s·d, its exact restore, the optimizer) act on the local
  shards only, with no communication;
* ``torch.autograd.grad`` with respect to sharded parameters returns nothing useful (the
  forward runs on the all-gathered copies), so intermediate gradients are taken by a plain
  backward into ``p.grad`` (:meth:`inoculate.defenses.base.Defense.grads`);
* saving gathers full tensors (:func:`full`, a collective: every process must call it in the
  same order) and only rank 0 writes; loading cuts a full tensor into this process's shard
  (:func:`shard_like`, no communication).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import torch

log = logging.getLogger(__name__)

try:  # DTensor is in torch >= 2.4; builds without torch.distributed have none
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether these tensors (parameters or their gradients) are FSDP-sharded DTensors.
    All of them or none: a model half sharded is a setup error."""
    flags = {is_dtensor(t) for t in tensors}
    if len(flags) > 1:
        raise RuntimeError("some parameters are FSDP-sharded and others are not; shard the whole "
                           "model (inoculate.sharding.shard_model) before defense.setup and train")
    return flags == {True}


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def sum_over_shards(value: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`value` is a sum computed over the local shards of `tensors`: when they are sharded,
    all-reduce it (SUM) over the processes of their mesh so it is the global sum; otherwise
    return it unchanged. Not differentiable across processes (no second-order under FSDP)."""
    first = next((t for t in tensors if is_dtensor(t)), None)
    if first is None:
        return value
    import torch.distributed as dist

    mesh = first.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError("only a 1-D device mesh (plain FSDP, no HSDP/TP) is supported")
    value = value.detach().to(local(first).device, copy=True)  # NCCL reduces device tensors
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return value


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered for a DTensor (a collective), else `t` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a full tensor, identical on every process) as `like` holds it: cut into this
    process's shard when `like` is a DTensor (no communication), else moved to its device."""
    if is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=like.to_local().device)
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value.to(like.device)


def decoder_layers(model: torch.nn.Module) -> list:
    """The repeated blocks to shard one by one: modules whose class is one the transformers
    model names in `_no_split_modules` (its decoder layer), the same rule accelerate's
    transformer-based FSDP wrapping uses."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__} to shard "
                         f"(_no_split_modules={sorted(names)})")
    return layers


def shard_model(model: torch.nn.Module, device: Optional[torch.device] = None) -> torch.nn.Module:
    """Shard `model` in place with FSDP2 over all processes of the default group: each decoder
    layer is one FSDP unit, the rest (embeddings, final norm, LM head) the root unit, which is
    the transformers model itself (under peft's wrapper, the wrapper holds no parameters of its
    own). Call after LoRA is added: a unit mixes frozen base weights and trainable LoRA weights,
    which FSDP2 supports (each parameter is sharded on its own; gradients are reduced only for
    the parameters that have one). Call before `defense.setup` and before the optimizer is made
    (the parameters are replaced by DTensors). Returns `model`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model needs torch.distributed initialized (torchrun / accelerate launch)")
    if device is None:
        device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(base, mesh=mesh)
    return model


def gathered_state_dict(model: torch.nn.Module, trainable_only: bool, keep: bool) -> dict:
    """The model's state dict with full (unsharded) CPU tensors, for saving by one process.

    A collective when the model is sharded: every process must call it. Tensors are gathered
    one at a time and only kept where `keep` is true (rank 0), so other processes never hold
    the whole model. `trainable_only` keeps only the parameters that require a gradient (what
    a LoRA adapter's save needs). Tensors shared between keys (tied embeddings) stay shared."""
    wanted = None
    if trainable_only:
        wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    out: dict = {}
    seen: dict = {}
    for name, value in model.state_dict(keep_vars=True).items():  # tied weights: one object
        if wanted is not None and name not in wanted:
            continue
        key = id(value)
        if key not in seen:
            gathered = full(value.detach())
            seen[key] = gathered.cpu().clone() if keep else None
            del gathered
        if keep:
            out[name] = seen[key]
    return out
