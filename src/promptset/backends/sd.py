"""Stable Diffusion 1.x/2.x through diffusers: a local diffusers folder, a single .safetensors file, or a Hub id.

Loads the four frozen parts and wraps them in a `DiffusionBackend`; nothing here is specific to one stage.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import fingerprint_path, hub_fingerprint, snapshot_commit
from ..devices import resolve_device, resolve_dtype
from ..errors import UserError
from .base import DiffusionBackend, KLAutoencoder
from .sampling import make_sampler


def load_sd(
    model: str,
    *,
    device: str | None = "auto",
    dtype: str = "fp32",
    sampler: str = "ddim",
    revision: str | None = None,
) -> DiffusionBackend:
    """Load Stable Diffusion from `model` (diffusers folder, `.safetensors` checkpoint, or Hub id)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = Path(model)
    if path.is_dir():
        if not (path / "unet").is_dir() or not (path / "text_encoder").is_dir():
            raise UserError(
                f"--model {model}: not a diffusers Stable Diffusion folder (expected unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/ subfolders, as written by pipe.save_pretrained)"
            )
        try:  # use_safetensors: never fall back to unpickling .bin weights
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
            unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True)
            vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
            scheduler_config = DDPMScheduler.load_config(path / "scheduler")
        except (OSError, ValueError) as err:
            raise UserError(
                f"--model {model}: could not load the diffusers folder ({err}). Weights are read from .safetensors "
                "files only (pickled .bin weights are never loaded); convert them with pipe.save_pretrained("
                "folder, safe_serialization=True)"
            ) from err
        model_hash = fingerprint_path(path)
    elif path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"--model {model}: file not found; pass a diffusers folder or a .safetensors checkpoint")
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None)
        except Exception as err:  # from_single_file needs the original config, fetched from the Hub
            raise UserError(
                f"--model {model}: could not load the single-file checkpoint ({err}). Offline, convert it once to a "
                "diffusers folder on a machine with Hub access (pipe.save_pretrained) and pass that folder"
            ) from err
        tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
        scheduler_config = pipe.scheduler.config
        model_hash = fingerprint_path(path)
    elif path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise UserError(f"--model {model}: not a diffusers folder, a .safetensors file or a Hub id (owner/name)")
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                model, revision=revision, safety_checker=None, use_safetensors=True
            )
        except Exception as err:
            raise UserError(
                f"--model {model}: could not load from the Hugging Face Hub ({err}). Without Hub access, pass a "
                "local diffusers folder"
            ) from err
        tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
        scheduler_config = pipe.scheduler.config
        # pinned to the commit the cache resolved `revision` to, so a later push to the Hub is another model
        model_hash = hub_fingerprint(model, revision, snapshot_commit(getattr(unet.config, "_name_or_path", None)))

    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    autoencoder = KLAutoencoder(vae)
    resolution = int(unet.config.sample_size) * autoencoder.downscale
    max_length = int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))
    return DiffusionBackend(
        kind="sd",
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        autoencoder=autoencoder,
        noise_scheduler=noise_scheduler,
        sample_scheduler=make_sampler(sampler, scheduler_config),
        model_id=str(model),
        model_hash=model_hash,
        resolution=resolution,
        max_length=max_length,
        device=dev,
        dtype=torch_dtype,
    )
