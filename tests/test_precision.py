"""precision=auto: bf16 autocast only where the hardware has bf16 instructions; explicit choices are obeyed."""

import warnings

import pytest
import torch

import dlm.precision as precision
from dlm.precision import use_bf16
from dlm.train.run import resolve_precision


@pytest.fixture(params=[True, False], ids=["cpu-with-bf16", "cpu-without-bf16"])
def fast_bf16(request, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: request.param)
    monkeypatch.setattr("dlm.train.run.cpu_has_fast_bf16", lambda: request.param)
    return request.param


def test_auto_follows_the_cpu_and_explicit_choices_win(fast_bf16):
    assert use_bf16("auto", "cpu") is fast_bf16
    assert use_bf16("bf16", "cpu") and not use_bf16("32", "cpu")
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if fast_bf16 else "32-true")
    assert resolve_precision("32", "cpu") == "32-true"


def test_forcing_bf16_on_a_cpu_without_it_warns(fast_bf16):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("bf16", "cpu") == "bf16-mixed"
    assert any("without bf16 instructions" in str(w.message) for w in caught) is not fast_bf16


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="valid: auto, bf16, 32"):
        use_bf16("fp16", "cpu")


def test_the_detection_reads_the_cpu_flags():
    caps = torch.cpu.get_capabilities()
    assert precision.cpu_has_fast_bf16() == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def test_pipeline_autocast_follows_auto(fast_bf16, micro_run):
    import dlm

    model = dlm.load(micro_run)
    with model.autocast("auto"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert (y.dtype == torch.bfloat16) is fast_bf16
    with model.autocast("32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
