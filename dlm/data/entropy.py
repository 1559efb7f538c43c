"""Unigram entropy of generated samples.

Generative perplexity alone rewards collapse: a sample that repeats one phrase scores a low perplexity
under any language model. The entropy of each sample's own token histogram exposes that, so the two
are always reported together (SPEC §5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def unigram_entropy(ids: Sequence[int] | Tensor) -> float:
    """Entropy, in nats, of the empirical token distribution of one sample.

    ids: the token ids of one sample, a sequence of ints or a tensor of any shape (flattened).
    Returns -Σ_v p_v log p_v with p_v = count(v) / len(ids); 0 for a sample of one repeated token,
    log(len(ids)) when every token is distinct.
    """
    ids = torch.as_tensor(ids).flatten()
    if ids.numel() == 0:
        raise ValueError("unigram_entropy of an empty sample is undefined")
    _, counts = torch.unique(ids, return_counts=True)
    p = counts.double() / ids.numel()
    return float(-(p * p.log()).sum())


def mean_sample_entropy(samples: list[list[int]]) -> float:
    """Mean over samples of `unigram_entropy` (nats); each sample is one list of token ids."""
    if len(samples) == 0:
        raise ValueError("mean_sample_entropy needs at least one sample")
    return sum(unigram_entropy(s) for s in samples) / len(samples)
