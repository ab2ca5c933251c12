"""The GPU speed tools on a machine without a GPU: benchmarks/train_throughput.py runs its tiny
CPU shape, and `make gpu-check` says there is nothing to check and exits 0."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shape; on a GPU make gpu-check runs it")
def test_train_throughput_smoke_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_throughput.py"), "--json",
                        str(tmp_path / "rows.json"), "--markdown", str(tmp_path / "table.md")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["spec"]["impl"]: row["result"] for row in json.load(open(tmp_path / "rows.json"))["rows"]}
    assert rows["megatron-core"] == {"error": "skipped: its GPTModel needs a CUDA GPU"}
    for impl in ("ours", "transformers"):  # both train the same tiny shape from a random init
        assert rows[impl]["tokens_per_s"] > 0 and rows[impl]["peak_mem_gib"] > 0
        assert abs(rows[impl]["loss"] - math.log(512)) < 0.3, rows[impl]
    table = (tmp_path / "table.md").read_text()
    assert "| ours (mbs 2, eager) |" in table and "| transformers (mbs 2) |" in table
    assert table.startswith("Training throughput: tiny, seq 64, global batch 4, fp32, CPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    r = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "gpu-check: no CUDA GPU here (torch sees none): nothing to check" in r.stdout
