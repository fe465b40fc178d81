"""Benchmark: the playground's time to first image, in a real browser, on 127.0.0.1.

Run (from the repository root; about a minute; needs chromium and chromedriver, see
``make browser``):

    .venv/bin/python jobs/bench_playground.py [--repeats 20] [--model gmm] [--budget 6]

It serves ``--model`` (an UNTRAINED exported policy: its cost is a trained one's) on 127.0.0.1
with the settings ``rldiff serve`` uses, opens ``/playground`` in Debian's headless chromium
(``tests/browser.py``: no download, no host but 127.0.0.1), and ``--repeats`` times, after two
warm-up runs, asks for one sample (a new seed each time) from the learned policy and a baseline,
as a person would with Samples = 1. The page measures each comparison itself
(``window.playground.timings``, ``performance.now()``): from the click to the first image
decoded, and to both sides drawn; each request's latency in the browser and ``total_ms`` in the
service. It prints the median and the range of each, and how long the page took to load and ask
the service for its policies. No asserts; Serve and Ray are shut down at the end.

Results to expect (gmm, budget 6, 2 cores shared with other work, two runs): the page ready in
0.5-1 s; click to first image median 94 and 107 ms (range 77-207 ms over 20 each), both sides
104 and 120 ms; a request 92-102 ms in the browser, 66-69 ms of it in the service (the rest: the
proxy, the transfer, the JSON).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray socket on 127.0.0.1

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_serve import free_port  # noqa: E402
from browser import chromium, find_browser  # noqa: E402

ONE_COMPARISON = """
const done = arguments[arguments.length - 1];
document.getElementById('seed').value = String(arguments[0]);
const before = window.playground.timings.length;
document.getElementById('generate').click();
(function wait() {
  const state = document.getElementById('results').dataset.state;
  if (window.playground.timings.length > before && (state === 'done' || state === 'error')) {
    done({state, timing: window.playground.timings.at(-1),
          error: document.getElementById('error').innerText});
  } else {
    setTimeout(wait, 5);
  }
})();
"""


def spread(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.1f} ms "
        f"(range {min(values):.1f}-{max(values):.1f}, n={len(values)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", default="gmm", help="gmm (exact mixture) or embedded (UNet)")
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--baseline", default="fixed:dpmpp-2m/karras")
    args = parser.parse_args()
    found = find_browser()
    if isinstance(found, str):
        sys.exit(found)

    import ray
    import torch
    from ray import serve

    from rldiff.rl.untrained import untrained_policy
    from rldiff.serving.app import build_app, cluster_env

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    untrained_policy(Path(tmp.name) / "policy", args.model, (args.budget,))
    print(f"model {args.model}, policy UNTRAINED (fresh modules), budget {args.budget}")
    print(f"browser {found[0]}, driver {found[1]}")
    port = free_port()
    cluster_env()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    driver = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = {
            "model": args.model,
            "policy": "policy",
            "policy_root": tmp.name,
            "access_log": False,
        }
        serve.run(build_app(options), name="rldiff", route_prefix="/")
        driver = chromium(Path(tmp.name) / "profile")
        driver.set_script_timeout(120)
        started = time.perf_counter()
        driver.get(f"http://127.0.0.1:{port}/playground")
        while driver.execute_script("return document.getElementById('generate').disabled"):
            if time.perf_counter() - started > 60:
                sys.exit("the page did not load the policies in 60 s")
            time.sleep(0.01)
        ready = (time.perf_counter() - started) * 1e3
        driver.execute_script(
            "const set = (id, v) => { document.getElementById(id).value = v; };"
            "set('n', '1'); set('budget', arguments[0]); set('policy-a', 'learned');"
            "set('policy-b', arguments[1]);",
            str(args.budget),
            args.baseline,
        )
        first, both, client, service = [], [], [], []
        for i in range(args.repeats + 2):
            out = driver.execute_async_script(ONE_COMPARISON, 1000 + i)
            if out["state"] != "done":
                sys.exit(f"the comparison failed: {out['error']}")
            if i < 2:  # warm-up
                continue
            t = out["timing"]
            first.append(t["firstImageMs"])
            both.append(t["doneMs"])
            client += [r["clientMs"] for r in t["requests"]]
            service += [r["serviceMs"] for r in t["requests"]]
        print(f"page loaded, policies listed: {ready:.0f} ms (navigation to the Generate button)")
        print(f"one sample, learned vs {args.baseline}, {args.repeats} comparisons:")
        print(f"  click -> first image decoded: {spread(first)}")
        print(f"  click -> both sides drawn:    {spread(both)}")
        print(f"  request latency in browser:   {spread(client)}")
        print(f"  request total_ms in service:  {spread(service)}")
    finally:
        if driver is not None:
            driver.quit()
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()


if __name__ == "__main__":
    main()
