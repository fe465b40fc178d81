"""The shipped precomputed files: copied into a cache without overwriting, schedules merged, and
the shipped reference banks valid for the shipped embedded model."""

import json

import pytest

from rldiff.data.shipped_cache import SCHEDULES, SHIPPED, seed_cache


def test_missing_files_are_copied_and_nothing_is_overwritten(tmp_path):
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    (shipped / "scores").mkdir(parents=True)
    (shipped / "bank.parquet").write_bytes(b"shipped bank")
    (shipped / "scores" / "a.pt").write_bytes(b"shipped score")
    (shipped / SCHEDULES).write_text(json.dumps({"k1": {"sigmas": [1]}, "k2": {"sigmas": [2]}}))
    cache.mkdir()
    (cache / "bank.parquet").write_bytes(b"my bank")
    (cache / SCHEDULES).write_text(json.dumps({"k1": {"sigmas": [9]}}))

    assert seed_cache(cache, shipped) == 2  # scores/a.pt and the k2 entry
    assert (cache / "bank.parquet").read_bytes() == b"my bank"
    assert (cache / "scores" / "a.pt").read_bytes() == b"shipped score"
    assert json.loads((cache / SCHEDULES).read_text()) == {
        "k1": {"sigmas": [9]},
        "k2": {"sigmas": [2]},
    }
    assert seed_cache(cache, shipped) == 0  # idempotent
    assert seed_cache(cache, tmp_path / "absent") == 0


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no precomputed files shipped")
def test_shipped_banks_belong_to_the_shipped_embedded_model():
    from rldiff.config import GUIDANCE_MIX
    from rldiff.core.fingerprint import model_fingerprint
    from rldiff.data.models import EMBEDDED, load_model
    from rldiff.data.reference import load_reference

    fingerprint = model_fingerprint(load_model(EMBEDDED))
    banks = sorted(SHIPPED.glob("reference-*.parquet"))
    # The held-out and the training seeds over the guidance mix, and the training seeds at each
    # scale alone (the per-guidance schedule search).
    tags = {path.name.split("-")[4] for path in banks}
    assert tags == {"g1,2,4,7.5", *(f"g{g:g}" for g in GUIDANCE_MIX)}
    assert len(banks) == 2 + len(GUIDANCE_MIX)
    for path in banks:
        assert path.name.startswith(f"reference-{fingerprint[:12]}-")
        bank = load_reference(path)
        assert bank.metadata["fingerprint"] == fingerprint and len(bank.seeds) >= 128
    keys = json.loads((SHIPPED / SCHEDULES).read_text())
    assert keys and all(k.startswith(fingerprint[:16]) for k in keys)
    assert len(list((SHIPPED / "scores").glob("*.pt"))) > 100
    assert len(list((SHIPPED / "oracle").glob("*.pt"))) >= 3  # one per evaluated budget at least
