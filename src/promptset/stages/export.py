"""Export learned prompts as textual-inversion files that diffusers' `pipe.load_textual_inversion` loads as-is.

One `{token: (V, D)}` safetensors file per class (diffusers reads one token per file), plus `tokens.json`. A run with
modes (`invert --modes K`) has one token per mode, `<class-m0>`, `<class-m1>`, ...: one file per mode,
`<class>-m<k>.safetensors`, and `tokens.json` names each token's class, mode and training images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_path, write_json
from ..config import make_config, opt
from ..errors import UserError
from ..runfolder import require_classes, require_prompts


@dataclass
class ExportConfig:
    run: str = opt("", "run folder with prompts.safetensors")
    out: str = opt("", "output folder (default: <run>/export)")


def export(cfg: ExportConfig | None = None, **overrides) -> Path:
    """Write `<out>/<class>.safetensors` (one token each; `<class>-m<k>.safetensors` per mode with modes) and
    `<out>/tokens.json`; returns the folder."""
    cfg = make_config(ExportConfig, cfg, overrides, "export")
    if not cfg.run:
        raise UserError("--run is required")
    run = Path(cfg.run)
    classes = require_classes(run)
    prompts = require_prompts(run, classes)
    out = Path(cfg.out) if cfg.out else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    earlier = _listed_files(out)
    rows = []
    for c, info in enumerate(classes):
        for k, r in enumerate(prompts.class_rows(c)):  # [c] without modes
            token = prompts.token_names[r]
            path = out / (f"{info.folder}-m{k}.safetensors" if prompts.has_modes else f"{info.folder}.safetensors")
            with atomic_path(path) as tmp:
                save_file({token: prompts.embeddings[r].contiguous()}, str(tmp))  # (V, D)
            mode = {"mode": k, "mode_images": prompts.mode_weight[r]} if prompts.has_modes else {}
            rows.append({"class": info.folder, "name": info.name, "token": token, "file": path.name,
                         "prompt": prompts.template.format(token=token), **mode})
    width = int(prompts.embeddings.shape[-1])
    usable = "Stable Diffusion pipelines of this model (diffusers load_textual_inversion)" if prompts.backend == "sd" \
        else f"only promptset's {prompts.backend} model {prompts.model_id} (its {width}-wide text encoder)"
    for name in earlier - {row["file"] for row in rows}:  # an earlier export's token files would load too
        (out / name).unlink(missing_ok=True)
    modes = {"modes_per_class": prompts.modes_per_class()} if prompts.has_modes else {}
    write_json(out / "tokens.json", {"backend": prompts.backend, "model": prompts.model_id, "width": width,
                                     "num_vectors": prompts.num_vectors, "usable_with": usable, **modes,
                                     "tokens": rows})
    if prompts.backend != "sd":
        print(f"exported {len(rows)} tokens to {out}: {width}-wide vectors learned on the {prompts.backend} backend. "
              f"No Stable Diffusion pipeline can load them (SD 1.x takes 768-wide, SD 2.x 1024-wide token "
              f"vectors), and they mean something only to {prompts.model_id}. To use Stable Diffusion, run invert "
              "with --backend sd --model <a diffusers SD folder> and export that run.")
        return out
    print(f"exported {len(rows)} tokens to {out}; in diffusers:\n"
          f"  pipe.load_textual_inversion([str(p) for p in sorted(Path({str(out)!r}).glob('*.safetensors'))])\n"
          f"  pipe({json.dumps(rows[0]['prompt'])}).images[0]")
    return out


def _listed_files(out: Path) -> set[str]:
    """The token files an earlier export listed in `<out>/tokens.json` (none when it has none or cannot be read)."""
    try:
        rows = json.loads((out / "tokens.json").read_text(encoding="utf-8"))["tokens"]
        return {Path(row["file"]).name for row in rows if str(row["file"]).endswith(".safetensors")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
