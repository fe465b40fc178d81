"""GPUs for the Serve application's ``Sampler`` replicas: ``sampler_gpus`` resolved against a faked
cluster (no GPU and no Ray cluster needed), and ``serve/config.cluster.yaml`` as Serve 2.60 applies
it to the deployments ``build_app`` makes."""

import logging
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from rldiff.serving import app as serving_app
from rldiff.serving.app import SAMPLER_CPUS, AppArgs, build_app, resolve_sampler_gpus

ROOT = Path(__file__).resolve().parents[1]


def cluster_with(gpus: float):
    """A fake ``cluster_gpus`` that records its calls."""
    calls = []

    def count() -> float:
        calls.append(gpus)
        return gpus

    count.calls = calls
    return count


@pytest.mark.parametrize(
    ("requested", "device", "cluster", "expected", "warns"),
    [
        ("auto", "auto", 0, 0.0, False),  # CPU cluster: never a GPU the cluster lacks
        ("auto", "auto", 4, 1.0, False),  # GPU cluster: one each
        ("auto", "auto", 1, 1.0, False),
        ("auto", "auto", 0.5, 0.5, False),  # a fractional GPU resource: no more than there is
        ("auto", "cuda", 2, 1.0, False),
        ("auto", "cuda", 0, 0.0, True),  # the model cannot load: said so
        (1.0, "auto", 0, 1.0, True),  # as configured (an autoscaler may add one), with a warning
        (1.0, "auto", 2, 1.0, False),
        (0.5, "auto", 1, 0.5, False),
        (1.0, "cpu", 2, 1.0, True),  # a GPU nobody uses
        (0.0, "auto", 2, 0.0, False),
        (0.0, "cuda", 2, 0.0, True),
    ],
)
def test_sampler_gpus_follow_the_cluster(requested, device, cluster, expected, warns):
    gpus, why, warning = resolve_sampler_gpus(requested, device, cluster_with(cluster))
    assert gpus == expected
    assert why.startswith(
        "sampler_gpus=auto" if requested == "auto" else f"sampler_gpus={requested:g}"
    )
    assert (warning is not None) == warns, warning


def test_auto_with_the_model_on_the_cpu_asks_for_no_gpu_and_does_not_look():
    cluster = cluster_with(8)
    assert resolve_sampler_gpus("auto", "cpu", cluster)[0] == 0
    assert cluster.calls == []  # no Ray call needed for a CPU model


def test_sampler_gpus_argument_accepts_auto_and_numbers_only():
    assert AppArgs().sampler_gpus == "auto"
    assert AppArgs(sampler_gpus="auto").sampler_gpus == "auto"
    assert AppArgs(sampler_gpus="0.5").sampler_gpus == 0.5  # `serve run ... sampler_gpus=0.5`
    assert AppArgs(sampler_gpus=1).sampler_gpus == 1.0
    for bad in ("-1", "gpu", -0.5):
        with pytest.raises(ValidationError):
            AppArgs(sampler_gpus=bad)


def _sampler(application):
    """The ``Sampler`` deployment bound into the ``Ingress`` application."""
    sampler = application._bound_deployment.init_args[0]._bound_deployment
    assert sampler.name == "Sampler"
    return sampler


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))


@pytest.fixture
def serve_log():
    """Lines of the ``ray.serve`` logger (it does not propagate to the root, so caplog misses
    them)."""
    logger = logging.getLogger("ray.serve")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize(("cluster", "expected"), [(0, None), (2, 1.0)])
def test_build_app_gives_the_sampler_its_gpus_and_says_so(
    monkeypatch, serve_log, cluster, expected
):
    monkeypatch.setattr(serving_app, "cluster_gpus", cluster_with(cluster))
    options = _sampler(build_app({"device": "auto"}))._replica_config.ray_actor_options
    assert options["num_cpus"] == SAMPLER_CPUS
    assert options.get("num_gpus") == expected
    seen = "2 GPUs in the cluster" if cluster else "no GPU in the cluster"
    said = [m for _, m in serve_log if m.startswith("Sampler replicas:")]
    assert said == [
        f"Sampler replicas: 1 CPU and {expected or 0:g} GPU each (sampler_gpus=auto, {seen})"
    ]


def test_build_app_warns_when_the_choice_looks_wrong(monkeypatch, serve_log):
    monkeypatch.setattr(serving_app, "cluster_gpus", cluster_with(0))
    build_app({"device": "cuda"})
    warnings = [m for level, m in serve_log if level == logging.WARNING]
    assert warnings and "needs a GPU" in warnings[0]


def test_the_local_cpu_app_is_unchanged(monkeypatch):
    """``device: cpu`` (``serve/config.yaml``, ``rldiff serve``): 1 CPU, no GPU key at all."""
    monkeypatch.setattr(serving_app, "cluster_gpus", cluster_with(8))
    options = _sampler(build_app({}))._replica_config.ray_actor_options
    assert options["num_cpus"] == SAMPLER_CPUS and "num_gpus" not in options


# ------------------------------------------------------ serve/config.cluster.yaml, applied by Serve


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "serve" / "config.cluster.yaml").read_text())


def _deployed_actor_options(config: dict, application) -> dict:
    """The Sampler's ray_actor_options after Serve applies ``config``'s deployment options to the
    application built in code (the function ``serve deploy`` runs on the controller)."""
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.deployment_info import DeploymentInfo
    from ray.serve.schema import ServeDeploySchema

    app_config = ServeDeploySchema.model_validate(config).applications[0]
    sampler = _sampler(application)
    infos = {
        d.name: DeploymentInfo(
            deployment_config=d._deployment_config,
            replica_config=d._replica_config,
            start_time_ms=0,
            deployer_job_id="test",
        )
        for d in (sampler, application._bound_deployment)
    }
    return override_deployment_info(infos, app_config)["Sampler"].replica_config.ray_actor_options


def test_cluster_config_asks_for_gpus_through_build_app(cluster_config):
    (application,) = cluster_config["applications"]
    args = AppArgs.model_validate(application["args"])
    assert args.device == "auto" and args.sampler_gpus == "auto"
    sampler = next(d for d in application["deployments"] if d["name"] == "Sampler")
    # Serve would replace build_app's ray_actor_options (num_gpus included) with these.
    assert "ray_actor_options" not in sampler


@pytest.mark.parametrize(("cluster", "expected"), [(4, 1.0), (0, None)])
def test_serve_keeps_the_gpu_that_build_app_chose(monkeypatch, cluster_config, cluster, expected):
    monkeypatch.setattr(serving_app, "cluster_gpus", cluster_with(cluster))
    application = build_app(cluster_config["applications"][0]["args"])
    options = _deployed_actor_options(cluster_config, application)
    assert options["num_cpus"] == SAMPLER_CPUS
    assert options.get("num_gpus") == expected


def test_ray_actor_options_in_the_config_file_would_drop_the_gpu(monkeypatch, cluster_config):
    """Why the cluster config leaves them out: Serve replaces the options as a whole."""
    monkeypatch.setattr(serving_app, "cluster_gpus", cluster_with(4))
    application = build_app(cluster_config["applications"][0]["args"])
    config = yaml.safe_load(yaml.safe_dump(cluster_config))
    sampler = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Sampler")
    sampler["ray_actor_options"] = {"num_cpus": 1}
    assert "num_gpus" not in _deployed_actor_options(config, application)
