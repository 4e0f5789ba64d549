"""What every defense is: an object that turns named batches into gradients.

A defense never owns a training loop. The engine (``inoculate.training``) draws one batch
from each stream the defense names, calls :meth:`Defense.accumulate` inside the autocast
context, and then does clipping, the optimizer step, logging, checkpoints and distribution.

``accumulate`` adds ``scale * gradient`` into ``p.grad`` of every trainable parameter and
returns the scalar losses to log. Helpers here cover what look-ahead defenses share:
gradients as lists, global norms, and moving parameters in place with an exact restore.

The same helpers work when the parameters are sharded by FSDP2 (``inoculate.sharding``):
gradients are then taken by a backward that FSDP reduce-scatters (already the mean over
processes, so never all-reduced again here), norms and dot products sum the local shards and
all-reduce that one scalar, and moves act on the local shards in place.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.encode import IGNORE_INDEX
from ..registry import Registry
from ..sharding import is_sharded, local, sum_over_shards


@dataclass
class StreamSpec:
    """A named batch stream a defense needs.

    role:       which data: "align" (harmful prompt -> refusal), "harmful" (harmful prompt ->
                harmful answer), "general" (benign instruction -> answer), "paired" (the same
                harmful prompts answered harmfully and with a refusal, with answer masks),
                "task" (a benign fine-tuning task of the data suite, named by `task`: its train
                split's inputs -> answers, e.g. SST-2 sentences -> labels).
    batch_size: examples per micro-batch.
    task:       the task of role "task" (a key of the data suite's tasks: sst2, ag_news, gsm8k),
                or several, comma-separated: the stream then mixes their examples.
    """

    role: str
    batch_size: int
    task: Optional[str] = None


@dataclass
class DefenseConfig:
    """Base of every defense's config (fields are added by subclasses)."""


class Defense:
    """Subclasses set `name`, `config_class`, implement `streams` and `accumulate`."""

    name: str = ""
    config_class: type = DefenseConfig
    #: forward/backward passes per micro-step, for the docs and benchmarks
    passes_per_step: int = 1

    def __init__(self, config: DefenseConfig, batch_size: int):
        self.config = config
        self.batch_size = batch_size  # the run's per_device_train_batch_size
        self.params: List[torch.nn.Parameter] = []
        self.model: Optional[torch.nn.Module] = None
        self.steps_seen = 0  # micro-steps so far (amortized look-ahead modes count on it)

    # -- set up ---------------------------------------------------------------------------------
    def streams(self) -> Dict[str, StreamSpec]:
        raise NotImplementedError

    def setup(self, model: torch.nn.Module, tokenizer) -> None:
        """Called once before training with the (possibly LoRA-wrapped) model."""
        self.model = model
        self.tokenizer = tokenizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"defense {self.name!r}: the model has no trainable parameters")

    # -- one micro-step -------------------------------------------------------------------------
    def accumulate(self, batches: Dict[str, dict], scale: float) -> Dict[str, float]:
        raise NotImplementedError

    def probe(self, batches: Dict[str, dict], at_point=None) -> Dict[str, float]:
        """Values of the defense's own objective on held-out batches (one per stream, same
        names as `streams()`), for the alignment monitor (`monitor_samples`): no gradient is
        added to p.grad, no state of the defense changes, and the parameters end bit-identical.
        A look-ahead defense calls `at_point()` (a dict of values measured on the model as it
        is) once at the point its simulated attack reaches and returns those values as
        point/<key>. The engine logs them as monitor/<defense name>/<key>. Default: none."""
        return {}

    # -- shared helpers -------------------------------------------------------------------------
    def forward(self, batch: dict, **kw):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)

    def answer_logits(self, batch: dict, labels: Optional[torch.Tensor] = None):
        """(logits, labels) for the positions from the earliest answer token on.

        Prompt positions carry no loss, so when the model accepts `logits_to_keep` only the
        last k positions go through the LM head and the softmax (with a 49k-token vocabulary
        and Alpaca prompts this is most of the head's cost)."""
        labels = batch["labels"] if labels is None else labels
        keep = keep_positions(labels)
        if keep < labels.shape[1] and accepts_logits_to_keep(self.model):
            logits = self.forward(batch, logits_to_keep=keep).logits
            return logits, labels[:, -keep:]
        return self.forward(batch).logits, labels

    def lm_loss(self, batch: dict, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token-mean cross-entropy over answer tokens (labels != -100)."""
        return token_ce(*self.answer_logits(batch, labels))

    def grads(self, loss: torch.Tensor, retain_graph: bool = False,
              create_graph: bool = False) -> List[torch.Tensor]:
        """d loss / d params as a list aligned with self.params (zeros where unused).

        With several processes the result is the gradient of the global batch (the mean over
        processes), whether the parameters are replicated or sharded by FSDP."""
        if is_sharded(self.params):
            return self._sharded_grads(loss, retain_graph, create_graph)
        gs = torch.autograd.grad(loss, self.params, retain_graph=retain_graph,
                                 create_graph=create_graph, allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, gs)]
        if not create_graph:
            average_across_processes(gs)
        return gs

    def _sharded_grads(self, loss: torch.Tensor, retain_graph: bool,
                       create_graph: bool) -> List[torch.Tensor]:
        """grads() under FSDP2. The forward ran on all-gathered copies of the weights, so
        autograd.grad with respect to the sharded parameters sees no path to them; a plain
        backward does, and FSDP reduce-scatters it into p.grad with a mean over processes. The
        gradient so far in p.grad is set aside for that backward and put back after it."""
        if create_graph:
            raise NotImplementedError(
                f"defense {self.name!r}: second-order gradients (double backward) are not supported "
                f"with fsdp=true; use the first-order options or run without fsdp")
        kept = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            loss.backward(retain_graph=retain_graph)
            return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        finally:
            for p, g in zip(self.params, kept):
                p.grad = g

    def add_to_grad(self, grads: Sequence[torch.Tensor], scale: float) -> None:
        for p, g in zip(self.params, grads):
            g = g.detach().to(p.dtype)
            if p.grad is None:
                p.grad = g * scale
            else:
                p.grad.add_(g, alpha=scale)

    def backward(self, loss: torch.Tensor, scale: float, retain_graph: bool = False) -> None:
        """Plain backward of scale*loss into p.grad (cheapest when nothing else is needed)."""
        (loss * scale).backward(retain_graph=retain_graph)

    def lookahead_due(self, every: int, cached) -> bool:
        """Amortized look-ahead modes: whether this micro-step recomputes the cached look-ahead
        gradient (every `every`-th micro-step, and whenever there is no cache); counts the step."""
        due = every == 1 or cached is None or self.steps_seen % every == 0
        self.steps_seen += 1
        return due

    @contextlib.contextmanager
    def moved(self, direction: Sequence[torch.Tensor], step: float,
              release: bool = False) -> Iterator[None]:
        """Temporarily set θ <- θ + step·direction in place; restore θ bit-exactly on exit.

        The update is computed in the parameters' own dtype from fp32 master copies when the
        parameters are fp32; the saved copy is what gets restored, so no rounding survives.

        ``release=True`` empties the list ``direction`` (the caller's own list) as soon as the
        move is applied, so that its tensors are freed before the passes at the moved point
        when nothing else refers to them: the saved copy of θ is then the only
        parameter-sized buffer this context holds. The caller must not use the list afterwards.

        Autocast keeps a cache of the low-precision copies of the weights for as long as its
        context lasts (the whole micro-step here): without clearing it on both moves, every
        pass under bf16 autocast would silently run at the old θ.

        Under FSDP2 θ, the direction and the saved copy are DTensors sharded alike: the move
        and the restore act on this process's shards, and FSDP all-gathers the moved shards at
        the next forward."""
        if release and not isinstance(direction, list):
            raise TypeError("moved(release=True) needs the direction as a list it can empty")
        saved = [p.detach().clone() for p in self.params]
        try:
            _shift(self.params, direction, step)
            if release:
                direction.clear()
            torch.clear_autocast_cache()
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
            torch.clear_autocast_cache()


def _shift(params: Sequence[torch.nn.Parameter], direction: Sequence[torch.Tensor], step: float) -> None:
    """θ += step·direction in place (a function, so no loop variable keeps a tensor alive)."""
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d.to(p.dtype), alpha=step)


def keep_positions(labels: torch.Tensor) -> int:
    """How many trailing positions cover every answer token and the position predicting it."""
    has_label = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if len(has_label) == 0:
        return labels.shape[1]
    return labels.shape[1] - int(has_label[0]) + 1


def accepts_logits_to_keep(model) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


NO_ANSWER_TOKENS = ("batch has no answer tokens to train on (all labels are -100); "
                    "check max_length and the data's answers")


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy: position t predicts token t+1; mean over non-ignored targets."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    n = (shift_labels != IGNORE_INDEX).sum()
    if n == 0:
        raise ValueError(NO_ANSWER_TOKENS)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum") / n


def average_across_processes(tensors: Sequence[torch.Tensor]) -> None:
    """With several processes, replace each tensor by its mean over processes (in place).

    A look-ahead defense moves the parameters along an intermediate gradient (CTRAP's harmful
    gradient, Booster's, SEAM's pair): every process must take the same move, so intermediate
    gradients are the global-batch gradients. The final p.grad is averaged by the engine.

    Gradients of FSDP-sharded parameters (DTensors) are left as they are: FSDP's
    reduce-scatter already made them the mean over processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if is_sharded(tensors):
        return
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)


def sum_across_processes(value: torch.Tensor) -> torch.Tensor:
    """A scalar summed over the processes of the run (all-reduce SUM; a copy), or `value`
    itself in one process. For sums over examples that each process holds a share of, such as
    Vaccine's activation gradients (parameter-sized sums use `global_norm` / `dot`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all tensors together (fp32); over all shards when they are FSDP-sharded."""
    return torch.sqrt(sum_over_shards(sum((local(t).detach().float() ** 2).sum() for t in tensors),
                                      tensors))


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ a·b over all tensors (fp32); over all shards when they are FSDP-sharded."""
    return sum_over_shards(sum((local(x).float() * local(y).float()).sum() for x, y in zip(a, b)),
                           list(a) + list(b))


DEFENSES: Registry[type] = Registry("defense")


def register_defense(name: str):
    """Class decorator: `@register_defense("ctrap")`."""

    def wrap(cls):
        cls.name = name
        DEFENSES.register(name, cls)
        return cls

    return wrap
