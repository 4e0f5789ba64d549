"""benchmarks/step_cost.py, eval_throughput.py and bf16_cost.py on the tiny model: the rows exist and carry what
they claim (no timing is asserted; the ratios are only checked to be measured)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_step_cost_amortized_and_equal_batch_rows():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--model", "tiny-llama",
                          "--defenses", "ctrap", "--steps", "2", "--amortized", "2", "--equal-batch",
                          "--max-length", "64"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    rows = {(r["defense"], r.get("sft_streams")): r for r in map(json.loads, out.splitlines())}
    assert set(rows) == {("sft", None), ("sft", "align:4,general:4"), ("ctrap", None),
                         ("ctrap-amortized-k2", None)}
    every, amortized = rows[("ctrap", None)], rows[("ctrap-amortized-k2", None)]
    assert every["passes_per_step"] == 3 and amortized["passes_per_step"] == 2.0
    for row in (every, amortized):
        assert len(row["step_seconds"]) == 2 and all(t > 0 for t in row["step_seconds"])
        assert row["equal_batch_sft"] == "align:4,general:4"
        assert row["time_ratio_vs_sft_equal_batch"] > 0 and row["memory_ratio_vs_sft_equal_batch"] > 0


def test_eval_throughput_rows():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_throughput.py"), "--model", "tiny-llama",
                          "--prompts", "5", "--batch-size", "2", "--max-new-tokens", "4"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    rows = {r["mode"]: r for r in map(json.loads, out.splitlines())}
    assert set(rows) == {"batched", "one_at_a_time"}
    batched, loop = rows["batched"], rows["one_at_a_time"]
    keys = {"prompts_per_second", "seconds", "n_prompts", "batch_size", "device"}
    assert keys <= set(batched) and keys <= set(loop)
    assert batched["n_prompts"] == loop["n_prompts"] == 5
    assert (batched["batch_size"], loop["batch_size"]) == (2, 1)
    assert batched["judge"] == loop["judge"] == "keyword"
    assert batched["speedup_vs_one_at_a_time"] == pytest.approx(
        batched["prompts_per_second"] / loop["prompts_per_second"])
    assert 0 <= batched["identical_answers"] <= 5


def test_step_cost_dtype_reaches_every_row():
    """--dtype loads the base weights of every row (SFT's too) in that dtype."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--model", "tiny-llama",
                          "--defenses", "ctrap", "--steps", "1", "--max-length", "64", "--dtype", "bfloat16",
                          "--bf16", "false"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["defense"] for r in rows] == ["sft", "ctrap"]
    assert all(r["weights_dtype"] == "bfloat16" and r["dtype"] == "bfloat16" for r in rows)


@pytest.mark.embedded
def test_shaped_model_has_the_named_shape(tmp_path):
    """benchmarks/shaped_model.py writes a loadable random model with the published layer shape."""
    from transformers import AutoConfig

    from inoculate.models import embedded_model_dir

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shaped_model.py"), "--shape", "smollm2-135m",
                    "--out", str(tmp_path / "m")], capture_output=True, text=True, env=env, timeout=600, check=True)
    made, real = AutoConfig.from_pretrained(tmp_path / "m"), AutoConfig.from_pretrained(embedded_model_dir())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert getattr(made, key) == getattr(real, key), key
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}


def test_step_cost_profile_counts_operators_and_autocast_casts():
    """--profile counts the operators of one step: CTRAP's three passes dispatch more than SFT's
    one, and bf16 autocast over fp32 weights adds casts that the same step without it lacks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rows = {}
    for bf16 in ("true", "false"):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--model", "tiny-llama",
                              "--defenses", "ctrap", "--steps", "1", "--max-length", "64", "--bf16", bf16,
                              "--profile"],
                             capture_output=True, text=True, env=env, timeout=600, check=True).stdout
        rows[bf16] = {r["defense"]: r for r in map(json.loads, out.splitlines())}
    for by_defense in rows.values():
        assert by_defense["ctrap"]["operators_per_step"] > 2 * by_defense["sft"]["operators_per_step"] > 0
    for name in ("sft", "ctrap"):
        assert rows["true"][name]["casts_per_step"] > rows["false"][name]["casts_per_step"]


def _last_row(script: str, max_length: int) -> dict:
    """The last JSON line `script` prints for one timed step of the tiny model at batch 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--model", "tiny-llama",
                          "--steps", "1", "--max-length", str(max_length), "--batch-size", "2"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_bf16_cost_row():
    row = _last_row("bf16_cost.py", 16)
    assert row["device"] == "cpu" and isinstance(row["native_bf16"], bool)
    assert row["fp32_seconds_per_step"] > 0 and row["bf16_seconds_per_step"] > 0
    assert row["bf16_time_ratio_vs_fp32"] == row["bf16_seconds_per_step"] / row["fp32_seconds_per_step"]


def test_denormal_cost_row():
    row = _last_row("denormal_cost.py", 64)  # the starter prompts need more than 16 tokens
    assert row["device"] == "cpu" and row["batch_size"] == 2 and 0.0 <= row["subnormal_share"] <= 1.0
    assert row["kept_seconds_per_step"] > 0 and row["flushed_seconds_per_step"] > 0
    assert row["kept_time_ratio_vs_flushed"] == row["kept_seconds_per_step"] / row["flushed_seconds_per_step"]
