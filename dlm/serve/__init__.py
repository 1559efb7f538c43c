"""`dlm serve`: an OpenAI-compatible HTTP server with continuous batching, denoising streams and a live page.

    from dlm.serve import create_app, serve
    serve(dlm.load("runs/demo-mdlm"), host="127.0.0.1", port=8000)    # what `dlm serve MODEL` runs

app.py: the routes (FastAPI); batcher.py: the engine thread (continuous batching on the step-level sampler API);
schemas.py: the request bodies; metrics.py: GET /metrics; page/: the web page at /. docs/serve.md describes it all.
"""

from __future__ import annotations

from dlm.serve.app import create_app
from dlm.serve.batcher import Engine, Job, QueueFull

__all__ = ["create_app", "serve", "Engine", "Job", "QueueFull"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(model, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options) -> None:
    """Serve a loaded DiffusionLM with uvicorn until interrupted (options: those of `create_app`)."""
    import uvicorn

    uvicorn.run(create_app(model, **options), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
