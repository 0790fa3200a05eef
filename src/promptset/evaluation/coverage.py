"""How well a set of images covers real images of its class, in some feature space: precision and recall (k-NN radii,
Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020), and the mean pairwise cosine distance.

Pure functions of feature tensors (no model knowledge); `promptset coverage` feeds them a teacher's penultimate
features. With real features R (n, d), the set's features F (m, d) and k:

    r_i = ||R_i - NN_k(R_i)||       radius of real point i: distance to its k-th nearest *other* real point
    s_j = ||F_j - NN_k(F_j)||       radius of set point j, among the set's other points
    precision = 1/m sum_j 1[exists i: ||F_j - R_i|| <= r_i]       share of the set inside some real ball
    recall    = 1/n sum_i 1[exists j: ||R_i - F_j|| <= s_j]       share of the real points inside some ball of the set
    density   = 1/(k m) sum_j sum_i 1[||F_j - R_i|| <= r_i]       real balls per set point, over k (1 for real data)
    coverage  = 1/n sum_i 1[exists j: ||R_i - F_j|| <= r_i]       share of real balls holding a point of the set

Decisions (the papers leave them open or differ):
- Distances are Euclidean on the features as given (not L2-normalised, as Naeem et al. use raw VGG features),
  computed exactly in float64 (no `|a|^2 + |b|^2 - 2ab` shortcut, whose rounding breaks ties and self-distances).
- "Inside" is `<=`: a point exactly at a ball's radius is inside (Kynkäänniemi et al.'s definition; the `prdc`
  package uses `<`). A duplicate is another point at distance 0, so k duplicates give a ball of radius 0.
- A set of n < k + 1 points has no k-th other neighbour: its radii use k' = n - 1 (the farthest other point), and
  density divides by the real side's k'. With n = 1 no radius exists: the metrics that need that set's balls are
  None (precision, density and coverage need real balls; recall needs the set's). The k used is reported.
- The mean pairwise cosine distance is the mean over pairs i < j of 1 - cos(x_i, x_j) (None for one point); a zero
  feature vector has cosine 0 with everything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT, FORMAT_VERSION = "promptset.coverage", 1  # what `promptset coverage` writes and report reads
METRICS = ("precision", "recall", "density", "coverage", "pairwise_cosine", "teacher_top1")
LABELS = {"precision": "precision", "recall": "recall", "density": "density", "coverage": "coverage",
          "pairwise_cosine": "pairwise cos. dist.", "teacher_top1": "teacher top-1"}


def distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distances (N, M) in float64 between the rows of a (N, d) and b (M, d)."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)


def knn_radii(x: torch.Tensor, k: int) -> tuple[torch.Tensor | None, int]:
    """(radii (n,), k used): each point's distance to its k-th nearest other point, with k' = min(k, n - 1);
    (None, 0) for a single point."""
    n = len(x)
    used = min(k, n - 1)
    if used < 1:
        return None, 0
    d = distances(x, x)  # (n, n)
    d.fill_diagonal_(math.inf)  # a point is not its own neighbour (a duplicate is, at distance 0)
    return d.kthvalue(used, dim=1).values, used  # (n,)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict:
    """Precision, recall, density and coverage of `fake` (m, d) against `real` (n, d), with the k actually used.

    Values are floats, or None where a set is too small to have k-NN balls (see the module docstring).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (n, d) and (m, d) features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if not len(real) or not len(fake):
        raise ValueError("both feature sets need at least one point")
    real_radii, k_real = knn_radii(real, k)  # (n,)
    fake_radii, k_fake = knn_radii(fake, k)  # (m,)
    d = distances(real, fake)  # (n, m)
    out = {"precision": None, "recall": None, "density": None, "coverage": None, "k_real": k_real, "k_fake": k_fake,
           "n_real": len(real), "n_fake": len(fake)}
    if real_radii is not None:
        inside = d <= real_radii[:, None]  # (n, m): fake j inside real i's ball
        out["precision"] = inside.any(dim=0).double().mean().item()
        out["density"] = inside.sum().item() / (k_real * len(fake))
        out["coverage"] = inside.any(dim=1).double().mean().item()
    if fake_radii is not None:
        out["recall"] = (d <= fake_radii[None, :]).any(dim=1).double().mean().item()
    return out


def pairwise_cosine_distance(x: torch.Tensor) -> float | None:
    """Mean over pairs i < j of 1 - cos(x_i, x_j), in float64; None for fewer than two points."""
    n = len(x)
    if n < 2:
        return None
    unit = F.normalize(x.double(), dim=1)  # (n, d); a zero row stays zero
    cos = unit @ unit.T  # (n, n)
    upper = torch.triu_indices(n, n, offset=1)
    return (1.0 - cos[upper[0], upper[1]]).mean().item()


def mean_over_classes(rows: list[dict]) -> dict:
    """Per metric, the mean over the classes that define it, and how many did ({metric: value}, {metric: count})."""
    means, counts = {}, {}
    for name in METRICS:
        values = [r[name] for r in rows if r.get(name) is not None]
        means[name] = sum(values) / len(values) if values else None
        counts[name] = len(values)
    return {"means": means, "classes": counts}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(result: dict) -> str:
    """The per-class and overall table of a `coverage.json` result, set and random-real reference row by row."""
    lines = [
        "| class | images | real | set | " + " | ".join(LABELS[m] for m in METRICS) + " |",
        "|---|---:|---:|---|" + "---:|" * len(METRICS),
    ]
    rows = [(c["class"], c["images"], c["real"], c) for c in result["classes"]]
    rows.append(("**overall**", result["counts"]["images"], result["counts"]["real"], result["overall"]))
    for name, images, real, row in rows:
        for label, key in (("images", "set"), ("random real", "reference")):
            cells = " | ".join(_cell(row[key][m]) for m in METRICS)
            lines.append(f"| {name} | {images} | {real} | {label} | {cells} |")
            name = images = real = ""
    return "\n".join(lines) + "\n"


def count_text(low: int, high: int) -> str:
    """A count per class: '50' when every class has 50, else '40-50'."""
    return str(low) if low == high else f"{low}-{high}"


def report_section(result: dict, path: str) -> str:
    """The short Markdown section report.md shows for a run's coverage.json: the overall rows only."""
    c = result["counts"]
    head = " | ".join(LABELS[m] for m in METRICS)
    lines = [
        "",
        f"## Coverage ({path})",
        "",
        f"{result['images']} against real images {result['real']}, in the penultimate features of teacher "
        f"{result['teacher']['spec']} ({result['teacher']['feature_dim']}-d, {result['teacher']['input_size']} px), "
        f"k = {result['k']}; {c['images']} images per class beside as many random real ones (seed "
        f"{result['seed']}), both against the remaining {c['real']} real images per class. The numbers depend on "
        "these counts: compare them only at equal counts. Mean over classes.",
        "",
        f"| set | images per class | {head} |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    for label, key in (("images", "set"), ("random real", "reference")):
        cells = " | ".join(_cell(result["overall"][key][m]) for m in METRICS)
        lines.append(f"| {label} | {c['images']} | {cells} |")
    return "\n".join(lines) + "\n"


def read_result(path: Path) -> tuple[dict | None, str]:
    """(the result in a `coverage.json`, '') or (None, why it cannot be shown); (None, '') when there is none."""
    if not path.is_file():
        return None, ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path} is not readable JSON ({err}); run `promptset coverage` again"
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        return None, f"{path} was not written by this version of `promptset coverage`; run it again"
    return data, ""
