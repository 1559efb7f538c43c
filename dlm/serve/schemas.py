"""The request bodies the server accepts (pydantic): OpenAI's fields, and dlm's diffusion options by their dlm names.

An unknown field is refused (400, naming it), as is a value of the wrong type or out of range. OpenAI fields that
dlm cannot honour are accepted only at their no-op values (logprobs null, echo false, penalties 0).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class DiffusionOptions(BaseModel):
    """dlm's sampling options (as `DiffusionLM.generate` and `dlm sample` name them)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate per choice")
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None
    logprobs: None = None
    echo: Literal[False] = False
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    # dlm's own
    diffusing: bool = Field(False, description="stream a full canvas snapshot per step")
    sampler: str | None = None
    steps: int | None = Field(None, ge=1)
    block_length: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, gt=0, le=1)
    factor: float | None = Field(None, gt=0)
    cfg_scale: float | None = Field(None, ge=0)
    remasking: Literal["low_confidence", "random", "margin", "entropy"] | None = None
    cache: Literal["none", "prefix", "dual"] | None = None
    eta: float | None = Field(None, ge=0)
    softmask: bool | dict[str, float | str] | None = None
    feedback: Literal[False] | None = None
    options: dict[str, str | int | float | bool] = Field(default_factory=dict,
                                                         description="any other option of the sampler, by name")

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampler_options(self) -> dict[str, Any]:
        """The named sampler options that were given (not None)."""
        named = ("threshold", "factor", "cfg_scale", "remasking", "cache", "eta")
        return {k: getattr(self, k) for k in named if getattr(self, k) is not None}


class CompletionRequest(DiffusionOptions):
    """POST /v1/completions and /v1/fim/completions: `prompt` (a text or a list of texts) continued; `suffix`: text
    after the generated span (fill in the middle)."""

    prompt: str | list[str] = ""
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


class ChatRequest(DiffusionOptions):
    """POST /v1/chat/completions: `messages` through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def error_text(errors: list[dict]) -> str:
    """One line per pydantic error, naming the field: "steps: Input should be greater than or equal to 1"."""
    lines = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = "unknown field (not an option of this route)" if e.get("type") == "extra_forbidden" else e.get("msg", "")
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


class EditRequest(BaseModel):
    """POST /v1/edits: revise `text` in place (DiffusionLM.edit): `spans` ([start, end] or [start, end, n_tokens]
    character ranges to rewrite), or none ("auto": the model remasks and regenerates its least likely tokens), or
    a `template` with [MASK*n] spans instead of text."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    text: str | None = None
    template: str | None = None
    spans: list[list[int]] | None = None
    mode: Literal["auto", "rewrite"] | None = None
    max_rounds: int | None = Field(None, ge=1, le=64)  # None: DiffusionLM.edit's defaults
    threshold: float | None = Field(None, gt=0, le=1)
    budget: float | None = Field(None, gt=0, le=1)
    groups: int | None = Field(None, ge=1)
    sampler: str | None = None
    steps: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=2**63 - 1)
    stream: bool = False
    diffusing: bool = False
    softmask: bool | dict[str, float | str] | None = None
    feedback: Literal[False] | None = None
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    user: str | None = None
