"""The GPU embedding check (benchmarks/gpu_check_embed.py) stays runnable: without Ray, on the CPU, tiny sizes."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from gpu_script import ROOT, is_measure, run_blocked  # tests/ is on sys.path (rootdir conftest)

SCRIPT = ROOT / "benchmarks" / "gpu_check_embed.py"
# What the GPU machine lacks: importing any of these (or anything under them) fails there.
ABSENT = ("ray", "faiss", "s3fs")

def run_script(*args: str) -> subprocess.CompletedProcess:
    return run_blocked(SCRIPT, ABSENT, *args, env={"OMP_NUM_THREADS": "1"})


def test_cpu_dry_run_without_ray_writes_the_full_result(tmp_path):
    proc = run_script("--out", str(tmp_path), "--device", "cpu", "--dry-run", "--decode-threads", "2", "--long-epochs", "50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_embed.json").read_text())
    assert result["archive"]["images"] == 48 and result["embedding"]["n"] == 48
    assert result["embedding"]["dim"] == 128 and result["embedding"]["max_norm_error"] < 1e-5
    assert result["embedding"]["fp32_deterministic"] is True
    train = result["train"]
    assert train["device"] == "cpu" and train["epochs_run"] == 2 and train["n_train"] + train["n_val"] == 40
    assert 0 <= train["active_dims"] <= 128 and is_measure(train["seconds_per_epoch"])
    assert len(train["history"]["train_kl"]) == 2 and "mean_image_bce" in train
    assert result["train_other_objective"]["objective"] in ("beta", "capacity")
    for key in ("bare_decode_images_per_s", "stage_to_decode_ratio"):
        assert is_measure(result[key])
    assert set(result["stage_images_per_s"]) == {"fp32_first", "fp32"} and is_measure(result["forward_images_per_s"]["fp32"])
    assert "images/s: bare decode" in proc.stdout
    agreement = result["label_agreement"]
    assert 0 < agreement["chance"] < 1 and 0 <= agreement["pixels_16"] <= 1
    assert set(agreement) == {"vae_beta", "vae_beta_3_epochs", "pixels_16", "chance"}  # beta (with warm-up): the default
    assert result["train_long"]["epochs_run"] <= 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA; this machine has CUDA")
def test_without_cuda_it_fails_and_says_why(tmp_path):
    proc = run_script("--out", str(tmp_path))
    assert proc.returncode == 1
    assert "CUDA is not available" in proc.stderr
    assert not (tmp_path / "gpu_embed.json").exists()
