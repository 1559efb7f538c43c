"""The engine driven by hand, step boundary by step boundary: requests of several samplers and models arrive while
others run (joining a batch mid-flight, `SamplerState.cat`), leave when done (`select`), and each gets exactly the
text `DiffusionLM.generate` gives it alone with the same seed (float32, one thread). Plus a stop string's cut."""

import pytest
import torch

from dlm.serve.app import plan_request
from dlm.serve.batcher import Engine, Job
from dlm.serve.schemas import CompletionRequest
from tests.golden import cases as G


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
    eos, texts = model.tokenizer.eos_token_id, []
    for row, keep in zip(gen.tokens.tolist(), gen.generated.tolist()):
        ids = [t for t, k in zip(row, keep) if k]
        ids = ids[:ids.index(eos)] if eos in ids else ids
        texts.append(model.tokenizer.decode(ids, skip_special_tokens=True))
    return texts


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
