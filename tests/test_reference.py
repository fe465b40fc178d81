"""The reference bank: accurate, cached, and never silently reused for another request."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import rldiff.data.reference as reference_module
from rldiff.core.denoisers import Condition
from rldiff.core.fingerprint import model_fingerprint
from rldiff.core.gmm import GaussianMixtureDenoiser
from rldiff.data.reference import (
    ReferenceAccuracyError,
    ReferenceBankError,
    build_reference,
    load_or_build,
    load_reference,
)

FAST = {"steps": 80, "check_steps": 160, "check_samples": 4, "progress": False}


@pytest.fixture
def request_rows():
    seeds = torch.arange(10, 18)
    cond = Condition.make([0, 1, 2, -1, 0, 1, 2, -1], [1.0, 1.0, 2.0, 1.0, 1.5, 1.0, 1.0, 1.0])
    return seeds, cond


@pytest.fixture
def counted(monkeypatch):
    """Counts build_reference calls made through load_or_build."""
    calls = []
    real = reference_module.build_reference

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_module, "build_reference", spy)
    return calls


def _other_gmm(gmm: GaussianMixtureDenoiser) -> GaussianMixtureDenoiser:
    """The same mixture with one mean nudged: a different model."""
    covs = gmm.eigenvectors @ torch.diag_embed(gmm.eigenvalues) @ gmm.eigenvectors.transpose(1, 2)
    means = gmm.means.clone()
    means[0, 0] += 1e-3
    return GaussianMixtureDenoiser(means, covs, gmm.log_weights.exp())


def test_round_trip_and_cache_hit(tmp_path, small_gmm, request_rows, counted):
    seeds, cond = request_rows
    path = tmp_path / "bank.parquet"
    built = load_or_build(path, small_gmm, seeds, cond, **FAST)
    assert len(counted) == 1 and path.exists()
    assert built.x0.shape == (8, 4) and built.x0.dtype == torch.float32
    meta = built.metadata
    assert (
        meta["steps"] == FAST["steps"] and meta["solver"] == "unipc" and meta["sample_shape"] == [4]
    )
    assert meta["check_samples"] == 4 and meta["check_rmse_mean"] < 2e-3
    assert meta["fingerprint"] == model_fingerprint(small_gmm)

    again = load_or_build(path, small_gmm, seeds, cond, **FAST)
    assert len(counted) == 1  # served from the file
    assert torch.equal(again.x0, built.x0) and torch.equal(again.seeds, seeds)
    assert torch.equal(again.cond.labels, cond.labels)
    assert torch.equal(again.cond.guidance, cond.guidance)
    assert again.metadata == meta

    schema = pq.read_schema(path)
    assert [str(schema.field(c).type) for c in ("seed", "label", "guidance")] == [
        "int64",
        "int64",
        "double",
    ]
    x0_type = schema.field("x0").type
    assert pa.types.is_fixed_size_list(x0_type) and x0_type.list_size == 4
    assert x0_type.value_type == pa.float32()


def test_subset_of_a_stored_superset_is_selected_in_request_order(
    tmp_path, small_gmm, request_rows, counted
):
    seeds, cond = request_rows
    path = tmp_path / "bank.parquet"
    full = load_or_build(path, small_gmm, seeds, cond, **FAST)
    order = torch.tensor([5, 2, 7])
    part = load_or_build(path, small_gmm, seeds[order], cond[order], **FAST)
    assert len(counted) == 1
    assert torch.equal(part.x0, full.x0[order]) and torch.equal(part.seeds, seeds[order])


def test_samples_do_not_depend_on_batching(small_gmm, request_rows):
    seeds, cond = request_rows
    fast = {**FAST, "check_samples": 0}
    whole = build_reference(small_gmm, seeds, cond, **fast)
    split = build_reference(small_gmm, seeds, cond, batch_size=3, **fast)
    assert torch.allclose(whole.x0, split.x0, atol=1e-6)


def test_stale_model_is_refused_with_a_helpful_message(tmp_path, small_gmm, request_rows, counted):
    seeds, cond = request_rows
    path = tmp_path / "bank.parquet"
    load_or_build(path, small_gmm, seeds, cond, **FAST)
    other = _other_gmm(small_gmm)
    assert model_fingerprint(other) != model_fingerprint(small_gmm)
    with pytest.raises(ReferenceBankError, match="another model") as err:
        load_or_build(path, other, seeds, cond, **FAST)
    assert str(path) in str(err.value) and "rebuild=True" in str(err.value)
    assert len(counted) == 1


def test_other_seeds_or_settings_are_refused(tmp_path, small_gmm, request_rows):
    seeds, cond = request_rows
    path = tmp_path / "bank.parquet"
    load_or_build(path, small_gmm, seeds, cond, **FAST)
    with pytest.raises(ReferenceBankError, match=r"lacks 1 of the 8 .*\(99, -1, 1\.0\)"):
        load_or_build(path, small_gmm, torch.cat([seeds[:7], torch.tensor([99])]), cond, **FAST)
    other_guidance = Condition.make(cond.labels, 3.0)
    with pytest.raises(ReferenceBankError, match="rebuild=True"):
        load_or_build(path, small_gmm, seeds, other_guidance, **FAST)
    with pytest.raises(ReferenceBankError, match="steps 80 .requested 100"):
        load_or_build(path, small_gmm, seeds, cond, **{**FAST, "steps": 100})


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "bitflip"])
def test_corrupted_file_is_refused(tmp_path, small_gmm, request_rows, damage):
    seeds, cond = request_rows
    path = tmp_path / "bank.parquet"
    built = load_or_build(path, small_gmm, seeds, cond, **FAST)
    data = path.read_bytes()
    if damage == "bitflip":  # inside the stored x0 values: only the page checksums can tell
        pos = data.find(built.x0[0].numpy().tobytes())
        assert pos > 0
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1 :])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a parquet file at all" * 10)
    else:
        path.write_bytes(b"")
    with pytest.raises(ReferenceBankError, match="unreadable") as err:
        load_or_build(path, small_gmm, seeds, cond, **FAST)
    assert str(path) in str(err.value) and "rebuild=True" in str(err.value)


def test_a_foreign_parquet_file_is_refused(tmp_path, small_gmm, request_rows):
    seeds, cond = request_rows
    path = tmp_path / "bank.parquet"
    pq.write_table(pa.table({"seed": pa.array([1, 2], pa.int64())}), path)
    with pytest.raises(ReferenceBankError, match="not an rldiff reference bank"):
        load_or_build(path, small_gmm, seeds, cond, **FAST)


def test_rebuild_recomputes_and_atomic_write_leaves_no_temp_files(
    tmp_path, small_gmm, request_rows, counted
):
    seeds, cond = request_rows
    path = tmp_path / "bank.parquet"
    path.write_bytes(b"corrupt")
    rebuilt = load_or_build(path, small_gmm, seeds, cond, rebuild=True, **FAST)
    assert len(counted) == 1
    assert os.listdir(tmp_path) == ["bank.parquet"]
    assert torch.equal(load_reference(path).x0, rebuilt.x0)
    # A stale bank is replaced too.
    other = _other_gmm(small_gmm)
    load_or_build(path, other, seeds, cond, rebuild=True, **FAST)
    assert load_reference(path).metadata["fingerprint"] == model_fingerprint(other)
    assert os.listdir(tmp_path) == ["bank.parquet"]


def test_failed_write_leaves_the_old_file_and_no_temp(
    tmp_path, small_gmm, request_rows, monkeypatch
):
    seeds, cond = request_rows
    path = tmp_path / "bank.parquet"
    good = load_or_build(path, small_gmm, seeds, cond, **FAST)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reference_module.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        load_or_build(path, small_gmm, seeds, cond, rebuild=True, **FAST)
    assert os.listdir(tmp_path) == ["bank.parquet"]
    monkeypatch.undo()
    assert torch.equal(load_reference(path).x0, good.x0)


def test_unconverged_solve_is_rejected(small_gmm, request_rows):
    seeds, cond = request_rows
    with pytest.raises(ReferenceAccuracyError, match="not converged"):
        build_reference(small_gmm, seeds, cond, steps=2, check_samples=4, progress=False)


def test_reference_is_close_to_a_much_finer_solve(small_gmm, request_rows):
    seeds, cond = request_rows
    coarse = build_reference(small_gmm, seeds, cond, **FAST)
    fine = build_reference(small_gmm, seeds, cond, steps=320, check_samples=0, progress=False)
    assert (coarse.x0 - fine.x0).pow(2).mean(1).sqrt().max() < 2e-3
