"""`DLMHarnessLM`: any model `dlm.load` opens, as an lm-evaluation-harness `LM` (registered as "dlm").

    from dlm.eval.harness import register
    register()   # lm_eval 0.4.13 finds models by import only, not by entry point: docs/harness.md
    lm_eval.simple_evaluate(model="dlm", model_args="pretrained=runs/demo-mdlm,mc_num=128", tasks=[...])

model_args (`key=value`, comma-separated): pretrained (a run folder, exported folder, .ckpt, open checkpoint
folder or .gguf), device (cpu), dtype (open folders: float32 / bfloat16 / float16), precision (auto / 32 / bf16:
dlm's autocast rule), mc_num (128 draws per likelihood), mc_groups (8: the standard error's groups), estimator
(auto / llada / process), cfg_scale (0: LLaDA guidance of the likelihood), seed (0), batch_size (16 rows per
network call), sampler and steps (generate_until: default the model's sampler, one step per generated token),
max_gen_toks (64), stats_path (write the per-task Monte Carlo errors and NFE as JSON), progress (auto / bar /
plain / off: of the likelihood batches, on stderr), and any option of the
sampler (threshold=0.9, block_length=8, ...), checked by `generate`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from lm_eval.api.model import LM

from dlm.eval.harness.estimator import (Estimate, Row, add_estimates, encode_pair, exact_ar, fit_context, greedy_rows,
                                        llada_estimates, process_estimates)

log = logging.getLogger("dlm.harness")
ESTIMATORS = ("auto", "llada", "process")


class DLMHarnessLM(LM):
    """loglikelihood (exact for AR; a Monte Carlo bound with its standard error for diffusion), is_greedy,
    loglikelihood_rolling (windows of the model's context) and generate_until (dlm's samplers), per-request
    seeded (results do not depend on the batch). Estimates are `Estimate` floats carrying `.stderr`; per-task
    Monte Carlo errors, NFE and tokens per forward are collected in `self.stats` (docs/harness.md)."""

    def __init__(self, pretrained: str | None = None, device: str = "cpu", dtype: str | None = None,
                 precision: str = "auto", mc_num: int = 128, mc_groups: int = 8, estimator: str = "auto",
                 cfg_scale: float = 0.0, seed: int = 0, batch_size: int | str = 16, max_batch_size: int | None = None,
                 sampler: str | None = None, steps: int | None = None, max_gen_toks: int = 64,
                 stats_path: str | None = None, progress: str = "auto", model=None, **sampler_options):
        super().__init__()
        from dlm.pipeline import DiffusionLM

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s: no CUDA GPU here; running on the CPU (lm_eval's command line defaults to "
                        "cuda:0; --device cpu silences this)", device)
            device = "cpu"
        if model is None:
            if not pretrained:
                raise ValueError("the dlm model needs pretrained=PATH (a run folder, exported folder, .ckpt, open "
                                 "checkpoint folder or .gguf) in --model_args")
            if dtype is not None:
                from dlm.network.families import is_open_checkpoint

                if not (Path(pretrained).is_dir() and is_open_checkpoint(Path(pretrained))):
                    raise ValueError("dtype= applies to open checkpoint folders only (dlm's own models load in the "
                                     "dtype they were saved in; precision= sets the autocast)")
                model = DiffusionLM.load_open(pretrained, device, getattr(torch, str(dtype)))
            else:
                model = DiffusionLM.load(pretrained, device=device)
        self.model = model
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}: use one of {', '.join(ESTIMATORS)}")
        if batch_size is None or str(batch_size).startswith("auto"):  # lm_eval's "auto" / "auto:N": dlm's default
            batch_size = 16
        self.batch_size, self.mc_num, self.mc_groups = int(batch_size), int(mc_num), int(mc_groups)
        if self.batch_size < 1 or self.mc_num < 1:
            raise ValueError(f"batch_size={batch_size} and mc_num={mc_num} must be positive integers")
        self.seed, self.cfg_scale, self.precision = int(seed), float(cfg_scale), str(precision)
        self.model.autocast(self.precision)  # an unknown precision is refused here, naming the valid ones
        self.sampler, self.steps, self.max_gen_toks = sampler, None if steps is None else int(steps), int(max_gen_toks)
        self.sampler_options = dict(sampler_options)
        self.stats_path, self.progress = stats_path, progress
        self.stats: dict[str, dict] = {}
        from dlm.process.mdlm import MaskedDiffusion

        process = self.model.process
        self.masked = isinstance(process.plain, MaskedDiffusion)  # MDLM, self-conditioned, soft-masked, open LLaDA
        self.estimator = ("exact" if process.autoregressive else
                          ("llada" if self.masked else "process") if estimator == "auto" else estimator)
        if self.estimator == "llada" and not self.masked:
            raise ValueError(f"estimator=llada needs a masked diffusion (MDLM-type) model; this one is "
                             f"'{process.name}': use estimator=process (its own bound)")
        if not process.autoregressive:
            from dlm.eval.harness.estimator import check_mc

            check_mc(self.mc_num, self.mc_groups)
        if self.sampler is not None or self.sampler_options:
            model.sampler_name(self.sampler)  # an unknown sampler is refused here, before any request
        tok = model.tokenizer
        self.start = [] if tok.bos_token_id is None else [tok.bos_token_id]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._device = model.device

    # ------------------------------------------------------------------------------------ lm_eval's interface
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.model.tokenizer, "name_or_path", "dlm").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.model.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        tok = self.model.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: run without --apply_chat_template")
        return tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text)

    def rows_of(self, pairs: list[tuple[list[int], list[int]]]) -> list[Row]:
        """Rows of (context ids, continuation ids) pairs, each with its own seeded generator (seed and tokens)."""
        from dlm.pipeline import row_seed

        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("a continuation encodes to no token: nothing to score")
            start = self.start if self.start or ctx else [self.model.tokenizer.eos_token_id]  # no BOS: EOS as start
            ids, n_given = fit_context(start, ctx, cont, self.model.context)
            seed = row_seed(self.seed, torch.tensor(ids + [-1 - n_given]))
            # llada's draws are made on the CPU (then moved); a process draws on the model's device
            device = "cpu" if self.estimator == "llada" else self.model.device
            rows.append(Row(ids, n_given, torch.Generator(device=device).manual_seed(seed), len(start)))
        return rows

    def score(self, rows: list[Row], greedy: bool) -> list[tuple[Estimate, bool]]:
        """(log-likelihood estimate, is_greedy) of each row through the chosen estimator."""
        m, p = self.model, self.model.process
        with m.autocast(self.precision):
            if self.estimator == "exact":
                return exact_ar(p, m.network, rows, self.batch_size, self.pad_id)
            if self.estimator == "llada":  # one plain pass of the denoiser: no soft-masking / self-conditioning
                est = llada_estimates(p.plain, m.network, rows, self.mc_num, self.mc_groups, self.batch_size,
                                      self.pad_id, self.cfg_scale, self.progress)
            else:
                est = process_estimates(p, m.network, rows, self.mc_num, self.mc_groups, self.batch_size,
                                        self.pad_id, self.progress)
            if not greedy:
                return [(e, False) for e in est]
            if not self.masked:
                if not getattr(self, "_warned_greedy", False):
                    log.warning("is_greedy is False for every request: greedy decoding is defined here for "
                                "autoregressive and masked diffusion (MDLM-type) models only, not '%s'", p.name)
                    self._warned_greedy = True
                return [(e, False) for e in est]
            flags, calls = greedy_rows(p.plain, m.network, rows, self.batch_size, self.pad_id)
            return [(Estimate(float(e), e.stderr, e.exact, e.tokens, e.nfe + c), g)
                    for e, g, c in zip(est, flags, calls)]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.encode, *req.args) for req in requests]
        out = self.score(self.rows_of(pairs), greedy=True)
        for req, (est, _) in zip(requests, out):
            self.record(req, "loglikelihood", est)
        self.log_stats()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over disjoint windows (lm_eval's rolling windows, context_len 1, of
        P = context - 1 - len(start) predicted tokens): the first window scored after the start token (BOS; EOS for
        a tokenizer without BOS), each next one given the token before it, the last (shorter) one given as many
        tokens before it as fill the row (exact for AR, a bound for diffusion); the windows' estimates sum."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        prefix = self.start[0] if self.start else self.model.tokenizer.eos_token_id
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            # the whole row, start + window context + window, fits the model's context
            windows = get_rolling_token_windows(self.encode(text), prefix, self.model.context - 1 - len(self.start), 1)
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append(([] if self.start and ctx == [prefix] else ctx, cont))
                owner.append(i)
        scored = self.score(self.rows_of(pairs), greedy=False)
        parts: list[list[Estimate]] = [[] for _ in requests]
        for i, (est, _) in zip(owner, scored):
            parts[i].append(est)
        out = [add_estimates(p) for p in parts]
        for req, est in zip(requests, out):
            self.record(req, "loglikelihood_rolling", est)
        self.log_stats()
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """dlm's generate on each context (the model's sampler, or `sampler=` and its options), max_gen_toks new
        tokens, cut at EOS and at the first stop string; per-request seeds, NFE recorded per task."""
        from dlm.pipeline import row_seed
        from dlm.sampler.registry import sampler_spec

        groups: dict[str, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temp = kwargs.pop("temperature", None)
            if kwargs.pop("do_sample", None) is False:
                temp = 0.0
            top_p = kwargs.pop("top_p", None)
            if kwargs and not getattr(self, "_warned_kwargs", False):
                log.warning("generation arguments %s are not used by dlm's samplers (until, max_gen_toks, "
                            "temperature, do_sample and top_p are)", sorted(kwargs))
                self._warned_kwargs = True
            settings.append((context, until, gen, temp))
            groups.setdefault(json.dumps([gen, temp, top_p]), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for key, idx in groups.items():
            gen, temp, top_p = json.loads(key)
            prompts = [self.fit_prompt(settings[i][0], gen) for i in idx]
            seeds = [row_seed(self.seed, torch.tensor(self.encode(p) + [gen])) for p in prompts]
            steps = self.steps if self.steps is not None else gen
            options = dict(self.sampler_options)
            accepted = sampler_spec(self.model.sampler_name(self.sampler)).options
            kw = {}
            if "steps" in accepted and "steps" not in options:
                kw["steps"] = steps
            if temp is not None and "temperature" in accepted and "temperature" not in options:
                kw["temperature"] = float(temp)
            if top_p is not None and "top_p" in accepted and "top_p" not in options:
                kw["top_p"] = float(top_p)
            g = self.model.generate(prompts, gen_length=gen, sampler=self.sampler, seed=seeds,
                                    batch_size=self.batch_size, precision=self.precision, **kw, **options)
            eos = self.model.tokenizer.eos_token_id
            for j, i in enumerate(idx):
                ids = g.tokens[j][g.generated[j]].tolist()
                if eos in ids:
                    ids = ids[:ids.index(eos)]
                text = self.model.tokenizer.decode(ids, skip_special_tokens=True)
                for stop in settings[i][1]:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out[i] = text
                calls = int(g.nfe_per_row[j])
                self.record(requests[i], "generate_until", None, nfe=calls, tokens=int(g.generated[j].sum()))
        self.log_stats()
        return out

    def fit_prompt(self, context: str, gen: int) -> str:
        """The context, its start cut (by tokens) so that start + context + gen tokens fit the model's context."""
        room = self.model.context - len(self.start) - gen
        if room < 1:
            raise ValueError(f"max_gen_toks={gen} leaves no room for a prompt in the model's context of "
                             f"{self.model.context} tokens; lower max_gen_toks")
        ids = self.encode(context)
        return context if len(ids) <= room else self.model.tokenizer.decode(ids[-room:])

    # ------------------------------------------------------------------------------------ statistics
    def record(self, req, method: str, est: Estimate | None, nfe: int = 0, tokens: int = 0) -> None:
        """Add one request to its task's statistics."""
        task = getattr(req, "task_name", None) or "(no task)"
        s = self.stats.setdefault(task, {}).setdefault(method, {"requests": 0, "nfe": 0, "tokens": 0,
                                                                "ll_sum": 0.0, "var_sum": 0.0})
        s["requests"] += 1
        if est is not None:
            s["ll_sum"] += float(est)
            s["var_sum"] += est.stderr ** 2
            s["nfe"] += est.nfe
            s["tokens"] += est.tokens
        else:
            s["nfe"] += nfe
            s["tokens"] += tokens

    def summary(self) -> dict:
        """Per task and method: requests, NFE per request, and for likelihoods the Monte Carlo standard error of
        the mean log-likelihood per request (`mc_stderr_mean_ll`) and of the token perplexity (`token_ppl`,
        `mc_stderr_token_ppl`: exp of the NLL per token, its error by the delta method); for generation the
        generated tokens per network call (`tokens_per_forward`)."""
        out = {}
        for task, methods in self.stats.items():
            for method, s in methods.items():
                n = s["requests"]
                row = {"requests": n, "nfe_per_request": s["nfe"] / max(n, 1), "estimator": self.estimator}
                if method == "generate_until":
                    row["tokens_per_forward"] = s["tokens"] / max(s["nfe"], 1)
                    row["estimator"] = "sampler"
                else:
                    se_sum = math.sqrt(s["var_sum"])
                    row.update(mean_ll=s["ll_sum"] / max(n, 1), mc_stderr_mean_ll=se_sum / max(n, 1),
                               tokens=s["tokens"], mc_num=0 if self.estimator == "exact" else self.mc_num)
                    if s["tokens"]:
                        ppl = math.exp(-s["ll_sum"] / s["tokens"])
                        row.update(token_ppl=ppl, mc_stderr_token_ppl=ppl * se_sum / s["tokens"])
                out[f"{task}/{method}"] = row
        return out

    def log_stats(self) -> None:
        """Log the summary and write it to `stats_path` when given."""
        summary = self.summary()
        for key, row in summary.items():
            log.info("dlm %s: %s", key, ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items()))
        if self.stats_path:
            Path(self.stats_path).write_text(json.dumps(summary, indent=2))
