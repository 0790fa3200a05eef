"""Generated rounds kept on disk in `<run>/eval/rounds/`, so a resumed or repeated `evaluate` does not denoise again.

A long evaluate (P1 with fresh rounds at several IPCs and protocols) spends most of its time generating images. They
depend only on their seed and the generation settings, so they are kept, per image, in one file per *generation
key*: everything that changes a pixel (`Context.generation_settings`: prompts hash, template, model fingerprint,
steps, guidance, sampler, seed, resolution, factor, image size, dtype, sampler batch, seed selection and its
teacher), the method's conditioning (the class-prompt strings) and the round's stage name. The IPC is not in the key:
the images of IPC 1 are the first of IPC 10's, so they are reused. Images are stored as the uint8 patches the student
trains on, with the seed that was chosen for each job (seed selection), so a cached round equals a generated one
bit for bit. A file that is unreadable, torn or of another key is ignored and rewritten.

Files are written by rank 0 only, atomically, followed by a barrier, so every process reads the same file next time.
Before writing, the file is read again and merged under a lock (`atomic.locked`), so two evaluate calls on one run
(P1 and P2 side by side) keep each other's images.
`evaluate --no-round-cache` turns it off; the files are not part of the distilled set (budget and pack ignore them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifacts import load_tensors, save_tensors, sha256_bytes
from ..atomic import locked
from ..backends.sampling import Job
from ..dist import barrier, ddp_world
from ..errors import UserError

FOLDER = "eval/rounds"


class RoundCache:
    """The cached patches of one generation key: {(class, job seed): (chosen seed, (P, 3, S, S) uint8)}."""

    def __init__(self, run: Path, key: dict):
        self.key = json.dumps(key, sort_keys=True, default=str)
        self.path = Path(run) / FOLDER / f"{sha256_bytes(self.key.encode('utf-8'))[:20]}.safetensors"
        self.entries: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
        self.hits = self.misses = 0
        self._read()

    def _read(self) -> None:
        """Add the file's images to `entries` (those already there are kept)."""
        if not self.path.is_file():
            return
        try:
            tensors, meta = load_tensors(self.path, "round cache")
        except UserError:
            return  # torn or edited: rebuilt on the next store
        if meta.get("key") != self.key:
            return
        for cls, seed, chosen, patches in zip(tensors["classes"].tolist(), tensors["job_seeds"].tolist(),
                                              tensors["chosen_seeds"].tolist(), tensors["images"]):  # fmt: skip
            self.entries.setdefault((cls, seed), (chosen, patches))

    def missing(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose images are not cached."""
        out = [j for j in jobs if (j.cls, j.seed) not in self.entries]
        self.hits += len(jobs) - len(out)
        self.misses += len(out)
        return out

    def add(self, jobs: list[Job], chosen: list[Job], patches: torch.Tensor) -> None:
        """Remember `patches` (N, P, 3, S, S) uint8 of `jobs` (as drawn) made with `chosen`'s seeds, and write the
        file (rank 0; every process waits for it)."""
        for job, pick, image in zip(jobs, chosen, patches.cpu()):
            self.entries[(job.cls, job.seed)] = (int(pick.seed), image)
        if ddp_world()[0] == 0 and self.entries:
            with locked(self.path):
                self._read()  # another evaluate on this run (P1 and P2 side by side) may have stored images meanwhile
                keys = sorted(self.entries)
                save_tensors(self.path, {
                    "classes": torch.tensor([k[0] for k in keys], dtype=torch.int64),
                    "job_seeds": torch.tensor([k[1] for k in keys], dtype=torch.int64),
                    "chosen_seeds": torch.tensor([self.entries[k][0] for k in keys], dtype=torch.int64),
                    "images": torch.stack([self.entries[k][1] for k in keys]),
                }, {"key": self.key, "format": "promptset.round_cache/1"})  # fmt: skip
        barrier()

    def get(self, jobs: list[Job]) -> tuple[torch.Tensor, list[Job]]:
        """(N, P, 3, S, S) uint8 patches of `jobs` (all cached) and the jobs with their chosen seeds."""
        picked = [self.entries[(j.cls, j.seed)] for j in jobs]
        return torch.stack([x[1] for x in picked]), [Job(j.cls, j.index, s) for j, (s, _) in zip(jobs, picked)]
