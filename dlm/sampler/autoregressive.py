"""Left-to-right sampling for the autoregressive baseline, with a KV cache (one token per network call).

Step-level: `start` runs the prompt through the network (the prefill: the first token's logits, and the prompt's keys
and values in the cache); step k of a row samples its token k from the logits it holds, after one call that feeds
its token k - 1 (none at step 0). Every row feeds one token per call whatever its step, so rows that joined at
other times share the calls: each row's cache rows hold its own keys (rows of other lengths are left-padded with
keys nobody sees), and its positions are its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.network import KVCache
from dlm.sampler.base import Canvas, Sampler, StepEvent, chosen_probability, sample_tokens
from dlm.sampler.registry import check_temperature, check_top_p, register_sampler
from dlm.sampler.state import SamplerState


@dataclass
class AutoregressiveConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    kv_cache: bool = True
    suppress_ids: tuple[int, ...] = ()  # never generated (e.g. [MASK], [PAD], [BOS])

    def __post_init__(self):
        check_temperature(self.temperature)
        check_top_p(self.top_p)


@dataclass
class Decoding:
    """What the rows of a state hold between steps: `logits` (B, V) of each row's next token, and `cache` (None without
    a KV cache) holding the rows where `held` (B,) bool is True, in order — a row leaves the cache when it is done."""

    logits: torch.Tensor
    cache: KVCache | None
    held: torch.Tensor

    def select(self, rows: torch.Tensor) -> "Decoding":
        """The rows `rows` (B_a,) indices (SamplerState.select)."""
        rows = rows.to(self.held.device)
        cache = self.cache
        if cache is not None:
            index = self.held.long().cumsum(0) - 1  # batch row -> its cache row
            cache = cache.select(index[rows][self.held[rows]])
        return Decoding(self.logits[rows.to(self.logits.device)], cache, self.held[rows])

    def keep(self, rows: torch.Tensor) -> "Decoding":
        """The cache holding only the batch rows where `rows` (B,) bool is True (a subset of the held ones)."""
        if self.cache is None or bool((rows == self.held).all()):
            return Decoding(self.logits, self.cache, rows.clone())
        index = (self.held.long().cumsum(0) - 1)[rows]
        return Decoding(self.logits, self.cache.select(index), rows.clone())

    @staticmethod
    def cat(parts: list["Decoding"]) -> "Decoding":
        """The rows of several states stacked (SamplerState.cat): caches of other lengths are left-padded."""
        caches = [p.cache for p in parts]
        cache = None if any(c is None for c in caches) else KVCache.cat(caches)
        return Decoding(torch.cat([p.logits for p in parts]), cache, torch.cat([p.held for p in parts]))


@register_sampler("autoregressive", AutoregressiveConfig,
                  description="left to right, one token per network call, with a KV cache (autoregressive models)")
class AutoregressiveSampler(Sampler):
    name = "autoregressive"
    corruptions = ("none",)
    autoregressive = True

    @torch.no_grad()
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        """canvas (B, L): a prompt followed by the positions to generate, which must form one suffix shared by every
        row. The prefill (the prompt's call) is made here: it gives every row its first token's logits."""
        process.check_sampler(self)
        fixed = canvas.fixed
        n_prompt = int(fixed[0].sum())
        if not (fixed[:, :n_prompt].all() and not fixed[:, n_prompt:].any()):
            raise ValueError("an autoregressive model can only continue a prefix: fixed tokens after the generated "
                             "positions (infilling) need a diffusion model")
        B, L = canvas.shape
        state = SamplerState.begin(network, process, canvas, generator, L - n_prompt)
        if n_prompt == L:  # nothing to generate
            state.done[:] = True
            return state
        valid, where = canvas.key_valid, canvas.positions  # left padding (never attended to), rotary positions
        cols = lambda x: None if x is None else x[:n_prompt] if x.dim() == 1 else x[:, :n_prompt]  # noqa: E731
        cache = KVCache(capacity=L) if self.kv_cache else None  # appended in place: no copy per token
        update = (cols(valid) if valid is not None else True) if cache is not None else False
        logits = process.forward_logits(network, state.tokens[:, :n_prompt], None, key_valid=cols(valid),
                                        positions=cols(where), kv_cache=cache, cache_update=update,
                                        logits_at=slice(-1, None))[:, -1]  # (B, V)
        state.calls = 1
        state.nfe_per_row += 1
        state.tokens_computed += n_prompt
        state.extras = {"decoding": Decoding(logits, cache, torch.ones(B, dtype=torch.bool, device=logits.device))}
        return state

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """Step k of every row not done: one call feeding the token it committed at step k - 1 (rows at step 0 hold
        their prefill's logits and sit the call out), then its token k drawn from its logits."""
        network, process, z = state.network, state.process, state.tokens
        B, L = z.shape
        device = z.device
        active = ~state.done
        pos = L - state.num_steps + state.step  # (B,) each row's position to generate now (a suffix of the canvas)
        need = active & (state.step > 0)  # rows whose logits are for the last token: one call feeds it
        decoding = state.extras["decoding"]
        if bool(need.any()):
            decoding = decoding.keep(active)  # rows done (stopped, finished) leave the cache
            fed = (active if decoding.cache is not None else need).nonzero().squeeze(1)  # the call's rows
            fresh = self.call(state, decoding.cache, fed, need, pos)  # (B_f, V)
            logits = decoding.logits.clone()
            logits[fed[need[fed]]] = fresh[need[fed]].to(logits.dtype)
            decoding = Decoding(logits, decoding.cache, decoding.held)
        rows = active.nonzero().squeeze(1)  # (B_a,)
        logits = decoding.logits[rows]
        if self.suppress_ids:
            logits[:, list(self.suppress_ids)] = float("-inf")
        u = state.rand(rows, (), torch.float64)
        nxt = sample_tokens(logits.float(), u, self.temperature, self.top_p)  # (B_a,)
        at = pos[rows]
        z[rows, at] = nxt
        committed = torch.zeros(B, L, dtype=torch.bool, device=device)
        committed[rows, at] = True
        confidence = None
        if state.confidence:
            confidence = torch.zeros(B, L, device=device)
            confidence[rows, at] = chosen_probability(logits, nxt)
        state.step = state.step + active.long()
        state.done = state.done | (state.step >= state.num_steps)
        state.extras = {"decoding": decoding}
        event = StepEvent(state.events, z, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event

    def call(self, state: SamplerState, cache: KVCache | None, rows: torch.Tensor, need: torch.Tensor,
             pos: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B_f, V) of the batch rows `rows` (B_f,) indices, each to predict its position pos (B,).
        With the cache (whose rows are `rows`), each feeds one token, the one before; a row not in `need` (B,) bool
        (it holds its prefill's logits) feeds it too, its key appended as invalid, and its logits are not used.
        Without a cache, each feeds its whole prefix."""
        process, network, z = state.process, state.network, state.tokens
        p = pos[rows]  # (B_f,)
        valid, where = state.key_valid, state.positions
        same = bool((p == p[0]).all())
        if cache is not None:
            last = (p - 1)[:, None]  # (B_a, 1): the token each row feeds
            if where is None and same and cache.length == int(p[0]) - 1:
                positions = None  # 0..L-1, and the cache holds exactly the positions before: as the network counts
            else:
                positions = last if where is None else where[rows].gather(1, last)
            take = need[rows]
            update = True if bool(take.all()) else take[:, None]  # (B_a, 1): the keys of the rows that feed
            logits = process.forward_logits(network, z[rows].gather(1, last), None, positions=positions,
                                            kv_cache=cache, cache_update=update, logits_at=slice(-1, None))[:, -1]
            tokens = torch.ones_like(p)
        else:
            end = int(p.max())  # rows at other positions feed the longest prefix; causal attention keeps each its own
            pick = lambda x: None if x is None else x[rows, :end]  # noqa: E731
            at = slice(-1, None) if same else slice(int(p.min()) - 1, end)
            logits = process.forward_logits(network, z[rows, :end], None, key_valid=pick(valid),
                                            positions=pick(where), logits_at=at)
            logits = logits[:, -1] if same else logits[torch.arange(len(p), device=p.device), p - int(p.min())]
            tokens = p
        state.calls += 1
        fed = rows[need[rows]].cpu()
        state.nfe_per_row[fed] += 1
        state.tokens_computed[fed] += tokens[need[rows]].cpu()
        return logits
