"""The offline CIFAR-10 benchmark world (DESIGN.md section 7), end to end, in one resumable command.

    .venv/bin/python benchmarks/cifar10_world.py --scale cpu [--cache /tmp/pscache] [--device cpu] [--threads 1]

Presets: `smoke` (seconds; a check that every stage runs), `reduced` (about an hour: 1 seed, 200 test images per
class), `cpu` (the paper's 300 student epochs at IPC 1 and 10, 3 seeds, the whole test split, distillation cut to
500 images per class, IPC 50 last at 60 epochs: about 1.5 hours for IPC 1 and 10 on one core of the 2-core CPU,
as much again for IPC 50), `paper` (all 2,500 distilled images per class with flips,
IPC 50 too: many hours on CPU, for a GPU). Every value of a preset can be overridden by its flag.

1. Unpack `<shared>/data/cifar10-jpeg.tar.gz` (CIFAR-10 as JPEG q75) into `<cache>/cifar10-jpeg` (once; a marker).
2. Split every training class by file index: 0-2499 "foundation" (trains the generator), 2500-4999 "distilled"
   (the dataset being distilled), each materialised as an ImageFolder of symlinks in `<cache>/cifar10-jpeg-splits`.
3. The generator: the committed `mini` model `benchmarks/models/cifar10-mini-v2` (`--model`), trained on the
   foundation split by the command in its COMMAND.md; this script never trains one. Its captions name five classes
   and describe the other five by a coarser word, so inversion has work to do (section "prompt fidelity").
4. On the distilled split: select (ResNet-20, factor 1, 32 px), invert (mini, 64 px), generate (max IPC, soft
   labels, 32 px); the teacher's accuracy on d3m's and class-prompt's images per class, named and unnamed classes
   apart; evaluate d3m / rded / random-real / class-prompt at every IPC and `full` once, under P1 and P2,
   ConvNet-3, several seeds, on the official test split, plus `random-real` at the IPC whose raw bytes match d3m's
   stored bytes.
5. Write `benchmarks/results/cifar10_world{,_smoke}.{json,md}` and `..._accuracy_vs_bytes.png`.

Every stage resumes or skips when rerun with the same options (the stages check their own outputs; evaluate
entries already in `<run>/eval/results.json` with the same key, epochs and seeds are not trained again).

Generated images are kept by promptset itself (`evaluate`'s round cache in `<run>/eval/rounds/`, keyed by everything
that changes a pixel): the images `evaluate` regenerates for IPC 10 and 1 (prefixes of IPC 50's), for P2 (the same
seeds as P1) and on a rerun are taken from there instead of being denoised again, bit for bit. This script patches
nothing inside promptset: it chains promptset's own commands and API and writes the tables.

Benchmarks report numbers, they assert nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_common import (  # noqa: E402
    _last_loss,
    fidelity_table,
    generated_teacher_accuracy,
    generation_stats,
    generator_record,
    machine_info,
    prompt_fidelity,
    sha256_file,
    symlink_split,
    unpack,
)

torch.set_flush_denormal(True)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SPLIT = 2500  # files 0..2499 of each training class: foundation; 2500..4999: the distilled split
IPCS = (1, 10, 50)
METHODS = ("d3m", "class-prompt", "rded", "random-real")  # per IPC; `full` once per protocol
STUDENT = "convnet3"

# Presets. `epochs` is per IPC; `rounds` lists the numbers of image rounds d3m / class-prompt are evaluated with
# (1 = a fixed set; R > 1 = fresh variations, regen_every = ceil(epochs / R), at the same step count);
# `test_per_class` 0 = the whole official test split; `eval_every` 0 = test
# only after the last epoch (then best = final).
PRESETS = {
    "smoke": dict(
        distill_per_class=12,
        invert_steps=5,
        invert_batch=10,
        invert_flip=False,
        gen_steps=4,
        guidance=3.0,
        fidelity_per_class=2,
        ipcs="1,10",
        epochs="1:4,10:2,50:2",
        full_epochs=1,
        full_seeds=1,
        rounds="1,2",
        seeds=2,
        test_per_class=20,
        eval_every=0,
    ),
    "reduced": dict(
        distill_per_class=300,
        invert_steps=200,
        invert_batch=20,
        invert_flip=False,
        gen_steps=10,
        guidance=5.0,
        fidelity_per_class=20,
        ipcs="1,10",
        epochs="1:300,10:300",
        full_epochs=5,
        full_seeds=1,
        rounds="1,10",
        seeds=1,
        test_per_class=200,
        eval_every=0,
    ),
    # The paper's student budget (300 epochs, 3 seeds, the whole test split) at IPC 1 and 10, with distillation cut
    # to what 2 CPU cores do in a few hours: select/invert on the first 500 distilled images per class (no flips),
    # 300 inversion steps; IPC 50 last, at a cut budget of 60 epochs.
    "cpu": dict(
        distill_per_class=500,
        invert_steps=300,
        invert_batch=20,
        invert_flip=False,
        gen_steps=10,
        guidance=5.0,
        fidelity_per_class=20,
        ipcs="1,10,50",
        epochs="1:300,10:300,50:300",
        full_epochs=10,
        full_seeds=1,
        rounds="1,10",
        seeds=3,
        test_per_class=0,
        eval_every=0,
    ),
    # The paper's student budget (300 epochs) at IPC 1 and 10; IPC 50 at a stated smaller budget on CPU.
    "paper": dict(
        distill_per_class=2500,
        invert_steps=500,
        invert_batch=20,
        invert_flip=True,
        gen_steps=10,
        guidance=5.0,
        fidelity_per_class=50,
        ipcs="1,10,50",
        epochs="1:300,10:300,50:60",
        full_epochs=10,
        full_seeds=1,
        rounds="1,10",
        seeds=3,
        test_per_class=0,
        eval_every=0,
    ),
}

# Rough CPU costs (2 shared cores), for the up-front estimate only.
SEC_PER_STEP = 2.2  # base UNet training step at batch 64 on 8x8x32 latents, one thread of a busy pair (measured)
ENCODE_PER_S = 8.0  # TAEF2 encodes at 64 px on one busy thread (measured while pretraining)
GEN_SEC_PER_STEP = 0.06  # one denoising step of one image (with CFG), base UNet
DECODE_S = 0.04  # TAEF2 decode of one 64 px image
STUDENT_MS_PER_IMAGE = 6.0  # ConvNet-3 forward + backward per image
TEST_MS_PER_IMAGE = 1.2


# ------------------------------------------------------------------------------------------------------------
# helpers


def log(msg: str) -> None:
    print(f"[cifar10_world {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rounds_list(p: dict) -> list[int]:
    return sorted({int(x) for x in str(p["rounds"]).split(",")})


def parse_epochs(text: str) -> dict[int, int]:
    out = {}
    for part in text.split(","):
        k, v = part.split(":")
        out[int(k)] = int(v)
    return out


# ------------------------------------------------------------------------------------------------------------
# 1-2. data


# ------------------------------------------------------------------------------------------------------------
# generated images: promptset's own round cache (<run>/eval/rounds/) keeps them across invocations


# ------------------------------------------------------------------------------------------------------------
# the generator and how faithful prompts are to their class


# ------------------------------------------------------------------------------------------------------------
# the pipeline


class Timer:
    """Wall time per stage, accumulated over invocations in `<root>/walltimes.json`."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.this_run: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.this_run[stage] = self.this_run.get(stage, 0.0) + seconds
        self.data[stage] = round(self.data.get(stage, 0.0) + seconds, 1)
        self.path.write_text(json.dumps(self.data, indent=1))


def estimate(p: dict, ipcs: list[int], epochs: dict[int, int]) -> dict[str, float]:
    """Seconds per stage on the 2-core CPU (rough)."""
    d = p["distill_per_class"] * 10
    gen_img = p["gen_steps"] * GEN_SEC_PER_STEP + DECODE_S
    est = {
        "select": d * 0.01 + 10,
        "invert": d * (2 if p["invert_flip"] else 1) / ENCODE_PER_S
        + p["invert_steps"] * SEC_PER_STEP * p["invert_batch"] / 64 * 1.5,
        "generate": max(ipcs) * 10 * gen_img + 10,
        "fidelity": 2 * p["fidelity_per_class"] * 10 * gen_img,
    }
    ev = 0.0
    test_n = (p["test_per_class"] or 1000) * 10
    for ipc in ipcs:
        e = epochs[ipc]
        tests = 1 if not p["eval_every"] else math.ceil(e / p["eval_every"])
        n_runs = 2 * p["seeds"] * (len(METHODS) + 2 * (len(rounds_list(p)) - 1))
        ev += n_runs * (ipc * 10 * e * STUDENT_MS_PER_IMAGE + tests * test_n * TEST_MS_PER_IMAGE) / 1000
    tests = 1 if not p["eval_every"] else math.ceil(p["full_epochs"] / p["eval_every"])
    full_ms = d * p["full_epochs"] * STUDENT_MS_PER_IMAGE + tests * test_n * TEST_MS_PER_IMAGE
    ev += 2 * p["full_seeds"] * full_ms / 1000
    gen_imgs = sum(ipc * 10 * (2 * max(rounds_list(p)) - 1) for ipc in ipcs)  # class-prompt all rounds; d3m: 1..R-1
    ev += gen_imgs * gen_img + 30
    est["evaluate"] = ev
    return est


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", choices=list(PRESETS), default="reduced", help="preset (every value overridable)")
    ap.add_argument(
        "--shared",
        default=os.environ.get("PROMPTSET_SHARED", str(REPO.parent / "shared")),
        help="folder holding data/ and weights/ (default: $PROMPTSET_SHARED or ../shared)",
    )
    ap.add_argument(
        "--cache",
        default=os.path.expanduser("~/.cache/promptset"),
        help="cache folder for the unpacked data, the model and the runs (never inside the repository)",
    )
    ap.add_argument("--device", default="cpu", help="torch device for every stage (full scale: cuda)")
    ap.add_argument(
        "--model",
        default=str(BENCH_DIR / "models" / "cifar10-mini-v2"),
        help="the mini generator folder (default: the committed benchmarks/models/cifar10-mini-v2)",
    )
    ap.add_argument(
        "--results-name",
        default="",
        help="output name under benchmarks/results (default: cifar10_world, cifar10_world_smoke for --scale smoke)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0 = torch's default). On a CPU shared with other jobs, 1 is often faster: "
        "two OpenMP threads wait on each other whenever one core is taken (measured here: 0.5 vs 3.7 "
        "steps/s)",
    )
    ap.add_argument(
        "--redo",
        default="",
        help="comma-separated methods whose entries in results.json are dropped first (trained again)",
    )
    ap.add_argument(
        "--until",
        choices=["fidelity", "evaluate"],
        default="evaluate",
        help="stop after this stage (fidelity: select, invert, generate and the prompt-fidelity table only)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="run no stage: rewrite the results files from what the cache folder already holds",
    )
    for key, value in PRESETS["reduced"].items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(
                flag,
                type=lambda s: s.lower() in ("1", "true", "yes"),
                default=None,
                help=f"override the preset (true/false; reduced: {value})",
            )
        else:
            ap.add_argument(flag, type=type(value), default=None, help=f"override the preset (reduced: {value})")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    p = dict(PRESETS[args.scale])
    for key in p:
        v = getattr(args, key)
        if v is not None:
            p[key] = v
    ipcs = sorted({int(x) for x in str(p["ipcs"]).split(",")}, reverse=True)  # largest first: smaller reuse images
    epochs = parse_epochs(p["epochs"])
    missing = [i for i in ipcs if i not in epochs]
    if missing:
        raise SystemExit(f"--epochs has no entry for IPC {missing}")
    shared = Path(args.shared).resolve()
    cache = Path(args.cache).expanduser().resolve()
    if cache == REPO or REPO in cache.parents:
        raise SystemExit(f"--cache {cache} is inside the repository; pass a folder outside it")
    weights = shared / "weights"
    teacher = f"resnet20:{weights / 'cifar10_resnet20.safetensors'}"
    name = args.results_name or ("cifar10_world_smoke" if args.scale == "smoke" else "cifar10_world")
    tag = (
        args.scale
        if all(p[k] == PRESETS[args.scale][k] for k in p)
        else f"{args.scale}-custom-{hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:8]}"
    )
    model = Path(args.model).resolve()
    if not (model / "promptset_model.json").is_file():
        raise SystemExit(
            f"--model {model}: not a mini model folder; the committed one is benchmarks/models/cifar10-mini-v2 "
            "(its COMMAND.md says how it was trained)"
        )
    from promptset.backends.mini import model_fingerprint

    model_hash = model_fingerprint(model)
    root = cache / "cifar10_world" / f"{tag}-{model_hash[:8]}"  # runs of another generator never mix
    root.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    est = estimate(p, ipcs, epochs)
    log(f"scale {args.scale} (folder {root}), device {args.device}")
    log("preset: " + json.dumps(p))
    log(
        "estimate on a 2-core CPU (rough): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in est.items())
        + f"; total {sum(est.values()) / 60:.1f} min"
    )
    timer = Timer(root / "walltimes.json")
    t_start = time.time()

    from promptset.evaluation.results import entry_key
    from promptset.stages.evaluate import evaluate
    from promptset.stages.generate import generate
    from promptset.stages.invert import invert
    from promptset.stages.report import report
    from promptset.stages.select import select

    pre = generator_record(model)
    if args.report_only:
        run = root / "run"
        test = data_test = (
            (cache / "cifar10-jpeg-splits" / f"test-first{p['test_per_class']}")
            if p["test_per_class"]
            else cache / "cifar10-jpeg" / "test"
        )
        report(runs=str(run), out=str(run / "eval"), title=f"CIFAR-10 JPEG world ({tag}): accuracy vs stored bytes")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "eval" / "accuracy_vs_bytes.png", RESULTS_DIR / f"{name}_accuracy_vs_bytes.png")
        write_outputs(name, args, p, tag, root, model, run, data_test, pre, timer, ipcs, epochs, est, t_start)
        return 0

    # ---- 1-2. data ----------------------------------------------------------------------------------------
    t = time.time()
    data = unpack(shared, cache)
    splits = cache / "cifar10-jpeg-splits"
    distill = symlink_split(data / "train", splits / "distill", SPLIT, 2 * SPLIT)
    if p["test_per_class"]:
        test = symlink_split(data / "test", splits / f"test-first{p['test_per_class']}", 0, p["test_per_class"])
    else:
        test = data / "test"
    timer.add("data", time.time() - t)
    log(f"data: distilled split {distill} (first {p['distill_per_class']}/class used), test {test}")
    log(f"generator: {model} ({model_hash[:12]}); teacher accuracy on its class-prompt samples "
        f"{(pre.get('quality') or {}).get('accuracy')}")  # fmt: skip

    # ---- 4. select, invert, generate ---------------------------------------------------------------------
    run = root / "run"
    t = time.time()
    select(data=str(distill), out=str(run), teacher=teacher, factor=1, resolution=32,
           max_images_per_class=p["distill_per_class"], device=args.device, progress=progress)  # fmt: skip
    timer.add("select", time.time() - t)

    t = time.time()
    invert(out=str(run), backend="mini", model=str(model), steps=p["invert_steps"], batch_size=p["invert_batch"],
           resolution=64, flip=p["invert_flip"], checkpoint_every=max(25, p["invert_steps"] // 5),
           device=args.device, progress=progress)  # fmt: skip
    timer.add("invert", time.time() - t)

    t = time.time()
    generate(run=str(run), ipc=max(ipcs), steps=p["gen_steps"], guidance=p["guidance"], image_size=32,
             soft_labels=True, teacher=teacher, batch_size=16, device=args.device, progress=progress)  # fmt: skip
    timer.add("generate", time.time() - t)

    # ---- 4b. prompt fidelity: is the learned prompt the class, where its name is and is not in the captions? ---
    fid_path = root / "prompt_fidelity.json"
    want = {"prompts_sha256": sha256_file(run / "prompts.safetensors"), "per_class": p["fidelity_per_class"],
            "steps": p["gen_steps"], "guidance": p["guidance"]}  # fmt: skip
    fid = json.loads(fid_path.read_text()) if fid_path.is_file() else {}
    if fid.get("settings") != want:
        t = time.time()
        fid = {"settings": want} | prompt_fidelity(run, model, teacher, p, args.device)
        fid_path.write_text(json.dumps(fid, indent=1))
        timer.add("fidelity", time.time() - t)
    log("prompt fidelity (teacher accuracy on generated images): " + ", ".join(
        f"{m} {fid[m]['accuracy']:.1%} (named {fid[m]['named']:.1%}, unnamed {fid[m]['unnamed']:.1%})"
        for m in ("d3m", "class-prompt")))  # fmt: skip
    if args.until == "fidelity":
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{name}_fidelity.json").write_text(json.dumps(
            {"scale": args.scale, "tag": tag,
             "generator": {k: pre.get(k) for k in ("steps", "quality", "caption_names")}, "model": str(model),
             "model_hash": model_hash, "preset": p, "invert_final_loss": _last_loss(run), "prompt_fidelity": fid,
             "generate_teacher_accuracy": generated_teacher_accuracy(run)},
            indent=1) + "\n")  # fmt: skip
        (RESULTS_DIR / f"{name}_fidelity.md").write_text("\n".join(fidelity_table(fid)) + "\n")
        log(f"--until fidelity: wrote {RESULTS_DIR / (name + '_fidelity.json')} and .md")
        return 0

    # ---- 4. evaluate -----------------------------------------------------------------------------------------
    results_path = run / "eval" / "results.json"
    if args.redo and results_path.is_file():
        redo = {m.strip() for m in args.redo.split(",")}
        data_ = json.loads(results_path.read_text())
        dropped = [k for k, e in data_["entries"].items() if e["method"] in redo]
        for k in dropped:
            del data_["entries"][k]
        results_path.write_text(json.dumps(data_, indent=1))
        log(f"--redo: dropped {len(dropped)} entries of {sorted(redo)} from {results_path}")

    def existing() -> dict:
        return json.loads(results_path.read_text())["entries"] if results_path.is_file() else {}

    def have(method, protocol, ipc, regen, n_epochs, seeds) -> bool:
        e = existing().get(entry_key(method, protocol, STUDENT, ipc, regen))
        return bool(e) and e.get("epochs") == n_epochs and len(e.get("seeds") or []) == seeds

    # Most telling first (a long CPU run that is stopped keeps the rows that matter): P1 then P2 at the IPCs with
    # the paper's budget, fresh images first; then fixed sets, the equal-bytes random-real rows, other IPCs, `full`.
    paper_ipcs = sorted(i for i in ipcs if epochs[i] >= 300) or sorted(ipcs)
    other_ipcs = sorted(i for i in ipcs if i not in paper_ipcs)
    rounds = rounds_list(p)
    fresh, fixed = [r for r in rounds if r > 1], [r for r in rounds if r == 1]

    def items(protocol, ipc, rounds_of):
        e = epochs[ipc]
        return [(protocol, ipc, e, math.ceil(e / r) if r > 1 else 0, ["d3m", "class-prompt"]) for r in rounds_of]

    def real(protocol, ipc):
        return [(protocol, ipc, epochs[ipc], 0, ["rded", "random-real"])]

    plan = [it for protocol in ("p1", "p2") for ipc in paper_ipcs
            for it in items(protocol, ipc, fresh) + real(protocol, ipc) + items(protocol, ipc, fixed)]  # fmt: skip
    plan.append("equal-bytes")
    # IPCs at a cut budget: the cheap rows (real images, one fixed generated set) first, fresh rounds (many images
    # to generate) last
    plan += [it for protocol in ("p1", "p2") for ipc in other_ipcs
             for it in real(protocol, ipc) + items(protocol, ipc, fixed)]  # fmt: skip
    plan += [it for protocol in ("p1", "p2") for ipc in other_ipcs for it in items(protocol, ipc, fresh)]
    plan += [(protocol, None, p["full_epochs"], 0, ["full"]) for protocol in ("p1", "p2")]

    def run_eval(protocol, ipc, n_epochs, regen, methods) -> None:
        seeds = p["full_seeds"] if methods == ["full"] else p["seeds"]
        todo = [m for m in methods if not have(m, protocol, ipc, regen, n_epochs, seeds)]
        what = f"{protocol} IPC {'all' if ipc is None else ipc}: {', '.join(methods)}, regen_every {regen or 'fixed'}"
        if not todo:
            log(f"evaluate {what}: already in results.json, skipped")
            return
        log(f"evaluate {what} ({', '.join(todo)} to do), {n_epochs} epochs x {seeds} seeds")
        t = time.time()
        evaluate(
            run=str(run), test=str(test), method=",".join(todo), protocol=protocol, student=STUDENT,
            ipc=ipc or max(ipcs), epochs=n_epochs, seeds=seeds, regen_every=regen,
            eval_every=p["eval_every"] or n_epochs, device=args.device, report=False, progress=progress,
        )  # fmt: skip
        timer.add(f"evaluate_{protocol}", time.time() - t)

    for item in plan:
        if item != "equal-bytes":
            run_eval(*item)
            continue
        # random-real at the IPC whose raw uint8 bytes are nearest d3m's stored bytes (at least 1 image per class)
        for e in [e for e in existing().values() if e["method"] == "d3m" and e["ipc"] in paper_ipcs]:
            ipc_eq = max(1, round(e["stored_bytes"] / (10 * 32 * 32 * 3)))
            if ipc_eq in ipcs and epochs[ipc_eq] != e["epochs"]:  # results.json keys rows by IPC, not by epochs
                log(f"equal bytes: random-real IPC {ipc_eq} is a table row at {epochs[ipc_eq]} epochs, not "
                    f"{e['epochs']}; not rerun")  # fmt: skip
                continue
            run_eval(e["protocol"], ipc_eq, e["epochs"], 0, ["random-real"])

    # ---- 5. outputs ------------------------------------------------------------------------------------------
    t = time.time()
    eval_dir = run / "eval"
    report(runs=str(run), out=str(eval_dir), title=f"CIFAR-10 JPEG world ({tag}): accuracy vs stored bytes")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(eval_dir / "accuracy_vs_bytes.png", RESULTS_DIR / f"{name}_accuracy_vs_bytes.png")
    timer.add("report", time.time() - t)
    write_outputs(name, args, p, tag, root, model, run, test, pre, timer, ipcs, epochs, est, t_start)
    return 0


# ------------------------------------------------------------------------------------------------------------
# outputs


PAPER_P1 = {"d3m": {1: 35.9, 10: 58.6}, "rded": {1: 15.5, 10: 38.6}}  # D3M Table 2, CIFAR-10, soft labels


def reading(entries: dict, quality: dict, fidelity: dict, p: dict) -> list[str]:
    """Data-driven remarks under the tables (only what the numbers themselves show)."""

    def get(method, protocol, ipc, fresh: bool):
        """Final top-1 of a row: generative methods with fresh rounds (or the fixed set), real methods as they are."""
        for e in entries.values():
            r = e["distilled"].get("rounds")
            ok = r is None or (r > 1 if fresh else r == 1)
            if e["method"] == method and e["protocol"] == protocol and e["ipc"] == ipc and ok:
                return e
        return None

    out = ["### Reading the numbers", ""]
    if quality:
        out.append(
            f"- The teacher recognises {quality['accuracy']:.0%} of the generator's class-prompt samples (chance "
            f"{quality['chance']:.0%}); d3m and class-prompt can only be as good as the images it renders."
        )
    if fidelity:
        d, c = fidelity["d3m"], fidelity["class-prompt"]
        out.append(
            f"- Prompt fidelity: on the classes the captions never name, the teacher recognises {d['unnamed']:.0%} of "
            f"d3m's images against {c['unnamed']:.0%} of the class-name prompt's; on the named classes "
            f"{d['named']:.0%} against {c['named']:.0%}."
        )
    ipcs = sorted({e["ipc"] for e in entries.values() if e["ipc"] is not None})
    for ipc in ipcs:
        d, r = get("d3m", "p1", ipc, True) or get("d3m", "p1", ipc, False), get("rded", "p1", ipc, True)
        if d is None or r is None:
            continue
        dm, rm = d["final_top1"]["mean"], r["final_top1"]["mean"]
        paper = PAPER_P1["d3m"].get(ipc), PAPER_P1["rded"].get(ipc)
        verdict = "holds" if dm > rm else "does not hold"
        n = d["distilled"].get("rounds")
        images = f"{n} rounds of fresh images" if n and n > 1 else "one fixed generated set: no fresh-round row yet"
        line = (f"- P1 (soft labels, {images}), IPC {ipc}, {d['epochs']} "
                f"epochs: d3m {dm:.1f}% vs rded {rm:.1f}% ({dm - rm:+.1f} points): the paper's ordering {verdict} "
                f"here")  # fmt: skip
        if paper[0] is not None:
            line += f" (paper, Table 2 on real CIFAR-10 with SD: d3m {paper[0]} vs rded {paper[1]})"
        if d["epochs"] < 300:
            line += f"; **cut budget** ({d['epochs']} epochs, the paper uses 300): this row says nothing about D3M"
        out.append(line + ".")
        rr = get("random-real", "p1", ipc, True)
        if rr is not None:
            out.append(f"  random-real at the same IPC: {rr['final_top1']['mean']:.1f}%.")
        ipc_eq = max(1, round(d["stored_bytes"] / (10 * 32 * 32 * 3)))
        eq = get("random-real", "p1", ipc_eq, True)
        if eq is not None and eq["epochs"] == d["epochs"]:
            out.append(f"  At equal stored bytes: d3m stores {d['stored_bytes']:,} B (IPC-equivalent "
                       f"{d['ipc_equivalent']:.2f}); random-real at IPC {ipc_eq} ({eq['stored_bytes']:,} B) reaches "
                       f"{eq['final_top1']['mean']:.1f}%.")  # fmt: skip
    p2 = []
    for ipc in ipcs:
        d, r = get("d3m", "p2", ipc, True), get("rded", "p2", ipc, True)
        if d is not None and r is not None:
            dm, rm = d["final_top1"]["mean"], r["final_top1"]["mean"]
            p2.append(f"IPC {ipc} ({d['epochs']} epochs): d3m {dm:.1f}% vs rded {rm:.1f}% ({dm - rm:+.1f} points)")
    if p2:
        out.append("- P2 (one-hot labels, augmentation; d3m with fresh rounds): " + "; ".join(p2) + ".")
    for protocol in ("p1", "p2"):
        parts = []
        for ipc in ipcs:
            d, c = get("d3m", protocol, ipc, True), get("class-prompt", protocol, ipc, True)
            df, cf = get("d3m", protocol, ipc, False), get("class-prompt", protocol, ipc, False)
            if d is not None and c is not None:
                text = (f"IPC {ipc}: d3m {d['final_top1']['mean']:.1f}% vs class-prompt "
                        f"{c['final_top1']['mean']:.1f}% with {d['distilled'].get('rounds')} rounds of fresh "
                        "images")  # fmt: skip
                if df is not None and cf is not None:
                    text += (f", {df['final_top1']['mean']:.1f}% vs {cf['final_top1']['mean']:.1f}% on one fixed "
                             "set")  # fmt: skip
                parts.append(text)
        if parts:
            out.append(f"- {protocol.upper()}, learned prompt vs the class-name prompt (same generator, same seeds): "
                       + "; ".join(parts) + ".")  # fmt: skip
    for protocol in ("p1", "p2"):
        diffs = []
        for ipc in ipcs:
            a, b = get("rded", protocol, ipc, True), get("random-real", protocol, ipc, True)
            if a is not None and b is not None:
                diffs.append(f"{a['final_top1']['mean'] - b['final_top1']['mean']:+.1f} at IPC {ipc}")
        if diffs:
            out.append(f"- {protocol.upper()}: rded minus random-real (points): " + ", ".join(diffs) + ".")
    cut = sorted({e["epochs"] for e in entries.values() if e["ipc"] is not None and e["epochs"] < 300})
    if cut:
        out.append(f"- Rows at {', '.join(map(str, cut))} epochs are a cut budget (the paper trains students for "
                   "300 epochs); with stored soft labels students converge slowly, so compare those rows only with "
                   "rows of the same IPC and epochs.")  # fmt: skip
    out.append("")
    return out


def write_outputs(name, args, p, tag, root, model, run, test, pre, timer, ipcs, epochs, est, t_start) -> None:
    from promptset.accounting import fmt_bytes

    results = json.loads((run / "eval" / "results.json").read_text())
    entries = results["entries"]
    select_info = json.loads((run / "select.json").read_text())
    inv_rows = [json.loads(x) for x in (run / "invert" / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run / "invert" / "metrics.jsonl").is_file() else []  # fmt: skip
    device = args.device
    mach = machine_info(device)
    quality = pre.get("quality") or {}
    fid_path = root / "prompt_fidelity.json"
    fidelity = json.loads(fid_path.read_text()) if fid_path.is_file() else {}
    recipe = pre.get("recipe", {})
    summary = {
        "benchmark": "cifar10_world",
        "scale": args.scale,
        "tag": tag,
        "preset": p,
        "settings": {
            "data": "CIFAR-10 as JPEG q75 (../shared/data/cifar10-jpeg.tar.gz), official split",
            "foundation_split": f"train files 0-{SPLIT - 1} per class (the generator's training data; first "
            f"{recipe.get('max_images_per_class') or SPLIT} used)",
            "distilled_split": f"train files {SPLIT}-{2 * SPLIT - 1} per class; first {p['distill_per_class']} used "
            "(select, random-real and full all draw from these)",
            "test": "official test split, "
            + ("all 1000" if not p["test_per_class"] else f"first {p['test_per_class']}")
            + " images per class",
            "generator": f"mini {model.name}: UNet {recipe.get('unet_size')} ({pre.get('unet_params')} parameters), "
            "TAEF2 latents at 64 px, all-MiniLM-L6-v2 text encoder",
            "teacher": "ResNet-20 (cifar10_resnet20.safetensors), 32 px",
            "student": STUDENT,
            "select": "ResNet-20 teacher, 5 crops, factor 1, 32 px",
            "invert": f"mini, {p['invert_steps']} steps, batch {p['invert_batch']}, 64 px, flip {p['invert_flip']}",
            "generate": f"ipc {max(ipcs)}, {p['gen_steps']} DDIM steps, guidance {p['guidance']}, 32 px patches, "
            "ResNet-20 soft labels (fp16)",
            "epochs_per_ipc": epochs,
            "full_epochs": p["full_epochs"],
            "full_seeds": p["full_seeds"],
            "rounds_of_generated_images": rounds_list(p),
            "seeds": p["seeds"],
            "test_every": "last epoch only (best = final)"
            if not p["eval_every"]
            else f"every {p['eval_every']} epochs",
        },
        "machine": mach,
        "wall_time_s": {
            "per_stage_cumulative": timer.data,
            "this_invocation": timer.this_run,
            "this_invocation_total": round(time.time() - t_start, 1),
        },
        "estimate_s": {k: round(v) for k, v in est.items()},
        "generator": pre,
        "prompt_fidelity": fidelity,
        "generate_teacher_accuracy": generated_teacher_accuracy(run),
        "invert_final_loss": inv_rows[-1]["loss"] if inv_rows else None,
        "select": {"classes": select_info.get("classes")},
        "generation_cache": generation_stats(entries),
        "paths": {"root": str(root), "model": str(model), "run": str(run), "test": str(test)},
        "entries": entries,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")

    # ---- markdown ----
    lines = [f"## CIFAR-10 (offline JPEG world), `{tag}` scale", ""]
    lines += [
        f"Command: `.venv/bin/python benchmarks/cifar10_world.py --scale {args.scale}"
        + (f" --cache {args.cache}" if args.cache != os.path.expanduser("~/.cache/promptset") else "")
        + (f" --device {device}" if device != "cpu" else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + "` (resumable; every stage skips finished work).",
        "",
        "**Caveat:** this is CIFAR-10 stored as JPEG q75 (4:2:0 chroma). Classifiers score about 10 points lower on "
        "this test set than on the original one (the ResNet-20 teacher: 81.0% here, 91.8% on the original), so these "
        "numbers are comparable with each other, never with published CIFAR-10 tables.",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores (shared with other jobs), torch {mach['torch']}, "
        f"GPU: {mach['gpu']} (stages ran on `{device}`).",
        "",
        "### Setting",
        "",
        f"- Split by file index per training class: files 0-2499 = foundation (trains the generator; first "
        f"{recipe.get('max_images_per_class') or SPLIT} per class used), files 2500-4999 = the distilled split (first "
        f"{p['distill_per_class']} per class used: select's collages, `random-real`'s draws and `full`'s "
        "training set).",
        "- Test: the official test split, "
        + (
            "all 10,000 images."
            if not p["test_per_class"]
            else f"first {p['test_per_class']} images per class ({p['test_per_class'] * 10:,} of 10,000) "
            "to fit the CPU budget."
        ),
        f"- Generator: the committed `benchmarks/models/{model.name}` (its COMMAND.md has the command): UNet "
        f"`{recipe.get('unet_size')}` ({(pre.get('unet_params') or 0) / 1e6:.2f}M parameters, conditioning "
        f"`{recipe.get('conditioning')}`, {recipe.get('prediction_type')}) on TAEF2 latents at 64 px, "
        f"{pre.get('steps')} steps x batch {recipe.get('batch_size')} (lr {recipe.get('lr')}, EMA "
        f"{recipe.get('ema_decay')}), final loss {pre.get('final_loss')}. Samples are resized to 32 px.",
        f"- D3M: select (ResNet-20, 5 crops, factor 1, 32 px) -> invert (one token per class, {p['invert_steps']} "
        f"steps, batch {p['invert_batch']}, collages upsampled to 64 px) -> generate ({p['gen_steps']} DDIM steps, "
        f"guidance {p['guidance']}, soft labels from ResNet-20 in fp16).",
        f"- Students: ConvNet-3, AdamW lr 1e-3, cosine, batch 64 (capped at the set size), {p['seeds']} seeds; epochs "
        + ", ".join(f"IPC {i}: {epochs[i]}" for i in sorted(ipcs))
        + f"; `full`: {p['full_epochs']} ({p['full_seeds']} seed(s)). "
        + "d3m / class-prompt are trained on one fixed generated set (`fixed`)"
        + "".join(
            f" and on {r} rounds of fresh images (new seeds, regen_every = ceil(epochs / {r}), the same number "
            "of optimizer steps; the soft labels of every round are stored and counted under P1)"
            for r in rounds_list(p)
            if r > 1
        )
        + ", under both protocols. "
        + (
            "Tested after the last epoch only, so best = final."
            if not p["eval_every"]
            else f"Tested every {p['eval_every']} epoch(s)."
        ),
        "- P1: stored ResNet-20 soft labels (fp16, counted in the bytes), no augmentation. P2: one-hot labels, "
        "random resized crop (scale 0.5-1) + flip.",
        "",
        "### Generator quality",
        "",
    ]
    if quality:
        lines.append(
            f'ResNet-20 accuracy on the generator\'s class-prompt samples ("a photo of a {{name}}", '
            f"{quality['samples']} samples, {quality['sample_steps']} DDIM steps, guidance {quality['guidance']}): "
            f"**{quality['accuracy'] * 100:.1f}%** (chance {quality['chance'] * 100:.1f}%; mean confidence in the "
            f"prompted class {quality['mean_class_confidence'] * 100:.1f}%)."
        )
        lines.append("")
        lines.append("Per class: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in quality["per_class"].items()) + ".")
    else:
        lines.append("(not measured)")
    lines += [""]
    if fidelity:
        lines += fidelity_table(fidelity)
    order = {"d3m": 0, "class-prompt": 1, "rded": 2, "random-real": 3, "full": 4}
    for protocol, title in (
        ("p1", "P1: stored soft labels, no augmentation"),
        ("p2", "P2: one-hot labels + augmentation"),
    ):
        rows = [e for e in entries.values() if e["protocol"] == protocol and e["student"] == STUDENT]
        rows.sort(key=lambda e: (order.get(e["method"], 9), e["ipc"] or 10**9, e["distilled"].get("rounds") or 0))
        lines += [
            f"### {title}",
            "",
            "| method | IPC | images | epochs (steps) | final top-1 (%) | best top-1 (%) | stored | IPC-equiv. |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for e in rows:
            f, b = e["final_top1"], e["best_top1"]
            ipc = "all" if e["ipc"] is None else e["ipc"]
            rounds = e["distilled"].get("rounds")
            images = "real" if rounds is None else ("fixed" if rounds == 1 else f"{rounds} rounds")
            lines.append(
                f"| {e['method']} | {ipc} | {images} | {e['epochs']} ({e['optimizer_steps']}) "
                f"| {f['mean']:.2f} ± {f['std']:.2f} "
                f"| {b['mean']:.2f} ± {b['std']:.2f} | {fmt_bytes(e['stored_bytes'])} | {e['ipc_equivalent']:.3f} |"
            )
        lines.append("")
    lines += [
        "Stored bytes: d3m = prompts (fp32) + class list + seeds (+ P1 soft labels of every round); class-prompt = "
        "the prompt strings + seeds (+ soft labels); rded / random-real / full = raw uint8 images (+ P1 soft labels). "
        "Generator and teacher weights are not counted. IPC-equivalent = stored bytes / (10 x 32 x 32 x 3).",
        "",
        f"![accuracy vs bytes]({name}_accuracy_vs_bytes.png)",
        "",
        *reading(entries, quality, fidelity, p),
        "### Wall time (seconds, cumulative over resumed invocations)",
        "",
        "| stage | wall (s) |",
        "|---|---:|",
    ]
    for k, v in timer.data.items():
        lines.append(f"| {k} | {v:,.0f} |")
    lines.append(f"| **total** | **{sum(timer.data.values()):,.0f}** |")
    lines += [
        "",
        "Stages killed part-way are not in this table (they resume from their checkpoints). The generator's "
        f"training (not part of this script) took {pre.get('train_seconds')} s "
        f"({pre.get('seconds_per_step')} s/step). "
        + (
            "Images evaluate denoised for the entries above: {generated}; taken from promptset's round cache "
            "(`<run>/eval/rounds/`) instead of being denoised again: {reused}.".format(**generation_stats(entries))
        ),
        "",
        f"Preset `{args.scale}`" + (" (with overrides)" if tag != args.scale else "") + ": `" + json.dumps(p) + "`.",
        "",
    ]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(lines))
    log(
        f"wrote {RESULTS_DIR / (name + '.json')}, {RESULTS_DIR / (name + '.md')}, "
        f"{RESULTS_DIR / (name + '_accuracy_vs_bytes.png')}"
    )


if __name__ == "__main__":
    sys.exit(main())
