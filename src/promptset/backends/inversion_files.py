"""What `promptset invert` keeps on disk around its training loop, besides the latent cache (latent_cache.py): each
group's checkpoint and result, and the metrics log.

Separate from stages/invert.py (the stage: options, validation, the loop) so that the loop reads top to bottom; only
invert uses it (a helper of one stage lives in a room, as pretrain's mini_training.py does: stages never import each
other). Every file is written atomically with a sorted header (`artifacts.save_tensors`, `atomic.write_text`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import load_tensors, save_tensors
from ..atomic import read_jsonl, write_text
from ..dist import rank_world
from ..errors import UserError
from ..precision import LossScaler


@dataclass(frozen=True)
class GroupFiles:
    """Group g's files under `<run>/invert/`, and the data key (data split, rows, mode assignment) they carry: a
    result or checkpoint of other data is not used."""

    folder: Path
    g: int
    key: dict[str, str] = field(default_factory=dict)

    @property
    def result(self) -> Path:
        return self.folder / "groups" / f"g{self.g:05d}.safetensors"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / f"g{self.g:05d}.safetensors"

    @property
    def latents(self) -> Path:
        return self.folder / "latents" / f"g{self.g:05d}.safetensors"

    def finished(self) -> bool:
        """The group's result exists and was made from the same data (its checkpoint, left by a run killed between
        writing the result and cleaning up, is removed)."""
        if not _matches(self.result, self.key):
            return False
        self.checkpoint.unlink(missing_ok=True)
        return True

    def resumable(self) -> bool:
        """A checkpoint of the same data exists (one of other data at the same path is not resumed)."""
        return _matches(self.checkpoint, self.key)

    def save_checkpoint(self, vectors, optimizer, generator, step: int, scaler: LossScaler) -> None:
        """Vectors, AdamW moments, the random stream and the loss scaler after `step` steps: resumed bit for bit."""
        state = optimizer.state[vectors]
        # without a state AdamW has not stepped yet (fp16 loss scaling skipped every step): its fresh state
        tensors = {
            "vectors": vectors.detach().cpu(),
            "exp_avg": state["exp_avg"].cpu() if state else torch.zeros(vectors.shape),
            "exp_avg_sq": state["exp_avg_sq"].cpu() if state else torch.zeros(vectors.shape),
            "adam_step": torch.as_tensor(state.get("step", 0.0)).reshape(1).float().cpu(),
            "rng_state": generator.get_state(),
            "loss_scaler": scaler.state(),  # (scale, good steps, skipped steps): fp16 resumes bit for bit
        }
        save_tensors(self.checkpoint, tensors, {"step": str(step)} | self.key)

    def load_checkpoint(self, vectors, optimizer, generator, scaler: LossScaler) -> int:
        """Restore what `save_checkpoint` wrote; returns the step to continue from."""
        tensors, meta = load_tensors(self.checkpoint, "checkpoint")
        with torch.no_grad():
            vectors.copy_(tensors["vectors"].to(vectors.device))
        optimizer.state[vectors] = {
            "step": tensors["adam_step"].reshape(()).clone(),
            "exp_avg": tensors["exp_avg"].to(vectors.device).clone(),
            "exp_avg_sq": tensors["exp_avg_sq"].to(vectors.device).clone(),
        }
        generator.set_state(tensors["rng_state"])
        if "loss_scaler" in tensors:
            scaler.load_state(tensors["loss_scaler"])
        return int(meta["step"])

    def save_result(self, vectors: torch.Tensor, init: torch.Tensor, steps: int) -> None:
        """The trained (G, V, D) vectors and their initial values; then the checkpoint and latent cache go."""
        save_tensors(self.result, {"embeddings": vectors.detach().float().cpu(), "init": init.cpu()},
                     {"group": str(self.g), "steps": str(steps)} | self.key)
        self.checkpoint.unlink(missing_ok=True)
        self.latents.unlink(missing_ok=True)


def _matches(path: Path, key: dict[str, str]) -> bool:
    """The group file exists, is intact, and was made from the same data."""
    if not path.is_file():
        return False
    try:
        _, meta = load_tensors(path, "group file")
    except UserError:
        return False  # damaged (it cannot be: writes are atomic) or foreign: train again
    return all(meta.get(k) == v for k, v in key.items())


# ------------------------------------------------------------------------------------------------------------
# metrics.jsonl: one record per group and log step (one file per rank under torchrun, merged at the end)


def metrics_path(folder: Path) -> Path:
    rank, world = rank_world()
    return folder / ("metrics.jsonl" if world == 1 else f"metrics.rank{rank}.jsonl")


def metrics_record(vectors, init, row_loss, names, g, step, lr, elapsed) -> dict:
    """One log step of group g: the rows' mean losses since the last record (G,), and how far each row's vectors
    moved from their initializer (norm of the difference; cosine, mean over V)."""
    delta = (vectors - init).flatten(1).norm(dim=1)  # (G,)
    cosine = torch.nn.functional.cosine_similarity(vectors, init, dim=-1).mean(dim=1)  # (G,) mean over V
    return {
        "group": g,
        "step": step,
        "loss": float(row_loss.mean()),
        "lr": lr,
        "seconds": round(elapsed, 3),
        "classes": names,  # the rows' labels (a class folder, `folder/m<k>` with modes): the file's field names
        "class_loss": [round(float(x), 6) for x in row_loss],
        "delta_norm": [round(float(x), 6) for x in delta],
        "cosine": [round(float(x), 6) for x in cosine],
    }


def drop_metrics_after(path: Path, g: int, step: int) -> None:
    """Remove metrics rows of group `g` past `step` (and a torn last line), so a resumed run logs each step once."""
    if not path.is_file():
        return
    rows = read_jsonl(path)
    kept = [r for r in rows if not (r.get("group") == g and r.get("step", 0) > step)]
    text = path.read_text(encoding="utf-8")
    if len(kept) != len(rows) or (text and not text.endswith("\n")) or len(rows) != len(text.splitlines()):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def merge_rank_metrics(folder: Path, world: int) -> None:
    """Every rank's metrics file into one `metrics.jsonl`, ordered by group and step (rank 0, after training)."""
    rows = [r for k in range(world) for r in read_jsonl(folder / f"metrics.rank{k}.jsonl")]
    rows.sort(key=lambda r: (r.get("group", 0), r.get("step", 0)))
    write_text(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for k in range(world):
        (folder / f"metrics.rank{k}.jsonl").unlink(missing_ok=True)
