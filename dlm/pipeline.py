"""`DiffusionLM`: a trained model ready to use — network + process + tokenizer — with `generate`, `nelbo`
and `perplexity`. `dlm.load(path)` returns one.

    >>> import dlm
    >>> model = dlm.load("runs/demo-mdlm")
    >>> model.generate(num_samples=2, length=64, steps=64, seed=0).texts
    >>> model.generate(template="In the beginning [MASK*20] and the earth.", steps=32).texts
    >>> model.perplexity(split="test")["ppl"]
    >>> model.generate(steps=32, sampler="remdm_loop", softmask=dict(omega_s=0.5, schedule="linear")).texts
    >>> sm = dlm.load("runs/sm")  # a run trained with softmask.enabled=true
    >>> sm.generate(num_samples=2, steps=32, softmask=True).texts  # soft-masking with the learned weights
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.build import build_network, build_process, mask_id_of
from dlm.checkpoint import (CheckpointError, load_pretrained_files, network_state_from_checkpoint,
                            process_state_from_checkpoint, read_checkpoint, save_pretrained, state_under,
                            tokenizer_from_state)
from dlm.config import RunConfig
from dlm.guards import check_sampling_args
from dlm.memory import PeakMemory
from dlm.network import Transformer
from dlm.precision import use_bf16
from dlm.process import Process
from dlm.sampler import SampleOutput, Sampler, semi_autoregressive
from dlm.sampler.blockwise import BlockwiseSampler
from dlm.sampler.registry import make_sampler
from dlm.softmask import SoftMaskFeedback, build_feedback

MASK_SPAN = re.compile(r"\[MASK(?:\*(\d+))?\]")


@dataclass
class Generation:
    texts: list[str]
    tokens: torch.Tensor  # (N, L)
    nfe: int
    seconds: float
    trajectory: list[torch.Tensor]
    peak_memory_mib: float | None = None  # dlm.memory.PeakMemory: process peak RSS on a CPU, PyTorch's peak on a GPU
    generated_tokens: int | None = None  # tokens the sampler produced: the given ones (BOS, prompt, template) excluded

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (BOS, prompt and template text excluded) per second of wall time."""
        n = self.tokens.numel() if self.generated_tokens is None else self.generated_tokens
        return n / max(self.seconds, 1e-9)


@dataclass
class PromptedGeneration:
    """Continuations of prompts (`DiffusionLM.generate_prompted`): texts and tokens (N, gen_length) of the
    generated part only; nfe = network calls summed over batches; row_calls = the calls each prompt took part in,
    summed over prompts (a prompt whose block is done sits out the rest of that block's calls)."""

    texts: list[str]
    tokens: torch.Tensor  # (N, gen_length)
    nfe: int
    seconds: float
    row_calls: int
    peak_memory_mib: float | None = None  # as in Generation

    @property
    def tokens_per_nfe(self) -> float:
        """Tokens committed per network call for each sequence (1.0 = one token per step)."""
        return self.tokens.numel() / max(self.row_calls, 1)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (prompts excluded) per second of wall time."""
        return self.tokens.numel() / max(self.seconds, 1e-9)


class DiffusionLM:
    """A model built from its parts: a network (dlm.network), a process (dlm.process; soft-masking is a process too)
    and a tokenizer. cfg: the RunConfig it was trained with (saved with it; None for a model assembled by hand)."""

    def __init__(self, network: Transformer, process: Process, tokenizer, cfg: RunConfig | None = None,
                 device: str | torch.device = "cpu", trained_steps: int | None = None):
        self.network = network.eval().to(device)
        self.process = process.eval().to(device)
        self.trained_steps = trained_steps  # optimizer steps the weights had (None when unknown)
        self.cfg = cfg if cfg is not None else RunConfig(model=network.cfg)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        if network.cfg.vocab_size < len(tokenizer):
            raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                                  f"{network.cfg.vocab_size}: this tokenizer does not belong to this model")

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", use_ema: bool = True, tokenizer=None) -> "DiffusionLM":
        """Load a run folder (its exported `model/`, else `checkpoints/last.ckpt`), an exported model folder,
        or a training checkpoint (`.ckpt`). `tokenizer` replaces the stored one (it must match the model)."""
        from dlm.guards import check_device

        check_device(str(device))
        path = Path(path)
        if path.is_dir() and (path / "model" / "config.json").is_file():
            path = path / "model"
        elif path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints" / "last.ckpt").is_file():
            path = path / "checkpoints" / "last.ckpt"
        from dlm.integrity import config_from_meta, model_tokenizer

        if path.is_dir():
            meta, weights = load_pretrained_files(path)  # every file checked against the folder's integrity record
            process_state = state_under(weights, "process.")
        elif path.is_file():
            ckpt = read_checkpoint(path)
            meta = ckpt["dlm"]
            weights = network_state_from_checkpoint(ckpt, use_ema)
            process_state = process_state_from_checkpoint(ckpt, use_ema)
        else:
            raise CheckpointError(f"no model at {path}: give a run folder, an exported model folder or a .ckpt file")
        stored_tok = model_tokenizer(path, meta, tokenizer_from_state)  # checked against the stored fingerprint
        fingerprint = meta.get("tokenizer_fingerprint", "")
        cfg = config_from_meta(meta, path)  # validated like a command-line config
        weights = {k: v for k, v in weights.items() if not k.startswith("process.")}
        network = build_network(cfg)
        if cfg.model.tie_weights:
            weights.setdefault("head.weight", weights["embed.weight"])
        try:
            network.load_state_dict(weights)
        except RuntimeError as e:
            raise CheckpointError(f"the weights in {path} do not fit the network its config describes: {str(e)[:300]}") from e
        if tokenizer is not None:
            from dlm.data.tokenizer import same_tokenizer

            if fingerprint and not same_tokenizer(tokenizer, fingerprint):
                raise CheckpointError(f"the tokenizer given does not match the one {path} was trained with "
                                      "(different vocabulary, merges, special tokens, normalizer or "
                                      "pre-tokenizer); use the model's own tokenizer")
            stored_tok = tokenizer
        process = build_process(cfg, mask_id_of(cfg, stored_tok))
        try:
            process.load_state_dict(process_state)
        except RuntimeError as e:
            raise CheckpointError(f"the process weights in {path} do not fit its config: {str(e)[:300]}") from e
        steps = meta.get("trained_steps") if path.is_dir() else ckpt.get("global_step")
        return cls(network, process, stored_tok, cfg, device, steps)

    def save_pretrained(self, folder: str | Path) -> Path:
        from dlm.data.tokenizer import tokenizer_fingerprint

        extra = {"tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer)}
        if self.trained_steps is not None:
            extra["trained_steps"] = self.trained_steps
        return save_pretrained(folder, self.network, self.cfg.to_dict(), self.tokenizer, extra=extra,
                               process=self.process)

    @property
    def is_autoregressive(self) -> bool:
        return self.process.autoregressive

    @property
    def softmask(self):
        """The learned soft-masking mixer, or None for a model trained without soft-masking."""
        return getattr(self.process, "mixer", None)

    @property
    def context(self) -> int:
        return self.cfg.model.context

    def autocast(self, precision: str = "auto"):
        """bf16 autocast for "bf16", and for "auto" where the device runs bf16 fast (dlm/precision.py); else nothing."""
        if not use_bf16(precision, self.device.type):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------ canvases
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build_canvas(self, length: int, prompt: str | None = None, template: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(canvas (L,), fixed (L,)): BOS, then the prompt or the template, then masks up to `length`.

        A template is text with `[MASK]` (one token) or `[MASK*n]` (n tokens) spans to fill; everything else
        is fixed. A prompt is a prefix; the rest up to `length` is generated.
        """
        if prompt is not None and template is not None:
            raise ValueError("give either a prompt (a prefix to continue) or a template (text with [MASK*n] spans), not both")
        mask_id = self.tokenizer.mask_token_id
        ids, fixed = [self.tokenizer.bos_token_id], [True]
        if template is not None:
            pos = 0
            for m in MASK_SPAN.finditer(template):
                piece = self.encode(template[pos:m.start()])
                ids += piece
                fixed += [True] * len(piece)
                n = int(m.group(1) or 1)
                ids += [mask_id] * n
                fixed += [False] * n
                pos = m.end()
            piece = self.encode(template[pos:])
            ids += piece
            fixed += [True] * len(piece)
            if all(fixed):
                raise ValueError("the template has no [MASK] or [MASK*n] span to fill")
            length = len(ids)
        else:
            if prompt:
                piece = self.encode(prompt)
                ids += piece
                fixed += [True] * len(piece)
            if len(ids) >= length:
                raise ValueError(f"the prompt is {len(ids) - 1} tokens long (+1 BOS), leaving nothing to generate in a "
                                 f"window of {length} tokens (the model's context is {self.context}); shorten the "
                                 "prompt" + (" or raise length" if length < self.context else ""))
            ids += [mask_id] * (length - len(ids))
            fixed += [False] * (length - len(fixed))
        return torch.tensor(ids), torch.tensor(fixed)

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, num_samples: int = 1, length: int | None = None, prompt: str | None = None,
                 template: str | None = None, sampler: str | Sampler = "ancestral_cache", steps: int = 128,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, stride: int | None = None,
                 batch_size: int = 16, record_trajectory: bool = False, precision: str = "auto",
                 softmask: bool | dict | SoftMaskFeedback | None = None,
                 sampler_options: dict | None = None, block_length: int | None = None) -> Generation:
        """Generate `num_samples` texts.

        length: tokens per sample including BOS (default: the model's context). Longer than the context, a
        diffusion model generates semi-autoregressively: windows of `context` tokens advancing by `stride`
        (default context // 2). sampler: a name of dlm.sampler.registry (ancestral, ancestral_cache, first_hitting,
        remdm_cap, remdm_rescale, remdm_conf, remdm_loop, llada, blockwise; aliases ddpm, ddpm_cache) or a Sampler
        object; `generate_prompted` has the LLaDA/Fast-dLLM options by name. sampler_options: extra keywords of the named sampler
        (ReMDM: eta, t_on, t_off, alpha_on).
        softmask: True = soft-masking with the learned w; a dict overrides any of omega_s, omega_a, omega_b, k
        and picks schedule ("none" | "linear" | "stepwise"); a model trained without SM needs omega_s
        (training-free use). None/False = plain masks.
        Block by block (dlm.sampler.blockwise): always for a bd3lm model (with a KV cache; `sampler`, unless
        "blockwise", names the inner sampler), or sampler="blockwise" for MDLM (no cache). block_length: tokens
        per block (default: the bd3lm model's own); `steps` are per block; sampler_options may add inner_sampler,
        kv_cache, window, stop_at_eos, stop_entropy, entropy_window. Any length: a sliding window past the context.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be positive")
        if steps < 1:
            raise ValueError(f"steps={steps} must be a positive integer")
        check_sampling_args(length=length, stride=stride, temperature=temperature, top_p=top_p, batch_size=batch_size,
                            block_length=block_length)  # 0 or NaN would otherwise mean "default" or garbage
        length = length or self.context
        options = dict(sampler_options or {})
        feedback = self._softmask_feedback(softmask)
        if feedback is not None:
            options["feedback"] = feedback
        blockwise = not self.is_autoregressive and (isinstance(sampler, BlockwiseSampler) or (
            not isinstance(sampler, Sampler) and (self.process.name == "bd3lm" or sampler == "blockwise")))
        if blockwise and not isinstance(sampler, Sampler):
            sampler, options = "blockwise", self._blockwise_options(sampler, options, block_length)
        if not isinstance(sampler, Sampler):
            sampler = make_sampler(sampler, steps, temperature, top_p, autoregressive=self.is_autoregressive, **options)
        elif "feedback" in options:
            if not hasattr(sampler, "feedback"):
                raise ValueError(f"sampler {type(sampler).__name__} does not take soft-masking feedback")
            sampler = copy.copy(sampler)
            sampler.feedback = options["feedback"]
        if self.is_autoregressive:
            sampler.suppress_ids = [self.tokenizer.mask_token_id, self.tokenizer.pad_token_id, self.tokenizer.bos_token_id]
        window = min(length, self.context) if template is None and not blockwise else None
        canvas, fixed = self.build_canvas(window or length, prompt, template)
        if canvas.numel() > self.context and (template is not None or self.is_autoregressive) and not blockwise:
            raise ValueError(f"the {'template' if template else 'request'} needs {canvas.numel()} tokens but the "
                             f"model's context is {self.context}; shorten it")
        semi_ar = template is None and length > self.context and not blockwise
        if semi_ar and self.is_autoregressive:
            raise ValueError(f"length={length} exceeds the context ({self.context}) of this autoregressive model")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        outputs: list[SampleOutput] = []
        with self.autocast(precision), PeakMemory(self.device) as memory:
            for start in range(0, num_samples, batch_size):
                b = min(batch_size, num_samples - start)
                c = canvas.to(self.device).expand(b, -1).clone()
                f = fixed.to(self.device).expand(b, -1).clone()
                if semi_ar:
                    outputs.append(semi_autoregressive(sampler, self.network, self.process, c, length,
                                                       stride or self.context // 2, generator))
                else:
                    outputs.append(sampler.sample(self.network, self.process, c, f, generator, record_trajectory))
        tokens = torch.cat([o.tokens.cpu() for o in outputs])
        return Generation(self.decode(tokens), tokens, sum(o.nfe for o in outputs), sum(o.seconds for o in outputs),
                          [t.cpu() for o in outputs for t in o.trajectory], memory.mib,
                          generated_tokens=tokens.numel() - num_samples * int(fixed.sum()))

    def _softmask_feedback(self, softmask: bool | dict | SoftMaskFeedback | None) -> SoftMaskFeedback | None:
        """The sampling feedback a `softmask=` argument asks for: None/False = plain masks; True or {} = the learned
        w; a dict overrides omega_s, omega_a, omega_b, k, schedule; a SoftMaskFeedback is used as it is."""
        if softmask is None or softmask is False:
            return None
        if self.is_autoregressive:
            raise ValueError("soft-masking needs a masked diffusion model; this model is autoregressive")
        if isinstance(softmask, SoftMaskFeedback):
            return softmask
        overrides = {} if softmask is True else dict(softmask)
        if hasattr(self.process, "feedback"):  # a soft-masking process: its learned w
            return self.process.feedback(**overrides)
        return build_feedback(None, self.process.mask_id, **overrides)  # training-free: w chosen here

    def _blockwise_options(self, sampler: str, options: dict, block_length: int | None) -> dict:
        """Options of the "blockwise" sampler for this model: `sampler` (unless "blockwise") is the inner sampler;
        the KV cache is on for bd3lm (and impossible for MDLM); stops fill with [PAD]."""
        bd3 = self.process.name == "bd3lm"
        options = dict(options)
        if sampler != "blockwise":
            options.setdefault("inner_sampler", sampler)
        for key, default in (("block_length", block_length or (self.process.block_size if bd3 else None)),
                             ("kv_cache", bd3), ("eos_id", self.tokenizer.eos_token_id),
                             ("fill_id", self.tokenizer.pad_token_id)):
            if options.get(key) is None:
                options[key] = default
        return options

    @torch.no_grad()
    def generate_prompted(self, prompts: list[str], gen_length: int = 64, block_length: int | None = None,
                          steps: int = 64, threshold: float | None = None, factor: float | None = None,
                          temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
                          cache: str = "none", softmask: bool | dict | SoftMaskFeedback | None = None,
                          batch_size: int = 16, seed: int = 0, suppress_eos: bool = False,
                          precision: str = "auto") -> PromptedGeneration:
        """Continue each prompt with `gen_length` tokens by LLaDA-style block-wise confidence sampling
        (dlm.sampler.llada; names as in diffusers' LLaDA2 pipeline).

        block_length: tokens per block, generated left to right (default: one block of gen_length); steps: the
        count schedule's total steps (divisible by the number of blocks). threshold (in (0, 1]) or factor: Fast-dLLM
        parallel decoding instead of the count schedule. remasking: low_confidence | random | margin | entropy.
        cache: none | prefix | dual (Fast-dLLM KV caches). cfg_scale: classifier-free guidance. softmask: as in
        `generate`. suppress_eos: positions predicting EOS are committed last. Prompts of different lengths are
        left-padded in a batch; their continuations do not depend on it.
        """
        from dlm.sampler.llada import generate_llada
        from dlm.sampler.policies import make_policy

        if self.is_autoregressive:
            raise ValueError("generate_prompted samples a masked diffusion model; this model is autoregressive "
                             "(use generate(prompt=...))")
        if not prompts:
            raise ValueError("give at least one prompt")
        check_sampling_args(gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
                            cfg_scale=cfg_scale, batch_size=batch_size)
        feedback = self._softmask_feedback(softmask)
        ids = [[self.tokenizer.bos_token_id] + self.encode(p) for p in prompts]
        longest = max(len(i) for i in ids)
        if longest + gen_length > self.context:
            raise ValueError(f"the longest prompt ({longest} tokens with BOS) + gen_length={gen_length} exceeds the "
                             f"model's context ({self.context}); shorten the prompts or gen_length")
        policy = make_policy(threshold, factor)
        suppress = (self.tokenizer.eos_token_id,) if suppress_eos else ()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        outputs = []
        with self.autocast(precision), PeakMemory(self.device) as memory:
            for start in range(0, len(ids), batch_size):
                outputs.append(generate_llada(
                    self.network, self.process, ids[start:start + batch_size], gen_length, block_length, steps,
                    temperature, remasking, policy, cfg_scale, cache, feedback, suppress, generator,
                    pad_id=self.tokenizer.pad_token_id))
        tokens = torch.cat([o.tokens.cpu() for o in outputs])
        return PromptedGeneration(self.decode(tokens), tokens, sum(o.nfe for o in outputs),
                                  sum(o.seconds for o in outputs), sum(int(o.nfe_per_sequence.sum()) for o in outputs),
                                  memory.mib)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Texts of (N, L) ids; EOS (a document boundary) becomes a blank line, other special tokens vanish."""
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in tokens.tolist():
            parts, cur = [], []
            for tok in row:
                if tok == eos:
                    parts.append(cur)
                    cur = []
                else:
                    cur.append(tok)
            parts.append(cur)
            texts.append("\n\n".join(self.tokenizer.decode(p, skip_special_tokens=True).strip() for p in parts).strip())
        return texts

    # ------------------------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def nelbo(self, batch: dict, num_t_samples: int = 8, seed: int = 0, precision: str = "auto",
              softmask: bool | None = None, first_row: int = 0) -> tuple[float, int]:
        """(summed NELBO in nats, scored tokens) of a batch (see dlm.data.batch.make_batch); exact NLL for
        an autoregressive model. Deterministic for a given seed: row r's times and masks come from its own
        generator, seeded by (seed, first_row + r), so a row's bound does not depend on the batch it is in.
        softmask: bound the two-pass soft-masked denoiser (default: when the model was trained with SM); the
        same times and masks either way."""
        if num_t_samples < 1:
            raise ValueError(f"num_t_samples={num_t_samples} must be a positive integer")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        generator = [torch.Generator(device=self.device).manual_seed(row_seed(seed, first_row + r))
                     for r in range(batch["input_ids"].shape[0])]
        if softmask and self.softmask is None:
            raise ValueError("this model was trained without soft-masking: it has no learned w to bound with")
        process = self.process if softmask is None or softmask else self.process.plain
        with self.autocast(precision):
            out = process.nelbo(self.network, batch, num_t_samples, generator)
        return float(out.nll_sum), int(out.num_tokens)

    def perplexity(self, source: str = "embedded", split: str = "test", texts: list[str] | None = None,
                   num_t_samples: int = 8, seed: int = 0, batch_size: int = 16, max_rows: int | None = None,
                   precision: str = "auto", progress: bool = False, softmask: bool | None = None) -> dict:
        """Validation perplexity: exp of the per-token NELBO (an upper bound) for diffusion models, the exact
        perplexity for autoregressive ones, on a split of `source` or on given `texts`, packed like training
        (given texts: every token, the last row padded, so even one short sentence can be scored).
        softmask: as in `nelbo` (default: the soft-masked bound for a model trained with SM)."""
        from dlm.data.packing import build_token_dataset
        from dlm.data.batch import make_batch

        given_texts = texts is not None
        if not given_texts:
            from dlm.data.corpus import load_texts

            texts = load_texts(source, split=split, text_field=self.cfg.data.text_field)
        if given_texts and self.cfg.data.packing == "wrap":  # score every token of the given text, however short
            from dlm.data.packing import pack_wrap_all, tokenize_texts

            tok = self.tokenizer
            ids, am = pack_wrap_all(tokenize_texts(texts, tok), self.context, tok.bos_token_id, tok.eos_token_id,
                                    tok.pad_token_id)
            data = {"input_ids": ids, "attention_mask": am}
        else:
            data = build_token_dataset(texts, self.tokenizer, self.context, packing=self.cfg.data.packing,
                                       cache_dir=self.cfg.data.cache_dir or None)
        if num_t_samples < 1 or batch_size < 1 or (max_rows is not None and max_rows < 1):
            raise ValueError(f"num_t_samples={num_t_samples}, batch_size={batch_size} and max_rows={max_rows} must "
                             "be positive (max_rows=None: every row)")
        ids, am = data["input_ids"], data.get("attention_mask")
        if max_rows is not None:
            ids, am = ids[:max_rows], None if am is None else am[:max_rows]
        total, count = 0.0, 0
        starts = range(0, ids.shape[0], batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="perplexity", unit="batch")
        for start in starts:
            batch = make_batch(ids[start:start + batch_size].long(), None if am is None else am[start:start + batch_size])
            s, n = self.nelbo(batch, num_t_samples, seed, precision, softmask, first_row=start)
            total, count = total + s, count + n
        if count == 0:
            raise ValueError("no token to score: the text is empty")
        nll = total / count
        return {"ppl": math.exp(nll), "nll_per_token": nll, "num_tokens": count, "num_rows": int(ids.shape[0]),
                "bound": not self.is_autoregressive, "num_t_samples": 0 if self.is_autoregressive else num_t_samples,
                "seed": seed, "split": "texts" if given_texts else split,
                "softmask": bool(self.softmask is not None if softmask is None else softmask)}


def row_seed(seed: int, row: int) -> int:
    """The seed of one evaluation row's generator (times and masks of its NELBO)."""
    return (seed * 1_000_003 + row * 7_919 + 17) % (2**63 - 1)


def load(path: str | Path, device: str = "cpu", **kw) -> DiffusionLM:
    """Load a trained model: a run folder, an exported model folder or a training checkpoint."""
    return DiffusionLM.load(path, device=device, **kw)
