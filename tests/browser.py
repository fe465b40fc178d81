"""Debian's chromium, headless, driven by Selenium through Debian's chromedriver: for the
playground's browser test (``tests/test_playground.py``) and its benchmark
(``jobs/bench_playground.py``). Nothing is downloaded: the driver and the browser are named
explicitly (Selenium Manager is never asked), and the browser resolves no host but 127.0.0.1.
``make browser`` installs both where they are missing (as root, with apt-get)."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

INSTALL_HINT = "`make browser` installs Debian's chromium and chromium-driver (root, apt-get)"
FLAGS = [
    "--headless=new",
    "--no-sandbox",  # root in a container has no user namespace for the sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",  # no update, field-trial or safe-browsing calls
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # nothing but loopback
]


def find_browser() -> tuple[str, str] | str:
    """``(chromium, chromedriver)`` paths, or why there are none."""
    browser = next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p)
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing += " (and the selenium package)"
    return f"no {missing} on this machine: {INSTALL_HINT}"


def chromium(user_data_dir: Path, width: int = 1280, height: int = 1000):
    """A headless chromium with a fresh profile in ``user_data_dir``; quit it when done."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager, should anything call it, stays offline
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if isinstance(found, str):
        raise RuntimeError(found)
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def viewport(driver, width: int, height: int, mobile: bool = False) -> None:
    """The page's viewport, exactly (a window size also counts the browser's frame)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )


def screenshot(driver, path: Path) -> Path:
    """The whole page, not only what the viewport shows, as a PNG at ``path``."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
