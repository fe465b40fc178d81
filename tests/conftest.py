"""Shared fixtures: one torch thread, a small exact Gaussian-mixture model."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import dataclasses  # noqa: E402
import struct  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_gmm():
    """The exact Gaussian-mixture model of the 16x16 digits (one component per class)."""
    from rldiff.core.gmm import GaussianMixtureDenoiser
    from rldiff.data.digits import load_digits16

    images, labels = load_digits16("train")
    return GaussianMixtureDenoiser.fit(images, labels)


@pytest.fixture(scope="session")
def small_gmm():
    """A 4-dimensional, 3-component mixture: exact, fast, and well conditioned for order tests."""
    from rldiff.core.gmm import GaussianMixtureDenoiser

    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64) * 0.4
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(4, dtype=torch.float64)
    return GaussianMixtureDenoiser(means, covs, torch.tensor([0.5, 0.3, 0.2]))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the test session, listening on 127.0.0.1 only."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # must precede Ray's start
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _event_tags(directory) -> dict[str, list[int]]:
    """Scalar tags -> steps in the TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    tags: dict[str, list[int]] = {}
    for path in directory.glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
            i += 12 + n + 4
    return tags


@pytest.fixture(scope="session")
def event_tags():
    """Reads TensorBoard event files without TensorBoard: ``event_tags(directory)``."""
    return _event_tags


def _tiny_train_config(cache: str, **changes):
    """A ``TrainConfig`` on the mixture model that trains in about a second per iteration, in
    the driver (no remote env runner): the shape every training and search test starts from."""
    from rldiff.config import TrainConfig

    base = TrainConfig(
        model="gmm",
        batch_size=8,
        budgets=(4, 6),
        n_train=24,
        reference_steps=60,
        cache=cache,
        hidden=(32, 32),
        train_batch_size=64,
        minibatch_size=64,
        num_epochs=1,
        env_runners=0,
        iterations=2,
        checkpoint_every=1,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="session")
def tiny_train_config():
    """``tiny_train_config(cache, **changes)``: see ``_tiny_train_config``."""
    return _tiny_train_config


def _tiny_unet(num_class_embeds=None, seed=0):
    """A diffusers UNet2DModel of a few thousand parameters, 1x8x8, deterministic per seed."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=num_class_embeds,
        ).eval()


@pytest.fixture(scope="session")
def tiny_unet():
    """``tiny_unet(num_class_embeds=None, seed=0)``: see ``_tiny_unet``."""
    return _tiny_unet


ARTEFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # git-ignored
_WRITTEN = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def artefact(pytestconfig):
    """``artefact(name)``: a path in ``test-artifacts/`` for a file a test leaves to be looked at
    (a screenshot); the run's summary lists every one that was written, even under ``-q``."""
    written = pytestconfig.stash.setdefault(_WRITTEN, [])

    def path(name: str) -> Path:
        ARTEFACTS.mkdir(exist_ok=True)
        written.append(ARTEFACTS / name)
        return ARTEFACTS / name

    return path


def pytest_terminal_summary(terminalreporter, config):
    written = [p for p in dict.fromkeys(config.stash.get(_WRITTEN, [])) if p.is_file()]
    if written:
        terminalreporter.write_sep("-", "test artefacts")
        for p in written:
            terminalreporter.write_line(str(p))
