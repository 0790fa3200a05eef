"""promptset: distill an image dataset into one learned text prompt per class (D3M, arXiv 2403.07142).

The Python API has the same verbs as the CLI: `select`, `invert`, `generate`, `export`, `budget`, `evaluate`,
`report`, `pretrain`, `demo`. They are imported lazily so `import promptset` stays cheap.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# verbs whose module has the verb's name: promptset.select is both the module and, called, the function
_STAGES = ("select", "invert", "generate", "export", "budget", "evaluate", "report", "pretrain", "demo")
_OTHERS = {
    "create_backend": ("promptset.backends", "create_backend"),
    "PromptSet": ("promptset.artifacts", "PromptSet"),
}


class _StageModule(types.ModuleType):
    """A stage module that runs its verb when called: `promptset.select(...)` is `promptset.select.select(...)`.

    Importing a submodule binds it to the package attribute of the same name, so the verb and the module must share
    `promptset.select`: calling it runs the verb, attribute access reaches the module (`promptset.select.stitch`).
    """

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _stage(name: str) -> property:
    def get(package) -> types.ModuleType:
        module = importlib.import_module(f"{__name__}.{name}")
        module.__class__ = _StageModule
        return module

    def bind(package, module: types.ModuleType) -> None:
        """The import system binding the freshly imported submodule: make it callable (get imports it again)."""
        module.__class__ = _StageModule

    return property(get, bind, doc=f"`promptset.{name}` module; calling it runs `promptset.{name}.{name}`")


class _Package(types.ModuleType):
    """The package's module type, so its stage attributes can be properties (see `_StageModule`)."""


for _name in _STAGES:
    setattr(_Package, _name, _stage(_name))
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _OTHERS:
        module, attr = _OTHERS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'promptset' has no attribute {name!r}")


__all__ = ["__version__", *_STAGES, *_OTHERS]
