"""Precomputed inputs for the embedded model, shipped so the main job starts from them.

``rldiff/assets/embedded-cache/`` holds copies of files the evaluation protocol writes to its cache
for the embedded model at the default settings: the reference banks of the held-out and training
seeds (200-step UniPC solves), the optimised global schedules and the scores of the deterministic
baselines. Computing them takes about 25 minutes on 2 CPU cores; the main job copies them into its
cache instead (``seed_cache``). ``python jobs/build_embedded_cache.py`` recomputes and re-ships them.

Nothing here is trusted blindly: each file is checked where it is used (a bank by the model's
fingerprint and its seeds, schedules and scores by keys that contain the model's fingerprint and
every setting they depend on), so files for another model or other settings are simply not used,
and a damaged one is rebuilt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHIPPED = Path(__file__).parent.parent / "assets" / "embedded-cache"
SCHEDULES = "global-schedules.json"


def seed_cache(cache: str | Path, shipped: Path = SHIPPED) -> int:
    """Copies every shipped file missing from ``cache`` into it (schedules: the missing entries
    are merged in); returns how many files or entries were added. Never overwrites."""
    cache, added = Path(cache), 0
    if not shipped.is_dir():
        return 0
    for source in sorted(shipped.rglob("*")):
        if not source.is_file() or source.name in (SCHEDULES, "README.md"):
            continue
        target = cache / source.relative_to(shipped)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
            added += 1
    if (shipped / SCHEDULES).exists():
        added += _merge_schedules(shipped / SCHEDULES, cache / SCHEDULES)
    return added


def _merge_schedules(source: Path, target: Path) -> int:
    shipped = json.loads(source.read_text())
    mine = json.loads(target.read_text()) if target.exists() else {}
    missing = {k: v for k, v in shipped.items() if k not in mine}
    if missing:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps({**mine, **missing}, indent=1))
        tmp.replace(target)
    return len(missing)
