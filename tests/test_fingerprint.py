"""Model identity: the same on every machine, different for any change to what defines a model."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from rldiff.core.fingerprint import model_fingerprint
from rldiff.core.gmm import GaussianMixtureDenoiser
from rldiff.core.noise import DiscreteVP

CAPABILITIES = ("default", "avx2", "avx512")  # torch falls back to the best the CPU has

PROBE = """
import json, torch
from rldiff.core.fingerprint import model_fingerprint
from rldiff.data.models import EMBEDDED, EXACT_GMM, load_model
from rldiff.data.reference import bank_path
from rldiff.data.shipped_cache import SHIPPED
embedded = load_model(EMBEDDED)
from rldiff.config import GUIDANCE_MIX
banks = [bank_path(SHIPPED, embedded, n, k, GUIDANCE_MIX, 200).exists() for n, k in (("eval", 512), ("train", 128))]
print(json.dumps({
    "capability": torch.backends.cpu.get_cpu_capability(),
    "embedded": model_fingerprint(embedded),
    "gmm": model_fingerprint(load_model(EXACT_GMM)),
    "shipped_banks_found": banks,
}))
"""


def _probe(capability: str) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fingerprints_and_shipped_inputs_are_the_same_under_every_cpu_capability():
    """Computed tensors differ in their last bits between kernels; a model's identity must not."""
    probes = [_probe(c) for c in CAPABILITIES]
    assert len({p["capability"] for p in probes}) >= 2, "only one kernel set could be selected"
    assert len({p["embedded"] for p in probes}) == 1, probes
    assert len({p["gmm"] for p in probes}) == 1, probes
    assert all(p["shipped_banks_found"] == [True, True] for p in probes), probes


def test_one_changed_weight_changes_the_fingerprint():
    from rldiff.data.models import EMBEDDED, load_model

    model = load_model.__wrapped__(EMBEDDED)  # a private copy: the cached one stays untouched
    before = model_fingerprint(model)
    assert model_fingerprint(load_model.__wrapped__(EMBEDDED)) == before
    weight = next(model.unet.parameters())
    with torch.no_grad():
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))
    assert model_fingerprint(model) != before


def test_unet_fingerprint_covers_state_dict_prediction_type_and_noise_config():
    """The ``.unet`` branch (as in ``DiffusersDenoiser``), with a plain module standing in for the
    UNet: importing diffusers would dominate this test's runtime."""

    def model(seed, prediction_type="epsilon", noise_table=None):
        torch.manual_seed(seed)
        unet = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4))
        return SimpleNamespace(
            unet=unet,
            prediction_type=prediction_type,
            noise_table=noise_table or DiscreteVP.linear_betas(),
        )

    assert model_fingerprint(model(0)) == model_fingerprint(model(0))
    assert model_fingerprint(model(1)) != model_fingerprint(model(0))
    assert model_fingerprint(model(0, "v_prediction")) != model_fingerprint(model(0))
    other_table = DiscreteVP.linear_betas(beta_end=0.012)
    assert model_fingerprint(model(0, noise_table=other_table)) != model_fingerprint(model(0))


def test_gmm_fingerprint_covers_its_inputs():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 3, generator=g, dtype=torch.float64)
    covs = (
        torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * torch.tensor([1.0, 2.0])[:, None, None]
    )
    weights = torch.tensor([0.7, 0.3])
    base = GaussianMixtureDenoiser(means, covs, weights)
    same = GaussianMixtureDenoiser(means.clone(), covs.clone(), weights.clone())
    assert model_fingerprint(same) == model_fingerprint(base)
    variants = [
        GaussianMixtureDenoiser(means, covs, weights.flip(0)),
        GaussianMixtureDenoiser(means, covs * 1.01, weights),
        GaussianMixtureDenoiser(
            means, covs, weights, noise_table=DiscreteVP.linear_betas(beta_end=0.012)
        ),
        GaussianMixtureDenoiser(means, covs, weights, dtype=torch.float32),
    ]
    assert len({model_fingerprint(m) for m in (base, *variants)}) == 5


def test_fitted_gmm_fingerprint_covers_data_and_ridge(digits_gmm):
    from rldiff.data.digits import load_digits16

    images, labels = load_digits16("train")
    assert model_fingerprint(GaussianMixtureDenoiser.fit(images, labels)) == model_fingerprint(
        digits_gmm
    )
    assert model_fingerprint(GaussianMixtureDenoiser.fit(images, labels, ridge=2e-4)) != (
        model_fingerprint(digits_gmm)
    )
    changed = images.clone()
    changed[0, 0, 0, 0] += 1e-3
    assert model_fingerprint(GaussianMixtureDenoiser.fit(changed, labels)) != model_fingerprint(
        digits_gmm
    )
