"""`dlm.memory.PeakMemory`: the peak resident memory of the process during a block (Linux CPU), reset at entry,
never lowered by a nested block; and the generation APIs and `dlm sample` report it."""

import mmap
import sys

import pytest
import torch

from dlm.memory import PeakMemory, _resident_peak_kib

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")


def fresh_pages(mib: int) -> None:
    """Make `mib` MiB resident and free them again. An anonymous mapping, written through, always takes new pages
    from the OS: a tensor may not, once an earlier test has run `dlm.allocator.keep_freed_memory()` (freed heap
    memory stays resident, and malloc serves even a 200 MiB block from it)."""
    with mmap.mmap(-1, mib << 20) as block:
        view = torch.frombuffer(block, dtype=torch.uint8)
        view.fill_(1)
        del view


def test_peak_sees_an_allocation_inside_the_block_and_forgets_one_before_it():
    fresh_pages(400)  # resident, then returned to the OS
    before = _resident_peak_kib() / 1024  # the process's peak so far: at least its resident size + 400 MiB
    with PeakMemory("cpu") as small:
        torch.ones(2**20).sum()
    with PeakMemory("cpu") as large:
        fresh_pages(200)
    assert small.mib is not None and large.mib is not None
    assert small.mib < before - 300  # reset at entry: the 400 MiB peak before the block is not counted
    assert large.mib > small.mib + 150  # the 200 MiB made resident inside the block is counted


def test_a_nested_block_does_not_lower_the_outer_peak():
    with PeakMemory("cpu") as outer:
        fresh_pages(200)
        with PeakMemory("cpu") as inner:
            torch.ones(2**20).sum()
    assert inner.mib is not None and outer.mib >= inner.mib
    with PeakMemory("cpu") as alone:
        torch.ones(2**20).sum()
    assert outer.mib > alone.mib + 150


def test_generation_reports_peak_memory(micro_run, capsys):
    import dlm
    from dlm.cli import main

    model = dlm.load(micro_run)
    gen = model.generate(num_samples=2, length=16, steps=4)
    assert gen.peak_memory_mib is not None and gen.peak_memory_mib > 10  # the interpreter and torch at least
    res = model.generate_prompted(["The"], gen_length=8, block_length=4, steps=8)
    assert res.peak_memory_mib is not None and res.peak_memory_mib > 10
    assert main(["sample", str(micro_run), "--num-samples", "1", "--steps", "4", "--length", "16"]) == 0
    assert " MiB]" in capsys.readouterr().out.splitlines()[-1]
