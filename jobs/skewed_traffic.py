"""Send a skewed request mix to a running rldiff service, so its traffic log holds that mix.

This script: ``--requests`` POSTs to ``/v1/generate`` on 127.0.0.1, each with ``--samples``
samples of random classes; a fraction ``--share`` of the requests ask for guidance ``--guidance``
at budget ``--budget``, the rest for a guidance scale and budget drawn uniformly from the default
mix (guidance 1, 2, 4, 7.5 x budgets 3, 4, 5, 6, 8, 10). Seeds are random (the service draws
them); the draw of conditions is seeded (``--seed``).

How to run (the README's "Learning from traffic" measurement)::

    rldiff serve --model gmm --policy runs/traffic/base/policy --traffic-log runs/traffic/log \
        --traffic-log-flush-s 1 &
    python jobs/skewed_traffic.py --port 8000          # 80 % guidance 7.5 at 4 NFE
    rldiff train --model gmm --conditions-from runs/traffic/log \
        --init-policy runs/traffic/base/policy --out runs/traffic/tuned ...

Results to expect: one line per 50 requests, then a count of the requests per (guidance,
budget); the service's traffic log (``runs/traffic/log/traffic-*.parquet``) holds one row each.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as is

from rldiff.config import BUDGETS, GUIDANCE_MIX, LOOPBACK  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=250)
    parser.add_argument("--samples", type=int, default=4, help="samples per request")
    parser.add_argument("--share", type=float, default=0.8, help="share of the skewed condition")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key-env", default="RLDIFF_API_KEY")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    url = f"http://{LOOPBACK}:{args.port}/v1/generate"
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get(args.api_key_env):
        headers["Authorization"] = f"Bearer {key}"
    sent: collections.Counter = collections.Counter()
    for i in range(args.requests):
        if rng.random() < args.share:
            guidance, budget = args.guidance, args.budget
        else:
            guidance, budget = rng.choice(GUIDANCE_MIX), rng.choice(BUDGETS)
        body = {
            "labels": [rng.randrange(10) for _ in range(args.samples)],
            "guidance": guidance,
            "budget": budget,
            "output": "array",
        }
        req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(req, timeout=60) as response:
            json.load(response)
        sent[(guidance, budget)] += 1
        if (i + 1) % 50 == 0:
            print(f"{i + 1} requests sent", flush=True)
    for (g, b), n in sorted(sent.items(), key=lambda kv: -kv[1]):
        print(f"guidance {g:g} budget {b}: {n} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
