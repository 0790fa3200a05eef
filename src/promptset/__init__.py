"""promptset: distill an image dataset into one learned text prompt per class (D3M, arXiv 2403.07142).

The Python API has the same verbs as the CLI: `select`, `invert`, `generate`, `export`, `budget`, `evaluate`,
`report`, `pretrain`, `demo`. They are imported lazily so `import promptset` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_VERBS = {
    "select": ("promptset.select", "select"),
    "invert": ("promptset.invert", "invert"),
    "generate": ("promptset.generate", "generate"),
    "export": ("promptset.export", "export"),
    "budget": ("promptset.budget", "budget"),
    "evaluate": ("promptset.evaluate", "evaluate"),
    "report": ("promptset.report", "report"),
    "pretrain": ("promptset.pretrain", "pretrain"),
    "demo": ("promptset.demo", "demo"),
    "create_backend": ("promptset.backends", "create_backend"),
    "PromptSet": ("promptset.artifacts", "PromptSet"),
}


def __getattr__(name: str):
    if name in _VERBS:
        module, attr = _VERBS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'promptset' has no attribute {name!r}")


__all__ = ["__version__", *_VERBS]
