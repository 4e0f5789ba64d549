"""Tables and plots from an experiment's results.jsonl.

    inoculate report RUN_DIR      -> RUN_DIR/report.md, report.html and PNG plots

Tables follow the papers' layout: harmful score per defense before and after each attack,
HS per number of harmful samples n and per harmful fraction p (when the grid sweeps them),
fine-tuning accuracy per benign task, and each defense's worst case (also subject to a utility
bound, the experiment's ``worst_case``: the attacker-side search). Plots: harmful score against
attack strength per defense; harmful / alignment / collapse loss during the attacks (the CTRAP
paper's Figure 3); utility against harm.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .experiment import read_results

PCT_KEYS = ("harmful_score", "hs_o", "hs_plus", "refusal_rate", "degenerate_rate", "collapse_token_share")


def _fmt(value, pct=True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)):
        return f"{100 * value:.1f}" if pct else f"{value:.3g}"
    return str(value)


def _task_keys(rows) -> list[str]:
    """Results columns of the tasks: each task's accuracy, then the collapse token's share of its
    answers where the results have it (runs evaluated before 2026-12-07 do not)."""
    return sorted({k for r in rows for k in r if k.startswith("tasks.")
                   and k.endswith((".accuracy", ".collapse_token_share"))},
                  key=lambda k: (k.split(".")[1], not k.endswith(".accuracy")))


def _task_header(key: str) -> str:
    task = key.split(".")[1]
    return f"{task} acc %" if key.endswith(".accuracy") else f"{task} collapse-tok %"


def _judge_keys(rows) -> list[str]:
    """Results columns of the extra judges' HS(IO) and HS(O) (evaluate's extra_judges)."""
    return sorted({k for r in rows for k in r
                   if k.startswith("judges.") and k.rsplit(".", 1)[-1] in ("hs_io", "hs_o")},
                  key=lambda k: (k.rsplit(".", 1)[0], k.endswith("hs_o")))


def _judge_header(key: str) -> str:
    name, metric = key[len("judges."):].rsplit(".", 1)
    return ("HS(IO)" if metric == "hs_io" else "HS(O)") + f" {name} %"


def markdown_table(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """One row per (defense, attack): the headline metrics, in percent except CE."""
    tasks = _task_keys(rows)
    judges = _judge_keys(rows)
    # the general answers' share where an evaluation generated them (evaluate's general_new_tokens)
    general = ["general_collapse_token_share"] if any(
        r.get("general_collapse_token_share") is not None for r in rows) else []
    headers = (["defense", "attack", "seed", "HS(IO) %", "HS(O) %", "HS+ %", "refusal %", "degenerate %",
                "P(collapse tok)", "collapse-tok share %", "general CE"]
               + ["general collapse-tok %"] * len(general)
               + [_task_header(t) for t in tasks] + [_judge_header(j) for j in judges])
    body = []
    for r in rows:
        body.append([r["defense"], _attack_label(r), str(r["seed"])]
                    + [_fmt(r.get(k)) for k in ("harmful_score", "hs_o", "hs_plus", "refusal_rate",
                                                 "degenerate_rate")]
                    + [_fmt(r.get("collapse_token_prob"), pct=False), _fmt(r.get("collapse_token_share")),
                       _fmt(r.get("general_ce"), pct=False)]
                    + [_fmt(r.get(t)) for t in general + tasks] + [_fmt(r.get(j)) for j in judges])
    return markdown_table(headers, body)


def _attack_label(row: dict) -> str:
    """The cell's attack label; a chain also shows its rounds, an adaptive objective its name."""
    label = str(row["attack"])
    if row.get("chain"):
        label += f" ({row['chain']})"
    if row.get("objective") not in (None, "sft"):
        label += f" [{row['objective']}]"
    return label


def _strength_rows(rows: list[dict], kind: str, axis: str) -> list[dict]:
    """Cells of one attack kind that vary `axis` as plain fine-tuning: chains and adaptive
    objectives are left out, and, where rows say what their entry swept, only entries that swept
    this axis count (so a learning-rate sweep does not mix with a sample-count sweep)."""
    field = {"attack_lr": "learning_rate"}.get(axis, axis)
    return [r for r in rows if r.get("attack_kind") == kind and r.get(axis) is not None
            and not r.get("chain") and r.get("objective") in (None, "sft")
            and ("swept" not in r or field in r["swept"])]


def _mean(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def sweep_table(rows: list[dict], attack_kind: str, axis: str, metric: str = "harmful_score") -> Optional[str]:
    """Defense × axis value, mean over seeds (the papers' HS-per-n and HS-per-p tables)."""
    sel = _strength_rows(rows, attack_kind, axis)
    values = sorted({r[axis] for r in sel})
    if len(values) < 2:
        return None
    defenses = list(dict.fromkeys(r["defense"] for r in sel))
    body = []
    for d in defenses:
        cells = [_fmt(_mean(r.get(metric) for r in sel if r["defense"] == d and r[axis] == v)) for v in values]
        body.append([d] + cells + [_fmt(_mean(r.get(metric) for r in sel if r["defense"] == d))])
    return markdown_table(["defense"] + [f"{axis}={v}" for v in values] + ["average"], body)


def worst_case_table(rows: list[dict]) -> str:
    body = []
    for d in dict.fromkeys(r["defense"] for r in rows):
        attacked = [r for r in rows if r["defense"] == d and r["attack"] != "none"
                    and isinstance(r.get("harmful_score"), (int, float))]
        if not attacked:
            continue
        worst = max(attacked, key=lambda r: r["harmful_score"])
        body.append([d, _attack_label(worst), _fmt(worst["harmful_score"]), _fmt(worst.get("degenerate_rate"))])
    return markdown_table(["defense", "worst attack", "HS(IO) %", "degenerate %"], body)


# ---------------------------------------------------------------------------------------------
# Attacker-side search: the worst case subject to a utility bound
# ---------------------------------------------------------------------------------------------

_BOUNDS = ("min", "max", "max_drop", "max_rise")


def parse_worst_case(spec) -> dict:
    """Check an experiment's ``worst_case`` mapping; returns it with defaults filled in.

    utility: a results column (``tasks.sst2.accuracy``, ``general_ce``, ...); metric: the column
    the attacker maximizes (default harmful_score); bounds, one or more: min / max (absolute),
    max_drop (utility >= no-attack value - X) / max_rise (utility <= no-attack value + X), the
    no-attack value being that of the same defense and seed."""
    if not isinstance(spec, dict):
        raise ConfigError(f"worst_case must be a mapping like {{utility: tasks.sst2.accuracy, min: 0.3}}, got {spec!r}")
    unknown = set(spec) - {"utility", "metric", *_BOUNDS}
    if unknown:
        raise ConfigError(f"worst_case: unknown key(s) {sorted(unknown)}; known: utility, metric, "
                          f"{', '.join(_BOUNDS)}")
    if not isinstance(spec.get("utility"), str):
        raise ConfigError("worst_case needs `utility`: the results column to bound, e.g. tasks.sst2.accuracy")
    bounds = {k: spec[k] for k in _BOUNDS if spec.get(k) is not None}
    if not bounds:
        raise ConfigError(f"worst_case needs a bound: one of {', '.join(_BOUNDS)}")
    for k, v in bounds.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"worst_case.{k} must be a number, got {v!r}")
    return {"metric": str(spec.get("metric", "harmful_score")), "utility": spec["utility"], **bounds}


def bound_text(bound: dict) -> str:
    u = bound["utility"]
    parts = [f"{u} ≥ {bound['min']}" if "min" in bound else None,
             f"{u} ≤ {bound['max']}" if "max" in bound else None,
             f"{u} ≥ (no attack) − {bound['max_drop']}" if "max_drop" in bound else None,
             f"{u} ≤ (no attack) + {bound['max_rise']}" if "max_rise" in bound else None]
    return " and ".join(p for p in parts if p)


def worst_case_search(rows: list[dict], bound: dict) -> list[dict]:
    """Per defense: the attack cell with the highest `metric` among those whose utility is within
    the bound (over every seed and sweep point of the grid). Returns one dict per defense:
    defense, row (the worst admissible cell or None), admissible, attacked (cell counts)."""
    bound = parse_worst_case(bound)
    metric, utility = bound["metric"], bound["utility"]
    columns = {k for r in rows for k in r}
    for column in (metric, utility):
        if column not in columns:
            raise ValueError(f"worst_case: results have no column {column!r}; numeric columns: "
                             f"{sorted(k for k in columns if _is_number(rows[0].get(k)))}")
    baseline = {(r["defense"], r["seed"]): r.get(utility) for r in rows if r["attack"] == "none"}
    out = []
    for d in dict.fromkeys(r["defense"] for r in rows):
        attacked = [r for r in rows if r["defense"] == d and r["attack"] != "none" and _is_number(r.get(metric))]
        if not attacked:
            continue
        admissible = [r for r in attacked if _within(r, bound, baseline)]
        worst = max(admissible, key=lambda r: r[metric]) if admissible else None
        out.append({"defense": d, "row": worst, "admissible": len(admissible), "attacked": len(attacked)})
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _within(row: dict, bound: dict, baseline: dict) -> bool:
    value = row.get(bound["utility"])
    if not _is_number(value):
        return False
    ok = True
    if "min" in bound:
        ok &= value >= bound["min"]
    if "max" in bound:
        ok &= value <= bound["max"]
    if "max_drop" in bound or "max_rise" in bound:
        base = baseline.get((row["defense"], row["seed"]))
        if not _is_number(base):
            raise ValueError(f"worst_case: a relative bound needs the no-attack cell of defense "
                             f"{row['defense']!r} seed {row['seed']} with {bound['utility']!r}; run it too")
        if "max_drop" in bound:
            ok &= value >= base - bound["max_drop"]
        if "max_rise" in bound:
            ok &= value <= base + bound["max_rise"]
    return bool(ok)


def bounded_worst_case_table(rows: list[dict], bound: dict) -> str:
    bound = parse_worst_case(bound)
    metric, utility = bound["metric"], bound["utility"]
    pct_metric = metric in PCT_KEYS
    pct_utility = utility.endswith("accuracy") or utility in PCT_KEYS
    body = []
    for found in worst_case_search(rows, bound):
        r = found["row"]
        cells = ([_attack_label(r), str(r["seed"]), _fmt(r[metric], pct_metric), _fmt(r.get(utility), pct_utility)]
                 if r else ["none within the bound", "–", "–", "–"])
        body.append([found["defense"]] + cells + [f"{found['admissible']}/{found['attacked']}"])
    names = {"harmful_score": "HS(IO)", "hs_o": "HS(O)", "hs_plus": "HS+"}
    unit = lambda name, pct: names.get(name, name) + (" %" if pct else "")
    return markdown_table(["defense", "worst attack within bound", "seed", unit(metric, pct_metric),
                           unit(utility, pct_utility), "cells within bound"], body)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _style(i: int) -> dict:
    """Marker and line style of the i-th defense, so that defenses with equal scores (lines on
    top of each other) stay visible."""
    return {"marker": "osD^vPX*"[i % 8], "linestyle": ("-", "--", ":", "-.")[i % 4],
            "markersize": 9 - (i % 8) * 0.6, "alpha": 0.85}


def plot_strength(rows, out: Path) -> list[Path]:
    plt = _plt()
    made = []
    for kind, axis, xlabel in (("harmful", "samples", "harmful samples n"),
                               ("mixed", "harmful_fraction", "harmful fraction p"),
                               ("harmful", "attack_lr", "attack learning rate")):
        sel = [r for r in _strength_rows(rows, kind, axis) if isinstance(r.get(axis), (int, float))]
        if len({r[axis] for r in sel}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for i, d in enumerate(dict.fromkeys(r["defense"] for r in sel)):
            xs = sorted({r[axis] for r in sel if r["defense"] == d})
            ys = [100 * _mean(r["harmful_score"] for r in sel if r["defense"] == d and r[axis] == x) for x in xs]
            ax.plot(xs, ys, label=d, **_style(i))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("harmful score HS(IO) (%)")
        if axis == "attack_lr":
            ax.set_xscale("log")
        xs_all = sorted({r[axis] for r in sel})  # ticks at the measured strengths only
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_title(f"Harmful score vs {xlabel}")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        ax.grid(alpha=0.3)
        made.append(_save(plt, fig, out / f"hs_vs_{axis}_{kind}.png"))
    return made


def read_log(path) -> list[dict]:
    """The entries of a run's log.jsonl (`path` the file or its run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (a run directory holds log.jsonl once it has trained)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_table(entries: list[dict], keys: Optional[list[str]] = None) -> str:
    """A text table of log entries: step, then one column per key (a key ending in * takes every
    logged number with that prefix; no keys: every logged number but the step; a logged list,
    such as monitor/answers, only when named), one row per entry that holds any of them;
    numbers to 4 significant digits, blank where a row lacks the key."""
    logged = list(dict.fromkeys(k for e in entries for k in e if k != "step"))
    numbers = [k for k in logged if any(isinstance(e.get(k), (int, float)) for e in entries)]
    if not keys:
        columns = numbers
    else:
        columns, unknown = [], []
        for key in keys:
            hits = [k for k in (numbers if key.endswith("*") else logged)
                    if (k.startswith(key[:-1]) if key.endswith("*") else k == key)]
            columns += [k for k in hits if k not in columns]
            if not hits:
                unknown.append(key)
        if unknown:
            raise ValueError(f"not in the log: {', '.join(unknown)} (logged keys: {', '.join(logged)})")
    cell = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    body = [[cell(e.get("step"))] + [cell(e.get(k)) for k in columns]
            for e in entries if any(k in e for k in columns)]
    header = ["step"] + columns
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + body)


def _attack_panels(curves: dict) -> list[tuple]:
    """(monitor key, title, y label) of the attack plot's panels: the three losses, the general
    answers' CE when an attack logged it (attacks since 2026-12-07), and the greedy answers'
    collapse-token share when an attack logged it (monitor_answers)."""
    ce = "cross-entropy (nats/token)"
    panels = [("harmful_loss", "harmful loss", ce), ("alignment_loss", "alignment (refusal) loss", ce),
              ("collapse_loss", "collapse loss", ce)]
    logged = lambda key: any(f"monitor/{key}" in e for entries in curves.values() for e in entries)
    if logged("general_loss"):
        panels.append(("general_loss", "general answers' loss", ce))
    if logged("collapse_token_share"):
        panels.append(("collapse_token_share", "greedy answers: collapse-token share", "fraction"))
    return panels


def _task_share_keys(entries: list[dict]) -> list[str]:
    """The task answers' collapse-token shares an attack logged (monitor_tasks), as monitor keys
    without the prefix: tasks/<task>/collapse_token_share."""
    names = {k[len("monitor/"):] for e in entries for k in e if k.startswith("monitor/tasks/")}
    return sorted(n for n in names if _key_matches("tasks/*/collapse_token_share", n))


def plot_attack_losses(rows, out: Path) -> list[Path]:
    """Per defense: harmful, alignment and collapse loss on held-out harmful prompts while each
    attack trains (from the attack run's log.jsonl), the general answers' loss where logged, and
    the greedy answers' collapse-token
    share where the attack monitored its answers (dashed: on each task's prompts, monitor_tasks)."""
    plt = _plt()
    made = []
    for d in dict.fromkeys(r["defense"] for r in rows):
        curves = {}
        for r in rows:
            if r["defense"] != d or r["attack"] == "none":
                continue
            log_path = Path(r["eval_dir"]).parent / "log.jsonl"
            if not log_path.exists():
                continue
            entries = [e for e in read_log(log_path) if "monitor/harmful_loss" in e]
            if entries:
                curves[f'{r["attack"]} (s{r["seed"]})'] = entries
        if not curves:
            continue
        panels = _attack_panels(curves)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), sharex=True)
        for ax, (key, title, ylabel) in zip(axes, panels):
            for i, (label, entries) in enumerate(curves.items()):  # one colour per attack in every panel
                pts = [(e["step"], e[f"monitor/{key}"]) for e in entries if f"monitor/{key}" in e]
                if pts:
                    ax.plot(*zip(*pts), marker=".", label=label, color=f"C{i % 10}")
                if key == "collapse_token_share":  # the task prompts' answers, dashed
                    for task_key in _task_share_keys(entries):
                        pts = [(e["step"], e[f"monitor/{task_key}"]) for e in entries
                               if f"monitor/{task_key}" in e]
                        ax.plot(*zip(*pts), marker=".", linestyle="--", color=f"C{i % 10}",
                                label=f"{label}: {task_key.split('/')[1]} prompts")
            if key == "collapse_token_share" and any(_task_share_keys(e) for e in curves.values()):
                ax.legend(fontsize=7)
            ax.set_title(title)
            ax.set_xlabel("attack step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{d}: held-out losses and answers during fine-tuning")
        made.append(_save(plt, fig, out / f"attack_losses_{d}.png"))
    return made


# Panels of the alignment monitor plot: (title, y label, monitor keys; a "*" segment matches any
# one segment: "*/..." the defense's own probe, logged as monitor/<defense>/<key>, and
# "tasks/*/..." each task of monitor_tasks)
_MONITOR_PANELS = (
    ("greedy answers to held-out harmful prompts", "fraction",
     ("collapse_token_share", "degenerate_rate", "refusal_rate", "*/point/collapse_token_share",
      "*/point/deepest/collapse_token_share", "*/point/shallowest/collapse_token_share",
      "*/point/refusal_rate", "tasks/*/collapse_token_share")),
    ("teacher-forced collapse loss", "cross-entropy (nats/token)",
     ("collapse_loss", "*/collapse_loss_at_theta", "*/collapse_loss")),
    ("the defense's probe", "value",
     ("*/trap_gap", "*/cos_sd", "*/harmful_reduction", "*/tamper_loss_start", "*/tamper_loss_end",
      "*/perturbation_gap", "*/harmful_lens_loss", "*/npo_loss")),
)


def _key_matches(pattern: str, name: str) -> bool:
    """Whether a logged name matches a panel key segment by segment ("*": any one segment)."""
    want, got = pattern.split("/"), name.split("/")
    return len(want) == len(got) and all(w in ("*", g) for w, g in zip(want, got))


def _monitor_series(entries: list[dict], key: str) -> dict[str, list]:
    """{logged name: [(step, value)]} of one panel key over the log entries."""
    series: dict[str, list] = {}
    for e in entries:
        for name, value in e.items():
            if not name.startswith("monitor/") or not isinstance(value, (int, float)):
                continue
            rest = name[len("monitor/"):]
            if _key_matches(key, rest):
                series.setdefault(rest, []).append((e["step"], value))
    return series


def plot_align_monitor(rows, out: Path) -> list[Path]:
    """Per defense with an alignment monitor (monitor_samples): its held-out values over the
    alignment steps, one line per seed and value (from the align run's log.jsonl)."""
    plt = _plt()
    made = []
    for d in dict.fromkeys(r["defense"] for r in rows):
        logs = {}
        for r in rows:
            path = Path(r.get("align_dir") or "") / "log.jsonl"
            if r["defense"] == d and r["seed"] not in logs and path.is_file():
                entries = read_log(path)
                if any(k.startswith("monitor/") for e in entries for k in e):
                    logs[r["seed"]] = entries
        panels = [(title, ylabel, {f"{name} (s{seed})": pts for seed, entries in logs.items()
                                   for key in keys for name, pts in _monitor_series(entries, key).items()})
                  for title, ylabel, keys in _MONITOR_PANELS]
        panels = [p for p in panels if p[2]]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), sharex=True, squeeze=False)
        for ax, (title, ylabel, series) in zip(axes[0], panels):
            for label, pts in series.items():
                ax.plot(*zip(*pts), marker=".", label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("alignment step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.suptitle(f"{d}: alignment monitor on held-out examples")
        made.append(_save(plt, fig, out / f"align_monitor_{d}.png"))
    return made


def plot_utility_vs_harm(rows, out: Path) -> list[Path]:
    tasks = [t for t in _task_keys(rows) if t.endswith(".accuracy")]
    sel = [r for r in rows if isinstance(r.get("harmful_score"), (int, float))]
    if not sel or not tasks:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, d in enumerate(dict.fromkeys(r["defense"] for r in sel)):
        pts = [(100 * r["harmful_score"], 100 * _mean(r.get(t) for t in tasks)) for r in sel
               if r["defense"] == d and _mean(r.get(t) for t in tasks) is not None]
        if pts:
            ax.scatter(*zip(*pts), label=d, marker=_style(i)["marker"], alpha=0.8)
    ax.set_xlabel("harmful score HS(IO) (%)")
    ax.set_ylabel("mean task accuracy (%)")
    ax.set_title("Utility vs harm (every cell)")
    ax.legend()
    ax.grid(alpha=0.3)
    return [_save(plt, fig, out / "utility_vs_harm.png")]


# ---------------------------------------------------------------------------------------------

def write_report(run_dir: str, worst_case: Optional[dict] = None) -> Path:
    """worst_case: the utility bound for the bounded worst-case table; default: the experiment
    file's ``worst_case`` (from RUN_DIR/experiment.yaml), if any."""
    import yaml

    out = Path(run_dir)
    rows = read_results(out)
    if worst_case is None and (out / "experiment.yaml").exists():
        worst_case = (yaml.safe_load((out / "experiment.yaml").read_text()) or {}).get("worst_case")
    if not rows:
        raise ValueError(f"{out}/results.jsonl holds no rows")
    judge = sorted({str(r.get("judge")) for r in rows})
    extra = sorted({f"{k[len('judges.'):-len('.judge')]} = {v}" for r in rows for k, v in r.items()
                    if k.startswith("judges.") and k.endswith(".judge") and v})
    extra_text = f" Extra judges (their HS(IO) and HS(O) columns): {'; '.join(extra)}." if extra else ""
    parts = [f"# Report: {out.name}", "",
             f"Cells: {len(rows)}. Judge: {', '.join(judge)}.{extra_text} Percentages are of evaluated prompts; "
             "P(collapse tok) is the mean teacher-forced probability of the collapse token on held-out "
             "general answers; general CE is in nats per token.", "",
             "## All cells", "", summary_table(rows), ""]
    for kind, axis, title in (("harmful", "samples", "HS(IO) % per number of harmful samples n"),
                              ("mixed", "harmful_fraction", "HS(IO) % per harmful fraction p"),
                              ("harmful", "attack_lr", "HS(IO) % per attack learning rate")):
        table = sweep_table(rows, kind, axis)
        if table:
            parts += [f"## {title}", "", table, ""]
    benign = [r for r in rows if r.get("attack_kind") == "benign"]
    if benign:
        parts += ["## Fine-tuning accuracy after benign fine-tuning", "", summary_table(benign), ""]
    parts += ["## Worst case per defense", "", worst_case_table(rows), ""]
    if worst_case:
        bound = parse_worst_case(worst_case)
        try:
            table = bounded_worst_case_table(rows, bound)
        except ValueError as e:  # a bound on a column this grid did not measure: say so, keep the report
            table = f"Not computed: {e}"
        parts += [f"## Worst case per defense subject to {bound_text(bound)}", "",
                  "The attack cell (over every sweep point and seed) with the highest "
                  f"{bound['metric']} among those that keep the utility bound.", "", table, ""]
    plots = (plot_strength(rows, out) + plot_align_monitor(rows, out) + plot_attack_losses(rows, out)
             + plot_utility_vs_harm(rows, out))
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(_html(text))
    return out / "report.md"


def _html(markdown: str) -> str:
    """A minimal rendering (tables, headings, images) with no extra dependency."""
    body, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            body.append(f'<img src="{html.escape(src)}" style="max-width:100%">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
    return f"<html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(body)}</body></html>"
