"""Slow and GPU checks, skipped by default: `make test-slow` runs them."""

import pytest
import torch

from rldiff.denoisers import Condition, load_denoiser
from rldiff.evaluate import EVAL_SEED_OFFSET
from rldiff.metrics import DigitMetrics
from rldiff.policies import fixed_policy
from rldiff.sampler import sample
from rldiff.seeds import initial_noise


def _held_out(n: int):
    seeds = list(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + n))
    return seeds, initial_noise(seeds, (1, 16, 16)), Condition.make([s % 10 for s in seeds], 1.0)


@pytest.mark.slow
def test_embedded_model_at_50_nfe_is_within_1_5x_of_the_real_floor():
    denoiser, metrics = load_denoiser(), DigitMetrics()
    floor = metrics.real_floor()
    seeds, noise, cond = _held_out(floor.count)  # FD depends on n: compare at the floor's count
    policy = fixed_policy("unipc", "logsnr-uniform", 50, denoiser.noise)
    x0 = sample(denoiser, policy, noise, cond, 50, seeds=seeds).x0.clamp(-1, 1)
    fd = metrics.fd(x0)
    print(f"FD {fd:.2f} on {floor.count} samples vs real floor {floor.fd:.2f}")
    assert fd <= 1.5 * floor.fd


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_on_cuda_matches_cpu():
    seeds, noise, cond = _held_out(16)
    results = []
    for device in ("cpu", "cuda"):
        denoiser = load_denoiser(device=device)
        for solver in ("unipc", "heun"):
            policy = fixed_policy(solver, "karras", 6, denoiser.noise)
            out = sample(denoiser, policy, noise.to(device), cond, 6, seeds=seeds)
            results.append(out.x0.cpu())
    for cpu, cuda in zip(results[:2], results[2:], strict=True):
        torch.testing.assert_close(cuda, cpu, atol=1e-3, rtol=1e-3)
