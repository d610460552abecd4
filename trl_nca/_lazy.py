"""Names of a package imported on first use (as TRL's own package does), so that importing the package, and the
command's `--help`, load neither torch nor transformers."""

from __future__ import annotations

import importlib


def lazy_getattr(package: str, namespace: dict, exports: dict[str, str]):
    """A module `__getattr__` for `package` that imports each name of `exports` (name -> submodule) from its submodule
    on first use and keeps it in the package's `namespace`."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    return __getattr__
