"""Stable Diffusion 1.x/2.x through diffusers: a local diffusers folder, a single .safetensors file, or a Hub id.

Loads the four frozen parts, in the dtype they will run in (no fp32 copy first), and wraps them in a
`DiffusionBackend`; nothing here is specific to one stage. The model fingerprint covers exactly the files that are
loaded: configs, tokenizer, and the one weight file (or shard set) each part reads, not the `.bin`, `.ckpt` or
other variants a Hub snapshot also holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import combined_fingerprint, fingerprint_files, fingerprint_path, hub_fingerprint, snapshot_commit
from ..devices import resolve_device, resolve_dtype
from ..errors import UserError
from .base import PREDICTION_TYPES, DiffusionBackend, KLAutoencoder
from .sampling import make_sampler

PARTS = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
CONFIG_PARTS = ("tokenizer", "scheduler")  # read whole (small text files)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb",
                   ".gguf", ".pdparams")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def _is_weights(path: Path) -> bool:
    name = path.name
    return name.endswith(WEIGHT_SUFFIXES) or (".index" in name and name.endswith(".json"))


def part_weights(folder: Path, stem: str, flag: str) -> tuple[str | None, list[Path]]:
    """(variant, files) of the safetensors weights diffusers/transformers load from one part's folder.

    Plain `<stem>.safetensors` (or its shard index) first, else the `fp16` variant (`<stem>.fp16.safetensors`, as
    `save_pretrained(variant="fp16")` writes and Hub snapshots hold). Refuses a part with pickles only, or none.
    """
    for variant in (None, "fp16"):
        single = folder / (f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")
        if single.is_file():
            return variant, [single]
        index = folder / (f"{stem}.safetensors.index.{variant}.json" if variant else f"{stem}.safetensors.index.json")
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise UserError(f"{flag}: {index} is not a readable shard index ({err})") from err
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UserError(f"{flag}: {index} lists shards that are missing: {', '.join(missing[:3])}")
            return variant, [index, *(folder / s for s in shards)]
    pickles = sorted(p.name for p in folder.glob("*") if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UserError(
            f"{flag}: {folder} holds only pickled weights ({', '.join(pickles[:3])}); pickled .bin weights are "
            "never loaded (unpickling runs code). Convert them once with pipe.save_pretrained(folder, "
            "safe_serialization=True)"
        )
    raise UserError(f"{flag}: no {stem}.safetensors (nor {stem}.fp16.safetensors) in {folder}")


def folder_files(path: Path, weights: dict[str, list[Path]]) -> list[Path]:
    """The files loading the folder reads: model_index.json, tokenizer/ and scheduler/, each part's configs and
    its chosen weights. In a folder written by save_pretrained that is every file (fingerprints stay as before)."""
    files = [path / "model_index.json"] if (path / "model_index.json").is_file() else []
    for part in CONFIG_PARTS:
        files += [p for p in (path / part).rglob("*") if p.is_file()]
    for part, chosen in weights.items():
        files += [p for p in (path / part).rglob("*") if p.is_file() and not _is_weights(p)] + chosen
    return files


def config_files(folder: Path) -> list[Path]:
    """The config and tokenizer files of a `--model-config` folder (weights in it are not read)."""
    return [p for p in folder.rglob("*") if p.is_file() and not _is_weights(p)]


def load_sd(
    model: str,
    *,
    device: str | None = "auto",
    dtype: str = "auto",
    sampler: str = "ddim",
    revision: str | None = None,
    model_config: str = "",
    prediction_type: str = "",
) -> DiffusionBackend:
    """Load Stable Diffusion from `model` (diffusers folder, `.safetensors` checkpoint, or Hub id).

    Args:
        model_config: a diffusers config folder (model_index.json, unet/config.json, scheduler/, tokenizer/, ...)
            for a single-file checkpoint: without it diffusers guesses the config from the weights (every SD 2.x
            file becomes the 768 px v-prediction model, also 2.x-base files).
        prediction_type: epsilon or v_prediction, overriding the scheduler config's.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if prediction_type and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"--prediction-type {prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
    path = Path(model)
    config_dir = Path(model_config) if model_config else None
    if config_dir is not None and not path.is_file():
        raise UserError(f"--model-config {model_config}: applies to a single-file checkpoint (--model FILE."
                        "safetensors); a diffusers folder or Hub id brings its own configs")
    if config_dir is not None and not (config_dir / "model_index.json").is_file():
        raise UserError(f"--model-config {model_config}: not a diffusers config folder (no model_index.json); pass "
                        "a folder like a Hub snapshot of the model's base repo (configs suffice: no weights are read)")
    if path.is_dir():
        if not (path / "unet").is_dir() or not (path / "text_encoder").is_dir():
            raise UserError(
                f"--model {model}: not a diffusers Stable Diffusion folder (expected unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/ subfolders, as written by pipe.save_pretrained)"
            )
        chosen = {part: part_weights(path / part, stem, f"--model {model}") for part, stem in PARTS.items()}
        variant = {part: v for part, (v, _) in chosen.items()}
        try:  # use_safetensors: never fall back to unpickling .bin weights
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True,
                                                         dtype=torch_dtype, variant=variant["text_encoder"])
            unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, torch_dtype=torch_dtype,
                                                        variant=variant["unet"])
            vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True, torch_dtype=torch_dtype,
                                                variant=variant["vae"])
            scheduler_config = DDPMScheduler.load_config(path / "scheduler")
        except (OSError, ValueError) as err:
            raise UserError(f"--model {model}: could not load the diffusers folder ({err})") from err
        model_hash = fingerprint_files(path, folder_files(path, {p: files for p, (_, files) in chosen.items()}))
    elif path.suffix == ".safetensors":
        from diffusers import StableDiffusionPipeline

        if not path.is_file():
            raise UserError(f"--model {model}: file not found; pass a diffusers folder or a .safetensors checkpoint")
        kwargs = {"config": str(config_dir), "local_files_only": True} if config_dir is not None else {}
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, torch_dtype=torch_dtype,
                                                            **kwargs)
        except Exception as err:  # without --model-config, from_single_file fetches the config from the Hub
            raise UserError(
                f"--model {model}: could not load the single-file checkpoint ({err}). Offline, pass --model-config "
                "FOLDER (the diffusers configs of its base model, e.g. a snapshot of stable-diffusion-v1-5 or "
                "stable-diffusion-2-1-base without weights), or convert it once to a diffusers folder "
                "(pipe.save_pretrained) and pass that folder"
            ) from err
        tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
        scheduler_config = pipe.scheduler.config
        model_hash = fingerprint_path(path)
        if config_dir is not None:  # the configs decide the architecture and the target: another model
            model_hash = combined_fingerprint({"weights": model_hash,
                                               "config": fingerprint_files(config_dir, config_files(config_dir))})
    elif path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise UserError(f"--model {model}: not a diffusers folder, a .safetensors file or a Hub id (owner/name)")
    else:
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                model, revision=revision, safety_checker=None, use_safetensors=True, torch_dtype=torch_dtype
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

    if prediction_type:  # the denoiser's target is part of the model: prompts learned for one do not fit the other
        scheduler_config = {**dict(scheduler_config), "prediction_type": prediction_type}
        model_hash = combined_fingerprint({"model": model_hash, "prediction_type": prediction_type})
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
