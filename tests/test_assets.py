"""The shipped models: they load offline, behave as their model card says, and the job that makes
them runs."""

import subprocess
import sys
from pathlib import Path

import torch

from rldiff.core.denoisers import Condition, load_denoiser
from rldiff.core.policies import fixed_policy
from rldiff.core.sampler import sample
from rldiff.core.seeds import initial_noise
from rldiff.data.classifier import load_classifier
from rldiff.data.digits import load_digits16

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_classifier_is_accurate_on_held_out_digits():
    images, labels = load_digits16("test")
    with torch.no_grad():
        predicted = load_classifier()(images).argmax(1)
    assert (predicted == labels).float().mean() > 0.98


def test_shipped_unet_draws_the_requested_digits():
    denoiser = load_denoiser()
    n = 20
    noise = initial_noise(range(n), (1, 16, 16))
    cond = Condition.make(torch.arange(n) % 10, 1.0)
    x0 = sample(
        denoiser, fixed_policy("unipc", "logsnr-uniform", 10, denoiser.noise_table), noise, cond, 10
    ).x0
    with torch.no_grad():
        predicted = load_classifier()(x0.clamp(-1, 1)).argmax(1)
    assert (predicted == cond.labels).float().mean() >= 0.85
    assert x0.abs().max() < 2


def test_pretrain_job_runs_in_quick_mode(tmp_path):
    out = tmp_path / "assets"
    cmd = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--iterations", "20",
           "--classifier-epochs", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert (out / "digits-unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "digits-classifier" / "model.safetensors").exists()
    assert "Test accuracy" in (out / "MODEL_CARD.md").read_text()
    load_denoiser(out / "digits-unet")  # what it writes loads back
