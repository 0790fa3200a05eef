"""Export learned prompts as textual-inversion files that diffusers' `pipe.load_textual_inversion` loads as-is.

One `{token: (V, D)}` safetensors file per class (diffusers reads one token per file), plus `tokens.json`.
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
    """Write `<out>/<class>.safetensors` (one token each) and `<out>/tokens.json`; returns the folder."""
    cfg = make_config(ExportConfig, cfg, overrides, "export")
    if not cfg.run:
        raise UserError("--run is required")
    run = Path(cfg.run)
    classes = require_classes(run)
    prompts = require_prompts(run, classes)
    out = Path(cfg.out) if cfg.out else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, info in enumerate(classes):
        token = prompts.token_names[c]
        path = out / f"{info.folder}.safetensors"
        with atomic_path(path) as tmp:
            save_file({token: prompts.embeddings[c].contiguous()}, str(tmp))  # (V, D)
        rows.append({"class": info.folder, "name": info.name, "token": token, "file": path.name,
                     "prompt": prompts.template.format(token=token)})
    width = int(prompts.embeddings.shape[-1])
    usable = "Stable Diffusion pipelines of this model (diffusers load_textual_inversion)" if prompts.backend == "sd" \
        else f"only promptset's {prompts.backend} model {prompts.model_id} (its {width}-wide text encoder)"
    write_json(out / "tokens.json", {"backend": prompts.backend, "model": prompts.model_id, "width": width,
                                     "num_vectors": prompts.num_vectors, "usable_with": usable, "tokens": rows})
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
