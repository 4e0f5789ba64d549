"""benchmarks/step_cost.py on the tiny model: the amortized and equal-batch rows exist and carry
what they claim (no timing is asserted; the ratios are only checked to be measured)."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
        assert row["equal_batch_sft"] == "align:4,general:4"
        assert row["time_ratio_vs_sft_equal_batch"] > 0 and row["memory_ratio_vs_sft_equal_batch"] > 0
