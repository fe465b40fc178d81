"""The traffic log: one Parquet row per served request (``rldiff.data.traffic.TRAFFIC_SCHEMA``),
written off the request path.

``TrafficLog.add`` only appends rows to a bounded in-memory buffer (a full buffer drops the rows
and counts them: a request never waits for the disk). One background thread writes the buffer
every ``flush_s`` seconds, or as soon as ``file_rows`` rows wait, as complete Parquet files:
written under a hidden temporary name, then renamed, so a reader never sees half a file. Names
start with the UTC time and carry the host, the process and a counter, so the ingress replicas of
a cluster never collide on a shared directory. After each file the oldest files of the directory
are deleted until all of them together fit ``max_bytes``.

A write that fails (read-only or full disk, no permission) raises nothing: its rows stay in the
buffer, the writer reports itself failing (``state``) and tries again at the next flush, so an
outage shorter than the buffer loses no row; rows that no longer fit are dropped and counted.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import datetime
import errno
import logging
import os
import re
import secrets
import socket
import threading
import time
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rldiff.data.traffic import FILE_GLOB, TRAFFIC_SCHEMA

logger = logging.getLogger("ray.serve")
FILE_ROWS = 2_000  # rows per file at most; this many waiting start a write at once
PENDING_ROWS = 10_000  # rows the buffer holds (about 1 KB each for one sample at 5 steps)
FLUSH_S = 10.0
CLOSE_S = 10.0  # how long close() waits for the last write
LOGGED_ROUTES = ("/v1/generate", "/v1/generate/batch")


def traffic_rows(route: str, result: dict) -> list[dict]:
    """The rows of one successful response of ``route``: one per response (a batch call has one
    per inner request), from the response alone."""
    now = datetime.datetime.now(datetime.UTC)
    responses = result.get("responses", [result])
    return [_row(route, r, now) for r in responses]


def _row(route: str, response: dict, now: datetime.datetime) -> dict:
    samples = response["samples"]
    return {
        "time": now,
        "route": route,
        "requested_policy": response["requested_policy"],
        "policy": response["policy"],
        "model": response["model"],
        "guidance": samples[0]["guidance"] if samples else None,
        "budget": response["budget"],
        "seeds": [s["seed"] for s in samples],
        "labels": [s["label"] for s in samples],
        "nfe": [s["nfe"] for s in samples],
        "sigmas": [_sigmas(s["schedule"]) for s in samples],
        "experts": [[step["expert"] for step in s["schedule"]] for s in samples],
        "latency_ms": response["timings"].get("total_ms"),
    }


def _sigmas(schedule: list[dict]) -> list[float]:
    """Each step's sigma, then the last step's sigma_next."""
    return [step["sigma"] for step in schedule] + [schedule[-1]["sigma_next"]] if schedule else []


def reason_of(err: OSError) -> str:
    """A short tag for a write error (``EROFS``, ``ENOSPC``, ...): a metric tag, no path."""
    return errno.errorcode.get(err.errno or 0, type(err).__name__)


class TrafficLog:
    """Writes rows to Parquet files under ``directory`` from a background thread; see the module.

    ``metrics``: an object with ``written(n)``, ``dropped(n, reason)`` and ``set_failing(bool)``
    (``rldiff.serving.metrics.TrafficLogMetrics``), or None."""

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        flush_s: float = FLUSH_S,
        file_rows: int = FILE_ROWS,
        pending_rows: int = PENDING_ROWS,
        metrics=None,
    ):
        if max_bytes <= 0 or flush_s <= 0 or file_rows < 1 or pending_rows < 1:
            raise ValueError("a traffic log needs max_bytes, flush_s, file_rows, pending_rows > 0")
        self.directory = Path(directory)
        self.max_bytes, self.flush_s = max_bytes, flush_s
        self.file_rows, self.pending_rows = file_rows, pending_rows
        self.metrics = metrics
        host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40]
        self.stem = f"{host}-{os.getpid()}-{secrets.token_hex(3)}"
        self.rows: collections.deque[dict] = collections.deque()  # only the writer pops
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.files = 0
        self.written = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.error: str | None = None  # the last write's error; None once a write succeeds
        self.error_tag: str | None = None  # its errno name (EROFS, ENOSPC, ...)
        self.retry_at = 0.0  # time.monotonic() of the next try while failing
        self._report("set_failing", False)
        self.thread = threading.Thread(target=self._loop, name="traffic-log", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def add(self, rows: list[dict]) -> None:
        """Queues ``rows``; never blocks on the disk and never raises."""
        try:
            with self.lock:
                room = not self.stopping and len(self.rows) + len(rows) <= self.pending_rows
                if room:
                    self.rows.extend(rows)
                    wake = len(self.rows) >= self.file_rows
                else:  # while the disk fails, the buffer fills because of it
                    reason = "closed" if self.stopping else self.error_tag or "buffer_full"
            if not room:
                self._drop(len(rows), reason)
            elif wake:
                self.wake.set()
        except Exception:  # the log never fails a request
            logger.warning("queueing traffic log rows failed", exc_info=True)

    def log(self, route: str, result: dict) -> None:
        """Queues the rows of one successful response of ``route``; never raises."""
        try:
            rows = traffic_rows(route, result)
        except Exception:  # a response of an unexpected shape: counted, never a failed request
            logger.warning("a response could not be turned into traffic log rows", exc_info=True)
            self._drop(1, "invalid")
            return
        self.add(rows)

    def state(self) -> dict:
        """``state`` (``ok`` or ``failing``), the counts, and the last error while failing."""
        with self.lock:
            pending, dropped = len(self.rows), sum(self.dropped.values())
        return {
            "state": "failing" if self.error else "ok",
            "rows_written": self.written,
            "rows_dropped": dropped,
            "rows_pending": pending,
            "files_written": self.files,
            "error": self.error,
        }

    def flush(self, timeout_s: float = CLOSE_S) -> bool:
        """Asks for a write now and waits until the buffer is empty (True) or ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if not self.rows:
                    return True
            self.wake.set()
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = CLOSE_S) -> None:
        """Writes what is buffered (waiting at most ``timeout_s``) and stops the thread; rows
        that could not be written are counted as dropped (``shutdown``)."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
        atexit.unregister(self.close)
        self.wake.set()
        self.thread.join(timeout_s)
        if self.thread.is_alive():  # still inside a write: its rows may yet land
            logger.warning(f"the traffic log's last write did not end within {timeout_s:g} s")
            return
        with self.lock:
            left = len(self.rows)
            self.rows.clear()
        self._drop(left, "shutdown")

    def _loop(self) -> None:
        while True:
            self.wake.wait(self.flush_s)
            self.wake.clear()
            stopping = self.stopping
            if self.error and not stopping and time.monotonic() < self.retry_at:
                continue  # a failing disk is retried every flush_s, not at every wake-up
            try:
                self._write_all()
            except Exception:  # a bug, not the disk: keep the thread alive
                logger.exception("the traffic log writer failed")
            self._report("set_failing", self.error is not None)  # again: a gauge may be reset
            if stopping:
                return

    def _write_all(self) -> None:
        """Files of at most ``file_rows`` rows until the buffer is empty or a write fails."""
        while True:
            with self.lock:
                batch = list(islice(self.rows, self.file_rows))
            if not batch:
                return
            try:
                self._write(batch)
            except OSError as err:
                self._failed(err)
                return
            except (pa.ArrowException, TypeError, ValueError):
                logger.exception("traffic log rows that do not fit the schema were dropped")
                self._pop(len(batch))
                self._drop(len(batch), "invalid")
                continue
            self._pop(len(batch))
            self.written += len(batch)
            self._report("written", len(batch))
            if self.error:
                logger.warning("the traffic log writes again")
                self.error, self.error_tag = None, None
                self._report("set_failing", False)
            self._rotate()

    def _write(self, rows: list[dict]) -> None:
        """One file of ``rows``; opened before the rows are converted, so that a disk that
        refuses costs no conversion."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"traffic-{stamp}-{self.stem}-{self.files:06d}.parquet"
        temporary = self.directory / f".{name}.tmp"
        try:
            with open(temporary, "wb") as out:
                table = pa.Table.from_pylist(rows, schema=TRAFFIC_SCHEMA)
                pq.write_table(table, out, compression="zstd")
            os.replace(temporary, self.directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise
        self.files += 1

    def _rotate(self) -> None:
        """Deletes the oldest files (any writer's: names sort by time) beyond ``max_bytes``."""
        try:
            files = sorted(self.directory.glob(FILE_GLOB))
            sizes = [_size(f) for f in files]
            total = sum(sizes)
            for path, size in zip(files, sizes, strict=True):
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
        except OSError as err:
            logger.warning(f"traffic log rotation failed: {err}")

    def _failed(self, err: OSError) -> None:
        tag = reason_of(err)
        why = f"cannot write the traffic log: {err.strerror or type(err).__name__} ({tag})"
        if self.error is None:
            logger.warning(f"{why}: {err}; rows stay buffered and the write is retried")
            self._report("set_failing", True)
        self.error, self.error_tag = why, tag
        self.retry_at = time.monotonic() + self.flush_s

    def _pop(self, n: int) -> None:
        with self.lock:
            for _ in range(min(n, len(self.rows))):
                self.rows.popleft()

    def _drop(self, n: int, reason: str) -> None:
        if n <= 0:
            return
        with self.lock:
            self.dropped[reason] += n
        self._report("dropped", n, reason)

    def _report(self, what: str, *args) -> None:
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, what)(*args)
        except Exception:  # metrics never fail the log
            logger.warning("recording traffic log metrics failed", exc_info=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # deleted by another writer meanwhile
        return 0
