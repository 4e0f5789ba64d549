"""The one training engine every defense and attack runs on.

Why a plain PyTorch loop and not a ``transformers.Trainer`` subclass: the look-ahead defenses
(CTRAP, Booster, SEAM, Vaccine, TAR) take several gradients per step at *moved* parameters
and combine them. Trainer's ``training_step`` assumes one loss and one backward, and DDP's
backward hooks would all-reduce every intermediate gradient at the wrong point. Here a defense
returns the combined gradient in ``p.grad``; the engine then all-reduces it once (when several
processes run), clips, steps the optimizer and the schedule, logs, and checkpoints.

With parameters sharded by FSDP2 (``AlignConfig.fsdp``, ``inoculate.sharding``) the same loop
runs on DTensors: FSDP has already reduce-scattered every gradient with a mean over processes,
so the engine's all-reduce is skipped; the gradient norm sums the local shards and all-reduces
that scalar; checkpoints gather full tensors (every process takes part, rank 0 writes) and
resuming cuts them back into this process's shards.

Per optimizer step:
    for each of gradient_accumulation_steps micro-steps:
        draw one batch from every stream the defense names
        defense.accumulate(batches, scale=1/accumulation)     (inside bf16 autocast if enabled)
    check every loss and the gradient norm are finite
    [all-reduce gradients, unless FSDP-sharded] -> clip -> optimizer.step -> scheduler.step
    log every logging_steps, checkpoint every save_steps (atomic), resume from the last one.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import ConfigError, doc
from .data.encode import collate, collate_paired
from .sharding import full, is_dtensor, is_sharded, local, shard_like, sum_over_shards

log = logging.getLogger(__name__)


@dataclass
class TrainingArgs:
    """Optimization fields; names follow transformers.TrainingArguments where one exists."""

    learning_rate: float = doc(5e-4, "peak learning rate (Huang-group alignment default 5e-4)")
    weight_decay: float = doc(0.1, "AdamW weight decay (Huang-group default 0.1)")
    num_train_epochs: float = doc(20.0, "epochs over the main stream (ignored when max_steps > 0)")
    max_steps: int = doc(-1, "optimizer steps to run; -1 derives them from num_train_epochs")
    per_device_train_batch_size: int = doc(10, "examples per micro-batch of the main stream")
    gradient_accumulation_steps: int = doc(1, "micro-batches summed into one optimizer step")
    lr_scheduler_type: str = doc("constant", "constant | linear | cosine | constant_with_warmup")
    warmup_ratio: float = doc(0.0, "fraction of steps spent warming the learning rate up")
    max_grad_norm: float = doc(0.0, "clip the global gradient norm to this; 0 disables clipping")
    optim: str = doc("adamw_torch", "adamw_torch | sgd")
    adam_beta1: float = doc(0.9, "AdamW beta1")
    adam_beta2: float = doc(0.999, "AdamW beta2")
    seed: int = doc(42, "seed for initialization, data order and dropout")
    bf16: str = doc("auto", "bf16 autocast: auto (on for CUDA, off on CPU) | true | false")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward to save memory")
    logging_steps: int = doc(10, "log losses every this many steps")
    save_steps: int = doc(50, "write a resumable checkpoint every this many steps (0: never)")
    report_to: str = doc("none", "extra loggers: none | tensorboard | wandb | tensorboard,wandb")


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN/inf. The message names it and the step."""


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------

class Stream:
    """An endless, deterministic, shuffled sequence of batches over encoded examples.

    Epoch e is the permutation drawn from (seed, name, e); the position is the number of
    batches already served, which is all a checkpoint needs to resume the same order. With
    several processes, each takes every world_size-th example of the permutation."""

    def __init__(self, name: str, examples: list, batch_size: int, pad_id: int, seed: int,
                 paired: bool = False, rank: int = 0, world_size: int = 1):
        if not examples:
            raise ValueError(f"stream {name!r} has no examples")
        if batch_size < 1:
            raise ValueError(f"stream {name!r}: batch size must be >= 1")
        self.name, self.examples, self.batch_size = name, examples, batch_size
        self.pad_id, self.seed, self.paired = pad_id, seed, paired
        self.rank, self.world_size = rank, world_size
        self.served = 0
        self._order: list[int] = []
        self._epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        per_rank = max(1, len(self.examples) // self.world_size)
        return max(1, math.ceil(per_rank / self.batch_size))

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(hash_seed(self.seed, self.name, epoch))
        order = torch.randperm(len(self.examples), generator=g).tolist()
        return order[self.rank::self.world_size] if self.world_size > 1 else order

    def next(self) -> dict:
        epoch, k = divmod(self.served, self.batches_per_epoch)
        if epoch != self._epoch:
            self._order, self._epoch = self._epoch_order(epoch), epoch
        idx = self._order[k * self.batch_size:(k + 1) * self.batch_size]
        if len(idx) < self.batch_size:  # wrap within the epoch so every batch is full
            idx = idx + self._order[: self.batch_size - len(idx)]
        self.served += 1
        items = [self.examples[i] for i in idx]
        if self.paired:
            return collate_paired([e["harmful"] for e in items], [e["refusal"] for e in items], self.pad_id)
        return collate(items, self.pad_id)


def hash_seed(*parts) -> int:
    import hashlib

    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    seconds: float
    last_logs: dict
    selected: Optional[dict] = None  # Selection.record() when a Selection chose the weights


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 or AMX). Without it (an
    AVX2-only CPU) bf16 autocast is emulated: on a 2-core AMD EPYC, SmolLM2-135M's training pass
    took 16.7 times as long in bf16 as in fp32 (benchmarks/bf16_cost.py, docs/benchmarks.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch build without oneDNN
        return False


def flush_cpu_denormals(device: torch.device) -> None:
    """On a CPU, treat subnormal floats (below 1.2e-38 in fp32) as zero from here on in this
    process (x86 FTZ/DAZ, torch.set_flush_denormal). A softmax over a 49k vocabulary makes them
    (0.5-1.7 % of the probabilities SEAM's logit lens reads on SmolLM2-135M), and the CPU's slow
    path for them made that pass up to five times slower, growing as the model sharpened
    (docs/benchmarks.md). Numbers that small do not move a loss or an update. GPUs are left
    alone."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


@functools.lru_cache(maxsize=None)
def _warn_emulated_bf16() -> None:  # once per process: training and its monitor both ask
    log.warning("bf16 autocast is on, but this CPU (%s) has no native bf16 matmul: it runs several "
                "times slower than fp32 here; set bf16: false (or auto, which is off on a CPU)",
                torch.backends.cpu.get_cpu_capability())


def use_bf16(args: TrainingArgs, device: torch.device) -> bool:
    value = str(args.bf16).lower()
    if value == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if value in ("true", "1", "yes"):
        if device.type == "cpu" and not cpu_has_native_bf16():
            _warn_emulated_bf16()
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"bf16 must be auto, true or false, got {args.bf16!r}")


def total_steps(args: TrainingArgs, main_stream: Stream) -> int:
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    per_epoch = math.ceil(main_stream.batches_per_epoch / args.gradient_accumulation_steps)
    steps = math.ceil(args.num_train_epochs * per_epoch)
    if steps < 1:
        raise ValueError("num_train_epochs and max_steps give zero training steps")
    return steps


def make_optimizer(params, args: TrainingArgs):
    if args.optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                                 betas=(args.adam_beta1, args.adam_beta2))
    if args.optim == "sgd":
        return torch.optim.SGD(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    raise ValueError(f"unknown optim {args.optim!r}; use adamw_torch or sgd")


def train(
    model: torch.nn.Module,
    defense,
    streams: Dict[str, Stream],
    args: TrainingArgs,
    run_dir: Path,
    main_stream: str,
    monitor: Optional[Callable[[torch.nn.Module], dict]] = None,
    progress: bool = True,
    selection: Optional["Selection"] = None,
) -> TrainResult:
    """Run the defense's objective to the end, resuming from run_dir/checkpoint if present.
    With a `selection`, the model ends with the weights of the logging step it chose."""
    from transformers import get_scheduler
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    flush_cpu_denormals(device)
    bf16 = use_bf16(args, device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    sharded = is_sharded(params)  # FSDP2: DTensor parameters, gradients reduced by FSDP itself
    optimizer = make_optimizer(params, args)
    n_steps = total_steps(args, streams[main_stream])
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=int(args.warmup_ratio * n_steps),
                              num_training_steps=n_steps)
    start = load_checkpoint(run_dir, named, optimizer, scheduler, streams, selection)
    # micro-steps already taken: amortized look-ahead defenses refresh on this count, and CTRAP's
    # simulated LoRA attacker draws its adapter from it, so a resumed run continues as it began
    defense.steps_seen = start * max(1, args.gradient_accumulation_steps)
    if start == 0:
        set_seed(args.seed)
    loggers = _Loggers(run_dir, args.report_to, resume_step=start)
    accumulation = max(1, args.gradient_accumulation_steps)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank0 = (not dist.is_available()) or (not dist.is_initialized()) or dist.get_rank() == 0
    t0 = time.time()
    logs: dict = {}
    reported: Dict[str, float] = {}  # the latest value of every loss a step reported
    on_monitor = selection is not None and selection.key.startswith(MONITOR_PREFIX)
    if on_monitor and monitor is None:
        raise ConfigError(f"select_by={selection.key!r} names a monitor value, but this run has no "
                          f"monitor (align: set monitor_samples > 0)")
    if monitor is not None and start == 0:
        values = {f"{MONITOR_PREFIX}{k}": v for k, v in monitor(model).items()}
        if on_monitor:  # the weights before any update are a candidate too
            selection.offer(0, values, named, updates=0)
        if rank0:
            loggers.write(0, values)
    bar = tqdm(range(start, n_steps), initial=start, total=n_steps, desc=f"{defense.name}",
               disable=not (progress and rank0), dynamic_ncols=True)
    for step in bar:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        for _ in range(accumulation):
            batches = {name: to_device(s.next(), device) for name, s in streams.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = defense.accumulate(batches, scale=1.0 / accumulation)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
        # each value is the mean over the micro-steps that reported it (amortized modes report
        # their look-ahead losses only on refresh micro-steps)
        sums = {k: v / counts[k] for k, v in sums.items()}
        bad = {k: v for k, v in sums.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(
                f"{defense.name}: non-finite loss at step {step + 1}: {bad}. Lower learning_rate, "
                f"check the data, or disable bf16; the last checkpoint in {run_dir} is kept")
        if world > 1 and not sharded:  # FSDP's reduce-scatter already took the mean over processes
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad.div_(world)
        grad_norm = _grad_norm(params)
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"{defense.name}: gradient norm is {grad_norm} at step {step + 1}; lower "
                f"learning_rate or disable bf16; the last checkpoint in {run_dir} is kept")
        done = step + 1
        logging_step = done % max(1, args.logging_steps) == 0 or done == n_steps
        # a loss this step did not report (an amortized look-ahead loss between refreshes) is
        # logged with its latest value, so a logging step that is not a refresh still shows it
        reported.update(sums)
        if selection is not None and not on_monitor:
            # the step's losses describe the weights it started from: those are the candidate
            own = dict(reported, grad_norm=grad_norm)
            if done == start + 1:
                selection.check(done, own)  # a misspelt key fails now, not at a logging step
            if logging_step:
                selection.offer(done, own, named, updates=done - 1)
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        logs = dict(reported, grad_norm=grad_norm, lr=scheduler.get_last_lr()[0],
                    elapsed_s=round(time.time() - t0, 2))
        bar.set_postfix({k: f"{v:.3g}" for k, v in list(logs.items())[:3]})
        if logging_step:
            if monitor is not None:  # measured on the weights after this step's update
                logs.update({f"{MONITOR_PREFIX}{k}": v for k, v in monitor(model).items()})
                if on_monitor:
                    selection.offer(done, logs, named, updates=done)
            if rank0:
                loggers.write(done, logs)
        if args.save_steps and done % args.save_steps == 0 and done < n_steps and (rank0 or sharded):
            # sharded: every process takes part in gathering the full tensors; rank 0 writes
            save_checkpoint(run_dir, done, named, optimizer, scheduler, streams, write=rank0,
                            selection=selection)
    loggers.close()
    chosen = None
    if selection is not None:
        chosen = selection.restore(named)
        log.info("%s: kept the weights after %d updates (%s = %.4g at step %d, the %s over the "
                 "logged steps)", defense.name, chosen["updates"], selection.key, chosen["value"],
                 chosen["step"], "lowest" if selection.mode == "min" else "highest")
    return TrainResult(steps=n_steps, resumed_from=start, seconds=time.time() - t0, last_logs=logs,
                       selected=chosen)


MONITOR_PREFIX = "monitor/"  # the logged name of every value the run's monitor returns
_LIMIT = re.compile(r"^\s*(\S+?)\s*(<=|>=)\s*(\S+)\s*$")


def parse_limit(text: str) -> tuple[str, str, float]:
    """`KEY<=NUMBER` or `KEY>=NUMBER` (a select_limits entry) as (key, operator, number)."""
    match = _LIMIT.match(str(text))
    try:
        if not match:
            raise ValueError
        return match[1], match[2], float(match[3])
    except ValueError:
        raise ConfigError(f"select_limits entry {text!r}: write KEY<=NUMBER or KEY>=NUMBER, e.g. "
                          f"monitor/collapse_token_share<=0.02") from None


class Selection:
    """Keeps the trainable weights of the logging step where the logged value `key` was lowest
    (mode "min") or highest ("max"); `train` puts them back at the end. The candidates are the
    logging steps (every `logging_steps` and the last), each with the weights its value was
    measured on: the losses a defense reports at step N (and grad_norm) are those of the weights
    step N started from, i.e. after N − 1 updates; a monitor value (`monitor/...`, measured on
    held-out data after the step's update) is that of the weights after N updates, and the
    weights before any update (step 0) are a candidate too. `limits` (`KEY<=NUMBER`,
    `KEY>=NUMBER`) leave out the candidates whose logged KEY breaks one (KEY must be logged with
    `key`: both monitor values or both step values); when every candidate broke one, `restore`
    fails instead of keeping weights the limits ruled out. The kept copy lives in CPU memory
    (one copy of the trainable weights) and in every checkpoint, so a resumed run selects among
    all its steps. Non-finite values are never selected. Among equal values the first such step
    is kept (`ties` "first") or the last ("last"). Not for FSDP-sharded parameters (the pipeline
    refuses select_by with fsdp)."""

    def __init__(self, key: str, mode: str = "min", limits=(), ties: str = "first"):
        if mode not in ("min", "max"):
            raise ValueError(f"selection mode must be min or max, got {mode!r}")
        if ties not in ("first", "last"):
            raise ValueError(f"selection ties must be first or last, got {ties!r}")
        self.key, self.mode, self.ties = key, mode, ties
        self.limit_texts = [str(t) for t in limits]
        self.limits = [parse_limit(t) for t in self.limit_texts]
        mixed = [k for k, _, _ in self.limits if k.startswith(MONITOR_PREFIX) != key.startswith(MONITOR_PREFIX)]
        if mixed:
            raise ConfigError(f"select_limits key(s) {mixed} and select_by={key!r} are logged at different "
                              f"points (monitor values after a step's update, step values before it): use "
                              f"both monitor values or both step values")
        self.step: Optional[int] = None
        self.updates: Optional[int] = None  # optimizer updates in the kept weights
        self.value: Optional[float] = None
        self.weights: Optional[Dict[str, torch.Tensor]] = None

    def offer(self, step: int, logs: dict, named, updates: int) -> None:
        """The weights `named` (after `updates` optimizer updates), logged at `step`."""
        self.check(step, logs)
        value = float(logs[self.key])
        if not math.isfinite(value) or not self.within_limits(logs):
            return
        if (self.value is None or (value < self.value if self.mode == "min" else value > self.value)
                or (self.ties == "last" and value == self.value)):
            self.step, self.value, self.updates = step, value, updates
            self.weights = {n: p.detach().to("cpu", copy=True) for n, p in named}

    def within_limits(self, logs: dict) -> bool:
        values = [float(logs[k]) for k, _, _ in self.limits]
        return all(math.isfinite(v) and (v <= bound if op == "<=" else v >= bound)
                   for v, (_, op, bound) in zip(values, self.limits))

    def check(self, step: int, logs: dict) -> None:
        """Raises a ConfigError naming the logged values when a key is not among them."""
        for key, what in [(self.key, "select_by"), *((k, "select_limits") for k, _, _ in self.limits)]:
            if key not in logs:
                raise ConfigError(f"{what}={key!r} is not among the values logged at step {step}: "
                                  f"{', '.join(sorted(logs))}")

    def restore(self, named) -> dict:
        met = f" within select_limits {self.limit_texts}" if self.limits else ""
        if self.weights is None:
            raise RuntimeError(f"select_by={self.key!r}: no logged step had a finite value{met} to select; "
                               f"the model is not saved (the log shows every logged step's values)")
        if self.updates == 0:
            log.warning("select_by=%r kept the weights before any update (step 0, %s = %s): no later "
                        "logged step was better%s; the saved model is the one training started from",
                        self.key, self.key, self.value, met)
        with torch.no_grad():
            for n, p in named:
                p.copy_(self.weights[n].to(p.device, p.dtype))
        return self.record()

    def record(self) -> dict:
        return {"step": self.step, "updates": self.updates, "key": self.key, "value": self.value,
                **({"limits": self.limit_texts} if self.limits else {}),
                **({"ties": self.ties} if self.ties != "first" else {})}


def _grad_norm(params: List[torch.nn.Parameter]) -> float:
    """Global L2 norm of the gradients (over all shards when FSDP-sharded)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float32)
    for g in grads:
        total = total + local(g).detach().float().pow(2).sum().cpu()
    return float(sum_over_shards(total, grads).sqrt())


# ---------------------------------------------------------------------------------------------
# Checkpoints (resume after an interrupt)
# ---------------------------------------------------------------------------------------------

CHECKPOINT = "checkpoint"


def save_checkpoint(run_dir: Path, step: int, named, optimizer, scheduler, streams,
                    write: bool = True, selection: Optional[Selection] = None) -> None:
    """Trainable weights (safetensors), optimizer and schedule state, stream positions and RNG,
    written to a temporary folder and renamed over the previous checkpoint.

    FSDP-sharded parameters and optimizer states are saved whole: each is all-gathered (every
    process must call this, in the same order) and only the process with `write` (rank 0)
    keeps and writes them. The checkpoint is then the same as without sharding, whatever the
    number of processes (the simplest correct choice; it costs one gather of the trainable
    weights and their optimizer state per checkpoint, and rank 0 holds them in CPU memory).
    A Selection's kept weights, if any, go in selected.safetensors."""
    weights = {}
    for n, p in named:
        value = full(p.detach())
        if write:
            weights[n] = value.contiguous().cpu()
        del value
    optimizer_state = _full_optimizer_state(optimizer.state_dict(), write)
    if not write:
        return
    target = run_dir / CHECKPOINT
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.tmp", dir=run_dir))
    try:
        save_file(weights, str(tmp / "trainable.safetensors"))
        selected = None
        if selection is not None and selection.weights is not None:
            save_file({n: w.contiguous() for n, w in selection.weights.items()},
                      str(tmp / "selected.safetensors"))
            selected = selection.record()
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                   tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps(
            {"step": step, "streams": {k: s.served for k, s in streams.items()},
             **({"selected": selected} if selected else {})}))
        old = run_dir / ".checkpoint.old"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _full_optimizer_state(state: dict, keep: bool) -> dict:
    """The optimizer's state dict with every DTensor state (FSDP-sharded Adam moments) gathered
    whole; unchanged when nothing is sharded. A collective when something is."""
    per_param = state["state"]
    if not any(is_dtensor(v) for s in per_param.values() for v in s.values()):
        return state
    gathered = {}
    for index in sorted(per_param):  # the same order on every process
        entry = {}
        for key, value in per_param[index].items():
            value = full(value) if is_dtensor(value) else value
            entry[key] = value.cpu() if torch.is_tensor(value) else value
        gathered[index] = entry
    return {**state, "state": gathered if keep else {}}


def _shard_optimizer_state(state: dict, params) -> dict:
    """A checkpoint's optimizer state (full tensors) cut into this process's shards where the
    parameter is FSDP-sharded; `params` in the optimizer's order (its state's indices)."""
    if not any(is_dtensor(p) for p in params):
        return state
    order = [i for group in state["param_groups"] for i in group["params"]]
    by_index = dict(zip(order, params))
    sharded_state = {}
    for index, entry in state["state"].items():
        p = by_index[index]
        sharded_state[index] = {
            key: shard_like(value.to(p.dtype), p)
            if is_dtensor(p) and torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0
            else value
            for key, value in entry.items()}
    return {**state, "state": sharded_state}


def load_checkpoint(run_dir: Path, named, optimizer, scheduler, streams,
                    selection: Optional[Selection] = None) -> int:
    target = run_dir / CHECKPOINT
    if not (target / "progress.json").exists():
        return 0
    progress = json.loads((target / "progress.json").read_text())
    weights = load_file(str(target / "trainable.safetensors"))
    missing = [n for n, _ in named if n not in weights]
    if missing:
        raise RuntimeError(f"checkpoint in {target} does not match the model (missing {missing[:3]}); "
                           f"delete it to start over")
    with torch.no_grad():
        for n, p in named:  # sharded: each process takes its shard of the full tensor
            p.copy_(shard_like(weights[n].to(p.dtype), p))
    state = torch.load(target / "state.pt", weights_only=False)
    optimizer.load_state_dict(_shard_optimizer_state(
        state["optimizer"], [p for group in optimizer.param_groups for p in group["params"]]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    for k, s in streams.items():
        s.served = progress["streams"].get(k, 0)
    kept = progress.get("selected")
    if selection is not None and kept and kept["key"] == selection.key:
        selection.step, selection.updates, selection.value = kept["step"], kept["updates"], kept["value"]
        selection.weights = load_file(str(target / "selected.safetensors"))
    log.info("resuming %s from step %d", run_dir, progress["step"])
    return int(progress["step"])


def remove_checkpoint(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / CHECKPOINT, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

class _Loggers:
    """log.jsonl always; TensorBoard / W&B when asked for and installed."""

    def __init__(self, run_dir: Path, report_to: str, resume_step: int):
        self.path = run_dir / "log.jsonl"
        if self.path.exists():  # drop lines a killed run wrote after its last checkpoint
            # (all of them when starting over: step 0 is logged again then)
            kept = [l for l in self.path.read_text().splitlines()
                    if resume_step > 0 and l.strip() and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.tb = self.wandb = None
        targets = {t.strip() for t in str(report_to).split(",") if t.strip() and t.strip() != "none"}
        unknown = targets - {"tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"unknown report_to {sorted(unknown)}; use tensorboard and/or wandb")
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("report_to=tensorboard needs `pip install tensorboard`") from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("report_to=wandb needs `pip install wandb`") from e
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "inoculate"),
                                    name=run_dir.name, dir=str(run_dir), resume="allow")

    def write(self, step: int, logs: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")
        numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}  # not monitor/answers
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

