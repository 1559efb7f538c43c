"""A package outside dlm adds a process and a sampler through the `dlm.plugins` entry point: the uniform-state
process and renoising sampler of tests/plugin_package/dlm_uniform_plugin.py (written only against the docs),
installed here as a folder with a `*.dist-info/entry_points.txt`, pass the shared contract tests with no edit
outside their file and run from the `dlm` command."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dlm.plugins
from dlm.plugins import PluginError, load_plugins
from dlm.process import PROCESSES
from dlm.sampler.registry import SAMPLERS

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(__file__).parent / "plugin_package" / "dlm_uniform_plugin.py"


def install(folder: Path, module: str = "dlm_uniform_plugin", source: str | None = None) -> Path:
    """A folder that, on sys.path / PYTHONPATH, holds an installed distribution declaring `[dlm.plugins]`."""
    folder.mkdir(parents=True, exist_ok=True)
    if source is None:
        shutil.copy(SOURCE, folder / f"{module}.py")
    else:
        (folder / f"{module}.py").write_text(source)
    info = folder / f"{module}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dlm.plugins]\nmethods = {module}\n")
    return folder


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    return install(tmp_path_factory.mktemp("site"))


def env_with(folder: Path) -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{folder}", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def dlm_command(folder: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlm.cli", *args], capture_output=True, text=True,
                          env=env_with(folder), cwd=cwd, timeout=600)


def test_load_plugins_registers_an_entry_points_module(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    try:
        assert load_plugins() == ["dlm_uniform_plugin"] and load_plugins() == []  # once
        assert PROCESSES["plugin_uniform_x0"].default_sampler == "plugin_renoise" and "plugin_renoise" in SAMPLERS
    finally:  # leave the registries as the other tests expect them
        PROCESSES.pop("plugin_uniform_x0", None)
        SAMPLERS.pop("plugin_renoise", None)
        dlm.plugins._loaded.pop("dlm_uniform_plugin", None)
        sys.modules.pop("dlm_uniform_plugin", None)


def test_a_broken_plugin_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install(tmp_path, "dlm_broken_plugin", "import no_such_module_here\n")))
    with pytest.raises(PluginError, match=r"the dlm plugin 'methods = dlm_broken_plugin' \(package dlm-broken-plugin"
                                          r".*No module named 'no_such_module_here'; fix or uninstall"):
        load_plugins()
    sys.modules.pop("dlm_broken_plugin", None)
    bad = dlm_command(tmp_path, "presets", cwd=tmp_path)  # the dlm command: one line, exit status 2
    assert bad.returncode == 2 and "failed to import" in bad.stderr and "Traceback" not in bad.stderr


def test_the_shared_contract_tests_take_the_plugins_process_and_sampler(plugin_dir):
    """The shared tests iterate over the registries: with the plugin installed they run on its classes."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                          "tests/process/test_contract.py", "tests/sampler/test_contract.py",
                          "-k", "plugin_uniform_x0 or plugin_renoise"], capture_output=True, text=True, env=env_with(plugin_dir),
                         cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    assert passed >= 14 and "skipped" not in run.stdout, run.stdout[-2000:]


def test_the_dlm_command_trains_and_samples_with_the_plugin(plugin_dir, micro_args, tmp_path):
    out = tmp_path / "uniform"
    train = dlm_command(plugin_dir, "train", *micro_args(out, "process=plugin_uniform_x0", "trainer.max_steps=3",
                                                         "trainer.val_every=3", "trainer.ckpt_every=3"), cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "training plugin_uniform_x0; validation perplexity an estimate, not a bound" in train.stdout
    sample = dlm_command(plugin_dir, "sample", str(out), "--num-samples", "2", "--length", "16", "-o", "steps=4",
                         cwd=tmp_path)  # no --sampler: the process's default_sampler, the plugin's plugin_renoise
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "--- sample 1 ---" in sample.stdout and "| plugin_renoise, 4 steps | NFE 4 |" in sample.stdout
    named = dlm_command(plugin_dir, "sample", str(out), "--sampler", "plugin_renoise", "--num-samples", "1", "--length", "16",
                        "-o", "steps=3", "-o", "t_min=0.2", "--prompt", "the", cwd=tmp_path)
    assert named.returncode == 0 and "| plugin_renoise, 3 steps | NFE 3 |" in named.stdout, named.stderr[-3000:]
    bad = dlm_command(plugin_dir, "sample", str(out), "--sampler", "plugin_renoise", "-o", "eta=0.1", cwd=tmp_path)
    assert bad.returncode == 2 and "sampler 'plugin_renoise' has no option 'eta'; its options: steps, t_max, t_min" in bad.stderr
    refused = dlm_command(plugin_dir, "sample", str(out), "--sampler", "ancestral", cwd=tmp_path)
    assert refused.returncode == 2 and "sampler 'ancestral' cannot sample a 'plugin_uniform_x0' model" in refused.stderr


@pytest.fixture
def plugin_loaded(plugin_dir, monkeypatch):
    """The plugin imported in this process (its process and sampler registered), removed again afterwards."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    load_plugins()
    yield
    PROCESSES.pop("plugin_uniform_x0", None)
    SAMPLERS.pop("plugin_renoise", None)
    dlm.plugins._loaded.pop("dlm_uniform_plugin", None)
    sys.modules.pop("dlm_uniform_plugin", None)


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order for every batch size
    yield
    torch.set_num_threads(before)


def test_the_plugins_sampler_is_batch_invariant_and_steps_rows_that_join_and_leave(plugin_loaded, tiny_network,
                                                                                   one_thread):
    """What the library's samplers are held to (tests/sampler/test_batch_invariance.py, test_step_api.py) holds for a
    sampler written only against the docs, on a uniform-state process: a request's tokens are the same alone, in a
    batch beside prompts of other lengths, and when rows join and leave a running batch (float32)."""
    import torch

    from dlm.process import ModelDescription, make_process
    from dlm.sampler import Canvas
    from dlm.sampler.registry import make_sampler
    from tests.sampler.test_step_api import run_joining_and_leaving

    V, gen_len = 13, 8
    net = tiny_network(V)
    process = make_process(PROCESSES["plugin_uniform_x0"].config_class(), ModelDescription(vocab_size=V, d_model=32))
    sampler = make_sampler("plugin_renoise", steps=5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [3, 3]]
    gens = lambda i: [torch.Generator().manual_seed(50 + i)]  # noqa: E731  (one per request)

    def canvas(rows):
        return Canvas.left_padded([prompts[i] for i in rows], gen_len, process,
                                  generator=[g for i in rows for g in gens(i)])

    with torch.no_grad():
        alone = [sampler.sample(net, process, canvas([i]), gens(i)).tokens[0, -gen_len:] for i in range(4)]
        batch = sampler.sample(net, process, canvas([2, 0, 1]), [g for i in (2, 0, 1) for g in gens(i)]).tokens
        for row, i in enumerate((2, 0, 1)):
            assert torch.equal(batch[row, -gen_len:], alone[i]), i
        # Rows 0 and 1 start together, row 2 joins after 2 steps and row 3 after 3; rows leave when done.
        got = run_joining_and_leaving(sampler, net, process, lambda i: canvas([i]), gens, (0, 1), {2: 2, 3: 3},
                                      gen_len)
    for i in range(4):
        assert torch.equal(got[i], alone[i]), i
    assert len({tuple(a.tolist()) for a in alone}) > 1  # the requests differ: the comparison can fail
