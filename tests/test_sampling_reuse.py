"""Work `DiffusionBackend.sample` no longer repeats at every step (`backends/attention.py`, inference mode) changes
no bit of any image: cross-attention keys/values projected once per conditioning tensor, attention processors called
directly, sampling in inference mode. A tiny random Stable Diffusion (16 px) and a tiny mini UNet, on the CPU.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from promptset.backends import attention, create_backend
from promptset.backends.base import image_generators
from promptset.backends.diversity import Cads, Diversity
from promptset.backends.mini import build_unet, mini_backend
from promptset.backends.sampling import TextConditioner, generate_batch, jobs_for

torch.set_flush_denormal(True)
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a car", "a photo of a cat", "a photo of a dog"]
STEPS = 6
DIVERSITY = {
    "cfg": None,
    "interval": Diversity(guidance_interval=(0.3, 0.8)),
    "cads": Diversity(cads=Cads(0.4, 0.8)),
    "interval+cads": Diversity(guidance_interval=(0.2, 1.0), cads=Cads(0.4, 0.9, noise_scale=0.5, psi=0.5)),
}


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return create_backend("sd", str(tiny_sd), device="cpu", sampler="ddim")


@pytest.fixture(scope="module")
def mini(sd):
    """The mini model's path: a bare tiny UNet wrapped in `MiniDenoiser` (pooled conditioning, attention mask)."""
    torch.manual_seed(0)
    unet = build_unet("tiny", latent_channels=4, sample_size=8, cross_attention_dim=sd.token_dim,
                      conditioning="pooled")
    return mini_backend(tokenizer=sd.tokenizer, text_encoder=sd.text_encoder, unet=unet,
                        autoencoder=sd.autoencoder, scheduler_config=sd.noise_scheduler.config, model_id="tiny-mini",
                        model_hash="0" * 16, resolution=16, max_length=sd.max_length, device=sd.device,
                        dtype=sd.dtype, sampler="ddpm", conditioning="pooled")  # fmt: skip


def _cross_attention(backend) -> list:
    return [m for m in backend.unet.modules() if getattr(m, "is_cross_attention", False)]


class ProjectionCalls:
    """Counts the real computations of the cross-attention `to_k` layers (a class-level `Linear.forward` patch,
    which the cache's wrapper calls on a miss)."""

    def __init__(self, backend, monkeypatch):
        self.modules = {id(m.to_k) for m in _cross_attention(backend)}
        self.count = 0
        linear_forward = torch.nn.Linear.forward

        def counting(module, x):
            self.count += id(module) in self.modules
            return linear_forward(module, x)

        monkeypatch.setattr(torch.nn.Linear, "forward", counting)


def _images(backend, diversity, *, reuse: bool, guidance: float = 4.0):
    backend.reuse_attention = reuse
    try:
        conditioner = TextConditioner(backend, PROMPTS)
        uncond = backend.encode_prompts([""])
        jobs = jobs_for([0, 1, 2], 2, seed=5)
        return generate_batch(backend, conditioner, jobs, steps=STEPS, guidance=guidance, factor=1, image_size=16,
                              uncond=uncond, micro_batch=4, diversity=diversity)  # fmt: skip
    finally:
        backend.reuse_attention = True


@pytest.mark.parametrize("kind", ["sd", "mini"])
@pytest.mark.parametrize("option", list(DIVERSITY))
def test_images_bit_identical_with_and_without_reuse(request, monkeypatch, kind, option):
    backend = request.getfixturevalue(kind)
    diversity = DIVERSITY[option]
    without = _images(backend, diversity, reuse=False)
    calls = ProjectionCalls(backend, monkeypatch)
    with_reuse = _images(backend, diversity, reuse=True)
    assert torch.equal(without, with_reuse)
    assert torch.isfinite(without).all() and without.std() > 0
    layers, batches = len(calls.modules), 2  # 6 jobs in micro batches of 4: two `sample` calls
    assert layers > 0
    if option == "cfg":  # cat(uncond, cond) at every step: projected once per call
        assert calls.count == layers * batches
    elif option == "interval":  # both and cond alternate, two entries: each projected once per call
        assert calls.count == 2 * layers * batches
    else:  # CADS: a new tensor at each annealed step, the unannealed steps reuse
        assert layers * batches < calls.count < layers * batches * STEPS


def test_guidance_one_and_no_uncond(sd):
    cond = sd.encode_prompts(PROMPTS[:2])
    noise = sd.initial_noise([1, 2])
    outs = []
    for reuse in (False, True):
        sd.reuse_attention = reuse
        outs.append(sd.sample(cond, None, noise, steps=3, guidance=5.0, generators=image_generators([1, 2])))
    sd.reuse_attention = True
    assert torch.equal(*outs)


def test_nothing_cached_or_patched_after_the_call(sd):
    keys = list(sd.unet.state_dict())
    cond = sd.encode_prompts(PROMPTS[:2])  # guidance 1: the UNet sees this very tensor at every step
    ref = weakref.ref(cond)
    out = sd.sample(cond, None, sd.initial_noise([3, 4]), steps=3, guidance=1.0, generators=image_generators([3, 4]))
    del cond
    gc.collect()
    assert ref() is None  # no reference to the conditioning outlives the call
    assert all("forward" not in m.__dict__ for m in sd.unet.modules())  # the class forwards again
    assert list(sd.unet.state_dict()) == keys
    assert not out.is_inference()  # an ordinary tensor: callers may change it in place
    out.mul_(2)


def test_state_dict_unchanged_inside_and_cache_cleared(sd):
    keys = list(sd.unet.state_dict())
    states = torch.randn(2, 77, sd.token_dim)
    layer = _cross_attention(sd)[0].to_k
    with torch.no_grad(), attention.reuse_attention(sd.unet) as cache:
        assert list(sd.unet.state_dict()) == keys
        assert layer(states) is layer(states)
        assert cache.hits == 1 and cache.misses == 1 and cache.cached_tensors() == 1
    assert cache.cached_tensors() == 0
    assert "forward" not in layer.__dict__


def test_cache_keyed_by_the_tensor_itself(sd):
    """A key by shape, by value of the address (data_ptr or id, without holding the tensor), or by anything short of
    the object itself would return another tensor's keys here."""
    layer = _cross_attention(sd)[0].to_k
    with torch.no_grad(), attention.reuse_attention(sd.unet) as cache:
        base = torch.randn(2, 5, sd.token_dim)
        for x in (base, base.clone() + 1, base.flip(0), torch.randn(2, 5, sd.token_dim)):  # same shape, new values
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        square = torch.randn(2, sd.token_dim, sd.token_dim)
        view = square.transpose(1, 2)  # same data_ptr and shape, other values
        assert torch.equal(layer(square), F.linear(square, layer.weight))
        assert torch.equal(layer(view), F.linear(view, layer.weight))
        for _ in range(20):  # freed tensors: their addresses and ids come back for new ones
            x = torch.randn(2, 5, sd.token_dim)
            assert torch.equal(layer(x), F.linear(x, layer.weight))
            del x
        assert cache.hits == 0
        with torch.enable_grad():  # training and inversion: gradients flow into the states, nothing is reused
            x = torch.randn(2, 5, sd.token_dim, requires_grad=True)
            first = layer(x)
            assert first.grad_fn is not None and layer(x) is not first
        assert cache.hits == 0


def test_compiled_unet_left_alone(sd):
    class Wrapped(torch.nn.Module):  # torch.compile's wrapper is recognised by its `_orig_mod`
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    with attention.reuse_attention(Wrapped(sd.unet)) as cache:
        assert cache is None
        assert all("forward" not in m.__dict__ for m in sd.unet.modules())
