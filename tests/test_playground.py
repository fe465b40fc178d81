"""The playground page in a real browser: Debian's headless chromium, driven by Selenium, against
the service on 127.0.0.1 (the exact mixture model, an untrained exported policy with an
evaluation beside it, an API key required). It asks for the key, compares the learned policy with
a baseline on the same seeds (images decoded, one chart mark per step, the same PNGs the API
serves), shows a refused request in words, fits a phone's width, and leaves two screenshots in
``test-artifacts/``. Without a browser the test is skipped and says why (``make browser``
installs one); with ``RLDIFF_REQUIRE_BROWSER=1`` (CI) it fails instead."""

import json
import os
import re
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from browser import chromium, find_browser, screenshot, viewport

from rldiff.core.solvers import EXPERT_NAMES

KEY = "playground-test-key-0123"
BUDGET, SEEDS, LABEL = 6, [12345, 12346], 3
BASELINE_KNOWN, BASELINE = "fixed:heun/karras", "fixed:dpmpp-2m/karras"  # in the evaluation, not
WAIT_S = 60  # the longest wait for one thing on the page


@pytest.fixture(scope="module")
def browser_paths():
    found = find_browser()
    if isinstance(found, str):
        if os.environ.get("RLDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RLDIFF_REQUIRE_BROWSER=1 but {found}")
        pytest.skip(found)
    return found


@pytest.fixture(scope="module")
def service(browser_paths, ray_local, tmp_path_factory):  # no browser: skipped before Ray starts
    """``(url, root)``: the app on 127.0.0.1, its policy ``run/policy`` (untrained, serves any
    budget) and ``run/evaluation`` with reference RMSEs for the learned policy (``moe``) and one
    hand-built schedule at budget 6."""
    from ray import serve

    from rldiff.rl.untrained import untrained_policy
    from rldiff.serving.app import build_app

    root = tmp_path_factory.mktemp("playground")
    untrained_policy(root / "run" / "policy", "gmm", (4, BUDGET))
    rows = [
        {"policy": "moe", "family": "learned", "budget": BUDGET, "guidance": float("nan"),
         "rmse_mean": 0.0512, "mean_nfe": 5.5},
        {"policy": BASELINE_KNOWN, "family": "hand-built", "budget": BUDGET,
         "guidance": float("nan"), "rmse_mean": 0.104, "mean_nfe": 6.0},
    ]  # fmt: skip
    (root / "run" / "evaluation").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "run" / "evaluation" / "results.parquet")
    (root / "run" / "evaluation" / "config.json").write_text(json.dumps({"model": "gmm"}))
    (root / "key").write_text(KEY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model": "gmm",
        "policy": "run/policy",
        "policy_root": str(root),
        "api_key_file": str(root / "key"),
        "access_log": False,
    }
    try:
        serve.run(build_app(args), name="playground", route_prefix="/")
        yield f"http://127.0.0.1:{port}", root
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def page(service, tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, what: str):
    """Polls ``script`` (JS returning a value) until it is truthy; fails after ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"waited {WAIT_S} s for {what}; page says: {text(driver, 'error')!r}")


def text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').innerText")


def fill(driver, fields: dict) -> None:
    for element_id, value in fields.items():
        driver.execute_script(
            "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('change'));",
            element_id,
            value,
        )
        assert driver.execute_script(f"return document.getElementById('{element_id}').value") == (
            value
        ), f"{element_id} has no option {value!r}"


def generate(driver) -> str:
    driver.find_element("id", "generate").click()
    return wait_for(
        driver,
        "const s = document.getElementById('results').dataset.state;"
        "return s === 'done' || s === 'error' ? s : null",
        "the comparison to finish",
    )


def test_the_playground_compares_two_policies_on_the_same_seeds(service, page, artefact):
    url, _ = service
    page.get(url + "/")  # redirects to /playground
    assert page.current_url == url + "/playground"

    # the key: asked for, a wrong one refused in words, the right one accepted
    wait_for(page, "return document.getElementById('error').innerText", "the key request")
    assert "requires an API key" in text(page, "error")
    assert not page.execute_script("return document.getElementById('key-box').hidden")
    for key in ("wrong-key-" + "x" * 10, KEY):
        page.find_element("id", "api-key").clear()
        page.find_element("id", "api-key").send_keys(key)
        page.find_element("id", "use-key").click()
        if key != KEY:
            wait_for(page, "return /refused this key/.test(document.body.innerText)", "a refusal")
    wait_for(page, "return !document.getElementById('generate').disabled", "the policies")
    assert "learned policy moe (untrained)" in text(page, "service")
    assert len(page.find_elements("css selector", "#label option")) == 11  # none + 10 classes

    fill(page, {"label": str(LABEL), "guidance": "2", "budget": str(BUDGET), "n": "2"})
    fill(page, {"seed": str(SEEDS[0]), "policy-a": "learned", "policy-b": BASELINE})
    started = time.perf_counter()
    assert generate(page) == "done", text(page, "error")
    elapsed = time.perf_counter() - started

    # each image decoded; per sample one chart mark per step; the same seeds on both sides
    cells = page.execute_script(
        """return [...document.querySelectorAll('#compare .cell.sample')].map(c => {
             const img = c.querySelector('img');
             return {side: c.dataset.side, caption: c.querySelector('figcaption').textContent,
                     decoded: img.complete && img.naturalWidth > 0, width: img.naturalWidth,
                     src: img.src, marks: c.querySelectorAll('svg.chart circle.step').length,
                     budgetCells: c.querySelectorAll('svg.chart rect.nfe').length,
                     confidence: c.querySelector('.confidence').textContent,
                     explanation: c.querySelector('.explanation').textContent};
           })"""
    )
    assert [c["side"] for c in cells] == ["A", "B", "A", "B"]
    assert all(c["decoded"] and c["width"] == 16 for c in cells), cells
    body = {"labels": LABEL, "guidance": 2.0, "seeds": SEEDS, "budget": BUDGET}
    auth = {"Authorization": f"Bearer {KEY}"}
    for side, policy in (("A", "learned"), ("B", BASELINE)):
        answer = requests.post(
            url + "/v1/generate", json={**body, "policy": policy}, headers=auth, timeout=60
        )
        samples = answer.json()["samples"]
        mine = [c for c in cells if c["side"] == side]
        for cell, sample in zip(mine, samples, strict=True):
            assert f"seed {sample['seed']}" in cell["caption"]
            assert cell["src"] == "data:image/png;base64," + sample["png_base64"]
            assert cell["marks"] == len(sample["schedule"]) >= 1
            assert cell["budgetCells"] == BUDGET
            assert cell["explanation"] == sample["explanation"]
        confidences = re.findall(r"\d\.\d\d", mine[0]["confidence"])
        assert len(confidences) == (len(samples[0]["schedule"]) if side == "A" else 0)

    summary = page.execute_script(
        "return [...document.querySelectorAll('#compare .cell.head')].map(h => h.innerText)"
    )
    assert summary[0].startswith("A: learned → moe") and summary[1].startswith(f"B: {BASELINE}")
    for head in summary:
        assert re.search(r"Latency \d+ ms in the browser · \d+ ms in the service", head), head
    assert "Reference RMSE 0.0512" in summary[0] and "not known" in summary[1]
    legend = page.execute_script(
        "return [...document.querySelectorAll('#legend .legend-item')].map(e => e.textContent)"
    )
    assert legend and set(legend) <= set(EXPERT_NAMES)
    timing = page.execute_script("return window.playground.timings.at(-1)")
    assert 0 < timing["firstImageMs"] <= timing["doneMs"] < elapsed * 1e3 + 50
    # nothing but this service was asked for anything
    elsewhere = page.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(u => !u.startsWith(location.origin + '/'))"
    )
    assert elsewhere == []
    screenshot(page, artefact("playground.png"))

    # at a phone's width: one column, nothing wider than the screen
    viewport(page, 375, 812, mobile=True)
    layout = page.execute_script(
        "return {columns: getComputedStyle(document.getElementById('compare'))"
        ".gridTemplateColumns.split(' ').length, scroll: document.documentElement.scrollWidth,"
        " width: window.innerWidth}"
    )
    assert layout["columns"] == 1 and layout["scroll"] <= layout["width"] == 375, layout
    screenshot(page, artefact("playground-phone.png"))
    page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # a refused request: the service's words on the page
    fill(page, {"budget": "99"})
    assert generate(page) == "error"
    error = text(page, "error")
    assert "Error 422 (the request was refused)" in error and "budget" in error, error
    assert "less than or equal to 20" in error, error
    severe = [e["message"] for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert not [m for m in severe if "status of 4" not in m], severe  # only the refused calls
