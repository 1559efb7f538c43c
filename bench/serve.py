"""`dlm serve` under load: N concurrent clients (1, 4, 16, 64) against a server on 127.0.0.1.

    python bench/serve.py                              # runs/demo-mdlm if trained, else a random demo-sized MDLM
    python bench/serve.py --model PATH --requests 64 --max-tokens 64 --steps 64 --clients 1,4,16,64
    python bench/serve.py --requests 96 --waves 4 --no-preempt --first-rows 16   # the engine before preemption

Each client sends streaming requests (`"diffusing": true`, so the time to the first canvas snapshot is measured)
one after another until the level's `--requests` (at least `--waves` x clients) are done. Per level: throughput
(generated tokens per second of wall time), p50 / p95 latency, p50 / p95 time to first snapshot (and its p50 over
the requests after the first wave: those arrive one by one as others finish, the steady state), the server
process's peak resident memory (it runs in this process: the bench's clients are light), and the batching gain
(16 concurrent vs 1 at a time).
Every request's seed is its index, so each level generates the same tokens. A random network of the demo model's
shape (4 layers, d_model 256, context 128, 8192-token vocabulary) costs what the trained one costs per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def demo_sized_model():
    """A random MDLM of the demo run's shape (run=demo) with the golden tests' 300-token tokenizer."""
    from dlm.build import build_network, build_process
    from dlm.config import build_config
    from dlm.pipeline import DiffusionLM
    from tests.golden.cases import tokenizer

    tok = tokenizer()
    cfg = build_config(["run=demo", "data.vocab_size=8192"])
    cfg.model.vocab_size = 8192
    torch.manual_seed(0)
    return DiffusionLM(build_network(cfg), build_process(cfg, tok.mask_token_id), tok, cfg)


def one_request(url: str, body: dict) -> dict:
    started = time.perf_counter()
    first, tokens, status = None, 0, None
    with requests.post(url + "/v1/completions", json={**body, "stream": True, "diffusing": True,
                                                      "stream_options": {"include_usage": True}},
                       stream=True, timeout=600) as r:
        status = r.status_code
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter() - started
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return {"status": status, "latency": time.perf_counter() - started, "first": first, "tokens": tokens}


def level(url: str, clients: int, total: int, body: dict) -> dict:
    jobs = iter(range(total))
    lock = threading.Lock()
    results = []

    def client():
        while True:
            with lock:
                i = next(jobs, None)
            if i is None:
                return
            results.append({**one_request(url, {**body, "seed": i}), "wave": i < clients})

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
    wall = time.perf_counter() - started
    bad = [r for r in results if r["status"] != 200]
    if bad or len(results) != total:
        raise SystemExit(f"{len(bad)} failed requests and {total - len(results)} lost at {clients} clients")
    pct = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    lat, first = [r["latency"] for r in results], [r["first"] for r in results]
    steady = [r["first"] for r in results if not r["wave"]]  # arriving one by one as others finish
    return {"clients": clients, "requests": total, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "p50": pct(lat, 50), "p95": pct(lat, 95), "first_p50": pct(first, 50), "first_p95": pct(first, 95),
            "steady_p50": pct(steady, 50) if steady else None,
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo-mdlm")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--sampler", default="ancestral", help="default ancestral (a network call every step)")
    parser.add_argument("--prompt", default="And the king said unto")
    parser.add_argument("--batch-rows", type=int, default=16)
    parser.add_argument("--first-rows", type=int, default=4, help="rows per call of newcomers' first step")
    parser.add_argument("--no-preempt", dest="preempt", action="store_false",
                        help="newcomers wait for the running step to end (the engine before preemption)")
    parser.add_argument("--waves", type=int, default=0,
                        help="each level sends at least WAVES x clients requests (so the level's steady state, "
                             "after its first wave, is measured at that many clients too; default 0: --requests)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import dlm
    from dlm.precision import describe_cpu
    from dlm.serve import create_app
    from tests.serve.conftest import LiveServer

    model = dlm.load(args.model) if Path(args.model).exists() else demo_sized_model()
    what = args.model if Path(args.model).exists() else "a random MDLM of the demo shape (runs/demo-mdlm absent)"
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "steps": args.steps, "sampler": args.sampler}
    rows = []
    app = create_app(model, max_rows=64, batch_rows=args.batch_rows, max_queue=256, first_rows=args.first_rows,
                     preempt=args.preempt)
    with LiveServer(app) as server:
        one_request(server.url, {**body, "seed": 0})  # warm-up
        for clients in [int(c) for c in args.clients.split(",")]:
            rows.append(level(server.url, clients, max(args.requests, args.waves * clients), body))
            print(f"  {clients} clients done in {rows[-1]['wall']:.1f} s", file=sys.stderr)
    print(f"model: {what}; {args.max_tokens} tokens per request, {args.steps} steps ({args.sampler}), "
          f"{args.requests} requests per level (at least {args.waves} x clients), "
          f"batches of <= {args.batch_rows} rows, "
          f"first steps in calls of <= {args.first_rows} rows, "
          + ("inside the running step (preemption)" if args.preempt else "at step boundaries (no preemption)"))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads; {describe_cpu()}")
    print()
    print("| clients | requests | tokens/s | p50 latency (s) | p95 latency (s) | first snapshot p50 (s) | p95 (s) "
          "| first snapshot p50 after the first wave (s) | peak RSS (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        steady = "-" if r["steady_p50"] is None else f"{r['steady_p50']:.3f}"
        print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.0f} | {r['p50']:.2f} | {r['p95']:.2f} "
              f"| {r['first_p50']:.3f} "
              f"| {r['first_p95']:.3f} | {steady} | {r['rss_mib']:.0f} |")
    by = {r["clients"]: r for r in rows}
    if 1 in by and 16 in by:
        print(f"\nbatching gain (16 concurrent vs one at a time): {by[16]['tokens_per_s'] / by[1]['tokens_per_s']:.2f}x "
              "throughput")
    if 1 in by and 64 in by:
        print(f"time to first snapshot, 64 concurrent vs 1: {by[64]['first_p50'] / by[1]['first_p50']:.1f}x (p50)"
              + ("" if by[64]["steady_p50"] is None else
                 f"; after the first wave of 64: {by[64]['steady_p50'] / by[1]['first_p50']:.1f}x"))


if __name__ == "__main__":
    main()
