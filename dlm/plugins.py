"""Discovery: the registries fill themselves, from dlm's own modules and from installed plugins.

A registry (`PROCESSES`, `SAMPLERS`, `FAMILIES`) is a `Registry`: a dict that, the first time it is read, imports
every module of its package (so a new process or sampler is one file in `dlm/process/` or `dlm/sampler/`, with
no import line to add anywhere) and then the plugins.

A plugin is any installed package that declares an entry point in the group `dlm.plugins`, e.g. in its
pyproject.toml:

    [project.entry-points."dlm.plugins"]
    my_methods = "my_package.methods"

Each entry point names a module; dlm imports it once, and its decorators (`@register_process`,
`@register_sampler`, `dlm.network.families.register`) add what it defines to the registries, so that
`dlm train process=NAME`, `dlm sample --sampler NAME` and `DiffusionLM.generate(sampler=NAME)` find it.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import metadata

ENTRY_POINT_GROUP = "dlm.plugins"

_loaded: dict[str, object] = {}  # entry point value -> its module, once imported
_loading = False


class PluginError(ValueError):
    """A plugin named by a `dlm.plugins` entry point could not be imported."""


def plugin_entry_points() -> list:
    """The installed `dlm.plugins` entry points (importlib.metadata reads sys.path as it is now)."""
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_plugins() -> list[str]:
    """Import every `dlm.plugins` entry point's module not imported yet; returns the values imported by this
    call. A module that fails to import is an error naming the entry point (uninstall or fix that package)."""
    global _loading
    if _loading:  # a plugin's own imports read a registry: the plugins are already being loaded
        return []
    _loading = True
    new = []
    try:
        for ep in plugin_entry_points():
            if ep.value in _loaded:
                continue
            try:
                _loaded[ep.value] = importlib.import_module(ep.value.split(":")[0])
            except Exception as e:  # noqa: BLE001  (any failure of third-party code: one clear message)
                dist = getattr(getattr(ep, "dist", None), "name", "?")
                raise PluginError(f"the dlm plugin '{ep.name} = {ep.value}' (package {dist}, entry point group "
                                  f"'{ENTRY_POINT_GROUP}') failed to import: {type(e).__name__}: {e}; fix or "
                                  "uninstall that package") from e
            new.append(ep.value)
    finally:
        _loading = False
    return new


def import_package_modules(package: str) -> None:
    """Import every module of `package` (not sub-packages' contents), so that their decorators run."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")


class Registry(dict):
    """name -> registered object. The first read imports every module of `package` (None: none) and the
    plugins; registering (plain item assignment, `registered`) never triggers discovery."""

    def __init__(self, package: str | None = None):
        super().__init__()
        self.package = package
        self._discovered = False

    def discover(self) -> "Registry":
        """Fill the registry (once): dlm's own modules of the package, then the plugins."""
        if not self._discovered:
            self._discovered = True  # first: the imports below register into this dict and may read it
            if self.package is not None:
                import_package_modules(self.package)
            load_plugins()
        return self

    def registered(self, name: str):
        """The entry registered as `name` so far, or None, without discovery (for the register decorators)."""
        return dict.get(self, name)

    def __getitem__(self, key):
        return dict.__getitem__(self.discover(), key)

    def __contains__(self, key) -> bool:
        return dict.__contains__(self.discover(), key)

    def __iter__(self):
        return dict.__iter__(self.discover())

    def __len__(self) -> int:
        return dict.__len__(self.discover())

    def get(self, key, default=None):
        return dict.get(self.discover(), key, default)

    def keys(self):
        return dict.keys(self.discover())

    def values(self):
        return dict.values(self.discover())

    def items(self):
        return dict.items(self.discover())

    def __repr__(self) -> str:
        return f"Registry({self.package!r}, {dict.__repr__(self)})"
