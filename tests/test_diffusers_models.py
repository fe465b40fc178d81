"""Any diffusers model by path: the noise table exactly as diffusers computes it for every beta
schedule, the clipped start level of extreme schedules, class labels from the model, and the
evaluation end to end on a model the digit classifier does not know."""

import json
import math
import re
import warnings

import pytest
import torch

from rldiff.core.denoisers import UNCONDITIONAL, Condition, labels_for_seeds, load_denoiser
from rldiff.core.noise import DiscreteVP
from rldiff.core.schedules import get_schedule
from rldiff.evaluation.ratios import pooled_rows

F64 = torch.float64
SCHEDULE_CONFIGS = {
    "linear": dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.03, num_train_timesteps=400),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "sigmoid": dict(
        beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02, num_train_timesteps=300
    ),
    "laplace": dict(beta_schedule="laplace"),
    "trained_betas": dict(
        trained_betas=torch.linspace(1e-4, 0.04, 250, dtype=F64).tolist(), num_train_timesteps=250
    ),
}
CLASSES = 4  # class-conditional models: 4 classes and the null class


def save_model(directory, unet, layout="model", **scheduler):
    """``save_pretrained`` in either layout ``load_denoiser`` reads; returns the model path."""
    from diffusers import DDPMScheduler

    unet_dir, scheduler_dir = directory, directory
    if layout == "pipeline":
        unet_dir, scheduler_dir = directory / "unet", directory / "scheduler"
    unet.save_pretrained(unet_dir, safe_serialization=True)
    DDPMScheduler(**scheduler).save_config(scheduler_dir)
    return directory


def diffusers_sigmas(config) -> torch.Tensor:
    """sigma = sqrt((1 - a) / a) in float64 from diffusers' own float32 alphas_cumprod."""
    from diffusers import DDPMScheduler

    a = DDPMScheduler(**config).alphas_cumprod.to(F64)
    return ((1 - a) / a).sqrt()


def dpm_solver_start(config, lambda_min_clipped) -> int:
    """The first timestep of diffusers' DPMSolverMultistepScheduler (linspace spacing)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**config, lambda_min_clipped=lambda_min_clipped)
    with warnings.catch_warnings():  # diffusers' own numpy 2 deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(10)
    return int(scheduler.timesteps[0])


@pytest.fixture(scope="module")
def unets(tiny_unet):
    return {False: tiny_unet(), True: tiny_unet(CLASSES + 1)}


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", list(SCHEDULE_CONFIGS))
def test_any_model_loads_with_diffusers_table(
    unets, tmp_path, schedule, prediction_type, conditional
):
    config = SCHEDULE_CONFIGS[schedule]
    layout = "pipeline" if conditional else "model"
    path = save_model(
        tmp_path, unets[conditional], layout, prediction_type=prediction_type, **config
    )
    den = load_denoiser(path)
    assert den.prediction_type == prediction_type and den.sample_shape == (1, 8, 8)
    want = diffusers_sigmas(config)
    assert len(den.noise_table.sigmas) == len(want) and den.noise_table.sigmas.dtype == F64
    assert ((den.noise_table.sigmas - want).abs() / want).max() <= 1e-12
    json.dumps(den.noise_table.config, allow_nan=False)  # JSON, the inputs as given
    for key, value in config.items():
        assert den.noise_table.config[key] == value
    # labels come from the model: its classes, or none at all
    seeds = [3, 10, 17, 4]
    labels = labels_for_seeds(seeds, den.num_classes)
    if conditional:
        assert den.num_classes == CLASSES and labels == [s % CLASSES for s in seeds]
    else:
        assert den.num_classes == 0 and labels == [UNCONDITIONAL] * 4
    # one call at the ends of the range and in between, with guidance where there are classes
    noise = den.noise_table
    sigma = torch.tensor(
        [noise.sigma_min, 1.0, noise.sigma_max, noise.sigma_trained_max], dtype=F64
    )
    scale = (1 + sigma.float()).view(-1, 1, 1, 1)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * scale
    out = den(x, sigma, Condition.make(labels, [1.0, 2.0, 1.0, 3.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_cosine_start_is_clipped_as_dpm_solver_does():
    """The clipped cosine table ends in a jump (sigma ~640 -> ~20,300); sampling starts where
    DPMSolverMultistepScheduler starts with lambda_min_clipped = -5.1, and every schedule and the
    sampler start there, while the t <-> sigma map still covers the whole table."""
    from rldiff.core.gmm import GaussianMixtureDenoiser
    from rldiff.core.sampler import Sampling

    config = {"beta_schedule": "squaredcos_cap_v2"}
    noise = DiscreteVP.from_scheduler_config(config)
    assert noise.config["lambda_min_clipped"] == -5.1
    assert noise.sigmas[-2] == pytest.approx(641.66, rel=1e-4)
    assert noise.sigma_trained_max == pytest.approx(20291.3, rel=1e-4)
    assert noise.t_start == dpm_solver_start(config, -5.1) == 995
    assert noise.sigma_max == float(noise.sigmas[995]) == pytest.approx(160.41, rel=1e-4)
    assert noise.sigmas[996] > math.exp(5.1) >= noise.sigma_max  # lambda = -log(sigma) >= -5.1
    for name in ("karras", "time-uniform", "logsnr-uniform"):
        assert get_schedule(name, 4, noise)[0].item() == pytest.approx(noise.sigma_max, rel=1e-12)
    t = torch.linspace(995, 0, 5, dtype=F64)[:-1]
    assert torch.equal(get_schedule("time-uniform", 4, noise)[:-1], noise.t_to_sigma(t))
    assert noise.sigma_to_t(noise.sigmas[[995, 998, 999]]).tolist() == [995, 998, 999]
    assert noise.t_to_sigma(torch.tensor([999.0])).item() == pytest.approx(20291.3, rel=1e-4)
    gmm = GaussianMixtureDenoiser(
        torch.zeros(2, 3, dtype=F64), torch.eye(3, dtype=F64).expand(2, 3, 3), noise_table=noise
    )
    batch = Sampling(gmm, torch.ones(2, 3, dtype=F64), Condition.make(-1, batch=2), 4)
    assert batch.sigma.tolist() == [noise.sigma_max] * 2
    assert torch.allclose(batch.x, torch.full((2, 3), noise.sigma_max, dtype=F64))


@pytest.mark.parametrize(
    "config, clip",
    [
        ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -3.0}, -3.0),
        ({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -math.inf}, None),
        ({"beta_schedule": "linear", "lambda_min_clipped": -2.0}, -2.0),
        ({"beta_schedule": "scaled_linear", "beta_start": 8.5e-4, "beta_end": 0.012}, None),
        ({"beta_schedule": "linear"}, None),
    ],
)
def test_lambda_min_clipped_from_the_config_is_honoured(config, clip):
    noise = DiscreteVP.from_scheduler_config(config)
    assert noise.config["lambda_min_clipped"] == clip
    table = {k: v for k, v in config.items() if k != "lambda_min_clipped"}
    want = dpm_solver_start(table, -math.inf if clip is None else clip)
    assert noise.t_start == want
    if clip is None:
        assert want == noise.num_train_timesteps - 1
        assert noise.sigma_max == noise.sigma_trained_max == float(noise.sigmas[-1])
    else:
        assert noise.sigma_max < noise.sigma_trained_max
        assert -math.log(noise.sigma_max) >= clip > -math.log(float(noise.sigmas[want + 1]))


def test_the_embedded_table_starts_at_its_last_timestep():
    """Linear betas: no clipping, so the embedded model starts where it always did."""
    noise = load_denoiser().noise_table
    assert noise.t_start == 999 and noise.sigma_max == float(noise.sigmas[-1])
    assert noise.config == {
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "num_train_timesteps": 1000,
        "lambda_min_clipped": None,
    }
    assert DiscreteVP.linear_betas().config == noise.config


def test_zero_terminal_snr_table_ends_where_dpm_solver_ends_it():
    from diffusers import DPMSolverMultistepScheduler

    config = dict(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012)
    noise = DiscreteVP.from_scheduler_config({**config, "rescale_betas_zero_snr": True})
    a = DPMSolverMultistepScheduler(**config, rescale_betas_zero_snr=True).alphas_cumprod.to(F64)
    want = ((1 - a) / a).sqrt()
    assert ((noise.sigmas - want).abs() / want).max() <= 1e-12
    assert noise.config["rescale_betas_zero_snr"] is True
    assert noise.sigma_max == pytest.approx(2**12, rel=1e-6)  # alpha_bar = 2^-24, not 0


def test_bad_tables_are_clear_errors():
    with pytest.raises(ValueError, match="beta_schedule 'cosine'.*squaredcos_cap_v2"):
        DiscreteVP.from_scheduler_config({"beta_schedule": "cosine"})
    with pytest.raises(ValueError, match="clips every timestep"):
        DiscreteVP.from_scheduler_config({"beta_schedule": "linear", "lambda_min_clipped": 10.0})
    with pytest.raises(ValueError, match="usable noise table"):
        DiscreteVP.from_scheduler_config({"trained_betas": [0.1, 1.0, 0.5]})


def test_a_table_given_directly_is_its_own_definition():
    noise = DiscreteVP(torch.tensor([0.002, 1.0, 80.0], dtype=F64))
    assert noise.t_start == 2 and noise.sigma_max == 80.0
    assert noise.config == {"sigmas": [0.002, 1.0, 80.0], "start_index": 2}


def test_labels_for_seeds(small_gmm):
    assert labels_for_seeds(range(5), 10) == [0, 1, 2, 3, 4]
    assert labels_for_seeds([7, 12, 3], small_gmm.num_classes) == [1, 0, 0]
    assert labels_for_seeds([7, 12], 0) == [UNCONDITIONAL] * 2


def test_unconditional_labels_in_the_routing_features(small_gmm):
    """An unconditional model's labels take the class one-hot's 'no class' slot."""
    from rldiff.core.routing import N_EXPERTS, OBS_DIM, observation_vector
    from rldiff.core.sampler import Sampling

    cond = Condition.make(labels_for_seeds(range(3), 0))
    obs = Sampling(small_gmm, torch.randn(3, 4, dtype=F64), cond, 4).observe()
    features = observation_vector(obs, torch.zeros(3, dtype=F64), 0.0)
    assert features.shape == (3, OBS_DIM)
    one_hot = features[:, 8 + N_EXPERTS + 1 : 8 + N_EXPERTS + 1 + 11]
    assert (one_hot[:, 10] == 1).all() and one_hot.sum() == 3


def test_evaluate_a_cosine_v_prediction_model_without_a_metric_network(tmp_path, tiny_unet):
    """``rldiff evaluate --model DIR`` on an unconditional model the digit classifier does not
    know: it runs, every row is there, and FD / confidence are NaN and said to be absent."""
    from rldiff.cli import main

    unet = tiny_unet(seed=1)
    with torch.no_grad():  # an untrained network's large Jacobian amplifies float32 rounding
        unet.conv_out.weight.mul_(0.1)  # along the ODE; a small output keeps the solve converging
        unet.conv_out.bias.mul_(0.1)
    model = save_model(
        tmp_path / "model",
        unet,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
    )
    out = tmp_path / "out"
    argv = ["evaluate", "--model", str(model), "--samples", "12", "--train-samples", "6",
            "--budgets", "4", "--solvers", "euler,unipc", "--schedules", "karras,time-uniform",
            "--global-solvers", "unipc", "--reference-steps", "80", "--search-rounds", "1",
            "--bandit-rounds", "0", "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--ray", "off"]  # fmt: skip
    assert main(argv) == 0
    rows = pooled_rows(out)
    assert (
        len(rows) == 2 * 2 + 1 + 1 + 1 + 1
    )  # hand-built, global, table, oracle, adaptive  # hand-built, global, adaptive
    for r in rows:
        assert math.isnan(r["fd"]) and math.isnan(r["confidence"])
        assert r["max_nfe"] <= 4 and math.isfinite(r["rmse_mean"])
        assert json.loads(r["sigmas"])[0] == pytest.approx(160.41366, rel=1e-5)  # clipped start
    report = (out / "report.md").read_text()
    assert "Distribution metrics are absent for this model" in report
    assert "n/a" in report and not re.search(r"\bnan\b", report, re.IGNORECASE)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["floor"] is None and summary["model"]["fd"] is None
    assert (out / "pareto.png").stat().st_size > 0


def test_metric_network_choice(tmp_path):
    """FD / confidence only where a network knows the data: the digit models by default, any
    model whose samples a named network takes, nothing otherwise."""
    from rldiff.core.denoisers import DEFAULT_MODEL_DIR
    from rldiff.data.classifier import DEFAULT_CLASSIFIER_DIR
    from rldiff.evaluation.quality import DigitMetrics, distribution_metrics, metric_network_id

    assert isinstance(distribution_metrics("gmm"), DigitMetrics)
    assert isinstance(distribution_metrics("embedded"), DigitMetrics)
    assert isinstance(distribution_metrics(str(DEFAULT_MODEL_DIR)), DigitMetrics)
    assert distribution_metrics(str(tmp_path)) is None
    assert distribution_metrics("gmm", "none") is None
    named = distribution_metrics(str(tmp_path), str(DEFAULT_CLASSIFIER_DIR), (1, 16, 16))
    assert isinstance(named, DigitMetrics)
    with pytest.raises(ValueError, match=r"takes images \[1, 16, 16\].*\[1, 8, 8\]"):
        distribution_metrics(str(tmp_path), str(DEFAULT_CLASSIFIER_DIR), (1, 8, 8))
    with pytest.raises(FileNotFoundError):
        distribution_metrics("gmm", str(tmp_path / "nowhere"))
    assert metric_network_id("auto") == "auto"
    assert len(metric_network_id(str(DEFAULT_CLASSIFIER_DIR))) == 16
