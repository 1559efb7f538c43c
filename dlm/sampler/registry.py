"""Samplers by name, for the command line, `DiffusionLM.generate` and the docs.

Each sampler registers itself in its own file with a small config dataclass of its options:

    @register_sampler("ancestral", AncestralConfig, aliases=("ddpm",), description="MDLM's ancestral sampler")
    class AncestralSampler(Sampler): ...

`make_sampler(name, **options)` checks the options against that dataclass (an unknown option names the valid
ones; the dataclass's `__post_init__` refuses bad values) and builds the sampler from its fields. One class may be
registered under several names with different `defaults` (ancestral / ancestral_cache). The package's
`__init__` imports every sampler module, so importing anything from dlm.sampler fills the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    build: Callable  # a Sampler class or a factory, called with the config's fields as keywords
    config: type  # dataclass of the options
    aliases: tuple[str, ...]
    description: str
    defaults: dict = field(default_factory=dict)  # option values that differ from the config's defaults

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.config))

    def make(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"sampler '{self.name}' does not accept {', '.join(unknown)}; its options: "
                             f"{', '.join(self.options) or '(none)'}")
        cfg = self.config(**{**self.defaults, **options})
        return self.build(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})  # shallow: feedback modules stay


SAMPLERS: dict[str, SamplerSpec] = {}
ALIASES: dict[str, str] = {}


def register_sampler(name: str, config: type, aliases: tuple[str, ...] = (), description: str | None = None,
                     defaults: dict | None = None):
    """Decorator of a Sampler class (or factory function): make it available as `name` (and `aliases`)."""

    def register(build):
        if name in SAMPLERS or name in ALIASES:
            raise ValueError(f"two samplers are registered as '{name}'")
        doc = description or (build.__doc__ or "").strip().split("\n")[0]
        bad = set(defaults or {}) - {f.name for f in fields(config)}
        if bad:
            raise ValueError(f"sampler '{name}': defaults {sorted(bad)} are not fields of {config.__name__}")
        SAMPLERS[name] = SamplerSpec(name, build, config, tuple(aliases), doc, dict(defaults or {}))
        for alias in aliases:
            ALIASES[alias] = name
        return build

    return register


def sampler_spec(name: str) -> SamplerSpec:
    key = ALIASES.get(name, name)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; valid: {', '.join(sampler_names())}")
    return SAMPLERS[key]


def sampler_names(aliases: bool = True) -> list[str]:
    """Every registered name (for the CLI's --sampler choices), aliases after the names."""
    return list(SAMPLERS) + (list(ALIASES) if aliases else [])


def describe_samplers() -> list[tuple[str, str, str]]:
    """(name, aliases, one-line description) of every sampler, for the docs' table."""
    return [(s.name, ", ".join(s.aliases), s.description) for s in SAMPLERS.values()]


def make_sampler(name: str, **options):
    """Build a sampler by name (or alias) from its options, e.g. `make_sampler("remdm_cap", steps=64, eta=0.01)`.
    Raises a ValueError naming the valid options for an unknown one, and the config's error for a bad value."""
    return sampler_spec(name).make(**options)


# ------------------------------------------------------------------------------------------ shared option checks
def check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")


def check_temperature(temperature: float) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 and finite (0 = greedy)")


def check_top_p(top_p: float) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]; use 1.0 to turn nucleus filtering off")


@dataclass
class SamplingConfig:
    """Options most samplers share: the step budget, the temperature and nucleus filtering."""

    steps: int = 128
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        check_steps(self.steps)
        check_temperature(self.temperature)
        check_top_p(self.top_p)

