"""`dlm serve MODEL`: the real command in a subprocess serves an exported model on loopback (with --api-key), and
bad arguments exit with status 2 and a line naming the problem."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from dlm.cli import main

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dlm_serve_serves_an_exported_model(golden_mdlm, tmp_path):
    folder = golden_mdlm.save_pretrained(tmp_path / "model")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dlm.cli", "serve", str(folder), "--port", str(port),
                             "--api-key", "k", "--precision", "32", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "dlm serve did not come up"
            time.sleep(0.2)
        assert requests.get(url + "/v1/models").status_code == 401
        models = requests.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == "model"
        out = requests.post(url + "/v1/completions", headers={"Authorization": "Bearer k"},
                            json={"model": "model", "prompt": "And", "max_tokens": 4, "steps": 4, "seed": 0})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_serve_arguments_exit_2(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-rows", "0"]) == 2
    assert "--max-rows=0 must be a positive integer" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--first-rows", "0"]) == 2
    assert "--first-rows=0 must be a positive integer" in capsys.readouterr().err
