"""MAUVE between generated samples and human text, with features from our evaluation model.

mauve-text would featurise with gpt2-large from the Hugging Face hub, which these machines cannot reach;
we pass it precomputed features instead: the last-layer hidden state of each text's final real token
under the same evaluation LM used for generative perplexity (SmolLM2 by default), as MAUVE does with GPT-2.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from dlm.eval.genppl import EvalLM, pad_right


def text_features(texts: list[str], eval_lm: EvalLM, max_len: int = 256, batch_size: int = 16) -> np.ndarray:
    """Features (N, D) float32: last-layer hidden state at the final real token of each text.

    Each text is tokenised with the evaluator's tokenizer, cut to its first `max_len` tokens (as MAUVE
    does; fewer if the evaluator's context is shorter) and prefixed with `eval_lm.prefix_id`. Empty texts are not
    allowed here (see `mauve_score`).
    """
    if eval_lm.max_length is not None:  # the prefix and the text must fit the evaluator's context
        max_len = min(max_len, eval_lm.max_length - 1)
    seqs = [[eval_lm.prefix_id, *eval_lm.encode(t)[:max_len]] for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
    feats: list[torch.Tensor | None] = [None] * len(seqs)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = pad_right([seqs[i] for i in batch], eval_lm.prefix_id, eval_lm.device)
            hidden = eval_lm(ids, mask, output_hidden_states=True)  # (B, T, D)
            last = mask.sum(1) - 1  # (B,) index of each row's final real token (right padding)
            picked = hidden[torch.arange(len(batch), device=hidden.device), last]  # (B, D)
            for row, i in enumerate(batch):
                feats[i] = picked[row].float().cpu()
    return torch.stack(feats).numpy()


def mauve_from_features(p_feats: np.ndarray, q_feats: np.ndarray, **kw) -> dict:
    """MAUVE (mauve-text) between feature sets p_feats (N_p, D) and q_feats (N_q, D).

    Defaults chosen for the small sample counts we can afford on a CPU, overridable through **kw
    (passed to `mauve.compute_mauve`): num_buckets = max(2, n // 10) with n = min(N_p, N_q),
    k-means seed 25 (mauve-text's default, fixed so the score is reproducible), 5 k-means restarts,
    at most 500 iterations, scaling factor c = 5.

    Returns {mauve, frontier_integral, num_buckets, num_p_texts, num_q_texts}.
    """
    try:
        import mauve  # mauve-text; imports faiss and scikit-learn
    except ImportError as err:
        raise ImportError("MAUVE needs mauve-text: pip install mauve-text faiss-cpu") from err
    n = min(len(p_feats), len(q_feats))
    if n < 2:
        raise ValueError(f"MAUVE needs at least 2 texts on each side, got {len(p_feats)} and {len(q_feats)}")
    options = {"num_buckets": max(2, n // 10), "seed": 25, "kmeans_num_redo": 5, "kmeans_max_iter": 500}
    options.update(kw)
    out = mauve.compute_mauve(p_features=p_feats, q_features=q_feats, verbose=False, **options)
    return {
        # The area under mauve-text's divergence curve, computed with the trapezoid rule, can land a rounding error
        # outside [0, 1] (1.0000000000000002 for identical histograms); MAUVE itself lies in [0, 1].
        "mauve": min(max(float(out.mauve), 0.0), 1.0),
        "frontier_integral": max(float(out.frontier_integral), 0.0),
        "num_buckets": int(out.num_buckets),
        "num_p_texts": len(p_feats),
        "num_q_texts": len(q_feats),
    }


def mauve_score(
    p_texts: list[str], q_texts: list[str], eval_lm: EvalLM, max_len: int = 256, batch_size: int = 16, **kw
) -> dict:
    """MAUVE between p_texts (e.g. held-out human text) and q_texts (e.g. model samples).

    Features come from `text_features` under `eval_lm`; **kw and the small-sample defaults are those of
    `mauve_from_features`. Empty texts are dropped with a warning.

    Returns {mauve, frontier_integral, num_buckets, num_p_texts, num_q_texts, eval_model}.
    """
    p_kept = [t for t in p_texts if eval_lm.encode(t)]
    q_kept = [t for t in q_texts if eval_lm.encode(t)]
    dropped = len(p_texts) - len(p_kept) + len(q_texts) - len(q_kept)
    if dropped:
        warnings.warn(f"mauve_score dropped {dropped} empty text(s)", stacklevel=2)
    if min(len(p_kept), len(q_kept)) < 2:
        raise ValueError(f"MAUVE needs 2+ non-empty texts on each side, got {len(p_kept)} and {len(q_kept)}")
    p_feats = text_features(p_kept, eval_lm, max_len, batch_size)
    q_feats = text_features(q_kept, eval_lm, max_len, batch_size)
    return {**mauve_from_features(p_feats, q_feats, **kw), "eval_model": eval_lm.name}
