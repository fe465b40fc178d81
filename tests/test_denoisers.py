"""Denoisers: the exact mixture against a dense formula, the diffusers adapter against the
definitions of its prediction types, loading, and the t <-> sigma map."""

import json
import math

import pytest
import torch

from rldiff.core.denoisers import UNCONDITIONAL, Condition, DiffusersDenoiser, load_denoiser
from rldiff.core.gmm import GaussianMixtureDenoiser
from rldiff.core.noise import DiscreteVP

F64 = torch.float64

# ------------------------------------------------------------------------ Gaussian mixture


@pytest.fixture(scope="module")
def mixture():
    """A 5-d, 3-component mixture with its dense parameters kept for the brute-force formula."""
    g = torch.Generator().manual_seed(7)
    means = torch.randn(3, 5, generator=g, dtype=F64) * 1.5
    a = torch.randn(3, 5, 5, generator=g, dtype=F64) * 0.5
    covs = a @ a.transpose(1, 2) + 0.1 * torch.eye(5, dtype=F64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    return GaussianMixtureDenoiser(means, covs, weights * 7), means, covs, weights


def dense_posterior_mean(x, sigma, means, covs, weights, label=None):
    """E[x0 | x] by the textbook formula (Bishop 2.3.3), one sample, dense matrices, no eigenbasis."""
    eye = torch.eye(len(x), dtype=F64)
    comps = range(len(means)) if label is None else [label]
    log_p, cond_means = [], []
    for k in comps:
        cov = covs[k] + sigma**2 * eye
        mvn = torch.distributions.MultivariateNormal(means[k], covariance_matrix=cov)
        log_p.append(mvn.log_prob(x) + weights[k].log())
        cond_means.append(means[k] + covs[k] @ torch.linalg.solve(cov, x - means[k]))
    resp = torch.softmax(torch.stack(log_p), 0)
    return (resp[:, None] * torch.stack(cond_means)).sum(0)


def test_gmm_posterior_mean_matches_dense_formula(mixture):
    gmm, means, covs, weights = mixture
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.01, 0.1, 0.4, 1.0, 3.0, 30.0, 0.7, 2.0], dtype=F64)
    x = gmm.sample_data(torch.tensor([0, 1, 2, 0, 1, 2, 1, 0]), g)
    x = x + sigma[:, None] * torch.randn(x.shape, generator=g, dtype=F64)
    labels = [UNCONDITIONAL, UNCONDITIONAL, 0, 1, 2, UNCONDITIONAL, 2, 1]
    guidance = [1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 2.5, 0.0]
    out = gmm(x, sigma, Condition.make(labels, guidance))
    for i in range(len(x)):
        uncond = dense_posterior_mean(x[i], sigma[i], means, covs, weights)
        if labels[i] == UNCONDITIONAL:  # the whole mixture; guidance has nothing to act on
            want = uncond
        else:
            cond = dense_posterior_mean(x[i], sigma[i], means, covs, weights, labels[i])
            want = uncond + guidance[i] * (cond - uncond)
        assert torch.allclose(out[i], want, rtol=1e-10, atol=1e-10), i
    # each sample's own sigma in one batch == one call per sample
    for i in range(len(x)):
        alone = gmm(x[i : i + 1], sigma[i : i + 1], Condition.make(labels[i], guidance[i]))
        assert torch.allclose(alone[0], out[i], rtol=0, atol=1e-13)


def test_gmm_limits(mixture):
    gmm, means, _, weights = mixture
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g, dtype=F64)
    tiny = torch.full((4,), 1e-7, dtype=F64)
    for labels in ([UNCONDITIONAL] * 4, [0, 1, 2, UNCONDITIONAL]):
        assert torch.allclose(gmm(x, tiny, Condition.make(labels)), x, rtol=0, atol=1e-11)
    huge = torch.full((4,), 1e7, dtype=F64)
    x_big = x * 1e7
    mixture_mean = (weights[:, None] * means).sum(0)
    out = gmm(x_big, huge, Condition.make(UNCONDITIONAL, batch=4))
    assert torch.allclose(out, mixture_mean.expand(4, -1), rtol=0, atol=1e-5)
    out = gmm(x_big, huge, Condition.make([0, 1, 2, 0]))
    assert torch.allclose(out, means[[0, 1, 2, 0]], rtol=0, atol=1e-5)


def test_gmm_guidance_endpoints(mixture):
    gmm = mixture[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g, dtype=F64) * 2
    sigma = torch.tensor([0.05, 0.3, 1.0, 2.0, 5.0, 0.5], dtype=F64)
    labels = [0, 1, 2, 0, 1, 2]
    uncond = gmm(x, sigma, Condition.make(UNCONDITIONAL, batch=6))
    cond = gmm(x, sigma, Condition.make(labels, 1.0))
    assert torch.equal(gmm(x, sigma, Condition.make(labels, 0.0)), uncond)
    assert torch.allclose(cond, gmm._posterior_mean(x, sigma, torch.tensor(labels)), atol=1e-14)
    mixed = gmm(x, sigma, Condition.make(labels, [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]))
    assert torch.equal(mixed[[0, 3]], uncond[[0, 3]])
    assert torch.allclose(mixed[[1, 4]], cond[[1, 4]], rtol=0, atol=1e-14)
    assert torch.allclose(mixed[[2, 5]], 2 * cond[[2, 5]] - uncond[[2, 5]], atol=1e-13)
    assert (cond - uncond).abs().max() > 1e-2  # the condition matters at these noise levels


def test_gmm_keeps_image_shapes(digits_gmm):
    b = 3
    x = torch.randn(b, *digits_gmm.sample_shape, dtype=F64)
    for dtype in (F64, torch.float32):
        out = digits_gmm(x.to(dtype), torch.tensor([0.1, 1.0, 10.0]), Condition.make([-1, 4, 9]))
        assert out.shape == (b, 1, 16, 16) and out.dtype == dtype and torch.isfinite(out).all()


# ------------------------------------------------------------------ diffusers UNet2DModel adapter

NUM_CLASSES = 3  # two classes and the null class (the last index)
NULL = NUM_CLASSES - 1


@pytest.fixture(scope="module")
def unet(tiny_unet):
    return tiny_unet(NUM_CLASSES)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(4)
    sigma = torch.tensor([0.02, 0.5, 3.0, 40.0, 150.0], dtype=F64)
    x = torch.randn(5, 1, 8, 8, generator=g) * (1 + sigma.float().view(-1, 1, 1, 1))
    return x, sigma


def _raw(unet, x_edm, sigma, labels, noise):
    """The network's own output on the VP input, at the DDPM timestep of each sigma."""
    alpha_bar = 1 / (1 + sigma**2)
    x_vp = x_edm.to(F64) * alpha_bar.sqrt().view(-1, 1, 1, 1)
    t = noise.sigma_to_t(sigma).float()
    with torch.no_grad():
        out = unet(x_vp.float(), t, class_labels=torch.as_tensor(labels)).sample
    return out.to(F64), x_vp, alpha_bar.view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_type_conversions(unet, batch, prediction_type):
    noise = DiscreteVP.linear_betas()
    den = DiffusersDenoiser(unet, noise, prediction_type)
    x, sigma = batch
    labels = [0, 1, NULL, 0, 1]
    out = den(x, sigma, Condition.make([0, 1, UNCONDITIONAL, 0, 1]))
    assert out.shape == x.shape and out.dtype == x.dtype
    raw, x_vp, ab = _raw(unet, x, sigma, labels, noise)
    if prediction_type == "epsilon":  # x_vp = sqrt(ab) x0 + sqrt(1 - ab) eps
        want = (x_vp - (1 - ab).sqrt() * raw) / ab.sqrt()
    elif prediction_type == "v_prediction":  # v = sqrt(ab) eps - sqrt(1 - ab) x0
        want = ab.sqrt() * x_vp - (1 - ab).sqrt() * raw
    else:
        want = raw
    scale = want.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    assert ((out.to(F64) - want).abs() <= 1e-5 * (1 + scale)).all()


def test_timestep_fed_to_the_network(unet):
    """At a sigma of the training table the network sees exactly that integer timestep."""
    noise = DiscreteVP.linear_betas()
    den = DiffusersDenoiser(unet, noise, "sample")
    seen = []
    hook = unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[1].clone()), with_kwargs=True
    )
    try:
        den(torch.zeros(3, 1, 8, 8), noise.sigmas[[0, 417, 999]], Condition.make(0, batch=3))
    finally:
        hook.remove()
    assert torch.allclose(seen[0], torch.tensor([0.0, 417.0, 999.0]), atol=1e-3)


def test_per_sample_sigmas_equal_separate_calls(unet, batch):
    den = DiffusersDenoiser(unet, DiscreteVP.linear_betas(), "epsilon")
    x, sigma = batch
    cond = Condition.make([0, 1, UNCONDITIONAL, 1, 0], [1.0, 3.0, 2.0, 0.0, 1.5])
    together = den(x, sigma, cond)
    for i in range(len(x)):
        alone = den(x[i : i + 1], sigma[i : i + 1], cond[i : i + 1])
        scale = 1 + alone.abs().max()
        assert (together[i] - alone[0]).abs().max() <= 1e-5 * scale, i


def test_guidance_uses_the_null_class_in_one_network_call(unet, batch):
    noise = DiscreteVP.linear_betas()
    den = DiffusersDenoiser(unet, noise, "sample")  # x0 = raw output: the algebra is plain
    x, sigma = batch
    assert den.null_class == NULL
    calls = []
    hook = unet.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        out = den(x, sigma, Condition.make([0, 1, UNCONDITIONAL, 1, 0], [3.0, 1.0, 2.0, 0.0, -1.0]))
    finally:
        hook.remove()
    assert calls == [len(x) + 3]  # samples 0, 3, 4 also need their unconditional pass, same call
    cond, _, _ = _raw(unet, x, sigma, [0, 1, NULL, 1, 0], noise)
    uncond, _, _ = _raw(unet, x, sigma, [NULL] * 5, noise)
    assert (cond - uncond).abs().max() > 1e-3  # the class embedding matters
    w = torch.tensor([3.0, 1.0, 1.0, 0.0, -1.0], dtype=F64).view(-1, 1, 1, 1)
    want = uncond + w * (cond - uncond)  # sample 2 is unconditional: the null class alone
    assert torch.allclose(out.to(F64), want, rtol=1e-5, atol=1e-5)
    # plain conditional sampling (w = 1) needs no unconditional pass
    calls.clear()
    hook = unet.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        den(x, sigma, Condition.make([0, 1, 0, 1, 0]))
    finally:
        hook.remove()
    assert calls == [len(x)]


def _save_ddpm(directory, **config):
    from diffusers import DDPMScheduler

    DDPMScheduler(**config).save_config(directory)


def test_load_denoiser_round_trip(unet, batch, tmp_path):
    from diffusers import DDPMScheduler

    config = dict(
        num_train_timesteps=500,
        beta_start=2e-4,
        beta_end=0.03,
        beta_schedule="linear",
        prediction_type="v_prediction",
    )
    unet.save_pretrained(tmp_path, safe_serialization=True)
    _save_ddpm(tmp_path, **config)
    assert list(tmp_path.glob("*.safetensors"))
    den = load_denoiser(tmp_path)
    assert isinstance(den, DiffusersDenoiser)
    assert den.prediction_type == "v_prediction"
    assert den.null_class == NULL and den.sample_shape == (1, 8, 8)
    ac = DDPMScheduler(**config).alphas_cumprod.to(F64)
    assert den.noise_table.num_train_timesteps == 500
    assert torch.allclose(1 / (1 + den.noise_table.sigmas**2), ac, rtol=1e-5)  # float32 there
    x, sigma = batch
    cond = Condition.make([0, 1, UNCONDITIONAL, 1, 0], [1.0, 2.0, 1.0, 1.0, 0.5])
    reference = DiffusersDenoiser(unet, den.noise_table, "v_prediction")
    assert torch.equal(den(x, sigma, cond), reference(x, sigma, cond))
    # the pipeline layout: unet/ and scheduler/ subfolders
    pipe = tmp_path / "pipe"
    unet.save_pretrained(pipe / "unet", safe_serialization=True)
    _save_ddpm(pipe / "scheduler", **config)
    den2 = load_denoiser(str(pipe))
    assert torch.equal(den2(x, sigma, cond), den(x, sigma, cond))


def test_load_denoiser_reads_other_beta_schedules(unet, tmp_path):
    from diffusers import DDPMScheduler

    unet.save_pretrained(tmp_path, safe_serialization=True)
    config = dict(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012)
    _save_ddpm(tmp_path, **config)
    den = load_denoiser(tmp_path)
    assert den.prediction_type == "epsilon"
    ac = DDPMScheduler(**config).alphas_cumprod.to(F64)
    assert torch.allclose(1 / (1 + den.noise_table.sigmas**2), ac, rtol=1e-5)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    cfg["beta_schedule"] = "exponential"  # not a diffusers beta schedule
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="beta_schedule .*squaredcos_cap_v2"):
        load_denoiser(tmp_path)


def test_load_denoiser_errors(unet, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_denoiser(tmp_path / "nowhere")
    bin_only = tmp_path / "bin"
    unet.save_pretrained(bin_only, safe_serialization=False)
    _save_ddpm(bin_only)
    assert list(bin_only.glob("*.bin")) and not list(bin_only.glob("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_denoiser(bin_only)
    no_scheduler = tmp_path / "no-scheduler"
    unet.save_pretrained(no_scheduler, safe_serialization=True)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_denoiser(no_scheduler)


# ----------------------------------------------------------------------------- t <-> sigma


def test_discrete_vp_matches_ddpm_scheduler():
    from diffusers import DDPMScheduler

    noise = DiscreteVP.linear_betas(1e-4, 0.02, 1000)
    ac = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
    ).alphas_cumprod.to(F64)
    # the table is diffusers' float32 alpha_bar itself, sigma = sqrt((1 - a) / a) from it in
    # float64; float32's 1 - beta moves sigma_min 8.3e-5 from the float64 formula's value
    assert torch.allclose(noise.sigmas, ((1 - ac) / ac).sqrt(), rtol=1e-12, atol=0)
    assert noise.num_train_timesteps == 1000
    assert noise.sigma_min == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-4)
    assert noise.sigma_max == pytest.approx(157.4, rel=1e-3)
    assert (noise.sigmas.diff() > 0).all()


def test_discrete_vp_round_trip():
    noise = DiscreteVP.linear_betas()
    t_int = torch.arange(1000, dtype=F64)
    assert torch.allclose(noise.t_to_sigma(t_int), noise.sigmas, rtol=1e-13)
    assert torch.allclose(noise.sigma_to_t(noise.sigmas), t_int, rtol=0, atol=1e-8)
    t = torch.linspace(0, 999, 1237, dtype=F64)
    assert torch.allclose(noise.sigma_to_t(noise.t_to_sigma(t)), t, rtol=0, atol=1e-8)
    sigma = torch.logspace(-1.99, 2.19, 301, dtype=F64)  # inside [sigma_min, sigma_max]
    assert torch.allclose(noise.t_to_sigma(noise.sigma_to_t(sigma)), sigma, rtol=1e-10)
    # log sigma is interpolated linearly: a half timestep is the geometric mean
    s = noise.t_to_sigma(torch.tensor([10.5, 700.25], dtype=F64))
    want_a = (noise.sigmas[10] * noise.sigmas[11]).sqrt()
    want_b = noise.sigmas[700] ** 0.75 * noise.sigmas[701] ** 0.25
    assert torch.allclose(s, torch.stack([want_a, want_b]), rtol=1e-13)
    # outside the trained range sigma_to_t clamps, and the dtype follows the input
    out = noise.sigma_to_t(torch.tensor([1e-6, 1e6], dtype=torch.float32))
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 999.0]
    ends = noise.t_to_sigma(torch.tensor([-5.0, 2000.0])).tolist()
    assert ends == pytest.approx([noise.sigma_min, noise.sigma_max], rel=1e-14)
