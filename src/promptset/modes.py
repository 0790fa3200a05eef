"""Modes: several learned prompts per class (`invert --modes K`), and the one rule that spreads images over them.

One prompt per class draws a narrow slice of the class (docs/DESIGN.md section 9). With modes, each class's training
images are split into K_c = min(K, images) groups by seeded k-means (k-means++ init, Lloyd iterations, ties to the
lowest index) on one feature per image, and one token is learned per group. Everything downstream reads the modes
from the prompts file alone: `mode_class` (M,) names each prompt's class, `mode_weight` (M,) its number of training
images, and image i of class c is drawn from the mode `mode_sequence(weights of c)[i]`.

The spreading rule is Tijdeman's chairman assignment (R. Tijdeman, "The chairman assignment problem", Discrete
Mathematics 32, 1980): with proportions p_k = s_k / S, image t (1-based) goes to the mode with the smallest
(n_k + 1 - 1/(2K-2)) / p_k among those with p_k t - n_k >= 1/(2K-2), n_k counting earlier images of mode k. Every
prefix of t images then holds floor or ceil of t p_k images of mode k (|n_k - t p_k| <= 1 - 1/(2K-2)), image i's mode
never depends on how many images are drawn, and the first image comes from the largest mode. So the IPC 1 and IPC 10
sets are prefixes of the IPC 50 set, each spread over the modes as evenly as its size allows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .atomic import write_json
from .data import ImageFolderIndex, load_class_images
from .errors import UserError
from .seeding import derive_seed

MODE_RULE = "tijdeman"  # recorded in prompts metadata and generation settings: the rule images are spread by
MODES_FILE = "modes.json"
MODE_FEATURES = ("latent", "teacher")
KMEANS_ITERATIONS = 100  # Lloyd iterations at most (stops earlier once no image changes mode)
_CHUNK = 256  # images per distance computation (bounds memory for wide latent features)


# ------------------------------------------------------------------------------------------------------------
# the spreading rule


_SEQUENCES: dict[tuple[int, ...], list[int]] = {}  # weights -> the longest sequence computed so far, this process


def mode_sequence(weights: list[int] | tuple[int, ...], n: int) -> list[int]:
    """The modes of images 0..n-1 of a class whose modes have `weights` (positive ints): Tijdeman's sequence."""
    return _sequence(tuple(int(w) for w in weights), n)[:n]


def mode_of(weights: list[int] | tuple[int, ...], index: int) -> int:
    """The mode image `index` of a class is drawn from (a pure function of the index and the stored weights)."""
    return _sequence(tuple(int(w) for w in weights), index + 1)[index]


def _sequence(weights: tuple[int, ...], n: int) -> list[int]:
    """At least the first n entries of the sequence of `weights` (kept per process and extended on demand)."""
    if not weights or min(weights) <= 0:
        raise ValueError(f"mode weights must be positive integers, got {list(weights)}")
    if len(weights) == 1:
        return [0] * n
    seq = _SEQUENCES.setdefault(weights, [])
    if len(seq) < n:
        k, total, d = len(weights), sum(weights), 2 * len(weights) - 2
        counts = [0] * k
        for m in seq:
            counts[m] += 1
        # exact integer arithmetic: p_k t - n_k >= 1/d  <=>  (s_k t - n_k S) d >= S
        for t in range(len(seq) + 1, n + 1):
            best, best_num = -1, 0
            for j in range(k):
                if (weights[j] * t - counts[j] * total) * d >= total:
                    num = (counts[j] + 1) * d - 1  # (n_j + 1 - 1/d) / p_j, up to the common factor S / d
                    if best < 0 or num * weights[best] < best_num * weights[j]:  # strictly smaller: ties to lower j
                        best, best_num = j, num
            seq.append(best)  # Tijdeman: some mode is always eligible
            counts[best] += 1
    return seq


# ------------------------------------------------------------------------------------------------------------
# seeded k-means


def _sq_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Exact squared distances (N, K) in float64, in fixed chunks of images (no |x|^2 - 2xc + |c|^2 cancellation)."""
    return torch.cat([((x[s : s + _CHUNK, None, :] - centres[None]) ** 2).sum(-1) for s in range(0, len(x), _CHUNK)])


def kmeans(features: torch.Tensor, k: int, generator: torch.Generator,
           iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Seeded k-means of `features` (N, F) into k <= N non-empty clusters; returns each row's cluster (N,) int64.

    k-means++ initialisation drawn from `generator` (the lowest unchosen row when every row coincides with a centre),
    then Lloyd iterations in float64 on the CPU until no row moves (or `iterations`); a row equally near two centres
    joins the lower one. A cluster left empty takes the row farthest from its own centre among clusters of two or
    more rows (lowest row on ties), so every cluster keeps at least one member.
    """
    x = features.detach().to("cpu", torch.float64).flatten(1)  # (N, F)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means of {n} rows into {k} clusters")
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    d2 = _sq_distances(x, x[chosen])[:, 0]  # (N,) squared distance to the nearest chosen centre
    for _ in range(1, k):
        if float(d2.sum()) > 0:
            nxt = int(torch.multinomial(d2, 1, generator=generator))
        else:  # every row sits on a centre already (duplicates): the lowest row not chosen yet
            nxt = next(i for i in range(n) if i not in chosen)
        chosen.append(nxt)
        d2 = torch.minimum(d2, _sq_distances(x, x[nxt : nxt + 1])[:, 0])
    centres = x[chosen].clone()  # (K, F)
    assign = None
    for _ in range(iterations):
        dist = _sq_distances(x, centres)  # (N, K)
        new = dist.argmin(1)  # the first minimum: ties to the lower cluster
        counts = torch.bincount(new, minlength=k)
        for j in range(k):  # refill empty clusters (ascending), deterministically
            if counts[j] == 0:
                own = dist.gather(1, new[:, None])[:, 0].clone()  # (N,) each row's distance to its own centre
                own[counts[new] < 2] = -1.0  # rows that are alone in their cluster stay
                p = int(own.argmax())
                counts[new[p]] -= 1
                new[p] = j
                counts[j] = 1
                centres[j] = x[p]
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, x)  # (K, F)
        centres = sums / counts[:, None].to(x.dtype)
    return assign


def split_modes(features: torch.Tensor, k: int, generator: torch.Generator) -> list[list[int]]:
    """The rows of each mode: k-means clusters ordered largest first (ties: the one holding the lowest row first),
    each a sorted list of row indices. Mode 0 is the largest, so an IPC 1 set draws from it."""
    assign = kmeans(features, k, generator).tolist()
    groups = [[i for i, a in enumerate(assign) if a == j] for j in range(k)]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


# ------------------------------------------------------------------------------------------------------------
# prompt rows: which class and mode each row is (the one home of that mapping, for training and for use)


@dataclass(frozen=True)
class ModeRows:
    """The rows of a prompt set, class-major: row r is a prompt of class `row_class[r]`, its mode `row_mode[r]` (its
    place among its class's rows), learned on `row_weight[r]` training images; image i of class c is drawn from row
    `row_of(c, i)`. Without modes (`row_weight` None) row c is class c's one prompt.

    An inversion's rows also know their images (`members[r]`: positions in the class's sorted file list) and the
    hash of their assignment (`key`); a prompts file's rows (`PromptSet.rows`) know only classes and weights.
    """

    num_classes: int
    row_class: tuple[int, ...]  # (M,) ascending
    row_weight: tuple[int, ...] | None = None  # (M,) the spreading weights; None: one prompt per class
    members: tuple[tuple[int, ...], ...] | None = None  # inversion only
    key: str = ""  # a hash of the assignment (empty without modes): group results and checkpoints carry it

    @classmethod
    def one_per_class(cls, num_classes: int) -> ModeRows:
        return cls(num_classes, tuple(range(num_classes)))

    @classmethod
    def from_assignment(cls, assignment: dict) -> ModeRows:
        """The rows an inversion learns from a mode assignment (what `assign_modes` returns, modes.json holds)."""
        row_class, members = [], []
        for c, entry in enumerate(assignment["classes"]):
            for mode in entry["modes"]:
                row_class.append(c)
                members.append(tuple(mode["members"]))
        key = hashlib.sha256(json.dumps([row_class, members]).encode()).hexdigest()[:16]
        return cls(len(assignment["classes"]), tuple(row_class), tuple(len(m) for m in members), tuple(members), key)

    @classmethod
    def from_prompts(cls, num_classes: int, mode_class: list[int] | None, mode_weight: list[int] | None) -> ModeRows:
        """The rows of a prompts file from its stored `mode_class` / `mode_weight` (None: one prompt per class)."""
        if mode_class is None:
            return cls.one_per_class(num_classes)
        return cls(num_classes, tuple(int(c) for c in mode_class), tuple(int(w) for w in mode_weight))

    @property
    def has_modes(self) -> bool:
        return self.row_weight is not None

    def __len__(self) -> int:
        return len(self.row_class)

    @cached_property
    def _by_class(self) -> list[list[int]]:
        rows: list[list[int]] = [[] for _ in range(self.num_classes)]
        for r, c in enumerate(self.row_class):
            rows[c].append(r)
        return rows

    @cached_property
    def row_mode(self) -> tuple[int, ...]:
        """(M,) each row's mode: its place among its class's rows (0 for every row without modes)."""
        return tuple(r - self._by_class[c][0] for r, c in enumerate(self.row_class))

    def class_rows(self, c: int) -> list[int]:
        """The rows (prompts) of class c: [c] without modes."""
        return self._by_class[c]

    def modes_per_class(self) -> list[int]:
        return [len(rows) for rows in self._by_class]

    def row_of(self, c: int, index: int) -> int:
        """The row image `index` of class c is drawn from (spread over the class's modes by their weights)."""
        if self.row_weight is None:
            return c
        rows = self._by_class[c]
        return rows[mode_of([self.row_weight[r] for r in rows], index)]

    # ---- what an inversion needs of its rows

    def labels(self, folders: list[str], rows: list[int]) -> list[str]:
        """How metrics name the rows: the class folder, with `/m<k>` when the run has modes."""
        return [folders[self.row_class[r]] + (f"/m{self.row_mode[r]}" if self.has_modes else "") for r in rows]

    def token_stems(self, folders: list[str]) -> list[str]:
        """What each row's placeholder token is named after: the class folder, `<folder>-m<k>` with modes."""
        return [folders[c] + (f"-m{m}" if self.has_modes else "") for c, m in zip(self.row_class, self.row_mode)]

    def classes_of(self, rows: list[int]) -> list[int]:
        """The classes whose images `rows` train on, ascending (`rows` itself without modes)."""
        return sorted({self.row_class[r] for r in rows})

    def take(self, per_class: list, classes: list[int], rows: list[int]) -> list:
        """Per row, its mode's members (first dim) of its class's entry of `per_class` (one entry per class of
        `classes`, e.g. latents (N, ...) or None); unchanged without modes. An inversion's rows only."""
        if not self.has_modes:
            return per_class
        at = {c: i for i, c in enumerate(classes)}
        entries = [per_class[at[self.row_class[r]]] for r in rows]
        return [None if x is None else x[list(self.members[r])] for x, r in zip(entries, rows)]

    def data_key(self) -> dict[str, str]:
        """What group results and checkpoints add to their data key: the assignment they were trained for."""
        return {"modes": self.key} if self.has_modes else {}

    def prompt_fields(self) -> dict:
        """The `PromptSet` fields of these rows: each mode's class and weight (nothing without modes)."""
        if not self.has_modes:
            return {}
        return {"mode_class": list(self.row_class), "mode_weight": list(self.row_weight)}


def check_mode_flags(modes, feature: str, teacher: str) -> int:
    """`--modes` as an integer >= 1, checked with `--mode-features` and `--teacher` (a UserError naming the flag)."""
    text = str(modes).strip()
    if isinstance(modes, bool) or not text.lstrip("+-").isdigit():
        raise UserError(f"--modes must be a whole number of prompts per class (1 or more), got {modes!r}")
    k = int(text)
    if k < 1:
        raise UserError(f"--modes must be 1 or more (1 = one prompt per class, the paper's D3M), got {k}")
    if feature not in MODE_FEATURES:
        raise UserError(f"--mode-features must be one of {list(MODE_FEATURES)}, got {feature!r}")
    if k > 1 and feature == "teacher" and not teacher:
        raise UserError("--mode-features teacher needs --teacher NAME:PATH.safetensors (or a promptset teacher's "
                        "PATH): the modes are clustered on its penultimate features")
    return k


FEATURE_BATCH = 64  # images per feature call (fixed, so a feature never depends on how many images a class has)


def assign_modes(run: Path, index: ImageFolderIndex, k: int, image_features, *, feature: str, seed: int,
                 resolution: int, max_pixels: int, by: str) -> dict:
    """Cluster every class's training images into min(K, images) modes and record it in `<run>/modes.json`.

    `image_features(images)` maps images (B, 3, R, R) in [0, 1] (at the inversion resolution) to one feature per image
    (B, ...): the generator's latent means, or a teacher's penultimate features (`feature` names which, `by` is the
    model's or teacher's fingerprint). Class c is clustered with a generator seeded by (seed, c). An existing
    modes.json made from the same data, K, feature, seed, resolution and model or teacher is reused as it is, so a
    resumed run keeps its modes without computing features again. Called by one process, which passes the result on
    (`ModeRows.from_assignment`); the others read the file it wrote (`read_modes`). Returns the assignment (what
    modes.json holds).
    """
    key = {"split_hash": index.split_hash(), "modes": str(k), "feature": feature, "seed": str(seed),
           "resolution": str(resolution), "by": by}
    path = Path(run) / MODES_FILE
    counts = [len(f) for f in index.files]
    if path.is_file():  # a file of other data or settings (or edited into something else) is made again
        try:
            found = read_modes(path, counts)
        except UserError:
            found = None
        if found is not None and found["key"] == key:
            return found
        print(f"invert: {path} was made from other data or settings (or is damaged): clustering again", flush=True)
    classes = []
    for c, paths in enumerate(index.files):
        kc = min(k, len(paths))
        groups = [list(range(len(paths)))]
        if kc > 1:
            images = load_class_images(index, c, resolution, max_pixels=max_pixels)  # (N, 3, R, R)
            with torch.no_grad():
                feats = torch.cat([image_features(images[s : s + FEATURE_BATCH]).flatten(1).float().cpu()
                                   for s in range(0, len(images), FEATURE_BATCH)])  # (N, F)
            groups = split_modes(feats, kc, torch.Generator().manual_seed(derive_seed(seed, "modes", c)))
        classes.append({"folder": index.classes[c], "images": len(paths), "sizes": [len(g) for g in groups],
                        "modes": [{"members": g, "files": [paths[i].name for i in g]} for g in groups]})
    assignment = {"format": "promptset.modes", "rule": MODE_RULE, "feature": feature, "seed": seed,
                  "modes_requested": k, "key": key, "classes": classes}
    write_json(path, assignment)
    sizes = "; ".join(f"{e['folder']} {'/'.join(map(str, e['sizes']))}" for e in classes[:10])
    more = f" (and {len(classes) - 10} more classes)" if len(classes) > 10 else ""
    print(f"invert: modes by k-means on {feature} features; training images per mode: {sizes}{more} ({path})",
          flush=True)
    return assignment


def read_modes(path: Path, images_per_class: list[int]) -> dict:
    """`modes.json`, checked: every class's modes partition its images. A UserError naming the file otherwise."""
    fix = "delete it (invert clusters again) or pass --overwrite"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        classes = data["classes"]
        ok = data.get("format") == "promptset.modes" and len(classes) == len(images_per_class)
        for entry, n in zip(classes, images_per_class):
            members = [i for mode in entry["modes"] for i in mode["members"]]
            ok = ok and sorted(members) == list(range(n)) and all(mode["members"] for mode in entry["modes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a readable mode assignment ({err}); {fix}") from None
    if not ok:
        raise UserError(f"{path} does not split each class's training images into non-empty modes; {fix}")
    return data
