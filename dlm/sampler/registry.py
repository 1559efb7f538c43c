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
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Callable

from dlm.plugins import Registry


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

    def make(self, label: str | None = None, **options):
        """The sampler built from its config (the defaults, then `options`). label: the name the user typed (an
        alias or the name), which the sampler then carries (`sampler.name`) so that refusals name it."""
        label = label or self.name
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"sampler '{label}' does not accept {', '.join(unknown)}; its options: "
                             f"{', '.join(self.options) or '(none)'}")
        cfg = self.config(**{**self.defaults, **options})
        from_config = getattr(self.build, "from_config", None)
        if from_config is not None:  # a Sampler class: built from its config (dlm.sampler.base.Sampler.from_config)
            sampler = from_config(cfg)
        else:  # a factory function: called with the config's fields (shallow: feedback modules stay)
            sampler = self.build(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})
        sampler.name = label
        if getattr(sampler, "config", None) is None:
            sampler.config = cfg
        return sampler

    def parse_options(self, items: list[str], label: str | None = None) -> dict:
        """`key=value` strings (the CLI's `-o`) -> options, each value parsed by its config field's type; an unknown
        key or a value of the wrong type is refused naming the sampler's options."""
        label = label or self.name
        types = field_types(self.config)
        out = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"-o {item!r} is not of the form key=value (e.g. -o steps=32)")
            if key not in types or key not in self.options:
                raise ValueError(f"sampler '{label}' has no option '{key}'; its options: "
                                 f"{', '.join(self.settable_options()) or '(none)'}")
            out[key] = parse_value(text.strip(), types[key], f"option {key} of sampler '{label}'")
        return out

    def settable_options(self) -> list[str]:
        """The options that a `key=value` string can set (numbers, booleans, strings, tuples of them)."""
        types = field_types(self.config)
        return [name for name in self.options if _parsable(types.get(name))]


# Filled by discovery (dlm.plugins): every module of dlm/sampler/ and every installed plugin, on first read.
SAMPLERS: Registry = Registry("dlm.sampler")
ALIASES: dict[str, str] = {}  # alias -> registered name (read it after SAMPLERS.discover())


def register_sampler(name: str, config: type, aliases: tuple[str, ...] = (), description: str | None = None,
                     defaults: dict | None = None):
    """Decorator of a Sampler class (or factory function): make it available as `name` (and `aliases`). A Sampler
    class gets `config` as its `config_class` (the first one it is registered with), so `Cls(*args, **options)`
    builds it from that dataclass too (`Sampler.__init__`)."""

    def register(build):
        if SAMPLERS.registered(name) is not None or name in ALIASES:
            raise ValueError(f"two samplers are registered as '{name}'")
        doc = description or (build.__doc__ or "").strip().split("\n")[0]
        bad = set(defaults or {}) - {f.name for f in fields(config)}
        if bad:
            raise ValueError(f"sampler '{name}': defaults {sorted(bad)} are not fields of {config.__name__}")
        SAMPLERS[name] = SamplerSpec(name, build, config, tuple(aliases), doc, dict(defaults or {}))
        from dlm.sampler.base import Sampler

        if isinstance(build, type) and issubclass(build, Sampler) and build is not Sampler \
                and "config_class" not in vars(build):  # built from this config (Sampler.__init__)
            build.config_class = config
        for alias in aliases:
            ALIASES[alias] = name
        return build

    return register


def sampler_spec(name: str) -> SamplerSpec:
    SAMPLERS.discover()  # dlm's samplers and the plugins' (and their aliases)
    key = ALIASES.get(name, name)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; valid: {', '.join(sampler_names())}")
    return SAMPLERS[key]


def sampler_names(aliases: bool = True) -> list[str]:
    """Every registered name (for the CLI's --sampler choices), aliases after the names."""
    return list(SAMPLERS) + (list(ALIASES) if aliases else [])  # list(SAMPLERS) discovers first


def describe_samplers() -> list[tuple[str, str, str]]:
    """(name, aliases, one-line description) of every sampler, for the docs' table."""
    return [(s.name, ", ".join(s.aliases), s.description) for s in SAMPLERS.values()]


def make_sampler(name: str, **options):
    """Build a sampler by name (or alias) from its options, e.g. `make_sampler("remdm_cap", steps=64, eta=0.01)`.
    Raises a ValueError naming the valid options for an unknown one, and the config's error for a bad value."""
    return sampler_spec(name).make(name, **options)


# ------------------------------------------------------------------------------------------ key=value options
_SCALARS = (bool, int, float, str)


def field_types(config: type) -> dict:
    """name -> type of a config dataclass's fields (string annotations resolved where they can be)."""
    try:
        return typing.get_type_hints(config)
    except Exception:  # noqa: BLE001  (an annotation naming something its module does not import)
        return {f.name: f.type for f in fields(config)}


def _parsable(kind) -> bool:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if kind in _SCALARS:
        return True
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return len(args) == 1 and _parsable(args[0])
    return typing.get_origin(kind) is tuple and bool(args) and args[0] in _SCALARS


def parse_value(text: str, kind, what: str):
    """`text` as a value of type `kind` (bool, int, float, str, X | None, tuple[X, ...]); a clear error otherwise."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        if len(inner) == 1:
            return parse_value(text, inner[0], what)
    elif origin is tuple and args and args[0] in _SCALARS:
        return tuple(parse_value(t.strip(), args[0], what) for t in text.split(",") if t.strip())
    elif kind is bool:
        if text.lower() in ("true", "yes", "on", "1"):
            return True
        if text.lower() in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{what} is a bool: give true or false, not {text!r}")
    elif kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{what} is a{'n' if kind is int else ''} {kind.__name__}, not {text!r}") from None
    raise ValueError(f"{what} ({kind}) cannot be set from a key=value string")


# ------------------------------------------------------------------------------------------ shared option checks
def check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature={temperature!r} must be a number (0 = greedy)")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 and finite (0 = greedy)")


def check_top_p(top_p: float) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
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

