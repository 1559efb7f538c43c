"""Continuous batching on the step-level sampler API: one engine thread owns the model and steps every running row.

    engine = Engine(model, max_rows=64, batch_rows=16, max_queue=128)
    engine.start()
    job = Job(...)                 # a request: its rows' given tokens, its sampler, seeds, stop strings
    engine.submit(job)             # QueueFull when the queue is full (the server answers 429)
    ... job.sink receives ("snapshot" | "delta", row, payload), then ("done", results) or ("error", status, text)

Each request keeps its own canvas, step count and generators (seeded by its seed, never by its place): its rows
start (`sampler.start`) at a step boundary, or inside a running batch's step between two of the network's layers
(preemption: a forward pre-hook, so a newcomer waits for one layer of the step in progress, not the whole step),
take their first step in a call of at most `first_rows` rows of the requests admitted with them (oldest first,
ahead of the running batches), then join a running batch of the same sampler and options (`SamplerState.cat`);
rows that finish (or whose committed text reached EOS or a stop string, or whose client went away, or whose time
ran out) leave it at once (`select`). A batch holds at most `batch_rows` rows, so no step
makes a (rows x length x vocabulary) float32 temporary larger than that chunk; at most `max_rows` rows run at once
and at most `max_queue` requests wait. A row's tokens for a seed are the same alone or beside others (float32).
A job with `call` (an edit: rounds of its own) runs whole in this thread between two steps of the batches.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from dlm.pipeline import sample_seed
from dlm.sampler import Canvas
from dlm.sampler.state import SamplerState

MASK_GLYPH = "\u2591"  # how a masked position shows in a snapshot's text (light shade)


class QueueFull(Exception):
    """The engine's queue is full: the server answers 429 with Retry-After."""


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One request. rows: the given ids of each row (BOS, prompt), n rows per prompt; suffix: fixed ids after the
    generated span (fill in the middle; [] for a plain continuation); gen_length: tokens generated per row.
    sampler: a built Sampler (with the step API); key: what rows must share to step together. seeds: one per row.
    sink(message): called from the engine thread with ("snapshot", row, dict), ("delta", row, text),
    ("done", [row results]) or ("error", http status, message). snapshots / deltas: what to send per step."""

    id: str
    rows: list
    suffix: list
    gen_length: int
    sampler: object
    key: tuple
    seeds: list
    sink: object
    stop: list = field(default_factory=list)
    snapshots: bool = False
    deltas: bool = False
    timeout: float = 300.0
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the server when the client goes away
    results: dict = field(default_factory=dict)  # row -> {"text", "finish_reason", "tokens", "nfe", "ids"}
    sent: dict = field(default_factory=dict)  # row -> text already sent as deltas
    first_event: float | None = None  # monotonic time of the first snapshot or delta
    finished: bool = False
    call: object = None  # instead of rows: call(job) -> result dict, run by the engine thread between steps (edits)

    @property
    def n(self) -> int:
        return len(self.rows)

    def cancel(self) -> None:
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return now - self.submitted > self.timeout


class Batch:
    """Rows stepping together: one sampler, one SamplerState, and the (job, row) each state row belongs to."""

    def __init__(self, sampler, key, state, owners):
        self.sampler, self.key, self.state, self.owners = sampler, key, state, owners
        self.fresh = True  # rows joined since its last step (it steps next: their first snapshot waits one step)
        self.last = -1  # the engine round of its last step

    @property
    def rows(self) -> int:
        return len(self.owners)


class Engine:
    """The engine thread and its queue. model: a DiffusionLM. max_rows: rows running at once; batch_rows: rows per
    network call (a chunk); max_queue: requests waiting to start; precision: as `generate` ("auto", "bf16", "32");
    first_rows: rows of newcomers per first-step call (None: batch_rows); preempt: newcomers that arrive during a
    running batch's step take their first step inside it, between two of the network's layers (`_preempt`)."""

    def __init__(self, model, max_rows: int = 64, batch_rows: int = 16, max_queue: int = 128,
                 precision: str = "auto", first_rows: int | None = 4, preempt: bool = True):
        first_rows = batch_rows if first_rows is None else first_rows
        if min(max_rows, batch_rows, max_queue, first_rows) < 1:
            raise ValueError(f"max_rows={max_rows}, batch_rows={batch_rows}, max_queue={max_queue} and "
                             f"first_rows={first_rows} must be positive")
        self.model, self.precision = model, precision
        self.max_rows, self.batch_rows, self.max_queue = max_rows, batch_rows, max_queue
        self.first_rows = min(first_rows, batch_rows)
        self.points = preemption_points(model.network) if preempt else []  # modules a running step may pause before
        self.inside = False  # the engine is stepping newcomers inside a running step (no deeper preemption)
        self.stepper = None  # the thread stepping a running batch with the hooks in place
        self.pending: collections.deque[Job] = collections.deque()
        self.batches: list[Batch] = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closing = False
        self.stats = collections.Counter()  # steps, network calls, row calls, generated tokens, jobs by outcome
        self.latencies: collections.deque[float] = collections.deque(maxlen=64)  # seconds of recent finished jobs
        self.on_finish = None  # callback(job, outcome) for the server's metrics
        self.rounds = 0  # batch steps taken (the round-robin clock)
        self.running = threading.Event()  # cleared: the engine holds at the next step boundary (pause / resume)
        self.running.set()

    # ------------------------------------------------------------------------------------ the server's side
    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._run, name="dlm-engine", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def pause(self) -> None:
        """Hold every batch at the next step boundary (requests still queue); `resume` goes on."""
        self.running.clear()

    def resume(self) -> None:
        self.running.set()
        with self.cond:
            self.cond.notify_all()

    def submit(self, job: Job) -> None:
        """Queue a request (QueueFull when `max_queue` wait already); it starts at the next step boundary."""
        if job.n > min(self.batch_rows, self.max_rows):
            raise ValueError(f"the request needs {job.n} rows but a batch holds {min(self.batch_rows, self.max_rows)} "
                             "(--batch-rows, --max-rows): ask for fewer choices or prompts")
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting (--max-queue {self.max_queue})")
            self.pending.append(job)
            self.cond.notify_all()

    @property
    def queue_length(self) -> int:
        return len(self.pending)

    @property
    def active_rows(self) -> int:
        return sum(b.rows for b in self.batches)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one recent request's latency (at least 1)."""
        recent = list(self.latencies)
        return max(1, round(sum(recent) / len(recent))) if recent else 1

    # ------------------------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closing and not self.pending and not self.batches:
                    self.cond.wait(timeout=1.0)
                if self.closing:
                    break
            if not self.running.wait(timeout=0.1):
                continue
            self.run_once()
        for job in list(self.pending) + [j for b in self.batches for j, _ in b.owners]:
            self._fail(job, 503, "the server is shutting down")

    def run_once(self) -> None:
        """One step boundary: admit waiting requests, drop cancelled or expired rows, and step one batch — a batch
        that rows just joined, else the one that waited longest (round robin) — so a new request's first snapshot
        waits for the step in progress (with preemption: one layer of it) and its own, not for every batch (the
        engine thread's loop; a test may drive it by hand on an engine it did not start)."""
        try:
            with torch.no_grad(), self.model.autocast(self.precision):
                self._admit()
                for batch in list(self.batches):
                    self._sweep(batch)
                self._merge()
                live = [b for b in self.batches if b.rows]
                if live:  # one batch: one a request just joined, else the one that waited longest; never starve
                    overdue = [b for b in live if self.rounds - b.last > 2 * len(live)]
                    batch = min(overdue or live, key=lambda b: (not overdue and not b.fresh, b.last))
                    preemptible = not batch.fresh
                    batch.fresh, batch.last = False, self.rounds
                    self.rounds += 1
                    if preemptible and self.points:
                        self._step_preemptible(batch)
                    else:
                        self._step(batch)
        except Exception as e:  # noqa: BLE001  (a bug must fail its requests, never stop the engine)
            for batch in self.batches:
                for job, _ in batch.owners:
                    self._fail(job, 500, f"the engine failed: {type(e).__name__}: {e}")
                batch.owners = []
        self.batches = [b for b in self.batches if b.rows]

    def _step_preemptible(self, batch: Batch) -> None:
        """Step a running batch with a hook before each of the network's layers (and its output layer): a request
        that arrived meanwhile takes its first step there (`_preempt`), so it waits for one layer of the step in
        progress, not the whole step. The batch's own computation is not touched (its rows' tokens are the same)."""
        self.stepper = threading.get_ident()  # the hooks act only in this thread (another engine may share the model)
        handles = [m.register_forward_pre_hook(self._preempt) for m in self.points]
        try:
            self._step(batch)
        finally:
            self.stepper = None
            for h in handles:
                h.remove()

    def _preempt(self, module=None, args=None) -> None:
        """Inside a running batch's step: admit waiting requests and step every fresh batch (newcomers' first
        steps, in calls of at most `first_rows` rows); they merge into running batches at the next boundary.
        Nothing happens when none waits, when paused, inside such a call already, or in another thread (another
        engine stepping the same model)."""
        if self.inside or not self.pending or not self.running.is_set() or threading.get_ident() != self.stepper:
            return
        self.inside = True
        try:
            self._admit(calls=False)
            for batch in [b for b in self.batches if b.fresh and b.rows]:
                batch.fresh, batch.last = False, self.rounds
                self.rounds += 1
                self.stats["preempted_steps"] += 1
                self._step(batch)
        except Exception as e:  # noqa: BLE001  (the newcomers fail, never the batch whose step this is inside)
            for batch in [b for b in self.batches if b.fresh]:
                for job, _ in batch.owners:
                    self._fail(job, 500, f"the engine failed: {type(e).__name__}: {e}")
                batch.owners = []
        finally:
            self.inside = False

    def _merge(self) -> None:
        """Batches that have stepped (not fresh) join a batch of the same key with room, smallest first
        (`SamplerState.cat`): a request starts in a batch of its own arrivals, so its first step is not a full
        batch's, then rides with the others."""
        settled = [b for b in self.batches if b.rows and not b.fresh]
        for small in sorted(settled, key=lambda b: b.rows):
            if not small.rows:
                continue
            target = next((b for b in settled if b is not small and b.rows and b.key == small.key
                           and b.rows + small.rows <= self.batch_rows), None)
            if target is not None:
                target.state = SamplerState.cat([target.state, small.state])
                target.owners += small.owners
                small.owners = []

    def _admit(self, calls: bool = True) -> None:
        """Start waiting requests while rows are free: those of one key admitted at this boundary share new
        (fresh) batches of at most `first_rows` rows, which step next and then merge into running ones (`_merge`).
        calls=False: stop at a whole-request job (an edit), which waits for a step boundary."""
        now = time.monotonic()
        while True:
            with self.cond:
                if not self.pending:
                    return
                job = self.pending[0]
                if job.cancelled or job.expired(now):
                    self.pending.popleft()
                    self._drop(job, now)
                    continue
                if job.call is None and self.active_rows + job.n > self.max_rows or job.call is not None and not calls:
                    return
                self.pending.popleft()
            if job.call is not None:
                self._call(job)
                continue
            try:
                state = self._start(job)
            except ValueError as e:  # options the sampler refuses only when it sees the canvas
                self._fail(job, 400, str(e))
                continue
            except Exception as e:  # noqa: BLE001  (one bad request must not stop the engine)
                self._fail(job, 500, f"{type(e).__name__}: {e}")
                continue
            owners = [(job, j) for j in range(job.n)]
            home = next((b for b in self.batches if b.fresh and b.key == job.key and b.rows + job.n <= self.first_rows),
                        None)  # requests admitted together start together; they join a running batch after one step
            if home is None:
                home = Batch(job.sampler, job.key, state, owners)
                self.batches.append(home)
            else:
                home.state = SamplerState.cat([home.state, state])
                home.owners += owners
            home.fresh = True

    def _call(self, job: Job) -> None:
        """A whole-request job (an edit: its own rounds of network calls) run here, between two steps of the
        batches, so that one thread still owns the model."""
        try:
            result = job.call(job)
        except ValueError as e:
            self._fail(job, 400, str(e))
            return
        except Exception as e:  # noqa: BLE001
            self._fail(job, 500, f"{type(e).__name__}: {e}")
            return
        if job.cancelled or job.expired(time.monotonic()):
            self._drop(job, time.monotonic())
            return
        job.finished = True
        self.stats["row_calls"] += int(result.get("nfe", 0))
        self.stats["network_calls"] += int(result.get("nfe", 0))
        self.latencies.append(time.monotonic() - job.submitted)
        job.sink(("done", [result]))
        self._outcome(job, "ok")

    def snapshot_of(self, ids: list[int], masked: list[bool]) -> tuple[str, list]:
        """(text with every masked position shown as MASK_GLYPH, each position's text or None where masked)."""
        tok = self.model.tokenizer
        pieces = [None if m else tok.decode([i]) for i, m in zip(ids, masked)]
        parts, run = [], []
        for i, m in zip(ids, masked):
            if m:
                if run:
                    parts.append(tok.decode(run, skip_special_tokens=True))
                    run = []
                parts.append(MASK_GLYPH)
            else:
                run.append(i)
        if run:
            parts.append(tok.decode(run, skip_special_tokens=True))
        return "".join(parts), pieces

    def _start(self, job: Job) -> SamplerState:
        """The request's own state: its canvas (prompt, the prior on gen_length positions, the suffix) and one
        generator per row seeded by the request's seed and the row's sample index."""
        model, device = self.model, self.model.device
        gens = [torch.Generator(device=device).manual_seed(s) for s in job.seeds]
        canvas = Canvas.left_padded(job.rows, job.gen_length, model.process, model.tokenizer.pad_token_id, device,
                                    gens)
        if job.suffix:  # fill in the middle: the suffix is given after the generated span
            tail = torch.tensor(job.suffix, device=device).expand(job.n, -1)
            tokens = torch.cat([canvas.tokens, tail], 1)
            to_gen = torch.cat([canvas.to_generate, torch.zeros_like(tail, dtype=torch.bool)], 1)
            valid = None if canvas.key_valid is None else torch.cat([canvas.key_valid, torch.ones_like(to_gen[:, -tail.shape[1]:])], 1)
            positions = None if canvas.positions is None else torch.cat(
                [canvas.positions, canvas.positions[:, -1:] + 1 + torch.arange(tail.shape[1], device=device)], 1)
            canvas = Canvas(tokens, to_gen, valid, positions)
        state = job.sampler.start(model.network, model.process, canvas, gens)
        state.confidence = True
        return state

    def _sweep(self, batch: Batch) -> None:
        """Rows of cancelled or expired requests leave the batch before its next step."""
        now = time.monotonic()
        gone = [r for r, (job, _) in enumerate(batch.owners) if job.cancelled or job.expired(now) or job.finished]
        if not gone:
            return
        for job in {batch.owners[r][0] for r in gone}:
            self._drop(job, now)
        self._keep(batch, [r for r in range(batch.rows) if r not in set(gone)])

    def _drop(self, job: Job, now: float) -> None:
        if job.finished:
            return
        if job.cancelled:
            job.finished = True
            self._outcome(job, "cancelled")
        else:
            self._fail(job, 504, f"the request ran past the server's time limit ({job.timeout:g} s, "
                                 "--request-timeout); ask for fewer tokens or steps")

    def _keep(self, batch: Batch, rows: list[int]) -> None:
        if len(rows) == batch.rows:
            return
        if rows:
            batch.state = batch.state.select(torch.tensor(rows, dtype=torch.long))
        batch.owners = [batch.owners[r] for r in rows]

    def _step(self, batch: Batch) -> None:
        calls = batch.state.calls
        try:
            batch.state, event = batch.sampler.step(batch.state)
        except Exception as e:  # noqa: BLE001  (the batch's requests fail; the engine keeps serving)
            for job in {j for j, _ in batch.owners}:
                self._fail(job, 500, f"sampling failed: {type(e).__name__}: {e}")
            batch.owners = []
            return
        state = batch.state
        self.stats["steps"] += 1
        self.stats["network_calls"] += state.calls - calls
        tokens = state.tokens.cpu()
        gen = state.to_generate.cpu()
        noise = self._noise(state, gen)
        committed = event.committed.cpu() if event.committed is not None else torch.zeros_like(gen)
        confidence = event.confidence.float().cpu() if event.confidence is not None else None
        done = state.done.cpu().clone()
        for r, (job, j) in enumerate(batch.owners):
            if job.finished:
                continue
            ids = tokens[r][gen[r]].tolist()
            masked = noise[r][gen[r]].tolist()
            nfe = int(state.nfe_per_row[r])
            if job.snapshots:
                self._snapshot(job, j, ids, masked, committed[r][gen[r]], None if confidence is None
                               else confidence[r][gen[r]], int(state.step[r]), nfe)
            stop = self._prefix(job, j, ids, masked)
            if stop or bool(done[r]):
                done[r] = True
                self._finish_row(job, j, ids, masked, nfe)
        finished = done.tolist()
        self._keep(batch, [r for r in range(batch.rows) if not finished[r] and not batch.owners[r][0].finished])

    def _noise(self, state: SamplerState, gen: torch.Tensor) -> torch.Tensor:
        """(B, L) bool on the CPU: positions not yet generated. Absorbing: still [MASK]; left to right (an
        autoregressive model): the generated positions past each row's step; uniform noise: none can be told."""
        process = self.model.process
        if process.corruption == "absorbing":
            return process.is_noise(state.tokens).cpu()
        if process.autoregressive:
            return (gen.long().cumsum(1) > state.step.cpu()[:, None]) & gen
        return torch.zeros_like(gen)

    # ------------------------------------------------------------------------------------ rows' text
    def _text(self, ids: list[int]) -> tuple[str, bool]:
        """(text of generated ids up to the first EOS, whether an EOS was met)."""
        eos = self.model.tokenizer.eos_token_id
        hit = eos is not None and eos in ids
        if hit:
            ids = ids[:ids.index(eos)]
        return self.model.tokenizer.decode(ids, skip_special_tokens=True), hit

    @staticmethod
    def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
        cuts = [text.find(s) for s in stop if s and s in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def _prefix(self, job: Job, j: int, ids: list[int], masked: list[bool]) -> bool:
        """Stream the committed prefix's new text (deltas) and say whether it already ends the row (EOS or a stop
        string in it). Only needed for streaming or stop strings; cheap otherwise."""
        if not (job.deltas or job.stop or self.model.tokenizer.eos_token_id is not None):
            return False
        k = masked.index(True) if True in masked else len(ids)
        eos = self.model.tokenizer.eos_token_id
        if not (job.deltas or job.stop) and eos not in ids[:k]:
            return False
        text, hit = self._text(ids[:k])
        text, stopped = self._cut(text, job.stop)
        if job.deltas and k < len(ids) and not (hit or stopped):
            text = text[:len(text) - 1] if text.endswith("\ufffd") else text  # a character cut in two: wait
        sent = job.sent.get(j, "")
        if job.deltas and len(text) > len(sent) and text.startswith(sent) and k < len(ids) and not (hit or stopped):
            job.sent[j] = text
            self._first(job)
            job.sink(("delta", j, text[len(sent):]))
        return hit or stopped

    def _snapshot(self, job, j, ids, masked, committed, confidence, step, nfe) -> None:
        text, pieces = self.snapshot_of(ids, masked)
        new = committed.nonzero().flatten().tolist()
        conf = [round(float(confidence[p]), 4) if confidence is not None else None for p in new]
        self._first(job)
        job.sink(("snapshot", j, {"text": text, "tokens": pieces, "step": step, "nfe": nfe,
                                  "masks_left": sum(masked), "committed": [[p, c] for p, c in zip(new, conf)]}))

    def _first(self, job: Job) -> None:
        if job.first_event is None:
            job.first_event = time.monotonic()

    def _finish_row(self, job: Job, j: int, ids: list[int], masked: list[bool], nfe: int) -> None:
        text, hit = self._text([i for i, m in zip(ids, masked) if not m])
        text, stopped = self._cut(text, job.stop)
        eos = self.model.tokenizer.eos_token_id
        n_tokens = ids.index(eos) if eos is not None and eos in ids else len(ids)
        job.results[j] = {"text": text, "finish_reason": "stop" if hit or stopped else "length",
                          "tokens": n_tokens, "nfe": nfe}
        if job.deltas and text.startswith(job.sent.get(j, "")) and len(text) > len(job.sent.get(j, "")):
            job.sink(("delta", j, text[len(job.sent.get(j, "")):]))
            job.sent[j] = text
        self.stats["generated_tokens"] += n_tokens
        self.stats["row_calls"] += nfe
        if len(job.results) == job.n:
            job.finished = True
            self.latencies.append(time.monotonic() - job.submitted)
            job.sink(("done", [job.results[i] for i in range(job.n)]))
            self._outcome(job, "ok")

    def _fail(self, job: Job, status: int, message: str) -> None:
        if job.finished:
            return
        job.finished = True
        job.sink(("error", status, message))
        self._outcome(job, "error" if status != 504 else "timeout")

    def _outcome(self, job: Job, outcome: str) -> None:
        self.stats[f"jobs_{outcome}"] += 1
        if self.on_finish is not None:
            self.on_finish(job, outcome)


def preemption_points(network) -> list:
    """The modules a running step may pause before: each layer of the network's longest ModuleList (its blocks)
    and its output layer (`head` or `lm_head`) where it has one; [] when it has no such list."""
    lists = [m for m in network.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not lists:
        return []
    points = list(max(lists, key=len))
    head = getattr(network, "head", None) or getattr(network, "lm_head", None)
    return points + ([head] if isinstance(head, torch.nn.Module) else [])
