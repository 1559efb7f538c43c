"""The engine driven by hand, step boundary by step boundary: requests of several samplers and models arrive while
others run (joining a batch mid-flight, `SamplerState.cat`), leave when done (`select`), and each gets exactly the
text `DiffusionLM.generate` gives it alone with the same seed (float32, one thread). Plus a stop string's cut."""

import pytest
import torch

from dlm.serve.app import plan_request
from dlm.serve.batcher import Engine, Job
from dlm.serve.schemas import CompletionRequest
from tests.golden import cases as G
from tests.serve.conftest import generated_texts


@pytest.fixture(scope="module")
def golden(one_thread_module):
    torch.manual_seed(0)
    return G.models()


def job_of(model, body: dict, name: str, batch_rows: int = 16):
    spec = plan_request(model, CompletionRequest(**body), "completion", batch_rows=batch_rows)
    out = []
    job = Job(name, spec["rows"], spec["suffix"], spec["gen_length"], spec["sampler"], spec["key"], spec["seeds"],
              out.append, stop=CompletionRequest(**body).stops())
    return job, out


def drive(engine: Engine, arrivals: dict) -> int:
    """Run the engine by hand; arrivals[t]: jobs submitted before round t. Returns the rounds taken."""
    t = 0
    while t <= max(arrivals) or engine.batches or engine.pending:
        for job in arrivals.get(t, []):
            engine.submit(job)
        engine.run_once()
        t += 1
        assert t < 500
    return t


def reference(model, body: dict) -> list[str]:
    opts = {k: body[k] for k in ("sampler", "steps", "temperature", "block_length") if k in body}
    gen = model.generate(body["prompt"], gen_length=body["max_tokens"], seed=body["seed"], num_samples=body.get("n", 1),
                         precision="32", **opts)
    return generated_texts(model, gen)


CASES = [
    ("mdlm", {"sampler": "ancestral", "steps": 10, "temperature": 1.0}),
    ("mdlm", {"sampler": "ancestral_cache", "steps": 10}),
    ("mdlm", {"sampler": "first_hitting"}),
    ("mdlm", {"sampler": "remdm_loop", "steps": 10}),
    ("mdlm", {"sampler": "llada", "steps": 10, "block_length": 5, "temperature": 0.8}),
    ("sm", {"sampler": "ancestral", "steps": 10}),
    ("bd3lm", {"sampler": "ancestral_cache", "steps": 10}),
    ("ar", {"temperature": 1.0}),
]


@pytest.mark.parametrize("model_name,options", CASES, ids=[f"{m}-{o.get('sampler', 'own')}" for m, o in CASES])
def test_rows_joining_a_running_batch_get_their_tokens_alone(golden, model_name, options):
    model = golden[model_name]
    bodies = [{"prompt": "And the king said", "max_tokens": 10, "seed": 7, **options},
              {"prompt": "The Lord", "max_tokens": 10, "seed": 1, "n": 2, **options},
              {"prompt": "To be, or not to be", "max_tokens": 10, "seed": 3, **options},
              {"prompt": "And", "max_tokens": 10, "seed": 4, **options}]
    engine = Engine(model, max_rows=8, batch_rows=3, precision="32")  # small batches: several, and a queue
    jobs = [job_of(model, b, f"r{i}", batch_rows=3) for i, b in enumerate(bodies)]
    drive(engine, {0: [jobs[0][0]], 2: [jobs[1][0], jobs[2][0]], 3: [jobs[3][0]]})
    for body, (job, out) in zip(bodies, jobs):
        assert out[-1][0] == "done", out[-1]
        assert [r["text"] for r in out[-1][1]] == reference(model, body), body
    assert engine.stats["network_calls"] < engine.stats["row_calls"] or model_name == "ar"


def test_a_stop_string_cuts_the_text_and_ends_the_row(golden):
    model = golden["mdlm"]
    body = {"prompt": "And the king said", "max_tokens": 12, "steps": 12, "seed": 5, "sampler": "ancestral"}
    engine = Engine(model, precision="32")
    plain, out = job_of(model, body, "plain")
    drive(engine, {0: [plain]})
    text = out[-1][1][0]["text"]
    assert len(text) >= 6
    stop = text[3:5]
    cut, out = job_of(model, {**body, "stop": [stop, "\x00never"]}, "cut")
    drive(engine, {0: [cut]})
    result = out[-1][1][0]
    assert result["text"] == text[:text.index(stop)] and result["finish_reason"] == "stop"


def arrive_inside_a_step(model, engine: Engine, jobs: list) -> None:
    """Submit `jobs` the next time the network's first layer runs a call of a running (not fresh) batch: requests
    that arrive while that batch's step is in progress."""
    from dlm.serve.batcher import preemption_points

    first = preemption_points(model.network)[0]

    def hook(module, args):
        if jobs and engine.batches and not any(b.fresh for b in engine.batches) and not engine.inside:
            for job in jobs:
                engine.submit(job)
            jobs.clear()

    return first.register_forward_pre_hook(hook)


@pytest.mark.parametrize("model_name,options", CASES, ids=[f"{m}-{o.get('sampler', 'own')}" for m, o in CASES])
def test_newcomers_step_inside_a_running_step_and_get_their_tokens_alone(golden, model_name, options):
    """Requests arriving during a running batch's step take their first step inside it (between two layers),
    in calls of at most first_rows rows, before that step ends; every request's text is still `generate`'s."""
    model = golden[model_name]
    bodies = [{"prompt": "And the king said", "max_tokens": 10, "seed": 7, "n": 2, **options},
              {"prompt": "The Lord", "max_tokens": 10, "seed": 1, **options},
              {"prompt": "To be, or not to be", "max_tokens": 10, "seed": 3, "n": 2, **options},
              {"prompt": "And", "max_tokens": 10, "seed": 4, **options}]
    events, calls = [], []
    engine = Engine(model, max_rows=8, batch_rows=3, first_rows=2, precision="32")
    jobs = []
    for i, b in enumerate(bodies):
        job, out = job_of(model, b, f"r{i}", batch_rows=3)
        job.snapshots = True
        job.sink = lambda m, out=out, name=f"r{i}": (out.append(m), events.append((name, m[0])))
        jobs.append((job, out))
    step = engine._step
    engine._step = lambda batch: (calls.append((len(batch.owners), engine.inside)), step(batch))[1]
    engine.submit(jobs[0][0])
    engine.run_once()  # r0's first step (a fresh batch), then it runs
    late = [j for j, _ in jobs[1:]]
    handle = arrive_inside_a_step(model, engine, late)
    try:
        engine.run_once()  # r0's second step: r1..r3 arrive inside it and take their first step there
        assert not late, "the newcomers did not arrive"
        first = {n: events.index((n, "snapshot")) for n in ("r1", "r2", "r3")}
        r0_second = [i for i, e in enumerate(events) if e == ("r0", "snapshot")][2]  # r0's rows 0, 1, then step 2
        assert max(first.values()) < r0_second, events
        assert engine.stats["preempted_steps"] >= 2
        assert [n for n, inside in calls if inside] and all(n <= 2 for n, inside in calls if inside), calls
        drive(engine, {0: []})
    finally:
        handle.remove()
    for body, (job, out) in zip(bodies, jobs):
        assert out[-1][0] == "done", out[-1]
        assert [r["text"] for r in out[-1][1]] == reference(model, body), body


def test_first_steps_in_calls_of_first_rows_and_no_preemption_when_off(golden):
    """A burst of newcomers takes its first steps in calls of at most first_rows rows (oldest first); with
    preempt=False nothing runs inside a step; the texts are the same either way."""
    model = golden["mdlm"]
    bodies = [{"prompt": p, "max_tokens": 8, "steps": 8, "seed": i, "sampler": "ancestral"}
              for i, p in enumerate(["And the king", "The Lord", "To be", "And", "Thou shalt"])]
    texts = []
    for preempt in (True, False):
        engine = Engine(model, max_rows=8, batch_rows=4, first_rows=2, precision="32", preempt=preempt)
        calls = []
        step = engine._step
        engine._step = lambda batch: (calls.append((len(batch.owners), engine.inside,
                                                    [j.id for j, _ in batch.owners])), step(batch))[1]
        jobs = [job_of(model, b, f"r{i}", batch_rows=4) for i, b in enumerate(bodies)]
        engine.submit(jobs[0][0])
        engine.run_once()
        handle = arrive_inside_a_step(model, engine, [j for j, _ in jobs[1:]])
        try:
            drive(engine, {0: []})
        finally:
            handle.remove()
        assert calls[:2] == [(1, False, ["r0"])] * 2, calls  # r0's first step, then its second (r1..r4 arrive)
        # preempt: two calls of 2 rows inside r0's second step, oldest first; else the same calls after it, one
        # per step boundary
        assert calls[2:4] == [(2, preempt, ["r1", "r2"]), (2, preempt, ["r3", "r4"])], calls
        assert engine.stats["preempted_steps"] == (2 if preempt else 0)
        assert sum(inside for _, inside, _ in calls) == engine.stats["preempted_steps"]
        texts.append([out[-1][1][0]["text"] for _, out in jobs])
    assert texts[0] == texts[1] == [reference(model, b)[0] for b in bodies]


def test_preemption_points_are_the_blocks_then_the_output_layer(golden):
    from dlm.serve.batcher import preemption_points

    net = golden["mdlm"].network
    points = preemption_points(net)
    assert points == [*net.blocks, net.head] and len(points) == len(net.blocks) + 1
    assert preemption_points(torch.nn.Linear(2, 2)) == []  # no layer list: steps end at step boundaries only


def test_the_preemption_hook_acts_only_in_the_stepping_thread(golden):
    """Another engine's forward on the same model (another thread) must not run this engine's newcomers."""
    import threading

    model = golden["mdlm"]
    engine = Engine(model, precision="32")
    job, out = job_of(model, {"prompt": "And", "max_tokens": 4, "steps": 4, "seed": 0}, "r0")
    engine.submit(job)
    engine.stepper = threading.get_ident()
    other = threading.Thread(target=engine._preempt)
    other.start()
    other.join()
    assert engine.pending and not engine.batches and engine.stats["preempted_steps"] == 0
    with torch.no_grad():
        engine._preempt()  # the stepping thread: admitted and stepped
    assert not engine.pending and engine.stats["preempted_steps"] == 1
    assert len(engine.batches) == 1 and not engine.batches[0].fresh and engine.batches[0].state.step.tolist() == [1]
