"""The three stages (pipeline.py) on the tiny model and the starter data: bad input gives one
clear error naming it, and align -> attack -> evaluate runs end to end with LoRA and with full
weights, for harmful, mixed and benign attacks."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from inoculate import pipeline, runs
from inoculate.config import ConfigError
from inoculate.data.encode import PromptTooLongError
from inoculate.data.sources import DataError, load_records
from inoculate.data.templates import MissingChatTemplateError
from inoculate.models import MODEL_META, ModelLoadError, tiny_model_dir
from inoculate.registry import UnknownNameError

ALIGN = dict(model="tiny-llama", data="starter", defense="sft", max_steps=2, save_steps=0,
             logging_steps=1, per_device_train_batch_size=2, num_samples=8, num_general_samples=8,
             learning_rate=1e-3, lora_r=4, lora_alpha=8.0)
ATTACK = dict(data="starter", attack="harmful", samples=4, max_steps=2, save_steps=0, logging_steps=1,
              per_device_train_batch_size=2, learning_rate=1e-3, monitor_samples=2)
EVAL = dict(data="starter", suite=["harmful", "general", "sst2"], harmful_samples=3, task_samples=3,
            general_samples=3, max_new_tokens=4, task_max_new_tokens=2, batch_size=4)


def _info(run_dir):
    return json.loads((run_dir / runs.RUN_MARKER).read_text())


def _meta(run_dir):
    return json.loads((run_dir / "model" / MODEL_META).read_text())


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_unknown_defense_suggests_the_close_name(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown defense 'ctrapp'. Did you mean ctrap"):
        pipeline.align(dict(ALIGN, defense="ctrapp"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists(), "a bad config writes no run directory"


def test_unknown_source_suggests_close_names(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown data source 'beavertail'. Did you mean beavertails"):
        pipeline.align(dict(ALIGN, harmful_data="beavertail"), tmp_path / "run", progress=False)


def test_unknown_data_suite(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown data suite 'startr'. Did you mean starter"):
        pipeline.align(dict(ALIGN, data="startr"), tmp_path / "run", progress=False)
    with pytest.raises(UnknownNameError, match="data suite 'startr'"):
        pipeline.eval_config(dict(EVAL, data="startr", model="tiny-llama"))


def test_missing_mapped_column_names_it(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"query": "Hello?", "answer": "Hi."}) + "\n")
    with pytest.raises(DataError, match="column 'question' \\(mapped to 'prompt' by column_map\\) is missing") as err:
        load_records("jsonl", "train", path=path, column_map={"prompt": "question"})
    assert "query" in str(err.value), "the message lists the columns the file has"
    records = load_records("jsonl", "train", path=path, column_map={"prompt": "query", "response": "answer"})
    assert (records[0].prompt, records[0].response) == ("Hello?", "Hi.")


def test_generic_harmful_file_without_prompt_column(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "harmful_train.jsonl").write_text(json.dumps({"question": "q", "refusal": "no"}) + "\n")
    with pytest.raises(DataError, match="has no column 'prompt'.*column_map"):
        pipeline.align(dict(ALIGN, harmful_data="jsonl", data_dir=str(folder)), tmp_path / "run",
                       progress=False)


def test_empty_dataset_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "harmful_train.jsonl").write_text("")
    with pytest.raises(DataError, match="gave no records.*harmful_train.jsonl"):
        pipeline.align(dict(ALIGN, harmful_data="jsonl", data_dir=str(folder)), tmp_path / "run",
                       progress=False)


def test_prompt_longer_than_max_length(tmp_path):
    with pytest.raises(PromptTooLongError, match=r"prompt of \d+ tokens does not fit max_length=8"):
        pipeline.align(dict(ALIGN, max_length=8), tmp_path / "run", progress=False)


@pytest.mark.parametrize("spec", ["runs/nope", "./nope"])
def test_align_model_path_that_does_not_exist(tmp_path, spec):
    with pytest.raises(ModelLoadError) as err:
        pipeline.align(dict(ALIGN, model=spec), tmp_path / "run", progress=False)
    assert repr(spec) in str(err.value)


def test_attack_on_a_missing_run_names_it_and_the_corrected_command_runs(tmp_path, lora_chain):
    out = tmp_path / "attack"
    with pytest.raises(ConfigError, match="'runs/nope' is not an existing run directory"):
        pipeline.attack(dict(ATTACK, model="runs/nope"), out, progress=False)
    # the failed start left only its config; the corrected command takes the directory over
    pipeline.attack(dict(ATTACK, model=str(lora_chain["align"]), max_steps=1), out, progress=False)
    assert runs.is_complete(out)


def test_chat_template_missing(tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "no-chat"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir() / name, folder / name)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    tok.chat_template = None
    tok.save_pretrained(folder)
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    with pytest.raises(MissingChatTemplateError, match="no chat template.*template=alpaca"):
        pipeline.align(dict(ALIGN, model=str(folder), template="chat"), tmp_path / "run", progress=False)


def test_unknown_config_field_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"learning_rat \(did you mean learning_rate"):
        pipeline.align_config(dict(ALIGN, learning_rat="1"))
    with pytest.raises(ConfigError, match=r"defense ctrap: alphaa \(did you mean alpha"):
        pipeline.align_config(dict(ALIGN, defense="ctrap", **{"ctrap.alphaa": "0.1"}))
    with pytest.raises(ConfigError, match=r"samplez \(did you mean samples"):
        pipeline.attack_config(dict(ATTACK, model="x", samplez="3"))


def test_bad_types_are_named():
    with pytest.raises(ConfigError, match="align.max_steps: expected a number, got 'abc'"):
        pipeline.align_config(dict(ALIGN, max_steps="abc"))
    with pytest.raises(ConfigError, match="align.max_steps: expected an integer, got '1.5'"):
        pipeline.align_config(dict(ALIGN, max_steps="1.5"))
    with pytest.raises(ConfigError, match="align.lora: expected true/false, got 'maybe'"):
        pipeline.align_config(dict(ALIGN, lora="maybe"))
    with pytest.raises(ConfigError, match="harmful_fraction must be in"):
        pipeline.attack_config(dict(ATTACK, model="x", harmful_fraction="1.5"))
    with pytest.raises(ConfigError, match="lora_mode must be"):
        pipeline.attack_config(dict(ATTACK, model="x", lora_mode="adapter"))


def test_config_values_from_strings_are_typed():
    cfg, dcfg, resolved = pipeline.align_config(dict(ALIGN, max_steps="3", learning_rate="1e-4",
                                                     lora="false", lora_target_modules="q_proj,v_proj",
                                                     defense="ctrap", alpha="0.2"))
    assert (cfg.max_steps, cfg.learning_rate, cfg.lora) == (3, 1e-4, False)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert dcfg.alpha == 0.2 and resolved["ctrap"]["alpha"] == 0.2


# ---------------------------------------------------------------------------------------------
# End to end with LoRA
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    align_dir = pipeline.align(dict(ALIGN), root / "align", progress=False)
    attack_dir = pipeline.attack(dict(ATTACK, model=str(align_dir)), root / "attack", progress=False)
    metrics = pipeline.evaluate(dict(EVAL, model=str(attack_dir)), root / "attack" / "eval", progress=False)
    return {"root": root, "align": align_dir, "attack": attack_dir, "metrics": metrics}


def test_align_writes_an_adapter_run(lora_chain):
    align_dir = lora_chain["align"]
    assert _meta(align_dir) == {"kind": "adapter", "base": "tiny-llama"}
    assert runs.read_config(align_dir)["stage"] == "align"
    assert _info(align_dir)["steps"] == 2
    steps = [json.loads(l) for l in (align_dir / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)


def test_attack_continues_the_defended_adapter(lora_chain):
    attack_dir = lora_chain["attack"]
    assert _meta(attack_dir) == {"kind": "adapter", "base": "tiny-llama"}
    info = _info(attack_dir)
    assert info["n_examples"] == 4 and info["steps"] == 2
    first = json.loads((attack_dir / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and {"monitor/harmful_loss", "monitor/alignment_loss", "monitor/collapse_loss",
                                    "monitor/uniform_loss", "monitor/general_loss"} <= set(first)
    # the defended model before the first attack step, by hand: general_loss is the CE on the
    # last N general test answers (the alignment monitor's), uniform_loss the CE to the uniform
    # distribution at the first N harmful test answers' positions (the harmful_loss's)
    import torch

    from inoculate.data.encode import collate, encode_record
    from inoculate.models import load_model

    cfg, _ = pipeline.attack_config(dict(ATTACK, model=str(lora_chain["align"])))
    suite = pipeline._suite(cfg)
    general = pipeline._records(suite.general, suite.general_test_split, None, last=cfg.monitor_samples)
    harmful = pipeline.harmful_records(cfg, suite.harmful_test_split, limit=cfg.monitor_samples)
    assert len(general) == len(harmful) == cfg.monitor_samples
    loaded = load_model(str(lora_chain["align"]))

    def answer_logprobs(records):
        b = collate([encode_record(r, loaded.tokenizer, cfg.template, cfg.max_length) for r in records],
                    loaded.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = loaded.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        return torch.log_softmax(logits[:, :-1][labels != -100].float(), -1), labels[labels != -100]

    logp, labels = answer_logprobs(general)
    ce = -logp.gather(1, labels[:, None]).mean()
    assert first["monitor/general_loss"] == pytest.approx(float(ce), rel=1e-4)
    logp, labels = answer_logprobs(harmful)
    assert first["monitor/harmful_loss"] == pytest.approx(float(-logp.gather(1, labels[:, None]).mean()), rel=1e-4)
    assert first["monitor/uniform_loss"] == pytest.approx(float(-logp.mean()), rel=1e-4)
    assert first["monitor/uniform_loss"] > math.log(logp.shape[-1])  # the floor: a flat prediction


def test_evaluate_writes_metrics_and_generations(lora_chain):
    out = lora_chain["attack"] / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == lora_chain["metrics"]
    for key in ("harmful_score", "hs_io", "hs_o", "hs_plus", "refusal_rate", "degenerate_rate"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["judge"] == "keyword"
    assert 0.0 <= metrics["collapse_token_prob"] <= 1.0
    assert math.isfinite(metrics["general_ce"]) and metrics["general_ce"] > 0
    assert 0.0 <= metrics["tasks"]["sst2"]["accuracy"] <= 1.0 and metrics["tasks"]["sst2"]["n"] == 3
    rows = [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("harmful") == 3
    assert [r["kind"] for r in rows].count("sst2") == 3
    assert all("prompt" in r and "answer" in r for r in rows)
    assert runs.is_complete(out)


def test_evaluate_reuses_a_complete_run(lora_chain, monkeypatch):
    import inoculate.evaluation as evaluation

    monkeypatch.setattr(evaluation, "evaluate_model", lambda *a, **k: pytest.fail("evaluated again"))
    again = pipeline.evaluate(dict(EVAL, model=str(lora_chain["attack"])), lora_chain["attack"] / "eval",
                              progress=False)
    assert again == lora_chain["metrics"]


def test_mixed_attack_takes_round_p_times_n_harmful_examples(lora_chain):
    cfg, _ = pipeline.attack_config(dict(ATTACK, model="x", attack="mixed", samples=10, harmful_fraction=0.3))
    records = pipeline.mixed_attack_data(cfg)
    sources = [r.source for r in records]
    assert len(records) == 10
    assert sources.count("starter") == 3 and sources.count("starter_sst2") == 7
    cfg, _ = pipeline.attack_config(dict(ATTACK, model="x", attack="mixed", samples=7, harmful_fraction=0.2))
    assert [r.source for r in pipeline.mixed_attack_data(cfg)].count("starter") == round(0.2 * 7)

    out = pipeline.attack(dict(ATTACK, model=str(lora_chain["align"]), attack="mixed", samples=6,
                               harmful_fraction=0.5, max_steps=1), lora_chain["root"] / "mixed",
                          progress=False)
    assert _info(out)["n_examples"] == 6


def test_harmful_attack_takes_the_last_examples_of_the_attack_split():
    cfg, _ = pipeline.attack_config(dict(ATTACK, model="x", samples=5))
    records = pipeline.harmful_attack_data(cfg)
    split = load_records("starter", "attack")
    assert [r.prompt for r in records] == [r.prompt for r in split[-5:]]
    too_many, _ = pipeline.attack_config(dict(ATTACK, model="x", samples=len(split) + 1))
    with pytest.raises(ConfigError, match=f"asks for {len(split) + 1} harmful examples"):
        pipeline.harmful_attack_data(too_many)


def test_benign_attack(lora_chain):
    cfg, _ = pipeline.attack_config(dict(ATTACK, model="x", attack="benign", task="ag_news", samples=5))
    assert {r.source for r in pipeline.benign_attack_data(cfg)} == {"starter_ag_news"}
    out = pipeline.attack(dict(ATTACK, model=str(lora_chain["align"]), attack="benign", task="sst2",
                               samples=4, max_steps=1), lora_chain["root"] / "benign", progress=False)
    assert _info(out)["n_examples"] == 4
    assert _meta(out)["kind"] == "adapter"


# ---------------------------------------------------------------------------------------------
# Full-parameter alignment, then full and merge attacks
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_align(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return pipeline.align(dict(ALIGN, lora=False), root / "align", progress=False)


def test_full_parameter_align_saves_full_weights(full_align):
    assert _meta(full_align) == {"kind": "full"}
    assert (full_align / "model" / "model.safetensors").exists()
    assert not list((full_align / "model").glob("*.bin"))


def test_continue_on_a_full_weights_run_is_a_config_error(full_align, tmp_path):
    with pytest.raises(ConfigError, match="lora_mode=continue.*holds no adapter.*lora_mode=merge or full"):
        pipeline.attack(dict(ATTACK, model=str(full_align)), tmp_path / "attack", progress=False)


def test_full_attack_on_a_full_run(full_align, tmp_path):
    out = pipeline.attack(dict(ATTACK, model=str(full_align), lora_mode="full", max_steps=1),
                          tmp_path / "attack", progress=False)
    assert _meta(out) == {"kind": "full"}
    assert (out / "model" / "model.safetensors").exists()


def test_merge_attack_on_a_full_run(full_align, tmp_path):
    out = pipeline.attack(dict(ATTACK, model=str(full_align), lora_mode="merge", lora_r=2, max_steps=1),
                          tmp_path / "attack", progress=False)
    meta = _meta(out)
    assert meta["kind"] == "adapter"
    assert (out / "model" / meta["base"]).resolve() == full_align.resolve()
    metrics = pipeline.evaluate(dict(EVAL, model=str(out), suite=["harmful"]), out / "eval", progress=False)
    assert 0.0 <= metrics["harmful_score"] <= 1.0
    assert not metrics.get("tasks") and metrics.get("general_ce") is None, "only the asked-for suite"


# ---------------------------------------------------------------------------------------------
# Defender, attacker and evaluation data are disjoint (suites sharing one harmful split)
# ---------------------------------------------------------------------------------------------

def _paper_like_dir(tmp_path, n_train, n_test=5):
    """beavertails_refusals train/test, alpaca and sst2 files in the hub's format, with prompts
    that say where they come from (train row i, test row j)."""
    import gzip

    d = tmp_path / "data"
    d.mkdir(parents=True)

    def write(name, rows):
        with gzip.open(d / f"{name}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    write("beavertails_refusals_train", [{"prompt": f"train question {i}?", "response": f"harm {i}",
                                          "refusal": f"No {i}."} for i in range(n_train)])
    write("beavertails_refusals_test", [{"prompt": f"test question {j}?", "response": f"harm t{j}",
                                         "refusal": f"No t{j}."} for j in range(n_test)])
    write("alpaca_subset", [{"instruction": f"task {i}", "input": "", "output": f"done {i}"}
                            for i in range(40)])
    write("sst2_train", [{"sentence": f"film {i}", "label": i % 2} for i in range(40)])
    with open(d / "sst2_validation.jsonl", "w") as f:
        f.writelines(json.dumps({"sentence": f"movie {i}", "label": i % 2}) + "\n" for i in range(10))
    return d


def _defender_prompts(monkeypatch, defense, **values):
    """The prompts of every harmful-side stream `defense` would align on (tokenization skipped)."""
    from inoculate.defenses import DEFENSES

    monkeypatch.setattr(pipeline, "_encode", lambda records, tok, cfg, target: list(records))
    monkeypatch.setattr(pipeline, "Stream", lambda name, examples, *a, **k: examples)
    cfg, dcfg, _ = pipeline.align_config({"defense": defense, **values})
    d = DEFENSES.get(defense)(dcfg, cfg.per_device_train_batch_size)
    from types import SimpleNamespace

    streams = pipeline.build_align_streams(d, cfg, tok=SimpleNamespace(pad_token_id=0))
    prompts = set()
    for name, spec in d.streams().items():
        if spec.role in ("align", "harmful"):
            prompts |= {r.prompt for r in streams[name]}
        elif spec.role == "paired":
            prompts |= {pair["harmful"].prompt for pair in streams[name]}
    return prompts


@pytest.mark.parametrize("defense", ["sft", "booster", "seam", "npo", "repnoise", "vaccine", "ctrap", "tar"])
def test_defender_and_attacker_never_share_a_harmful_record(tmp_path, monkeypatch, defense):
    from inoculate.data.suites import SUITES

    reserve = SUITES.get("beavertails-alpaca").attack_reserve
    n_train = reserve + 30
    d = _paper_like_dir(tmp_path, n_train)
    common = dict(data="beavertails-alpaca", data_dir=str(d))
    # the defender asks for more than the split has (the default 5000): it gets the records
    # before the attacker's reserve, in file order
    defended = _defender_prompts(monkeypatch, defense, **common, num_samples=5000, num_general_samples=20)
    assert defended == {f"train question {i}?" for i in range(n_train - reserve)}
    # every attack size, up to the whole reserve, and the mixed attack's harmful part
    test_prompts = {r.prompt for r in load_records("beavertails_refusals", "test", data_dir=str(d))}
    for n in (1, 100, reserve):
        cfg, _ = pipeline.attack_config(dict(common, model="x", attack="harmful", samples=n))
        attacked = {r.prompt for r in pipeline.harmful_attack_data(cfg)}
        assert len(attacked) == n and not attacked & defended
        assert attacked == {f"train question {i}?" for i in range(n_train - n, n_train)}
        assert not attacked & test_prompts
    cfg, _ = pipeline.attack_config(dict(common, model="x", attack="mixed", samples=20, harmful_fraction=0.5))
    mixed = [r for r in pipeline.mixed_attack_data(cfg) if r.source == "beavertails_refusals"]
    assert len(mixed) == 10 and not {r.prompt for r in mixed} & defended
    # evaluation reads the held-out test file
    ecfg, _ = pipeline.eval_config(dict(common, model="x"))
    held_out = pipeline.harmful_records(ecfg, SUITES.get("beavertails-alpaca").harmful_test_split)
    assert {r.prompt for r in held_out} == test_prompts and not test_prompts & defended


def test_shared_harmful_split_limits(tmp_path):
    from inoculate.data.suites import SUITES, DataSuite

    reserve = SUITES.get("beavertails").attack_reserve
    d = _paper_like_dir(tmp_path, reserve + 10)
    cfg, _ = pipeline.attack_config(dict(data="beavertails-alpaca", data_dir=str(d), model="x",
                                         attack="harmful", samples=reserve + 1))
    with pytest.raises(ConfigError, match=f"asks for {reserve + 1} harmful examples but split 'train' "
                                          f"keeps {reserve} records for the attacker"):
        pipeline.harmful_attack_data(cfg)
    small = _paper_like_dir(tmp_path / "small", reserve)  # everything is the attacker's
    acfg, _, _ = pipeline.align_config(dict(data="beavertails-alpaca", data_dir=str(small)))
    with pytest.raises(ConfigError, match="no records left for the defender"):
        pipeline.defender_harmful_records(acfg)
    with pytest.raises(ValueError, match="set attack_reserve"):
        DataSuite(harmful="x", harmful_train_split="train", harmful_attack_split="train",
                  harmful_test_split="test", general="alpaca", general_train_split="train",
                  general_test_split="test")
    # an attack on another source reads that source whole (the defender never reads it)
    starter = SUITES.get("starter")
    assert not starter.shares_harmful_split
    assert not SUITES.get("beavertails").cuts("advbench")
    assert SUITES.get("beavertails").cuts("repnoise_refusals")  # an alias of the suite's source


def test_fsdp_option_stays_out_of_old_hashes_and_refuses_double_backward():
    _, _, resolved = pipeline.align_config(dict(ALIGN, defense="ctrap"))
    assert "fsdp" not in resolved  # at its default: earlier runs keep their config hash
    _, _, resolved = pipeline.align_config(dict(ALIGN, defense="ctrap", fsdp="true"))
    assert resolved["fsdp"] is True
    for defense, option in (("ctrap", "second_order"), ("seam", "exact_hvp")):
        with pytest.raises(ConfigError, match=f"fsdp=true does not combine with {defense}'s exact"):
            pipeline.align_config(dict(ALIGN, defense=defense, fsdp=True, **{option: True}))


def test_fsdp_in_one_process_is_ignored(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="inoculate.pipeline"):
        out = pipeline.align(dict(ALIGN, fsdp=True), tmp_path / "run", progress=False)
    assert "fsdp=true is ignored" in caplog.text
    assert _info(out)["status"] == "complete"


def test_a_run_made_from_a_replaced_model_is_not_reused(tmp_path):
    """An attack records the config hash of the aligned run it started from; once that run
    directory holds another alignment, the same attack command refuses to return the old
    attack's results (its config names the aligned model by path only)."""
    align_dir = pipeline.align(dict(ALIGN, max_steps=1), tmp_path / "align", progress=False)
    attack = dict(ATTACK, model=str(align_dir), max_steps=1)
    out = pipeline.attack(attack, tmp_path / "attack", progress=False)
    assert _info(out)["source_hash"] == _info(align_dir)["config_hash"]
    assert pipeline.attack(attack, out, progress=False) == out  # same source: reused

    pipeline.align(dict(ALIGN, max_steps=1, learning_rate=5e-3), align_dir, overwrite=True, progress=False)
    with pytest.raises(runs.RunDirError, match="belong to the old model"):
        pipeline.attack(attack, out, progress=False)
    pipeline.attack(attack, out, overwrite=True, progress=False)  # run again on the new model
    assert _info(out)["source_hash"] == _info(align_dir)["config_hash"]
