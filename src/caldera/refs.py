"""Code named in a run file: a built-in name from a table, or an import path 'package.module:attr'."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from caldera.errors import ConfigError


def resolve(ref: str, registry: Mapping[str, Any], key: str) -> Any:
    """Return the object a config names: a built-in name from ``registry`` or 'package.module:attr'."""
    if ref in registry:
        return registry[ref]
    if ":" not in ref:
        close = difflib.get_close_matches(ref, list(registry), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"{key} = {ref!r}: not a built-in name; {hint}built-ins: {', '.join(sorted(registry))}; "
            "or give an import path such as 'my_pkg.models:Net'"
        )
    module_name, attr = ref.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError, TypeError) as exc:  # also '' and relative names such as '.x'
        raise ConfigError(
            f"{key} = {ref!r}: cannot import module '{module_name}' ({exc}); check the spelling and that the "
            "package is installed or on PYTHONPATH"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" Did you mean '{module_name}:{close[0]}'?" if close else ""
            raise ConfigError(f"{key} = {ref!r}: module '{module_name}' has no '{attr}'.{hint}")
        obj = getattr(obj, part)
    return obj


class Builtins(Mapping[str, Any]):
    """A table of built-in names, each 'package.module:attr', imported at its first lookup.

    Knowing a name (``in``, iteration) imports nothing, so the config can check names against the table without
    importing the layers above it; looking one up imports the module that defines it. ``table[name] = obj``
    adds an object directly (what ``caldera.parallel.register`` does for a user's strategy)."""

    def __init__(self, refs: dict[str, str]) -> None:
        self._refs: dict[str, str | None] = dict(refs)
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            ref = self._refs[name]  # KeyError for a name that is not in the table, as a dict
            assert ref is not None  # an entry without a path was added as an object
            module, _, attr = ref.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._loaded[name] = obj
        return self._loaded[name]

    def __setitem__(self, name: str, obj: Any) -> None:
        self._refs.setdefault(name, None)
        self._loaded[name] = obj

    def __contains__(self, name: object) -> bool:
        return name in self._refs  # Mapping's default would look the name up, importing its module

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"Builtins({self._refs!r})"
