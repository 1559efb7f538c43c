"""The sampler contract, checked for every registered sampler (and by test_toy_sampler.py for a sampler defined in
a test): fixed tokens are kept, no noise is left, NFE is counted (one step event per network call), the same seed
gives the same tokens, canvas samplers work inside the blockwise wrapper, callbacks see every step and can stop
rows, and a process refuses a sampler it does not support."""

import dataclasses
import math

import pytest
import torch

from dlm.build import describe_model
from dlm.process import PROCESSES, Autoregressive, MaskedDiffusion, make_process
from dlm.process.base import CORRUPTIONS, Process
from dlm.process.block_diffusion import BlockDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.sampler import BlockwiseSampler, Canvas, TrajectoryRecorder, chain_callbacks
from dlm.sampler import Sampler
from dlm.sampler.registry import SAMPLERS, make_sampler, register_sampler, sampler_names
from tests.toy_canvas import MASK, V, canvas_and_fixed

PROMPT_ONLY = {"llada", "autoregressive"}  # continue a prompt: the positions to generate are one suffix
WRAPPERS = {"blockwise"}
NAMES = sorted(sampler_names(aliases=False))


def options(name: str) -> dict:
    opts = {"steps": 8} if "steps" in SAMPLERS[name].options else {}
    if name == "blockwise":
        opts.update(block_length=4, steps=12)
    if name == "llada":
        opts.update(block_length=4)
    if "temperature" in SAMPLERS[name].options and name != "llada":
        opts["temperature"] = 0.9  # random draws, so determinism is a real check
    return opts


def setup(name: str, tiny_network, make=None):
    """(sampler, network, process, canvas) for a contract check of `name` (or of `make()`)."""
    sampler = make() if make is not None else make_sampler(name, **options(name))
    net = tiny_network(V, seed=3)
    if getattr(sampler, "autoregressive", False):
        canvas, fixed = canvas_and_fixed(3)
        fixed = torch.zeros_like(fixed)
        fixed[:, :4] = True  # BOS + a 3-token prompt
        return sampler, net, Autoregressive(), Canvas.from_fixed(canvas, fixed)
    if "absorbing" not in sampler.corruptions:  # e.g. uniform corruption: a registered process it serves, its prior
        process = serving_process(sampler, net)
        canvas, fixed = canvas_and_fixed(3)
        return sampler, net, process, Canvas.from_fixed(canvas, fixed, process, torch.Generator().manual_seed(0))
    mdlm = MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    if name == "llada":
        return sampler, net, mdlm, Canvas.left_padded([[0, 5, 6, 7], [0, 4], [0, 3, 9]], 8, mdlm, pad_id=2)
    if name == "blockwise":
        return sampler, net, BlockDiffusion(LogLinearSchedule(1e-3), MASK, 4), Canvas.from_fixed(*canvas_and_fixed(3))
    return sampler, net, mdlm, Canvas.from_fixed(*canvas_and_fixed(3))


def serving_process(sampler, net):
    """A registered process (dlm's or a plugin's) that `sampler` can sample, built for the toy network as
    `dlm train process=NAME` would build it (its config's defaults); its prior fills the canvas."""
    for name, cls in sorted(PROCESSES.items()):
        if cls.corruption not in sampler.corruptions or cls.autoregressive != sampler.autoregressive:
            continue
        try:
            process = make_process(cls.config_class(), describe_model(net.cfg, MASK))
        except ValueError:  # a config that needs more than its defaults (bd3lm's block size)
            continue
        if process.supports(sampler):
            return process
    pytest.skip(f"no registered process can be sampled by '{sampler.name}'")


def run(sampler, net, process, canvas, seed=0, callback=None):
    return sampler.sample(net, process, canvas, torch.Generator().manual_seed(seed), callback)


def check_output(sampler, net, process, canvas):
    out = run(sampler, net, process, canvas)
    assert out.tokens.shape == canvas.shape
    assert torch.equal(out.tokens[canvas.fixed], canvas.tokens[canvas.fixed])
    if process.corruption == "absorbing":
        assert not bool(process.is_noise(out.tokens)[canvas.to_generate].any())
    assert bool(((out.tokens >= 0) & (out.tokens < V)).all())
    assert not bool(out.stopped.any()) and out.nfe_per_row.shape == (canvas.shape[0],)


def check_nfe_and_events(sampler, net, process, canvas):
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    events = []
    try:
        out = run(sampler, net, process, canvas, callback=lambda e: events.append(
            (e.step, e.nfe, e.nfe_per_row.clone(), e.committed.clone(), e.tokens.clone())) and None)
    finally:
        hook.remove()
    assert out.nfe == len(calls) > 0
    nfes = [0] + [nfe for _, nfe, *_ in events]
    assert all(b - a in (0, 1) for a, b in zip(nfes, nfes[1:]))  # at most one call per step
    assert sum(b - a for a, b in zip(nfes, nfes[1:])) == out.nfe  # every call raised one event
    assert [step for step, *_ in events] == list(range(len(events)))
    assert bool((out.nfe_per_row <= out.nfe).all()) and int(out.nfe_per_row.max()) >= 1
    assert torch.equal(events[-1][2], out.nfe_per_row)
    for _, _, _, committed, tokens in events:  # committed positions are positions to generate, holding a token
        assert not bool((committed & canvas.fixed).any())
        if process.corruption == "absorbing":
            assert not bool(process.is_noise(tokens)[committed].any())
    assert torch.equal(events[-1][4], out.tokens) or pads_after_the_loop(sampler)


def pads_after_the_loop(sampler) -> bool:
    return isinstance(sampler, BlockwiseSampler) and sampler.fill_id is not None  # pads written after the loop


def check_determinism(sampler, net, process, canvas):
    a, b = run(sampler, net, process, canvas, seed=1), run(sampler, net, process, canvas, seed=1)
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe


def check_callback_stops_rows(sampler, net, process, canvas):
    first = []

    def stop_row_0(event):
        if not first:
            first.append((event.tokens.clone(), event.nfe_per_row.clone()))
        return torch.tensor([True] + [False] * (event.tokens.shape[0] - 1))

    out = run(sampler, net, process, canvas, callback=stop_row_0)
    tokens, per_row = first[0]
    assert out.stopped.tolist() == [True] + [False] * (canvas.shape[0] - 1)
    assert torch.equal(out.tokens[0], tokens[0]) and int(out.nfe_per_row[0]) == int(per_row[0])
    if process.corruption == "absorbing":
        assert not bool(process.is_noise(out.tokens[1:])[canvas.to_generate[1:]].any())
    everything = run(sampler, net, process, canvas, callback=lambda e: True)
    assert bool(everything.stopped.all()) and everything.nfe <= 1 + isinstance(sampler, BlockwiseSampler)


def check_recorder_and_chain(sampler, net, process, canvas):
    rec, seen = TrajectoryRecorder(), []
    out = run(sampler, net, process, canvas, callback=chain_callbacks(rec, None, lambda e: seen.append(e.step)))
    assert len(rec.canvases) == len(seen) > 0 and rec.canvases[0].shape == canvas.shape
    plain = run(sampler, net, process, canvas)
    assert torch.equal(out.tokens, plain.tokens)  # watching changes nothing


CHECKS = [check_output, check_nfe_and_events, check_determinism, check_callback_stops_rows, check_recorder_and_chain]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", NAMES)
def test_contract(tiny_network, name, check):
    check(*setup(name, tiny_network))


def blockwise_of(name: str, make=None) -> BlockwiseSampler:
    inner = make() if make is not None else make_sampler(name, **options(name))
    return BlockwiseSampler(inner, 4, kv_cache=True, steps=12 if hasattr(inner, "steps") else None)


@pytest.mark.parametrize("check", [check_output, check_nfe_and_events, check_callback_stops_rows],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", [n for n in NAMES if n not in PROMPT_ONLY | WRAPPERS
                                  and "absorbing" in getattr(SAMPLERS[n].build, "corruptions", ("absorbing",))])
def test_canvas_samplers_work_inside_the_blockwise_wrapper(tiny_network, name, check):
    _, net, _, canvas = setup(name, tiny_network)
    check(blockwise_of(name), net, BlockDiffusion(LogLinearSchedule(1e-3), MASK, 4), canvas)


class UniformNoise(Process):
    """A test-only process whose corruption is uniform (no sampler here can denoise it)."""

    name = "uniform_test"
    corruption = "uniform"


@pytest.mark.parametrize("name", NAMES)
def test_processes_refuse_what_they_do_not_support(name):
    sampler = make_sampler(name, **options(name))
    mdlm, ar, uniform = MaskedDiffusion(LogLinearSchedule(1e-3), MASK), Autoregressive(), UniformNoise(mask_id=MASK)
    for process in (mdlm, ar, uniform):
        if process.autoregressive != sampler.autoregressive:
            reason = "needs an autoregressive model" if sampler.autoregressive else "autoregressive model samples"
        elif process.corruption not in sampler.corruptions:
            reason = f"this process's corruption is '{process.corruption}'"
        else:
            process.check_sampler(sampler)
            continue
        with pytest.raises(ValueError, match=f"sampler '{name}' cannot sample a '{process.name}' model: .*{reason}"):
            process.check_sampler(sampler)


def test_samplers_refuse_an_unsupported_process_when_sampling(tiny_network):
    sampler, net, _, canvas = setup("autoregressive", tiny_network)
    with pytest.raises(ValueError, match="needs an autoregressive model"):
        run(sampler, net, MaskedDiffusion(LogLinearSchedule(1e-3), MASK), canvas)
    sampler, net, _, canvas = setup("ancestral", tiny_network)
    with pytest.raises(ValueError, match="this process's corruption is 'uniform'"):
        run(sampler, net, UniformNoise(mask_id=MASK), canvas)


# ------------------------------------------------------------------------------------------ the registry
def test_registry_describes_every_sampler_and_its_class_attributes():
    for name, spec in SAMPLERS.items():
        assert spec.description and "\n" not in spec.description
        sampler = make_sampler(name, **options(name))
        assert isinstance(sampler.corruptions, tuple) and set(sampler.corruptions) <= set(CORRUPTIONS)
        assert isinstance(sampler.autoregressive, bool) and isinstance(sampler.takes_feedback, bool)
        assert sampler.autoregressive == (name == "autoregressive")
    assert {"ddpm", "ddpm_cache"} <= set(sampler_names()) and "ddpm" not in NAMES
    assert type(make_sampler("ddpm", steps=4)) is type(make_sampler("ancestral", steps=4))
    assert make_sampler("ddpm_cache", steps=4).cache and not make_sampler("ddpm", steps=4).cache


def test_make_sampler_checks_options_and_values():
    with pytest.raises(ValueError, match=r"does not accept eta; its options: steps, temperature, top_p"):
        make_sampler("ancestral", steps=8, eta=0.1)
    with pytest.raises(ValueError, match="does not accept steps"):
        make_sampler("first_hitting", steps=8)
    for bad, match in [(dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(temperature=math.nan), "temperature"),
                       (dict(temperature=math.inf), "temperature"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_p=0.0), "top_p")]:
        for name in ("ancestral", "remdm_cap"):
            with pytest.raises(ValueError, match=match):
                make_sampler(name, **bad)
    with pytest.raises(ValueError, match="unknown sampler 'nope'; valid: .*ancestral"):
        make_sampler("nope")
    with pytest.raises(ValueError, match="block_length"):
        make_sampler("blockwise", steps=8)
    with pytest.raises(ValueError, match="top_p"):
        make_sampler("llada", top_p=0.9)


def test_cli_sampler_names_are_checked_against_the_registry_when_parsed():
    from dlm.cli import build_parser

    parser = build_parser()
    sample = parser._subparsers._group_actions[0].choices["sample"]
    action = next(a for a in sample._actions if a.dest == "sampler")
    assert action.choices is None and action.default is None  # nothing frozen; default: the model's own
    for name in NAMES:
        assert name in action.help
    for name in sampler_names():
        assert parser.parse_args(["sample", "m", "--sampler", name]).sampler == name
    register_sampler("late_sampler", dataclasses.make_dataclass("LateConfig", []))(Sampler)
    try:  # registered after the parser was built (as a plugin's would be): accepted
        assert parser.parse_args(["sample", "m", "--sampler", "late_sampler"]).sampler == "late_sampler"
    finally:
        SAMPLERS.pop("late_sampler")
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "m", "--sampler", "nope"])
