"""What `DiffusionLM.generate` returns, and the canvases it builds from text (prompts, templates, chat messages).

Below the pipeline and above the sampler: it knows tokenizers and canvases, not networks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

MASK_SPAN = re.compile(r"\[MASK(?:\*(\d+))?\]")


@dataclass
class Generation:
    """The result of `DiffusionLM.generate`.

    texts: each row decoded whole (prompt or template text and the generated tokens; padding and special tokens
    dropped, EOS as a blank line). tokens (N, L): the canvases (batched prompts of different lengths are
    left-padded). generated (N, L) bool: the positions the sampler generated. nfe: network calls summed over
    batches; nfe_per_row (N,): the calls each row took part in. seconds: wall time of the sampling. peak_memory_mib:
    dlm.memory.PeakMemory (process peak RSS on a CPU, PyTorch's peak on a GPU). continuations: the generated part
    of each row alone. stopped (N,): rows a callback stopped. trajectory: canvases after each step, if recorded.
    dtype: the weights' dtype the canvases were computed with; bf16_autocast: whether bf16 autocast was on.
    """

    texts: list[str]
    tokens: torch.Tensor
    generated: torch.Tensor
    nfe: int
    nfe_per_row: torch.Tensor
    seconds: float
    peak_memory_mib: float | None = None
    continuations: list[str] = field(default_factory=list)
    stopped: torch.Tensor | None = None
    trajectory: list[torch.Tensor] = field(default_factory=list)
    tokens_computed: torch.Tensor | None = None  # (N,): query positions the network computed per row (partial calls)
    dtype: str | None = None  # the network's weights ("float32", "bfloat16", "float16": `dlm.load(..., dtype=)`)
    bf16_autocast: bool | None = None  # whether the products ran under bf16 autocast (`precision`)

    @property
    def generated_tokens(self) -> int:
        """Tokens the sampler produced (BOS, prompt and template text excluded)."""
        return int(self.generated.sum())

    @property
    def row_calls(self) -> int:
        """Network calls summed over rows (a row that has finished sits out the calls of the others)."""
        return int(self.nfe_per_row.sum())

    @property
    def tokens_per_nfe(self) -> float:
        """Generated tokens per network call of each row (1.0 = one token per step)."""
        return self.generated_tokens / max(self.row_calls, 1)

    @property
    def tokens_per_forward(self) -> torch.Tensor:
        """(N,) float: each row's generated tokens per network call it took part in (DiffusionGemma's
        `tokens_per_forward`; its mean over rows weighs rows equally, `tokens_per_nfe` weighs them by calls)."""
        return self.generated.sum(1).double() / self.nfe_per_row.clamp(min=1).double()

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time."""
        return self.generated_tokens / max(self.seconds, 1e-9)


def template_canvas(template: str, encode, start: list[int], placeholder: int) -> tuple[list[int], list[bool]]:
    """(ids, fixed) of a template: `start` ([BOS]), then text with `[MASK]` (one token) or `[MASK*n]` (n tokens) spans to fill;
    everything else is fixed (any positions, not just a suffix)."""
    ids, fixed, pos = list(start), [True] * len(start), 0
    for m in MASK_SPAN.finditer(template):
        piece = encode(template[pos:m.start()])
        n = int(m.group(1) or 1)
        ids += piece + [placeholder] * n
        fixed += [True] * len(piece) + [False] * n
        pos = m.end()
    piece = encode(template[pos:])
    ids += piece
    fixed += [True] * len(piece)
    if all(fixed):
        raise ValueError("the template has no [MASK] or [MASK*n] span to fill")
    return ids, fixed


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The ids of chat `messages` ([{"role": ..., "content": ...}]) through the tokenizer's chat template, ending
    with the assistant's turn to generate."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template: give prompts= (plain text) instead of messages=")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])  # transformers 5 returns a BatchEncoding


def given_rows(tokenizer, process, prompts, prompt, template, messages) -> tuple[list[list[int]], torch.Tensor | None]:
    """The given part of each distinct row (BOS first) and, for a template, its fixed positions (L,) bool."""
    if sum(x is not None for x in (prompts, prompt, template, messages)) > 1:
        raise ValueError("give prompts (or prompt: text to continue), messages (a chat) or a template (text with "
                         "[MASK*n] spans), not both")
    bos = tokenizer.bos_token_id
    start = [] if bos is None else [bos]  # a tokenizer without BOS (Qwen's, Dream's): prompts start bare
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if template is not None:
        placeholder = process.mask_id if process.mask_id is not None else tokenizer.pad_token_id
        ids, fixed = template_canvas(template, encode, start, placeholder)
        return [ids], torch.tensor(fixed)
    if messages is not None:
        return [chat_prompt(tokenizer, messages)], None
    texts = [prompt] if prompt is not None else [prompts] if isinstance(prompts, str) else prompts
    if texts is None:  # unconditional: BOS, or a document boundary (EOS) for a tokenizer without BOS
        return [start or [tokenizer.eos_token_id]], None
    if not texts:
        raise ValueError("give at least one prompt")
    rows = [start + (encode(t) if t else []) for t in texts]
    if not all(rows):
        raise ValueError("an empty prompt with a tokenizer that has no BOS token leaves nothing to start from")
    return rows, None


def blockwise_options(process, tokenizer, sampler: str, options: dict, block_length: int | None) -> dict:
    """Options of the "blockwise" sampler for this model: `sampler` (unless "blockwise") is the inner sampler;
    a block-causal process gets its own block size and an exact KV cache (a bidirectional one has none); rows
    that stop are filled with [PAD]."""
    options = dict(options)
    if sampler != "blockwise":
        options.setdefault("inner_sampler", sampler)
    exact = "blockwise" in process.exact_caches
    for key, default in (("block_length", block_length or process.block_size), ("kv_cache", exact),
                         ("eos_id", tokenizer.eos_token_id), ("fill_id", tokenizer.pad_token_id)):
        if options.get(key) is None:
            options[key] = default
    return options


def inner_options_apart(options: dict) -> dict:
    """Blockwise options with the inner sampler's own options (those the blockwise sampler does not take, e.g.
    renoise's max_denoising_steps) moved into `inner_options`, which the blockwise sampler passes on."""
    from dlm.sampler.registry import sampler_spec

    inner = options.get("inner_sampler")
    if inner is None:
        return options
    own, theirs = set(sampler_spec("blockwise").options), set(sampler_spec(inner).options)
    moved = {k: v for k, v in options.items() if k not in own and k in theirs}
    if not moved:
        return options
    kept = {k: v for k, v in options.items() if k not in moved}
    return {**kept, "inner_options": {**(kept.get("inner_options") or {}), **moved}}


def decode_rows(tokenizer, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> list[str]:
    """Texts of (N, L) ids (only the positions in `keep` (N, L) bool when given); EOS (a document boundary)
    becomes a blank line, other special tokens vanish."""
    eos = tokenizer.eos_token_id
    texts = []
    for r, row in enumerate(tokens.tolist()):
        if keep is not None:
            row = [t for t, k in zip(row, keep[r].tolist()) if k]
        parts, cur = [], []
        for tok in row:
            if tok == eos:
                parts.append(cur)
                cur = []
            else:
                cur.append(tok)
        parts.append(cur)
        texts.append("\n\n".join(tokenizer.decode(p, skip_special_tokens=True).strip() for p in parts).strip())
    return texts
