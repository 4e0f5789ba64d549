"""The command line (cli.py) through click's CliRunner: help lists every field, the three stages
take --config YAML, --set and bare key=value overrides (in that order of priority), and bad input
ends with exit code 2 and one 'error: ...' line, never a traceback."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from inoculate import runs
from inoculate.cli import main

TINY = ["--model", "tiny-llama", "--data", "starter", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ---------------------------------------------------------------------------------------------
# Help and list
# ---------------------------------------------------------------------------------------------

def test_align_help_lists_fields_with_defaults_and_defense_fields():
    result = invoke("align", "--help")
    assert result.exit_code == 0
    out = result.output
    for line in ("learning_rate = 0.0005:", "max_steps = -1:", "lora = True:", "defense = 'sft':",
                 "model = 'smollm2-135m-instruct':"):
        assert line in out, line
    assert "ctrap:" in out
    ctrap = out[out.index("ctrap:"):]
    assert "alpha = 0.1:" in ctrap and "lambda_collapse = 0.1:" in ctrap
    assert "sft: (no fields of its own)" in out


@pytest.mark.parametrize("command, line", [("attack", "lora_mode = 'continue':"),
                                           ("attack", "samples = 100:"),
                                           ("evaluate", "harmful_samples = 1000:"),
                                           ("evaluate", "judge = 'keyword':")])
def test_attack_and_evaluate_help_list_their_fields(command, line):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and line in result.output


def test_list_prints_registries():
    result = invoke("list")
    assert result.exit_code == 0
    lines = dict(l.split(": ", 1) for l in result.output.strip().splitlines())
    assert {"sft", "ctrap"} <= set(lines["defenses"].split(", "))
    assert {"harmful", "mixed", "benign"} <= set(lines["attacks"].split(", "))
    assert {"starter", "beavertails", "sst2", "jsonl"} <= set(lines["data sources"].split(", "))
    assert "starter" in lines["data suites"] and "keyword" in lines["judges"]


# ---------------------------------------------------------------------------------------------
# The three stages
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "align.yaml"
    config.write_text(yaml.safe_dump({"max_steps": 5, "num_samples": 6, "per_device_train_batch_size": 2,
                                      "learning_rate": 0.1, "save_steps": 0, "lora_r": 4}))
    align = invoke("align", *TINY, "--out", root / "align", "--config", config,
                   "--set", "max_steps=2", "learning_rate=1e-3", "logging_steps=1")
    attack = invoke("attack", "--model", root / "align", "--data", "starter", "--quiet",
                    "--out", root / "attack", "--samples", "4",
                    "--set", "max_steps=1", "--set", "per_device_train_batch_size=2", "monitor_samples=0")
    evaluate = invoke("evaluate", "--model", root / "attack", "--data", "starter", "--quiet",
                      "--suite", "harmful,sst2", "--out", root / "attack" / "eval",
                      "harmful_samples=2", "task_samples=2", "max_new_tokens=3", "task_max_new_tokens=2")
    return root, align, attack, evaluate


def test_align_merges_yaml_set_and_bare_overrides(chain):
    root, align, _, _ = chain
    assert align.exit_code == 0, align.output
    assert f"aligned model written to {root / 'align' / 'model'}" in align.output
    cfg = runs.read_config(root / "align")
    assert cfg["max_steps"] == 2, "--set beats the YAML file"
    assert cfg["learning_rate"] == 1e-3, "a bare key=value beats the YAML file"
    assert cfg["num_samples"] == 6 and cfg["lora_r"] == 4, "the YAML file beats the defaults"
    assert cfg["model"] == "tiny-llama" and cfg["data"] == "starter" and cfg["defense"] == "sft"
    assert runs.is_complete(root / "align")


def test_attack_from_the_command_line(chain):
    root, _, attack, _ = chain
    assert attack.exit_code == 0, attack.output
    cfg = runs.read_config(root / "attack")
    assert (cfg["samples"], cfg["max_steps"], cfg["per_device_train_batch_size"]) == (4, 1, 2)
    assert cfg["monitor_samples"] == 0 and cfg["model"] == str(root / "align")
    assert runs.is_complete(root / "attack")


def test_evaluate_prints_the_metrics(chain):
    root, _, _, evaluate = chain
    assert evaluate.exit_code == 0, evaluate.output
    printed = json.loads(evaluate.stdout)
    stored = json.loads((root / "attack" / "eval" / "metrics.json").read_text())
    assert printed["harmful_score"] == stored["harmful_score"]
    assert stored["n_harmful"] == 2 and stored["tasks"]["sst2"]["n"] == 2
    assert runs.read_config(root / "attack" / "eval")["suite"] == ["harmful", "sst2"]


def test_a_runs_config_file_redoes_it_and_names_its_stage(chain):
    """A run's config.yaml (it records `stage: attack`) can be given back to the same command,
    e.g. to attack another model with the same fields; given to another command it is refused."""
    root, _, _, _ = chain
    written = root / "attack" / "config.yaml"
    again = invoke("attack", "--config", written, "--quiet", "--out", root / "attack-again")
    assert again.exit_code == 0, again.output
    assert runs.read_config(root / "attack-again") == runs.read_config(root / "attack")
    wrong = invoke("align", "--config", written, "--out", root / "never")
    assert wrong.exit_code == 2 and not (root / "never").exists()
    assert "is the config of an attack run (stage: attack); give it to `inoculate attack`" in wrong.output


def test_rerun_is_reused(chain):
    root, _, _, _ = chain
    before = (root / "align" / "run.json").stat().st_mtime_ns
    again = invoke("align", *TINY, "--out", root / "align", "--config", root / "align.yaml",
                   "--set", "max_steps=2", "learning_rate=1e-3", "logging_steps=1")
    assert again.exit_code == 0 and (root / "align" / "run.json").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one error line, no traceback
# ---------------------------------------------------------------------------------------------

OUT = ["--out", "TMP/run"]
BAD = {
    "unknown-field": (["align", *TINY, *OUT, "--set", "learning_rat=1"], "did you mean learning_rate"),
    "bad-type": (["align", *TINY, *OUT, "max_steps=abc"], "align.max_steps: expected a number, got 'abc'"),
    "unknown-defense": (["align", *TINY, *OUT, "--defense", "ctrapp"], "Did you mean ctrap"),
    "unknown-defense-field": (["align", *TINY, *OUT, "ctrap.alphaa=1", "--defense", "ctrap"],
                              "did you mean alpha"),
    "override-without-value": (["align", *TINY, *OUT, "max_steps"],
                               "override 'max_steps' is not of the form key=value"),
    "missing-config": (["align", *TINY, *OUT, "--config", "TMP/missing.yaml"], "missing.yaml' does not exist"),
    "invalid-yaml": (["align", *TINY, *OUT, "--config", "TMP/bad.yaml"], "bad.yaml' is not valid YAML"),
    "yaml-not-a-mapping": (["align", *TINY, *OUT, "--config", "TMP/list.yaml"], "must be a mapping"),
    "unknown-suite": (["align", *TINY, *OUT, "--data", "startr"], "unknown data suite 'startr'"),
    "missing-run": (["attack", "--model", "runs/nope", "--data", "starter", *OUT],
                    "'runs/nope' is not an existing run"),
    "unknown-attack": (["attack", "--model", "tiny-llama", "--data", "starter", *OUT, "attack=harmfull"],
                       "unknown attack 'harmfull'. Did you mean harmful"),
    "unknown-eval-item": (["evaluate", "--model", "tiny-llama", "--data", "starter", *OUT,
                           "--suite", "harmful,sst3"], "unknown evaluation suite item(s) ['sst3']"),
    "missing-experiment": (["run", "TMP/nope.yaml"], "experiment file"),
    "log-without-log": (["log", "TMP"], "log.jsonl does not exist"),
}


def test_log_prints_the_chosen_keys_of_every_step_that_has_them(tmp_path):
    entries = [{"step": 0, "monitor/a": 0.5, "monitor/b": 2, "monitor/answers": ["no", "x"]},
               {"step": 1, "loss": 1.234567, "lr": 1e-3},
               {"step": 2, "loss": 0.5, "monitor/a": 0.25, "elapsed_s": 3.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    result = invoke("log", tmp_path, "-k", "loss,monitor/*")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert rows[0] == ["step", "loss", "monitor/a", "monitor/b"]
    assert rows[1:] == [["0", "0.5", "2"], ["1", "1.235"], ["2", "0.5", "0.25"]]
    assert result.output.splitlines()[2].rstrip().endswith("1.235")  # blanks stay in their columns
    every = invoke("log", tmp_path).output.splitlines()[0].split()
    assert every == ["step", "monitor/a", "monitor/b", "loss", "lr", "elapsed_s"]
    named = invoke("log", tmp_path, "-k", "monitor/answers")  # a logged list only when named
    assert named.output.splitlines()[1].split(None, 1) == ["0", "['no', 'x']"]
    bad = invoke("log", tmp_path, "-k", "loss,los")
    assert bad.exit_code == 2 and "not in the log: los (logged keys: monitor/a" in bad.stderr


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_error_line(tmp_path, case):
    (tmp_path / "bad.yaml").write_text("max_steps: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- max_steps\n")
    args, expected = BAD[case]
    result = invoke(*[a.replace("TMP", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert expected in errors[0], errors[0]
    assert not (tmp_path / "run" / "model").exists()
