"""Sampling options that widen the diversity of generated images and store nothing (docs/DESIGN.md section 9):
guidance on an interval of the steps, condition-annealed sampling (CADS), and a seed selection that spreads a class's
images.

With n sampling steps, step k = 0 .. n-1 (k = 0 starts from pure noise) sits at position k/n of the trajectory:

- `--guidance-interval LO,HI` (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and
  distribution quality"): classifier-free guidance only on the steps with LO <= k/n < HI; on the others the
  conditional prediction alone (guidance 1), and the unconditional forward pass is skipped. 0,1 is every step.
- `--cads TAU1,TAU2[,S[,PSI]]` (Sadat et al. 2024, "CADS: Unleashing the diversity of diffusion models through
  condition-annealed sampling", Eqs. 2-4): at diffusion time t = 1 - k/n the conditional states y (B, L, D) are

      gamma(t) = 1 for t <= TAU1,  (TAU2 - t) / (TAU2 - TAU1) for TAU1 < t < TAU2,  0 for t >= TAU2
      y_hat    = sqrt(gamma) y + S sqrt(1 - gamma) n,         n ~ N(0, I), drawn anew at every step
      y_res    = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)
      y_cads   = PSI y_res + (1 - PSI) y_hat

  Decisions: n comes from each image's own generator (so an image stays a function of its seed and never of its
  batch), and the statistics are per image over its (L, D) states, not over the batch as in the paper's snippet;
  the unconditional states are left as they are; token positions the backend zeroes (padding the mini model reads
  as absent) stay zero and are left out of the statistics; a step with gamma = 1 draws nothing.
- `--selection diverse[:MARGIN]` with `--candidates G` (`SpreadSelection`): image i of class c keeps, among its G
  candidates whose mean teacher cross-entropy is within MARGIN nats of its best candidate's, the one farthest from
  the images already chosen for c (mean over its patches of the Euclidean distance, in the teacher's penultimate
  features, to the nearest patch of images 0..i-1 of c); image 0 keeps its lowest cross-entropy, as `typical`.

- `--describe random`: each image's prompt is the caption pattern `promptset caption` writes, around the class's
  token (or name), with attribute words (sizes, colours, height, texture, brightness) drawn uniformly from the
  image's own seed (`captions.described_prompt`): for a generator trained on per-image captions (`pretrain
  --captions`), whose text space has directions inside a class. The words are a function of the seed, so nothing is
  stored.

Each option is recorded in the generation settings only when it changes something, so the keys, caches and stored
sets made without them stay as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..captions import DESCRIBE_VERSION, described_prompt
from ..dist import span
from ..errors import UserError
from .sampling import Job, rank_share

CADS_NOISE_SCALE, CADS_PSI = 0.25, 1.0  # the paper's recommended s and rescaling (its reference settings)
CADS_KEYS = ("tau1", "tau2", "noise_scale", "psi")  # as recorded in the generation settings
SELECTIONS = ("typical", "diverse")
# Nats of teacher cross-entropy a candidate may give up for spread (`--selection diverse`). On the digits world (15
# images per class, G = 4, `promptset coverage` against the test split, 3 seeds) 0.5 chose outliers: coverage 0.157
# against typical's 0.252, precision 0.32 against 0.63; 0.1 kept most of typical's coverage (0.230), recall 0.90.
DIVERSE_MARGIN = 0.1


def _numbers(text: str, flag: str, count: tuple[int, int], form: str) -> list[float]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not count[0] <= len(values) <= count[1] or not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag} {text!r}: expected {form}")
    return values


def parse_guidance_interval(text: str, flag: str = "--guidance-interval") -> tuple[float, float] | None:
    """`LO,HI` -> (LO, HI), or None for every step ('' or `0,1`)."""
    if not str(text).strip():
        return None
    form = ("LO,HI, two fractions of the sampling steps with 0 <= LO < HI <= 1, e.g. 0.3,1 (no guidance on the "
            "first 30% of the steps, from pure noise); omit it, or pass 0,1, for guidance on every step")
    lo, hi = _numbers(text, flag, (2, 2), form)
    if not 0 <= lo < hi <= 1:
        raise UserError(f"{flag} {text!r}: expected {form}")
    return None if (lo, hi) == (0.0, 1.0) else (lo, hi)


@dataclass(frozen=True)
class Cads:
    """Condition annealing (Sadat et al. 2024): the schedule's TAU1 < TAU2, noise scale S, rescaling mix PSI."""

    tau1: float
    tau2: float
    noise_scale: float = CADS_NOISE_SCALE
    psi: float = CADS_PSI

    def gamma(self, t: float) -> float:
        """How much of the condition is kept at diffusion time t in [0, 1] (1 = pure noise)."""
        if t <= self.tau1:
            return 1.0
        if t >= self.tau2:
            return 0.0
        return (self.tau2 - t) / (self.tau2 - self.tau1)

    def settings(self) -> dict:
        return dict(zip(CADS_KEYS, (self.tau1, self.tau2, self.noise_scale, self.psi)))


def parse_describe(text: str, flag: str = "--describe") -> bool:
    """`random` -> True; '', `off` -> False."""
    value = str(text).strip().lower()
    if value not in ("", "off", "none", "random"):
        raise UserError(f"{flag} {text!r}: expected 'random' (words drawn from each image's seed around its prompt) "
                        "or 'off'")
    return value == "random"


def parse_cads(text: str, flag: str = "--cads") -> Cads | None:
    """`TAU1,TAU2[,S[,PSI]]` -> Cads, or None ('', `off`)."""
    if str(text).strip().lower() in ("", "off", "none"):
        return None
    form = (f"TAU1,TAU2[,S[,PSI]] with 0 <= TAU1 < TAU2 <= 1, noise scale S > 0 (default {CADS_NOISE_SCALE:g}) and "
            f"rescaling mix 0 <= PSI <= 1 (default {CADS_PSI:g}), e.g. 0.6,0.9 (the paper's schedule); 'off' for none")
    values = _numbers(text, flag, (2, 4), form)
    cads = Cads(*values)
    if not (0 <= cads.tau1 < cads.tau2 <= 1 and cads.noise_scale > 0 and 0 <= cads.psi <= 1):
        raise UserError(f"{flag} {text!r}: expected {form}")
    return cads


@dataclass(frozen=True)
class Diversity:
    """The options: the sampler reads the first two (`DiffusionBackend.sample`), seed selection the third, the
    conditioners the fourth (`sampling.sample_images`)."""

    guidance_interval: tuple[float, float] | None = None  # None: guidance on every step
    cads: Cads | None = None  # None: the condition as it is
    selection: float | None = None  # `--selection diverse`'s margin in nats; None: typical (or no selection)
    described: bool = False  # `--describe random`: each image's prompt with words drawn from its seed

    @classmethod
    def parse(cls, guidance_interval: str, cads: str, selection: str, *, guidance: float,
              candidates: int, describe: str = "") -> Diversity:
        """From the flags' text; refuses bad values, an interval without guidance to restrict, and diverse selection
        without candidates to choose from."""
        interval = parse_guidance_interval(guidance_interval)
        if interval is not None and guidance == 1.0:
            raise UserError(f"--guidance-interval {guidance_interval} restricts classifier-free guidance, which "
                            "--guidance 1 turns off; pass a guidance scale other than 1, or drop --guidance-interval")
        margin = parse_selection(selection)
        if margin is not None and candidates <= 1:
            raise UserError(f"--selection {selection} chooses among the candidates the teacher scores: pass --teacher "
                            "and --candidates 2 or more (or leave --candidates at 0, auto), or --selection typical")
        return cls(interval, parse_cads(cads), margin, parse_describe(describe))

    @classmethod
    def from_settings(cls, settings: dict) -> Diversity:
        """From generation settings (`settings()`'s keys; absent keys are the defaults)."""
        interval, cads = settings.get("guidance_interval"), settings.get("cads")
        where = "the recorded generation settings"
        described = settings.get("describe")
        if described not in (None, DESCRIBE_VERSION):
            raise UserError(f"{where} describe prompts with {described!r}, which this promptset does not know (it "
                            f"knows {DESCRIBE_VERSION!r}); use the promptset version that made them")
        return cls(None if interval is None else parse_guidance_interval(",".join(map(str, interval)), where),
                   None if cads is None else parse_cads(",".join(str(cads[k]) for k in CADS_KEYS), where),
                   parse_selection(settings.get("selection", "typical"), where), described is not None)

    def settings(self) -> dict:
        """What changes a pixel, for `generation_settings`: only the options that are on."""
        out = {}
        if self.guidance_interval is not None:
            out["guidance_interval"] = list(self.guidance_interval)
        if self.cads is not None:
            out["cads"] = self.cads.settings()
        if self.selection is not None:  # only with `candidates` > 1 (`parse` refuses it otherwise)
            out["selection"] = selection_text(self.selection)
        if self.described:
            out["describe"] = DESCRIBE_VERSION
        return out

    def texts(self) -> dict[str, str]:
        """The flags' canonical text ('' for the interval and CADS when off), e.g. for evaluate's resolved config."""
        gi, cads = self.guidance_interval, self.cads
        return {"guidance_interval": "" if gi is None else f"{gi[0]:g},{gi[1]:g}",
                "cads": "" if cads is None else ",".join(f"{v:g}" for v in cads.settings().values()),
                "selection": selection_text(self.selection), "describe": "random" if self.described else "off"}

    def spread(self, features_of: Callable, earlier: Callable | None = None) -> SpreadSelection | None:
        """`--selection diverse`'s `SpreadSelection` (its arguments there), None for typical."""
        return None if self.selection is None else SpreadSelection(self.selection, features_of, earlier)

    def guided(self, k: int, n: int) -> bool:
        """Whether step k of n applies classifier-free guidance."""
        return self.guidance_interval is None or self.guidance_interval[0] <= k / n < self.guidance_interval[1]

    def describe(self, guidance: float, steps: int) -> str:
        """One line on what is on, for the stages' output ('' when nothing is)."""
        parts = []
        if self.guidance_interval is not None:
            on = sum(self.guided(k, steps) for k in range(steps))
            parts.append(f"guidance {guidance:g} on {on} of {steps} steps (--guidance-interval "
                         f"{self.texts()['guidance_interval']}; the others unguided)")
        if self.cads is not None:
            c = self.cads
            parts.append(f"CADS: condition noised for t > {c.tau1:g}, fully for t >= {c.tau2:g} (s {c.noise_scale:g}, "
                         f"psi {c.psi:g})")
        if self.described:
            parts.append("prompts described with words drawn from each image's seed (--describe random), e.g. "
                         f"{described_prompt('<token>', 0)!r}")
        return "; ".join(parts)

    @torch.no_grad()
    def condition(self, cond: torch.Tensor, k: int, n: int, generators: list[torch.Generator]) -> torch.Tensor:
        """The conditional states (B, L, D) at step k of n: `cond` itself, or its CADS annealing (module docstring)."""
        gamma = 1.0 if self.cads is None else self.cads.gamma(1 - k / n)
        if gamma >= 1:
            return cond
        y = cond.float()  # (B, L, D)
        noise = torch.stack([torch.randn(y.shape[1:], generator=g) for g in generators]).to(y.device)  # (B, L, D)
        keep = (y != 0).any(-1, keepdim=True).float()  # (B, L, 1): positions the backend zeroed stay zero
        noisy = math.sqrt(gamma) * y + self.cads.noise_scale * math.sqrt(1 - gamma) * noise
        if self.cads.psi > 0:
            mean, std = _masked_stats(y, keep)
            noisy_mean, noisy_std = _masked_stats(noisy, keep)
            rescaled = (noisy - noisy_mean) / noisy_std * std + mean
            noisy = self.cads.psi * rescaled + (1 - self.cads.psi) * noisy
        return (noisy * keep).to(cond.dtype)


def _masked_stats(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image mean and (unbiased) std of x (B, L, D) over the kept positions: (B, 1, 1) each."""
    count = (keep.sum((1, 2)) * x.shape[-1]).clamp_min(2)[:, None, None]  # (B, 1, 1)
    mean = (x * keep).sum((1, 2), keepdim=True) / count
    var = ((x - mean) ** 2 * keep).sum((1, 2), keepdim=True) / (count - 1)
    return mean, var.sqrt().clamp_min(1e-12)


def parse_selection(text: str, flag: str = "--selection") -> float | None:
    """`typical` -> None; `diverse[:MARGIN]` -> MARGIN (nats, default `DIVERSE_MARGIN`)."""
    name, sep, margin = str(text).strip().lower().partition(":")
    form = (f"typical (the lowest cross-entropy) or diverse[:MARGIN] (spread within MARGIN nats of it, default "
            f"{DIVERSE_MARGIN:g}), e.g. diverse:1")
    if name not in SELECTIONS or (sep and name != "diverse"):
        raise UserError(f"{flag} {text!r}: expected {form}")
    if name == "typical":
        return None
    try:
        value = float(margin) if sep else DIVERSE_MARGIN
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{flag} {text!r}: MARGIN must be a number of nats >= 0; expected {form}")
    return value


def selection_text(margin: float | None) -> str:
    """The canonical `--selection` value (recorded in the generation settings when not `typical`)."""
    return "typical" if margin is None else f"diverse:{margin:g}"


class SpreadSelection:
    """`--selection diverse`: per class, candidates chosen in index order, each as far as the teacher's features allow
    from the images already chosen for its class (module docstring). Image i's choice depends on images 0..i-1 of its
    class and nothing else, so IPC k's set is the first k images of any larger IPC's, and a stored seed regenerates
    its image alone.

    Args:
        margin: nats of cross-entropy above a job's best candidate that a candidate may have and still be chosen.
        features_of: uint8 patches (N, 3, S, S) -> (penultimate features (N, D), logits (N, C)) on the CPU, from a
            fixed teacher batch (an image's features never depend on its neighbours).
        earlier: (class, image indices) -> uint8 patches (n, P, 3, S, S) of those images as chosen earlier (files on
            disk, a round cache), for images of a class this object has not chosen itself; None when every earlier
            image passes through `choose` first.
    """

    def __init__(self, margin: float, features_of: Callable, earlier: Callable | None = None):
        self.margin = margin
        self.features_of = features_of
        self.earlier = earlier
        self.chosen: dict[int, dict[int, torch.Tensor]] = {}  # class -> image index -> its patches' features (P, D)

    def _before(self, job: Job) -> torch.Tensor | None:
        """The features (n*P, D) of images 0..index-1 of the job's class; None for image 0."""
        have = self.chosen.setdefault(job.cls, {})
        missing = [i for i in range(job.index) if i not in have]
        if missing:
            if self.earlier is None:
                raise RuntimeError(f"--selection diverse: image {job.index} of class {job.cls} needs images "
                                   f"{missing[:5]} of its class chosen first")
            pixels = self.earlier(job.cls, missing)  # (n, P, 3, S, S) uint8
            features = self.features_of(pixels.flatten(0, 1))[0].view(len(missing), pixels.shape[1], -1)
            have.update(zip(missing, features))
        return torch.cat([have[i] for i in range(job.index)]) if job.index else None

    def choose(self, jobs: list[Job], ce: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The chosen candidate (B,) of each job, in order, from every candidate's cross-entropy (B, G) and patch
        features (B, G, P, D); remembers each choice for the later images of its class."""
        best = []
        for b, job in enumerate(jobs):
            before = self._before(job)
            g = int(ce[b].argmin())  # image 0, and the first of equal scores: as `typical`
            if before is not None:
                cand = features[b].double()  # (G, P, D)
                dist = torch.cdist(cand.flatten(0, 1), before.double(), compute_mode="donot_use_mm_for_euclid_dist")
                spread = dist.min(1).values.view(cand.shape[:2]).mean(1)  # (G,) mean nearest distance of its patches
                spread[ce[b].double() > ce[b].double().min() + self.margin] = -math.inf
                g = int(spread.argmax())  # the first of equal spreads
            self.chosen[job.cls][job.index] = features[b, g]
            best.append(g)
        return torch.tensor(best, dtype=torch.long)


def job_shares(jobs: list[Job], world: int, whole_classes: bool) -> list[tuple[int, int]]:
    """Every process's contiguous share [lo, hi) of the jobs (grouped by class): `sampling.rank_share`'s, or with
    `whole_classes` (`--selection diverse`, which chooses a class's images in order) whole classes per process, so a
    class is never split (fewer classes than processes leave some processes idle)."""
    if not whole_classes:
        return [rank_share(jobs, r, world) for r in range(world)]
    starts = [k for k in range(len(jobs)) if k == 0 or jobs[k].cls != jobs[k - 1].cls] + [len(jobs)]
    return [(starts[a], starts[b]) for a, b in (span(len(starts) - 1, r, world) for r in range(world))]
