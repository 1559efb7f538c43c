"""The `dlm` command and training keep freed memory for reuse on glibc Linux, `import dlm` changes nothing
process-wide, and DLM_KEEP_FREED_MEMORY=0 opts out."""

import os
import subprocess
import sys

import pytest

IMPORT_ONLY = "import dlm, dlm.pipeline, dlm.allocator as a; print(a._done)"
COMMAND = "import dlm.allocator as a, dlm.cli; dlm.cli.main(['presets']); print(a._done)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_the_command_sets_the_thresholds_import_does_not_and_env_opts_out():
    env = {k: v for k, v in os.environ.items() if k != "DLM_KEEP_FREED_MEMORY"}
    run = lambda code, **extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra},  # noqa: E731
                                               capture_output=True, text=True, check=True).stdout.split()[-1]
    assert run(IMPORT_ONLY) == "False"
    assert run(COMMAND) == "True"
    assert run(COMMAND, DLM_KEEP_FREED_MEMORY="0") == "False"
