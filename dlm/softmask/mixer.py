"""The soft-masking mixer (Hersche et al. 2025, arXiv 2510.17206, eq. 4-5).

A position that stays masked is fed, at the next network call, not the plain [MASK] embedding E[m] but

    e~ = (1 - lam) E[m] + lam * sum_j pi_j E[v_j],    lam = w_s * sigmoid(w_a * (-H(p) - w_b)),

where p is the softmax of this step's SUBS logits (full vocabulary, temperature 1), H(p) its entropy,
v_1..v_k its top-k tokens and pi their probabilities renormalised over the k. Clean and fixed positions keep
their own embedding. The mix is built sparsely: k + 1 embedding rows per masked position are gathered and
weighted, never a dense (B, L, V) x (V, C) product. Only the network's embedding table is needed, so this
works with any network that accepts `inputs_embeds`.

The three scalars are learned through unconstrained raw parameters:
w_s = sigmoid(a) in (0, 1), w_a = softplus(b) > 0, w_b = -softplus(c) < 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _logit(y: float) -> float:
    return math.log(y / (1.0 - y))


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1), stable for large y


def check_omegas(omega_s: float | None = None, omega_a: float | None = None, omega_b: float | None = None) -> None:
    """Reject values outside the ranges of the constrained parameterisation."""
    if omega_s is not None and not 0.0 <= omega_s <= 1.0:
        raise ValueError(f"omega_s={omega_s} must be in [0, 1] (it scales the feedback weight lambda)")
    if omega_a is not None and not omega_a > 0.0:
        raise ValueError(f"omega_a={omega_a} must be > 0 (the sharpness of lambda in the entropy)")
    if omega_b is not None and not omega_b < 0.0:
        raise ValueError(f"omega_b={omega_b} must be < 0 (lambda switches on where the entropy is below -omega_b)")


def check_p_sm(p_sm: float) -> None:
    if not 0.0 <= p_sm <= 1.0:
        raise ValueError(f"p_sm={p_sm} must be in [0, 1] (the probability that a batch is trained with soft-masking)")


def check_k(k: int, vocab_size: int | None = None) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"soft-masking k={k} must be a positive integer (number of top candidates; 3 for text)")
    if vocab_size is not None and k > vocab_size - 1:
        raise ValueError(f"soft-masking k={k} exceeds the {vocab_size - 1} candidate tokens of the vocabulary "
                         "([MASK] is never a candidate); use a smaller k")


def feedback_weight(entropy: torch.Tensor, omega_s, omega_a, omega_b) -> torch.Tensor:
    """lam = w_s * sigmoid(w_a * (-H - w_b)), elementwise over entropy (any shape); omegas are scalars or tensors."""
    return omega_s * torch.sigmoid(omega_a * (-entropy - omega_b))


def entropy_and_topk(logits: torch.Tensor, mask_id: int, k: int, index: torch.Tensor | None = None,
                     chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy of p = softmax(SUBS logits) and its renormalised top-k, for rows of logits (M, V).

    index (N,): the rows to use (default all M). Returns H (N,) in nats, the top-k ids (N, k) and pi (N, k) =
    p[v_j] / sum_j' p[v_j'] (a softmax over the k top logits, which is exactly that ratio). The [MASK] logit
    counts as -inf (zero-masking); `logits` is not modified. Rows are processed `chunk` at a time in float32,
    so each chunk (4 MiB at a vocabulary of 8192) stays in cache through its five passes (about 4x faster than
    whole-tensor passes on a CPU; 128 rows measured best among 32..512 in bench/softmask.py's setting).
    """
    index = torch.arange(logits.shape[0], device=logits.device) if index is None else index
    parts = [_entropy_and_topk_chunk(logits.index_select(0, index[i:i + chunk]).float(), mask_id, k)
             for i in range(0, index.shape[0], chunk)]
    if not parts:
        empty = logits.new_zeros((0, k), dtype=torch.float32)
        return empty[:, 0], empty.long(), empty
    return tuple(torch.cat(x) for x in zip(*parts))


def _entropy_and_topk_chunk(c: torch.Tensor, mask_id: int, k: int):
    """`entropy_and_topk` of a float32 chunk (n, V) that it overwrites."""
    c[:, mask_id] = float("-inf")
    top_logits, top_ids = topk_by_groups(c, k)  # (n, k)
    p = c.softmax(-1)  # (n, V); 0 at [MASK]
    c[:, mask_id] = 0.0  # p = 0 there, so it adds nothing below; avoids 0 * -inf
    mean_logit = torch.linalg.vecdot(p, c)  # sum_v p_v l_v
    log_z = top_logits[:, 0] - p.gather(-1, top_ids[:, :1]).squeeze(-1).log()  # l_max - log p_max
    entropy = (log_z - mean_logit).clamp_min(0.0)  # H = log Z - sum_v p_v l_v
    return entropy, top_ids, top_logits.softmax(-1)


def topk_by_groups(x: torch.Tensor, k: int, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(k, dim=-1)` for rows x (n, V), about 4x faster on a CPU for small k and a wide vocabulary.

    The k largest entries of a row lie in the k column groups with the largest maxima (any other entry is
    below k distinct group maxima), so only those groups (and the last, partial one) are searched. With tied
    values the indices may differ from `torch.topk`'s; the values do not.
    """
    n, width = x.shape
    groups = width // group
    if groups <= k:
        return x.topk(k, dim=-1)
    group_max = x[:, :groups * group].reshape(n, groups, group).amax(-1)  # (n, G): a vectorised max
    best = group_max.topk(k, dim=-1).indices  # (n, k)
    cols = (best[:, :, None] * group + torch.arange(group, device=x.device)).flatten(1)  # (n, k * group)
    if width > groups * group:  # the partial last group is always searched
        tail = torch.arange(groups * group, width, device=x.device).expand(n, -1)
        cols = torch.cat((cols, tail), dim=1)
    values, where = x.gather(-1, cols).topk(k, dim=-1)  # (n, k)
    return values, cols.gather(-1, where)


def soft_mask_embeddings(logits: torch.Tensor, z: torch.Tensor, mask_id: int, embedding: torch.Tensor, k: int,
                         omega_s, omega_a, omega_b) -> torch.Tensor:
    """Input embeddings (B, L, C) for the next network call.

    logits (B, L, V): this step's raw network logits (float or bf16; only positions where z is [MASK] are read).
    z (B, L): the canvas the next call sees; positions equal to mask_id get the soft mix, all others E[z].
    embedding (V, C): the network's embedding table. omegas: floats or 0-dim tensors (gradients flow to them), or
    tensors (N,) with one value per masked position in row-major order (per-row sampling schedules).
    """
    index = (z == mask_id).flatten().nonzero().squeeze(-1)  # (N,) rows of the masked positions
    return _mix(logits.reshape(-1, logits.shape[-1]), index, z, mask_id, embedding, k, omega_s, omega_a, omega_b)


def soft_mask_embeddings_at_masks(rows: torch.Tensor, z: torch.Tensor, mask_id: int, embedding: torch.Tensor, k: int,
                                  omega_s, omega_a, omega_b) -> torch.Tensor:
    """`soft_mask_embeddings` from the logits of the masked positions only: rows (N, V), one per position where
    z == mask_id in row-major order (`logits[z == mask_id]`), so a caller can skip the output layer elsewhere."""
    return _mix(rows, None, z, mask_id, embedding, k, omega_s, omega_a, omega_b)


def _mix(rows, index, z, mask_id, embedding, k, omega_s, omega_a, omega_b) -> torch.Tensor:
    embeds = F.embedding(z, embedding)  # (B, L, C): E[z] everywhere, E[m] at masks
    masked = z == mask_id  # (B, L)
    if not masked.any():
        return embeds
    with torch.no_grad():  # the logits come from a pass without gradients; only lam and E carry them
        entropy, top_ids, pi = entropy_and_topk(rows, mask_id, k, index)  # (N,), (N, k), (N, k)
    lam = feedback_weight(entropy.to(embedding.dtype), omega_s, omega_a, omega_b)  # (N,)
    candidates = F.embedding(top_ids, embedding)  # (N, k, C): the k rows gathered per position
    mixed = torch.einsum("nk,nkc->nc", pi.to(embedding.dtype), candidates)  # (N, C)
    e_mask = embedding[mask_id]  # (C,): the (k+1)-th row
    soft = (1.0 - lam)[:, None] * e_mask + lam[:, None] * mixed  # (N, C)
    index = masked.flatten().nonzero().squeeze(-1) if index is None else index  # (N,) rows of E[z] to replace
    return embeds.flatten(0, 1).index_copy(0, index, soft.to(embeds.dtype)).view_as(embeds)


class SoftMaskMixer(nn.Module):
    """The three learned scalars of soft-masking and the mix they define.

    k: top candidates per position (3 for language, 1 for code). omega_*: initial values of the constrained
    parameters; the default w_s = 0.01 keeps a pretrained MDLM (almost exactly) unchanged at the first step.
    """

    def __init__(self, k: int = 3, omega_s: float = 0.01, omega_a: float = 6.67, omega_b: float = -0.75):
        super().__init__()
        check_k(k)
        check_omegas(omega_s, omega_a, omega_b)
        if not 0.0 < omega_s < 1.0:
            raise ValueError(f"the initial omega_s={omega_s} must be strictly inside (0, 1) (w_s = sigmoid(a))")
        self.k = k
        self.raw_s = nn.Parameter(torch.tensor(_logit(omega_s)))
        self.raw_a = nn.Parameter(torch.tensor(_softplus_inverse(omega_a)))
        self.raw_b = nn.Parameter(torch.tensor(_softplus_inverse(-omega_b)))

    @property
    def omega_s(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_s)

    @property
    def omega_a(self) -> torch.Tensor:
        return F.softplus(self.raw_a)

    @property
    def omega_b(self) -> torch.Tensor:
        return -F.softplus(self.raw_b)

    def omegas(self) -> dict[str, float]:
        """The current (w_s, w_a, w_b) as plain floats, for logging and reports."""
        with torch.no_grad():
            return {"omega_s": float(self.omega_s), "omega_a": float(self.omega_a), "omega_b": float(self.omega_b)}

    def forward(self, logits: torch.Tensor, z: torch.Tensor, mask_id: int, embedding: torch.Tensor,
                omega_s=None, omega_a=None, omega_b=None) -> torch.Tensor:
        """Input embeddings (B, L, C) from logits (B, L, V), canvas z (B, L) and the embedding table (V, C).

        omega_*: optional overrides of the learned values (sampling-time choices); None uses the parameters.
        """
        check_k(self.k, embedding.shape[0])
        return soft_mask_embeddings(logits, z, mask_id, embedding, self.k, *self._omegas(omega_s, omega_a, omega_b))

    def at_masks(self, rows: torch.Tensor, z: torch.Tensor, mask_id: int, embedding: torch.Tensor,
                 omega_s=None, omega_a=None, omega_b=None) -> torch.Tensor:
        """`forward` from the logits rows (N, V) of the masked positions only (see `soft_mask_embeddings_at_masks`)."""
        check_k(self.k, embedding.shape[0])
        return soft_mask_embeddings_at_masks(rows, z, mask_id, embedding, self.k,
                                             *self._omegas(omega_s, omega_a, omega_b))

    def _omegas(self, omega_s, omega_a, omega_b):
        return (self.omega_s if omega_s is None else omega_s, self.omega_a if omega_a is None else omega_a,
                self.omega_b if omega_b is None else omega_b)

    def extra_repr(self) -> str:
        w = self.omegas()
        return f"k={self.k}, omega_s={w['omega_s']:.4g}, omega_a={w['omega_a']:.4g}, omega_b={w['omega_b']:.4g}"
