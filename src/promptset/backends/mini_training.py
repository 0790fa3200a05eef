"""What `promptset pretrain` keeps on disk around its training loop: the latent cache, checkpoints, a warm start.

Separate from stages/pretrain.py (the stage: options, validation, the loop) so that each stays readable; only
pretrain uses it. `run` arguments are pretrain's `_Run` (unet, ema, optimizer, generator).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..artifacts import load_tensors, save_tensors
from ..atomic import read_jsonl, write_text
from ..data import load_class_images
from ..errors import UserError
from ..progress import progress_bar
from .mini import read_model_info


def init_weights(unet, folder: Path, cfg, vae_fp, text_fp: str) -> float:
    """Load a finished mini model's UNet weights into `unet` (checked to match); returns its latent scale."""
    from safetensors.torch import load_file

    flag = f"--init-from {folder}"
    try:
        info = read_model_info(folder)
    except UserError as err:
        raise UserError(f"{flag}: {err}") from err
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{flag}: no {weights.relative_to(folder)}; pass a finished mini model folder")
    mismatched = [
        f"{name} {theirs!r} (here {ours!r})"
        for name, theirs, ours in (
            ("unet_size", info.get("unet_size"), cfg.unet_size),
            ("conditioning", info.get("conditioning"), cfg.conditioning),
            ("prediction_type", info.get("prediction_type"), cfg.prediction_type),
            ("resolution", info.get("resolution"), cfg.resolution),
            ("text encoder", (info.get("text_encoder") or {}).get("fingerprint"), text_fp),
            ("vae", (info.get("vae") or {}).get("fingerprint"), vae_fp),
        )
        if theirs != ours
    ]
    if mismatched:
        raise UserError(f"{flag} was trained with other settings: {'; '.join(mismatched)}; pass the same options")
    state = load_file(str(weights))
    own = unet.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise UserError(f"{flag}: its UNet has other parameter names or shapes than --unet-size {cfg.unet_size}")
    unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return float(info["scaling_factor"])


def file_list_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def latent_cache(backend, index, cfg, out: Path, vae_fp) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw latents of every image (and mirror image), encoded once: (M, c, h, w) fp32 on CPU, and labels (M,).

    One file per class in <out>/cache, so a run killed while encoding keeps the classes already done.
    """
    views = 2 if cfg.flip else 1
    total = index.num_images * views
    bar = progress_bar(total=total, desc="encode latents", unit="img", disable=not cfg.progress)
    all_latents, all_labels = [], []
    for c, files in enumerate(index.files):
        path = out / "cache" / f"class{c:05d}.safetensors"
        key = {
            "vae": str(vae_fp),
            "resolution": str(cfg.resolution),
            "flip": str(cfg.flip),
            "files": file_list_hash(files),
            "class": index.classes[c],
        }
        latents = None
        if path.is_file():
            try:
                tensors, meta = load_tensors(path, "latent cache")
                if all(meta.get(k) == v for k, v in key.items()):
                    latents = tensors["latents"]
            except UserError:
                pass  # a torn cache file is simply rebuilt
        if latents is None:
            images = load_class_images(index, c, cfg.resolution)  # (N, 3, R, R) in [0, 1]
            images = torch.cat([images, images.flip(-1)]) if cfg.flip else images  # flip in pixels: TAEF2 is not
            chunks = []  # flip-equivariant (a flipped latent decodes at about 19 dB)
            for s in range(0, len(images), 64):
                mean, _ = backend.encode_images(images[s : s + 64], batch_size=64)  # (b, c, h, w)
                chunks.append(mean)
                bar.update(len(mean))
            latents = torch.cat(chunks)  # (views * N, c, h, w)
            save_tensors(path, {"latents": latents}, key)
        else:
            bar.update(len(latents))
        all_latents.append(latents)
        all_labels.append(torch.full((len(latents),), c, dtype=torch.long))
    bar.close()
    return torch.cat(all_latents), torch.cat(all_labels)


def save_checkpoint(path: Path, run, step: int, train_seconds: float) -> None:
    """UNet, EMA, AdamW moments and the generator state, in one atomic safetensors write."""
    tensors = {f"unet.{k}": v for k, v in run.unet.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in run.ema.state_dict().items()})
    for i, state in run.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            value = torch.as_tensor(value)
            tensors[f"adam.{i}.{key}"] = value.reshape(1) if key == "step" else value  # 0-d step stored as (1,)
    tensors["rng_state"] = run.generator.get_state()
    save_tensors(path, tensors, {"step": str(step), "train_seconds": repr(train_seconds)})


def checkpoint_step(path: Path) -> int:
    if not path.is_file():
        return 0
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
        raise UserError(f"checkpoint {path} is unreadable ({err}); delete it to restart training") from err


def load_checkpoint(path: Path, run) -> float:
    """Restore weights, EMA, AdamW moments and the RNG; returns the training seconds so far."""
    tensors, meta = load_tensors(path, "pretrain checkpoint")
    run.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, strict=True)
    run.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
    params = run.optimizer.state_dict()["param_groups"]
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("adam."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value.reshape(()) if key == "step" else value
    run.optimizer.load_state_dict({"state": state, "param_groups": params})
    run.generator.set_state(tensors["rng_state"])
    return float(meta.get("train_seconds", 0.0))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the checkpoint (written by a killed run), so a resumed log has no duplicates."""
    rows = read_jsonl(path)
    if any(r.get("step", 0) > step for r in rows):
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))

