"""GET /metrics in Prometheus's text format (version 0.0.4), written by hand: counters, gauges and two histograms.

    dlm_requests_total{route,status}     responses sent, by route and HTTP status
    dlm_jobs_total{outcome}              generation requests by outcome (ok, error, timeout, cancelled)
    dlm_generated_tokens_total           tokens generated (up to each row's EOS)
    dlm_network_calls_total              network calls of the engine (the batches' NFE)
    dlm_row_nfe_total                    network calls summed over rows (each request's NFE)
    dlm_steps_total                      sampler steps taken by the engine
    dlm_queue_length / dlm_active_rows   requests waiting / rows running now
    dlm_request_seconds                  histogram: arrival to last row done
    dlm_first_event_seconds              histogram: arrival to the first streamed snapshot or delta
"""

from __future__ import annotations

import collections
import threading
import time

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
ROUTES = ("/v1/completions", "/v1/fim/completions", "/v1/chat/completions", "/v1/edits", "/v1/models", "/health",
          "/metrics", "/")


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[next((i for i, b in enumerate(BUCKETS) if value <= b), len(BUCKETS))] += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for b, c in zip((*BUCKETS, "+Inf"), self.counts):
            total += c
            out.append(f'{name}_bucket{{le="{b}"}} {total}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]


class Metrics:
    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # (route, status) -> count
        self.jobs = collections.Counter()
        self.latency, self.first = Histogram(), Histogram()

    def request(self, path: str, status: int) -> None:
        route = path if path in ROUTES else "/page" if path.startswith("/page/") else "other"
        with self.lock:
            self.requests[route, status] += 1

    def finished(self, job, outcome: str) -> None:
        """Called by the engine thread when a request ends."""
        now = time.monotonic()
        with self.lock:
            self.jobs[outcome] += 1
            if outcome == "ok":
                self.latency.observe(now - job.submitted)
            if job.first_event is not None:
                self.first.observe(job.first_event - job.submitted)

    def text(self) -> str:
        s = self.engine.stats
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        with self.lock:
            metric("dlm_requests_total", "counter", "HTTP responses by route and status",
                   [f'dlm_requests_total{{route="{r}",status="{c}"}} {n}' for (r, c), n in sorted(self.requests.items())])
            metric("dlm_jobs_total", "counter", "generation requests by outcome",
                   [f'dlm_jobs_total{{outcome="{o}"}} {self.jobs[o]}' for o in ("ok", "error", "timeout", "cancelled")])
            metric("dlm_generated_tokens_total", "counter", "tokens generated", [f"dlm_generated_tokens_total {s['generated_tokens']}"])
            metric("dlm_network_calls_total", "counter", "network calls of the engine (batch NFE)",
                   [f"dlm_network_calls_total {s['network_calls']}"])
            metric("dlm_row_nfe_total", "counter", "network calls summed over rows (request NFE)",
                   [f"dlm_row_nfe_total {s['row_calls']}"])
            metric("dlm_steps_total", "counter", "sampler steps taken", [f"dlm_steps_total {s['steps']}"])
            metric("dlm_queue_length", "gauge", "requests waiting to start", [f"dlm_queue_length {self.engine.queue_length}"])
            metric("dlm_active_rows", "gauge", "rows being denoised", [f"dlm_active_rows {self.engine.active_rows}"])
            metric("dlm_request_seconds", "histogram", "seconds from arrival to the last row done",
                   self.latency.lines("dlm_request_seconds"))
            metric("dlm_first_event_seconds", "histogram", "seconds from arrival to the first streamed event",
                   self.first.lines("dlm_first_event_seconds"))
        return "\n".join(lines) + "\n"
