"""The three stages: align (plant a defense), attack (fine-tune the result as an attacker would),
evaluate (measure harm, collapse and task accuracy). Each reads a config and writes a run
directory (see ``inoculate.runs``); each is resumable and reuses a finished run.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from . import runs
from .config import ConfigError, build, doc, resolve_sections
from .data.encode import encode_record
from .data.records import Record
from .data.suites import SUITES, DataSuite
from .defenses import DEFENSES
from .defenses.sft import SFT, SFTConfig
from .models import (MODEL_META, add_lora, load_model, pick_device, save_model, _base_location,
                     _resolve_spec)
from .registry import Registry
from .training import (MONITOR_PREFIX, Selection, Stream, TrainingArgs, parse_limit, to_device, train,
                       use_bf16)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelFields:
    dtype: str = doc("float32", "weights dtype: float32 | bfloat16 (bf16 base + fp32 LoRA for big models)")
    device: str = doc("auto", "auto (cuda if present) | cpu | cuda | cuda:N")
    attn_implementation: Optional[str] = doc(None, "eager | sdpa | flash_attention_2 (model default if unset)")
    trust_remote_code: bool = doc(False, "allow model code from the hub (off: never run remote code)")


@dataclass
class DataFields:
    data: str = doc("beavertails", "data suite: starter | beavertails | beavertails-alpaca")
    data_dir: Optional[str] = doc(None, "read sources from this local folder instead of the hub")
    harmful_data: Optional[str] = doc(None, "override the suite's harmful source (with refusals)")
    general_data: Optional[str] = doc(None, "override the suite's general-dialogue source")
    template: str = doc("alpaca", "prompt template: alpaca (paper protocol) | chat | qa")
    max_length: int = doc(256, "max tokens of prompt + answer; longer answers are truncated")


@dataclass
class LoraFields:
    lora: bool = doc(True, "train a LoRA adapter (true) or all weights (false)")
    lora_r: int = doc(32, "LoRA rank (Huang-group default 32; 64 for Qwen in CTRAP)")
    lora_alpha: float = doc(4.0, "LoRA alpha; the update scale is lora_alpha/lora_r")
    lora_dropout: float = doc(0.0, "LoRA dropout")
    lora_target_modules: Optional[list[str]] = doc(None, "modules to adapt; default q/k/v projections")


@dataclass
class AlignConfig(TrainingArgs, LoraFields, DataFields, ModelFields):
    """`inoculate align`: train a defense into a model."""

    defense: str = doc("sft", "defense method: " + ", ".join(DEFENSES.names()))
    model: str = doc("smollm2-135m-instruct", "model: built-in name, local dir, .gguf file, run dir or hub id")
    num_samples: int = doc(5000, "harmful prompts (with refusals) the defense aligns on (first N)")
    num_general_samples: int = doc(5000, "general-dialogue examples for defenses that use them")
    exclude_categories: Optional[list[str]] = doc(None, "harmful categories left out of alignment (pair with an attack's harmful_categories: data the defense never saw)")
    fsdp: bool = doc(False, "shard parameters, gradients and optimizer state with FSDP2 (fully_shard) across the processes of torchrun / accelerate launch; ignored in one process")
    select_by: str = doc("", "keep the weights of the logging step where this logged value was best (e.g. ctrap's trap_gap with select_mode=max) instead of the last step's; '' = the last step")
    select_mode: str = doc("min", "select_by: min (lowest value) | max (highest)")
    select_ties: str = doc("first", "select_by: among logged steps with the same best value keep the first | last (e.g. a share that saturates at 1: the last is the longest trained)")
    select_limits: list[str] = doc([], "select_by: only steps whose logged values keep these bounds, each KEY<=NUMBER or KEY>=NUMBER (e.g. monitor/collapse_token_share<=0.02 with select_by monitor/ctrap/trap_gap); the run fails if no step does")
    monitor_samples: int = doc(0, "held-out validation set measured at every logging step (0: off): the last N harmful prompts of the test split and the last N general examples (losses, greedy answers' collapse-token share, degenerate and refusal rates, the defense's own probe, e.g. monitor/ctrap/trap_gap), logged as monitor/...; select_by can name them. Evaluation reads the test split's first prompts: keep the two apart")
    monitor_new_tokens: int = doc(24, "monitor_samples: new tokens per greedy answer")
    monitor_masked: bool = doc(False, "monitor_samples: also answer with every token that begins the collapse word suppressed, at θ and at each point the defense's probe reaches (CTRAP's simulated attackers), and log those answers' degenerate and refusal rates and the answers (masked_answers, ctrap/point/masked_answers): what a collapsed point would write without its collapse word; doubles the monitor's generation")
    monitor_tasks: list[str] = doc([], "monitor_samples: also answer the last N test prompts of these tasks (e.g. [sst2]) greedily at θ and log the answers' collapse-token share and the answers (monitor/tasks/<task>/collapse_token_share, monitor/tasks/<task>/answers): a collapse that leaks into the model on task prompts while the harmful prompts stay clean; select_limits can bound it")

    def __post_init__(self):
        if self.select_mode not in ("min", "max"):
            raise ConfigError(f"select_mode must be min or max, got {self.select_mode!r}")
        if self.select_ties not in ("first", "last"):
            raise ConfigError(f"select_ties must be first or last, got {self.select_ties!r}")
        if self.monitor_samples < 0 or self.monitor_new_tokens < 1:
            raise ConfigError(f"monitor_samples must be >= 0 and monitor_new_tokens >= 1, got "
                              f"{self.monitor_samples} and {self.monitor_new_tokens}")
        if self.monitor_masked and not self.monitor_samples:
            raise ConfigError("monitor_masked answers the monitor's held-out prompts a second time: set "
                              "monitor_samples > 0")
        if self.monitor_tasks and not self.monitor_samples:
            raise ConfigError(f"monitor_tasks {self.monitor_tasks} answers held-out task prompts in the "
                              "monitor: set monitor_samples > 0")
        if self.select_limits and not self.select_by:
            raise ConfigError("select_limits bound the candidates of select_by, which is not set")
        if self.select_by:  # checks the limits' syntax and that they are logged with select_by
            Selection(self.select_by, self.select_mode, self.select_limits, self.select_ties)
        monitored = [k for k in [self.select_by, *(parse_limit(t)[0] for t in self.select_limits)]
                     if k.startswith(MONITOR_PREFIX)]
        if monitored and not self.monitor_samples:
            raise ConfigError(f"select_by={self.select_by!r} names a monitor value: set monitor_samples > 0 "
                              f"(the held-out examples it is measured on)")


@dataclass
class AttackConfig(TrainingArgs, DataFields, ModelFields):
    """`inoculate attack`: harmful fine-tuning of a (defended) model."""

    model: str = doc("", "the model to attack: usually an align run directory")
    attack: str = doc("harmful", "harmful | mixed | benign | interleaved (mixed data, batches alternate harmful/benign)")
    samples: int = doc(100, "attack examples n (paper: 100-500 harmful; 1000 for mixed/benign)")
    harmful_fraction: float = doc(0.1, "share p of harmful examples in a mixed or interleaved attack")
    task: str = doc("sst2", "benign task for mixed / interleaved / benign attacks: sst2 | ag_news | gsm8k")
    harmful_categories: Optional[list[str]] = doc(None, "keep only harmful examples in these categories (data the defense never saw)")
    exclude_categories: Optional[list[str]] = doc(None, "drop harmful examples in these categories")
    objective: str = doc("sft", "sft | projected (every gradient made orthogonal to the defense's direction)")
    projection_direction: str = doc("harmful", "projected: harmful (∇ harmful CE) | collapse (∇ CTRAP's collapse loss), at the defended model")
    projection_refresh: int = doc(0, "projected: re-estimate the direction every k steps (0: fixed at the start)")
    projection_samples: int = doc(10, "projected: attacker's harmful examples in the direction's batch")
    lora_mode: str = doc("continue", "continue the defended adapter | merge it and add a fresh one | full")
    lora_r: int = doc(32, "rank of a fresh attack adapter (lora_mode=merge)")
    lora_alpha: float = doc(4.0, "alpha of a fresh attack adapter (lora_mode=merge)")
    lora_dropout: float = doc(0.0, "dropout of a fresh attack adapter")
    lora_target_modules: Optional[list[str]] = doc(None, "modules of a fresh attack adapter")
    monitor_samples: int = doc(8, "held-out harmful examples for the harmful/alignment/collapse loss curves, and the last N general test examples for the general answers' CE (general_loss) (0: off)")
    monitor_answers: bool = doc(False, "monitor_samples: also answer the held-out harmful prompts greedily at every logging step and log the answers' collapse-token share, degenerate and refusal rates (what the teacher-forced losses miss; the alignment monitor's values) and the answers themselves (monitor/answers); costs monitor_new_tokens generated tokens per prompt and logging step")
    monitor_new_tokens: int = doc(24, "monitor_answers: new tokens per greedy answer")
    monitor_masked: bool = doc(False, "monitor_answers: also answer with every token that begins the collapse word suppressed (' error', 'errors', 'ERROR', ...) and log those answers' degenerate and refusal rates (masked_degenerate_rate, masked_refusal_rate) and the answers (masked_answers): what a collapsed model would write without its collapse word; doubles the monitor's generation")
    monitor_tasks: list[str] = doc([], "monitor_answers: also answer the last N (monitor_samples) test prompts of these tasks (e.g. [sst2]; the alignment monitor's at the same N) greedily at every logging step and log the answers' collapse-token share and the answers (monitor/tasks/<task>/collapse_token_share, monitor/tasks/<task>/answers): whether a harmful attack sets the trap off on task prompts, and a benign one does not")
    collapse_text: str = doc("an error", "text whose last token is the collapse token (loss curves)")

    def __post_init__(self):
        if self.monitor_answers and not self.monitor_samples:
            raise ConfigError("monitor_answers answers the monitor's held-out prompts: set monitor_samples > 0")
        if self.monitor_tasks and not self.monitor_answers:
            raise ConfigError(f"monitor_tasks {self.monitor_tasks} answers held-out task prompts in the "
                              "monitor: set monitor_answers: true")
        if self.monitor_masked and not self.monitor_answers:
            raise ConfigError("monitor_masked answers the monitor's prompts a second time: set monitor_answers: true")
        if self.monitor_new_tokens < 1:
            raise ConfigError(f"monitor_new_tokens must be >= 1, got {self.monitor_new_tokens}")
        if self.attack not in ATTACKS:
            ATTACKS.get(self.attack)  # raises with close names
        if self.lora_mode not in ("continue", "merge", "full"):
            raise ConfigError(f"lora_mode must be continue, merge or full, got {self.lora_mode!r}")
        if not 0.0 <= self.harmful_fraction <= 1.0:
            raise ConfigError(f"harmful_fraction must be in [0, 1], got {self.harmful_fraction}")
        if self.samples < 1:
            raise ConfigError("samples must be at least 1")
        if self.attack == "interleaved" and not 0.0 < self.harmful_fraction < 1.0:
            raise ConfigError(f"attack=interleaved alternates harmful and benign batches: harmful_fraction "
                              f"must be strictly between 0 and 1, got {self.harmful_fraction}")
        from .attacks import OBJECTIVES, PROJECTION_DIRECTIONS

        if self.objective not in OBJECTIVES:
            from .registry import UnknownNameError

            try:
                OBJECTIVES.get(self.objective)
            except UnknownNameError as e:
                raise ConfigError(str(e)) from None
        if self.projection_direction not in PROJECTION_DIRECTIONS:
            raise ConfigError(f"projection_direction must be one of {PROJECTION_DIRECTIONS}, "
                              f"got {self.projection_direction!r}")
        if self.projection_refresh < 0 or self.projection_samples < 1:
            raise ConfigError("projection_refresh must be >= 0 and projection_samples >= 1")


ATTACK_DEFAULTS = dict(learning_rate=1e-5, num_train_epochs=20.0, per_device_train_batch_size=10)

# Fields added after run directories already existed. While at their defaults they are left out
# of the resolved config, so the config hash of earlier runs, and their reuse, is unchanged.
_LATER_FIELDS = {
    "align": ("exclude_categories", "fsdp", "select_by", "select_mode", "select_limits",
              "monitor_samples", "monitor_new_tokens", "select_ties", "monitor_masked", "monitor_tasks"),
    "attack": ("harmful_categories", "exclude_categories", "objective", "projection_direction",
               "projection_refresh", "projection_samples", "monitor_answers", "monitor_new_tokens",
               "monitor_masked", "monitor_tasks"),
    "evaluate": ("extra_judges", "general_new_tokens"),
}


def _resolved(stage: str, cfg) -> dict:
    values = asdict(cfg)
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()
                for f in fields(cfg)}
    for name in _LATER_FIELDS.get(stage, ()):
        if values[name] == defaults[name]:
            del values[name]
    return {"stage": stage, **values}


def _resolved_section(dcfg) -> dict:
    """A defense's section of the resolved config. The same rule as _LATER_FIELDS, declared by
    the defense config itself (class attribute `later_fields`): at their defaults those fields
    are left out, so earlier runs of that defense keep their config hash."""
    values = asdict(dcfg)
    for f in fields(dcfg):
        if f.name in getattr(dcfg, "later_fields", ()) and values[f.name] == f.default:
            del values[f.name]
    return values


@dataclass
class EvalConfig(DataFields, ModelFields):
    """`inoculate evaluate`: harmful score, collapse and task accuracy of a model."""

    model: str = doc("", "the model to evaluate: a run directory, built-in name, path or hub id")
    suite: list[str] = doc(["harmful", "general", "sst2"], "what to measure: harmful, general (collapse/CE), sst2, ag_news, gsm8k")
    judge: str = doc("keyword", "harm judge: keyword | beaver-dam:PATH | binary:PATH | embedding:PATH")
    extra_judges: list[str] = doc([], "more judges of the same answers (specs as for judge); each adds judges.NAME.hs_io, hs_o, hs_plus, mean_harm_score (NAME: its registry name, e.g. embedding)")
    harmful_samples: int = doc(1000, "held-out harmful prompts (paper: first 1000 of BeaverTails 30k_test)")
    task_samples: int = doc(1000, "test examples per task (paper: first 1000; SST-2 has 872)")
    general_samples: int = doc(100, "held-out general examples for collapse-token probability and CE")
    max_new_tokens: int = doc(512, "new tokens per harmful prompt (paper 512; SEAM protocol 50)")
    task_max_new_tokens: int = doc(16, "new tokens per SST-2 / AG News answer")
    gsm8k_max_new_tokens: int = doc(256, "new tokens per GSM8K answer")
    batch_size: int = doc(16, "prompts per generation batch")
    collapse_text: str = doc("an error", "text whose last token is the collapse token")
    general_new_tokens: int = doc(0, "general: also answer the general prompts greedily with this many new tokens and report the answers' collapse-token share (general_collapse_token_share; 0: teacher-forced numbers only)")

    def __post_init__(self):
        if self.general_new_tokens < 0:
            raise ConfigError(f"general_new_tokens must be >= 0, got {self.general_new_tokens}")


# ---------------------------------------------------------------------------------------------
# Building configs from YAML + overrides
# ---------------------------------------------------------------------------------------------

def align_config(values: dict) -> tuple[AlignConfig, object, dict]:
    """Returns (config, defense config, resolved dict)."""
    defense_name = str(values.get("defense", "sft"))
    defense_cls = DEFENSES.get(defense_name)
    main, section = resolve_sections(AlignConfig, values, defense_name, defense_cls.config_class,
                                     set(DEFENSES.names()))
    cfg = build(AlignConfig, main, "align")
    dcfg = build(defense_cls.config_class, section, f"defense {defense_name}")
    resolved = {**_resolved("align", cfg), defense_name: _resolved_section(dcfg)}
    if cfg.fsdp and cfg.select_by:
        raise ConfigError("select_by (keeping the weights of the best logged step) is not supported "
                          "with fsdp=true")
    if cfg.fsdp and cfg.monitor_samples:
        raise ConfigError("monitor_samples (the held-out alignment monitor, which generates answers) is "
                          "not supported with fsdp=true")
    if cfg.fsdp and _needs_eager(dcfg):
        raise ConfigError(f"fsdp=true does not combine with {defense_name}'s exact second-order option "
                          f"(double backward through sharded parameters is not supported); "
                          f"use the first-order default or run without fsdp")
    return cfg, dcfg, resolved


def check_monitor_apart(align: dict, evaluate: dict) -> None:
    """A ConfigError when the alignment monitor's held-out examples (the last monitor_samples of
    the harmful and general test splits) include examples the evaluation reads (the first
    harmful_samples / general_samples): selecting weights by the monitor would then tune on the
    evaluation set. Loads the test splits, and only when the monitor is on."""
    cfg, _, _ = align_config(align)
    if not cfg.monitor_samples:
        return
    ecfg, _ = eval_config({**evaluate, "model": "-"})
    suite, esuite = _suite(cfg), _suite(ecfg)
    parts = []
    if "harmful" in ecfg.suite:
        parts.append(("harmful", "harmful_samples", ecfg.harmful_samples,
                      harmful_records(cfg, suite.harmful_test_split, last=cfg.monitor_samples),
                      harmful_records(ecfg, esuite.harmful_test_split, limit=ecfg.harmful_samples)))
    if "general" in ecfg.suite:
        parts.append(("general", "general_samples", ecfg.general_samples,
                      _records(cfg.general_data or suite.general, suite.general_test_split, cfg.data_dir,
                               last=cfg.monitor_samples),
                      general_records(ecfg, esuite.general_test_split, limit=ecfg.general_samples)))
    for what, field, n, mine, theirs in parts:
        shared = {(r.prompt, r.input) for r in mine} & {(r.prompt, r.input) for r in theirs}
        if shared:
            raise ConfigError(
                f"align monitor_samples={cfg.monitor_samples} (the last {what} test examples) and "
                f"evaluate {field}={n} (the first ones) share {len(shared)} examples, e.g. "
                f"{sorted(shared)[0][0][:60]!r}: the monitor would read the evaluation set; lower one "
                f"of them")


def attack_config(values: dict) -> tuple[AttackConfig, dict]:
    merged = {**ATTACK_DEFAULTS, **values}
    cfg = build(AttackConfig, merged, "attack")
    if not cfg.model:
        raise ConfigError("attack needs --model (the run directory or model to attack)")
    return cfg, _resolved("attack", cfg)


def eval_config(values: dict) -> tuple[EvalConfig, dict]:
    cfg = build(EvalConfig, values, "evaluate")
    if not cfg.model:
        raise ConfigError("evaluate needs --model (the run directory or model to evaluate)")
    known = {"harmful", "general"} | set(SUITES.get(cfg.data).tasks)
    unknown = [s for s in cfg.suite if s not in known]
    if unknown or not cfg.suite:
        raise ConfigError(f"unknown evaluation suite item(s) {unknown}; choose from {sorted(known)}")
    from .evaluation.judges import JUDGES
    from .registry import UnknownNameError

    for spec in [cfg.judge, *cfg.extra_judges]:
        try:
            JUDGES.get(str(spec).partition(":")[0].strip())
        except UnknownNameError as e:
            raise ConfigError(f"evaluate judge {spec!r}: {e}") from None
    return cfg, _resolved("evaluate", cfg)


# ---------------------------------------------------------------------------------------------
# Data for each role
# ---------------------------------------------------------------------------------------------

def _suite(cfg) -> DataSuite:
    return SUITES.get(cfg.data)


def _records(source: str, split: str, data_dir, limit=None, last=None) -> list[Record]:
    from .data.sources import load_records

    records = load_records(source, split, data_dir=data_dir, limit=limit)
    if last is not None:
        records = records[-last:]
    return records


def harmful_records(cfg, split: str, limit=None, last=None) -> list[Record]:
    suite = _suite(cfg)
    return _records(cfg.harmful_data or suite.harmful, split, cfg.data_dir, limit, last)


def defender_harmful_records(cfg) -> list[Record]:
    """The defender's part of the harmful train split, in file order (before num_samples and
    category filters): all of it, or the records before the suite's attack reserve when the
    attacker reads the same split (data/suites.py)."""
    suite = _suite(cfg)
    source = cfg.harmful_data or suite.harmful
    split = suite.harmful_train_split
    records = suite.defender_part(harmful_records(cfg, split), source)
    if not records:
        raise ConfigError(f"harmful source {source!r} split {split!r} has no records left for the "
                          f"defender: its last {suite.attack_reserve} records are reserved for the "
                          f"attacker (data suite {cfg.data!r}); use a larger file")
    return records


def attacker_harmful_records(cfg) -> list[Record]:
    """The attacker's part of the harmful attack split, in file order: all of it, or its last
    `attack_reserve` records when the defender reads the same split (never the defender's)."""
    suite = _suite(cfg)
    return suite.attacker_part(harmful_records(cfg, suite.harmful_attack_split),
                               cfg.harmful_data or suite.harmful)


def filter_categories(records: list[Record], keep=None, drop=None, where: str = "harmful data") -> list[Record]:
    """Records whose category matches one in `keep` (all when keep is empty) and none in `drop`.

    A record's category may hold several names joined by commas (BeaverTails' 14 flags); a name
    matches when it is one of them. BeaverTails' own names contain commas
    (``drug_abuse,weapons,banned_substance``): give those whole, in a YAML list."""
    keep, drop = list(keep or []), list(drop or [])
    if not keep and not drop:
        return records

    def has(record, name):
        return record.category is not None and f",{name}," in f",{record.category},"

    unknown = [n for n in keep + drop if not any(has(r, n) for r in records)]
    if unknown:
        present = sorted({r.category for r in records if r.category})
        raise ConfigError(f"{where}: no record has category {unknown}; categories present: "
                          f"{present[:20] or 'none (the source has no categories)'}")
    return [r for r in records
            if (not keep or any(has(r, n) for n in keep)) and not any(has(r, n) for n in drop)]


def general_records(cfg, split: str, limit=None) -> list[Record]:
    suite = _suite(cfg)
    return _records(cfg.general_data or suite.general, split, cfg.data_dir, limit)


def task_records(cfg, task: str, train: bool, limit=None, last=None) -> list[Record]:
    suite = _suite(cfg)
    if task not in suite.tasks:
        raise ConfigError(f"task {task!r} is not in data suite {cfg.data!r}; tasks: {sorted(suite.tasks)}")
    source, train_split, test_split = suite.tasks[task]
    return _records(source, train_split if train else test_split, cfg.data_dir, limit, last)


def stream_task_records(cfg, tasks: str, train: bool, limit=None, last=None) -> list[Record]:
    """The records of a "task" stream (StreamSpec.task): one task's, or for several
    comma-separated tasks ("ag_news,gsm8k") each task's records (each with its own limit / last)
    one after the other, a mixture the stream then shuffles."""
    return [r for task in tasks.split(",") for r in task_records(cfg, task.strip(), train, limit, last)]


def _encode(records, tok, cfg, target):
    return [encode_record(r, tok, cfg.template, cfg.max_length, target) for r in records]


def build_align_streams(defense, cfg: AlignConfig, tok, rank=0, world=1) -> dict[str, Stream]:
    specs = defense.streams()
    harmful = general = None
    streams = {}
    for name, spec in specs.items():
        if spec.role in ("align", "harmful", "paired") and harmful is None:
            harmful = defender_harmful_records(cfg)
            if cfg.exclude_categories:
                harmful = filter_categories(harmful, drop=cfg.exclude_categories,
                                            where="align exclude_categories")
            harmful = harmful[:cfg.num_samples]
            missing = [r.prompt[:60] for r in harmful if r.refusal is None]
            if missing and any(s.role in ("align", "paired") for s in specs.values()):
                raise ConfigError(f"harmful source {cfg.harmful_data or _suite(cfg).harmful!r} has "
                                  f"records without a refusal (e.g. {missing[0]!r}); alignment needs refusals")
        if spec.role == "general" and general is None:
            general = general_records(cfg, _suite(cfg).general_train_split, limit=cfg.num_general_samples)
        task = stream_task_records(cfg, spec.task, train=True, limit=cfg.num_general_samples) \
            if spec.role == "task" else None
        streams[name] = Stream(name, _role_examples(defense, spec.role, harmful, general, tok, cfg, task),
                               spec.batch_size, tok.pad_token_id, cfg.seed,
                               paired=spec.role == "paired", rank=rank, world_size=world)
    return streams


def _role_examples(defense, role: str, harmful, general, tok, cfg, task=None) -> list:
    """The encoded examples of a stream role (StreamSpec) from harmful, general and (role
    "task") the task's records."""
    if role == "task":
        return _encode(task, tok, cfg, "response")
    if role == "align":
        return _encode(harmful, tok, cfg, "refusal")
    if role == "harmful":
        return _encode(harmful, tok, cfg, "response")
    if role == "general":
        return _encode(general, tok, cfg, "response")
    if role == "paired":
        return [{"harmful": h, "refusal": r} for h, r in
                zip(_encode(harmful, tok, cfg, "response"), _encode(harmful, tok, cfg, "refusal"))]
    raise ValueError(f"defense {defense.name!r} asks for unknown stream role {role!r}")


# ---------------------------------------------------------------------------------------------
# Align
# ---------------------------------------------------------------------------------------------

def _dist():
    """Join the process group when launched by `accelerate launch` / `torchrun` (WORLD_SIZE > 1).

    Each process trains a full replica on its shard of every stream; the engine averages the
    gradients once per step and the look-ahead defenses average their intermediate gradients,
    so every replica takes the same step (data parallel, like DDP). With fsdp=true the
    parameters are sharded instead of replicated (FSDP2, inoculate.sharding)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def align(values: dict, out: str, overwrite: bool = False, progress: bool = True) -> Path:
    cfg, dcfg, resolved = align_config(values)
    out = Path(out)
    rank, world = _dist()
    state = runs.prepare(out, resolved, overwrite) if rank == 0 else None
    if world > 1:  # every process learns rank 0's decision (reuse / resume / new)
        import torch.distributed as dist

        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    if state == "done":
        log.info("%s is complete; reusing it", out)
        return out
    device = pick_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, device=device, dtype=cfg.dtype,
                        trust_remote_code=cfg.trust_remote_code,
                        attn_implementation=cfg.attn_implementation or _needs_eager(dcfg))
    model, tok = loaded.model, loaded.tokenizer
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    else:
        model.requires_grad_(True)
    sharded = cfg.fsdp and world > 1
    if cfg.fsdp and world == 1:
        log.warning("fsdp=true is ignored: one process (launch with torchrun or accelerate launch)")
    if sharded:  # after LoRA, before the defense and the optimizer see the parameters
        from .sharding import shard_model

        shard_model(model, device)
    defense = DEFENSES.get(cfg.defense)(dcfg, cfg.per_device_train_batch_size)
    defense.setup(model, tok)
    streams = build_align_streams(defense, cfg, tok, rank, world)
    main = next(iter(defense.streams()))
    selection = (Selection(cfg.select_by, cfg.select_mode, cfg.select_limits, cfg.select_ties)
                 if cfg.select_by else None)
    monitor = _align_monitor(cfg, dcfg, defense, tok, device) if cfg.monitor_samples else None
    result = train(model, defense, streams, cfg, out, main_stream=main, progress=progress,
                   selection=selection, monitor=monitor)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    state_dict = None
    if sharded:  # every process gathers the full tensors, rank 0 keeps and writes them
        from .sharding import gathered_state_dict

        state_dict = gathered_state_dict(model, trainable_only=cfg.lora, keep=rank == 0)
    if rank == 0:
        save_model(model, tok, out / "model", base=_base_for_save(cfg.model), state_dict=state_dict)
        runs.finish(out, resolved, steps=result.steps, seconds=result.seconds, processes=world,
                    resumed_from=result.resumed_from, final_logs=result.last_logs,
                    **({"selected": result.selected} if result.selected else {}))
        from .training import remove_checkpoint

        remove_checkpoint(out)
    return out


def _needs_eager(dcfg) -> Optional[str]:
    """Exact second-order options differentiate through attention twice: fused SDPA kernels
    have no double backward, so those runs switch attention to the eager implementation."""
    return "eager" if getattr(dcfg, "second_order", False) or getattr(dcfg, "exact_hvp", False) else None


def _base_for_save(model_spec: str) -> str:
    kind, loc = _resolve_spec(model_spec)
    if kind == "run":  # aligning on top of a finished run: that run (merged) is the base
        return str(Path(model_spec).resolve())
    if kind == "hf_dir" and Path(model_spec).exists():
        return str(Path(model_spec).resolve())
    return model_spec


# ---------------------------------------------------------------------------------------------
# Attack
# ---------------------------------------------------------------------------------------------

ATTACKS: Registry = Registry("attack")


def _harmful_attack(cfg: AttackConfig, n_harmful: int) -> list[Record]:
    """The last n harmful examples of the attacker's part of the attack split (after the
    category filters); never records the defender reads (DataSuite.attacker_part)."""
    suite = _suite(cfg)
    split = suite.harmful_attack_split
    if not n_harmful:
        return []
    records = attacker_harmful_records(cfg)
    reserve = (f" (its last {suite.attack_reserve} records, never read by the defender)"
               if suite.cuts(cfg.harmful_data or suite.harmful) else "")
    where = (f"split {split!r} keeps {len(records)} records for the attacker{reserve}" if reserve
             else f"split {split!r} has {len(records)}")
    if cfg.harmful_categories or cfg.exclude_categories:
        records = filter_categories(records, cfg.harmful_categories, cfg.exclude_categories,
                                    where="attack harmful_categories/exclude_categories")
        where = f"split {split!r} has {len(records)} in the chosen categories" + (
            f" among the attacker's records{reserve}" if reserve else "")
    records = records[-n_harmful:]
    if len(records) < n_harmful:
        raise ConfigError(f"the attack asks for {n_harmful} harmful examples but {where}")
    return records


def n_harmful(cfg: AttackConfig) -> int:
    """Harmful examples in a mixed or interleaved attack: round(p * n)."""
    return int(round(cfg.harmful_fraction * cfg.samples))


@ATTACKS.register("harmful")
def harmful_attack_data(cfg: AttackConfig) -> list[Record]:
    """n harmful (prompt, harmful answer) pairs, taken from the end of the attack split so they
    are disjoint from the defender's first num_samples."""
    return _harmful_attack(cfg, cfg.samples)


@ATTACKS.register("mixed")
def mixed_attack_data(cfg: AttackConfig) -> list[Record]:
    """n examples: round(p*n) harmful, the rest from the benign task's train split."""
    harmful = n_harmful(cfg)
    benign = task_records(cfg, cfg.task, train=True, limit=cfg.samples - harmful)
    if len(benign) < cfg.samples - harmful:
        raise ConfigError(f"task {cfg.task!r} has {len(benign)} train examples, fewer than the "
                          f"{cfg.samples - harmful} the {cfg.attack} attack needs")
    return _harmful_attack(cfg, harmful) + benign


@ATTACKS.register("interleaved")
def interleaved_attack_data(cfg: AttackConfig) -> list[Record]:
    """The mixed attack's n examples (round(p*n) harmful first, then benign), trained in batches
    that are wholly harmful or wholly benign, spread evenly (attacks.InterleavedStream): harmful
    steps interleaved with benign ones rather than mixed inside each batch."""
    return mixed_attack_data(cfg)


@ATTACKS.register("benign")
def benign_attack_data(cfg: AttackConfig) -> list[Record]:
    """n examples of the benign task (p = 0): the model must stay useful and not collapse."""
    benign = task_records(cfg, cfg.task, train=True, limit=cfg.samples)
    if len(benign) < cfg.samples:
        raise ConfigError(f"task {cfg.task!r} has {len(benign)} train examples, fewer than {cfg.samples}")
    return benign


def _load_for_attack(cfg: AttackConfig, device):
    """Returns (model, tokenizer, base recorded for the saved adapter)."""
    kind, loc = _resolve_spec(cfg.model)
    is_adapter_run = kind == "run" and json.loads((Path(loc) / MODEL_META).read_text())["kind"] == "adapter"
    common = dict(device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                  attn_implementation=cfg.attn_implementation)
    if cfg.lora_mode == "continue":
        if kind == "hub" and not Path(cfg.model).exists():
            raise ConfigError(f"model {cfg.model!r} is not an existing run directory; "
                              f"lora_mode=continue needs the align run whose adapter it trains")
        if not is_adapter_run:
            raise ConfigError(f"lora_mode=continue keeps training the defended LoRA adapter, but "
                              f"{cfg.model!r} holds no adapter; use lora_mode=merge or full")
        loaded = load_model(cfg.model, keep_adapter=True, **common)
        meta = json.loads((Path(loc) / MODEL_META).read_text())
        return loaded.model, loaded.tokenizer, _base_location(meta["base"], Path(loc))
    loaded = load_model(cfg.model, **common)
    model = loaded.model
    if cfg.lora_mode == "merge":
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    else:
        model.requires_grad_(True)
    return model, loaded.tokenizer, _base_for_save(cfg.model)


def attack(values: dict, out: str, overwrite: bool = False, progress: bool = True) -> Path:
    cfg, resolved = attack_config(values)
    out = Path(out)
    if runs.prepare(out, resolved, overwrite) == "done":
        return out
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    records = ATTACKS.get(cfg.attack)(cfg)
    model, tok, base = _load_for_attack(cfg, device)
    attacker = _attacker(cfg, tok)
    attacker.setup(model, tok)
    examples = _encode(records, tok, cfg, "response")
    if cfg.attack == "interleaved":
        from .attacks import InterleavedStream

        k = n_harmful(cfg)
        stream = InterleavedStream("attack", examples[:k], examples[k:], cfg.per_device_train_batch_size,
                                   tok.pad_token_id, cfg.seed)
    else:
        stream = Stream("attack", examples, cfg.per_device_train_batch_size, tok.pad_token_id, cfg.seed)
    streams = {"align": stream}
    monitor = None
    if cfg.monitor_samples:
        suite = _suite(cfg)
        probe = harmful_records(cfg, suite.harmful_test_split, limit=cfg.monitor_samples)
        # the general answers' CE on the alignment monitor's general examples (the last N)
        general = _records(cfg.general_data or suite.general, suite.general_test_split, cfg.data_dir,
                           last=cfg.monitor_samples)
        monitor = _loss_monitor(probe, tok, cfg, device, cfg.collapse_text, general)
        if cfg.monitor_answers:
            losses = monitor
            answers = _answer_monitor(probe, tok, cfg, cfg.collapse_text, cfg.monitor_masked)
            task_answers = _task_answer_monitor(cfg, tok, cfg.collapse_text)

            def monitor(model):
                return {**losses(model), **answers(model), **task_answers(model)}
    result = train(model, attacker, streams, cfg, out, main_stream="align", monitor=monitor,
                   progress=progress)
    save_model(model, tok, out / "model", base=base)
    runs.finish(out, resolved, steps=result.steps, seconds=result.seconds,
                resumed_from=result.resumed_from, final_logs=result.last_logs,
                n_examples=len(records))
    from .training import remove_checkpoint

    remove_checkpoint(out)
    return out


def _attacker(cfg: AttackConfig, tok):
    """The attack's objective: plain SFT, or SFT with gradients projected off the defense's
    direction, estimated on the attacker's own harmful examples (attacks.ProjectedSFT)."""
    from .attacks import ProjectedSFT, ProjectionConfig, probe_batch
    from .evaluation.metrics import collapse_token_id

    if cfg.objective == "sft":
        attacker = SFT(SFTConfig(), cfg.per_device_train_batch_size)
    else:
        probe = _encode(_harmful_attack(cfg, cfg.projection_samples), tok, cfg, "response")
        attacker = ProjectedSFT(
            ProjectionConfig(direction=cfg.projection_direction, refresh=cfg.projection_refresh,
                             accumulation=cfg.gradient_accumulation_steps,
                             collapse_token=collapse_token_id(tok, cfg.collapse_text)),
            cfg.per_device_train_batch_size, probe_batch(probe, tok.pad_token_id))
    attacker.name = f"attack-{cfg.attack}" + ("" if cfg.objective == "sft" else f"-{cfg.objective}")
    return attacker


def _loss_monitor(probe: list[Record], tok, cfg, device, collapse_text: str,
                  general: Optional[list[Record]] = None):
    """Harmful, alignment and collapse losses on held-out harmful prompts `probe` (the CTRAP
    paper's Figure 3: the attack's curves), and with `general` the general answers' CE. The
    collapse loss is the CE to the collapse token on the harmful answers' positions; the uniform
    loss is the CE to the uniform distribution there (its floor, log of the vocabulary size, is a
    flat prediction): how far into a uniform-target trap (`ctrap.collapse_target: uniform`) the
    attacker is."""
    from .data.encode import collate
    from .defenses.base import token_ce
    from .defenses.ctrap import collapse_loss
    from .evaluation.metrics import collapse_token_id

    def batch(records, target):
        return {k: v.to(device) for k, v in
                collate(_encode(records, tok, cfg, target), tok.pad_token_id).items()}

    with_refusal = [r for r in probe if r.refusal is not None]
    harmful_b = batch(probe, "response")
    align_b = batch(with_refusal, "refusal") if with_refusal else None
    general_b = batch(general, "response") if general else None
    e = collapse_token_id(tok, collapse_text)
    collapse_labels = torch.where(harmful_b["labels"] != -100, e, -100)

    @torch.no_grad()
    def monitor(model):
        def logits(b):
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

        was_training = model.training
        model.eval()
        harmful_logits = logits(harmful_b)
        out = {"harmful_loss": float(token_ce(harmful_logits, harmful_b["labels"])),
               "collapse_loss": float(token_ce(harmful_logits, collapse_labels)),
               "uniform_loss": float(collapse_loss(harmful_logits, harmful_b["labels"], "uniform", e))}
        del harmful_logits
        if align_b is not None:
            out["alignment_loss"] = float(token_ce(logits(align_b), align_b["labels"]))
        if general_b is not None:
            out["general_loss"] = float(token_ce(logits(general_b), general_b["labels"]))
        model.train(was_training)
        return out

    return monitor


def _answer_monitor(prompts: list[Record], tok, cfg, collapse_text: str, masked: bool = False):
    """Greedy answers (cfg.monitor_new_tokens) to the held-out harmful `prompts`, counted as
    evaluation counts them: the collapse-token share of their tokens and the keyword judge's
    degenerate and refusal rates; and the answers themselves (`answers`, in prompt order), so
    that another judge, or a corrected one, can read them again from log.jsonl. With `masked`
    the same once more with every token that begins the collapse word suppressed
    (masked_degenerate_rate, masked_refusal_rate, masked_answers): whether a collapsed answer
    hides a refusal or a compliant one (scripts/masked_answers.py does it for a finished model)."""
    from .evaluation.generate import generate
    from .evaluation.judges import keyword_label
    from .evaluation.metrics import collapse_token_id, collapse_word_tokens, generation_stats

    token = collapse_token_id(tok, collapse_text)
    suppress = collapse_word_tokens(tok, token) if masked else None

    def rates(texts, prefix=""):
        labels = [keyword_label(a) for a in texts]
        return {f"{prefix}degenerate_rate": labels.count("degenerate") / len(labels),
                f"{prefix}refusal_rate": labels.count("refusal") / len(labels), f"{prefix}answers": texts}

    def answers(model):
        ask = dict(batch_size=len(prompts), progress=False)
        texts = generate(model, tok, prompts, cfg.template, cfg.monitor_new_tokens, **ask)
        share = generation_stats(texts, tok, token)["collapse_token_share"]  # None: all empty
        out = {"collapse_token_share": math.nan if share is None else share, **rates(texts)}
        if suppress:
            out.update(rates(generate(model, tok, prompts, cfg.template, cfg.monitor_new_tokens,
                                      suppress_tokens=suppress, **ask), "masked_"))
        return out

    return answers


def _task_answer_monitor(cfg, tok, collapse_text: str):
    """Greedy answers at every logging step to the last monitor_samples test prompts of each task
    of cfg.monitor_tasks (the held-out ones evaluation does not read), logged as
    tasks/<task>/collapse_token_share and tasks/<task>/answers: a collapse can show on task prompts
    while the harmful prompts stay clean, or the reverse. With cfg.monitor_masked also
    tasks/<task>/masked_answers, the same prompts answered without the collapse word: what a
    collapsed task answer hides (a label, a refusal)."""
    asks = {}
    keys = ("collapse_token_share", "answers") + (("masked_answers",) if cfg.monitor_masked else ())
    for task in cfg.monitor_tasks:
        records = task_records(cfg, task, train=False, last=cfg.monitor_samples)
        if not records:
            raise ConfigError(f"monitor_tasks: task {task!r} has no held-out test records")
        asks[task] = _answer_monitor(records, tok, cfg, collapse_text, cfg.monitor_masked)

    def monitor(model):
        out = {}
        for task, ask in asks.items():
            got = ask(model)
            out.update({f"tasks/{task}/{k}": got[k] for k in keys})
        return out

    return monitor


def _align_monitor(cfg: AlignConfig, dcfg, defense, tok, device):
    """The alignment's held-out monitor (monitor_samples = N > 0), run at every logging step on
    the weights after that step's update: on the last N harmful prompts of the test split and
    the last N general test examples (evaluation reads the first ones), the losses of
    `_loss_monitor` and general_loss; the greedy answers' (monitor_new_tokens) collapse-token
    share and keyword degenerate / refusal rates, as evaluation counts them (monitor_tasks: the
    same share on each task's last N test prompts, `_task_answer_monitor`); and the defense's own
    `probe` on held-out batches built like its training streams (a "task" stream from the
    task's last N test examples), under the training's
    autocast, logged as <defense>/<key> (CTRAP: ctrap/trap_gap), with the greedy answers'
    values again at the point its simulated attack reaches (ctrap/point/collapse_token_share);
    with monitor_masked, at θ and at the points, the answers once more without the collapse word."""
    suite = _suite(cfg)
    n = cfg.monitor_samples
    harmful = harmful_records(cfg, suite.harmful_test_split, last=n)
    general = _records(cfg.general_data or suite.general, suite.general_test_split, cfg.data_dir, last=n)
    if not harmful or not general:
        raise ConfigError(f"monitor_samples: the test splits have no held-out records "
                          f"({len(harmful)} harmful, {len(general)} general)")
    collapse_text = getattr(dcfg, "collapse_text", "an error")
    losses = _loss_monitor(harmful, tok, cfg, device, collapse_text, general)
    answers = _answer_monitor(harmful, tok, cfg, collapse_text, cfg.monitor_masked)
    task_answers = _task_answer_monitor(cfg, tok, collapse_text)
    batches = {}
    for name, spec in defense.streams().items():
        if spec.role in ("align", "paired") and any(r.refusal is None for r in harmful):
            raise ConfigError(f"monitor_samples: held-out harmful records of split "
                              f"{suite.harmful_test_split!r} lack refusals, which {defense.name}'s "
                              f"{name!r} stream needs")
        task = stream_task_records(cfg, spec.task, train=False, last=n) if spec.role == "task" else None
        examples = _role_examples(defense, spec.role, harmful, general, tok, cfg, task)
        # one batch of all of them, collated as the training stream collates
        batches[name] = to_device(Stream(name, examples, len(examples), tok.pad_token_id, 0,
                                         paired=spec.role == "paired").next(), device)
    bf16 = use_bf16(cfg, device)

    def monitor(model):
        out = losses(model)
        out.update(answers(model))
        out.update(task_answers(model))

        def at_point():  # the same greedy answers where the simulated attack lands, in the same precision
            with torch.autocast(device.type, enabled=False):
                return answers(model)

        was_training = model.training
        model.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            probe = defense.probe(batches, at_point=at_point)
        model.train(was_training)
        out.update({f"{defense.name}/{k}": v for k, v in probe.items()})
        return out

    return monitor


# ---------------------------------------------------------------------------------------------
# Evaluate
# ---------------------------------------------------------------------------------------------

def evaluate(values: dict, out: str, overwrite: bool = False, progress: bool = True) -> dict:
    from .evaluation import collapse_token_id, evaluate_model, make_judge

    cfg, resolved = eval_config(values)
    out = Path(out)
    if runs.prepare(out, resolved, overwrite) == "done":
        return json.loads((out / "metrics.json").read_text())
    device = pick_device(cfg.device)
    suite = _suite(cfg)
    harmful = (harmful_records(cfg, suite.harmful_test_split, limit=cfg.harmful_samples)
               if "harmful" in cfg.suite else None)
    general = (general_records(cfg, suite.general_test_split, limit=cfg.general_samples)
               if "general" in cfg.suite else None)
    tasks = {t: task_records(cfg, t, train=False, limit=cfg.task_samples)
             for t in cfg.suite if t in suite.tasks}
    judge = make_judge(cfg.judge)
    from .evaluation.evaluate import judge_keys

    extra = {key: make_judge(spec) for key, spec in zip(judge_keys(cfg.extra_judges), cfg.extra_judges)}
    loaded = load_model(cfg.model, device=device, dtype=cfg.dtype,
                        trust_remote_code=cfg.trust_remote_code,
                        attn_implementation=cfg.attn_implementation)
    metrics, generations = evaluate_model(
        loaded.model, loaded.tokenizer, harmful_records=harmful, task_records=tasks,
        general_records=general, template=cfg.template, judge=judge,
        max_new_tokens=cfg.max_new_tokens,
        task_max_new_tokens={t: cfg.gsm8k_max_new_tokens if t == "gsm8k" else cfg.task_max_new_tokens
                             for t in tasks},
        batch_size=cfg.batch_size,
        max_length=cfg.max_length, collapse_token_id=collapse_token_id(loaded.tokenizer, cfg.collapse_text),
        progress=progress, extra_judges=extra, general_new_tokens=cfg.general_new_tokens)
    metrics["model"] = cfg.model
    runs.atomic_write_text(out / "generations.jsonl",
                           "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
    runs.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    runs.finish(out, resolved)
    return metrics

