"""The frozen text-to-image model behind every stage: tokenizer, text encoder, denoiser, autoencoder, schedulers.

`sd` and `mini` only differ in how they load these parts; inversion, generation and pretraining all talk to
`DiffusionBackend`. Placeholder tokens never touch the model: their vectors are injected into the output of the
text encoder's token-embedding layer by a forward hook, so every weight of the model stays bit-for-bit frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..transfer import to_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a `--dtype` flag to a torch dtype, refusing half precision on CPU (slow or unsupported there)."""
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of {sorted(DTYPES)}")
    if device.type == "cpu" and name != "fp32":
        raise UserError(f"--dtype {name} on CPU is very slow or unsupported; pass --dtype fp32 on CPU")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None) picks CUDA when available, else CPU. A bare `cuda` under a launcher is `cuda:LOCAL_RANK`."""
    import os

    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a valid torch device (try cpu, cuda, cuda:0)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; pass --device cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(name: str, where: str) -> None:
    """Refuse a prediction type the objective does not implement (it would silently train as another)."""
    if name not in PREDICTION_TYPES:
        raise UserError(f"{where}: prediction_type {name!r} is not supported (one of {list(PREDICTION_TYPES)})")


def training_target(noise_scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser learns to predict at timestep t: the noise (epsilon) or the velocity v (Salimans & Ho)."""
    kind = noise_scheduler.config.prediction_type
    check_prediction_type(kind, "noise scheduler")
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(x0, noise, t)
    return noise


class Autoencoder(nn.Module):
    """Uniform view of a VAE: images in [0, 1] <-> latents scaled to about unit variance."""

    downscale: int = 1
    latent_channels: int = 3

    def encode_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (mean, std) of the latent distribution; std is None for deterministic encoders."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class KLAutoencoder(Autoencoder):
    """diffusers `AutoencoderKL` (Stable Diffusion's VAE): inputs in [-1, 1], latents times `scaling_factor`."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    def encode_dist(self, images):
        dist = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist
        return dist.mean * self.scaling_factor, dist.std * self.scaling_factor

    def decode(self, latents):
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move a frozen part to the device, casting only when its dtype differs (diffusers warns on every cast)."""
    module = module.to(device)
    param = next(module.parameters(), None)
    if param is not None and param.dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


@dataclass
class PromptLayout:
    """Token ids of a template with `num_vectors` placeholder slots from `slot_start`, on the model's device."""

    input_ids: torch.Tensor  # (L,)
    attention_mask: torch.Tensor  # (L,)
    slot_start: int
    num_vectors: int


class DiffusionBackend:
    """A frozen conditional denoiser plus everything needed to train prompt vectors and to sample from them.

    Attributes:
        kind: backend name (`sd`, `mini`).
        model_id: what the user passed to load the model.
        model_hash: content fingerprint of the model's files (recorded in every artifact).
        resolution: native image size in pixels.
    """

    def __init__(
        self,
        *,
        kind: str,
        tokenizer,
        text_encoder: nn.Module,
        unet: nn.Module,
        autoencoder: Autoencoder,
        noise_scheduler,
        sample_scheduler,
        model_id: str,
        model_hash: str,
        resolution: int,
        max_length: int,
        device: torch.device,
        dtype: torch.dtype,
        use_attention_mask: bool = False,
        zero_padding_states: bool = False,
    ):
        self.kind = kind
        self.tokenizer = tokenizer
        self.text_encoder = _place(text_encoder, device, dtype)
        self.unet = _place(unet, device, dtype)
        self.autoencoder = _place(autoencoder, device, dtype)
        self.noise_scheduler = noise_scheduler
        self.sample_scheduler = sample_scheduler
        self.model_id = model_id
        self.model_hash = model_hash
        self.resolution = int(resolution)
        self.max_length = int(max_length)
        self.device = device
        self.dtype = dtype
        self.use_attention_mask = use_attention_mask
        self.zero_padding_states = zero_padding_states
        self._slot_override: tuple[int, torch.Tensor] | None = None
        self.token_embedding: nn.Embedding = self.text_encoder.get_input_embeddings()
        self.token_embedding.register_forward_hook(self._inject_slots)
        self.prediction_type = getattr(noise_scheduler.config, "prediction_type", "epsilon")
        check_prediction_type(self.prediction_type, f"the {kind} model's noise scheduler")

    def compile_denoiser(self, flag: str = "--compile") -> None:
        """`torch.compile` the UNet with static shapes. Each new input shape compiles on its first call (tens of
        seconds on a CPU, also on a GPU for SD-sized models); later calls run the compiled kernels. Outputs equal
        eager mode up to float rounding, not bit for bit. Call after `enable_gradient_checkpointing`."""
        import shutil

        if self.compiled:
            return
        if self.device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise UserError(f"{flag} on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop {flag}")
        self.unet = torch.compile(self.unet, dynamic=False)

    @property
    def compiled(self) -> bool:
        return hasattr(self.unet, "_orig_mod")  # torch.compile's wrapper (no torch._dynamo import needed to tell)

    # ----------------------------------------------------------------------------------------------------------
    # text side
    @property
    def token_dim(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def latent_size(self) -> int:
        return self.resolution // self.autoencoder.downscale

    def _special_ids(self) -> tuple[int, int, int]:
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        return bos, eos, pad

    def word_ids(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def layout(self, template: str, num_vectors: int) -> PromptLayout:
        """Tokenize `template` (which holds `{token}`) with `num_vectors` placeholder slots in place of `{token}`."""
        if template.count("{token}") != 1:
            raise UserError(
                f"--template {template!r} must contain '{{token}}' exactly once, e.g. 'a photo of {{token}}'"
            )
        prefix, suffix = template.split("{token}")
        prefix_ids = self.word_ids(prefix.strip()) if prefix.strip() else []
        suffix_ids = self.word_ids(suffix.strip()) if suffix.strip() else []
        bos, eos, pad = self._special_ids()
        ids = [bos, *prefix_ids, *([pad] * num_vectors), *suffix_ids, eos]
        if len(ids) > self.max_length:
            raise UserError(
                f"--template {template!r} with {num_vectors} vectors is longer than {self.max_length} tokens"
            )
        mask = [1] * len(ids) + [0] * (self.max_length - len(ids))
        ids = ids + [pad] * (self.max_length - len(ids))
        # on the model's device once: every training step and sampler batch encodes this same template
        return PromptLayout(torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device),
                            1 + len(prefix_ids), num_vectors)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain prompts (no placeholders) to padded ids and attention mask, both (B, L)."""
        out = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return out.input_ids, out.attention_mask

    def _inject_slots(self, module, args, output):
        if self._slot_override is None:
            return output
        start, vectors = self._slot_override  # vectors: (B, V, D)
        v = vectors.shape[1]
        return torch.cat([output[:, :start], vectors.to(output.dtype), output[:, start + v :]], dim=1)

    @contextlib.contextmanager
    def slots(self, start: int, vectors: torch.Tensor) -> Iterator[None]:
        """Within the block, token positions [start, start+V) take `vectors` (B, V, D) instead of the table rows."""
        self._slot_override = (start, vectors)
        try:
            yield
        finally:
            self._slot_override = None

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, L) to the conditioning states (B, L, D_text) the denoiser cross-attends to."""
        kwargs = {}
        if self.use_attention_mask and attention_mask is not None:
            kwargs["attention_mask"] = to_device(attention_mask, self.device)
        states = self.text_encoder(to_device(input_ids, self.device), **kwargs).last_hidden_state
        if self.zero_padding_states and attention_mask is not None:  # the denoiser reads zero states as absent
            states = states * kwargs["attention_mask"].unsqueeze(-1).to(states.dtype)
        return states

    def encode_placeholder_prompts(self, layout: PromptLayout, vectors: torch.Tensor) -> torch.Tensor:
        """One template, per-sample placeholder vectors (B, V, D) -> conditioning states (B, L, D_text).

        Gradients flow into `vectors`; nothing in the model changes.
        """
        b = vectors.shape[0]
        ids = layout.input_ids.unsqueeze(0).expand(b, -1)  # (B, L)
        mask = layout.attention_mask.unsqueeze(0).expand(b, -1)
        with self.slots(layout.slot_start, vectors):
            return self.encode_ids(ids, mask)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids, mask)

    def initializer_vector(self, word: str, flag: str = "--initializer") -> torch.Tensor:
        """The frozen embedding row of a single-token initializer word (D,); refuses a multi-token word."""
        ids = self.word_ids(word)
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise UserError(
                f"{flag}: initializer {word!r} is {len(ids)} tokens {pieces} in this model's tokenizer, not one; "
                "pass a single-token word per class with --initializers (comma-separated, in class order) "
                "or one word for all classes with --initializer"
            )
        return self.token_embedding.weight[ids[0]].detach().float().clone()

    # ----------------------------------------------------------------------------------------------------------
    # image side
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [0, 1] (N, 3, H, W) -> latent (mean, std) on CPU in fp32 (std None if deterministic)."""
        means, stds = [], []
        for i in range(0, len(images), batch_size):
            mean, std = self.autoencoder.encode_dist(images[i : i + batch_size].to(self.device, self.dtype))
            means.append(mean.float().cpu())
            stds.append(std.float().cpu() if std is not None else None)
        mean = torch.cat(means)
        std = None if stds[0] is None else torch.cat(stds)
        return mean, std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents.to(self.dtype)).float()

    # ----------------------------------------------------------------------------------------------------------
    # the denoising objective (Ho et al. 2020; Rombach et al. 2022), the loss textual inversion minimises
    def denoising_loss(
        self, latents: torch.Tensor, states: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Per-sample MSE between the denoiser's prediction and its target at a uniform random timestep. (B,)"""
        b = latents.shape[0]
        noise = to_device(torch.randn(latents.shape, generator=generator, device=generator.device), self.device)
        t = to_device(
            torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator, device=generator.device
            ),
            self.device,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = training_target(self.noise_scheduler, latents, noise, t)
        pred = self.unet(noisy.to(self.dtype), t, encoder_hidden_states=states.to(self.dtype)).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)

    # ----------------------------------------------------------------------------------------------------------
    # sampling: the same update as diffusers' StableDiffusionPipeline.__call__, with per-image initial noise
    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """One CPU generator per image, so an image depends on its seed only (never on batch size). (B, c, h, w)"""
        shape = (self.autoencoder.latent_channels, self.latent_size, self.latent_size)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        noise: torch.Tensor,
        *,
        steps: int,
        guidance: float,
    ) -> torch.Tensor:
        """Denoise `noise` (B, c, h, w) under conditioning states `cond` (B, L, D) with classifier-free guidance.

        Returns images in [0, 1], (B, 3, H, W) fp32 on the backend's device.
        """
        scheduler = type(self.sample_scheduler).from_config(self.sample_scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        latents = to_device(noise, self.device).float() * scheduler.init_noise_sigma
        use_cfg = uncond is not None and guidance != 1.0
        states = torch.cat([uncond, cond]) if use_cfg else cond
        states = states.to(self.dtype)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents] * 2) if use_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            pred = self.unet(model_in.to(self.dtype), t, encoder_hidden_states=states).sample.float()
            if use_cfg:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            latents = scheduler.step(pred, t, latents).prev_sample
        return self.decode_latents(latents)
