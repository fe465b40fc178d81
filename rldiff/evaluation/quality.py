"""Sample quality: Fréchet distances and digit-classifier scores (the per-sample error against a
reference is ``rldiff.core.error``).

Contract:

- ``frechet_distance_stats(a, b)`` is the Fréchet distance between Gaussians fitted to two feature
  sets
  (Heusel et al., 2017): ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, in
  float64 through symmetric eigendecompositions only (no scipy at run time). It is exactly 0 for
  identical sets and symmetric up to rounding.
- ``DigitMetrics`` scores images with the digit classifier: FD of its 128-d features against the
  real "train" split, the classifier's confidence and accuracy, and the real-data floor (the real
  "test" split scored the same way) that every reported FD is read against.
- ``distribution_metrics(model, metric_network, sample_shape)`` decides where those scores mean
  something: the classifier knows the 1x16x16 digits, so they are computed for the embedded model
  and the exact digits mixture, or for any model when a metric network is named; otherwise it
  returns None and every FD and confidence is NaN (never a number from a network that has not seen
  the data).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from rldiff.core.denoisers import UNCONDITIONAL
from rldiff.data.models import EMBEDDED, EXACT_GMM


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` (float64) of ``count`` feature vectors."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int


def feature_stats(feats: torch.Tensor) -> FeatureStats:
    """Gaussian statistics of a feature set ``[N, d]`` (N >= 2; the covariance divides by N - 1)."""
    feats = feats.detach().to(torch.float64).cpu()
    if feats.dim() != 2 or len(feats) < 2:
        raise ValueError(f"need a [N >= 2, d] feature set, got shape {tuple(feats.shape)}")
    mean = feats.mean(0)
    centred = feats - mean
    cov = centred.T @ centred / (len(feats) - 1)
    return FeatureStats(mean, (cov + cov.T) / 2, len(feats))  # exactly symmetric for eigh


def frechet_distance_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between N(a.mean, a.cov) and N(b.mean, b.cov)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dimensions differ: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    mean_term = float((a.mean - b.mean).pow(2).sum())
    if torch.equal(a.cov, b.cov):
        # tr(2S - 2 (S^1/2 S S^1/2)^1/2) = 0 exactly; computing it would leave rounding noise.
        return mean_term
    root_a = _psd_sqrt(a.cov)
    middle = root_a @ b.cov @ root_a
    # The eigenvalues of the PSD middle term are clamped: rounding makes tiny ones negative.
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)
    trace_term = float(torch.trace(a.cov) + torch.trace(b.cov) - 2 * eig.sqrt().sum())
    return max(0.0, mean_term + trace_term)  # >= 0 in exact arithmetic


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    eig, vecs = torch.linalg.eigh(m)
    return (vecs * eig.clamp_min(0).sqrt()) @ vecs.T


@dataclass(frozen=True)
class RealFloor:
    """What real held-out data scores: the floor that sampled FD and confidence are read against."""

    fd: float  # FD of the real "test" split against the "train" statistics
    confidence: float  # mean classifier probability of the true class on the "test" split
    accuracy: float  # classifier accuracy on the "test" split
    count: int  # number of test images


class DigitMetrics:
    """Sample-quality scores of 16x16 digit images from the digit classifier.

    ``fd(images)`` compares classifier features with the real "train" split, ``confidence`` and
    ``accuracy`` read its class probabilities, and ``real_floor()`` scores the real "test" split
    the same way (cached). Images are clamped to [-1, 1], the range the classifier saw, as they
    would be when saved as pictures. The classifier runs in eval mode, in batches, without grad.
    """

    def __init__(
        self,
        classifier: torch.nn.Module | None = None,
        batch_size: int = 512,
        reference_split: str = "train",
        floor_split: str = "test",
    ):
        if classifier is None:
            from rldiff.data.classifier import load_classifier

            classifier = load_classifier()
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.reference_split = reference_split
        self.floor_split = floor_split

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Classifier features ``[B, d]`` (float64, CPU)."""
        return self._batched(images, self.classifier.features)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, classes]`` (float64, CPU)."""
        return self._batched(images, lambda x: torch.softmax(self.classifier(x), dim=1))

    def fd(self, images: torch.Tensor) -> float:
        """FD of the images' features against the real reference split's statistics."""
        return frechet_distance_stats(feature_stats(self.features(images)), self.reference_stats)

    def confidence(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """Mean probability of each image's intended class; of its most likely class where no label
        is given (``labels=None``, or ``UNCONDITIONAL`` entries). In [0, 1]."""
        return float(self.per_sample_confidence(images, labels).mean())

    def per_sample_confidence(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``confidence`` before the mean: float64 ``[B]``."""
        probs = self.probabilities(images)
        best = probs.max(1).values
        if labels is None:
            return best
        labels = self._check_labels(labels, len(probs))
        given = labels != UNCONDITIONAL
        intended = probs.gather(1, labels.clamp_min(0)[:, None])[:, 0]
        return torch.where(given, intended, best)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images the classifier assigns to their intended class (labels required)."""
        labels = self._check_labels(labels, len(images))
        if (labels == UNCONDITIONAL).any():
            raise ValueError("accuracy needs a class label for every image (got UNCONDITIONAL)")
        return float((self.probabilities(images).argmax(1) == labels).to(torch.float64).mean())

    def real_floor(self) -> RealFloor:
        """The real held-out split's FD, confidence and accuracy (computed once per instance)."""
        return self._real_floor

    @cached_property
    def reference_stats(self) -> FeatureStats:
        """Feature statistics of the real reference split (computed once per instance)."""
        from rldiff.data.digits import load_digits16

        images, _ = load_digits16(self.reference_split)
        return feature_stats(self.features(images))

    @cached_property
    def _real_floor(self) -> RealFloor:
        from rldiff.data.digits import load_digits16

        images, labels = load_digits16(self.floor_split)
        return RealFloor(
            fd=self.fd(images),
            confidence=self.confidence(images, labels),
            accuracy=self.accuracy(images, labels),
            count=len(images),
        )

    def _batched(self, images: torch.Tensor, fn) -> torch.Tensor:
        if len(images) == 0:
            raise ValueError("no images to score")
        param = next(self.classifier.parameters())
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size].detach()
            chunk = chunk.to(device=param.device, dtype=param.dtype).clamp(-1, 1)
            out.append(fn(chunk).to(device="cpu", dtype=torch.float64))
        return torch.cat(out)

    @staticmethod
    def _check_labels(labels, n: int) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if len(labels) != n:
            raise ValueError(f"{n} images but {len(labels)} labels")
        return labels


AUTO = "auto"  # the shipped classifier for the digit models, no distribution metrics for others
NO_METRICS = "none"
DIGIT_MODELS = (EMBEDDED, EXACT_GMM)  # models of the digits the shipped classifier knows


def distribution_metrics(
    model: str, metric_network: str = AUTO, sample_shape: tuple[int, ...] | None = None
) -> DigitMetrics | None:
    """The FD / confidence scorer for samples of ``model`` (a ``load_model`` spec), or None where
    no metric network knows its data.

    ``metric_network``: ``"auto"``: the shipped digit classifier for the embedded model (also when
    named by its directory) and the exact digits mixture, None for any other model; ``"none"``:
    None; a directory in the shipped classifier's layout (``config.json`` + ``model.safetensors``):
    that network, for any model whose samples it takes (``sample_shape``), scored against the
    bundled digits as the real data.
    """
    if metric_network == NO_METRICS:
        return None
    if metric_network == AUTO:
        return DigitMetrics() if _is_digit_model(model) else None
    from rldiff.data.classifier import load_classifier
    from rldiff.data.digits import IMAGE_SHAPE

    classifier = load_classifier(metric_network)
    takes = (classifier.config["in_channels"], *IMAGE_SHAPE[1:])
    if sample_shape is not None and tuple(sample_shape) != takes:
        raise ValueError(
            f"metric network {metric_network} takes images {list(takes)}, but the model makes "
            f"{list(sample_shape)}"
        )
    return DigitMetrics(classifier)


def metric_network_id(metric_network: str) -> str:
    """What a ``metric_network`` setting scores with, for cache keys: ``auto`` / ``none`` as is, a
    directory as a hash of its weights and config (the same on every machine)."""
    if metric_network in (AUTO, NO_METRICS):
        return metric_network
    from rldiff.data.classifier import CONFIG_NAME, WEIGHTS_NAME

    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update((Path(metric_network) / name).read_bytes())
    return digest.hexdigest()[:16]


def _is_digit_model(model: str) -> bool:
    if model in DIGIT_MODELS:
        return True
    from rldiff.core.denoisers import DEFAULT_MODEL_DIR

    path = Path(model)
    return path.is_dir() and path.resolve() == DEFAULT_MODEL_DIR.resolve()
