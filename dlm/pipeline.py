"""`DiffusionLM`: a trained model ready to use — network + process + tokenizer — with `generate`, `nelbo`
and `perplexity`. `dlm.load(path)` returns one.

    >>> import dlm
    >>> model = dlm.load("runs/demo-mdlm")
    >>> model.generate(num_samples=2, length=64, steps=64, seed=0).texts
    >>> model.generate(template="In the beginning [MASK*20] and the earth.", steps=32).texts
    >>> model.perplexity(split="test")["ppl"]
    >>> model.generate(steps=32, sampler="remdm_loop", softmask=dict(omega_s=0.5, schedule="linear")).texts
    >>> sm = dlm.load("runs/sm")  # a run trained with softmask.enabled=true
    >>> sm.generate(num_samples=2, steps=32).texts  # soft-masking with the learned weights (its default)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dlm.build import build_network, build_process, mask_id_of, process_for_descriptor
from dlm.checkpoint import (CheckpointError, load_pretrained_files, merge_lora, network_state_from_checkpoint,
                            process_state_from_checkpoint, read_checkpoint, save_pretrained, state_under,
                            tokenizer_from_state)
from dlm.config import RunConfig
from dlm.guards import check_device, check_sampling_args
from dlm.integrity import config_from_meta, model_tokenizer
from dlm.memory import PeakMemory
from dlm.network import Transformer
from dlm.network.families import (is_open_checkpoint, load_gguf_network, load_pretrained_network,
                                  load_pretrained_tokenizer)
from dlm.precision import dtype_name, use_bf16, weight_dtype
from dlm.process import Process
from dlm.progress import StepLines, track
from dlm.progress import resolve as resolve_progress
from dlm.edit import EditResult
from dlm.generation import Generation, blockwise_options, decode_rows, given_rows, inner_options_apart
from dlm.sampler import Canvas, ProgressBar, Sampler, TrajectoryRecorder, chain_callbacks, semi_autoregressive
from dlm.sampler.blockwise import BlockwiseSampler
from dlm.sampler.registry import SAMPLERS, sampler_spec
from dlm.process.feedback import InputFeedback, combine
from dlm.softmask import SoftMaskFeedback, build_feedback

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
        if getattr(getattr(network, "cfg", None), "prediction", None) == "shifted" and process.name == "mdlm":
            # Dream's recipe (a Dream-layout folder, a causal LM adapted by dlm train init_from=hf:...): its users
            # sample it with Dream's own rule, which is then the model's default sampler
            process.default_sampler = "dream"
        if network.cfg.vocab_size < len(tokenizer):
            raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                                  f"{network.cfg.vocab_size}: this tokenizer does not belong to this model")

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", use_ema: bool = True, tokenizer=None,
             dtype: str | torch.dtype | None = None) -> "DiffusionLM":
        """Load a run folder (its exported `model/`, else `checkpoints/last.ckpt`), an exported model folder,
        a training checkpoint (`.ckpt`), an open checkpoint folder or a causal LM's `.gguf` file. `tokenizer`
        replaces the stored one (it must match the model). `dtype`: the weights (the network's and the process's) as
        "float32", "bfloat16" or "float16" (or the torch dtype); None or "auto" keeps them as stored (an open bf16
        folder stays bf16, a dlm checkpoint float32)."""
        check_device(str(device))
        wanted = weight_dtype(dtype)
        model = cls._load(path, device, use_ema, tokenizer, wanted)
        if wanted is not None:  # the process's learned weights too (a self-conditioning projection, a mixer)
            model.network.to(wanted)
            model.process.to(wanted)
        return model

    @classmethod
    def _load(cls, path, device, use_ema, tokenizer, dtype) -> "DiffusionLM":
        path = Path(path)
        if path.is_dir() and (path / "model" / "config.json").is_file():
            path = path / "model"
        elif path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints" / "last.ckpt").is_file():
            path = path / "checkpoints" / "last.ckpt"
        if path.is_dir() and is_open_checkpoint(path):
            return cls.load_open(path, device, dtype)  # converted while mapping: no second copy
        if path.is_file() and path.suffix == ".gguf":
            return cls.load_gguf(path, device)
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
        if any(".lora_A." in k for k in weights):  # a LoRA run's checkpoint: adapters merged as at export
            weights = merge_lora(weights, cfg.trainer.lora_alpha / cfg.trainer.lora_rank)
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

    @classmethod
    def load_open(cls, folder: str | Path, device: str = "cpu",
                  dtype: str | torch.dtype | None = None) -> "DiffusionLM":
        """A downloaded open checkpoint (LLaDA, Dream, SDAR, or a Llama / Qwen / GPT-2 causal LM; docs/open_models.md)
        with its own tokenizer, weights memory-mapped in their dtype unless `dtype` is given (as `load`'s)."""
        network, descriptor = load_pretrained_network(folder, weight_dtype(dtype), device)
        return cls._from_descriptor(network, descriptor, load_pretrained_tokenizer(folder, descriptor), device)

    @classmethod
    def load_gguf(cls, path: str | Path, device: str = "cpu") -> "DiffusionLM":
        """A causal LM in a GGUF file (Llama / Qwen / GPT-2 families, read and de-quantised to float32 by
        transformers) as dlm's autoregressive model, with the file's tokenizer: `dlm.load("model.gguf")`."""
        network, descriptor, tokenizer = load_gguf_network(path)
        return cls._from_descriptor(network, descriptor, tokenizer, device)

    @classmethod
    def _from_descriptor(cls, network, descriptor, tokenizer, device) -> "DiffusionLM":
        """An open model from its network and model descriptor: the process the descriptor names."""
        process, process_cfg = process_for_descriptor(descriptor, network.cfg)
        return cls(network, process, tokenizer, RunConfig(model=network.cfg, process=process_cfg), device)

    def save_pretrained(self, folder: str | Path) -> Path:
        from dlm.data.tokenizer import tokenizer_fingerprint

        extra = {"tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer)}
        if self.trained_steps is not None:
            extra["trained_steps"] = self.trained_steps
        return save_pretrained(folder, self.network, self.cfg.to_dict(), self.tokenizer, extra=extra,
                               process=self.process)

    @property
    def weight_dtype(self) -> str:
        """The dtype of the network's weights ("float32", "bfloat16", ...): what `dtype=` at load gave."""
        return dtype_name(next(self.network.parameters()).dtype)

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

    def build_canvas(self, length: int, prompt: str | None = None, template: str | None = None):
        """(canvas (L,), fixed (L,) bool) of one row as `generate` builds it: BOS, then the prompt (a prefix, the
        rest up to `length` generated) or the template (its own length), the prior at the positions to generate."""
        (ids,), fixed = given_rows(self.tokenizer, self.process, None, prompt, template, None)
        if fixed is None:
            if len(ids) >= length:
                raise ValueError(f"the prompt leaves nothing to generate in {length} tokens")
            fixed = torch.arange(length) < len(ids)
            ids = ids + [self.tokenizer.pad_token_id] * (length - len(ids))
        return self.process.prior(torch.tensor([ids]), ~fixed[None])[0], fixed

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: str | list[str] | None = None, *, prompt: str | None = None,
                 template: str | None = None, messages: list[dict] | None = None, num_samples: int = 1,
                 length: int | None = None, gen_length: int | None = None, sampler: str | Sampler | None = None,
                 steps: int | None = None, block_length: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | list[int] = 0, stride: int | None = None, batch_size: int = 16,
                 precision: str = "auto", softmask: bool | dict | SoftMaskFeedback | None = None,
                 feedback: InputFeedback | bool | None = None, callback=None, progress: bool = False,
                 record_trajectory: bool = False,
                 sampler_options: dict | None = None, **options) -> Generation:
        """The one generation door: unconditional, prompted (batched, left-padded), infill, chat and any length.

        What is given: nothing (unconditional: BOS, then generated tokens), `prompts` (a text or a list of texts,
        each one row; `prompt=` is the same for one text), `messages` (chat turns through the tokenizer's chat
        template) or `template` (text with `[MASK]` / `[MASK*n]` spans to fill, anywhere). Each is repeated
        `num_samples` times. Sizes: `length` is the canvas's tokens including BOS and the prompt (default: the
        model's context), or `gen_length` the tokens to generate after the prompt. Past the context a diffusion
        model generates semi-autoregressively: windows of `context` tokens advancing by `stride` (default
        context // 2); a block-causal model block by block.

        sampler: a registered name (dlm.sampler.registry; default: the process's own) or a Sampler. `steps` is
        the total budget of steps, `block_length` the tokens per block (block-wise samplers), `temperature` and
        `top_p` as the sampler defines them (None: the sampler's defaults); any other keyword (or
        `sampler_options`) is an option of the named sampler, e.g. threshold=, factor=, cfg_scale=, cache=,
        remasking= of "llada", eta= of ReMDM. An option the sampler does not take (steps= for first_hitting,
        temperature= for a sampler without one) is refused, naming its options. An autoregressive model always
        decodes left to right (a non-autoregressive sampler named for it is replaced, with its options, by the
        process's own); a sampler the process cannot serve is refused.
        Feedback (the next call's inputs built from the previous prediction; `feedback_for`): by default the
        process's own — a model trained with soft-masking and/or self-conditioning is sampled with it. softmask:
        None = as the process says; True = soft-masking with the learned w (a dict overrides omega_s, omega_a,
        omega_b, k, schedule; a model trained without SM needs omega_s: training-free use); False = without
        soft-masking (the process's other feedback stays). feedback: False = plain token inputs, no feedback at
        all; an InputFeedback = that one instead of the process's.
        callback(StepEvent) after every step (return True or a (B,) bool tensor to stop rows); progress: True or
        "auto" (a bar on a terminal, plain lines on stderr otherwise; dlm/progress.py), "bar", "plain", or
        False/"off"; record_trajectory: keep the canvas after every step.

        seed: one for every prompt, or a list of one per prompt. Every row draws from its own generator, seeded by
        its request — its prompt's seed and its sample index (`sample_seed`) — never by its place in the batch: a
        request gives the same tokens alone, in any batch and beside prompts of other lengths (in float32; bf16
        kernels may round a row differently at another batch size, see docs/samplers.md).
        """
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must be positive integers")
        check_sampling_args(length=length, gen_length=gen_length, stride=stride, steps=steps, temperature=temperature,
                            top_p=top_p, batch_size=batch_size, block_length=block_length,
                            cfg_scale=options.get("cfg_scale"))  # 0 or NaN would otherwise mean "default" or garbage
        options = {**(sampler_options or {}), **options}
        if "feedback" in options:  # given as a sampler option: the same as the argument
            if feedback is not None:
                raise ValueError("feedback given twice: as an argument and as a sampler option; give it once")
            feedback = options.pop("feedback")
        if isinstance(sampler, Sampler) and getattr(sampler, "feedback", None) is not None and softmask is None \
                and feedback is None:
            feedback = sampler.feedback  # a sampler given with its own feedback keeps it (not the process's)
        sampler, blockwise = self._sampler(sampler, steps, block_length, temperature, top_p,
                                           self.feedback_for(softmask, feedback), options)
        given, fixed = given_rows(self.tokenizer, self.process, prompts, prompt, template, messages)
        seeds = [seed] * len(given) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(given) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise ValueError(f"seed must be one integer or a list of one integer per prompt ({len(given)}); got {seed!r}")
        rows = [ids for ids in given for _ in range(num_samples)]
        row_seeds = [sample_seed(s, j) for s in seeds for j in range(num_samples)]
        longest = max(len(r) for r in rows)
        if template is not None:
            if length is not None or gen_length is not None:
                raise ValueError("a template sets its own length: leave out length and gen_length")
            total = longest
        elif gen_length is not None:
            if length is not None:
                raise ValueError("give either length (the whole canvas) or gen_length (the tokens to generate)")
            total = longest + gen_length
        else:
            total = length or self.context
        if total <= longest and template is None:
            raise ValueError(f"the prompt is {longest - 1} tokens long (+1 BOS), leaving nothing to generate in "
                             f"{total} tokens (the model's context is {self.context}); shorten the prompt or raise "
                             "length (or give gen_length)")
        semi_ar = total > self.context and not blockwise
        if semi_ar and (template is not None or self.is_autoregressive):
            raise ValueError(f"the {'template' if template is not None else 'request'} needs {total} tokens but the "
                             f"model's context is {self.context}; shorten it")
        if semi_ar and len({len(r) for r in rows}) > 1:
            raise ValueError(f"{total} tokens exceed the model's context ({self.context}): past it, prompts are "
                             "continued window by window, which needs prompts of one length; give one at a time")
        recorder = TrajectoryRecorder() if record_trajectory else None
        mode = resolve_progress(progress)
        batches = list(self._batches(rows, batch_size, sampler if blockwise and fixed is None else None))
        bar = ProgressBar(desc="sampling", disable=False) if mode == "bar" else (
            StepLines(len(batches)) if mode == "plain" else None)
        hook = chain_callbacks(callback, recorder, bar)
        outputs, canvases, order = [], [], []
        started = time.perf_counter()
        with self.autocast(precision), PeakMemory(self.device) as memory:
            for batch in batches:
                chunk = [rows[i] for i in batch]
                generator = [torch.Generator(device=self.device).manual_seed(row_seeds[i]) for i in batch]
                if fixed is not None:  # a template: the same canvas in every row
                    ids, to_gen = torch.tensor(chunk, device=self.device), ~fixed.to(self.device).expand(len(chunk), -1)
                    canvas = Canvas(self.process.prior(ids, to_gen, generator), to_gen.clone())
                else:
                    width = min(total, self.context) if semi_ar else total
                    new = gen_length if gen_length is not None and not semi_ar else width - max(len(r) for r in chunk)
                    align = sampler.block_length if blockwise and self.process.blocks_after_prompt else None
                    canvas = Canvas.left_padded(chunk, new, self.process, self.tokenizer.pad_token_id, self.device,
                                                generator, align)
                if semi_ar:
                    out = semi_autoregressive(sampler, self.network, self.process, canvas, total,
                                              stride or self.context // 2, generator, hook)
                    generated = (torch.arange(total, device=self.device) >= longest).expand(len(chunk), -1)
                else:
                    out = sampler.sample(self.network, self.process, canvas, generator, hook)
                    generated = canvas.to_generate
                outputs.append(out)
                canvases.append((out.tokens.cpu(), generated.cpu()))
                order += batch
                if isinstance(bar, StepLines):
                    bar.end_batch()
        if isinstance(bar, ProgressBar):
            bar.close()
        seconds = time.perf_counter() - started
        width = max(t.shape[1] for t, _ in canvases)  # chunks left-padded to their own longest prompt: align them
        pad = self.tokenizer.pad_token_id
        tokens = torch.cat([F.pad(t, (width - t.shape[1], 0), value=pad) for t, _ in canvases])
        generated = torch.cat([F.pad(g, (width - g.shape[1], 0), value=False) for _, g in canvases])
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))  # the batches' rows back in the request order
        tokens, generated = tokens[back], generated[back]
        return Generation(decode_rows(self.tokenizer, tokens), tokens, generated, sum(o.nfe for o in outputs),
                          torch.cat([o.nfe_per_row.cpu() for o in outputs])[back], seconds, memory.mib,
                          decode_rows(self.tokenizer, tokens, generated),
                          torch.cat([o.stopped.cpu() for o in outputs])[back], [] if recorder is None else recorder.canvases,
                          None if any(o.tokens_computed is None for o in outputs)
                          else torch.cat([o.tokens_computed.cpu() for o in outputs])[back],
                          self.weight_dtype, use_bf16(precision, self.device.type))

    # ------------------------------------------------------------------------------------ instant edit
    @torch.no_grad()
    def edit(self, text: str | None = None, spans: list[tuple[int, ...]] | None = None, *,
             template: str | None = None, mode: str | None = None, max_rounds: int = 4, threshold: float = 1e-4,
             budget: float = 0.15, groups: int = 16, sampler: str | Sampler | None = None, steps: int | None = None,
             temperature: float | None = None, top_p: float | None = None, seed: int = 0,
             softmask: bool | dict | SoftMaskFeedback | None = None, feedback: InputFeedback | bool | None = None,
             callback=None, sampler_options: dict | None = None, **options) -> EditResult:
        """Revise `text` in place (docs/edit.md; the algorithm: dlm/edit.py) and return an `EditResult`: the new
        text (every character outside the changed tokens kept byte for byte), `changes` (EditChange: characters
        [start, end) of the original, `old` -> `new`, canvas positions), `nfe`, `rounds`, `remasked` per round.

        What changes:
          - `spans` [(start, end), ...] or (start, end, n_tokens): character ranges of `text` to rewrite (mode
            "rewrite", the default with spans): each span's tokens (n_tokens, default as many as its text has;
            an empty span (a, a, n) inserts n tokens) are drawn from the prior and regenerated with the rest as
            context, in one round. With mode="auto" the spans only limit where auto mode may change tokens.
          - `template`: instead of text, a text with `[MASK]` / `[MASK*n]` spans to fill (mode "rewrite").
          - neither: mode "auto" — each round scores every token in context (one network call; absorbing models:
            each token's probability when masked, in `groups` interleaved sets), remasks those below `threshold`
            (at most `budget` of the tokens per round, least likely first; `process.prior`: [MASK], or fresh
            uniform tokens for a uniform-state model), regenerates them with the sampler, and stops when a round
            changes nothing, nothing scores below the threshold, or after `max_rounds`.
        Fill-in-the-middle is an insertion span: `infill(prefix, suffix, n_tokens)`.

        sampler, temperature, top_p and sampler options as in `generate` (default: the process's own sampler at
        temperature 0, i.e. the most likely tokens); steps: the regeneration's steps per round (default: one per
        token to generate). Feedback (`softmask`, `feedback`) as in `generate`; scoring uses plain tokens.
        seed: the one generator every draw of the edit comes from (the same text, options and seed give the same
        edit, whatever else runs)."""
        from dlm.edit import MODES, run_edit, span_segments, template_segments, token_segments

        if self.is_autoregressive:
            raise ValueError("instant edit needs a diffusion model; this model is autoregressive (it can only "
                             "continue text left to right): use dlm sample, or a masked / uniform-state model")
        if (text is None) == (template is None):
            raise ValueError("give the text to edit (text=, with spans= or auto mode) or a template (template=), "
                             "one of them")
        if template is not None and spans is not None:
            raise ValueError("a template marks its own spans ([MASK*n]); leave spans out")
        if mode is None:
            mode = "auto" if spans is None and template is None else "rewrite"
        if mode not in MODES:
            raise ValueError(f"unknown edit mode {mode!r}; valid: {', '.join(MODES)}")
        if mode == "rewrite" and spans is None and template is None:
            raise ValueError("mode='rewrite' rewrites given spans: give spans=[(start, end), ...] or a template")
        if mode == "auto" and template is not None:
            raise ValueError("a template's [MASK*n] spans are filled (mode 'rewrite'), not scored: leave mode out")
        if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
            raise ValueError(f"max_rounds={max_rounds!r} must be a positive integer")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups={groups!r} must be a positive integer")
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
            raise ValueError(f"threshold={threshold!r} must be a probability in (0, 1]")
        if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
            raise ValueError(f"budget={budget!r} must be a fraction of the tokens in (0, 1]")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        check_sampling_args(steps=steps, temperature=temperature, top_p=top_p)
        source = text if template is None else template
        if not isinstance(source, str) or not source.strip():
            raise ValueError("the text to edit is empty")
        if template is not None:
            placeholder = self.process.mask_id if self.process.mask_id is not None else self.tokenizer.pad_token_id
            segments = template_segments(self.tokenizer, template, placeholder)
        elif mode == "rewrite":
            segments = span_segments(self.tokenizer, text, spans)
        else:
            segments = token_segments(self.tokenizer, text)
            if spans is not None:
                from dlm.edit import check_spans

                limits = check_spans(text, spans)
                for seg in segments:
                    seg.editable = seg.editable and any(a <= seg.core_start and seg.core_end <= b
                                                        for a, b, _ in limits)
        options = {**(sampler_options or {}), **options}
        fb = self.feedback_for(softmask, feedback)
        if temperature is None and not isinstance(sampler, Sampler) and \
                "temperature" in sampler_spec(self.sampler_name(sampler)).options:
            temperature = 0.0  # editing restores the most likely tokens unless told otherwise

        def make_sampler(n: int) -> Sampler:
            if isinstance(sampler, Sampler):
                return self._sampler(sampler, None, None, None, None, fb, dict(options))[0]
            spec = sampler_spec(self.sampler_name(sampler))
            wanted = steps if steps is not None else (
                None if "steps" not in spec.options else max(n, 3) if spec.name == "remdm_loop" else n)  # loop: 3 phases
            return self._sampler(sampler, wanted, None, temperature, top_p, fb, dict(options))[0]

        make_sampler(1)  # refuses a sampler or an option the model cannot take before any work
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return run_edit(self, source, segments, mode, make_sampler, generator, max_rounds=max_rounds,
                        threshold=float(threshold), budget=float(budget), groups=groups, callback=callback)

    def infill(self, prefix: str, suffix: str, n_tokens: int, **kw) -> EditResult:
        """Fill-in-the-middle: `n_tokens` generated between `prefix` and `suffix` (kept byte for byte), through the
        edit path (an insertion span); keywords as in `edit`. The result's text is prefix + middle + suffix, its
        one change the middle."""
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
            raise ValueError(f"n_tokens={n_tokens!r} must be a positive integer")
        return self.edit(prefix + suffix, [(len(prefix), len(prefix), n_tokens)], mode="rewrite", **kw)

    @staticmethod
    def _batches(rows: list[list[int]], batch_size: int, blockwise: Sampler | None) -> list[list[int]]:
        """Row indices of each batch: consecutive rows, batch_size at a time. Block by block (`blockwise`, the
        sampler), rows are batched with rows whose prompt length is the same modulo the block length, so their left
        padding is whole blocks and each row's blocks lie where they lie when it is generated alone."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(0 if blockwise is None else len(r) % blockwise.block_length, []).append(i)
        return [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]

    def generate_prompted(self, prompts: list[str], gen_length: int = 64, block_length: int | None = None,
                          steps: int = 64, temperature: float = 0.0, suppress_eos: bool = False, **kw) -> Generation:
        """`generate(prompts, gen_length=..., sampler="llada", ...)`: LLaDA-style block-wise confidence decoding of
        each prompt's continuation (names as in diffusers' LLaDA2 pipeline; threshold=, factor=, cfg_scale=,
        cache=, remasking=, softmask=, batch_size=, seed=, precision= as in `generate`). suppress_eos: positions
        predicting EOS are committed last."""
        if not prompts:
            raise ValueError("give at least one prompt")
        if suppress_eos:
            kw["suppress_ids_in_confidence"] = (self.tokenizer.eos_token_id,)
        return self.generate(list(prompts), gen_length=gen_length, sampler=kw.pop("sampler", "llada"),
                             block_length=block_length, steps=steps, temperature=temperature, **kw)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Texts of (N, L) ids; EOS (a document boundary) becomes a blank line, other special tokens vanish."""
        return decode_rows(self.tokenizer, tokens)

    def _sampler(self, sampler, steps, block_length, temperature, top_p, feedback, options) -> tuple[Sampler, bool]:
        """The sampler to run and whether it generates block by block; refused when the process cannot serve it.
        feedback: an InputFeedback for the sampler, or None."""
        if feedback is not None:
            options["feedback"] = feedback
        if isinstance(sampler, Sampler):
            if feedback is not None:
                if not getattr(sampler, "takes_feedback", False):
                    raise ValueError(f"sampler {type(sampler).__name__} does not take feedback "
                                     f"({getattr(feedback, 'label', 'feedback')}); "
                                     "give one that does, or feedback=False for plain token inputs")
                sampler = copy.copy(sampler)
                sampler.feedback = feedback
            blockwise = isinstance(sampler, BlockwiseSampler)
        else:
            typed = sampler or self.process.default_sampler  # the name the user typed (or the process's default)
            name = self.sampler_name(sampler)
            common = {"steps": steps, "temperature": temperature, "top_p": top_p}
            if self.is_autoregressive and name != sampler_spec(typed).name:
                options, common = {}, {}  # an AR model always decodes left to right: the other sampler's options go
            blockwise = name == "blockwise"
            if blockwise:
                options = blockwise_options(self.process, self.tokenizer, typed, options, block_length)
                options = inner_options_apart(options)
            elif block_length is not None:
                options["block_length"] = block_length
            common = {k: v for k, v in common.items() if v is not None}
            accepted = sampler_spec(name).options
            if feedback is not None and "feedback" not in accepted:
                raise ValueError(f"sampler '{typed}' does not take feedback, and this model is sampled with "
                                 f"{getattr(feedback, 'label', 'a feedback')}: choose a sampler that does "
                                 f"({', '.join(n for n in sorted(SAMPLERS) if 'feedback' in sampler_spec(n).options)})"
                                 ", or pass feedback=False (--no-feedback) for plain token inputs")
            refused = sorted(k for k in common if k not in accepted)
            if refused:
                raise ValueError(f"sampler '{typed}' does not take {', '.join(refused)}; its options: "
                                 f"{', '.join(accepted) or '(none)'} (leave {', '.join(refused)} unset)")
            twice = sorted(set(common) & set(options))
            if twice:
                raise ValueError(f"{', '.join(twice)} given twice: as an argument and as a sampler option; give it once")
            label = typed if sampler_spec(typed).name == name else name  # refusals name what the user typed
            sampler = sampler_spec(name).make(label, **common, **options)
        if self.is_autoregressive:
            tok = self.tokenizer  # never generated: [MASK], [PAD], BOS; a causal LM's pad is often its EOS, kept
            special = (tok.mask_token_id, tok.pad_token_id, tok.bos_token_id)
            sampler.suppress_ids = sorted({i for i in special if i is not None and i != tok.eos_token_id})
        self.process.check_sampler(sampler)
        return sampler, blockwise

    def sampler_name(self, sampler: str | None = None) -> str:
        """The registered sampler that `generate(sampler=...)` builds for this model: `sampler` (a name or alias),
        the process's `default_sampler` when None, the autoregressive sampler for an autoregressive model (it
        always decodes left to right), "blockwise" (with `sampler` inside) for a block-causal process."""
        name = sampler_spec(sampler or self.process.default_sampler).name
        if self.is_autoregressive and not getattr(sampler_spec(name).build, "autoregressive", False):
            return sampler_spec(self.process.default_sampler).name
        if not self.is_autoregressive and (self.process.blockwise or name == "blockwise"):
            return "blockwise"
        return name

    def sampler_options(self, sampler: str | None, items: list[str]) -> dict:
        """`key=value` strings (the CLI's `-o`) as options of the sampler `generate(sampler=...)` builds, parsed by
        its config's field types; refused naming its options when it has no such option."""
        typed = sampler or self.process.default_sampler
        name = self.sampler_name(sampler)
        if self.is_autoregressive and sampler_spec(typed).name != name:  # decoded left to right: as `generate`,
            sampler_spec(typed).parse_options(list(items), label=typed)  # the named sampler's options are checked
            return {}  # against it, then go with it (`dlm eval MDLM AR --sampler llada -o remasking=margin`)
        if name == "blockwise" and sampler_spec(typed).name != "blockwise":  # the inner sampler's own options too
            own = set(sampler_spec("blockwise").options)
            mine = [i for i in items if i.partition("=")[0].strip() in own]
            return {**sampler_spec("blockwise").parse_options(mine, label=typed),
                    **sampler_spec(typed).parse_options([i for i in items if i not in mine], label=typed)}
        return sampler_spec(name).parse_options(list(items), label=typed)

    def feedback_for(self, softmask: bool | dict | SoftMaskFeedback | None = None,
                     feedback: InputFeedback | bool | None = None) -> InputFeedback | None:
        """The InputFeedback `generate(softmask=..., feedback=...)` gives the sampler (None: plain token inputs).

        feedback: None (or True) = as `softmask` says; False = none; an InputFeedback = that one (softmask must be
        None or False).
        softmask: None = the process's own (`process.feedback()`: a soft-masking model's learned soft-masking, a
        self-conditioned model's self-conditioning, both combined, or None); False = the process's without
        soft-masking (`process.plain.feedback()`); True or a dict of overrides (omega_s, omega_a, omega_b, k,
        schedule) = soft-masking with the learned w, or training-free with the chosen w on a model trained without
        it, combined with the process's other feedback; a SoftMaskFeedback = that soft-masking, likewise."""
        if feedback is not None and feedback is not True:
            if softmask is not None and softmask is not False:
                raise ValueError("give softmask= or feedback=, not both (feedback= replaces every feedback)")
            if feedback is False:
                return None
            if not callable(feedback):
                raise ValueError(f"feedback must be None, False or an InputFeedback, not {feedback!r}")
            return feedback
        if softmask is None:
            return self.process.feedback()
        if softmask is False:
            return self.process.plain.feedback()
        if self.is_autoregressive:
            raise ValueError("soft-masking needs a masked diffusion model; this model is autoregressive")
        if isinstance(softmask, SoftMaskFeedback):
            return combine(softmask, self.process.plain.feedback())
        overrides = {} if softmask is True else dict(softmask)
        if self.softmask is not None:  # a soft-masking process: its learned w (and its base's feedback)
            return self.process.feedback(**overrides)
        training_free = build_feedback(None, self.process.mask_id, **overrides)  # training-free: w chosen here
        return combine(training_free, self.process.plain.feedback())

    # ------------------------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def nelbo(self, batch: dict, num_t_samples: int = 8, seed: int = 0, precision: str = "auto",
              softmask: bool | None = None) -> tuple[float, int]:
        """(summed NELBO in nats, scored tokens) of a batch (see dlm.data.batch.make_batch); exact NLL for
        an autoregressive model. Deterministic for a given seed: each row's times and masks come from its own
        generator, seeded by the seed and a hash of the row's tokens (`row_seed`), so a text's estimate depends
        neither on the batch it is in nor on its place in the list.
        softmask: bound the two-pass soft-masked denoiser (default: when the model was trained with SM); the
        same times and masks either way."""
        if num_t_samples < 1:
            raise ValueError(f"num_t_samples={num_t_samples} must be a positive integer")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        am = batch.get("attention_mask")
        generator = [torch.Generator(device=self.device).manual_seed(
            row_seed(seed, ids if am is None else ids[am[r].bool()])) for r, ids in enumerate(batch["input_ids"])]
        if softmask and self.softmask is None:
            raise ValueError("this model was trained without soft-masking: it has no learned w to bound with")
        process = self.process if softmask is None or softmask else self.process.plain
        with self.autocast(precision):
            out = process.nelbo(self.network, batch, num_t_samples, generator)
        return float(out.nll_sum), int(out.num_tokens)

    @torch.no_grad()
    def any_order_nll(self, batch: dict, num_orders: int, seed: int = 0, precision: str = "auto"
                      ) -> tuple[float, float, int]:
        """(importance-weighted NLL with `num_orders` orders, mean single-order NLL L_AO, scored tokens) of a batch,
        in summed nats (dlm.process.any_order): the any-order likelihood of an MDLM or Eso-LM model, which tends to
        the model's exact -log p(x) as num_orders grows (and is above it in expectation). Each row's orders come
        from its own generator (seeded as in `nelbo`), so a text's estimate depends neither on its batch nor on its
        place."""
        from dlm.process.any_order import check_any_order, importance_weighted_nll

        process = self.process.plain
        check_any_order(process)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        am = batch.get("attention_mask")
        generator = [torch.Generator(device=self.device).manual_seed(
            row_seed(seed, ids if am is None else ids[am[r].bool()])) for r, ids in enumerate(batch["input_ids"])]
        with self.autocast(precision):
            iw, ao = importance_weighted_nll(process, self.network, batch, num_orders, generator)
        return float(iw.sum()), float(ao.sum()), int(process.honour_given(batch)["loss_mask"].sum())

    def perplexity(self, source: str = "embedded", split: str = "test", texts: list[str] | None = None,
                   num_t_samples: int = 8, seed: int = 0, batch_size: int = 16, max_rows: int | None = None,
                   precision: str = "auto", progress: bool | str = False, softmask: bool | None = None,
                   iw_orders: int = 0) -> dict:
        """Validation perplexity: exp of the per-token `nelbo` of the process, which is an upper bound (diffusion
        models), exact (autoregressive ones) or an estimate, as `process.likelihood` says and the result's
        "likelihood" reports ("bound": whether it is an upper bound), on a split of `source` or on given `texts`, packed like training
        (given texts: every token, the last row padded, so even one short sentence can be scored).
        softmask: as in `nelbo` (default: the soft-masked bound for a model trained with SM); progress: per batch,
        as in `generate`. iw_orders > 0 (an MDLM or Eso-LM model): also the any-order likelihood estimated with that
        many orders per sequence (`any_order_nll`): "iw_ppl" (importance-weighted: tends to the exact perplexity
        from above as iw_orders grows) and "ao_ppl" (the mean single-order NLL, a bound)."""
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
        if iw_orders < 0:
            raise ValueError(f"iw_orders={iw_orders} must be 0 (off) or a positive number of orders")
        if iw_orders:
            from dlm.process.any_order import check_any_order

            check_any_order(self.process.plain)  # before any work
        total, count, iw_total, ao_total = 0.0, 0, 0.0, 0.0
        starts = range(0, ids.shape[0], batch_size)
        for start in track(starts, "perplexity", progress):
            batch = make_batch(ids[start:start + batch_size].long(), None if am is None else am[start:start + batch_size])
            s, n = self.nelbo(batch, num_t_samples, seed, precision, softmask)
            total, count = total + s, count + n
            if iw_orders:
                iw, ao, _ = self.any_order_nll(batch, iw_orders, seed, precision)
                iw_total, ao_total = iw_total + iw, ao_total + ao
        if count == 0:
            raise ValueError("no token to score: the text is empty")
        nll = total / count
        out = {"ppl": math.exp(nll), "nll_per_token": nll, "num_tokens": count, "num_rows": int(ids.shape[0]),
               "likelihood": self.process.likelihood, "bound": self.process.likelihood == "bound",
               "num_t_samples": 0 if self.process.likelihood == "exact" else num_t_samples,
               "seed": seed, "split": "texts" if given_texts else split,
               "softmask": bool(self.softmask is not None if softmask is None else softmask)}
        if iw_orders:
            out.update(iw_ppl=math.exp(iw_total / count), iw_nll_per_token=iw_total / count,
                       ao_ppl=math.exp(ao_total / count), ao_nll_per_token=ao_total / count, iw_orders=iw_orders)
        return out


def row_seed(seed: int, tokens: torch.Tensor) -> int:
    """The seed of one evaluation row's generator (times and masks of its NELBO): the seed and a hash of the row's
    (unpadded) tokens, so a text's estimate does not depend on where it sits in the list."""
    digest = hashlib.blake2b(tokens.to("cpu", torch.int64).numpy().tobytes(), digest_size=8).digest()
    return (seed * 1_000_003 + int.from_bytes(digest, "little")) % (2**63 - 1)


def sample_seed(seed: int, sample: int) -> int:
    """The generator seed of sample `sample` (0, 1, ...) of a request with seed `seed`: the seed itself for the first,
    a mix of both for the others (so `num_samples` rows of one prompt differ, and none depends on its batch)."""
    return seed if sample == 0 else (seed * 1_000_003 + sample * 7_919 + 17) % (2**63 - 1)


def load(path: str | Path, device: str = "cpu", **kw) -> DiffusionLM:
    """Load a model: a run folder, an exported model folder, a training checkpoint, an open checkpoint folder or a
    .gguf file; keywords as `DiffusionLM.load` (use_ema, tokenizer, dtype)."""
    return DiffusionLM.load(path, device=device, **kw)
