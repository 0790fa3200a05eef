"""The foundation split's per-image captions (issue 33): 20 images with their captions in a grid, and what the
captions say, for BENCHMARKS.md.

    .venv/bin/python experiments/cifar10/caption_grid.py --cache /work/pscache

Reads the captions file `cifar10_generator.py --variant captions` writes with `promptset caption` (its
`<cache>/captions/foundation.jsonl` and the `.stats.json` beside it; run that command's caption step first), draws
two images per class (files 0 and 1250 of the foundation split, the stats' examples) with their captions into
`results/cifar10_captions_grid.png`, and copies the numbers (distinct captions, word counts, each attribute's eta
squared on ResNet-20's features within classes beside its chance level) with the file's SHA-256 into
`results/cifar10_captions.json`. `--report-only` rewrites the .md from the JSON. Thin: it reads promptset's outputs
and draws with `promptset.grids.captioned_grid`. Benchmarks assert nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cifar10_common as common  # noqa: E402

OUT_JSON = common.RESULTS_DIR / "cifar10_captions.json"
OUT_PNG = common.RESULTS_DIR / "cifar10_captions_grid.png"
ATTRIBUTES = {"size": "size (distant / close-up)", "object": "object colour", "height": "height in the frame",
              "texture": "background texture", "background": "background colour", "brightness": "brightness",
              "looks_like": "teacher's runner-up class"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/promptset"), help="data and captions folder")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the JSON")
    args = ap.parse_args(argv)
    if not args.report_only:
        import torch

        from promptset.data import load_image, to_tensor
        from promptset.grids import captioned_grid

        cache = Path(args.cache).expanduser().resolve()
        captions = cache / "captions" / "foundation.jsonl"
        stats = json.loads(captions.with_name(captions.name + ".stats.json").read_text())
        data = cache / "cifar10-jpeg-splits" / "foundation"
        examples = stats["examples"]
        images = [to_tensor(load_image(data / e["path"])) for e in examples]
        common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        captioned_grid([torch.as_tensor(x) for x in images], [f"{e['path']}: {e['caption']}" for e in examples],
                       columns=2).save(OUT_PNG)  # fmt: skip
        result = {"benchmark": "cifar10_captions", "captions_file": "<cache>/captions/foundation.jsonl",
                  "sha256": hashlib.sha256(captions.read_bytes()).hexdigest(), "command": (
                      "python experiments/cifar10/cifar10_generator.py --variant captions (its promptset caption "
                      "step)"), "grid": OUT_PNG.name} | {k: stats[k] for k in (
                      "images", "distinct_captions", "words", "informativeness", "examples", "runner_up_min",
                      "caption_words")}  # fmt: skip
        OUT_JSON.write_text(json.dumps(result, indent=1) + "\n")
    result = json.loads(OUT_JSON.read_text())
    text = markdown(result)
    OUT_JSON.with_suffix(".md").write_text(text)
    print(text)
    return 0


def markdown(r: dict) -> str:
    lines = [f"{r['images']:,} foundation images, {r['distinct_captions']:,} distinct captions "
             f"(sha256 {r['sha256'][:12]}). How much of the within-class variation of ResNet-20's penultimate "
             "features each attribute's words explain (eta squared, pooled over classes), beside the same with the "
             "words shuffled within each class:", "",
             "| attribute | words | eta squared | chance | ratio | most common words |",
             "|---|---:|---:|---:|---:|---|"]
    for key, label in ATTRIBUTES.items():
        info = r["informativeness"].get(key)
        if info is None:
            continue
        common_words = ", ".join(f"{w or '(none)'} {n:,}" for w, n in list(r["words"][key].items())[:4])
        lines.append(f"| {label} | {info['values']} | {info['eta2']:.4f} | {info['chance']:.4f} | "
                     f"{info['eta2'] / max(info['chance'], 1e-9):.0f}x | {common_words} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
