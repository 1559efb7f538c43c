"""The process contract: how data is corrupted, what the network's output means, and the objective.

A process is an `nn.Module` (parameter-free by default), so that learnable parts — soft-masking's w, a learnable
noise schedule — are saved, EMA'd and exported with the network, with no special case anywhere else.

What a sampler may ask of a process (and nothing else; no sampler imports a process module's internals):

    corruption           "absorbing" (tokens become `mask_id`), "uniform" (tokens become uniform random tokens),
                         "mixed" (tokens become [MASK] or uniform random tokens, GIDD; the prior is all [MASK])
                         or "none" (an autoregressive model: nothing is corrupted)
    prior(canvas, to_generate, generator)   the canvas with the positions to generate filled from the prior
    is_noise(canvas)     (B, L) bool: positions that still hold noise (absorbing: == mask_id)
    forward_logits(network, z, t, batch, inputs_embeds, *, positions, key_valid, attn_mask, kv_cache,
                   cache_update, logits_at)   raw network logits (B, L, V) on z_t: every network call of a sampler
    denoise(logits)      raw logits (..., V) -> logits of x_theta, the denoising distribution over clean tokens
                         (SUBS for MDLM / BD3-LM: [MASK] can never be predicted); float32
    alpha(t), time_of_mask_rate(rate), network_time(t)    the noise schedule's helpers
    log_score(logits, z, t), total_noise(t), noise_rate(t)  the score parameterisation (SEDD's ratios
                         p_t(z with one position set to y) / p_t(z), as log-scores) and the total noise σ̄(t) and
                         its rate σ'(t): what the score samplers (dlm/sampler/score.py) ask. SEDD gives its own;
                         SUBS (MDLM, BD3-LM) derives them (RADD); other processes have none
    reverse_probs(probs, z, t, s)   p(z_s | z_t = z) of the ancestral step t -> s given x_theta's probabilities
                         (the closed-form posterior q(z_s | z_t, x_theta); absorbing: MDLM's; uniform/mixed: theirs)
    autoregressive, block_size, default_sampler, exact_caches       capabilities
    supports(sampler) / check_sampler(sampler)   whether a sampler can sample this process, with the reason

and what training and evaluation ask: `loss(network, batch, generator)` and `nelbo(network, batch,
num_t_samples, generator)`, both returning a `LossOutput`. Batches are dicts with `input_ids` (B, L), `loss_mask`
(B, L) bool (the positions scored), optionally `attention_mask` (B, L) bool and optionally `given` (B, L) bool.

Given positions (`batch["given"]`: an SFT prompt, BOS, a chat template's text; the training-side twin of a
sampler's `Canvas` positions not `to_generate`) are context: the network sees their clean tokens, and a process
must never corrupt them and never score them, in `loss` and in `nelbo`. The one mechanism: a process noises and
scores only `corruptible(batch)` = loss_mask & ~given, most simply by starting `loss` and `nelbo` with
`batch = honour_given(batch)` (the batch whose loss_mask is that), as every process of dlm does. The contract
tests check it for every registered process.

Feedback (dlm/process/feedback.py): a process may decide the network's input from its previous prediction.
`feedback(**overrides)` is the `InputFeedback` a model trained with it is sampled with (`DiffusionLM.generate`
attaches it by default; samplers take it as `feedback=`), `loss_feedback(generator, device, always)` the one a
training batch's loss pass gets (its two-pass loss: `second_pass_inputs`). Both are None by default (plain token
inputs); soft-masking and self-conditioning are the two the library has, and they combine.

A new process is one file (in dlm/process/, or in a plugin: dlm.plugins): subclass `Process`, decorate it with
`@register_process`, give it a `from_config(cfg, description)` (description: a `ModelDescription`), a config
dataclass (`config_class`, extending `ProcessConfig`; `process=NAME` on the command line is its defaults),
`likelihood` ("bound" / "exact" / "estimate"), and the shared contract tests (tests/process/test_contract.py)
check it. Its buffers and parameters are module state: saved, EMA'd, exported, loaded and optimised (AdamW over
`optimizer_groups()`, by default every parameter) like the network's, with no special case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dlm.network.base import and_masks, padding_mask
from dlm.plugins import Registry

CORRUPTIONS = ("absorbing", "uniform", "mixed", "none")


def corruptible(batch: dict) -> torch.Tensor:
    """(B, L) bool: the positions a process may noise and score, `loss_mask` less the `given` positions (if any)."""
    given = batch.get("given")
    return batch["loss_mask"] if given is None else batch["loss_mask"] & ~given


def honour_given(batch: dict) -> dict:
    """The batch whose `loss_mask` is `corruptible(batch)`: a process that noises and scores its loss_mask (as
    every process of dlm does) then never touches a given position. The same dict when nothing is given; the
    tensors are shared, never modified."""
    if batch.get("given") is None:
        return batch
    return {**batch, "loss_mask": corruptible(batch)}


@dataclass
class ProcessConfig:
    """What every process's config holds; each process extends it with its own fields (its `config_class`)."""

    name: str = "mdlm"  # a registered process: dlm.process.PROCESSES
    mask_id: int = -1  # the [MASK] token id, recorded when training starts (-1: the tokenizer's)


@dataclass(frozen=True)
class ModelDescription:
    """What a process is told about the model it is built for (dlm.build makes it from the ModelConfig, or from an
    open checkpoint's network): enough to fill a uniform prior (vocab_size) or size a learnable part (d_model)."""

    vocab_size: int = 0  # classes of the network's output (0: not known, e.g. a process built by hand)
    d_model: int = 0  # width of the network's embeddings (0: not known)
    mask_id: int | None = None  # the [MASK] token id (None: the model has none)
    time_conditioning: bool = False  # whether the network takes the diffusion time
    context: int = 0  # tokens the network sees at once (0: not known)


LIKELIHOODS = ("bound", "exact", "estimate")
# How a report names a process's `nelbo` (perplexity(), dlm eval, the training log and its loss curve).
LIKELIHOOD_WORDS = {"bound": "an upper bound (NELBO)", "exact": "exact", "estimate": "an estimate, not a bound"}


@dataclass
class LossOutput:
    """What `loss` and `nelbo` return. nll_sum and nll_per_row are in nats: a bound on the negative log-likelihood,
    the exact NLL, or an estimate, as the process's `likelihood` says."""

    loss: torch.Tensor  # scalar to minimise: NELBO (or NLL) per scored token
    nll_sum: torch.Tensor  # scalar, detached: the summed bound in nats
    num_tokens: torch.Tensor  # scalar, detached: scored tokens
    nll_per_row: torch.Tensor | None = None  # (B,) detached: each row's part of nll_sum (they sum to it)
    tokens_per_row: torch.Tensor | None = None  # (B,) long: each row's scored tokens (they sum to num_tokens)


class Process(nn.Module):
    """Base class of every process. Subclasses set the class attributes and implement `loss` and `nelbo`."""

    name: ClassVar[str] = "base"
    corruption: ClassVar[str] = "absorbing"
    autoregressive: ClassVar[bool] = False
    default_sampler: ClassVar[str] = "ancestral_cache"
    # KV reuse that gives exactly the uncached tokens: "blockwise" (finished blocks' keys never change, a
    # block-causal process), "causal" (left-to-right decoding). Fast-dLLM's prefix/dual caches are approximate
    # for every bidirectional process and are allowed anyway (they are a speed/quality choice).
    exact_caches: ClassVar[frozenset[str]] = frozenset()
    blockwise: ClassVar[bool] = False  # generated block by block (block-causal attention, block_size tokens each)
    # A blockwise process whose first block starts right after the prompt (DiffusionGemma: the prompt is context and
    # every canvas is generated whole; `generate` left-pads prompts to a multiple of block_size), rather than on the
    # grid of block_size multiples from the sequence start that BD3-LM is trained on.
    blocks_after_prompt: ClassVar[bool] = False
    config_class: ClassVar[type] = ProcessConfig  # its own config dataclass: RunConfig.process for this process
    # What `nelbo` returns: "bound" (an upper bound on the NLL: a diffusion ELBO), "exact" (the NLL itself: an
    # autoregressive model) or "estimate" (neither: e.g. a Monte Carlo estimate of a quantity that is no bound).
    likelihood: ClassVar[str] = "bound"

    def __init__(self, mask_id: int | None = None, time_conditioning: bool = False,
                 description: ModelDescription | None = None):
        super().__init__()
        self.mask_id = mask_id
        self.time_conditioning = time_conditioning
        self.block_size: int | None = None  # tokens per block of a block-causal process; None: the whole sequence
        self.description = description  # the model it is built for (make_process sets it); None: built by hand

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg, description: ModelDescription) -> "Process":
        """Build from its `config_class` instance and the description of the model (vocabulary size, width, mask
        id, time conditioning, context). `make_process` then sets `process.description`."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise a ValueError (dlm.config.ConfigError) for a RunConfig this process cannot train; called by the
        config's validation."""

    # ------------------------------------------------------------------------------------ objective
    def loss(self, network, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        """The training loss per scored token. Given positions (`batch["given"]`) are never corrupted and never
        scored: noise and score `corruptible(batch)` only (start with `batch = honour_given(batch)`)."""
        raise NotImplementedError

    def nelbo(self, network, batch: dict, num_t_samples: int, generator) -> LossOutput:
        """Monte Carlo NELBO (exact NLL for an autoregressive process); generator: one, or a list of one per row.
        Given positions are neither corrupted nor scored, as in `loss`."""
        raise NotImplementedError

    corruptible = staticmethod(corruptible)
    honour_given = staticmethod(honour_given)

    # ------------------------------------------------------------------------------------ corruption
    def prior(self, canvas: torch.Tensor, to_generate: torch.Tensor, generator: torch.Generator | None = None
              ) -> torch.Tensor:
        """canvas (B, L) with every position in to_generate (B, L) bool drawn from the prior (a new tensor).
        generator: one, or a list of one per row. to_generate may also be (L,), the same positions in every row."""
        to_generate = to_generate.expand_as(canvas)
        if self.corruption in ("absorbing", "mixed"):  # mixed (GIDD): all noise is [MASK] at t = 1
            return torch.where(to_generate, self.mask_id, canvas)
        if self.corruption == "uniform":
            vocab = self.vocab_size
            if isinstance(generator, (list, tuple)):  # one generator per row: each row draws at its own positions
                noise = torch.zeros_like(canvas)
                for r, g in enumerate(generator):
                    noise[r, to_generate[r]] = torch.randint(vocab, (int(to_generate[r].sum()),), generator=g,
                                                             device=canvas.device)
            else:
                noise = torch.randint(vocab, canvas.shape, generator=generator, device=canvas.device)
            return torch.where(to_generate, noise, canvas)
        return canvas.clone()  # an autoregressive canvas: positions to generate are overwritten left to right

    def is_noise(self, canvas: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: positions that still hold noise. Only an absorbing process can tell by looking."""
        if self.corruption != "absorbing":
            raise ValueError(f"a '{self.corruption}' process cannot tell noise from tokens by looking at the canvas")
        return canvas == self.mask_id

    def feedback_positions(self, z: torch.Tensor, batch: dict) -> torch.Tensor:
        """(B, L) bool: the positions of a training batch's z_t that a feedback (self-conditioning, soft-masking)
        acts on: the noise positions for an absorbing process; a process whose noise cannot be told by looking
        (uniform, mixed) returns every corruptible position (`batch`'s loss_mask, given positions taken out)."""
        if self.corruption == "absorbing":
            return self.is_noise(z)
        return corruptible(batch)

    def reverse_probs(self, probs: torch.Tensor, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The ancestral step t -> s < t: p(z_s | z_t = z) = q(z_s | z_t, x_theta), (n, V) float64, from x_theta's
        probabilities probs (n, V) at positions whose token is z (n,), times t and s (n,) (s = 0: the last step).
        Absorbing (MDLM): a [MASK] stays with (1 - alpha_s) / (1 - alpha_t), else becomes v with
        (alpha_s - alpha_t) / (1 - alpha_t) x_theta[v]; a token stays. Other corruptions override it."""
        if self.corruption != "absorbing":
            raise ValueError(f"process '{self.name}' has no ancestral posterior for its '{self.corruption}' corruption")
        probs = probs.double()
        a_t, a_s = self.alpha(t.double()).double(), self.alpha(s.double()).double()
        move = ((a_s - a_t) / (1.0 - a_t))[:, None] * probs
        move[:, self.mask_id] = ((1.0 - a_s) / (1.0 - a_t))
        stay = torch.zeros_like(probs).scatter_(-1, z[:, None], 1.0)
        return torch.where((z == self.mask_id)[:, None], move, stay)

    @property
    def vocab_size(self) -> int:
        """The network's output classes, from the model description."""
        size = 0 if self.description is None else self.description.vocab_size
        if size <= 0:
            raise ValueError(f"process '{self.name}' was built without the model's vocabulary size (build it with "
                             "dlm.process.make_process(cfg, ModelDescription(vocab_size=...)))")
        return size

    # ------------------------------------------------------------------------------------ parameterisation
    def forward_logits(self, network, z: torch.Tensor, t: torch.Tensor | None, batch: dict | None = None,
                       inputs_embeds: torch.Tensor | None = None, *, positions: torch.Tensor | None = None,
                       key_valid: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None, kv_cache=None,
                       cache_update: bool | torch.Tensor = False, logits_at=None) -> torch.Tensor:
        """Raw network logits (B, L, V) on z_t (B, L) (or on `inputs_embeds` (B, L, C) standing for z_t): the one way
        samplers call the network. The rest are the network's forward arguments (dlm/network/base.py): rotary
        `positions` (L,) or (B, L); `key_valid` (B, L) bool, False on left padding, which no query attends to;
        `attn_mask` any further bool mask over (cached +) new keys; `kv_cache` and `cache_update` (True, or a (L,) /
        (B, L) mask of the positions to append); `logits_at` the positions that get logits. `batch`: a training
        batch (its `attention_mask` (B, L) marks padding keys)."""
        am = (batch or {}).get("attention_mask")
        cached = 0 if kv_cache is None else kv_cache.length
        mask = and_masks(None if am is None else am[:, None, None, :], padding_mask(key_valid, cached), attn_mask)
        return network(z if inputs_embeds is None else None, inputs_embeds=inputs_embeds,
                       t=None if t is None else self.network_time(t), attn_mask=mask, causal=self.autoregressive,
                       positions=positions, kv_cache=kv_cache, cache_update=cache_update, logits_at=logits_at)

    def denoise(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of x_theta, the denoising distribution over clean tokens, from raw network logits; float32."""
        return logits.float()

    def log_score(self, logits: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Log-scores (B, L, V) float32 from raw network logits (B, L, V) on z_t (B, L) at times t (B,): log of
        s(z)_{l,y} ≈ p_t(z with position l set to y) / p_t(z), 0 at the current token (dlm/process/score_graphs.py).
        The score samplers' door to a process; one without a score parameterisation says so."""
        raise ValueError(f"process '{self.name}' has no score parameterisation (log_score), so the score samplers "
                         "(euler, tweedie) cannot sample it; use its own samplers")

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """σ̄(t) = -log alpha_t: the total noise at time t (float64)."""
        return -torch.log(self.alpha(torch.as_tensor(t, dtype=torch.float64)))

    def noise_rate(self, t: torch.Tensor) -> torch.Tensor:
        """σ'(t) = dσ̄/dt (float64)."""
        raise ValueError(f"process '{self.name}' has no score parameterisation (noise_rate, log_score), so the "
                         "score samplers (euler, tweedie) cannot sample it; use its own samplers")

    # ------------------------------------------------------------------------------------ time
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time t."""
        raise ValueError(f"process '{self.name}' has no noise schedule")

    def time_of_mask_rate(self, rate: torch.Tensor | float) -> torch.Tensor:
        """The time t at which the noise rate 1 - alpha_t equals `rate` (any shape; float64)."""
        raise ValueError(f"process '{self.name}' has no noise schedule")

    def network_time(self, t: torch.Tensor) -> torch.Tensor | None:
        """What the network is fed as its time input: t with time conditioning, else None."""
        return t if self.time_conditioning else None

    # ------------------------------------------------------------------------------------ feedback
    def feedback(self, **overrides):
        """Sampling: the InputFeedback (dlm.process.feedback) a model trained with this process is sampled with —
        it turns each step's logits into the next call's `inputs_embeds` — or None: plain token inputs (the
        default). overrides: the feedback's sampling-time options (soft-masking's omega_s, schedule, ...)."""
        if overrides:
            raise ValueError(f"process '{self.name}' has no sampling feedback to give options to "
                             f"({', '.join(sorted(overrides))})")
        return None

    def loss_feedback(self, generator, device, always: bool = False):
        """Training: the InputFeedback this batch's loss pass is fed (after a first pass without gradients, by
        `dlm.process.feedback.second_pass_inputs`), or None: one plain pass (the default). Called once per batch
        right after z_t is drawn; a process that feeds a fraction of its batches draws its coin here from
        `generator`. always: feed it without a coin (the bound used for evaluation)."""
        return None

    # ------------------------------------------------------------------------------------ training hooks
    def log_values(self) -> dict[str, float]:
        """Scalars to log after a training step (e.g. soft-masking's w); none by default."""
        return {}

    def optimizer_groups(self) -> list[dict]:
        """AdamW parameter groups of the process's learnable parts; by default one group of all its parameters
        (the run's lr and weight decay) when it has any. Override to give them their own lr (soft-masking)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    @property
    def plain(self) -> "Process":
        """The process without optional extras (soft-masking's second pass): itself by default."""
        return self

    # ------------------------------------------------------------------------------------ capabilities
    def supports(self, sampler) -> bool:
        return self.unsupported_reason(sampler) is None

    def unsupported_reason(self, sampler) -> str | None:
        """Why `sampler` cannot sample this process, or None. A sampler declares `corruptions` (the kinds it can
        denoise) and `autoregressive` (left-to-right decoding)."""
        kinds = getattr(sampler, "corruptions", ("absorbing",))
        if getattr(sampler, "autoregressive", False) != self.autoregressive:
            return ("an autoregressive model samples left to right" if self.autoregressive else
                    "this sampler decodes left to right and needs an autoregressive model")
        if self.corruption not in kinds:
            return f"it denoises {'/'.join(kinds)} corruption, and this process's corruption is '{self.corruption}'"
        return None

    def check_sampler(self, sampler) -> None:
        """Raise a ValueError naming the process, the sampler and the reason, unless it `supports` the sampler."""
        reason = self.unsupported_reason(sampler)
        if reason is not None:
            raise ValueError(f"sampler '{getattr(sampler, 'name', type(sampler).__name__)}' cannot sample a "
                             f"'{self.name}' model: {reason}")

    def extra_repr(self) -> str:
        return f"corruption={self.corruption}, mask_id={self.mask_id}"


# Filled by discovery (dlm.plugins): every module of dlm/process/ and every installed plugin, on first read.
PROCESSES: Registry = Registry("dlm.process")


def register_process(cls: type[Process]) -> type[Process]:
    """Class decorator: make a process available by its `name` (config `process=NAME`, the CLI, the docs)."""
    if cls.likelihood not in LIKELIHOODS:
        raise ValueError(f"process '{cls.name}': likelihood must be one of {LIKELIHOODS}, not '{cls.likelihood}'")
    if cls.corruption not in CORRUPTIONS:
        raise ValueError(f"process '{cls.name}': corruption must be one of {CORRUPTIONS}, not '{cls.corruption}'")
    if cls.config_class().name != cls.name:
        raise ValueError(f"process '{cls.name}': its config_class's default name must be '{cls.name}'")
    other = PROCESSES.registered(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"two processes are registered as '{cls.name}': {other} and {cls}")
    PROCESSES[cls.name] = cls
    return cls
