"""Experiment grids (experiment.py) and reports (report.py): expansion into cells, bad files,
a small grid on the tiny model that is killed midway and rerun, reuse of finished stages, the
report's tables and plots, and grids run as submitit jobs (--cluster)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from inoculate import pipeline
from inoculate.cli import main
from inoculate.config import ConfigError
from inoculate.experiment import expand, load_experiment, read_results, run_experiment
from inoculate.report import write_report

# ---------------------------------------------------------------------------------------------
# Expansion and bad files
# ---------------------------------------------------------------------------------------------

SPEC = {
    "model": "tiny-llama", "data": "starter", "seeds": [1, 2],
    "align": {"max_steps": 2},
    "defenses": {"sft": {}, "strong-ctrap": {"defense": "ctrap", "ctrap": {"alpha": 0.2}}},
    "attack": {"max_steps": 2},
    "attacks": {
        "harmful": {"sweep": {"samples": [4, 8]}},
        "mixed": {"attack": "mixed", "sweep": {"harmful_fraction": [0.1, 0.2], "samples": [10, 20]}},
        "benign": {"task": "sst2", "samples": 5},
    },
    "evaluate": {"suite": ["harmful"]},
}


def test_grid_expands_defenses_attacks_sweeps_and_seeds():
    cells = expand(dict(SPEC))
    # 2 defenses x 2 seeds x (none + 2 harmful + 4 mixed + 1 benign)
    assert len(cells) == 2 * 2 * (1 + 2 + 4 + 1)
    keys = [c.key for c in cells]
    assert len(set(keys)) == len(keys)
    assert keys[:8] == ["sft/s1/none", "sft/s1/harmful-samples=4", "sft/s1/harmful-samples=8",
                        "sft/s1/mixed-harmful_fraction=0.1-samples=10",
                        "sft/s1/mixed-harmful_fraction=0.1-samples=20",
                        "sft/s1/mixed-harmful_fraction=0.2-samples=10",
                        "sft/s1/mixed-harmful_fraction=0.2-samples=20", "sft/s1/benign"]
    by_key = {c.key: c for c in cells}
    none = by_key["strong-ctrap/s2/none"]
    assert none.attack_values is None
    assert none.align["defense"] == "ctrap" and none.align["ctrap"] == {"alpha": 0.2}
    assert none.align["seed"] == 2 and none.align["model"] == "tiny-llama" and none.align["max_steps"] == 2
    mixed = by_key["sft/s2/mixed-harmful_fraction=0.2-samples=20"]
    assert mixed.sweep == {"harmful_fraction": 0.2, "samples": 20}
    assert mixed.attack_values["attack"] == "mixed" and mixed.attack_values["samples"] == 20
    assert mixed.attack_values["seed"] == 2 and mixed.attack_values["data"] == "starter"
    assert "sweep" not in mixed.attack_values
    assert by_key["sft/s1/benign"].attack_values["attack"] == "benign"
    assert none.evaluate == {"model": "tiny-llama", "data": "starter", "suite": ["harmful"]}


def test_lists_are_accepted_for_defenses_and_attacks():
    cells = expand({"model": "tiny-llama", "data": "starter", "defenses": ["sft", "ctrap"],
                    "attacks": ["harmful", "benign"]})
    assert [c.key for c in cells] == ["sft/s42/none", "sft/s42/harmful", "sft/s42/benign",
                                      "ctrap/s42/none", "ctrap/s42/harmful", "ctrap/s42/benign"]


@pytest.mark.parametrize("change, message", [
    ({"defenses": {"sftt": {}}}, r"defenses.sftt: unknown defense 'sftt'. Did you mean sft"),
    ({"defenses": {"mine": {"defense": "ctrp"}}}, r"defenses.mine: unknown defense 'ctrp'. Did you mean ctrap"),
    ({"attacks": {"harmfull": {}}}, r"attacks.harmfull: unknown attack 'harmfull'. Did you mean harmful"),
    ({"defenses": {}}, r"empty grid"),
    ({"defences": {"sft": {}}}, r"unknown experiment key\(s\) \['defences'\]"),
    ({"align": {"learning_rat": 1}}, r"learning_rat \(did you mean learning_rate"),
    ({"attack": {"sampels": 3}}, r"sampels \(did you mean samples"),
    ({"evaluate": {"harmful_sampls": 3}}, r"harmful_sampls \(did you mean harmful_samples"),
])
def test_bad_experiment_is_a_config_error(change, message):
    with pytest.raises(ConfigError, match=message):
        expand({**SPEC, **change})


def test_an_alignment_monitor_that_reads_evaluation_prompts_is_refused(monkeypatch):
    """The monitor takes the last monitor_samples test examples, evaluation the first ones: a
    grid where they meet is refused before anything runs (starter: 40 harmful, 33 general)."""
    spec = {**SPEC, "align": {"max_steps": 2, "monitor_samples": 8}}
    with pytest.raises(ConfigError, match=r"monitor_samples=8 .*harmful_samples=1000 .*share 8 examples"):
        expand({**spec, "evaluate": {"suite": ["harmful"]}})
    with pytest.raises(ConfigError, match=r"general_samples=26 .*share 1 examples"):
        expand({**spec, "evaluate": {"suite": ["harmful", "general"], "harmful_samples": 32,
                                     "general_samples": 26}})
    calls = []
    real = pipeline.check_monitor_apart
    monkeypatch.setattr(pipeline, "check_monitor_apart", lambda a, e: calls.append(1) or real(a, e))
    cells = expand({**spec, "evaluate": {"suite": ["harmful", "general"], "harmful_samples": 32,
                                         "general_samples": 25}})
    assert cells and len(calls) == 1, "checked once for the grid's one data setting, not per cell"


def test_bad_experiment_files(tmp_path):
    with pytest.raises(ConfigError, match="experiment file '.*missing.yaml' does not exist"):
        load_experiment(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- sft\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_experiment(str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("defenses: {sft: \n")
    with pytest.raises(ConfigError, match="not valid YAML.*line"):
        load_experiment(str(tmp_path / "broken.yaml"))
    (tmp_path / "named.yaml").write_text("defenses: [sft]\n")
    spec = load_experiment(str(tmp_path / "named.yaml"))
    assert spec["name"] == "named" and spec["out"].endswith("named")


# ---------------------------------------------------------------------------------------------
# A small grid on the tiny model: killed midway, rerun, reused, reported
# ---------------------------------------------------------------------------------------------

def _grid(out) -> dict:
    return {
        "name": "grid", "out": str(out), "model": "tiny-llama", "data": "starter", "seeds": [42],
        "align": {"max_steps": 2, "num_samples": 8, "num_general_samples": 8, "per_device_train_batch_size": 2,
                  "logging_steps": 1, "save_steps": 0, "lora_r": 4},
        "defenses": {"sft": {}, "ctrap": {"ctrap": {"harmful_batch_size": 2}}},
        "attack": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 0,
                   "monitor_samples": 2},
        "attacks": {"harmful": {"attack": "harmful", "sweep": {"samples": [4, 6]}},
                    "benign-sst2": {"attack": "benign", "task": "sst2", "samples": 4, "max_steps": 1}},
        "evaluate": {"suite": ["harmful", "general", "sst2"], "harmful_samples": 2, "task_samples": 2,
                     "general_samples": 2, "max_new_tokens": 3, "task_max_new_tokens": 2, "batch_size": 4},
    }


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(_grid(root / "grid"), sort_keys=False))
    out = root / "grid"
    real_attack = pipeline.attack
    calls = {"n": 0}

    def attack_killed_on_second_call(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kill")
        return real_attack(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "attack", attack_killed_on_second_call)
        with pytest.raises(RuntimeError, match="simulated kill"):
            run_experiment(str(path), progress=False)
    killed_rows = read_results(out)
    first_runs = {p: p.stat().st_mtime_ns for p in
                  (out / "sft/s42/align/run.json", out / "sft/s42/harmful-samples=4/run.json",
                   out / "sft/s42/eval/run.json")}
    run_experiment(str(path), progress=False)
    return {"path": path, "out": out, "killed_rows": killed_rows, "first_runs": first_runs}


def test_killed_grid_kept_the_finished_cells(grid):
    assert [(r["defense"], r["attack"]) for r in grid["killed_rows"]] == [("sft", "none"),
                                                                         ("sft", "harmful-samples=4")]


def test_rerun_completes_the_grid_without_redoing_finished_stages(grid):
    rows = read_results(grid["out"])
    assert [(r["defense"], r["attack"]) for r in rows] == [
        (d, a) for d in ("sft", "ctrap")
        for a in ("none", "harmful-samples=4", "harmful-samples=6", "benign-sst2")]
    for path, mtime in grid["first_runs"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was written again"
    for r in rows:
        assert 0.0 <= r["harmful_score"] <= 1.0 and 0.0 <= r["tasks.sst2.accuracy"] <= 1.0
        assert r["general_ce"] > 0 and r["judge"] == "keyword" and r["seed"] == 42
        assert len(r["config_hash"]) == 16
    harmful = [r for r in rows if r["attack_kind"] == "harmful"]
    assert sorted({r["samples"] for r in harmful}) == [4, 6]
    assert {r["attack_kind"] for r in rows} == {"none", "harmful", "benign"}


def test_rerun_of_a_finished_grid_reuses_every_stage(grid, monkeypatch):
    import inoculate.evaluation as evaluation

    before = read_results(grid["out"])
    fail = lambda *a, **k: pytest.fail("a finished stage ran again")
    monkeypatch.setattr(pipeline, "train", fail)
    monkeypatch.setattr(pipeline, "load_model", fail)
    monkeypatch.setattr(evaluation, "evaluate_model", fail)
    run_experiment(str(grid["path"]), progress=False)
    assert read_results(grid["out"]) == before


def test_report_has_tables_and_plots(grid):
    out = grid["out"]
    report = write_report(str(out))
    text = report.read_text()
    for heading in ("## All cells", "## HS(IO) % per number of harmful samples n",
                    "## Fine-tuning accuracy after benign fine-tuning", "## Worst case per defense", "## Plots"):
        assert heading in text, heading
    assert "| defense | samples=4 | samples=6 | average |" in text
    assert text.count("| sft | ") >= 3 and text.count("| ctrap | ") >= 3
    html = (out / "report.html").read_text()
    assert html.count("<table>") == text.count("\n|---") and "<img src=\"hs_vs_samples_harmful.png\"" in html
    for name in ("hs_vs_samples_harmful.png", "attack_losses_sft.png", "attack_losses_ctrap.png",
                 "utility_vs_harm.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in text


def test_align_monitor_plot_reads_the_align_logs(tmp_path):
    """One figure per defense whose alignment logged monitor values (one line per seed and
    value; the defense's probe keys, monitor/<defense>/<key>, in their own panels); none for a
    defense without them."""
    from inoculate.report import _MONITOR_PANELS, _monitor_series, plot_align_monitor

    rows = []
    for defense, seed, monitored in (("ctrap", 1, True), ("ctrap", 2, True), ("sft", 1, False)):
        align = tmp_path / defense / str(seed)
        align.mkdir(parents=True)
        lines = [{"step": s, "loss": 1.0 / (s + 1),
                  **({"monitor/collapse_token_share": s / 10, "monitor/collapse_loss": 5.0 - s,
                      "monitor/ctrap/collapse_loss_at_theta": 6.0 - s, "monitor/ctrap/trap_gap": s / 4,
                      "monitor/ctrap/point/collapse_token_share": 1.0}
                     if monitored else {})} for s in range(3)]
        (align / "log.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
        rows.append({"defense": defense, "seed": seed, "attack": "none", "align_dir": str(align)})
    made = plot_align_monitor(rows, tmp_path)
    assert [p.name for p in made] == ["align_monitor_ctrap.png"]
    assert made[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entries = [json.loads(l) for l in (tmp_path / "ctrap" / "1" / "log.jsonl").read_text().splitlines()]
    assert _monitor_series(entries, "*/trap_gap") == {"ctrap/trap_gap": [(0, 0.0), (1, 0.25), (2, 0.5)]}
    assert _monitor_series(entries, "collapse_loss") == {"collapse_loss": [(0, 5.0), (1, 4.0), (2, 3.0)]}
    assert _monitor_series(entries, "*/collapse_loss") == {}
    assert list(_monitor_series(entries, "*/point/collapse_token_share")) == ["ctrap/point/collapse_token_share"]
    tasks = [{"step": 0, "monitor/tasks/sst2/collapse_token_share": 0.5, "monitor/tasks/sst2/answers": ["x"],
              "monitor/ctrap/tasks/collapse_token_share": 1.0}]
    assert _monitor_series(tasks, "tasks/*/collapse_token_share") == {"tasks/sst2/collapse_token_share": [(0, 0.5)]}
    assert any("tasks/*/collapse_token_share" in keys for _, _, keys in _MONITOR_PANELS)
    # every defense's probe has its values in the panels
    paneled = {k[2:] for _, _, keys in _MONITOR_PANELS for k in keys if k.startswith("*/")}
    assert {"trap_gap", "cos_sd", "harmful_reduction", "tamper_loss_end", "point/refusal_rate",
            "perturbation_gap", "harmful_lens_loss", "npo_loss"} <= paneled


def test_attack_plot_draws_the_answers_where_an_attack_monitored_them(tmp_path):
    """The attack plot has the three loss panels, and a fourth with the greedy answers'
    collapse-token share when an attack logged it (monitor_answers), with the task prompts'
    shares where it logged them (monitor_tasks)."""
    from inoculate.report import _attack_panels, _task_share_keys, plot_attack_losses

    losses = {"monitor/harmful_loss": 2.0, "monitor/alignment_loss": 1.0, "monitor/collapse_loss": 5.0}
    plain = {"a (s1)": [dict(losses, step=s) for s in range(3)]}
    answered = {**plain, "b (s1)": [dict(losses, step=s, **{"monitor/collapse_token_share": s / 4})
                                    for s in range(3)]}
    assert [p[0] for p in _attack_panels(plain)] == ["harmful_loss", "alignment_loss", "collapse_loss"]
    assert [p[0] for p in _attack_panels(answered)][-1] == "collapse_token_share"
    general = {"c (s1)": [dict(losses, step=s, **{"monitor/general_loss": 1.5}) for s in range(3)]}
    assert [p[0] for p in _attack_panels({**answered, **general})][3:] == ["general_loss", "collapse_token_share"]
    answered["b (s1)"] = [dict(e, **{"monitor/tasks/sst2/collapse_token_share": 0.1, "monitor/tasks/sst2/answers": []})
                          for e in answered["b (s1)"]]
    assert _task_share_keys(answered["b (s1)"]) == ["tasks/sst2/collapse_token_share"]
    assert _task_share_keys(plain["a (s1)"]) == []
    rows = []
    for attack, entries in answered.items():
        run = tmp_path / attack.split()[0]
        (run / "eval").mkdir(parents=True)
        (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
        rows.append({"defense": "ctrap", "seed": 1, "attack": attack.split()[0], "eval_dir": str(run / "eval")})
    made = plot_attack_losses(rows, tmp_path)
    assert [p.name for p in made] == ["attack_losses_ctrap.png"]
    assert made[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_run_reuses_and_prints_the_table(grid):
    result = CliRunner().invoke(main, ["run", str(grid["path"]), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| defense | attack | seed | HS(IO) %" in result.stdout
    assert f"results: {grid['out'] / 'results.jsonl'}" in result.stdout
    report = CliRunner().invoke(main, ["report", str(grid["out"])], catch_exceptions=False)
    assert report.exit_code == 0 and "report.md" in report.stdout


def test_report_without_results_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "results.jsonl does not exist; run the experiment first" in result.stderr


def test_write_results_keeps_rows_of_cells_not_rerun(tmp_path):
    from inoculate.experiment import read_results, write_results

    a = {"defense": "sft", "attack": "none", "seed": 1, "harmful_score": 0.1}
    b = {"defense": "ctrap", "attack": "none", "seed": 1, "harmful_score": 0.2}
    write_results(tmp_path, [a, b])
    write_results(tmp_path, [{**b, "harmful_score": 0.3}])  # e.g. `inoculate run --only ctrap`
    rows = read_results(tmp_path)
    assert [(r["defense"], r["harmful_score"]) for r in rows] == [("sft", 0.1), ("ctrap", 0.3)]


ROOT = Path(__file__).parent.parent
SHIPPED = sorted(str(p.relative_to(ROOT)) for folder in ("experiments", "repro")
                 for p in (ROOT / "configs" / folder).glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_experiment_files_are_valid(name, monkeypatch):
    """Every file in configs/experiments and configs/repro loads, expands (every align, attack
    and evaluate config of every cell is built and validated) and describes itself; no training,
    and no data read (the monitor's apartness check, which loads the test splits, is tested on
    the starter data elsewhere in this file)."""
    from inoculate.experiment import describe, expand, load_experiment

    monkeypatch.chdir(ROOT)  # attack suites are found under ./configs/attacks
    monkeypatch.setattr(pipeline, "check_monitor_apart", lambda align, evaluate: None)
    spec = load_experiment(name, data_dir="some/data")
    cells = expand(spec)
    assert cells and all(c.align["defense"] for c in cells)
    assert all(c.align["data_dir"] == c.evaluate["data_dir"] == "some/data" for c in cells)
    assert all(c.attack_values["data_dir"] == "some/data" for c in cells if c.attack_values)
    assert describe(spec, cells).splitlines()[0].startswith(f"experiment {spec['name']}: {len(cells)} cells")


def test_repro_configs_follow_the_papers():
    """The reproduction configs: all 8 defenses, the paper attack suites, held-out evaluation
    with the keyword and the embedding judge, no data folder written into the file."""
    from inoculate.attacks import load_attack_suite
    from inoculate.defenses import DEFENSES

    for name, suite in (("ctrap", "paper-ctrap"), ("ctrap-smollm2-cpu", "paper-ctrap-small"),
                        ("seam", "paper-seam"), ("seam-smollm2-cpu", "paper-seam-small")):
        spec = load_experiment(str(ROOT / "configs" / "repro" / f"{name}.yaml"))
        assert "data_dir" not in spec, "users pass --data-dir; the hub otherwise"
        assert spec["data"] in ("beavertails", "beavertails-alpaca")
        if "cpu" in name:  # a subset of the small suite's attacks, with its shape
            shared, attacks = load_attack_suite(suite)
            assert set(spec["attacks"]) <= set(attacks)
            for key in ("lora_mode", "num_train_epochs", "per_device_train_batch_size"):
                assert spec["attack"][key] == shared[key], (name, key)
        else:
            assert spec["attack_suite"] == suite
        defenses = {v.get("defense", k) for k, v in spec["defenses"].items()}
        assert defenses == set(DEFENSES.names()), name
        assert spec["evaluate"]["judge"] == "keyword"
        assert [j.split(":")[0] for j in spec["evaluate"]["extra_judges"]] == ["embedding"]
        assert "harmful" in spec["evaluate"]["suite"]


def test_dry_run_prints_the_cells_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "out": str(tmp_path / "out")}))
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--data-dir", "my/data"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("experiment grid: 32 cells = 2 defenses x 2 seeds x 8 (no attack + 7 attacks); "
                               "4 align runs, 28 attack runs, 32 evaluations")
    assert "   1 sft/s1/none: align sft, 2 steps" in lines
    assert any(l.endswith(" sft/s1/harmful-samples=4: harmful, n=4, lr=1e-05, 2 steps, continue") for l in lines)
    assert any(l.endswith(" strong-ctrap/s2/mixed-harmful_fraction=0.2-samples=20: mixed, n=20, p=0.2, "
                          "task=sst2, lr=1e-05, 2 steps, continue") for l in lines)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    only = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--only", "strong-ctrap/s2"])
    assert "--only 'strong-ctrap/s2': 8 of 32 cells" in only.stdout
    assert sum(" strong-ctrap/s2/" in l for l in only.stdout.splitlines()) == 8
    assert " sft/" not in only.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPEC, "evaluate": {"extra_judges": ["embeding:x"]}}))
    result = CliRunner().invoke(main, ["run", str(bad), "--dry-run"])
    assert result.exit_code == 2 and "embeding" in result.stderr


def test_set_overrides_fields_of_the_experiment_file(tmp_path, monkeypatch):
    """`inoculate run --set`: dotted paths into the file, a row name with a dot of its own
    matched whole, values read as YAML, bad paths and values named in the error."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "check_monitor_apart", lambda align, evaluate: None)
    spec = {**SPEC, "defenses": {"sft": {}, "ctrap-l0.3": {"defense": "ctrap", "ctrap": {"alpha": 0.2}}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    got = load_experiment(str(path), overrides={"align.bf16": "false", "attack.max_steps": "3",
                                                 "defenses.ctrap-l0.3.ctrap.alpha": "0.05",
                                                 "evaluate.judge": "keyword", "seeds": "[7]"})
    assert got["align"] == {"max_steps": 2, "bf16": False} and got["attack"]["max_steps"] == 3
    assert got["defenses"]["ctrap-l0.3"]["ctrap"] == {"alpha": 0.05} and got["seeds"] == [7]
    cells = expand(got)
    assert {c.key.split("/")[1] for c in cells} == {"s7"}
    assert all(c.align["bf16"] is False for c in cells)
    assert expand(load_experiment(str(path)))[0].align.get("bf16") is None, "the file itself is unchanged"
    with pytest.raises(ConfigError, match=r"--set align.max_steps.x: align.max_steps is 2 in the file"):
        load_experiment(str(path), overrides={"align.max_steps.x": "1"})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(str(path), overrides={"seeds": "[1"})
    with pytest.raises(ConfigError, match="unknown field.*bf61"):  # a typo is caught when the grid is built
        expand(load_experiment(str(path), overrides={"align.bf61": "false"}))
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--set", "align.max_steps=5",
                                       "--set", "defenses.ctrap-l0.3.max_steps=6"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert any(l.endswith(" sft/s1/none: align sft, 5 steps") for l in result.stdout.splitlines())
    assert any(l.endswith(" ctrap-l0.3/s1/none: align ctrap, 6 steps") for l in result.stdout.splitlines())
    bad = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--set", "align.bf16"])
    assert bad.exit_code == 2 and "not of the form key=value" in bad.stderr


def test_data_dir_reaches_every_stage(tmp_path):
    """--data-dir replaces the file's data_dir in every align, attack (chain rounds too) and
    evaluate config."""
    spec = {**SPEC, "data_dir": "from/file",
            "attacks": {**SPEC["attacks"], "twice": {"chain": ["benign", "benign"]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    for given, expected in ((None, "from/file"), ("from/cli", "from/cli")):
        cells = expand(load_experiment(str(path), data_dir=given))
        configs = [c.align for c in cells] + [c.evaluate for c in cells]
        configs += [c.attack_values for c in cells if c.attack_values]
        configs += [values for c in cells for _, values in c.rounds]
        assert {c["data_dir"] for c in configs} == {expected}


def test_align_out_shares_the_aligned_models_between_experiments(tmp_path):
    """Two experiments with the same align settings and align_out align once; different
    align settings in that folder are refused, not silently reused."""
    from inoculate.runs import RunDirError

    base = _grid(tmp_path / "first")
    base["defenses"] = {"sft": {}}
    base["attacks"] = {}
    base["align"] = {**base["align"], "max_steps": 1}
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump({**base, "align_out": str(tmp_path / "aligned")}))
    run_experiment(str(first), progress=False)
    marker = tmp_path / "aligned/sft/s42/align/run.json"
    mtime = marker.stat().st_mtime_ns
    assert not (tmp_path / "first/sft/s42/align").exists()

    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump({**base, "out": str(tmp_path / "second"), "align_out": str(tmp_path / "aligned"),
                                      "evaluate": {**base["evaluate"], "max_new_tokens": 2}}))
    run_experiment(str(second), progress=False)
    assert marker.stat().st_mtime_ns == mtime, "the shared align run was trained again"
    [row] = read_results(tmp_path / "second")
    assert row["align_dir"] == str(tmp_path / "aligned/sft/s42/align")
    assert (tmp_path / "second/sft/s42/eval/run.json").exists()

    third = tmp_path / "third.yaml"
    third.write_text(yaml.safe_dump({**base, "out": str(tmp_path / "third"), "align_out": str(tmp_path / "aligned"),
                                     "align": {**base["align"], "max_steps": 2}}))
    with pytest.raises(RunDirError, match="different config"):
        run_experiment(str(third), progress=False)


# ---------------------------------------------------------------------------------------------
# A cluster (--cluster): one submitit job per (defense, seed) group, with a stand-in cell runner
# ---------------------------------------------------------------------------------------------

def fake_runner(cell, out, progress):
    """Stand-in for run_cell: appends the cell's key to OUT/ran.txt; ctrap/s1/boom fails."""
    with open(Path(out) / "ran.txt", "a") as f:
        f.write(cell.key + "\n")
    if cell.key == "ctrap/s1/boom":
        raise ConfigError("cell failed on purpose")
    return {"defense": cell.defense, "attack": cell.attack, "seed": cell.seed, "pid": os.getpid(),
            "harmful_score": 0.0}


def _cluster_grid(tmp_path, attacks, seeds=(1, 2), **extra) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "model": "tiny-llama", "data": "starter",
                                    "seeds": list(seeds), "defenses": {"sft": {}, "ctrap": {}},
                                    "attacks": attacks, **extra}, sort_keys=False))
    return path


def _keys(rows) -> list:
    return [f"{r['defense']}/s{r['seed']}/{r['attack']}" for r in rows]


def test_cluster_debug_runs_one_job_per_group_and_writes_rows_in_grid_order(tmp_path):
    path = _cluster_grid(tmp_path, {"harmful": {}, "benign": {}},
                         cluster={"slurm_partition": "gpu", "timeout_min": 30, "mem_gb": 8})
    out = run_experiment(str(path), cluster="debug", runner=fake_runner)
    grid = [c.key for c in expand(load_experiment(str(path)))]
    assert len(grid) == 2 * 2 * 3
    assert _keys(read_results(out)) == grid
    assert (out / "ran.txt").read_text().split() == grid, "groups run whole, cells in order"
    assert len(list((out / "submitit").glob("*_log.out"))) == 4, "one job per (defense, seed)"


def test_cluster_failing_group_keeps_the_others_and_raises_its_error(tmp_path):
    path = _cluster_grid(tmp_path, {"harmful": {}, "boom": {"attack": "harmful"}, "benign": {}})
    with pytest.raises(ConfigError, match="cell failed on purpose"):
        run_experiment(str(path), cluster="debug", runner=fake_runner)
    grid = [c.key for c in expand(load_experiment(str(path)))]
    ran = (tmp_path / "out/ran.txt").read_text().split()
    assert ran == [k for k in grid if k != "ctrap/s1/benign"], "the failure ends its own group only"
    assert _keys(read_results(tmp_path / "out")) == [k for k in grid if k not in ("ctrap/s1/boom",
                                                                                  "ctrap/s1/benign")]


def test_a_group_whose_job_died_loses_only_its_rows(tmp_path):
    """A job that ends without a result (killed, out of time) counts as its group's error; the
    rows of the groups that finish (here last group first) are written in grid order."""
    from concurrent.futures import Future

    from inoculate.experiment import _run_group, run_groups

    cells = expand({"model": "tiny-llama", "data": "starter", "defenses": ["sft", "ctrap", "vaccine"],
                    "attacks": ["harmful"]})

    def submit(group):
        future = Future()
        if group[0].defense == "sft":
            future.set_exception(RuntimeError("job 12 has not produced any output (state: TIMEOUT)"))
        else:
            future.set_result(_run_group(group, tmp_path, fake_runner))
        return future

    with pytest.raises(RuntimeError, match="TIMEOUT"):
        run_groups(list(enumerate(cells)), tmp_path, submit, reversed)
    assert _keys(read_results(tmp_path)) == ["ctrap/s42/none", "ctrap/s42/harmful",
                                             "vaccine/s42/none", "vaccine/s42/harmful"]


def test_ctrl_c_cancels_the_submitted_jobs(tmp_path, monkeypatch):
    import submitit

    def interrupted(jobs, **kwargs):
        raise KeyboardInterrupt
        yield

    cancelled = []
    monkeypatch.setattr(submitit.helpers, "as_completed", interrupted)
    monkeypatch.setattr(submitit.DebugJob, "cancel", lambda job, check=True: cancelled.append(job.job_id))
    path = _cluster_grid(tmp_path, {"harmful": {}})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(str(path), cluster="debug", runner=fake_runner)
    assert len(set(cancelled)) == 4 and not (tmp_path / "out/ran.txt").exists()


@pytest.mark.parametrize("cluster, message", [
    (["gpu"], r"experiment key `cluster` must be a mapping of submitit job parameters"),
    ({"slurm_partiton": "gpu"}, r"experiment key `cluster`: .*'slurm_partiton'"),
    ({"timeout_mins": 30}, r"experiment key `cluster`: .*'timeout_mins'"),
    ({"timeout_min": "12h"}, r"experiment key `cluster`: .*timeout_min"),
])
def test_bad_cluster_parameters_are_a_config_error(tmp_path, cluster, message):
    path = _cluster_grid(tmp_path, {"harmful": {}}, cluster=cluster)
    with pytest.raises(ConfigError, match=message):
        run_experiment(str(path), cluster="debug", runner=fake_runner)
    assert not (tmp_path / "out/ran.txt").exists()


def test_cluster_cli_errors(tmp_path, monkeypatch):
    import sys

    path = _cluster_grid(tmp_path, {"harmful": {}}, cluster=3)
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2 and "experiment key `cluster` must be a mapping" in result.stderr
    path = _cluster_grid(tmp_path, {"harmful": {}})
    for args, message in ((["--cluster", "slurmm"], "--cluster must be one of slurm, local, debug"),
                          (["--cluster", "debug", "--gpus", "0"], "--gpus and --cluster do not combine")):
        result = CliRunner().invoke(main, ["run", str(path), *args])
        assert result.exit_code == 2 and message in result.stderr, result.output
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    result = CliRunner().invoke(main, ["run", str(path), "--cluster", "slurm"])
    assert result.exit_code == 2 and "pip install 'inoculate[cluster]'" in result.stderr


def test_cluster_local_runs_each_group_in_its_own_process(tmp_path, monkeypatch):
    """submitit's LocalExecutor: every job is a new Python process that imports this module."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    path = _cluster_grid(tmp_path, {"harmful": {}}, seeds=[1])
    out = run_experiment(str(path), cluster="local", runner=fake_runner)
    rows = read_results(out)
    assert _keys(rows) == ["sft/s1/none", "sft/s1/harmful", "ctrap/s1/none", "ctrap/s1/harmful"]
    pids = {d: {r["pid"] for r in rows if r["defense"] == d} for d in ("sft", "ctrap")}
    assert all(len(p) == 1 for p in pids.values()), "a group runs in one job"
    assert len(pids["sft"] | pids["ctrap"] | {os.getpid()}) == 3, "each job is a process of its own"
