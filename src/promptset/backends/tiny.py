"""Build Stable-Diffusion-shaped models from configs in code (random weights), saved as diffusers folders.

Tests and benchmarks load them through the real `sd` loading path. The CLIP tokenizer is rebuilt offline from the
BPE merges file shipped in the `open_clip_torch` wheel (the same 49,408-token vocabulary as CLIP ViT-L/14).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import torch

from ..errors import UserError


def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the CLIP vocabulary comes from open_clip_torch: pip install --no-deps open_clip_torch")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise UserError(f"{path} not found; reinstall with: pip install --no-deps open_clip_torch")
    return path


def clip_tokenizer(max_length: int = 77):
    """CLIP's BPE tokenizer (vocab 49,408) built from open_clip's merges file, without any download."""
    from transformers import CLIPTokenizer

    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=max_length)


# Component configs. "tiny" is for tests (seconds on CPU); "sd15" has Stable Diffusion 1.5's exact shapes.
CONFIGS = {
    "tiny": {
        "text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                     max_position_embeddings=77, projection_dim=32),
        "unet": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=8, norm_num_groups=8),
        "vae": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                    layers_per_block=1, sample_size=16),
    },
    "sd15": {
        "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
        "unet": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                     attention_head_dim=8, norm_num_groups=32),
        "vae": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                    layers_per_block=2, sample_size=512),
    },
}


def build_sd(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Save a random-weight Stable Diffusion of the given shape (`tiny` or `sd15`) to `folder`; returns it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CONFIGS[size]
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=49406, eos_token_id=49407,
                                                pad_token_id=49407, **cfg["text"]))
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, **cfg["vae"])
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
