"""The frozen text-to-image model behind every stage: tokenizer, text encoder, denoiser, autoencoder, schedulers.

`sd` and `mini` only differ in how they load these parts; inversion, generation and pretraining all talk to
`DiffusionBackend`. Placeholder tokens never touch the model: their vectors are injected into the output of the
text encoder's token-embedding layer by a forward hook, so every weight of the model stays bit-for-bit frozen.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import dtype_name, resolve_device, resolve_dtype, to_device
from ..errors import UserError
from ..precision import check_finite
from .attention import reuse_attention

__all__ = ["DiffusionBackend", "resolve_device", "resolve_dtype", "denoising_objective", "image_generators"]

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


def snr_weights(noise_scheduler, gamma: float) -> torch.Tensor:
    """min-SNR-gamma loss weight per timestep (Hang et al. 2023) for the scheduler's prediction type. (T,) fp32"""
    kind = noise_scheduler.config.prediction_type
    check_prediction_type(kind, "noise scheduler")
    alpha_bar = noise_scheduler.alphas_cumprod.to(torch.float64)
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return (clipped / (snr + 1) if kind == "v_prediction" else clipped / snr).float()


def denoising_objective(
    unet: nn.Module,
    noise_scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    states: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one denoising loss (Ho et al. 2020; Rombach et al. 2022), for pretraining and for textual inversion.

    Per-sample MSE between the denoiser's prediction on x_t = add_noise(x0, noise, t) and its target (epsilon or
    v), times `weight[t]` (e.g. `snr_weights`) when given. x0, noise (B, c, h, w); t (B,); states (B, L, D). (B,)
    """
    noisy = noise_scheduler.add_noise(x0, noise, t)
    target = training_target(noise_scheduler, x0, noise, t)
    pred = unet(noisy.to(dtype), t, encoder_hidden_states=states.to(dtype)).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
    return loss * weight[t] if weight is not None else loss


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: its initial noise and every noise a stochastic sampler adds come from it."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


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
        self.reuse_attention = True  # `sample` projects cross-attention keys/values once per call (attention.py)
        self.token_embedding: nn.Embedding = self.text_encoder.get_input_embeddings()
        self.token_embedding.register_forward_hook(self._inject_slots)
        self.prediction_type = getattr(noise_scheduler.config, "prediction_type", "epsilon")
        check_prediction_type(self.prediction_type, f"the {kind} model's noise scheduler")

    def describe(self) -> str:
        """One line on what was loaded: device, dtype, prediction type, native resolution (printed at load)."""
        dtype = dtype_name(self.dtype) + (" with TF32 matmuls" if self.device.type == "cuda" and
                                          self.dtype == torch.float32 else "")
        return (f"{self.kind} model {self.model_id} on {self.device} in {dtype}: prediction type "
                f"{self.prediction_type}, native resolution {self.resolution} px (latents "
                f"{self.autoencoder.latent_channels}x{self.latent_size}x{self.latent_size})")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the UNet's activations in the backward pass, on every diffusers version promptset allows.

        diffusers 0.30-0.31 checkpoint a block only when `block.training` is True (later versions whenever grad is
        enabled), and the frozen UNet sits in eval mode. So exactly the modules that checkpoint (those with a
        `gradient_checkpointing` flag: down/mid/up blocks, transformers) get `training = True`; their children
        (dropout, norms, attention) stay in eval mode, so the outputs stay eval mode's bit for bit.
        """
        self.unet.enable_gradient_checkpointing()
        for module in self.unet.modules():
            if getattr(module, "gradient_checkpointing", False):
                module.training = True  # the flag alone, not module.train(): children keep eval mode

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
        vectors, _ = self.initializer_vectors([word], flag, fallback=False)
        return vectors[0]

    def initializer_vectors(self, words: list[str], flag: str, *, fallback: bool) -> tuple[torch.Tensor, list[str]]:
        """Embedding rows (C, D) of one initializer word per class, and a note per word that was not one token.

        fallback=False (words the user chose): every word that is not one token is refused, all in one error.
        fallback=True (the default, the class names): a multi-token word starts from the mean of its sub-tokens'
        rows, rescaled to their mean norm; a word with no tokens from the mean row of the table. Never refuses.
        """
        table = self.token_embedding.weight.detach().float()  # (vocab, D)
        rows, notes, bad = [], [], []
        for word in words:
            ids = self.word_ids(word)
            if len(ids) == 1:
                rows.append(table[ids[0]].clone())
                continue
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            if not fallback:
                bad.append(f"{word!r} is {len(ids)} tokens {pieces}")  # each word once, however many classes
                rows.append(table[0].clone())
            elif ids:
                parts = table[ids]  # (n, D)
                mean = parts.mean(0)
                rows.append(mean * (parts.norm(dim=1).mean() / mean.norm().clamp_min(1e-12)))
                notes.append(f"{word!r} is {len(ids)} tokens {pieces}: starts from the mean of their embeddings")
            else:
                rows.append(table.mean(0))
                notes.append(f"{word!r} has no tokens: starts from the mean embedding of the vocabulary")
        bad = list(dict.fromkeys(bad))
        if bad:
            raise UserError(
                f"{flag}: initializer {'; '.join(bad)}: not one token in this model's tokenizer. Pass single-token "
                "words with --initializers (comma-separated, one per class in class order) or one word for all "
                "classes with --initializer, or leave both unset: the default "
                "(the class names) accepts any name"
            )
        return torch.stack(rows), notes

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
        what = f"the VAE's latents of {len(images)} images"
        check_finite(mean if std is None else torch.cat([mean, std], 1), what, self.dtype, "the VAE")
        return mean, std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, h, w) to images in [0, 1] (B, 3, H, W) fp32; refuses NaN/inf in or out (no black PNGs)."""
        check_finite(latents, f"the {len(latents)} latents to decode", self.dtype, "the denoiser")
        images = self.autoencoder.decode(latents.to(self.dtype)).float()
        check_finite(images, f"the VAE's decodes of {len(latents)} finite latents", self.dtype, "the VAE")
        return images

    # ----------------------------------------------------------------------------------------------------------
    # the denoising objective (Ho et al. 2020; Rombach et al. 2022), the loss textual inversion minimises
    def denoising_loss(
        self, latents: torch.Tensor, states: torch.Tensor, generator: torch.Generator,
        rows: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """`denoising_objective` at a uniform random timestep, noise and timestep drawn from `generator`. (b,)

        rows=(lo, hi, n): `latents` and `states` are rows [lo, hi) of a batch of n samples (one process's share of
        a data-parallel batch); noise and timesteps are drawn for all n and rows [lo, hi) used, so the share's
        losses are those rows of the whole batch's. Default: the whole batch.
        """
        b = latents.shape[0]
        lo, hi, n = rows if rows is not None else (0, b, b)
        noise = torch.randn((n, *latents.shape[1:]), generator=generator, device=generator.device)[lo:hi]
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator, device=generator.device
        )[lo:hi]
        if hi == lo:  # an empty share (a batch smaller than the team): the draws above keep the stream in step
            return torch.zeros(0, device=self.device)
        noise, t = to_device(noise, self.device), to_device(t, self.device)
        return denoising_objective(self.unet, self.noise_scheduler, latents, noise, t, states, dtype=self.dtype)

    # ----------------------------------------------------------------------------------------------------------
    # sampling: the same update as diffusers' StableDiffusionPipeline.__call__, with per-image initial noise
    def initial_noise(self, generators: list[torch.Generator] | list[int]) -> torch.Tensor:
        """The first draw of each image's own generator (`image_generators`, or seeds), never batch-dependent.

        Returns (B, c, h, w) on the CPU. Pass the same generators on to `sample`, whose stochastic samplers go on
        drawing from them.
        """
        shape = (self.autoencoder.latent_channels, self.latent_size, self.latent_size)
        gens = [g if isinstance(g, torch.Generator) else torch.Generator().manual_seed(int(g)) for g in generators]
        return torch.stack([torch.randn(shape, generator=g) for g in gens])

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        noise: torch.Tensor,
        *,
        steps: int,
        guidance: float,
        generators: list[torch.Generator],
        diversity=None,
    ) -> torch.Tensor:
        """Denoise `noise` (B, c, h, w) under conditioning states `cond` (B, L, D) with classifier-free guidance.

        A stochastic sampler (ddpm) draws each image's step noise from that image's generator (B of them), so an
        image depends on its seed alone, never on the other images of the batch or on global random state.
        `diversity` (`backends.diversity.Diversity`, default none): guidance on an interval of the steps only (the
        unconditional pass skipped elsewhere) and CADS noise on `cond`, drawn from the same generators.
        Returns images in [0, 1], (B, 3, H, W) fp32 on the backend's device. Within the call the cross-attention
        keys/values of a conditioning tensor are projected once (`attention.reuse_attention`; `reuse_attention =
        False` turns that off), which changes no bit.
        """
        if len(generators) != noise.shape[0]:
            raise ValueError(f"{len(generators)} generators for {noise.shape[0]} images; pass one per image")
        # inference mode: nothing here is differentiated (same kernels, less bookkeeping per op); the images are
        # cloned outside it, so callers get an ordinary tensor they may modify in place
        with torch.inference_mode(), reuse_attention(self.unet, enabled=self.reuse_attention):
            images = self._denoise(cond, uncond, noise, steps=steps, guidance=guidance, generators=generators,
                                   diversity=diversity)
        return images.clone()

    def _denoise(self, cond, uncond, noise, *, steps, guidance, generators, diversity) -> torch.Tensor:
        """`sample`'s loop: the same update as diffusers' StableDiffusionPipeline.__call__."""
        scheduler = type(self.sample_scheduler).from_config(self.sample_scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        latents = to_device(noise, self.device).float() * scheduler.init_noise_sigma
        use_cfg = uncond is not None and guidance != 1.0
        both = torch.cat([uncond, cond]).to(self.dtype) if use_cfg else None  # (2B, L, D)
        cond = cond.to(self.dtype)
        n = len(scheduler.timesteps)
        for k, t in enumerate(scheduler.timesteps):
            guided = use_cfg and (diversity is None or diversity.guided(k, n))
            states = both if guided else cond
            if diversity is not None and diversity.cads is not None:  # new noise on the condition at every step
                annealed = diversity.condition(cond, k, n, generators)
                if annealed is not cond:  # else (no annealing at this step) `states` already holds these values
                    states = torch.cat([both[: len(cond)], annealed]) if guided else annealed
            model_in = torch.cat([latents] * 2) if guided else latents
            model_in = scheduler.scale_model_input(model_in, t)
            pred = self.unet(model_in.to(self.dtype), t, encoder_hidden_states=states).sample.float()
            if guided:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        return self.decode_latents(latents)
