"""TAEF2: the tiny autoencoder (madebyollin/taesd) that stands in for the FLUX.2 VAE in the `mini` backend.

Images in [0, 1] of size H x W map to raw latents of 32 channels at H/8 x W/8 (roughly in [-3, 3]) and back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from promptset.errors import UserError

ENCODER_FILE = "taef2_encoder.safetensors"
DECODER_FILE = "taef2_decoder.safetensors"
LATENT_CHANNELS = 32
DOWNSCALE = 8


def _conv(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3): `tanh(x / 3) * 3`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block `relu(conv(x) + x)`, optionally preceded by a GroupNorm "pool" branch `x + pool(x)`."""

    def __init__(self, c: int, use_pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.GroupNorm(4, 4 * c),
                nn.ReLU(),
                nn.Conv2d(4 * c, c, 1, bias=False),
            )
            if use_pool
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


class TAEF2Encoder(nn.Sequential):
    """Images in [0, 1] (B, 3, H, W) -> raw latents (B, 32, H/8, W/8)."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS, width: int = 64):
        c = width
        super().__init__(
            _conv(3, c), Block(c),
            _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
            _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
            _conv(c, c, stride=2, bias=False), Block(c, True), Block(c, True), Block(c, True),
            _conv(c, latent_channels),
        )  # fmt: skip


class TAEF2Decoder(nn.Sequential):
    """Raw latents (B, 32, h, w) -> images (B, 3, 8h, 8w), approximately in [0, 1] (not clamped here)."""

    def __init__(self, latent_channels: int = LATENT_CHANNELS, width: int = 64):
        c = width
        super().__init__(
            Clamp(), _conv(latent_channels, c), nn.ReLU(),
            Block(c, True), Block(c, True), Block(c, True), nn.Upsample(scale_factor=2), _conv(c, c, bias=False),
            Block(c), Block(c), Block(c), nn.Upsample(scale_factor=2), _conv(c, c, bias=False),
            Block(c), Block(c), Block(c), nn.Upsample(scale_factor=2), _conv(c, c, bias=False),
            Block(c), _conv(c, 3),
        )  # fmt: skip


def _load_strict(module: nn.Module, path: str | Path, what: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"TAEF2 {what} weights not found: {path}. Pass the folder holding {ENCODER_FILE} and {DECODER_FILE} "
            "(e.g. shared/weights)."
        )
    state = {k: v.float() for k, v in load_file(str(path)).items()}  # stored fp16; compute in fp32
    module.load_state_dict(state, strict=True)


class TAEF2(nn.Module):
    """Frozen tiny autoencoder with a [0, 1] image interface on both sides.

    The TAESD family works on [0, 1] images directly (no [-1, 1] shift), which the round-trip PSNR confirms
    (about 32 dB on CIFAR upsampled to 64 px); `encode`/`decode` keep that convention for every caller.
    """

    def __init__(self, encoder: TAEF2Encoder | None = None, decoder: TAEF2Decoder | None = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else TAEF2Encoder()
        self.decoder = decoder if decoder is not None else TAEF2Decoder()

    @classmethod
    def from_files(cls, encoder_path: str | Path, decoder_path: str | Path) -> TAEF2:
        """Builds the autoencoder from its two safetensors files (strict names), frozen and in eval mode."""
        model = cls()
        _load_strict(model.encoder, encoder_path, "encoder")
        _load_strict(model.decoder, decoder_path, "decoder")
        return model.eval().requires_grad_(False)

    @classmethod
    def from_dir(cls, folder: str | Path) -> TAEF2:
        """Builds the autoencoder from `taef2_encoder.safetensors` and `taef2_decoder.safetensors` in `folder`."""
        folder = Path(folder)
        return cls.from_files(folder / ENCODER_FILE, folder / DECODER_FILE)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Maps images in [0, 1] (B, 3, H, W), H and W multiples of 8, to raw latents (B, 32, H/8, W/8)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % DOWNSCALE or images.shape[-1] % DOWNSCALE:
            raise ValueError(f"image height and width must be multiples of {DOWNSCALE}, got {tuple(images.shape)}")
        return self.encoder(images)  # (B, 32, H/8, W/8)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Maps raw latents (B, 32, h, w) to images in [0, 1] (B, 3, 8h, 8w), clamped."""
        return self.decoder(latents).clamp(0, 1)  # (B, 3, 8h, 8w)
