"""promptset: distill an image dataset into one learned text prompt per class (D3M, arXiv 2403.07142).

The Python API has the same verbs as the CLI: `select`, `invert`, `generate`, `export`, `budget`, `evaluate`,
`report`, `pretrain`, `teacher`, `pack`, `materialize`, `coverage`, `demo`. Each is a plain function (its module is
`promptset.stages.<verb>`, `demo` is in `promptset.pipeline`), imported on first use so `import promptset` stays
cheap. Any verb refuses an option it does not know, naming the nearest one: `promptset.invert(stepz=5)` fails instead
of training 500 steps.

Every verb, like the CLI, fixes torch's CPU thread count once per process before its first torch work
(PROMPTSET_THREADS, else OMP_NUM_THREADS, else torch's default) and records it with what it writes;
`promptset.set_threads(n)` chooses another count for the whole process. Import promptset before torch so that
OpenMP's waiting threads sleep instead of spinning (fast on a busy machine); see `promptset.threads`.
"""

from __future__ import annotations

import importlib

from .threads import choose_waiting as _choose_waiting

# before anything loads torch (and OpenMP): waiting threads spin on an idle machine, sleep on a busy one (threads.py)
_choose_waiting()

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    **{verb: (f"promptset.stages.{verb}", verb)
       for verb in ("select", "invert", "generate", "export", "budget", "evaluate", "report", "caption", "pretrain",
                    "teacher", "pack", "materialize", "coverage")},
    "demo": ("promptset.pipeline", "demo"),
    "create_backend": ("promptset.backends", "create_backend"),
    "PromptSet": ("promptset.artifacts", "PromptSet"),
    "UserError": ("promptset.errors", "UserError"),
    "set_threads": ("promptset.threads", "set_threads"),
}  # fmt: skip


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'promptset' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]
