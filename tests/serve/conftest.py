"""A live `dlm serve` for the tests: uvicorn in a thread on a free loopback port, serving the golden tests' tiny
random MDLM (tests/golden/cases.py: 2 layers, context 32, a 300-token tokenizer) in float32 on one thread."""

import socket
import threading
import time

import pytest
import torch

from tests.golden import cases as G


def generated_texts(model, gen) -> list[str]:
    """The generated part of each row of a `Generation`, cut at EOS and decoded as the server decodes: the tests'
    reference for a request's text."""
    eos, texts = model.tokenizer.eos_token_id, []
    for row, keep in zip(gen.tokens.tolist(), gen.generated.tolist()):
        ids = [t for t, k in zip(row, keep) if k]
        ids = ids[:ids.index(eos)] if eos in ids else ids
        texts.append(model.tokenizer.decode(ids, skip_special_tokens=True))
    return texts


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a background thread; `url` is its base address."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def engine(self):
        return self.app.state.engine


@pytest.fixture(scope="session")
def golden_mdlm():
    torch.manual_seed(0)
    return G.models()["mdlm"]


@pytest.fixture(scope="module")
def one_thread_module():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(golden_mdlm, one_thread_module):
    """The shared server (float32, batches of up to 16 rows)."""
    from dlm.serve import create_app

    with LiveServer(create_app(golden_mdlm, name="tiny", precision="32", max_body=1 << 20)) as s:
        yield s


def slow_steps(engine, seconds: float):
    """Make every engine step last at least `seconds` (a test's way to catch a request mid-flight)."""
    step = engine._step

    def slow(batch):
        time.sleep(seconds)
        return step(batch)

    engine._step = slow
    return lambda: engine.__dict__.pop("_step", None)
