"""The evaluate stage's work, counted as `promptset evaluate` does it: per protocol section, IPC and method, the fresh
rounds it generates (round 0 of d3m taken from generate's images when generate made them with the same settings;
every other round generated once per method and shared by every IPC and protocol through the round cache), the
teacher's labels, and `seeds` students of epochs x ceil(images / batch) steps, tested every `eval_every` epochs.
"""

from __future__ import annotations

import math

from ..backends.selection import AUTO_CANDIDATES
from .ops import MEASURE_BUDGET_S, Op, _padded, network_ops
from .stored import equal_bytes_ipc, student_size

GENERATIVE = ("d3m", "class-prompt")
LABEL_BATCH = 256  # evaluation.methods.teacher_logits


def evaluate_work(p) -> None:
    """Add evaluate's work lines to planner `p` and its counts to `p.counts`."""
    from ..stages.evaluate import parse_ipcs

    made: dict[tuple, int] = {}  # (method, round, settings) -> images per class in the round cache
    p.counts.update(student_steps=0, eval_generated_images=0, eval_sampled_images=0)
    c = p.data.classes
    g = p.gen_cfg
    for e in p.evals:
        ipcs = parse_ipcs(e.ipc) or [g.ipc if g else 10]
        methods = list(dict.fromkeys(m.strip() for m in e.method.split(",") if m.strip()))
        factor = e.factor or getattr(p, "factor", 0) or (p.select_cfg.factor if p.select_cfg else 1)
        size = student_size(p, e)
        rounds = math.ceil(e.epochs / e.regen_every) if e.regen_every else 1
        steps = e.gen_steps or (g.steps if g else 25)
        guidance = e.guidance if e.guidance is not None else (g.guidance if g else 7.5)
        sb = e.sampler_batch or (g.sampler_batch if g else 8)
        seed = e.gen_seed if e.gen_seed >= 0 else (g.seed if g else 0)
        sampler = e.sampler or (g.sampler if g else "ddim")
        resolution = e.resolution or p.invert_res
        if e.candidates:
            cands = e.candidates
        elif g is not None:
            cands = p.gen_candidates
        else:
            cands = AUTO_CANDIDATES if e.protocol in ("p1", "p3") or e.teacher else 1
        teacher_runs = p.teacher is not None and (e.protocol in ("p1", "p3") or bool(e.teacher) or cands > 1)
        same_as_generate = g is not None and (steps, guidance, sb, seed, sampler, cands, resolution, factor) == (
            g.steps, g.guidance, g.sampler_batch, g.seed, g.sampler, p.gen_candidates, p.gen_res, p.factor)
        settings = (steps, guidance, sb, seed, sampler, cands, resolution, factor, size, e.class_prompt)
        label = f"{e.protocol}"
        student = network_ops(e.student, c, size, "student", device=p._device(), rate=p.rates["student"],
                              batch=e.batch_size, budget=MEASURE_BUDGET_S)
        if student is None:
            p.notes.append(f"evaluate: promptset cannot build student {e.student!r} to count it; its FLOPs are "
                           "left out")
            student = (Op(f"{e.student} forward", 0.0, "student"), Op(f"{e.student} step", 0.0, "student"))
        loaded = False

        def group(method: str, e=e, ipcs=ipcs, label=label) -> str:
            return f"{label} {method} (IPC {'/'.join(map(str, ipcs))}, {e.seeds} seeds x {e.epochs} epochs)"

        for ipc in ipcs:
            for method in methods:
                base, _, target = method.partition("@")
                if base == "full" and ipc != ipcs[0]:
                    continue
                labelled = 0  # images the teacher labels for this method at this IPC
                if base in GENERATIVE:
                    per_class = math.ceil(ipc / factor**2)
                    jobs = images = 0
                    for r in range(rounds):
                        if base == "d3m" and r == 0 and same_as_generate and p.generated_ipc >= ipc:
                            continue  # generate's own images, read from its PNGs
                        key = (base, r, settings)
                        have = made.get(key, 0) if e.round_cache else 0
                        new = max(per_class - have, 0)
                        made[key] = max(have, per_class)
                        jobs += c * new
                        images += _padded(c * new, e.gen_batch_size, sb, cands)
                    if jobs:
                        loaded = True
                        calls = images // sb
                        p._add("evaluate", f"{label} {base} IPC {ipc}: {jobs:,} new images of {rounds} round(s) x "
                               f"{cands} candidate(s), {images:,} with padding, x {steps} steps",
                               p.ops["unet_sample"], calls * steps, images * steps, group(method),
                               {"images generated": jobs})
                        p._add("evaluate", f"{label} {base} IPC {ipc}: {images:,} VAE decodes", p.ops["vae_decode"],
                               calls, images, group(method))
                        if cands > 1 and p.teacher is not None:
                            chunk = sb * factor**2
                            scored = jobs * cands * factor**2
                            p._add("evaluate", f"{label} {base} IPC {ipc}: {scored:,} candidate patches scored",
                                   p.teacher[0], math.ceil(scored / chunk), _padded(scored, chunk, chunk),
                                   group(method), {"teacher forwards": scored})
                    p.counts["eval_generated_images"] += jobs
                    p.counts["eval_sampled_images"] += images
                    n = c * ipc
                    if teacher_runs:
                        labelled = rounds * n
                    rows = n
                elif base == "full":
                    rows = n = sum(p.data.per_class) if e.train else sum(
                        min(k, p.select_cfg.max_images_per_class or k) for k in p.data.per_class)
                    labelled = n if e.protocol == "p1" else 0
                else:
                    k = equal_bytes_ipc(p, e, target, ipc) if target else ipc
                    rows = n = c * k
                    per_seed = base == "random-real"
                    labelled = (n * (e.seeds if per_seed else 1)) if e.protocol == "p1" else 0
                if labelled and p.teacher is not None:
                    p._add("evaluate", f"{label} {method} IPC {ipc}: {labelled:,} teacher forwards (labels)",
                           p.teacher[0], math.ceil(labelled / LABEL_BATCH), labelled, group(method),
                           {"teacher forwards": labelled})
                batch = min(e.batch_size, rows)
                per_seed_steps = e.epochs * math.ceil(rows / batch)
                steps_all = per_seed_steps * e.seeds
                p.counts["student_steps"] += steps_all
                p._add("evaluate", f"{label} {method} IPC {ipc}: {e.seeds} seed(s) x {e.epochs} epochs x "
                       f"{math.ceil(rows / batch):,} steps of {batch} = {steps_all:,} student steps "
                       f"({e.student} at {size} px)", student[1], steps_all, e.seeds * e.epochs * rows,
                       group(method), {"student steps": steps_all})
                tests = e.epochs // _every(e) + (1 if e.epochs % _every(e) else 0)
                p._add("evaluate", f"{label} {method} IPC {ipc}: {e.seeds * tests} tests x {p.data.test:,} test "
                       "images", student[0], e.seeds * tests * math.ceil(p.data.test / e.eval_batch_size),
                       e.seeds * tests * p.data.test, group(method), {"test images": e.seeds * tests * p.data.test})
        if loaded:
            p._add("evaluate", f"{label}: load the generator", p.ops["load"], 1, 0)
        if any(m.partition("@")[0] in GENERATIVE for m in methods):
            held = rounds * c * max(ipcs) * 3 * size * size  # uint8 patches of every round, on the device
            p.held_bytes = max(getattr(p, "held_bytes", 0), held)
            p.held_what = f"{rounds} round(s) x {c:,} classes x {max(ipcs)} images at {size} px"


def _every(e) -> int:
    return e.eval_every or max(1, e.epochs // 10)  # stages.evaluate._recipe
