"""Scoring samples for the soft-masking experiment: generative perplexity, entropy and MAUVE in one pass.

`dlm.eval.genppl.generative_perplexity` and `dlm.eval.mauve.text_features` each run the evaluation model over
the texts; here one forward pass per batch gives both the next-token NLL and the last-layer hidden state at the
final token (the same prefix, tokenisation and pooling as those functions; texts are shorter than the
evaluator's context, so genppl's chunking never applies). That halves the dominant cost of the experiment.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from dlm.data.entropy import mean_sample_entropy
from dlm.eval.genppl import EvalLM, pad_right
from dlm.eval.mauve import mauve_from_features


def random_eval_lm(tokenizer, vocab_size: int, context: int) -> EvalLM:
    """A random causal dlm network as the evaluator of --quick runs: it exercises every code path in seconds
    (no 135M-parameter model to load); its numbers mean nothing."""
    from dlm.config import ModelConfig
    from dlm.network import Transformer

    torch.manual_seed(0)
    network = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, context=context, vocab_size=vocab_size))

    class Causal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.network = network

        def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
            hidden = self.network(input_ids, causal=True, return_hidden=True)  # (B, T, C)
            return SimpleNamespace(logits=self.network.head(hidden), hidden_states=(hidden,))

    return EvalLM(Causal(), tokenizer, "random 1-layer causal network (--quick)", max_length=context)


@torch.inference_mode()
def score_texts(texts: list[str], eval_lm: EvalLM, batch_size: int = 16) -> dict:
    """NLL sum, token count and MAUVE features (N, D) of texts, one evaluator pass per batch.

    Each text becomes [prefix] + its evaluator ids (cut to the evaluator's context); every id is scored given
    the ones before it, and the feature is the last-layer hidden state at the final id.
    """
    limit = (eval_lm.max_length or 1 << 30) - 1
    seqs = [[eval_lm.prefix_id, *eval_lm.encode(t)[:limit]] for t in texts]
    seqs = [s if len(s) > 1 else s + [eval_lm.prefix_id] for s in seqs]  # an empty text scores one separator
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    nll, count, feats = 0.0, 0, [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = pad_right([seqs[i] for i in rows], eval_lm.prefix_id, eval_lm.device)
        out = eval_lm.model(ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (B, T, D)
        for r, i in enumerate(rows):
            n = len(seqs[i]) - 1
            nll += float(F.cross_entropy(out.logits[r, :n].float(), ids[r, 1:n + 1], reduction="sum"))
            count += n
            feats[i] = hidden[r, n].float().cpu()
    return {"nll_sum": nll, "num_tokens": count, "features": torch.stack(feats).numpy()}


def sample_metrics(texts: list[str], token_ids: list[list[int]], eval_lm: EvalLM, reference: np.ndarray) -> dict:
    """Generative perplexity, mean unigram entropy (of the dlm token ids) and MAUVE against reference features."""
    scored = score_texts(texts, eval_lm)
    return {"gen_ppl": math.exp(scored["nll_sum"] / scored["num_tokens"]),
            "entropy": mean_sample_entropy(token_ids),
            "mauve": mauve_from_features(reference, scored["features"])["mauve"]}
