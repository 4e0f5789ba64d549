"""The training engine (training.py) and run directories (runs.py) on the tiny model, CPU.

Stream order is deterministic and resumable; gradient accumulation sums micro-batches;
non-finite losses stop the run with a message naming the loss and the step; a killed run
resumes from its checkpoint and ends with the same weights as an uninterrupted one; a finished
run is reused; a run directory holding another config is refused.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from inoculate import pipeline, runs, training
from inoculate.defenses.sft import SFT, SFTConfig
from inoculate.models import load_model
from inoculate.runs import RunDirError
from inoculate.training import NonFiniteLossError, Stream, TrainingArgs, train

# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


def _examples(n: int, length: int = 6, answer_from: int = 3) -> list[dict]:
    """n distinct examples of the same length (token ids 1000+i identify example i)."""
    out = []
    for i in range(n):
        ids = [1000 + i] + [(7 * i + 13 * j) % 5000 + 10 for j in range(1, length)]
        out.append({"input_ids": ids, "labels": [-100] * answer_from + ids[answer_from:]})
    return out


def _served(stream: Stream, k: int) -> list[list[int]]:
    """The example numbers of the next k batches."""
    return [[int(t) - 1000 for t in stream.next()["input_ids"][:, 0]] for _ in range(k)]


def test_stream_same_seed_same_batches():
    ex = _examples(10)
    a = _served(Stream("align", ex, 4, pad_id=0, seed=3), 8)
    b = _served(Stream("align", ex, 4, pad_id=0, seed=3), 8)
    c = _served(Stream("align", ex, 4, pad_id=0, seed=4), 8)
    assert a == b
    assert a != c, "another seed gives another order"
    assert _served(Stream("general", ex, 4, pad_id=0, seed=3), 8) != a, "streams differ by name"


def test_stream_epochs_are_permutations_and_batches_are_full():
    ex = _examples(10)
    s = Stream("align", ex, 4, pad_id=0, seed=0)
    assert s.batches_per_epoch == 3
    for _ in range(2):
        epoch = _served(s, 3)
        assert all(len(b) == 4 for b in epoch)
        assert set(sum(epoch, [])) == set(range(10)), "every example is served each epoch"
    first, second = _served(Stream("align", ex, 4, 0, 0), 3), _served(Stream("align", ex, 4, 0, 0), 6)[3:]
    assert first != second, "each epoch has its own order"


def test_stream_resume_position_reproduces_the_order():
    ex = _examples(10)
    full = _served(Stream("align", ex, 4, pad_id=0, seed=5), 8)
    resumed = Stream("align", ex, 4, pad_id=0, seed=5)
    resumed.served = 3  # what a checkpoint after 3 batches stores
    assert _served(resumed, 5) == full[3:]


def test_stream_rejects_empty_data():
    with pytest.raises(ValueError, match="'align' has no examples"):
        Stream("align", [], 2, pad_id=0, seed=0)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, caplog, native):
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    training._warn_emulated_bf16.cache_clear()
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="inoculate.training"):
        assert training.use_bf16(TrainingArgs(bf16="true"), cpu)
        assert training.use_bf16(TrainingArgs(bf16="true"), cpu)
        assert not training.use_bf16(TrainingArgs(bf16="auto"), cpu), "auto is off on a CPU"
        assert not training.use_bf16(TrainingArgs(bf16="false"), cpu)
    warned = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1), warned
    training._warn_emulated_bf16.cache_clear()


# ---------------------------------------------------------------------------------------------
# The loop: accumulation and non-finite losses
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama")
    return loaded.model, loaded.tokenizer


def _args(**kw) -> TrainingArgs:
    base = dict(max_steps=1, learning_rate=0.5, optim="sgd", weight_decay=0.0, logging_steps=1,
                save_steps=0, bf16="false")
    base.update(kw)
    return TrainingArgs(**base)


def _sft_step(tiny, tmp_path, name, examples, batch, accumulation):
    model_, tok = tiny
    model = copy.deepcopy(model_)
    model.requires_grad_(True)
    defense = SFT(SFTConfig(), batch)
    defense.setup(model, tok)
    streams = {"align": Stream("align", examples, batch, tok.pad_token_id, seed=0)}
    result = train(model, defense, streams,
                   _args(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation),
                   tmp_path / name, main_stream="align", progress=False)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return result, grads, weights


def test_two_micro_batches_of_two_equal_one_batch_of_four(tiny, tmp_path):
    # equal lengths and equal answer-token counts: the mean of the two micro-batch means is the
    # mean over all four examples, so the gradients must agree exactly (up to float rounding)
    examples = _examples(4, length=12, answer_from=5)
    one, g1, w1 = _sft_step(tiny, tmp_path, "one", examples, batch=4, accumulation=1)
    two, g2, w2 = _sft_step(tiny, tmp_path, "two", examples, batch=2, accumulation=2)
    half, g_half, _ = _sft_step(tiny, tmp_path, "half", examples, batch=2, accumulation=1)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w2[n], w1[n], rtol=1e-5, atol=1e-6)
    assert math.isclose(one.last_logs["loss"], two.last_logs["loss"], rel_tol=1e-6)
    # the check can fail: one micro-batch alone is not the same gradient
    assert any(not torch.allclose(g_half[n], g1[n], atol=1e-6) for n in g1)


def test_training_on_a_cpu_flushes_subnormal_floats(tiny, tmp_path):
    # subnormals (below 1.2e-38 in fp32) take the CPU's slow path; train() treats them as zero
    subnormal = lambda: float(torch.tensor([1e-40]) * 1.0)
    torch.set_flush_denormal(False)
    try:
        assert subnormal() > 0, "the check can fail: without the flush the product stays subnormal"
        _sft_step(tiny, tmp_path, "flush", _examples(4, length=12, answer_from=5), batch=4, accumulation=1)
        assert subnormal() == 0.0
    finally:
        torch.set_flush_denormal(False)


class _ReportsEveryOther(SFT):
    """Reports `sparse` only on its first micro-step, like an amortized look-ahead defense."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = 0

    def accumulate(self, batches, scale):
        self.calls += 1
        out = super().accumulate(batches, scale)
        if self.calls % 2 == 1:
            out["sparse"] = 3.0
        return out


def test_logged_values_average_over_the_micro_steps_that_report_them(tiny, tmp_path):
    model_, tok = tiny
    model = copy.deepcopy(model_)
    model.requires_grad_(True)
    defense = _ReportsEveryOther(SFTConfig(), 2)
    defense.setup(model, tok)
    streams = {"align": Stream("align", _examples(4, length=12, answer_from=5), 2, tok.pad_token_id, seed=0)}
    result = train(model, defense, streams, _args(per_device_train_batch_size=2, gradient_accumulation_steps=2),
                   tmp_path / "sparse", main_stream="align", progress=False)
    assert result.last_logs["sparse"] == pytest.approx(3.0)  # not 1.5 (3 divided by 2 micro-steps)


def test_a_loss_not_reported_at_a_logging_step_is_logged_with_its_latest_value(tiny, tmp_path):
    """Amortized look-ahead defenses report their trap losses on refresh steps only; a logging
    step between refreshes must still log them (the latest value), not drop them."""
    model_, tok = tiny
    model = copy.deepcopy(model_)
    model.requires_grad_(True)
    defense = _ReportsEveryOther(SFTConfig(), 2)  # reports `sparse` on steps 1 and 3 only
    defense.setup(model, tok)
    streams = {"align": Stream("align", _examples(4, length=12, answer_from=5), 2, tok.pad_token_id, seed=0)}
    train(model, defense, streams, _args(per_device_train_batch_size=2, max_steps=4, logging_steps=2),
          tmp_path / "carry", main_stream="align", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "carry" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["sparse"] == 3.0 and "loss" in r for r in rows)


class _NaNAtStep(SFT):
    def __init__(self, *a, bad_call=2, where="loss", **kw):
        super().__init__(*a, **kw)
        self.calls, self.bad_call, self.where = 0, bad_call, where

    def accumulate(self, batches, scale):
        self.calls += 1
        out = super().accumulate(batches, scale)
        if self.calls == self.bad_call:
            if self.where == "loss":
                out["loss"] = float("nan")
            else:
                self.params[0].grad.fill_(float("inf"))
        return out


@pytest.mark.parametrize("where, message", [("loss", r"non-finite loss at step 2: \{'loss': nan\}"),
                                             ("grad", r"gradient norm is (inf|nan) at step 2")])
def test_non_finite_loss_or_gradient_stops_with_the_step(tiny, tmp_path, where, message):
    model_, tok = tiny
    model = copy.deepcopy(model_)
    model.requires_grad_(True)
    defense = _NaNAtStep(SFTConfig(), 2, where=where)
    defense.setup(model, tok)
    streams = {"align": Stream("align", _examples(4), 2, tok.pad_token_id, seed=0)}
    with pytest.raises(NonFiniteLossError, match=message) as err:
        train(model, defense, streams, _args(max_steps=3), tmp_path / "run", "align", progress=False)
    assert "learning_rate" in str(err.value)
    assert defense.calls == 2, "the run stops at the bad step"


# ---------------------------------------------------------------------------------------------
# Resume, reuse, refusal: through pipeline.align on the starter data
# ---------------------------------------------------------------------------------------------

ALIGN = dict(model="tiny-llama", data="starter", defense="sft", max_steps=4, save_steps=2,
             logging_steps=1, per_device_train_batch_size=2, num_samples=8, learning_rate=1e-2,
             lora_r=4, lora_alpha=8.0, lora_dropout=0.1, seed=7)


def _steps(run_dir):
    return [json.loads(l)["step"] for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()]


def _kill_at_call(monkeypatch, n):
    """Make the n-th SFT micro-step raise KeyboardInterrupt, as a Ctrl-C / kill would."""
    real = SFT.accumulate
    calls = {"n": 0}

    def accumulate(self, batches, scale):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(self, batches, scale)

    monkeypatch.setattr(SFT, "accumulate", accumulate)


def _align_killed_at_call(cfg, run_dir, n):
    """pipeline.align(cfg) killed during its n-th micro-step."""
    with pytest.MonkeyPatch.context() as mp:
        _kill_at_call(mp, n)
        with pytest.raises(KeyboardInterrupt):
            pipeline.align(dict(cfg), run_dir, progress=False)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """An uninterrupted run, and a run killed during step 4 (checkpoint at 2) then rerun."""
    root = tmp_path_factory.mktemp("resume")
    straight = pipeline.align(dict(ALIGN), root / "straight", progress=False)
    killed = root / "killed"
    _align_killed_at_call(ALIGN, killed, 4)
    after_kill = {
        "entries": sorted(p.name for p in killed.iterdir()),
        "progress": json.loads((killed / "checkpoint" / "progress.json").read_text()),
        "steps": _steps(killed),
    }
    pipeline.align(dict(ALIGN), killed, progress=False)
    return straight, killed, after_kill


def test_killed_run_leaves_nothing_half_written(resumed):
    _, _, after_kill = resumed
    assert "model" not in after_kill["entries"]
    assert runs.RUN_MARKER not in after_kill["entries"]
    assert not [e for e in after_kill["entries"] if ".tmp" in e]
    assert after_kill["progress"]["step"] == 2
    assert after_kill["steps"] == [1, 2, 3], "steps 1-3 were logged before the kill"


def test_rerun_resumes_from_the_checkpoint(resumed):
    _, killed, _ = resumed
    info = json.loads((killed / runs.RUN_MARKER).read_text())
    assert info["status"] == "complete"
    assert info["resumed_from"] == 2
    assert info["steps"] == 4
    assert _steps(killed) == [1, 2, 3, 4], "no duplicate steps: step 3 of the killed attempt was dropped"
    assert not (killed / "checkpoint").exists(), "the checkpoint is removed once the run is complete"


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(resumed):
    straight, killed, _ = resumed
    a = load_file(str(straight / "model" / "adapter_model.safetensors"))
    b = load_file(str(killed / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k), "training moved LoRA B"
    logs = lambda d: [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()]
    for x, y in zip(logs(straight), logs(killed)):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-6), (x, y)


def test_complete_run_is_reused_without_training(resumed, monkeypatch):
    straight, _, _ = resumed
    weights = straight / "model" / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("a complete run was trained again")

    monkeypatch.setattr(pipeline, "train", no_training)
    monkeypatch.setattr(pipeline, "load_model", no_training)
    assert pipeline.align(dict(ALIGN), straight, progress=False) == straight
    assert weights.stat().st_mtime_ns == before


def test_run_directory_with_another_config_is_refused(resumed):
    straight, _, _ = resumed
    changed = dict(ALIGN, learning_rate=1e-3, max_steps=5)
    with pytest.raises(RunDirError) as err:
        pipeline.align(changed, straight, progress=False)
    message = str(err.value)
    assert "learning_rate" in message and "max_steps" in message
    assert "--overwrite" in message
    assert "lora_r" not in message, "only the fields that differ are named"


def test_overwrite_replaces_the_run(tmp_path):
    small = dict(ALIGN, max_steps=1, save_steps=0)
    out = pipeline.align(small, tmp_path / "run", progress=False)
    (out / "marker.txt").write_text("old")
    pipeline.align(dict(small, learning_rate=1e-3), out, overwrite=True, progress=False)
    assert not (out / "marker.txt").exists()
    assert runs.read_config(out)["learning_rate"] == 1e-3


def test_restart_before_the_first_checkpoint_logs_no_step_twice(resumed, tmp_path, monkeypatch):
    """An attack (with the step-0 loss monitor) killed before any checkpoint starts over; its
    log must not keep the killed attempt's step-0 line."""
    straight, _, _ = resumed
    attack = dict(model=str(straight), data="starter", attack="harmful", samples=4, max_steps=2,
                  per_device_train_batch_size=2, logging_steps=1, save_steps=0, monitor_samples=2)
    out = tmp_path / "attack"
    with monkeypatch.context() as mp:
        _kill_at_call(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            pipeline.attack(dict(attack), out, progress=False)
    assert _steps(out) == [0, 1]
    pipeline.attack(dict(attack), out, progress=False)
    assert _steps(out) == [0, 1, 2]
    assert json.loads((out / runs.RUN_MARKER).read_text())["resumed_from"] == 0


# ---------------------------------------------------------------------------------------------
# Options: gradient checkpointing, TensorBoard
# ---------------------------------------------------------------------------------------------

def _one_sft_step(tmp_path, **kw):
    torch.manual_seed(0)
    model = load_model("tiny-llama").model
    model.requires_grad_(True)
    defense = SFT(SFTConfig(), 2)
    defense.setup(model, None)
    streams = {"align": Stream("align", _examples(4), 2, pad_id=0, seed=0)}
    args = TrainingArgs(max_steps=1, optim="sgd", learning_rate=0.1, weight_decay=0.0, save_steps=0,
                        logging_steps=1, **kw)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, defense, streams, args, tmp_path, main_stream="align", progress=False)
    return [(p.detach() - b) for p, b in zip(model.parameters(), before)]


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    plain = _one_sft_step(tmp_path / "plain")
    ckpt = _one_sft_step(tmp_path / "ckpt", gradient_checkpointing=True)
    assert sum(float(d.abs().sum()) for d in plain) > 0
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_report_to_tensorboard_writes_events(tmp_path):
    _one_sft_step(tmp_path, report_to="tensorboard")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="unknown report_to"):
        _one_sft_step(tmp_path / "bad", report_to="mlflow")


# ---------------------------------------------------------------------------------------------
# Keeping the weights of the best logged step (select_by)
# ---------------------------------------------------------------------------------------------

SELECT = dict(ALIGN, max_steps=6, save_steps=0, select_by="loss", select_mode="min")


def _adapter(run_dir):
    return load_file(str(run_dir / "model" / "adapter_model.safetensors"))


def _assert_same_adapter(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_select_by_keeps_the_weights_the_best_logged_value_was_measured_on(tmp_path):
    """The model saved is the one whose loss was the lowest logged: step N's loss is measured
    on the weights after N − 1 updates, so they equal a run stopped after N − 1 steps; run.json
    says which step, how many updates and the value."""
    selected = pipeline.align(dict(SELECT), tmp_path / "selected", progress=False)
    logged = [json.loads(l) for l in (selected / "log.jsonl").read_text().splitlines()]
    best = min(logged, key=lambda r: r["loss"])
    assert best["step"] > 1, "the first step was best: the comparison below would need 0 steps"
    info = json.loads((selected / runs.RUN_MARKER).read_text())
    assert info["selected"] == {"step": best["step"], "updates": best["step"] - 1, "key": "loss",
                                "value": best["loss"]}
    stopped = pipeline.align(dict(ALIGN, max_steps=best["step"] - 1, save_steps=0), tmp_path / "stopped",
                             progress=False)
    _assert_same_adapter(_adapter(stopped), _adapter(selected))
    last = pipeline.align(dict(ALIGN, max_steps=SELECT["max_steps"], save_steps=0), tmp_path / "last",
                          progress=False)
    assert any(not torch.equal(_adapter(last)[k], _adapter(selected)[k]) for k in _adapter(last))


def test_select_by_survives_an_interrupted_run(tmp_path):
    """The kept weights travel in the checkpoint: a run killed after its best step and resumed
    ends with the same weights and selection as an uninterrupted one. (Highest loss: the first
    step's, on the weights before any update, which only the checkpoint still holds.)"""
    cfg = dict(SELECT, save_steps=2, select_mode="max")
    straight = pipeline.align(dict(cfg), tmp_path / "straight", progress=False)
    killed = tmp_path / "killed"
    _align_killed_at_call(cfg, killed, 5)
    progress = json.loads((killed / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == 4 and progress["selected"]["key"] == "loss"
    pipeline.align(dict(cfg), killed, progress=False)
    info = [json.loads((d / runs.RUN_MARKER).read_text()) for d in (straight, killed)]
    assert info[1]["resumed_from"] == 4
    assert info[0]["selected"] == info[1]["selected"] and info[0]["selected"]["step"] < 5
    _assert_same_adapter(_adapter(straight), _adapter(killed))


def test_select_by_a_value_not_logged_fails_at_the_first_step(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = SFT.accumulate

    def counting(self, batches, scale):
        calls["n"] += 1
        return real(self, batches, scale)

    monkeypatch.setattr(SFT, "accumulate", counting)
    with pytest.raises(pipeline.ConfigError, match=r"select_by='trap_gap'.*step 1: .*loss"):
        pipeline.align(dict(SELECT, select_by="trap_gap"), tmp_path / "bad", progress=False)
    assert calls["n"] == 1
    assert not (tmp_path / "bad" / "model").exists()
    with pytest.raises(pipeline.ConfigError, match="select_mode must be min or max"):
        pipeline.align(dict(SELECT, select_mode="best"), tmp_path / "bad2", progress=False)
    with pytest.raises(pipeline.ConfigError, match="not supported with fsdp"):
        pipeline.align(dict(SELECT, fsdp=True), tmp_path / "bad3", progress=False)


# ---------------------------------------------------------------------------------------------
# The alignment's held-out monitor (monitor_samples), and selecting by one of its values
# ---------------------------------------------------------------------------------------------

CTRAP_MONITORED = dict(ALIGN, defense="ctrap", max_steps=3, save_steps=0, lora_dropout=0.0,
                       monitor_samples=3, monitor_new_tokens=4, **{"ctrap.alpha": 0.5})


def _log(run_dir):
    return [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()]


def test_align_monitor_logs_held_out_values_and_does_not_touch_training(tmp_path):
    """Every logging step (and step 0) logs the held-out losses, the greedy answers' rates and
    CTRAP's probe; the trained weights are bit-identical to a run without the monitor (the
    probe moves the parameters and takes gradients, and must leave no trace)."""
    monitored = pipeline.align(dict(CTRAP_MONITORED), tmp_path / "monitored", progress=False)
    plain = pipeline.align(dict(CTRAP_MONITORED, monitor_samples=0), tmp_path / "plain", progress=False)
    logged = _log(monitored)
    assert [r["step"] for r in logged] == [0, 1, 2, 3]
    want = {"harmful_loss", "collapse_loss", "alignment_loss", "general_loss", "collapse_token_share",
            "degenerate_rate", "refusal_rate", "ctrap/trap_gap", "ctrap/collapse_loss_at_theta",
            "ctrap/point/collapse_token_share", "ctrap/point/degenerate_rate",
            "answers", "ctrap/point/answers"}
    for row in logged:
        values = {k[len("monitor/"):]: v for k, v in row.items() if k.startswith("monitor/")}
        assert want <= set(values), row
        answers = {k: values.pop(k) for k in ("answers", "ctrap/point/answers")}
        assert all(len(a) == 3 and all(isinstance(t, str) for t in a) for a in answers.values()), row
        assert all(math.isfinite(v) for v in values.values()), row
        assert 0.0 <= values["refusal_rate"] <= 1.0 and -1.0 <= values["ctrap/trap_gap"] <= 1.0
    assert len({r["monitor/ctrap/collapse_loss_at_theta"] for r in logged}) == 4, "measured anew each step"
    assert not any(k.startswith("monitor/") for r in _log(plain) for k in r)
    _assert_same_adapter(_adapter(plain), _adapter(monitored))


def test_align_monitor_answers_at_every_simulated_point_and_selects_on_the_deepest(tmp_path):
    """With trap_steps = 2 the monitor answers at θ_1 and θ_2 (point/step1/, point/step2/), logs
    the point with more "error" as point/deepest/ (point/ stays θ_2's), and select_by can name it."""
    key = "monitor/ctrap/point/deepest/collapse_token_share"
    cfg = dict(CTRAP_MONITORED, select_by=key, select_mode="max", **{"ctrap.trap_steps": 2})
    run = pipeline.align(cfg, tmp_path / "run", progress=False)
    logged = _log(run)
    for row in logged:
        steps = [row[f"monitor/ctrap/point/step{k}/collapse_token_share"] for k in (1, 2)]
        k = row["monitor/ctrap/point/deepest_step"]
        assert row[key] == steps[k - 1] == max(steps) and (k == 1 or steps[0] < steps[1]), row
        assert row["monitor/ctrap/point/collapse_token_share"] == steps[1]
        assert row["monitor/ctrap/point/deepest/answers"] == row[f"monitor/ctrap/point/step{k}/answers"]
        assert len(row["monitor/ctrap/point/step1/answers"]) == 3
    info = json.loads((run / runs.RUN_MARKER).read_text())
    assert info["selected"]["key"] == key and info["selected"]["value"] == max(r[key] for r in logged)


def test_align_monitor_masked_answers_at_theta_and_every_point_and_the_script_reads_them_again(tmp_path):
    """monitor_masked answers the held-out prompts a second time without the collapse word, at θ
    and at each simulated point, with their own rates; scripts/point_answers.py runs the same
    monitor once on the finished model and prints the last logged step's counts. Without
    monitor_samples it is a config error."""
    import subprocess
    import sys
    from pathlib import Path

    from inoculate.evaluation.judges import keyword_label

    cfg = dict(CTRAP_MONITORED, max_steps=1, monitor_masked=True, **{"ctrap.trap_steps": 2})
    run = pipeline.align(cfg, tmp_path / "run", progress=False)
    logged = _log(run)
    assert [r["step"] for r in logged] == [0, 1]

    def counts(answers):
        labels = [keyword_label(a) for a in answers]
        return (labels.count("degenerate"), labels.count("refusal"),
                len(labels) - labels.count("degenerate") - labels.count("refusal"))

    for row in logged:
        for where in ("monitor/", "monitor/ctrap/point/step1/", "monitor/ctrap/point/step2/"):
            masked = row[f"{where}masked_answers"]
            assert len(masked) == 3 and all(isinstance(a, str) for a in masked), row
            assert row[f"{where}masked_refusal_rate"] == counts(masked)[1] / 3
            assert row[f"{where}masked_degenerate_rate"] == counts(masked)[0] / 3
    script = Path(__file__).resolve().parents[1] / "scripts" / "point_answers.py"
    done = subprocess.run([sys.executable, str(script), str(run), "--samples", "3"], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    printed = {line.split()[0]: " ".join(line.split()[2:]) for line in done.stdout.splitlines()
               if line.split() and line.split()[0] in ("θ", "step1", "step2")}
    last = logged[-1]
    for name, where in (("θ", "monitor/"), ("step1", "monitor/ctrap/point/step1/"),
                        ("step2", "monitor/ctrap/point/step2/")):
        want = " ".join("{} / {} / {}".format(*counts(last[f"{where}{k}"])) for k in ("answers", "masked_answers"))
        assert printed[name] == want, done.stdout
    with pytest.raises(pipeline.ConfigError, match="monitor_masked"):
        pipeline.align_config(dict(ALIGN, monitor_masked=True))


def test_align_monitor_answers_task_prompts_and_selection_can_bound_their_collapse(tmp_path):
    """monitor_tasks answers each task's last N test prompts at θ and logs their answers and the
    collapse-token share (generation_stats of those answers); select_limits can name it. Without
    monitor_samples, or with a task the suite lacks, it is a config error; at its default the
    field stays out of the resolved config (earlier runs keep their hash)."""
    from inoculate.evaluation.metrics import collapse_token_id, generation_stats
    from transformers import AutoTokenizer

    key = "monitor/tasks/sst2/collapse_token_share"
    cfg = dict(CTRAP_MONITORED, max_steps=2, monitor_tasks=["sst2"], select_by="monitor/ctrap/trap_gap",
               select_mode="max", select_limits=[f"{key}<=1"])
    run = pipeline.align(cfg, tmp_path / "run", progress=False)
    logged = _log(run)
    assert [r["step"] for r in logged] == [0, 1, 2]
    tok = AutoTokenizer.from_pretrained(run / "model")
    prompts = [r.prompt for r in pipeline.task_records(pipeline.align_config(cfg)[0], "sst2", train=False, last=3)]
    assert len(prompts) == 3
    for row in logged:
        answers = row["monitor/tasks/sst2/answers"]
        assert len(answers) == 3 and all(isinstance(a, str) for a in answers), row
        share = generation_stats(answers, tok, collapse_token_id(tok))["collapse_token_share"]
        assert row[key] == (math.nan if share is None else share) or (share is None and math.isnan(row[key]))
    assert json.loads((run / runs.RUN_MARKER).read_text())["selected"]["limits"] == [f"{key}<=1"]
    with pytest.raises(pipeline.ConfigError, match=r"monitor_tasks \['sst2'\] .*set monitor_samples > 0"):
        pipeline.align_config(dict(ALIGN, monitor_tasks=["sst2"]))
    with pytest.raises(pipeline.ConfigError, match="task 'imdb' is not in data suite"):
        pipeline.align(dict(cfg, monitor_tasks=["imdb"]), tmp_path / "bad", progress=False)
    assert "monitor_tasks" not in pipeline.align_config(dict(ALIGN))[2]
    assert pipeline.align_config(cfg)[2]["monitor_tasks"] == ["sst2"]


@pytest.mark.parametrize("defense,options,key", [
    ("booster", {}, "booster/point/refusal_rate"),
    ("seam", {"dtype": "float32"}, "seam/cos_sd"),
    ("tar", {"tar.inner_steps": 2, "tar.tamper_every": 2}, "tar/point/refusal_rate"),
    ("vaccine", {}, "vaccine/perturbation_gap"),
    ("repnoise", {}, "repnoise/noise_mmd"),
    ("npo", {}, "npo/npo_loss")])
def test_align_monitor_logs_the_probe_of_every_defense(tmp_path, defense, options, key):
    """Every defense but SFT has a probe (CTRAP's is tested above): a monitored alignment logs
    it under monitor/<defense>/ at step 0 and every logging step."""
    cfg = dict(ALIGN, defense=defense, max_steps=1, save_steps=0, lora_dropout=0.0, monitor_samples=2,
               monitor_new_tokens=2, **options)
    logged = _log(pipeline.align(cfg, tmp_path / "run", progress=False))
    assert [r["step"] for r in logged] == [0, 1]
    for row in logged:
        assert math.isfinite(row[f"monitor/{key}"]), row


def test_align_monitor_reads_the_end_of_the_test_splits(tmp_path, monkeypatch):
    """The monitor's held-out examples are the last monitor_samples of the harmful and general
    test splits (evaluation reads the first ones)."""
    from inoculate.data.sources import load_records

    seen = []
    real = pipeline._loss_monitor

    def spy(probe, tok, cfg, device, collapse_text, general=None):
        seen.append((probe, general))
        return real(probe, tok, cfg, device, collapse_text, general)

    monkeypatch.setattr(pipeline, "_loss_monitor", spy)
    pipeline.align(dict(CTRAP_MONITORED, max_steps=1), tmp_path / "run", progress=False)
    (probe, general), = seen
    assert probe == load_records("starter", "test")[-3:]
    assert general == load_records("starter_general", "test")[-3:]


def test_select_by_a_monitor_value_keeps_the_weights_it_was_measured_on(tmp_path):
    """A monitor value at step N is measured after step N's update: selecting by it keeps the
    weights after N updates (a run stopped after N steps), not N − 1 as for a step's losses."""
    cfg = dict(SELECT, monitor_samples=3, monitor_new_tokens=4, lora_dropout=0.0, learning_rate=0.1,
               select_by="monitor/alignment_loss", select_mode="min")  # lr 0.1: it overshoots
    selected = pipeline.align(dict(cfg), tmp_path / "selected", progress=False)
    logged = _log(selected)
    best = min(logged, key=lambda r: r["monitor/alignment_loss"])
    assert 0 < best["step"] < cfg["max_steps"], "the comparison below needs an inner step"
    info = json.loads((selected / runs.RUN_MARKER).read_text())
    assert info["selected"] == {"step": best["step"], "updates": best["step"], "key": "monitor/alignment_loss",
                                "value": best["monitor/alignment_loss"]}
    stopped = pipeline.align(dict(ALIGN, max_steps=best["step"], save_steps=0, lora_dropout=0.0,
                                  learning_rate=0.1),
                             tmp_path / "stopped", progress=False)
    _assert_same_adapter(_adapter(stopped), _adapter(selected))
    # select_limits leave out the steps that break them: here the best one
    limit = f"monitor/alignment_loss>={best['monitor/alignment_loss'] + 1e-6}"
    limited = pipeline.align(dict(cfg, select_limits=[limit]), tmp_path / "limited", progress=False)
    second = min((r for r in logged if r["step"] != best["step"]), key=lambda r: r["monitor/alignment_loss"])
    info = json.loads((limited / runs.RUN_MARKER).read_text())
    assert info["selected"]["step"] == second["step"] and info["selected"]["limits"] == [limit]
    with pytest.raises(RuntimeError, match=r"no logged step .*within select_limits \['monitor/alignment_loss<=0'\]"):
        pipeline.align(dict(cfg, select_limits=["monitor/alignment_loss<=0"]), tmp_path / "none", progress=False)
    assert not (tmp_path / "none" / "model").exists()


def test_monitor_options_are_checked_before_training(tmp_path):
    with pytest.raises(pipeline.ConfigError, match="set monitor_samples > 0"):
        pipeline.align(dict(SELECT, select_by="monitor/ctrap/trap_gap"), tmp_path / "a", progress=False)
    with pytest.raises(pipeline.ConfigError, match="monitor_samples.*not supported with fsdp"):
        pipeline.align(dict(ALIGN, monitor_samples=2, fsdp=True), tmp_path / "b", progress=False)
    with pytest.raises(pipeline.ConfigError, match=r"select_limits entry 'grad_norm<3': write KEY<=NUMBER"):
        pipeline.align(dict(SELECT, select_limits=["grad_norm<3"]), tmp_path / "e", progress=False)
    with pytest.raises(pipeline.ConfigError, match=r"select_limits key\(s\) \['monitor/refusal_rate'\] .*different points"):
        pipeline.align(dict(SELECT, monitor_samples=2, select_limits=["monitor/refusal_rate>=0.5"]),
                       tmp_path / "f", progress=False)
    with pytest.raises(pipeline.ConfigError, match="select_by, which is not set"):
        pipeline.align(dict(ALIGN, select_limits=["loss<=1"]), tmp_path / "g", progress=False)
    with pytest.raises(pipeline.ConfigError, match="monitor_samples must be >= 0"):
        pipeline.align(dict(ALIGN, monitor_samples=-1), tmp_path / "c", progress=False)
    # a monitor key that is not logged fails on the step-0 measurement, before any update
    with pytest.raises(pipeline.ConfigError, match=r"select_by='monitor/trap_gap'.*step 0: .*monitor/ctrap/trap_gap"):
        pipeline.align(dict(CTRAP_MONITORED, select_by="monitor/trap_gap"), tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "log.jsonl").exists() or not _log(tmp_path / "d")


def test_engine_refuses_a_monitor_key_without_a_monitor(tiny, tmp_path):
    """train() itself (not only the align config) refuses select_by on a monitor value when no
    monitor runs, before any step."""
    from inoculate.training import Selection

    model, tok = tiny
    defense = SFT(SFTConfig(), 2)
    defense.setup(copy.deepcopy(model).requires_grad_(True), tok)
    streams = {"align": Stream("align", _examples(2), 2, tok.pad_token_id, seed=0)}
    with pytest.raises(pipeline.ConfigError, match="names a monitor value, but this run has no monitor"):
        train(defense.model, defense, streams, _args(), tmp_path / "run", main_stream="align",
              progress=False, selection=Selection("monitor/collapse_token_share"))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_selection_of_the_initial_weights_is_warned_about(caplog):
    """When no later step beats step 0 (or none meets the limits), the kept weights are the ones
    training started from: restore says so in the log, since the saved model is then not trained."""
    from inoculate.training import Selection

    p = torch.nn.Parameter(torch.zeros(2))
    sel = Selection("monitor/x", "max", limits=["monitor/y<=0.1"])
    sel.offer(0, {"monitor/x": 0.0, "monitor/y": 0.0}, [("p", p)], updates=0)
    with torch.no_grad():
        p.add_(1.0)
    sel.offer(10, {"monitor/x": 1.0, "monitor/y": 0.5}, [("p", p)], updates=10)  # better, but over the limit
    with caplog.at_level("WARNING", logger="inoculate.training"):
        assert sel.restore([("p", p)])["step"] == 0
    assert torch.equal(p.detach(), torch.zeros(2))
    assert "kept the weights before any update (step 0" in caplog.text and "monitor/y<=0.1" in caplog.text
    caplog.clear()
    sel = Selection("monitor/x", "max")
    sel.offer(0, {"monitor/x": 0.0}, [("p", p)], updates=0)
    sel.offer(10, {"monitor/x": 1.0}, [("p", p)], updates=10)
    with caplog.at_level("WARNING", logger="inoculate.training"):
        assert sel.restore([("p", p)])["step"] == 10
    assert "before any update" not in caplog.text


def test_selection_ties_keep_the_first_or_the_last_equal_step():
    """A value that saturates (a share of 1.0 at several steps) ties: the default keeps the first
    such step, select_ties=last the last one, with that step's weights."""
    from inoculate.training import Selection

    for ties, kept in [("first", 10), ("last", 30)]:
        p = torch.nn.Parameter(torch.zeros(1))
        sel = Selection("monitor/x", "max", ties=ties)
        for step, value in [(0, 0.5), (10, 1.0), (20, 0.9), (30, 1.0)]:
            with torch.no_grad():
                p.fill_(step)
            sel.offer(step, {"monitor/x": value}, [("p", p)], updates=step)
        record = sel.restore([("p", p)])
        assert record["step"] == kept and p.item() == kept
        assert record.get("ties", "first") == ties
    from inoculate.config import ConfigError
    from inoculate.pipeline import AlignConfig

    with pytest.raises(ConfigError, match="select_ties must be first or last"):
        AlignConfig(model="m", data="d", defense="sft", select_by="grad_norm", select_ties="middle")


def test_resumed_lora_trap_run_draws_the_adapters_of_an_uninterrupted_run(tmp_path):
    """CTRAP with step_direction=lora draws its simulated adapter from the micro-step count: a
    run killed after its checkpoint and rerun continues the count (and so the draws), ending
    with the weights of a run that was never interrupted."""
    from inoculate.defenses.ctrap import CTRAP

    cfg = {k: v for k, v in ALIGN.items() if not k.startswith("lora_")}
    cfg.update(defense="ctrap", lora=False, learning_rate=1e-3, **{
        "ctrap.step_direction": "lora", "ctrap.normalize": False, "ctrap.alpha": 0.05,
        "ctrap.lambda_collapse": 1.0, "ctrap.harmful_batch_size": 2, "ctrap.trap_lora_r": 2})
    straight = pipeline.align(dict(cfg), tmp_path / "straight", progress=False)
    real, calls = CTRAP.accumulate, {"n": 0}

    def accumulate(self, batches, scale):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(self, batches, scale)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CTRAP, "accumulate", accumulate)
        with pytest.raises(KeyboardInterrupt):
            pipeline.align(dict(cfg), tmp_path / "killed", progress=False)
    killed = pipeline.align(dict(cfg), tmp_path / "killed", progress=False)
    assert json.loads((killed / runs.RUN_MARKER).read_text())["resumed_from"] == 2
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
