"""Experiments: a grid of defenses × attacks × seeds in one YAML file, run with one command.

    inoculate run configs/experiments/smoke.yaml

File format (every key but `defenses` optional)::

    name: smoke
    out: runs/smoke                 # where every cell's run directories go
    align_out: runs/other           # optional: where the aligned models go (default: out)
    model: tiny-llama               # shared by every stage
    data: starter                   # data suite, and data_dir, shared by every stage
    seeds: [42]
    align:    {max_steps: 4}        # AlignConfig fields shared by every defense
    defenses:                       # label -> AlignConfig fields (defense defaults to the label)
      sft: {}
      ctrap: {ctrap: {alpha: 0.1}}
    attack_suite: paper-ctrap-small # optional: attacks from configs/attacks/NAME.yaml (or a list)
    attack:   {max_steps: 4}        # AttackConfig fields shared by every attack
    attacks:                        # label -> AttackConfig fields; `sweep` expands a grid
      harmful: {attack: harmful, sweep: {samples: [20, 40]}}
      benign-sst2: {attack: benign, task: sst2, samples: 20}
      benign-then-harmful: {chain: [benign-sst2, harmful-once]}   # rounds run in order
      harmful-once: {attack: harmful, samples: 20}
    evaluate: {suite: [harmful, general, sst2], harmful_samples: 20}
    worst_case: {utility: tasks.sst2.accuracy, min: 0.3}   # optional bound for the report

Attack suites: ``attack_suite: NAME`` (or a list of names, or a path to a .yaml file) adds the
attacks of ``configs/attacks/NAME.yaml``. A suite file has the two keys of an experiment's own
attack part: ``attack`` (fields shared by the suite's entries) and ``attacks``. An attack's
fields are, from lowest to highest priority: the suite's ``attack``, the experiment's ``attack``,
the entry's own fields, its sweep point. An experiment's own ``attacks`` entry replaces a suite
entry of the same label; two suites defining the same label are an error.

Chains: an entry ``{chain: [A, B, ...]}`` fine-tunes the defended model with attack A, then
attacks A's output with B, and so on (A, B: labels of single-run entries of the same grid; a
label may repeat). The chain's own fields and sweep apply to its last round. The first rounds
reuse the run directories of the plain cells A (and A+B, ...), and only the chain's end result
is evaluated; its row says ``chain: "A > B"``.

Worst case: ``worst_case: {utility: COLUMN, min: X | max: X | max_drop: X | max_rise: X,
metric: harmful_score}`` bounds a results column (``tasks.sst2.accuracy``, ``general_ce``, ...)
absolutely (min, max) or relative to the same defense and seed without attack (max_drop for
higher-is-better, max_rise for lower-is-better); the report's worst-case table then gives, per
defense, the attack cell with the highest metric among those within the bound (the
attacker-side search over whatever the attacks sweep: lr, steps, rank, ...).

Shared alignment: ``align_out: DIR`` puts the align runs in DIR/DEFENSE/sSEED/align instead of
under ``out``. Two experiments with the same align settings and the same ``align_out`` align
each defense once: the second reuses the first's finished models (and resumes its unfinished
ones); an align run with different settings in that folder is refused, as for any run directory.

Cells: for every defense and seed, the defended model is evaluated as is (attack "none") and
after every attack. Each stage's run directory is reused when complete and resumes when it was
killed, so rerunning the same command continues the grid. Results go to OUT/results.jsonl,
one row per cell with every metric and the hash of the cell's configs.

Several GPUs: ``inoculate run EXP.yaml --gpus 0,1`` runs the cells of different (defense,
seed) groups concurrently, one worker process per GPU with CUDA_VISIBLE_DEVICES set to it; the
cells of one group (they share the align run) stay in order in one worker. Without ``--gpus``
cells run one after another in this process.

A cluster: ``inoculate run EXP.yaml --cluster slurm`` submits one submitit job per (defense,
seed) group instead (``local``: a local process per job; ``debug``: in this process), with the
file's optional ``cluster:`` mapping (``{slurm_partition: gpu, timeout_min: 720, mem_gb: 64}``)
as the jobs' parameters; logs go to OUT/submitit/. Needs ``pip install 'inoculate[cluster]'``.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from . import pipeline, runs
from .attacks import load_attack_suite
from .config import ConfigError, config_hash, load_yaml
from .defenses import DEFENSES
from .registry import UnknownNameError

log = logging.getLogger(__name__)

_SHARED = ("model", "data", "data_dir")


@dataclass
class Cell:
    defense: str           # label
    attack: str            # label ("none" = no attack)
    seed: int
    align: dict
    attack_values: Optional[dict]
    evaluate: dict
    sweep: dict = field(default_factory=dict)
    # chains: the earlier rounds, as (run directory name, AttackConfig values), in order
    rounds: list = field(default_factory=list)
    chain: Optional[list] = None  # labels of every round, the last included
    align_out: Optional[str] = None  # the experiment's align_out (None: the align run goes under out)

    @property
    def key(self) -> str:
        return f"{self.defense}/s{self.seed}/{self.attack}"


def load_experiment(path: str, data_dir: Optional[str] = None,
                    overrides: Optional[dict[str, str]] = None) -> dict:
    """The experiment file as a dict, with `name` and `out` filled in. data_dir (the command
    line's --data-dir) replaces the file's `data_dir`: every stage of every cell reads its
    sources from that folder. overrides (the command line's --set, see set_field) are applied
    before `name` and `out` are filled in."""
    p = Path(path)
    spec = load_yaml(path, what="experiment file")
    for dotted, text in (overrides or {}).items():
        set_field(spec, dotted, text)
    spec.setdefault("name", p.stem)
    spec.setdefault("out", str(Path("runs") / spec["name"]))
    if data_dir is not None:
        spec["data_dir"] = str(data_dir)
    return spec


def set_field(spec: dict, dotted: str, text: str) -> None:
    """`inoculate run --set KEY=VALUE`: KEY is a dotted path into the experiment file
    (`align.bf16`, `defenses.ROW.ctrap.alpha`); a key with dots of its own, such as a row named
    `ctrap-l0.3`, is matched whole where the file has it. Missing mappings on the way are
    created; VALUE is read as YAML (false, 0.02, [48, 49])."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {dotted}={text}: the value is not valid YAML") from None
    parts, node, path = dotted.split("."), spec, []
    while True:
        # the longest run of parts that names a key here, else the first part alone
        n = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in node), 1)
        key, parts = ".".join(parts[:n]), parts[n:]
        path.append(key)
        if not key:
            raise ConfigError(f"--set {dotted}: empty key")
        if not parts:
            node[key] = value
            return
        child = node.setdefault(key, {})
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(path)} is {child!r} in the file, not a mapping "
                              f"of fields (write it as a mapping to override inside it)")
        node = child


def describe(spec: dict, cells: list, only: Optional[str] = None) -> str:
    """What `inoculate run --dry-run` prints: the grid's size, its data, and one line per cell
    (only those whose key contains `only`, when given); nothing is loaded or trained."""
    from .data.sources import SOURCES
    from .data.suites import SUITES

    groups = list(dict.fromkeys((c.defense, c.seed) for c in cells))
    attack_dirs = {(c.defense, c.seed, name) for c in cells for name, _ in c.rounds}
    attack_dirs |= {(c.defense, c.seed, c.attack) for c in cells if c.attack_values is not None}
    data = spec.get("data", "beavertails")
    suite = SUITES.get(data)
    lines = [
        f"experiment {spec['name']}: {len(cells)} cells = {len({d for d, _ in groups})} defenses x "
        f"{len({s for _, s in groups})} seeds x {len(cells) // max(1, len(groups))} (no attack + "
        f"{len(cells) // max(1, len(groups)) - 1} attacks); {len(groups)} align runs, "
        f"{len(attack_dirs)} attack runs, {len(cells)} evaluations",
        f"out: {spec['out']}",
        f"model: {spec.get('model', 'smollm2-135m-instruct')}",
        f"data: suite {data!r} from "
        + ("the packaged starter files" if SOURCES.get(suite.harmful).default_dir is not None
           else spec.get("data_dir") or "the Hugging Face hub (no data_dir)") + "; "
        f"harmful {suite.harmful} ({suite.harmful_train_split} / {suite.harmful_attack_split} / "
        f"{suite.harmful_test_split} for defender / attacker / evaluation"
        + (f", last {suite.attack_reserve} of {suite.harmful_attack_split} kept for the attacker"
           if suite.shares_harmful_split else "") + f"), general {suite.general}, tasks "
        + ", ".join(f"{t}={src}" for t, (src, _, _) in suite.tasks.items()),
    ]
    evaluate = cells[0].evaluate if cells else {}
    judges = [evaluate.get("judge", "keyword"), *evaluate.get("extra_judges", [])]
    lines.append(f"evaluate: {', '.join(evaluate.get('suite', ['harmful', 'general', 'sst2']))}; "
                 f"judges {', '.join(judges)}")
    if only:
        lines.append(f"--only {only!r}: {sum(only in c.key for c in cells)} of {len(cells)} cells")
    for i, c in enumerate(cells, 1):
        if only and only not in c.key:
            continue
        if c.attack_values is None:
            a = c.align
            what = (f"align {a['defense']}" + (f", {a['max_steps']} steps" if a.get("max_steps", -1) > 0
                                                else f", {a.get('num_train_epochs', 20)} epochs")
                    + (", full weights" if a.get("lora") is False else ""))
        else:
            v = c.attack_values
            what = f"{v.get('attack', 'harmful')}, n={v.get('samples', 100)}"
            if v.get("attack") in ("mixed", "interleaved"):
                what += f", p={v.get('harmful_fraction', 0.1)}"
            if v.get("attack") in ("benign", "mixed", "interleaved"):
                what += f", task={v.get('task', 'sst2')}"
            what += f", lr={v.get('learning_rate', pipeline.ATTACK_DEFAULTS['learning_rate'])}"
            what += (f", {v['max_steps']} steps" if v.get("max_steps", -1) > 0 else
                     f", {v.get('num_train_epochs', pipeline.ATTACK_DEFAULTS['num_train_epochs'])} epochs")
            what += f", {v.get('lora_mode', 'continue')}"
            if v.get("objective", "sft") != "sft":
                what += f", {v['objective']} ({v.get('projection_direction', 'harmful')})"
            if c.chain:
                what += f"; chain {' > '.join(c.chain)}"
        lines.append(f"{i:4d} {c.key}: {what}")
    return "\n".join(lines)


def expand(spec: dict) -> list[Cell]:
    """The grid as a list of cells; raises ConfigError for unknown names or an empty grid."""
    known = {"name", "out", "align_out", "seeds", "align", "defenses", "attack", "attacks", "attack_suite",
             "evaluate", "worst_case", "cluster", *_SHARED}
    unknown = set(spec) - known
    if unknown:
        raise ConfigError(f"unknown experiment key(s) {sorted(unknown)}; known: {sorted(known)}")
    if not isinstance(spec.get("cluster") or {}, dict):
        raise ConfigError(f"experiment key `cluster` must be a mapping of submitit job parameters "
                          f"(e.g. {{slurm_partition: gpu, timeout_min: 720}}), got {spec['cluster']!r}")
    defenses = spec.get("defenses") or {}
    if isinstance(defenses, list):
        defenses = {d: {} for d in defenses}
    if not defenses:
        raise ConfigError("experiment has an empty grid: `defenses` names no defense")
    if spec.get("worst_case") is not None:
        from .report import parse_worst_case

        parse_worst_case(spec["worst_case"])
    seeds = spec.get("seeds") or [42]
    shared = {k: spec[k] for k in _SHARED if k in spec}
    entries = attack_entries(spec)
    cells = []
    apart = set()  # the (data, monitor, evaluation) settings already checked: each loads the test splits
    for (label, dvalues), seed in itertools.product(defenses.items(), seeds):
        dvalues = dict(dvalues or {})
        dvalues.setdefault("defense", label)
        _known(DEFENSES, dvalues["defense"], f"defenses.{label}")
        align = {**shared, **(spec.get("align") or {}), **dvalues, "seed": seed}
        pipeline.align_config(align)  # validate now, not halfway through the grid
        evaluate = {**shared, **(spec.get("evaluate") or {})}
        pipeline.eval_config({**evaluate, "model": "placeholder"})  # validate
        key = json.dumps([{k: align.get(k) for k in ("data", "data_dir", "harmful_data", "general_data",
                                                     "monitor_samples")}, evaluate], sort_keys=True, default=str)
        if key not in apart:
            pipeline.check_monitor_apart(align, evaluate)
            apart.add(key)
        align_out = spec.get("align_out")
        cells.append(Cell(label, "none", seed, align, None, evaluate, align_out=align_out))
        for alabel, (avalues, sweep, chain) in entries.items():
            rounds = []
            if chain:
                for i, round_label in enumerate(chain[:-1]):
                    values = {**shared, **entries[round_label][0], "seed": seed}
                    rounds.append(("+".join(_slug(c) for c in chain[:i + 1]), values))
            keys = list(sweep)
            for combo in itertools.product(*(sweep[k] for k in keys)) if keys else [()]:
                point = dict(zip(keys, combo))
                values = {**shared, **avalues, **point, "seed": seed}
                where = f"attacks.{alabel}" + (f" (sweep point {point})" if point else "")
                _validate_attack(values, where)
                name = alabel + "".join(f"-{k}={v}" for k, v in point.items())
                cells.append(Cell(label, name, seed, align, values, evaluate, sweep=point,
                                  rounds=rounds, chain=chain, align_out=align_out))
    return cells


def attack_entries(spec: dict) -> dict:
    """label -> (AttackConfig values without seed/shared keys, sweep, chain or None), with the
    suites' entries first, then the experiment's own; chains resolved to their rounds' labels."""
    suites = spec.get("attack_suite") or []
    suites = [suites] if isinstance(suites, str) else list(suites)
    exp_shared = spec.get("attack") or {}
    if not isinstance(exp_shared, dict):
        raise ConfigError("experiment key `attack` must be a mapping of AttackConfig fields")
    raw: dict = {}  # label -> (entry, suite shared fields, where)
    origin: dict = {}
    for name in suites:
        suite_shared, suite_attacks = load_attack_suite(str(name))
        for label, entry in suite_attacks.items():
            if label in origin:
                raise ConfigError(f"attack label {label!r} is defined by suites {origin[label]!r} and "
                                  f"{name!r}; rename one, or override it in the experiment's attacks")
            origin[label] = name
            raw[label] = (entry, suite_shared, f"attack suite {name}: attacks.{label}")
    own = spec.get("attacks") or {}
    if isinstance(own, list):
        own = {a: {"attack": a} for a in own}
    if not isinstance(own, dict):
        raise ConfigError("experiment key `attacks` must be a mapping of label -> fields (or a list)")
    for label, entry in own.items():
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"experiment attacks.{label}: expected a mapping of fields, got {entry!r}")
        raw[str(label)] = (dict(entry or {}), {}, f"attacks.{label}")
    entries: dict = {}  # label -> (values, sweep, chain, own fields, where)
    for label, (entry, suite_shared, where) in raw.items():
        entry = dict(entry)
        sweep = entry.pop("sweep", {}) or {}
        if not isinstance(sweep, dict) or any(not isinstance(v, list) or not v for v in sweep.values()):
            raise ConfigError(f"experiment {where}: sweep must map field names to non-empty lists")
        chain = entry.pop("chain", None)
        if chain is None:
            entry.setdefault("attack", label)
            _known(pipeline.ATTACKS, entry["attack"], where)
        entries[label] = ({**suite_shared, **exp_shared, **entry}, sweep, chain, entry, where)
    out = {}
    for label, (values, sweep, chain, own_fields, where) in entries.items():
        if chain is not None:
            if not isinstance(chain, list) or len(chain) < 2:
                raise ConfigError(f"experiment {where}: chain must list at least two attack labels, "
                                  f"in the order they run")
            for c in chain:
                if c not in entries:
                    raise ConfigError(f"experiment {where}: chain names {c!r}, which is not an attack "
                                      f"label of this grid; labels: {sorted(entries)}")
                if entries[c][2] is not None or entries[c][1]:
                    raise ConfigError(f"experiment {where}: chain round {c!r} must be a single run "
                                      f"(no sweep, no chain of its own)")
            values = {**entries[chain[-1]][0], **own_fields}  # the last round, with the chain's fields
        out[label] = (values, sweep, list(chain) if chain else None)
    return out


def _validate_attack(values: dict, where: str) -> None:
    try:
        pipeline.attack_config({**values, "model": "placeholder"})
    except ConfigError as e:
        raise ConfigError(f"experiment {where}: {e}") from None


def _known(registry, name: str, where: str) -> None:
    """An unknown defense or attack name as a ConfigError that says where in the file it is."""
    try:
        registry.get(name)
    except UnknownNameError as e:
        raise ConfigError(f"experiment {where}: {e}") from None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


def run_experiment(path: str, progress: bool = True, only: Optional[str] = None,
                   gpus: Optional[list[str]] = None, runner=None, data_dir: Optional[str] = None,
                   cluster: Optional[str] = None, workers_per_gpu: int = 1,
                   overrides: Optional[dict[str, str]] = None) -> Path:
    """Run every cell (reusing finished stages) and write OUT/results.jsonl.

    gpus: run (defense, seed) groups concurrently, workers_per_gpu worker processes per GPU id
    (see run_parallel). cluster: "slurm", "local" or "debug": one submitit job per group (see
    run_cluster). Neither: the cells run one after another here. runner: the function that runs
    one cell (default run_cell; a module-level function when gpus are given). data_dir: read
    every source from this folder (replaces the file's data_dir). overrides: `--set` fields
    (see set_field); OUT/experiment.yaml records the file with them applied."""
    spec = load_experiment(path, data_dir=data_dir, overrides=overrides)
    cells = expand(spec)
    if gpus is not None and cluster is not None:
        raise ConfigError("--gpus and --cluster do not combine: with --cluster every job gets its GPU "
                          "from the cluster (gpus_per_node in the file's `cluster` mapping)")
    if workers_per_gpu != 1 and gpus is None:
        raise ConfigError("--workers-per-gpu needs --gpus (it sets how many workers share each listed GPU)")
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(out / "experiment.yaml", yaml.safe_dump(spec, sort_keys=False))
    runner = runner or run_cell
    selected = [(i, c) for i, c in enumerate(cells) if not only or only in c.key]
    if gpus is not None:
        run_parallel(selected, out, gpus, runner, workers_per_gpu=workers_per_gpu)
        return out
    if cluster is not None:
        run_cluster(selected, out, cluster, spec.get("cluster") or {}, runner, name=spec["name"])
        return out
    rows = []
    for i, cell in selected:
        log.info("cell %d/%d: %s", i + 1, len(cells), cell.key)
        rows.append(runner(cell, out, progress))
        write_results(out, rows)
    return out


# ---------------------------------------------------------------------------------------------
# Groups: (defense, seed) groups run on worker processes (one per GPU) or as submitit jobs
# ---------------------------------------------------------------------------------------------

def _run_group(cells: list, out: Path, runner) -> tuple[list, Optional[Exception]]:
    """Run one group's cells in order; a failing cell ends the group. Returns the finished
    rows and the error (None when every cell ran): returned, not raised, so that the rows
    before it come back from a worker process or a cluster job too."""
    rows = []
    for cell in cells:
        log.info("cell %s", cell.key)
        try:
            row = runner(cell, out, False)
        except Exception as e:  # noqa: BLE001 (raised in the caller once every group is done)
            log.exception("cell %s failed", cell.key)
            return rows, e
        rows.append({**row, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")})
    return rows, None


def run_groups(selected: list, out: Path, submit, as_completed) -> None:
    """Group (index, cell) pairs by (defense, seed) (a group's cells share an align run, so
    they run in order in one place), hand each group's cells to submit(cells), which returns a
    future-like object whose result() is _run_group's (rows, error), and collect the results
    as as_completed(futures) yields them: GPU workers (run_parallel) and submitit jobs
    (run_cluster) share this.

    Results are written in grid order as groups finish. A failing cell stops its group only,
    and a job that died (killed, out of time) loses its group only; the other groups run to the
    end, then the first error is raised."""
    groups: dict = {}
    for i, cell in selected:
        groups.setdefault((cell.defense, cell.seed), []).append((i, cell))
    log.info("%d cells in %d groups", len(selected), len(groups))
    futures = {submit([c for _, c in group]): group for group in groups.values()}
    rows: dict = {}
    errors = []
    for future in as_completed(list(futures)):
        group = futures[future]
        try:
            done, error = future.result()
        except Exception as e:  # noqa: BLE001 (the worker or job itself failed)
            done, error = [], e
        if error is not None:
            log.error("group %s/s%s failed after %d of its %d cells: %s", group[0][1].defense,
                      group[0][1].seed, len(done), len(group), error)
            errors.append(error)
        for (i, _), row in zip(group, done):
            rows[i] = row
        write_results(out, [rows[i] for i in sorted(rows)])
    if errors:
        raise errors[0]


def _pin_gpu(free_gpus, level: int) -> None:
    """Worker initializer: take one GPU id for the life of this process, before torch sees CUDA."""
    gpu = free_gpus.get()
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    logging.basicConfig(level=level, format=f"%(asctime)s gpu{gpu} %(levelname)s %(name)s: %(message)s")


def run_parallel(selected: list, out: Path, gpus: list[str], runner=None, workers_per_gpu: int = 1) -> None:
    """Run (index, cell) pairs by (defense, seed) group (see run_groups) on a
    ProcessPoolExecutor of len(gpus) x workers_per_gpu workers, which hands groups to whichever
    worker is free; each worker pins CUDA_VISIBLE_DEVICES to its GPU id when it starts. Several
    workers per GPU pay off where a step is bound by per-step overhead rather than by the GPU's
    arithmetic (small models: docs/benchmarks.md, "On a GPU")."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    gpus = [str(g).strip() for g in gpus]
    if not gpus or any(not g for g in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus must list distinct GPU ids, e.g. 0,1 (several workers on one GPU: "
                          f"--workers-per-gpu); got {','.join(gpus)!r}")
    if isinstance(workers_per_gpu, bool) or not isinstance(workers_per_gpu, int) or workers_per_gpu < 1:
        raise ConfigError(f"--workers-per-gpu must be a whole number >= 1; got {workers_per_gpu!r}")
    runner = runner or run_cell
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    free = ctx.Queue()
    for g in gpus:
        for _ in range(workers_per_gpu):
            free.put(g)
    log.info("GPUs %s, %d worker(s) each", ",".join(gpus), workers_per_gpu)
    with ProcessPoolExecutor(max_workers=len(gpus) * workers_per_gpu, mp_context=ctx, initializer=_pin_gpu,
                             initargs=(free, logging.getLogger().getEffectiveLevel())) as pool:
        run_groups(selected, out, lambda cells: pool.submit(_run_group, cells, out, runner), as_completed)


CLUSTERS = ("slurm", "local", "debug")


def _cluster_job(cells: list, out: Path, runner, level: int) -> tuple[list, Optional[Exception]]:
    """One submitit job: a group, logged to the job's log file in OUT/submitit/."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _run_group(cells, out, runner)


def run_cluster(selected: list, out: Path, kind: str, parameters: dict, runner=None,
                name: str = "inoculate") -> None:
    """Run (index, cell) pairs as one submitit job per (defense, seed) group (see run_groups)
    and wait for them. kind: "slurm" (sbatch; every job gets one GPU by default), "local" (a
    process per job, all started at once) or "debug" (in this process, one job after another).
    parameters: the experiment's `cluster` mapping, given to executor.update_parameters over the
    defaults timeout_min=1440 (submitit's own is minutes), gpus_per_node=1 on Slurm and the job
    name inoculate-NAME. Submission files, pickles and job logs go to OUT/submitit/. Stopping
    this process with Ctrl-C cancels the jobs; killed otherwise, it leaves them running."""
    if kind not in CLUSTERS:
        raise ConfigError(f"--cluster must be one of {', '.join(CLUSTERS)}; got {kind!r}")
    try:
        import submitit
    except ImportError:
        raise ConfigError("--cluster needs submitit, which is not installed: "
                          "pip install 'inoculate[cluster]'") from None
    runner = runner or run_cell
    try:
        executor = submitit.AutoExecutor(folder=out / "submitit", cluster=kind)
    except RuntimeError as e:  # no sbatch/srun here
        raise ConfigError(f"--cluster {kind}: {e}") from None
    try:
        executor.update_parameters(**{"timeout_min": 1440, "name": f"inoculate-{name}",
                                      **({"gpus_per_node": 1} if kind == "slurm" else {}), **parameters})
    except (AssertionError, NameError, TypeError, ValueError) as e:
        raise ConfigError(f"experiment key `cluster`: {e}") from None
    level = logging.getLogger().getEffectiveLevel()
    jobs = []

    def submit(cells):
        jobs.append(executor.submit(_cluster_job, cells, out, runner, level))
        log.info("group %s/s%s: job %s", cells[0].defense, cells[0].seed, jobs[-1].job_id)
        return jobs[-1]

    log.info("submitit %s executor, logs in %s", kind, out / "submitit")
    try:
        run_groups(selected, out, submit, lambda jobs: submitit.helpers.as_completed(jobs, poll_frequency=1))
    except KeyboardInterrupt:
        for job in jobs:  # finished ones too: a debug job's done() would run it
            job.cancel(check=False)
        raise


def run_cell(cell: Cell, out: Path, progress: bool) -> dict:
    base = out / _slug(cell.defense) / f"s{cell.seed}"
    align_base = Path(cell.align_out) / _slug(cell.defense) / f"s{cell.seed}" if cell.align_out else base
    align_dir = pipeline.align(cell.align, align_base / "align", progress=progress)
    model_dir = align_dir
    attack_cfg = None
    for dirname, values in cell.rounds:  # a chain's earlier rounds, each on the previous output
        model_dir = pipeline.attack({**values, "model": str(model_dir)}, base / dirname, progress=progress)
    if cell.attack_values is not None:
        attack_dir = base / _slug(cell.attack)
        values = {**cell.attack_values, "model": str(model_dir)}
        model_dir = pipeline.attack(values, attack_dir, progress=progress)
        attack_cfg = runs.read_config(attack_dir)
        eval_dir = attack_dir / "eval"
    else:
        eval_dir = base / "eval"
    metrics = pipeline.evaluate({**cell.evaluate, "model": str(model_dir)}, eval_dir, progress=progress)
    align_cfg = runs.read_config(align_dir)
    acfg = attack_cfg or {}
    row = {
        "defense": cell.defense, "attack": cell.attack, "seed": cell.seed, **cell.sweep,
        "attack_kind": acfg.get("attack", "none"),
        "chain": " > ".join(cell.chain) if cell.chain else None,
        "objective": acfg.get("objective", "sft") if attack_cfg else None,
        "swept": sorted(cell.sweep),
        "samples": acfg.get("samples"),
        "harmful_fraction": acfg.get("harmful_fraction") if acfg.get("attack") in ("mixed", "interleaved") else None,
        "attack_lr": acfg.get("learning_rate"),
        "config_hash": config_hash({"align": align_cfg, "attack": attack_cfg,
                                    "evaluate": runs.read_config(eval_dir),
                                    **({"rounds": [runs.read_config(base / d) for d, _ in cell.rounds]}
                                       if cell.rounds else {})}),
        "align_dir": str(align_dir), "eval_dir": str(eval_dir),
        "align_seconds": json.loads((align_dir / runs.RUN_MARKER).read_text()).get("seconds"),
    }
    row.update(flatten(metrics))
    return row


def flatten(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def write_results(out: Path, rows: list[dict]) -> None:
    """Write rows to results.jsonl, keeping the rows of cells this run did not touch (a run
    with --only, or an earlier partial run), keyed by (defense, attack, seed)."""
    key = lambda r: (r.get("defense"), r.get("attack"), r.get("seed"))
    path = Path(out) / "results.jsonl"
    new = {key(r) for r in rows}
    kept = [r for r in (read_results(out) if path.exists() else []) if key(r) not in new]
    runs.atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in kept + list(rows)))


def read_results(out: Path) -> list[dict]:
    p = Path(out) / "results.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; run the experiment first (inoculate run FILE)")
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
