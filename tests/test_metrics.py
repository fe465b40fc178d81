"""Metrics: RMSE, the Fréchet distance against closed forms, and the classifier-based scores."""

import math

import pytest
import torch

from rldiff.core.denoisers import UNCONDITIONAL
from rldiff.core.error import rmse_per_sample
from rldiff.data.classifier import DEFAULT_CLASSIFIER_DIR, DigitClassifier, load_classifier
from rldiff.evaluation.quality import (
    DigitMetrics,
    FeatureStats,
    feature_stats,
    frechet_distance_stats,
)


def _with_exact_stats(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n points whose sample mean and (N - 1) covariance are exactly ``mean`` and ``cov``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    white = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T
    return mean + white @ torch.linalg.cholesky(cov).T


def test_rmse_per_sample():
    ref = torch.zeros(3, 1, 2, 2)
    x = torch.stack(
        [torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5), torch.tensor([[[2.0, 0], [0, 0]]])]
    )
    rmse = rmse_per_sample(x, ref)
    assert rmse.dtype == torch.float64
    assert torch.allclose(rmse, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        rmse_per_sample(x, ref[:2])


def test_fd_of_a_set_with_itself_is_exactly_zero():
    feats = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert _fd(feats, feats) == 0.0
    assert _fd(feats, feats.clone()) == 0.0


def test_fd_matches_closed_form_for_diagonal_gaussians():
    f64 = {"dtype": torch.float64}
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0], **f64), torch.tensor([0.5, 1.0, 0.0], **f64)
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25], **f64), torch.tensor([2.0, 1.0, 0.25], **f64)
    a = _with_exact_stats(40, mu_a, torch.diag(var_a), seed=1)
    b = _with_exact_stats(60, mu_b, torch.diag(var_b), seed=2)
    closed = float((mu_a - mu_b).pow(2).sum() + (var_a.sqrt() - var_b.sqrt()).pow(2).sum())
    assert _fd(a, b) == pytest.approx(closed, rel=1e-9)


def test_fd_is_symmetric_and_matches_scipy_for_general_covariances():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(80, 6, generator=g, dtype=torch.float64)
    a = a @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(70, 6, generator=g, dtype=torch.float64)
    b = b @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.3
    fd_ab, fd_ba = _fd(a, b), _fd(b, a)
    assert fd_ab == pytest.approx(fd_ba, rel=1e-9)
    linalg = pytest.importorskip("scipy.linalg")
    sa, sb = feature_stats(a), feature_stats(b)
    covmean = linalg.sqrtm(sa.cov.numpy() @ sb.cov.numpy()).real
    expected = float((sa.mean - sb.mean).pow(2).sum()) + float(
        sa.cov.trace() + sb.cov.trace() - 2 * covmean.trace()
    )
    assert fd_ab == pytest.approx(expected, rel=1e-7)


def test_fd_grows_with_a_shift():
    feats = torch.randn(100, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert _fd(feats, feats + 0.1) == pytest.approx(0.04, rel=1e-9)  # 4 * 0.1^2
    assert _fd(feats, feats + 1.0) > _fd(feats, feats + 0.1) > 0


def test_fd_rank_deficient_covariances_are_handled():
    singular = FeatureStats(torch.zeros(3), torch.diag(torch.tensor([1.0, 0.0, 0.0])).double(), 2)
    other = FeatureStats(torch.zeros(3), torch.diag(torch.tensor([0.0, 4.0, 0.0])).double(), 2)
    assert frechet_distance_stats(singular, other) == pytest.approx(1.0 + 4.0)
    with pytest.raises(ValueError, match="N >= 2"):
        _fd(torch.zeros(1, 3), torch.zeros(5, 3))


SHIPPED = (DEFAULT_CLASSIFIER_DIR / "model.safetensors").exists()


@pytest.fixture(scope="module")
def metrics():
    """The shipped classifier when present (the real-floor sanity checks need it), else a randomly
    initialised one, which still exercises every code path."""
    if SHIPPED:
        return DigitMetrics(load_classifier(), batch_size=64)
    torch.manual_seed(0)
    return DigitMetrics(DigitClassifier(), batch_size=64)


def _noise_images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_confidence_and_accuracy_are_probabilities(metrics):
    images = _noise_images(70, 5)
    labels = torch.arange(70) % 10
    for value in (
        metrics.confidence(images),
        metrics.confidence(images, labels),
        metrics.accuracy(images, labels),
    ):
        assert 0.0 <= value <= 1.0
    # The most likely class is at least as probable as any intended one, per sample.
    best = metrics.per_sample_confidence(images)
    intended = metrics.per_sample_confidence(images, labels)
    assert (best >= intended).all()
    mixed = labels.clone()
    mixed[:10] = UNCONDITIONAL  # no label: falls back to the most likely class
    assert torch.equal(metrics.per_sample_confidence(images, mixed)[:10], best[:10])
    with pytest.raises(ValueError, match="UNCONDITIONAL"):
        metrics.accuracy(images, mixed)


def test_batching_does_not_change_scores(metrics):
    images = _noise_images(70, 6)
    whole = DigitMetrics(metrics.classifier, batch_size=1000)
    assert torch.allclose(metrics.features(images), whole.features(images), atol=1e-5)


def test_real_floor_is_cached_and_below_noise(metrics):
    floor = metrics.real_floor()
    assert floor is metrics.real_floor()
    assert floor.count == 360 and 0 <= floor.confidence <= 1 and math.isfinite(floor.fd)
    assert metrics.fd(_noise_images(360, 7)) > floor.fd
    from rldiff.data.digits import load_digits16

    train, _ = load_digits16("train")
    assert metrics.fd(train) == 0.0  # the reference split against its own statistics


@pytest.mark.skipif(not SHIPPED, reason="no shipped classifier")
def test_shipped_classifier_real_floor(metrics):
    floor = metrics.real_floor()
    assert floor.accuracy > 0.95 and floor.confidence > 0.9
    assert metrics.fd(_noise_images(360, 8)) > 10 * floor.fd


def _fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance_stats(feature_stats(a), feature_stats(b))
