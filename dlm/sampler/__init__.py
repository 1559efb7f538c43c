"""Samplers: how text is denoised. One file per sampler, all behind `Sampler.sample(network, process, canvas)`;
each registers itself by name (dlm.sampler.registry)."""

from dlm.sampler.base import Canvas, InputFeedback, SampleOutput, Sampler, StepEvent, sample_tokens
from dlm.sampler.ancestral import AncestralSampler
from dlm.sampler.autoregressive import AutoregressiveSampler
from dlm.sampler.blockwise import BlockwiseSampler
from dlm.sampler.callbacks import ProgressBar, TrajectoryRecorder, chain_callbacks
from dlm.sampler.first_hitting import FirstHittingSampler
from dlm.sampler.llada import LLaDASampler
from dlm.sampler.registry import SAMPLERS, describe_samplers, make_sampler, register_sampler, sampler_names
from dlm.sampler.remdm import ReMDMSampler
from dlm.sampler.semi_autoregressive import semi_autoregressive

__all__ = ["AncestralSampler", "AutoregressiveSampler", "BlockwiseSampler", "Canvas", "FirstHittingSampler",
           "InputFeedback", "LLaDASampler", "ProgressBar", "ReMDMSampler", "SAMPLERS", "SampleOutput", "Sampler",
           "StepEvent", "TrajectoryRecorder", "chain_callbacks", "describe_samplers", "make_sampler",
           "register_sampler", "sample_tokens", "sampler_names", "semi_autoregressive"]
