"""What the CIFAR-10 world's drivers share: the data splits, the distillation run (select, invert, generate with the
world's preset), mirrors of it for side experiments, and the records written beside their tables.

`cifar10_world.py` (the headline table), `codec_trade.py` (label codecs and seed selection) and `fresh_rounds.py`
(the fresh-rounds ablation) all chain promptset's own stages through these helpers; nothing here patches promptset.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import tarfile
import time
import uuid
from pathlib import Path

import promptset  # noqa: F401  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch

STUDY_DIR = Path(__file__).resolve().parent  # experiments/cifar10
REPO = STUDY_DIR.parents[1]
MODELS_DIR = STUDY_DIR / "models"  # the committed generators
DEFAULT_MODEL = MODELS_DIR / "cifar10-mini-v2"
RESULTS_DIR = STUDY_DIR / "results"
sys.path.insert(0, str(REPO / "benchmarks"))  # cpuinfo.py (and common.py) of the speed benchmarks
from cpuinfo import cpu_model  # noqa: E402

SPLIT = 2500  # files 0..2499 of each training class: foundation; 2500..4999: the distilled split
STUDENT = "convnet3"


def log(msg: str, who: str = "cifar10") -> None:
    print(f"[{who} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evaluate_missing(what: str, todo: list[str], who: str, **kw) -> float | None:
    """`promptset evaluate` (report off) of the methods in `todo`, the ones of a table row that results.json does not
    hold yet, logged under `what`. The seconds it took, or None when nothing was left to do."""
    from promptset.stages.evaluate import evaluate

    if not todo:
        log(f"{what}: already in results.json, skipped", who)
        return None
    log(f"{what}: evaluating {', '.join(todo)}", who)
    t = time.time()
    evaluate(method=",".join(todo), report=False, **kw)
    return time.time() - t


def outside_repo(path: str) -> Path:
    """`--cache` resolved, refused when it lies inside the repository."""
    cache = Path(path).expanduser().resolve()
    if cache == REPO or REPO in cache.parents:
        raise SystemExit(f"--cache {cache} is inside the repository; pass a folder outside it")
    return cache


def machine_info(device: str) -> dict:
    gpu = "none"
    if torch.cuda.is_available():
        try:
            gpu = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - only a description
            gpu = "cuda (name unavailable)"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
        "device": device,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unpack(shared: Path, cache: Path) -> Path:
    """`<cache>/cifar10-jpeg` with train/ and test/; unpacked once (marker file `.promptset-unpacked`)."""
    root = cache / "cifar10-jpeg"
    marker = root / ".promptset-unpacked"
    if marker.is_file():
        log(f"data: {root} already unpacked")
        return root
    complete = (root / "train").is_dir() and (root / "test").is_dir()
    if complete:
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        complete = len(classes) == 10 and all(
            len(list((root / "train" / c).glob("*.jpg"))) == 5000
            and len(list((root / "test" / c).glob("*.jpg"))) == 1000
            for c in classes
        )
    if not complete:
        archive = shared / "data" / "cifar10-jpeg.tar.gz"
        if not archive.is_file():
            raise SystemExit(f"{archive} not found: pass --shared (the folder holding data/ and weights/)")
        log(f"data: unpacking {archive} into {root} ...")
        tmp = cache / ".cifar10-jpeg.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
        inner = tmp if (tmp / "train").is_dir() else next(p for p in tmp.iterdir() if (p / "train").is_dir())
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        inner.rename(root)
        shutil.rmtree(tmp, ignore_errors=True)
    marker.write_text(json.dumps({"archive_sha256_checked": False, "at": time.time()}))
    log(f"data: {root} ready")
    return root


def symlink_split(src: Path, dst: Path, start: int, stop: int) -> Path:
    """An ImageFolder at `dst` whose class folders hold symlinks to files [start, stop) (sorted) of `src`'s."""
    marker = dst / ".promptset-split.json"
    want = {"src": str(src), "start": start, "stop": stop}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[start:stop]
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in files:
            os.symlink(f, dst / cls.name / f.name)
    marker.write_text(json.dumps(want))
    return dst


def generation_stats(entries: dict) -> dict:
    """Images evaluate denoised vs took from its round cache, summed over the entries (each as its call saw it)."""
    out = {"generated": 0, "reused": 0}
    for e in entries.values():
        for k, v in ((e.get("distilled") or {}).get("round_cache") or {}).items():
            out[k] = out.get(k, 0) + v
    return out


def generator_record(model: Path) -> dict:
    """What the generator's folder says about it: training summary, recipe, caption names, learning curve."""
    info = json.loads((model / "promptset_model.json").read_text())
    pre = json.loads((model / "pretrain.json").read_text()) if (model / "pretrain.json").is_file() else {}
    rows = []
    if (model / "metrics.jsonl").is_file():
        rows = [json.loads(x) for x in (model / "metrics.jsonl").read_text().splitlines() if x.strip()]
    config = info.get("training", {}).get("config", {})
    return pre | {
        "caption_names": info["class_names"],
        "class_folders": info["class_folders"],
        "recipe": {k: config.get(k) for k in ("unet_size", "steps", "batch_size", "lr", "warmup_steps", "ema_decay",
                                              "conditioning", "prediction_type", "timestep_spacing", "cfg_dropout",
                                              "first_image", "max_images_per_class", "flip", "templates")},
        "curve": [{"step": r["step"], "accuracy": r["teacher_accuracy"]} for r in rows if "teacher_accuracy" in r],
    }  # fmt: skip


@torch.no_grad()
def prompt_fidelity(run: Path, model: Path, teacher_spec: str, p: dict, device: str) -> dict:
    """The teacher's accuracy on images generated from d3m's learned prompts and from "a photo of a {class name}",
    `fidelity_per_class` images per class with the same seeds, per class, and for the classes the generator's captions
    name (caption word == class name) and those they describe only by a coarser word."""
    import torch.nn.functional as F

    import promptset.backends.sampling as sampling
    from promptset.artifacts import PromptSet
    from promptset.backends import create_backend
    from promptset.backends.sampling import PromptConditioner, TextConditioner, class_prompts, jobs_for
    from promptset.evaluation.methods import teacher_logits, to_uint8
    from promptset.models import load_teacher
    from promptset.runfolder import read_classes

    classes = read_classes(run)
    names = [c.name for c in classes]
    captions = json.loads((model / "promptset_model.json").read_text())["class_names"]
    named = [n == w for n, w in zip(names, captions)]
    backend = create_backend("mini", str(model), device=device)
    teacher = load_teacher(teacher_spec, num_classes=len(names), device=device)
    uncond = backend.encode_prompts([""])
    conditioners = {
        "d3m": PromptConditioner(backend, PromptSet.load(run / "prompts.safetensors")),
        "class-prompt": TextConditioner(backend, class_prompts(names)),
    }
    jobs = jobs_for(list(range(len(names))), p["fidelity_per_class"], 0, stage="fidelity")
    out = {"classes": names, "caption_names": captions, "named": named}
    for method, cond in conditioners.items():
        patches = sampling.generate_batch(
            backend, cond, jobs, steps=p["gen_steps"], guidance=p["guidance"], factor=1, image_size=32, uncond=uncond
        )  # fmt: skip  (N, 1, 3, 32, 32)
        pred = teacher_logits(teacher, to_uint8(patches[:, 0]).to(device)).argmax(1).cpu()  # as saved to PNG
        target = torch.tensor([j.cls for j in jobs])
        correct = (pred == target).float().view(len(names), -1).mean(1)  # (C,)
        mask = torch.tensor(named)
        out[method] = {
            "accuracy": float(correct.mean()),
            "named": float(correct[mask].mean()) if mask.any() else None,
            "unnamed": float(correct[~mask].mean()) if (~mask).any() else None,
            "per_class": {n: round(float(a), 4) for n, a in zip(names, correct)},
            "predicted_as": {
                n: F.one_hot(pred.view(len(names), -1)[c], len(names)).sum(0).tolist() for c, n in enumerate(names)
            },  # fmt: skip
        }
    return out


def generated_teacher_accuracy(run: Path) -> dict:
    """How often the teacher's stored soft labels of generate's d3m images name the prompted class (`promptset
    generate --soft-labels`: one patch per image here), overall and per class."""
    from promptset.artifacts import load_tensors
    from promptset.labelcodec import decode_soft_labels

    labels = decode_soft_labels(*load_tensors(run / "labels.safetensors"))  # (N, P, C), whatever the codec
    rows = [json.loads(x) for x in (run / "generated" / "manifest.jsonl").read_text().splitlines() if x.strip()]
    target = torch.tensor([r["class_index"] for r in rows])
    if len(target) != labels.shape[0] * labels.shape[1]:
        raise SystemExit(f"{run}: manifest and labels.safetensors disagree; rerun generate")
    correct = (labels.flatten(0, 1).argmax(1) == target).float()
    per = {r["class"]: [] for r in rows}
    for r, ok in zip(rows, correct.tolist()):
        per[r["class"]].append(ok)
    return {"accuracy": round(float(correct.mean()), 4), "images": len(rows),
            "per_class": {k: round(sum(v) / len(v), 4) for k, v in per.items()}}  # fmt: skip


def _last_loss(run: Path) -> float | None:
    path = run / "invert" / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return rows[-1].get("loss") if rows else None


def fidelity_table(fidelity: dict) -> list[str]:
    names, captions, named = fidelity["classes"], fidelity["caption_names"], fidelity["named"]
    n = fidelity["settings"]["per_class"]
    lines = [
        "### Prompt fidelity: does the learned prompt draw its class where the generator does not know the name?",
        "",
        f"ResNet-20's accuracy on {n} images per class generated from d3m's learned prompt and from the class-name "
        f'prompt ("a photo of a {{name}}"), same seeds, {fidelity["settings"]["steps"]} DDIM steps, guidance '
        f"{fidelity['settings']['guidance']}. The generator's captions use the class name for the named classes and "
        "the caption word shown for the others.",
        "",
        "| class | caption word | named | d3m (%) | class-prompt (%) |",
        "|---|---|---|---:|---:|",
    ]
    for c, name in enumerate(names):
        lines.append(f"| {name} | {captions[c]} | {'yes' if named[c] else 'no'} "
                     f"| {fidelity['d3m']['per_class'][name] * 100:.0f} "
                     f"| {fidelity['class-prompt']['per_class'][name] * 100:.0f} |")  # fmt: skip
    for key, label in (("named", "named classes"), ("unnamed", "unnamed classes"), ("accuracy", "all classes")):
        d, c = fidelity["d3m"][key], fidelity["class-prompt"][key]
        if d is not None:
            lines.append(f"| **{label}** | | | **{d * 100:.1f}** | **{c * 100:.1f}** |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------------------
# the world's run, and mirrors of it


def data_splits(shared: Path, cache: Path, test_per_class: int) -> tuple[Path, Path, Path]:
    """(unpacked data root, the distilled split, the test split) as ImageFolders under `cache`."""
    data = unpack(shared, cache)
    splits = cache / "cifar10-jpeg-splits"
    distill = symlink_split(data / "train", splits / "distill", SPLIT, 2 * SPLIT)
    test = (symlink_split(data / "test", splits / f"test-first{test_per_class}", 0, test_per_class)
            if test_per_class else data / "test")  # fmt: skip
    return data, distill, test


def distill_run(run: Path, distill: Path, model: Path, teacher: str, p: dict, ipc: int, device: str,
                progress: bool, timer=None) -> Path:
    """select (ResNet-20, factor 1, 32 px), invert (mini, 64 px) and generate (`ipc`, soft labels, 32 px) with the
    world's preset `p`; each stage resumes or skips when its outputs are already there."""
    from promptset.stages.generate import generate
    from promptset.stages.invert import invert
    from promptset.stages.select import select

    stages = [
        ("select", lambda: select(data=str(distill), out=str(run), teacher=teacher, factor=1, resolution=32,
                                  max_images_per_class=p["distill_per_class"], device=device, progress=progress)),
        ("invert", lambda: invert(out=str(run), backend="mini", model=str(model), steps=p["invert_steps"],
                                  batch_size=p["invert_batch"], resolution=64, flip=p["invert_flip"],
                                  checkpoint_every=max(25, p["invert_steps"] // 5), device=device,
                                  progress=progress)),
        ("generate", lambda: generate(run=str(run), ipc=ipc, steps=p["gen_steps"], guidance=p["guidance"],
                                      image_size=32, soft_labels=True, teacher=teacher, batch_size=16, device=device,
                                      candidates=1, progress=progress)),  # the paper's D3M: no seed selection
    ]  # fmt: skip
    for name, stage in stages:
        t = time.time()
        stage()
        if timer is not None:
            timer.add(name, time.time() - t)
    return run


def world_root(cache: Path, scale: str, model: Path) -> Path:
    """`<cache>/cifar10_world/<scale>-<generator hash>`: runs of another generator never mix."""
    from promptset.backends.mini import model_fingerprint

    return cache / "cifar10_world" / f"{scale}-{model_fingerprint(model)[:8]}"


def mirror(src: Path, dst: Path, rounds: Path | None = None) -> Path:
    """`dst` holds `src`'s run files (everything but eval/), copied again when the prompts changed. With `rounds`,
    `dst/eval/rounds` is a link to that folder, so mirrors share promptset's round cache (its files are keyed by
    everything that changes a pixel and merged on write)."""
    same = (dst / "prompts.safetensors").is_file() and sha256_file(dst / "prompts.safetensors") == \
        sha256_file(src / "prompts.safetensors")
    if not same:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=lambda folder, names: ["eval"] if Path(folder) == src else [])
    if rounds is not None:
        link = dst / "eval" / "rounds"
        rounds.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(link, ignore_errors=True)
            link.symlink_to(rounds.resolve(), target_is_directory=True)
    return dst


def run_inputs(run: Path) -> dict:
    """sha256 of what every evaluate entry of a world run depends on besides the generator and the test split: the
    selected collages (rded's images and inversion's data), the learned prompts and generate's labels. Two machines
    with equal inputs train students on the same data, so entries measured on one are valid on the other."""
    h = hashlib.sha256()
    for f in sorted((run / "collages").rglob("*")):
        if f.is_file():
            h.update(f.relative_to(run).as_posix().encode() + b"\0" + bytes.fromhex(sha256_file(f)))
    return {"collages": h.hexdigest()} | {
        k: tensors_sha256(run / f"{k}.safetensors") if (run / f"{k}.safetensors").is_file() else None
        for k in ("prompts", "labels")
    }


def tensors_sha256(path: Path) -> str:
    """The content and metadata hashes promptset's `save_tensors` stores in every artifact (checked on load): equal
    for equal tensors and settings, whatever order the writer put the header's keys in (it varies between writes)."""
    from promptset.artifacts import load_tensors

    meta = load_tensors(path)[1]
    return f"{meta['content_sha256']}:{meta['metadata_sha256']}"


# What each method's entries depend on among `run_inputs` (besides the generator, the teacher, the data and the seeds):
# d3m trains on images of the learned prompts (and generate's labels for its fixed set), rded on the collages;
# class-prompt, random-real and full on nothing the run's distillation made.
DEPENDS = {"d3m": ("prompts", "labels"), "rded": ("collages",)}


def _deps(entry: dict) -> tuple[str, ...]:
    return DEPENDS.get(entry["method"].split("@")[0], ())

# Inversion and generation on another CPU model (other SIMD kernels, other summation orders) learn prompts and
# labels that differ from this machine's in the last bits: unequal hashes, the same distilled set. Inputs within
# these bounds count as the same (the largest difference is recorded in every entry imported on that ground):
# the prompt vectors to 1e-4 of their largest entry, the teacher's soft-label logits to 0.1 with the same seeds and
# settings. Student training on another CPU differs at least as much between machines as such inputs do.
PROMPT_RTOL = 1e-4
LABEL_ATOL = 0.1
# metadata that hashes content (of the prompts, of the generated images): unequal whenever the tensors are
_CONTENT_KEYS = {"content_sha256", "metadata_sha256", "image_sha256", "generation_key"}


def inputs_dir(results_json: Path) -> Path:
    """Where a world's committed results keep the prompts and labels their d3m rows were trained on (30 KB)."""
    return results_json.with_name(results_json.stem + "_inputs")


def save_inputs(run: Path, results_json: Path) -> None:
    """Copy the run's prompts.safetensors and labels.safetensors beside the results file, so that a session on
    another CPU model can tell whether its own inputs are the same distilled set (`inputs_close`)."""
    folder = inputs_dir(results_json)
    folder.mkdir(parents=True, exist_ok=True)
    for k in ("prompts", "labels"):
        if (run / f"{k}.safetensors").is_file():
            shutil.copyfile(run / f"{k}.safetensors", folder / f"{k}.safetensors")


def _settings(meta: dict) -> dict:
    out = {k: v for k, v in meta.items() if k not in _CONTENT_KEYS}
    if "generation" in out:  # its `prompts` field is the prompts' content hash
        out["generation"] = {k: v for k, v in json.loads(out["generation"]).items() if k != "prompts"}
    return out


def inputs_close(kind: str, ours: Path, theirs: Path) -> tuple[bool, str]:
    """Whether two prompts (`kind` "prompts") or label files ("labels") are the same input up to floating-point
    differences between machines (`PROMPT_RTOL`, `LABEL_ATOL`), and the measured difference in words."""
    from promptset.artifacts import load_tensors

    if not (ours.is_file() and theirs.is_file()):
        return False, "no committed copy to compare with"
    (ta, ma), (tb, mb) = load_tensors(ours), load_tensors(theirs)
    if _settings(ma) != _settings(mb):
        return False, "other settings"
    if set(ta) != set(tb) or any(ta[k].shape != tb[k].shape for k in ta):
        return False, "other tensors"
    if kind == "prompts":
        a, b = ta["embeddings"].double(), tb["embeddings"].double()
        rel = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
        return rel <= PROMPT_RTOL, f"prompt vectors differ by at most {rel:.1e} of their largest entry"
    if not torch.equal(ta["seeds"], tb["seeds"]):
        return False, "other seeds"
    diff = (ta["soft_labels"].double() - tb["soft_labels"].double()).abs().max().item()
    return diff <= LABEL_ATOL, f"soft-label logits differ by at most {diff:.3g}"


def import_committed(
    committed: Path, results_path: Path, tag: str, model_hash: str, inputs: dict, run: Path | None = None
) -> int:
    """Entries of the committed results file (`experiments/cifar10/results/<name>.json`) that `results_path` lacks,
    copied into it when they were measured on the same preset and generator and on the same run inputs their method
    depends on (`DEPENDS`): a long table resumes on a fresh machine from what an earlier session committed. Inputs are
    the same when their hashes are equal or, given `run` and the committed copies (`save_inputs`), when the tensors
    agree to within floating-point differences between CPU models (`inputs_close`); other inputs' rows are trained
    again. Returns how many entries were imported."""
    from promptset.atomic import locked, write_json
    from promptset.evaluation.results import load_results

    if not committed.is_file():
        return 0
    old = json.loads(committed.read_text())
    if old.get("tag") != tag or old.get("model_hash") != model_hash:
        return 0
    was = old.get("inputs") or {}
    close: dict[str, str] = {}  # input -> measured difference, for inputs equal up to rounding
    for k in ("prompts", "labels"):
        if run is not None and was.get(k) is not None and was.get(k) != inputs.get(k):
            ok, why = inputs_close(k, run / f"{k}.safetensors", inputs_dir(committed) / f"{k}.safetensors")
            log(f"{committed.name}: {k} are not bit for bit the committed ones; {why}"
                + (" (within tolerance: the same input)" if ok else ""))  # fmt: skip
            if ok:
                close[k] = why

    def valid(e: dict) -> bool:
        return all(was.get(k) is not None and (was.get(k) == inputs.get(k) or k in close) for k in _deps(e))

    with locked(results_path):
        cur = load_results(results_path)
        new = {k: e for k, e in (old.get("entries") or {}).items() if k not in cur["entries"] and valid(e)}
        stale = sorted(k for k, e in (old.get("entries") or {}).items() if k not in cur["entries"] and not valid(e))
        for e in new.values():
            e["imported_from"] = _repo_path(committed)
            near = {k: close[k] for k in _deps(e) if k in close}
            if near:
                e["imported_inputs_within_tolerance"] = e.get("imported_inputs_within_tolerance", {}) | near
        cur["entries"].update(new)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(results_path, cur)
        # what the rows trained again measured before, on the other inputs (and the CPU of that session)
        replaced_path = results_path.with_name("replaced.json")
        replaced = (old.get("replaced") or {}) | (json.loads(replaced_path.read_text()) if replaced_path.is_file()
                                                  else {})  # fmt: skip
        cpu = (old.get("machine") or {}).get("cpu")
        for k in sorted(k for k, e in (old.get("entries") or {}).items() if not valid(e)):  # trained again or to be
            e = old["entries"][k]
            replaced.setdefault(k, {"final_top1": e["final_top1"], "finished_at": e.get("finished_at"),
                                    "device": e.get("device") if e.get("device") != "cpu" else f"cpu ({cpu})",
                                    "inputs": {d: was.get(d) for d in _deps(e)}})
        if replaced:
            write_json(replaced_path, replaced)
    if stale:
        log(f"{committed.name}: {len(stale)} entries were measured on other run inputs ({', '.join(stale)}); "
            "not imported, they are trained again")  # fmt: skip
    return len(new)


def _repo_path(path: Path) -> str:
    """`path` relative to the repository (as imported entries name their source), else as it is."""
    path = path.resolve()
    return path.relative_to(REPO).as_posix() if REPO in path.parents else str(path)


class Timer:
    """Wall time per stage, accumulated over invocations in `<root>/walltimes.json`.

    A cache folder has an id (`<root>/cache_id`, made once): the results JSON keeps each cache's totals under its
    id, so a table resumed in a new cache on another machine adds its time to the committed totals of earlier
    caches instead of replacing them."""

    def __init__(self, path: Path):
        self.path = path
        self.this_run: dict[str, float] = {}
        id_file = path.parent / "cache_id"
        if not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.cache_id = id_file.read_text().strip()

    @property
    def data(self) -> dict[str, float]:
        """The totals in the file, with what other invocations sharing this cache added."""
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def add(self, stage: str, seconds: float) -> None:
        """Add to the file's current totals under a lock: two invocations with disjoint `--only` rows share it."""
        self.this_run[stage] = self.this_run.get(stage, 0.0) + seconds
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.data
            data[stage] = round(data.get(stage, 0.0) + seconds, 1)
            self.path.write_text(json.dumps(data, indent=1))
