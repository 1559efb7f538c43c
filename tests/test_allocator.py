"""`import dlm` keeps freed memory for reuse on glibc Linux, and DLM_KEEP_FREED_MEMORY=0 opts out."""

import os
import subprocess
import sys

import pytest

CHECK = "import dlm, dlm.allocator as a; print(a._done)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_import_sets_the_thresholds_and_env_opts_out():
    env = {k: v for k, v in os.environ.items() if k != "DLM_KEEP_FREED_MEMORY"}
    on = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", CHECK], env={**env, "DLM_KEEP_FREED_MEMORY": "0"},
                         capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "True"
    assert off.stdout.strip() == "False"
