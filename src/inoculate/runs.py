"""Run directories: resolved config, completion marker, reuse and resume.

    RUN/config.yaml        the resolved config (every field, defaults included)
    RUN/run.json           written last: {"status": "complete", "config_hash": ...}
    RUN/checkpoint/        resumable training state while a run is in progress
    RUN/model/             the model (full weights or a LoRA adapter), safetensors
    RUN/log.jsonl          training logs
    RUN/metrics.json, RUN/generations.jsonl   (evaluate)

A run whose run.json says complete with the same config hash is reused; a run directory that
holds a different config is refused unless overwrite is asked for; an unfinished run with the
same config resumes from its checkpoint.

A run made from another run's model (an attack of an aligned model, an evaluation of an
attacked one) records that run's config hash as `source_hash`. Its config names the source by
path only, so if the source directory is later replaced by a run with another config (the
aligned models an experiment shares through `align_out`, a directory removed and run again), a
reuse would return results of the old model: prepare refuses it instead. Runs finished before
`source_hash` existed are reused as before.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .config import config_hash

RUN_MARKER = "run.json"


class RunDirError(ValueError):
    pass


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_complete(run_dir: Path, config: dict | None = None) -> bool:
    marker = Path(run_dir) / RUN_MARKER
    if not marker.exists():
        return False
    info = json.loads(marker.read_text())
    if info.get("status") != "complete":
        return False
    return config is None or info.get("config_hash") == config_hash(config)


def prepare(run_dir: Path, config: dict, overwrite: bool = False) -> str:
    """Returns "done" (complete, reuse), "resume" (unfinished, same config) or "new"."""
    run_dir = Path(run_dir)
    h = config_hash(config)
    stored = run_dir / "config.yaml"
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if stored.exists() and not _has_results(run_dir):
        # a start that failed before producing anything (a bad model path, missing data):
        # nothing to protect, so the corrected command may take the directory over
        atomic_write_text(stored, yaml.safe_dump(config, sort_keys=False))
        return "new"
    if stored.exists():
        old = yaml.safe_load(stored.read_text()) or {}
        if config_hash(old) != h:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise RunDirError(
                f"{run_dir} holds a run with a different config (differs in: {', '.join(changed[:8])}); "
                f"choose another --out, or pass --overwrite to replace it")
        if is_complete(run_dir, config):
            _check_source(run_dir, config)
            return "done"
        return "resume"
    if run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()):
        raise RunDirError(f"{run_dir} exists and is not an inoculate run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, yaml.safe_dump(config, sort_keys=False))
    return "new"


def _has_results(run_dir: Path) -> bool:
    """Whether a run directory holds anything besides its config (logs, checkpoint, model,
    metrics, completion marker). Hidden names are temporary files and the lock."""
    return any(p.name != "config.yaml" and not p.name.startswith(".") for p in run_dir.iterdir())


def source_hash(model) -> str | None:
    """The config hash of the complete inoculate run that `model` names, None for anything else
    (a hub id, a plain model folder)."""
    marker = Path(str(model)) / RUN_MARKER if model else None
    if marker is None or not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("config_hash")


def _check_source(run_dir: Path, config: dict) -> None:
    recorded = json.loads((Path(run_dir) / RUN_MARKER).read_text()).get("source_hash")
    current = source_hash(config.get("model"))
    if recorded is not None and recorded != current:
        raise RunDirError(
            f"{run_dir} was made from {config.get('model')} when that held another run "
            f"(config hash {recorded}, now {current}); its results belong to the old model. "
            f"Move {run_dir} away (or pass --overwrite) to run it again on the new one")


def finish(run_dir: Path, config: dict, **info) -> None:
    source = source_hash(config.get("model"))
    atomic_write_text(Path(run_dir) / RUN_MARKER,
                      json.dumps({"status": "complete", "config_hash": config_hash(config),
                                  **({"source_hash": source} if source else {}), **info},
                                 indent=2, default=str))


def read_config(run_dir: Path) -> dict:
    p = Path(run_dir) / "config.yaml"
    return yaml.safe_load(p.read_text()) if p.exists() else {}
