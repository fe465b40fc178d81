"""``rldiff evaluate --policy DIR --model OTHER``: a policy trained on the digits mixture scores on
another model of the same sample shape and classes; another shape, class count or observation
layout is refused in one line."""

import json

import pytest
import torch

from rldiff.cli import main
from rldiff.evaluation.ratios import pooled_rows
from rldiff.rl.untrained import untrained_policy

FLAGS = ["--samples", "20", "--train-samples", "6", "--budgets", "4", "--solvers", "unipc",
         "--schedules", "karras", "--global-solvers", "unipc", "--reference-steps", "60",
         "--search-rounds", "1", "--oracle-rounds", "0", "--bandit-rounds", "0", "--guidance", "1",
         "--metric-network", "none", "--ray", "off"]  # fmt: skip


@pytest.fixture(scope="module")
def gmm_policy(tmp_path_factory):
    """An exported policy of the digits mixture (untrained modules: the plumbing, not quality)."""
    return untrained_policy(tmp_path_factory.mktemp("policy") / "policy", "gmm", (4, 6))


def unet_model(directory, tiny_unet, size: int, classes: int | None):
    """A tiny diffusers UNet of ``size`` x ``size`` x 1 samples (``classes``: class-conditional
    with a null class), saved as a model directory."""
    from diffusers import DDPMScheduler, UNet2DModel

    small = tiny_unet()
    config = {**small.config, "sample_size": size, "num_class_embeds": classes}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel.from_config(config).eval()
        with torch.no_grad():  # keeps the random network's ODE tame (see test_diffusers_models)
            unet.conv_out.weight.mul_(0.01)
            unet.conv_out.bias.mul_(0.01)
    unet.save_pretrained(directory, safe_serialization=True)
    DDPMScheduler().save_config(directory)
    return directory


def evaluate(tmp_path, model, policy, capsys):
    out = tmp_path / "out"
    argv = ["evaluate", "--model", str(model), "--policy", str(policy), "--out", str(out),
            "--cache", str(tmp_path / "cache"), *FLAGS]  # fmt: skip
    return main(argv), out, capsys.readouterr()


def test_a_policy_of_the_mixture_scores_on_a_compatible_unet(
    tmp_path, tiny_unet, gmm_policy, capsys
):
    model = unet_model(tmp_path / "unet", tiny_unet, 16, 11)  # 1x16x16, ten classes: as the gmm
    code, out, printed = evaluate(tmp_path, model, gmm_policy, capsys)
    assert code == 0, printed.err
    assert "transfer: moe@gmm (trained on gmm)" in printed.out
    rows = [r for r in pooled_rows(out) if r["family"] == "learned"]
    assert [(r["policy"], r["budget"]) for r in rows] == [("moe@gmm", 4)]
    assert rows[0]["max_nfe"] <= 4 and rows[0]["rmse_mean"] > 0
    assert "`moe@gmm`" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "size, classes, message",
    [
        (8, 11, "samples of shape (1, 16, 16), not (1, 8, 8)"),
        (16, None, "10 classes, not 0"),
    ],
)
def test_other_shapes_or_classes_are_refused(
    tmp_path, tiny_unet, gmm_policy, capsys, size, classes, message
):
    model = unet_model(tmp_path / "unet", tiny_unet, size, classes)
    code, out, printed = evaluate(tmp_path, model, gmm_policy, capsys)
    assert code == 2 and "Traceback" not in printed.err
    assert f"cannot act on {model}" in printed.err and message in printed.err
    assert len(printed.err.strip().splitlines()) == 1 and not out.exists()


def test_another_observation_layout_is_refused(tmp_path, gmm_policy, capsys):
    import shutil

    policy = tmp_path / "old-layout"
    shutil.copytree(gmm_policy, policy)
    spec = json.loads((policy / "policy.json").read_text())
    (policy / "policy.json").write_text(json.dumps({**spec, "obs_layout": 1}))
    code, _, printed = evaluate(tmp_path, "gmm", policy, capsys)
    assert code == 2 and "Traceback" not in printed.err
    assert "does not fit this rldiff: observation layout v1" in printed.err


def test_an_older_export_is_checked_against_its_model_as_loaded(tmp_path, gmm_policy, capsys):
    """A policy exported before the model's shape and classes were recorded: they come from its
    model (here the same one, so the policy is plain ``moe``)."""
    import shutil

    policy = tmp_path / "older"
    shutil.copytree(gmm_policy, policy)
    spec = json.loads((policy / "policy.json").read_text())
    spec["model"] = {k: spec["model"][k] for k in ("spec", "fingerprint")}
    (policy / "policy.json").write_text(json.dumps(spec))
    code, out, printed = evaluate(tmp_path, "gmm", policy, capsys)
    assert code == 0, printed.err
    assert "transfer" not in printed.out
    assert [r["policy"] for r in pooled_rows(out) if r["family"] == "learned"] == ["moe"]
