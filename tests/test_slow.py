"""Slow and GPU checks, skipped by default: `make test-slow` runs them."""

import dataclasses
from pathlib import Path

import pytest
import torch

from rldiff.config import EvaluateConfig, SearchConfig
from rldiff.core.denoisers import Condition, load_denoiser, set_tf32
from rldiff.core.policies import fixed_policy
from rldiff.core.sampler import sample
from rldiff.core.seeds import initial_noise
from rldiff.evaluation.protocol import EVAL_SEED_OFFSET
from rldiff.evaluation.quality import DigitMetrics

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Largest |cuda - cpu| of the final samples allowed per solver, 16 held-out seeds, 6 NFE on Karras
# sigmas, TF32 off. One network call differs by float32 round-off (about 1e-6); a solver amplifies
# that by how far its steps extrapolate. Heun's first step goes from sigma 80 to about 12 with the
# same slope twice (Karras at 6 NFE is 3 Heun steps, and that schedule diverges at this budget:
# README), so its round-off grows by about 1e3 (2.1e-3 measured on an H200); the others stay
# within about 10x of one call (UniPC: 7.8e-6 measured).
CUDA_TOLERANCE = {"euler": 1e-4, "dpmpp-2m": 1e-4, "unipc": 1e-4, "heun": 1e-2}


def _held_out(n: int):
    seeds = list(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + n))
    return seeds, initial_noise(seeds, (1, 16, 16)), Condition.make([s % 10 for s in seeds], 1.0)


@pytest.mark.slow
def test_embedded_model_at_50_nfe_is_within_1_5x_of_the_real_floor():
    denoiser, metrics = load_denoiser(), DigitMetrics()
    floor = metrics.real_floor()
    seeds, noise, cond = _held_out(floor.count)  # FD depends on n: compare at the floor's count
    policy = fixed_policy("unipc", "logsnr-uniform", 50, denoiser.noise_table)
    x0 = sample(denoiser, policy, noise, cond, 50, seeds=seeds).x0.clamp(-1, 1)
    fd = metrics.fd(x0)
    print(f"FD {fd:.2f} on {floor.count} samples vs real floor {floor.fd:.2f}")
    assert fd <= 1.5 * floor.fd


@pytest.mark.gpu
@needs_cuda
def test_sampler_on_cuda_matches_cpu():
    """Per solver, with TF32 off (the default); the same with TF32 allowed is printed beside it."""
    seeds, noise, cond = _held_out(16)
    cpu, cuda = load_denoiser(device="cpu"), load_denoiser(device="cuda")
    sigma = torch.full((16,), 5.0, dtype=torch.float64)
    one_call = (cuda(noise.cuda() * 5, sigma, cond).cpu() - cpu(noise * 5, sigma, cond)).abs().max()
    print(f"\none denoiser call at sigma 5: max |cuda - cpu| {one_call:.2e}")
    print("solver     TF32 off   TF32 on   tolerance")
    for solver, tolerance in CUDA_TOLERANCE.items():
        policy = fixed_policy(solver, "karras", 6, cpu.noise_table)
        on_cpu = sample(cpu, policy, noise, cond, 6, seeds=seeds).x0
        differences = []
        for allow in (False, True):
            cuda.allow_tf32 = allow
            on_cuda = sample(cuda, policy, noise.cuda(), cond, 6, seeds=seeds).x0.cpu()
            differences.append(float((on_cuda - on_cpu).abs().max()))
        cuda.allow_tf32 = False
        print(f"{solver:10s} {differences[0]:.2e}   {differences[1]:.2e}   {tolerance:.0e}")
        assert differences[0] <= tolerance, (solver, differences)
    set_tf32(False)


@pytest.mark.gpu
@needs_cuda
def test_evaluation_prepares_on_the_gpu_and_matches_the_cpu(tmp_path, monkeypatch):
    """The driver's preparation (reference banks, global schedule search, baseline scores) runs on
    the GPU it sees, with the CPU's numbers."""
    import rldiff.evaluation.protocol as evaluate

    cfg = EvaluateConfig(
        model="embedded",
        n_samples=16,
        n_train=8,
        budgets=(4,),
        solvers=("unipc", "euler"),
        schedules=("karras",),
        global_solvers=("unipc",),
        search=SearchConfig(rounds=1),
        bandit_rounds=0,
        ray="off",
    )
    rows = {}
    for device in ("cuda", "cpu"):
        monkeypatch.setattr(evaluate, "visible_device", lambda d=device: d)
        run = dataclasses.replace(cfg, out=tmp_path / device, cache=tmp_path / device / "cache")
        rows[device] = {r["policy"]: r for r in evaluate.run_evaluation(run)}
        assert any(Path(run.cache).glob("reference-*.parquet"))
    for name, row in rows["cuda"].items():
        cpu_rmse = rows["cpu"][name]["rmse_mean"]
        print(f"{name}: rmse cuda {row['rmse_mean']:.6f} cpu {cpu_rmse:.6f}")
        assert row["rmse_mean"] == pytest.approx(cpu_rmse, rel=1e-3, abs=1e-5)
