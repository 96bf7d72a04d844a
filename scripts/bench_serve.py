#!/usr/bin/env python
"""Closed-loop load on the HTTP server against sequential single-image runs, in one run.

  python scripts/bench_serve.py --model var-d16 --random-init 0 --batch 4 --concurrency 8 --requests 32
  python scripts/bench_serve.py --artifacts build/var-d16-b4 --baseline-artifacts build/var-d16-b1
  python scripts/bench_serve.py --url http://127.0.0.1:8000 --baseline-artifacts build/var-d16-b1   (a running server)

First the baseline: --sequential images one after another with Pipeline.run_rows on batch-1
artifacts of the same model, in this process (after one warm-up image). Then, unless --url is
given, a local Ray Serve application over the batch-B artifacts (Ray started here, all cores);
one warm-up batch; then C client threads each send a request and wait for its answer until N
have been sent. Prints throughput (images/s), p50/p99 latency, batch fill (rows per batch /
B, from the X-Batch-* headers) and the throughput ratio, and a last `summary:` line.
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
