"""Work the denoiser repeats at every sampling step without need, skipped for one `sample` call, bit for bit.

Inside `reuse_attention(unet)`:

- every cross-attention module (diffusers' `Attention` with `is_cross_attention`) keeps the outputs of its `to_k`
  and `to_v` for the last `ENTRIES` conditioning tensors it saw. The conditioning states are the same tensor object
  at every step of a sampling call (CFG's cat(uncond, cond), or cond alone; with a guidance interval the two
  alternate), so their keys and values are projected once per call instead of once per step. A cached output is
  the very tensor the layer returned for that input, so the arithmetic is unchanged. Entries are keyed by the
  input's identity (`is`) while holding a strong reference to it, so a freed tensor's address can never be reused by
  another tensor and hit; they are dropped when the block ends. With CADS every step makes a new tensor: no hits.
- every diffusers `Attention` calls its processor directly when no extra keyword arguments are passed, skipping the
  `inspect.signature` of the processor that `Attention.forward` makes at each call to filter those arguments.

Both are instance attributes (`forward`) set on entry and removed on exit: no state_dict key, parameter or processor
changes. With gradients enabled (training, inversion) the cache is bypassed, and a compiled UNet is left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

ENTRIES = 2  # conditioning tensors remembered per projection: both and cond, which a guidance interval alternates


class ProjectionCache:
    """The last `ENTRIES` (input, output) pairs of the wrapped projections, per module; `hits`/`misses` counted."""

    def __init__(self):
        self.slots: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.hits = 0
        self.misses = 0

    def cached_tensors(self) -> int:
        return sum(len(s) for s in self.slots.values())

    def clear(self) -> None:
        for slot in self.slots.values():
            slot.clear()

    def wrap(self, module: nn.Module):
        """A `forward` for `module` that returns the remembered output for an input it saw (the same object)."""
        forward = module.forward  # the bound method of the class (checked: no instance attribute before)
        slot = self.slots.setdefault(module, [])

        def cached_forward(x, *args, **kwargs):
            if args or kwargs or torch.is_grad_enabled():
                return forward(x, *args, **kwargs)
            for key, out in slot:
                if key is x:
                    self.hits += 1
                    return out
            out = forward(x)
            self.misses += 1
            slot.insert(0, (x, out))  # the strong reference to x keeps its address from being reused
            del slot[ENTRIES:]
            return out

        return cached_forward


def _direct_forward(attn: nn.Module, original):
    """`Attention.forward` without its per-call `inspect.signature`: with no extra keyword arguments it would filter
    an empty dict and call the processor with exactly these arguments; with any, the original runs."""

    def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
        if cross_attention_kwargs:
            return original(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
        return attn.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask)

    return forward


def _attention_class():
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a dependency; a denoiser without it has nothing to reuse
        return None
    return Attention


def _free(module) -> bool:
    """No instance `forward` already (e.g. an offloading hook's), so ours can be set and removed cleanly."""
    return isinstance(module, nn.Module) and "forward" not in module.__dict__


@contextlib.contextmanager
def reuse_attention(unet: nn.Module, *, enabled: bool = True) -> Iterator[ProjectionCache | None]:
    """Within the block, `unet`'s cross-attention keys/values are projected once per conditioning tensor and its
    attention modules call their processors directly (see the module docstring). Yields the cache (None when off).

    Off (a plain block) when `enabled` is False or the UNet is compiled (`torch.compile` would trace the patches).
    """
    attention = _attention_class()
    if not enabled or attention is None or hasattr(unet, "_orig_mod"):
        yield None
        return
    cache = ProjectionCache()
    patched: list[tuple[nn.Module, object]] = []
    try:
        for module in unet.modules():
            if not isinstance(module, attention):
                continue
            if type(module).forward is attention.forward and _free(module):
                module.forward = _direct_forward(module, module.forward)
                patched.append((module, module.forward))
            if getattr(module, "is_cross_attention", False):
                for proj in (getattr(module, "to_k", None), getattr(module, "to_v", None)):
                    if _free(proj):
                        proj.forward = cache.wrap(proj)
                        patched.append((proj, proj.forward))
        yield cache
    finally:
        for module, forward in patched:
            if module.__dict__.get("forward") is forward:  # ours still (not replaced meanwhile by someone else)
                del module.forward  # the class's forward again
        cache.clear()
