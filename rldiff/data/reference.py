"""The reference bank: accurate probability-flow ODE solutions for given seeds and conditions.

Contract: ``build_reference`` solves each (seed, label, guidance) with a fine fixed schedule through
the shared sampler (initial noise from ``rldiff.core.seeds.initial_noise``, the same noise every policy
starts from), and checks its own accuracy by re-solving a few samples twice as finely.
``load_or_build`` keeps the bank as a Parquet file (columns ``seed`` int64, ``label`` int64,
``guidance`` float64, ``x0`` fixed-size list of float32; build settings, model fingerprint and the
accuracy check in the schema metadata) and reuses it only when it provably matches the request:
same format version, same model (``model_fingerprint``), same solve settings and sample shape, and
every requested row present. Anything else raises ``ReferenceBankError`` naming what differs;
``rebuild=True`` recomputes. Files are written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from rldiff.config import REFERENCE_STEPS
from rldiff.core.denoisers import Condition, Denoiser
from rldiff.core.error import rmse_per_sample
from rldiff.core.fingerprint import model_fingerprint
from rldiff.core.policies import FixedSchedulePolicy
from rldiff.core.sampler import MAX_STEPS, sample
from rldiff.core.schedules import get_schedule
from rldiff.core.seeds import initial_noise
from rldiff.core.solvers import EXPERTS, expert_index

FORMAT_VERSION = 1
METADATA_KEY = b"rldiff.reference"
# UniPC-2 (third order) on Karras sigmas, which end exactly at sigma_min before the final jump, so
# the solve converges to one fixed target (a ladder whose last point moves with n converges only at
# first order). 200 steps: 6.7e-6 mean RMSE from 1000 steps on the exact digits GMM; 1.6e-4 from
# 500 steps on the UNet (guidance 1), 3.1e-4 at guidance 3.
DEFAULT_SOLVER = "unipc"
DEFAULT_SCHEDULE = "karras"
DEFAULT_CHECK_TOLERANCE = 2e-3  # mean RMSE between the bank and its 2x-finer re-solve


class ReferenceBankError(RuntimeError):
    """A reference bank file cannot be used for the request (unreadable, stale or mismatched)."""


class ReferenceAccuracyError(ReferenceBankError):
    """A freshly built bank failed its accuracy check against a finer solve."""


@dataclass
class Reference:
    """Reference solutions ``x0`` [N, *shape] (float32) for ``seeds`` [N] under ``cond``."""

    seeds: torch.Tensor  # [N] int64
    cond: Condition
    x0: torch.Tensor
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return len(self.seeds)


def build_reference(
    denoiser: Denoiser,
    seeds,
    cond: Condition,
    steps: int = REFERENCE_STEPS,
    solver: str = DEFAULT_SOLVER,
    schedule: str = DEFAULT_SCHEDULE,
    check_steps: int | None = None,
    check_samples: int = 32,
    batch_size: int = 256,
    progress: bool = True,
    check_tolerance: float = DEFAULT_CHECK_TOLERANCE,
    shape: tuple[int, ...] | None = None,
) -> Reference:
    """Solves the ODE from ``initial_noise(seeds, shape)`` for every (seed, condition) row.

    The state is integrated in float64 (the network itself runs in its own dtype) and stored as
    float32. The first ``check_samples`` rows are re-solved with ``check_steps`` (default
    ``2 * steps``); a mean RMSE above ``check_tolerance`` (or a non-finite result) raises
    ``ReferenceAccuracyError``. ``check_samples=0`` skips the check.
    """
    seeds = _as_seeds(seeds)
    if len(cond) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(cond)} conditions")
    shape = tuple(shape or _sample_shape(denoiser))
    check_steps = 2 * steps if check_steps is None else check_steps
    if not 1 <= steps <= MAX_STEPS or (check_samples > 0 and not 1 <= check_steps <= MAX_STEPS):
        raise ValueError(f"steps and check_steps must be in 1..{MAX_STEPS} (the sampler's bound)")
    expert_index(solver)  # fail on a bad name before any work
    n_check = min(check_samples, len(seeds))
    bar = tqdm(
        total=len(seeds) + n_check, desc="reference bank", unit="sample", disable=not progress
    )
    with bar:
        x0 = _solve(denoiser, seeds, cond, shape, steps, solver, schedule, batch_size, bar)
        if not torch.isfinite(x0).all():
            raise ReferenceAccuracyError(f"the {steps}-step {solver} solve produced non-finite x0")
        check_mean = check_max = None
        if n_check:
            fine = _solve(
                denoiser,
                seeds[:n_check],
                cond[:n_check],
                shape,
                check_steps,
                solver,
                schedule,
                batch_size,
                bar,
            )
            rmse = rmse_per_sample(x0[:n_check], fine)
            check_mean, check_max = float(rmse.mean()), float(rmse.max())
            if not math.isfinite(check_mean) or check_mean > check_tolerance:
                raise ReferenceAccuracyError(
                    f"reference solve is not converged: {steps} vs {check_steps} {solver} steps "
                    f"differ by mean RMSE {check_mean:.3g} (max {check_max:.3g}) > tolerance "
                    f"{check_tolerance:.3g}; use more steps"
                )
    metadata = {
        "format_version": FORMAT_VERSION,
        "fingerprint": model_fingerprint(denoiser),
        "solver": solver,
        "schedule": schedule,
        "steps": steps,
        "sample_shape": list(shape),
        "count": len(seeds),
        "check_steps": check_steps if n_check else None,
        "check_samples": n_check,
        "check_rmse_mean": check_mean,
        "check_rmse_max": check_max,
        "check_tolerance": check_tolerance,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return Reference(seeds, Condition.make(cond.labels, cond.guidance), x0.float(), metadata)


def save_reference(reference: Reference, path: str | Path) -> Path:
    """Writes the bank as Parquet, atomically: a crash never leaves a partial file at ``path``."""
    path = Path(path)
    n = len(reference)
    flat = reference.x0.detach().cpu().to(torch.float32).reshape(n, -1).numpy()
    x0 = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    table = pa.table(
        {
            "seed": pa.array(reference.seeds.numpy().astype(np.int64)),
            "label": pa.array(reference.cond.labels.cpu().numpy().astype(np.int64)),
            "guidance": pa.array(reference.cond.guidance.cpu().numpy().astype(np.float64)),
            "x0": x0,
        }
    ).replace_schema_metadata({METADATA_KEY: json.dumps(reference.metadata).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # Page checksums let a read detect corruption inside the file, not only truncation.
            pq.write_table(table, f, write_page_checksum=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_reference(path: str | Path) -> Reference:
    """Reads a bank written by ``save_reference``; ``ReferenceBankError`` if it is not one."""
    path = Path(path)
    hint = f"delete {path} or pass rebuild=True to recompute it"
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ReferenceBankError(
            f"reference bank {path} is unreadable (corrupted or truncated: {err}); {hint}"
        ) from err
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None or not _is_bank_schema(table.schema):
        raise ReferenceBankError(
            f"{path} is not an rldiff reference bank (schema {table.schema}); {hint}"
        )
    try:
        metadata = json.loads(raw)
        version = metadata["format_version"]
        shape = tuple(int(d) for d in metadata["sample_shape"])
    except (ValueError, TypeError, KeyError) as err:
        raise ReferenceBankError(
            f"reference bank {path} has unreadable metadata ({err!r}); {hint}"
        ) from err
    if version != FORMAT_VERSION:
        raise ReferenceBankError(
            f"reference bank {path} has format version {version!r}, this code reads version "
            f"{FORMAT_VERSION}; {hint}"
        )
    x0_col = table.column("x0").combine_chunks()
    if x0_col.type.list_size != math.prod(shape):
        raise ReferenceBankError(
            f"reference bank {path} stores {x0_col.type.list_size} values per sample but its "
            f"metadata says shape {shape}; {hint}"
        )
    x0 = torch.from_numpy(x0_col.flatten().to_numpy(zero_copy_only=False).copy())
    return Reference(
        torch.from_numpy(table.column("seed").to_numpy().copy()),
        Condition.make(
            torch.from_numpy(table.column("label").to_numpy().copy()),
            torch.from_numpy(table.column("guidance").to_numpy().copy()),
        ),
        x0.reshape(len(table), *shape),
        metadata,
    )


def _is_bank_schema(schema: pa.Schema) -> bool:
    expected = {"seed": pa.int64(), "label": pa.int64(), "guidance": pa.float64()}
    if any(schema.get_field_index(k) < 0 or schema.field(k).type != t for k, t in expected.items()):
        return False
    if schema.get_field_index("x0") < 0:
        return False
    x0 = schema.field("x0").type
    return pa.types.is_fixed_size_list(x0) and x0.value_type == pa.float32()


def load_or_build(
    path: str | Path,
    denoiser: Denoiser,
    seeds,
    cond: Condition,
    rebuild: bool = False,
    **build_kwargs,
) -> Reference:
    """The bank at ``path`` for these (seed, condition) rows, building and saving it if absent.

    An existing file is reused only if it matches: format version, model fingerprint, solver,
    schedule, steps, sample shape, and every requested (seed, label, guidance) row (a superset is
    subset in request order). Otherwise ``ReferenceBankError`` says what differs — never a silent
    reuse. ``rebuild=True`` recomputes and overwrites. ``build_kwargs`` go to ``build_reference``.
    """
    path = Path(path)
    seeds = _as_seeds(seeds)
    if len(cond) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(cond)} conditions")
    if rebuild or not path.exists():
        reference = build_reference(denoiser, seeds, cond, **build_kwargs)
        save_reference(reference, path)
        return reference
    stored = load_reference(path)
    _check_matches(path, stored.metadata, denoiser, build_kwargs)
    rows = _select_rows(path, stored, seeds, cond)
    return Reference(stored.seeds[rows], stored.cond[rows], stored.x0[rows], stored.metadata)


def _check_matches(path: Path, meta: dict, denoiser: Denoiser, build_kwargs: dict) -> None:
    hint = f"delete {path} or pass rebuild=True to recompute it"
    fingerprint = model_fingerprint(denoiser)
    if meta.get("fingerprint") != fingerprint:
        raise ReferenceBankError(
            f"stale reference bank {path}: built for another model (fingerprint "
            f"{str(meta.get('fingerprint'))[:12]}…, this model is {fingerprint[:12]}…); {hint}"
        )
    requested = {
        "solver": build_kwargs.get("solver", DEFAULT_SOLVER),
        "schedule": build_kwargs.get("schedule", DEFAULT_SCHEDULE),
        "steps": build_kwargs.get("steps", REFERENCE_STEPS),
        "sample_shape": list(build_kwargs.get("shape") or _sample_shape(denoiser)),
    }
    diffs = [
        f"{k} {meta.get(k)!r} (requested {v!r})" for k, v in requested.items() if meta.get(k) != v
    ]
    if diffs:
        raise ReferenceBankError(f"reference bank {path} was built with {', '.join(diffs)}; {hint}")


def _select_rows(
    path: Path, stored: Reference, seeds: torch.Tensor, cond: Condition
) -> torch.Tensor:
    """Indices into the stored rows for the requested rows, in request order."""
    want = _keys(seeds, cond)
    have = _keys(stored.seeds, stored.cond)
    if want == have:
        return torch.arange(len(have))
    index: dict[tuple, int] = {}
    for i, key in enumerate(have):
        index.setdefault(key, i)
    missing = [key for key in want if key not in index]
    if missing:
        shown = ", ".join(str(k) for k in missing[:3])
        raise ReferenceBankError(
            f"reference bank {path} lacks {len(missing)} of the {len(want)} requested "
            f"(seed, label, guidance) rows, e.g. {shown}: it was built for other seeds or "
            f"conditions; delete {path} or pass rebuild=True to recompute it"
        )
    return torch.tensor([index[key] for key in want], dtype=torch.long)


def _keys(seeds: torch.Tensor, cond: Condition) -> list[tuple[int, int, float]]:
    return list(
        zip(
            seeds.tolist(),
            cond.labels.tolist(),
            cond.guidance.to(torch.float64).tolist(),
            strict=True,
        )
    )


def _solve(denoiser, seeds, cond, shape, steps, solver, schedule, batch_size, bar) -> torch.Tensor:
    policy = FixedSchedulePolicy(solver, get_schedule(schedule, steps, denoiser.noise_table))
    budget = steps * (1 + EXPERTS[expert_index(solver)].extra_nfe) + 1  # never binding
    out = []
    for start in range(0, len(seeds), batch_size):
        part = seeds[start : start + batch_size]
        # Drawn in float32 like every policy's initial noise, then integrated in float64.
        noise = initial_noise(part.tolist(), shape).to(torch.float64)
        result = sample(denoiser, policy, noise, cond[start : start + batch_size], budget, part)
        out.append(result.x0.cpu())
        bar.update(len(part))
    return torch.cat(out)


def _as_seeds(seeds) -> torch.Tensor:
    return torch.as_tensor(seeds, dtype=torch.long).reshape(-1).cpu()


def _sample_shape(denoiser) -> tuple[int, ...]:
    shape = getattr(denoiser, "sample_shape", None)
    if shape is None:
        raise ValueError(f"{type(denoiser).__name__} has no sample_shape: pass shape=")
    return tuple(shape)


def seed_bank(
    cache: str | Path,
    denoiser: Denoiser,
    name: str,
    seeds: list[int],
    guidance: float | tuple[float, ...],
    steps: int = REFERENCE_STEPS,
    progress: bool = True,
) -> Reference:
    """The cached bank of ``seeds`` (labels from ``labels_for_seeds``: ``seed % num_classes``, or
    none for an unconditional model) at one guidance scale, or over a mix of them (each seed's
    scale from ``guidance_for_seeds``). The one naming rule for bank files: model, seed set,
    guidance and solve are in the name, so training and evaluation share a bank and different
    settings never collide."""
    from rldiff.core.denoisers import guidance_for_seeds, labels_for_seeds

    labels = labels_for_seeds(seeds, denoiser.num_classes)
    cond = Condition.make(labels, guidance_for_seeds(seeds, guidance))
    path = bank_path(cache, denoiser, name, len(seeds), guidance, steps)
    return load_or_build(path, denoiser, seeds, cond, steps=steps, progress=progress)


def guidance_tag(guidance: float | tuple[float, ...]) -> str:
    """``g1`` for one scale, ``g1,2,4,7.5`` for a mix (in file names and cache keys)."""
    scales = guidance if isinstance(guidance, list | tuple) else [guidance]
    return "g" + ",".join(f"{float(g):g}" for g in scales)


def bank_path(
    cache, denoiser: Denoiser, name: str, n: int, guidance: float | tuple[float, ...], steps: int
) -> Path:
    """Where ``seed_bank`` keeps the bank of ``n`` seeds called ``name``."""
    model = model_fingerprint(denoiser)[:12]
    solve = f"{DEFAULT_SOLVER}-{DEFAULT_SCHEDULE}-{steps}"
    return Path(cache) / f"reference-{model}-{name}-{n}-{guidance_tag(guidance)}-{solve}.parquet"
