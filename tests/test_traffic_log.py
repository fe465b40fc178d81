"""The traffic log: rows round-trip through ``TRAFFIC_SCHEMA``, rotation keeps the directory under
its bound, a read-only, full or missing directory never raises and is retried until it works, a
full buffer drops without waiting; then one service on 127.0.0.1 whose requests become rows and
whose health check says when the log cannot write."""

import errno
import time

import pytest

from rldiff.data.traffic import FILE_GLOB, TRAFFIC_SCHEMA, read_traffic
from rldiff.serving.traffic_log import TrafficLog, traffic_rows

BUDGET = 4


def response(seeds: list[int], budget: int = BUDGET, steps: int = 3) -> dict:
    """A /v1/generate response as the service answers it (what the log reads of it)."""
    sigmas = [80.0 / (k + 1) for k in range(steps)] + [0.0]
    schedule = [
        {"sigma": sigmas[k], "sigma_next": sigmas[k + 1], "expert": "unipc", "eta": 0.0, "nfe": k}
        for k in range(steps)
    ]
    samples = [
        {"seed": s, "label": s % 10, "guidance": 2.0, "nfe": budget, "schedule": schedule}
        for s in seeds
    ]
    return {
        "policy": "moe",
        "requested_policy": "learned",
        "degraded": False,
        "model": "gmm",
        "budget": budget,
        "samples": samples,
        "timings": {"queue_ms": 1.0, "sampler_ms": 2.0, "batch_samples": 3, "total_ms": 12.5},
    }


class Metrics:
    def __init__(self):
        self.counts = {"written": 0, "dropped": {}, "failing": []}

    def written(self, n):
        self.counts["written"] += n

    def dropped(self, n, reason):
        self.counts["dropped"][reason] = self.counts["dropped"].get(reason, 0) + n

    def set_failing(self, failing):
        self.counts["failing"].append(failing)


@pytest.fixture
def make_log():
    """``make_log(directory, **kwargs)``: a ``TrafficLog`` closed at the end of the test."""
    logs = []

    def make(directory, **kwargs):
        kwargs = {"max_bytes": 2**30, "flush_s": 60.0, **kwargs}
        logs.append(TrafficLog(directory, **kwargs))
        return logs[-1]

    yield make
    for log in logs:
        log.close(timeout_s=5)


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_rows_round_trip_through_the_schema(tmp_path, make_log):
    log = make_log(tmp_path / "log")
    log.log("/v1/generate", response([5, 6, 7]))
    batch = {"responses": [response([1]), response([2, 3], budget=6, steps=5)]}
    log.log("/v1/generate/batch", batch)
    assert log.flush()
    table = read_traffic(tmp_path / "log")
    assert table.schema == TRAFFIC_SCHEMA and table.num_rows == 3
    rows = table.to_pylist()
    assert [r["route"] for r in rows] == ["/v1/generate"] + ["/v1/generate/batch"] * 2
    first = rows[0]
    assert first["seeds"] == [5, 6, 7] and first["labels"] == [5, 6, 7] and first["budget"] == 4
    assert first["nfe"] == [4, 4, 4] and first["guidance"] == 2.0 and first["latency_ms"] == 12.5
    assert first["sigmas"][0] == [80.0, 40.0, 80.0 / 3, 0.0]  # each step's sigma, then the last
    assert first["experts"][0] == ["unipc"] * 3
    assert (first["policy"], first["requested_policy"], first["model"]) == ("moe", "learned", "gmm")
    assert first["time"].tzinfo is not None
    assert rows[2]["seeds"] == [2, 3] and len(rows[2]["sigmas"][1]) == 6
    assert log.state() == {
        "state": "ok",
        "rows_written": 3,
        "rows_dropped": 0,
        "rows_pending": 0,
        "files_written": 1,
        "error": None,
    }
    assert not list((tmp_path / "log").glob(".*")), "a temporary file was left"


def test_files_stay_under_the_size_bound_and_the_newest_are_kept(tmp_path, make_log):
    directory = tmp_path / "log"
    one = make_log(tmp_path / "one")
    one.log("/v1/generate", response(list(range(16))))
    assert one.flush()
    size = next((tmp_path / "one").glob(FILE_GLOB)).stat().st_size
    log = make_log(directory, max_bytes=int(size * 3.5))
    for i in range(10):
        log.log("/v1/generate", response(list(range(100 * i, 100 * i + 16))))
        assert log.flush()
    files = list(directory.glob(FILE_GLOB))
    assert 1 <= len(files) <= 3 and sum(f.stat().st_size for f in files) <= size * 3.5
    assert read_traffic(directory).column("seeds")[-1].as_py()[0] == 900  # the newest survive
    assert log.state()["rows_written"] == 10


def test_rows_per_file_are_bounded(tmp_path, make_log):
    log = make_log(tmp_path, file_rows=4)
    for i in range(10):
        log.log("/v1/generate", response([i]))
    assert log.flush()
    files = sorted(tmp_path.glob(FILE_GLOB))
    assert len(files) == 3 and read_traffic(tmp_path).column("seeds").to_pylist()[-1] == [9]


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_an_unwritable_disk_raises_nothing_and_is_retried(tmp_path, make_log, monkeypatch, code):
    import rldiff.serving.traffic_log as module

    def refuse(*args, **kwargs):
        raise OSError(code, "refused")

    metrics = Metrics()
    monkeypatch.setattr(module, "open", refuse, raising=False)
    log = make_log(tmp_path, flush_s=0.1, pending_rows=5, metrics=metrics)
    log.log("/v1/generate", response([0]))
    assert wait_for(lambda: log.state()["state"] == "failing")
    for i in range(1, 8):
        log.log("/v1/generate", response([i]))  # 5 held, 3 dropped: the disk filled the buffer
    state = log.state()
    name = errno.errorcode[code]
    assert state["rows_pending"] == 5 and state["rows_dropped"] == 3 and name in state["error"]
    assert metrics.counts["dropped"] == {name: 3} and metrics.counts["failing"][-1] is True
    assert str(tmp_path) not in state["error"]  # the health check shows it: no path
    monkeypatch.undo()  # writable again: the held rows are written at the next retry
    assert wait_for(lambda: log.state()["state"] == "ok" and log.state()["rows_written"] == 5)
    assert read_traffic(tmp_path).column("seeds").to_pylist() == [[i] for i in range(5)]
    assert metrics.counts["written"] == 5 and metrics.counts["failing"][-1] is False


def test_a_missing_directory_is_made_and_a_file_in_its_place_is_survived(tmp_path, make_log):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    log = make_log(blocked / "log", flush_s=0.1)
    log.log("/v1/generate", response([1]))
    assert wait_for(lambda: log.state()["state"] == "failing")
    assert "ENOTDIR" in log.state()["error"] or "EEXIST" in log.state()["error"]
    blocked.unlink()
    assert wait_for(lambda: log.state()["rows_written"] == 1)
    assert read_traffic(blocked / "log").num_rows == 1


def test_a_full_buffer_drops_without_waiting(tmp_path, make_log, monkeypatch):
    import rldiff.serving.traffic_log as module

    monkeypatch.setattr(module.pq, "write_table", lambda *a, **k: time.sleep(1.0))  # a slow disk
    log = make_log(tmp_path, file_rows=2, pending_rows=4)
    rows = traffic_rows("/v1/generate", response([1]))
    start = time.perf_counter()
    for _ in range(1000):
        log.add(rows)
    seconds = time.perf_counter() - start
    assert seconds < 0.5, f"adding rows took {seconds:.2f} s"
    state = log.state()
    assert state["rows_dropped"] >= 996 - 2 and log.dropped.keys() == {"buffer_full"}


def test_close_writes_what_is_held_and_counts_later_rows(tmp_path, make_log):
    log = make_log(tmp_path, flush_s=3600)
    log.log("/v1/generate", response([1, 2]))
    log.close()
    assert read_traffic(tmp_path).num_rows == 1 and not log.thread.is_alive()
    log.log("/v1/generate", response([3]))
    assert log.dropped == {"closed": 1}


def test_an_empty_directory_reads_as_an_empty_table(tmp_path):
    assert read_traffic(tmp_path).schema == TRAFFIC_SCHEMA and read_traffic(tmp_path).num_rows == 0


# --- through the service on 127.0.0.1 -------------------------------------------------------


@pytest.fixture(scope="module")
def logged_service(ray_local, tmp_path_factory):
    import requests
    from ray import serve

    from rldiff.rl.untrained import untrained_policy
    from rldiff.serving.app import build_app

    root = tmp_path_factory.mktemp("traffic")
    untrained_policy(root / "policy", "gmm", (BUDGET, 6))
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model": "gmm",
        "policy": "policy",
        "policy_root": str(root),
        "access_log": False,
        "traffic_log": str(root / "log"),
        "traffic_log_flush_s": 0.2,
    }
    try:
        serve.run(build_app(args), name="traffic", route_prefix="/")
        yield f"http://127.0.0.1:{port}", root / "log", requests.Session()
    finally:
        serve.shutdown()


def test_served_requests_become_rows(logged_service):
    url, directory, http = logged_service
    body = {"seeds": [11, 12], "labels": [3, -1], "budget": BUDGET, "output": "array"}
    answer = http.post(url + "/v1/generate", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    batch = {"requests": [{"seeds": [13], "budget": 6, "policy": "fixed:euler/karras"}]}
    assert http.post(url + "/v1/generate/batch", json=batch, timeout=60).status_code == 200
    assert http.post(url + "/v1/generate", json={"budget": 99}, timeout=60).status_code == 422
    assert wait_for(lambda: read_traffic(directory).num_rows == 2, timeout_s=10)
    first, second = read_traffic(directory).to_pylist()
    served = answer.json()
    assert first["seeds"] == [11, 12] and first["labels"] == [3, -1]
    assert first["budget"] == BUDGET and first["nfe"] == [s["nfe"] for s in served["samples"]]
    assert first["policy"] == served["policy"] and first["requested_policy"] == "learned"
    schedule = served["samples"][0]["schedule"]
    assert first["sigmas"][0] == [s["sigma"] for s in schedule] + [schedule[-1]["sigma_next"]]
    assert first["latency_ms"] > 0 and second["route"] == "/v1/generate/batch"
    assert second["policy"] == "fixed:euler/karras" and second["seeds"] == [13]
    health = http.get(url + "/v1/health", timeout=30).json()
    assert health["status"] == "ok" and health["traffic_log"]["rows_written"] == 2


def test_health_is_degraded_while_the_log_cannot_write(logged_service):
    import shutil

    url, directory, http = logged_service
    shutil.rmtree(directory, ignore_errors=True)
    directory.write_text("a file where the log's directory was")
    try:
        body = {"seeds": [21], "budget": BUDGET}
        assert http.post(url + "/v1/generate", json=body, timeout=60).status_code == 200

        def health():
            return http.get(url + "/v1/health", timeout=30).json()

        assert wait_for(lambda: health()["status"] == "degraded", timeout_s=10)
        answer = health()
        assert not answer["degraded"] and answer["traffic_log"]["state"] == "failing"
        assert "traffic log" in answer["reason"] and answer["traffic_log"]["rows_pending"] == 1
    finally:
        directory.unlink()
    assert wait_for(lambda: health()["status"] == "ok", timeout_s=10)
    assert read_traffic(directory).column("seeds").to_pylist() == [[21]]
