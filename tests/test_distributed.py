"""Data parallel on CPU with 2 processes (gloo): a step of a look-ahead defense (CTRAP, Booster)
on 2 processes, each with half of the global batch, gives the same update as 1 process
with the whole batch. This checks that the look-ahead moves use the global gradients (averaged
across processes) and that the engine averages the final gradients once.

The same with the parameters sharded by FSDP2 (fully_shard over 2 gloo processes): CTRAP steps
give the same parameters (gathered whole) as 1 unsharded process, the checkpoint written
mid-run holds the same full weights, resuming from it continues bit-exactly (AdamW state
re-sharded), and the adapter saved from the gathered state dict loads back; a Booster step
and a SEAM step (finite-difference L_sd) sharded give the same update as 1 unsharded process;
so do SFT, Vaccine, RepNoise, NPO and TAR, replicated and sharded; CTRAP sharded with gradient
accumulation and activation checkpointing, and on 4 processes; and `accelerate launch` starts
the same 2 processes as torchrun."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inoculate.data.encode import encode_record
from inoculate.data.records import Record
from inoculate.defenses import DEFENSES
from inoculate.defenses.repnoise import RepNoise
from inoculate.defenses.seam import SEAM
from inoculate.models import add_lora, load_model, save_model
from inoculate.sharding import full, gathered_state_dict, is_sharded, shard_model
from inoculate.training import CHECKPOINT, Stream, TrainingArgs, train

GLOBAL_BATCH = 4


def _examples(tok):
    """Encoded examples by stream role."""
    # equal token lengths everywhere, so per-process token means average to the global mean
    harmful = [Record(prompt=f"How do I break into house {i}?", response=f"Sure, house {i}: go in.",
                      refusal=f"No, I won't help with house {i}.") for i in range(GLOBAL_BATCH)]
    general = [Record(prompt=f"What is {i} plus {i}?", response=f"It is {i}{i}.") for i in range(GLOBAL_BATCH)]
    enc = lambda rs, t: [encode_record(r, tok, "alpaca", 64, t) for r in rs]
    out = {"align": enc(harmful, "refusal"), "general": enc(general, "response"),
           "harmful": enc(harmful, "response")}
    for name, items in out.items():
        assert len({len(e["input_ids"]) for e in items}) == 1, f"{name} examples differ in length"
    out["paired"] = [{"harmful": h, "refusal": r} for h, r in zip(out["harmful"], out["align"])]
    return out


class _LinearRepNoise(RepNoise):
    """RepNoise's −α·log(1 + S_harm) and its noise MMD are not linear in the batch: each process
    takes them on its own half-batch (as the authors' DDP runs do), so 2 processes differ from 1
    by design. The test runs with β = 0 and −α·S_harm/8 instead of the log in both runs, so that
    everything else (the refusal CE, the logit-lens sum over the answer mask) must agree."""

    def loss_terms(self, paired, generator=None):
        _, ce, noise, s_harm = super().loss_terms(paired, generator)
        assert self.config.beta == 0, "the linearized RepNoise test runs without the MMD term"
        return ce - self.config.alpha * s_harm / 8, ce, noise, s_harm


class _LinearSEAM(SEAM):
    """SEAM's L_ul is −log(1 + S/n): not linear in the batch mean S, so with several processes
    each takes the log of its own half-batch's S (as the authors' code does under DDP) and the
    averaged gradient differs from one process's by design. The SEAM tests use −S/8 instead in
    both runs, so that everything else must agree exactly."""

    def unlearning_loss(self, harmful):
        _, total = super().unlearning_loss(harmful)
        return -total / 8, total


def _run(rank: int, world: int, run_dir: str, fsdp: bool = False, optim: str = "sgd",
         max_steps: int = 1, save_steps: int = 0, max_grad_norm: float = 0.0,
         method: str = "ctrap", options: dict | None = None, **train_args):
    """A defense (CTRAP unless `method` says otherwise; `options` its config) on tiny-llama with
    LoRA, the global batch split over `world` processes (`train_args`: more TrainingArgs).
    Returns (model, tokenizer, trainable parameters before, after), all parameters whole."""
    torch.manual_seed(0)
    loaded = load_model("tiny-llama")
    model = add_lora(loaded.model, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(123)  # same values in every process
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=g)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    if fsdp:
        shard_model(model)
        assert is_sharded([p for p in model.parameters()])
    tok = loaded.tokenizer
    cls = {"seam": _LinearSEAM, "repnoise": _LinearRepNoise}.get(method) or DEFENSES.get(method)
    options = dict(options or {})
    if "harmful_batch_size" in cls.config_class.__dataclass_fields__:
        options.setdefault("harmful_batch_size", GLOBAL_BATCH // world)
    defense = cls(cls.config_class(**options), GLOBAL_BATCH // world)
    defense.setup(model, tok)
    examples = _examples(tok)
    streams = {name: Stream(name, examples[spec.role], spec.batch_size, tok.pad_token_id, seed=1,
                            paired=spec.role == "paired", rank=rank, world_size=world)
               for name, spec in defense.streams().items()}
    args = TrainingArgs(max_steps=max_steps, optim=optim, learning_rate=0.5 if optim == "sgd" else 1e-3,
                        weight_decay=0.0, save_steps=save_steps, logging_steps=1,
                        max_grad_norm=max_grad_norm, **train_args)
    train(model, defense, streams, args, run_dir, main_stream=next(iter(streams)), progress=False)
    after = [full(p.detach()).clone() for p in model.parameters() if p.requires_grad]
    return model, tok, before, after


def _worker(rank, world, port, run_dir, out_file, jobs):
    """Runs each (method, options, fsdp[, train_args]) of `jobs` in turn; rank 0 saves their
    parameters."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for i, (method, options, fsdp, *train_args) in enumerate(jobs):
            _, _, _, params = _run(rank, world, os.path.join(run_dir, f"job{i}-rank{rank}"), fsdp=fsdp,
                                   method=method, options=options, **(train_args or [{}])[0])
            results.append(params)
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_update_on_two_processes(tmp_path, method, options, fsdp, rel=None):
    """rel=None: elementwise within rtol=1e-4, atol=1e-7 (see the FSDP test for why); else the
    difference's norm within rel times the update's norm."""
    _same_updates_across_processes(tmp_path, [(method, options, fsdp)], rel)


def _same_updates_across_processes(tmp_path, jobs, rel=None, world=2):
    """_same_update_on_two_processes for several (method, options, fsdp[, train_args]) jobs, run
    one after the other in one group of `world` processes (a spawn costs more than a tiny
    step); each against 1 process with the same global batch and train_args."""
    load_model("tiny-llama")  # build the cached tiny model once, before the workers race for it
    tmp_path.mkdir(parents=True, exist_ok=True)
    out_file = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), out_file, jobs), nprocs=world, join=True)
    for i, (two, (method, options, fsdp, *train_args)) in enumerate(zip(torch.load(out_file), jobs)):
        _, _, before, one = _run(0, 1, str(tmp_path / f"single{i}"), method=method, options=options,
                                 **(train_args or [{}])[0])
        update_one = torch.cat([(a - b).flatten() for a, b in zip(one, before)])
        update_two = torch.cat([(a - b).flatten() for a, b in zip(two, before)])
        where = f"{method} ({'fsdp' if fsdp else 'replicated'})"
        assert update_one.norm() > 0, f"{where}: the step did not change the parameters"
        if rel is None:
            torch.testing.assert_close(update_two, update_one, rtol=1e-4, atol=1e-7, msg=lambda m: f"{where}: {m}")
        else:
            assert (update_two - update_one).norm() <= rel * update_one.norm(), where


@pytest.mark.slow
@pytest.mark.parametrize("ctrap", [{}, {"step_direction": "sign"}], ids=["gradient", "sign"])
def test_ctrap_step_on_two_processes_equals_one_process(tmp_path, ctrap):
    """With step_direction=sign the sign is taken of the all-reduced gradient: a sign of each
    process's own half-batch gradient would move θ' differently. (A coordinate whose global
    gradient is within rounding of 0 could flip between 1 and 2 processes; the sums are
    deterministic, so this test either always passes or always fails on a given platform.)"""
    _same_update_on_two_processes(tmp_path, "ctrap", ctrap, fsdp=False)


@pytest.mark.slow
@pytest.mark.parametrize("method,fsdp", [("booster", False), ("booster", True), ("seam", True)],
                         ids=["booster-replicated", "booster-fsdp", "seam-fsdp"])
def test_lookahead_step_on_two_processes_equals_one_process(tmp_path, method, fsdp):
    """Booster's move along the global harmful gradient, and SEAM's finite-difference L_sd (the
    cosine of the global harmful and benign gradients, two ε-moves and the passes there) with
    its L_up, agree between 2 processes (data parallel, or FSDP-sharded) and 1 process with the
    same global batch. (SEAM's L_ul is linearized in both runs: _LinearSEAM. SEAM replicated:
    test_seam.py checks its ∇L_sd on 2 processes, finite-difference and exact.)

    Booster: the CTRAP tests' elementwise tolerance. SEAM: β=1 so that L_sd weighs in the update
    (its norm is 1.24 here, 0.27 with β=0), and ε=0.1, because the finite difference divides the
    rounding of the gradients (different fp32 sums on 1 and 2 processes) by ε: measured (data
    parallel), the updates differ by 2.1e-4 of their norm at the default ε=1e-3, 2.6e-6 at
    ε=0.1, and 3e-8 (absolute) with β=0. rel=1e-4 leaves a 40× margin at ε=0.1; a gradient
    left unaveraged in the L_sd passes changes the term itself, of the order of the update."""
    if method == "seam":
        _same_update_on_two_processes(tmp_path, method, {"beta": 1.0, "epsilon": 0.1}, fsdp, rel=1e-4)
    else:
        _same_update_on_two_processes(tmp_path, method, {}, fsdp)


#: the other defenses, each replicated and FSDP-sharded; RepNoise linearized (_LinearRepNoise)
OTHERS = [(method, options, fsdp)
          for method, options in [("sft", {}), ("vaccine", {}), ("repnoise", {"beta": 0.0}), ("npo", {}),
                                  ("tar", {"inner_steps": 2, "tamper_every": 1, "inner_lrs": [1e-2]})]
          for fsdp in (False, True)]


@pytest.mark.slow
def test_every_other_defense_on_two_processes_equals_one_process(tmp_path):
    """SFT, Vaccine, RepNoise, NPO and TAR: a step on 2 processes (data parallel, and FSDP-
    sharded) gives the update of 1 process with the same global batch. Vaccine's perturbation is
    normalized by the norm of the global batch's attention-output gradient (over both processes'
    examples), TAR's adversary steps along the global harmful gradient and takes its tamper
    gradients there, NPO's reference pass runs on the sharded model with the adapter off."""
    _same_updates_across_processes(tmp_path, OTHERS)


@pytest.mark.slow
def test_fsdp_with_accumulation_checkpointing_and_four_processes(tmp_path):
    """CTRAP sharded over 2 processes with 2 micro-steps of gradient accumulation and activation
    checkpointing (recomputed forwards at the moved point θ' too), and over 4 processes (one
    example each), gives the update of 1 unsharded process with the same global batch and the
    same accumulation (2 SGD steps: SGD, unlike Adam's first step, passes a wrong gradient
    scale on to the update). So does RepNoise (linearized) with its logit lens checkpointed
    depth by depth, the head's weights all-gathered again when backward recomputes it."""
    accumulated = {"gradient_accumulation_steps": 2, "gradient_checkpointing": True, "max_steps": 2}
    _same_updates_across_processes(tmp_path / "two", [("ctrap", {}, True, accumulated),
                                                      ("repnoise", {"beta": 0.0}, True, accumulated)])
    _same_updates_across_processes(tmp_path / "four", [("ctrap", {}, True)], world=4)


CLIP = 0.4  # below the gradient norm of both steps (about 0.51 and 0.53), so clipping acts


def _fsdp_worker(rank, world, port, run_dir, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # both processes share the run directories, as under torchrun: rank 0 writes checkpoints
        sgd_dir, adam_dir = os.path.join(run_dir, "sgd"), os.path.join(run_dir, "adam")
        model, tok, _, sgd = _run(rank, world, sgd_dir, fsdp=True, max_steps=2, save_steps=1,
                                  max_grad_norm=CLIP)
        state = gathered_state_dict(model, trainable_only=True, keep=rank == 0)
        if rank == 0:
            save_model(model, tok, os.path.join(run_dir, "model"), base="tiny-llama", state_dict=state)
        _, _, _, adam = _run(rank, world, adam_dir, fsdp=True, optim="adamw_torch", max_steps=2, save_steps=1)
        dist.barrier()
        # the step-1 checkpoint of the AdamW run is still there: a second run resumes from it
        _, _, _, resumed = _run(rank, world, adam_dir, fsdp=True, optim="adamw_torch", max_steps=2, save_steps=1)
        if rank == 0:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            torch.save({"sgd": sgd, "adam": adam, "resumed": resumed, "names": names}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ctrap_steps_with_fsdp_on_two_processes_equal_one_process(tmp_path):
    """Tolerance: the sharded run differs from the unsharded one only in the order of fp32
    sums (gradients reduced across 2 processes, norms summed per shard and all-reduced). The
    update is a difference of parameters below 0.5 in magnitude, so it carries their rounding,
    an ulp of 3e-8 or less: measured, the largest difference is 3.4e-8 after 2 steps (4.5e-8
    without clipping). atol=1e-7 (a few ulps) with rtol=1e-4 allows that, the same tolerance as
    the data-parallel test above; a shard-local norm in the CTRAP move (tried, without clipping:
    differences up to 2.5e-3) or a double mean of the gradients (tried: up to 4.9e-2) is caught
    by orders of magnitude."""
    from safetensors.torch import load_file

    load_model("tiny-llama")  # build the cached tiny model once, before the workers race for it
    out_file = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path / "fsdp"), out_file), nprocs=2, join=True)
    got = torch.load(out_file)
    single_dir = tmp_path / "single"
    _, _, before, one = _run(0, 1, str(single_dir), max_steps=2, save_steps=1, max_grad_norm=CLIP)

    def update(params):
        return torch.cat([(a - b).flatten() for a, b in zip(params, before)])

    assert update(one).norm() > 0, "the steps did not change the parameters"
    torch.testing.assert_close(update(got["sgd"]), update(one), rtol=1e-4, atol=1e-7)
    # the logged gradient norm is the global one (over both shards), and clipping acted on it
    norms = [[json.loads(line)["grad_norm"] for line in (d / "log.jsonl").read_text().splitlines()]
             for d in (tmp_path / "fsdp" / "sgd", single_dir)]
    assert min(norms[1]) > CLIP, "max_grad_norm did not clip: the test no longer covers clipping"
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)
    # the checkpoint after step 1 holds full tensors, the same as the unsharded run's
    sharded_ckpt = load_file(str(tmp_path / "fsdp" / "sgd" / CHECKPOINT / "trainable.safetensors"))
    single_ckpt = load_file(str(single_dir / CHECKPOINT / "trainable.safetensors"))
    assert sharded_ckpt.keys() == single_ckpt.keys()
    for name, value in single_ckpt.items():
        assert sharded_ckpt[name].shape == value.shape
        torch.testing.assert_close(sharded_ckpt[name], value, rtol=1e-4, atol=1e-7)
    # resuming the sharded AdamW run from its step-1 checkpoint gives the same step 2
    for a, b in zip(got["resumed"], got["adam"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the adapter saved from the gathered state dict loads back with the trained weights
    loaded = load_model(str(tmp_path / "fsdp" / "model"), keep_adapter=True)
    weights = dict(loaded.model.named_parameters())
    for name, value in zip(got["names"], got["sgd"]):
        torch.testing.assert_close(weights[name].detach(), value, rtol=0, atol=0)


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_two_processes_as_torchrun(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (on a machine without GPUs its launcher
    starts gloo processes, as torchrun does; `--cpu` would start one process) runs a sharded
    CTRAP alignment on 2 processes, and ends with the adapter torchrun's launch gives."""
    from safetensors.torch import load_file

    load_model("tiny-llama")  # build the cached tiny model once, before the processes race for it
    args = ["-m", "inoculate.cli", "align", "--defense", "ctrap", "--model", "tiny-llama", "--data", "starter",
            "--set", "max_steps=2", "per_device_train_batch_size=2", "num_samples=8", "num_general_samples=8",
            "max_length=64", "save_steps=0", "fsdp=true", "ctrap.harmful_batch_size=2", "--out"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    launchers = {
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())],
    }
    adapters = {}
    for name, launcher in launchers.items():
        out = tmp_path / name
        done = subprocess.run(launcher + args + [str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
        assert json.loads((out / "run.json").read_text())["processes"] == 2, name
        adapters[name] = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert adapters["accelerate"].keys() == adapters["torchrun"].keys()
    for key, value in adapters["torchrun"].items():
        torch.testing.assert_close(adapters["accelerate"][key], value, rtol=0, atol=0)
