"""Baseline for `bench_invert.py`: one concept per run, each step as diffusers' textual-inversion example does it.

Mirrors `examples/textual_inversion/textual_inversion.py` (diffusers, commit 000280f5; docs/PAPER_NOTES.md section 7):
`tokenizer.add_tokens` + `resize_token_embeddings`, a Dataset that opens, resizes, flips and tokenizes every sample on
every step, a VAE encode of every batch, AdamW over the *whole* token-embedding matrix, and the non-placeholder rows
written back after every optimizer step. One process trains one class; the benchmark starts one process per class.

It is deliberately lean, so the comparison flatters the baseline: no accelerate, no trackers, no validation images,
no intermediate checkpoints. With `--mixed_precision bf16` the UNet and VAE are cast to bf16 and the text encoder
stays fp32 under autocast, as accelerate does in the example. The template is D3M's single "a photo of {}".

Writes `learned_embeds.safetensors` and, with `--result_json`, timings (on the system-wide `time.perf_counter`
clock, so the parent can subtract its spawn time), losses, peak memory and optionally the FLOPs of one step.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # first statement: everything after interpreter start-up is timed from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402

import numpy as np  # noqa: E402

import promptset  # noqa: F401, E402  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_flush_denormal(True)

TEMPLATES = {
    "d3m": ["a photo of {}"],
    "imagenet_small": ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers Stable Diffusion folder")
    p.add_argument("--train_data_dir", required=True, help="folder with the images of ONE concept")
    p.add_argument("--placeholder_token", required=True, help="new token, e.g. <cat>")
    p.add_argument("--initializer_token", required=True, help="single-token word to initialise it from")
    p.add_argument("--output_dir", required=True, help="where learned_embeds.safetensors goes")
    p.add_argument("--resolution", type=int, default=512, help="training resolution in pixels")
    p.add_argument("--train_batch_size", type=int, default=16, help="samples per optimizer step")
    p.add_argument("--max_train_steps", type=int, default=5000, help="optimizer steps")
    p.add_argument("--learning_rate", type=float, default=5e-3, help="AdamW learning rate")
    p.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (example default)")
    p.add_argument("--repeats", type=int, default=100, help="dataset repeats per epoch (example default)")
    p.add_argument("--templates", default="d3m", choices=sorted(TEMPLATES), help="prompt templates")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16"], help="cast UNet and VAE to bf16")
    p.add_argument("--gradient_checkpointing", action="store_true", help="checkpoint text encoder and UNet")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--result_json", default="", help="write timings and losses here")
    p.add_argument("--count_flops", action="store_true", help="after training, count FLOPs of one more step")
    return p.parse_args(argv)


class TextualInversionDataset(torch.utils.data.Dataset):
    """As in the example: open, resize (bicubic), flip (p=0.5), normalise and tokenize each sample when drawn."""

    def __init__(self, data_root, tokenizer, size, placeholder_token, repeats, templates, flip_p=0.5):
        self.image_paths = [os.path.join(data_root, f) for f in sorted(os.listdir(data_root))]
        self.num_images = len(self.image_paths)
        self.tokenizer = tokenizer
        self.size = size
        self.placeholder_token = placeholder_token
        self.templates = templates
        self.flip_p = flip_p
        self._length = self.num_images * repeats

    def __len__(self):
        return self._length

    def __getitem__(self, i):
        image = Image.open(self.image_paths[i % self.num_images])
        if image.mode != "RGB":
            image = image.convert("RGB")
        text = random.choice(self.templates).format(self.placeholder_token)
        input_ids = self.tokenizer(
            text,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]
        image = Image.fromarray(np.array(image).astype(np.uint8)).resize((self.size, self.size), Image.BICUBIC)
        if random.random() < self.flip_p:  # torchvision's RandomHorizontalFlip(p=0.5)
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        return {"input_ids": input_ids, "pixel_values": torch.from_numpy(image).permute(2, 0, 1)}


def load(args):
    """Tokenizer, models, new token, optimizer: everything the example sets up before its loop."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    root = args.pretrained_model_name_or_path
    device = torch.device(args.device)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")

    if tokenizer.add_tokens([args.placeholder_token]) != 1:
        raise ValueError(f"the tokenizer already contains {args.placeholder_token}")
    init_ids = tokenizer.encode(args.initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError("The initializer token must be a single token.")
    placeholder_ids = tokenizer.convert_tokens_to_ids([args.placeholder_token])
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_ids:
            token_embeds[token_id] = token_embeds[init_ids[0]].clone()

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 flattened CLIPTextModel
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.train()
        text_encoder.gradient_checkpointing_enable()
        unet.enable_gradient_checkpointing()

    optimizer = torch.optim.AdamW(
        text_encoder.get_input_embeddings().parameters(),
        lr=args.learning_rate,
        betas=(0.9, 0.999),
        weight_decay=args.adam_weight_decay,
        eps=1e-8,
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    weight_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    text_encoder.to(device)  # stays fp32: it holds the trained matrix (accelerate autocasts its forward)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
    index_no_updates[min(placeholder_ids) : max(placeholder_ids) + 1] = False
    return dict(
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        weight_dtype=weight_dtype,
        device=device,
        orig=orig_embeds_params,
        index_no_updates=index_no_updates,
        placeholder_ids=placeholder_ids,
    )


def train_step(m, batch) -> torch.Tensor:
    """One optimizer step exactly as the example's loop body (gradient accumulation 1)."""
    device, weight_dtype = m["device"], m["weight_dtype"]
    vae, unet, text_encoder, noise_scheduler = m["vae"], m["unet"], m["text_encoder"], m["noise_scheduler"]
    pixel_values = batch["pixel_values"].to(device)
    input_ids = batch["input_ids"].to(device)
    latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample().detach()
    latents = latents * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
        encoder_hidden_states = text_encoder(input_ids)[0].to(dtype=weight_dtype)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss.backward()
    m["optimizer"].step()
    m["lr_scheduler"].step()
    m["optimizer"].zero_grad()
    index_no_updates = m["index_no_updates"]
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[index_no_updates] = m["orig"][index_no_updates]
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    import diffusers  # noqa: F401  (import cost is part of every run, as in the example)
    import transformers  # noqa: F401

    t_imported = time.perf_counter()
    m = load(args)
    device = m["device"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_loaded = time.perf_counter()
    dataset = TextualInversionDataset(
        args.train_data_dir,
        m["tokenizer"],
        args.resolution,
        args.placeholder_token,
        args.repeats,
        TEMPLATES[args.templates],
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=0)
    m["text_encoder"].train()
    step_seconds, losses = [], []
    batches = iter(loader)
    for _ in range(args.max_train_steps):
        t0 = time.perf_counter()  # a step includes drawing its batch (open, resize, flip, tokenize), as in the example
        batch = next(batches, None)
        if batch is None:  # next epoch
            batches = iter(loader)
            batch = next(batches)
        loss = train_step(m, batch)
        losses.append(loss.detach().item())  # the example logs loss.item() every step (a host sync)
        _sync(device)
        step_seconds.append(time.perf_counter() - t0)
    t_trained = time.perf_counter()
    from safetensors.torch import save_file

    os.makedirs(args.output_dir, exist_ok=True)
    learned = (
        m["text_encoder"].get_input_embeddings().weight[min(m["placeholder_ids"]) : max(m["placeholder_ids"]) + 1]
    )
    save_file(
        {args.placeholder_token: learned.detach().cpu()}, os.path.join(args.output_dir, "learned_embeds.safetensors")
    )
    t_saved = time.perf_counter()
    result = {
        "t_start": T_START,
        "t_imported": t_imported,
        "t_loaded": t_loaded,
        "t_trained": t_trained,
        "t_saved": t_saved,
        "step_seconds": step_seconds,
        "losses": losses,
        "steps": len(step_seconds),
        "batch_size": args.train_batch_size,
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        batch = next(iter(loader))
        with FlopCounterMode(display=False) as counter:
            train_step(m, batch)
        result["flops_per_step"] = int(counter.get_total_flops())
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
