"""Is `promptset run --plan` right about the time a run takes? Plan a small run of a recipe on this CPU, then run it,
and compare the plan's estimate with the measured wall time, stage by stage and in total (issue: within 2x).

The run is `recipes/cifar10-sd15.yaml` (every stage: teacher, select, invert, generate, budget, evaluate under P1
and P2 with all five methods, report) on a tiny random Stable Diffusion (`backends.tiny.build_sd`, saved as a
diffusers folder, so the plan times its calls on the folder as it would time a real model) and a small synthetic
ImageFolder, with its paths and counts set through `--set` as a user would. The plan runs with measuring on (its
default); the stages then run in this process one after another exactly as `promptset run` calls them, each timed.
Python start-up and imports are outside both numbers (they are paid once per process).

    python benchmarks/plan_check.py --json benchmarks/results/plan_check.json
    python benchmarks/plan_check.py --quick            # a smaller run (about 30 s), to check the script
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine  # noqa: E402

RECIPE = REPO / "recipes" / "cifar10-sd15.yaml"
CLASSES = ("car", "cat", "dog")


def write_data(root: Path, per_class: int, side: int) -> Path:
    """Per class a base colour plus noise (an easy ImageFolder), `per_class` PNGs of side x side."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        base = np.array([(60 + 90 * c) % 256, (200 - 70 * c) % 256, (30 + 110 * c) % 256])
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(base + rng.integers(-40, 40, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def overrides(data: Path, model: Path, out: Path, quick: bool) -> list[str]:
    sets = {"paths.train": data, "paths.test": data, "paths.model": model,
            "paths.teacher": out / "teacher.safetensors", "run": out / "run", "teacher.epochs": 5 if quick else 20,
            "select.resolution": 32,
            "invert.steps": 20 if quick else 80, "invert.resolution": 32, "generate.ipc": 10,
            "generate.steps": 5 if quick else 10, "evaluate.ipc": "1,10", "evaluate.epochs": 10 if quick else 30,
            "evaluate.seeds": 1 if quick else 2, "evaluate.regen_every": 5 if quick else 10}
    for stage in ("teacher", "select", "invert", "generate", "evaluate"):
        sets |= {f"{stage}.device": "cpu", f"{stage}.progress": "false"}
    return [f"{k}={v}" for k, v in sets.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, to check the script")
    parser.add_argument("--work", default="", help="working folder (default: a temporary one)")
    parser.add_argument("--json", default="", help="write the numbers here")
    args = parser.parse_args()

    import torch

    from promptset.backends.tiny import build_sd
    from promptset.pipeline import STAGE_ORDER, resolved_sections, stage, teacher_step
    from promptset.plan import make_plan
    from promptset.plan.render import render
    from promptset.runconfig import check_inputs, load_recipe
    from promptset.threads import configure

    configure()
    work = Path(args.work or tempfile.mkdtemp(prefix="plan-check-"))
    data = write_data(work / "data", 16 if args.quick else 40, 32)
    model = work / "tiny-sd"
    if not (model / "model_index.json").is_file():
        build_sd(model)
    out = work / "out"
    sets = overrides(data, model, out, args.quick)

    start = time.perf_counter()
    plan = make_plan(str(RECIPE), None, sets)
    plan_seconds = time.perf_counter() - start
    print(render(plan), flush=True)

    recipe = load_recipe(str(RECIPE), sets, STAGE_ORDER)
    runs = resolved_sections(recipe, str(RECIPE), None)
    check_inputs(recipe["stages"])
    measured: dict[str, float] = {}
    for name, cfg, _ in runs:
        t0 = time.perf_counter()
        if name == "teacher":
            teacher_step(cfg, name)
        else:
            stage(name)[1](cfg)
        measured[name] = measured.get(name, 0.0) + time.perf_counter() - t0
    estimated: dict[str, float] = {}
    for line in plan["lines"]:
        estimated[line["stage"]] = estimated.get(line["stage"], 0.0) + line["seconds"]
    total_measured, total_estimated = sum(measured.values()), plan["total_seconds"]
    ratio = total_estimated / total_measured
    result = {
        "what": "promptset run --plan's estimated seconds against the measured wall time of the same run, on the "
                "device at hand (CPU), stage by stage; start-up and imports excluded from both",
        "machine": machine("cpu"),
        "torch_threads": torch.get_num_threads(),
        "recipe": str(RECIPE.relative_to(REPO)),
        "sets": [s.replace(str(work), "WORK") for s in sets],
        "plan_seconds": round(plan_seconds, 2),
        "estimated_seconds": {k: round(v, 2) for k, v in estimated.items()},
        "measured_seconds": {k: round(v, 2) for k, v in measured.items()},
        "estimated_total_seconds": round(total_estimated, 2),
        "measured_total_seconds": round(total_measured, 2),
        "estimate_over_measured": round(ratio, 3),
        "within_2x": 0.5 <= ratio <= 2.0,
        "timed_lines": sum(1 for x in plan["lines"] if x["measured"]),
        "lines": len(plan["lines"]),
        "notes": plan["notes"],
    }
    print(f"\nplan_check: estimated {total_estimated:.1f} s, measured {total_measured:.1f} s: estimate / measured = "
          f"{ratio:.2f} ({'within' if result['within_2x'] else 'NOT within'} 2x); per stage:")
    for name in measured:
        est = estimated.get(name, 0.0)
        print(f"  {name:<9} estimated {est:7.1f} s   measured {measured[name]:7.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
