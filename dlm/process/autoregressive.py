"""The autoregressive baseline: next-token cross-entropy with a causal mask, on the same network."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass

from dlm.network.base import and_masks, padding_mask
from dlm.network.chunked_ce import chunk_size, chunked_cross_entropy
from dlm.process.base import LossOutput, Process, ProcessConfig, register_process


@dataclass
class ARConfig(ProcessConfig):
    name: str = "ar"


@register_process
class Autoregressive(Process):
    """Predict token l from tokens < l. Scores the same positions as MDLM (`loss_mask`: not BOS, not padding)."""

    name = "ar"
    corruption = "none"
    autoregressive = True
    likelihood = "exact"
    default_sampler = "autoregressive"
    exact_caches = frozenset({"causal"})
    config_class = ARConfig

    def __init__(self, mask_id: int | None = None, time_conditioning: bool = False):
        super().__init__(None, False)  # nothing is masked and no time is fed

    @classmethod
    def from_config(cls, cfg, description=None):
        return cls()

    def forward_logits(self, network, z, t=None, batch=None, inputs_embeds=None, *, positions=None, key_valid=None,
                       attn_mask=None, kv_cache=None, cache_update=False, logits_at=None) -> torch.Tensor:
        """Next-token logits (B, L, V) of a left-to-right call: position l's are about token l + 1 (causal attention;
        `key_valid` (B, L) False on left padding; the other arguments as the network's)."""
        cached = 0 if kv_cache is None else kv_cache.length
        mask = and_masks(padding_mask(key_valid, cached), attn_mask)
        return network.next_token_logits(z if inputs_embeds is None else None, inputs_embeds=inputs_embeds,
                                         positions=positions, kv_cache=kv_cache, cache_update=cache_update,
                                         logits_at=logits_at, attn_mask=mask)

    def loss(self, network, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        """Next-token NLL per scored token. Nothing is corrupted; given positions (an SFT prompt) are not scored."""
        batch = self.honour_given(batch)
        x, loss_mask = batch["input_ids"], batch["loss_mask"]
        # Padding is on the right, so a causal mask never lets a real token see a pad.
        targets = x[:, 1:]
        chunk = chunk_size(network)
        if chunk:  # trainer.chunked_ce: hidden states at the scored positions (N, C), the head a chunk at a time
            scored = loss_mask[:, 1:]  # (B, L-1)
            hidden = network.next_token_logits(x[:, :-1], return_hidden=True, logits_at=scored)  # (N, C)
            nll = torch.zeros(targets.shape, device=x.device).masked_scatter(
                scored, chunked_cross_entropy(hidden, network.head, targets[scored], chunk))  # (B, L-1)
        else:
            logits = network.next_token_logits(x[:, :-1])  # (B, L-1, V): position l predicts token l+1
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)  # (B, L-1)
        nll = torch.where(loss_mask[:, 1:], nll, 0.0)
        num_tokens = loss_mask[:, 1:].sum()
        total = nll.sum()
        return LossOutput(total / num_tokens.clamp(min=1), total.detach(), num_tokens.detach(), nll.detach().sum(1),
                          loss_mask[:, 1:].sum(1))

    @torch.no_grad()
    def nelbo(self, network, batch: dict, num_t_samples: int = 1, generator=None) -> LossOutput:
        """Exact NLL (the name keeps one evaluation interface for every process)."""
        return self.loss(network, batch)
