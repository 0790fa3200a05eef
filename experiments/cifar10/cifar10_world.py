"""The offline CIFAR-10 benchmark world (docs/DESIGN.md section 7), end to end, in one resumable command.

    .venv/bin/python experiments/cifar10/cifar10_world.py --scale cpu [--cache /tmp/pscache] [--device cpu] \
        [--threads 1]

Presets: `smoke` (seconds; a check that every stage runs), `reduced` (about an hour: 1 seed, 200 test images per
class), `cpu` (the paper's 300 student epochs at IPC 1 and 10, 3 seeds, the whole test split, distillation cut to
500 images per class, IPC 50 last at 60 epochs: about 1.5 hours for IPC 1 and 10 on one core of the 2-core CPU,
as much again for IPC 50), `paper` (all 2,500 distilled images per class with flips,
IPC 50 too: many hours on CPU, for a GPU). Every value of a preset can be overridden by its flag.

1. Unpack `<shared>/data/cifar10-jpeg.tar.gz` (CIFAR-10 as JPEG q75) into `<cache>/cifar10-jpeg` (once; a marker).
2. Split every training class by file index: 0-2499 "foundation" (trains the generator), 2500-4999 "distilled"
   (the dataset being distilled), each materialised as an ImageFolder of symlinks in `<cache>/cifar10-jpeg-splits`.
3. The generator: the committed `mini` model `experiments/cifar10/models/cifar10-mini-v2` (`--model`), trained on the
   foundation split by the command in its COMMAND.md; this script never trains one. Its captions name five classes
   and describe the other five by a coarser word, so inversion has work to do (section "prompt fidelity").
4. On the distilled split: select (ResNet-20, factor 1, 32 px), invert (mini, 64 px), generate (max IPC, soft
   labels, 32 px); the teacher's accuracy on d3m's and class-prompt's images per class, named and unnamed classes
   apart; evaluate d3m / rded / random-real / class-prompt at every IPC and `full` once, under P1 and P2,
   ConvNet-3, several seeds, on the official test split, plus `random-real` at the IPC whose raw bytes match d3m's
   stored bytes.
5. Write `experiments/cifar10/results/cifar10_world{,_smoke}.{json,md}` and `..._accuracy_vs_bytes.png`.

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

import promptset  # noqa: F401  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar10_common as common  # noqa: E402
from cifar10_common import (  # noqa: E402
    REPO,
    RESULTS_DIR,
    STUDENT,
    fidelity_table,
    generated_teacher_accuracy,
    generator_record,
    prompt_fidelity,
    sha256_file,
)
from cifar10_report import has_entry, rounds_list, write_outputs  # noqa: E402

torch.set_flush_denormal(True)

IPCS = (1, 10, 50)
METHODS = ("d3m", "class-prompt", "rded", "random-real")  # per IPC; `full` once per protocol

# Presets, one column each: `smoke` (seconds; a check that every stage runs), `reduced` (about an hour), `cpu` (the
# paper's student budget, 300 epochs, 3 seeds, the whole test split, at IPC 1 and 10, with distillation cut to what
# 2 CPU cores do in a few hours: select/invert on the first 500 distilled images per class (no flips), 300 inversion
# steps; IPC 50 last, at a cut budget of 60 epochs), `paper` (the paper's student budget at IPC 1 and 10; IPC 50 at a
# stated smaller budget on CPU).
# `epochs` is per IPC; `rounds` lists the numbers of image rounds d3m / class-prompt are evaluated with
# (1 = a fixed set; R > 1 = fresh variations, regen_every = ceil(epochs / R), at the same step count);
# `test_per_class` 0 = the whole official test split; `eval_every` 0 = test
# only after the last epoch (then best = final).
PRESET_NAMES = ("smoke", "reduced", "cpu", "paper")
# fmt: off
_PRESET_TABLE = {
    #                      smoke             reduced         cpu                    paper
    "distill_per_class":  (12,               300,            500,                   2500),
    "invert_steps":       (5,                200,            300,                   500),
    "invert_batch":       (10,               20,             20,                    20),
    "invert_flip":        (False,            False,          False,                 True),
    "gen_steps":          (4,                10,             10,                    10),
    "guidance":           (3.0,              5.0,            5.0,                   5.0),
    "fidelity_per_class": (2,                20,             20,                    50),
    "ipcs":               ("1,10",           "1,10",         "1,10,50",             "1,10,50"),
    "epochs":             ("1:4,10:2,50:2",  "1:300,10:300", "1:300,10:300,50:300", "1:300,10:300,50:60"),
    "full_epochs":        (1,                5,              10,                    10),
    "full_seeds":         (1,                1,              1,                     1),
    "rounds":             ("1,2",            "1,10",         "1,10",                "1,10"),
    "seeds":              (2,                1,              3,                     3),
    "test_per_class":     (20,               200,            0,                     0),
    "eval_every":         (0,                0,              0,                     0),
}
# fmt: on
PRESETS = {name: {key: row[i] for key, row in _PRESET_TABLE.items()} for i, name in enumerate(PRESET_NAMES)}

# Rough CPU costs (2 shared cores), for the up-front estimate only.
SEC_PER_STEP = 2.2  # base UNet training step at batch 64 on 8x8x32 latents, one thread of a busy pair (measured)
ENCODE_PER_S = 8.0  # TAEF2 encodes at 64 px on one busy thread (measured while pretraining)
GEN_SEC_PER_STEP = 0.06  # one denoising step of one image (with CFG), base UNet
DECODE_S = 0.04  # TAEF2 decode of one 64 px image
STUDENT_MS_PER_IMAGE = 6.0  # ConvNet-3 forward + backward per image
TEST_MS_PER_IMAGE = 1.2


def log(msg: str) -> None:
    common.log(msg, "cifar10_world")


def parse_epochs(text: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (part.split(":") for part in text.split(","))}


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


def make_plan(p: dict, ipcs: list[int], epochs: dict[int, int]) -> list:
    """The table's rows in the order they are trained: (protocol, ipc, epochs, regen_every, methods) or
    "equal-bytes". Most telling first (a long CPU run that is stopped keeps the rows that matter): P1 then P2 at the
    IPCs with the paper's budget, fresh images first; then fixed sets, the equal-bytes random-real rows, IPCs at a
    cut budget, `full`."""
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
    plan += [it for protocol in ("p1", "p2") for ipc in other_ipcs
             for it in real(protocol, ipc) + items(protocol, ipc, fixed)]  # fmt: skip
    plan += [it for protocol in ("p1", "p2") for ipc in other_ipcs for it in items(protocol, ipc, fresh)]
    plan += [(protocol, None, p["full_epochs"], 0, ["full"]) for protocol in ("p1", "p2")]
    return plan


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
        default=str(common.DEFAULT_MODEL),
        help="the mini generator folder (default: the committed experiments/cifar10/models/cifar10-mini-v2)",
    )
    ap.add_argument(
        "--results-name",
        default="",
        help="output name under experiments/cifar10/results (default: cifar10_world, cifar10_world_smoke for --scale "
        "smoke)",
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
    ap.add_argument("--only", default="", help="comma-separated table rows to evaluate, as PROTOCOL:IPC (p1:50), "
                    "PROTOCOL:IPC:METHOD (p1:50:rded), PROTOCOL:IPC:METHOD:fresh|fixed (p1:50:d3m:fresh), "
                    "`equal-bytes` or PROTOCOL:full; the others are skipped (two such invocations with disjoint "
                    "rows share one machine's cores and its results.json)")
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
            f"--model {model}: not a mini model folder; the committed one is "
            "experiments/cifar10/models/cifar10-mini-v2 (its COMMAND.md says how it was trained)"
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
    timer = common.Timer(root / "walltimes.json")
    t_start = time.time()

    from promptset.stages.report import report

    pre = generator_record(model)
    if args.report_only:
        run = root / "run"
        if not (run / "eval" / "results.json").is_file():
            raise SystemExit(f"--report-only rewrites the tables from the world's run in --cache ({run}): there is "
                             "none there; the committed tables are experiments/cifar10/results/cifar10_world.md")
        test = data_test = (
            (cache / "cifar10-jpeg-splits" / f"test-first{p['test_per_class']}")
            if p["test_per_class"]
            else cache / "cifar10-jpeg" / "test"
        )
        report(runs=str(run), out=str(run / "eval"), title=f"CIFAR-10 JPEG world ({tag}): accuracy vs stored bytes")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "eval" / "accuracy_vs_bytes.png", RESULTS_DIR / f"{name}_accuracy_vs_bytes.png")
        write_outputs(name, args, p, tag, root, model, run, data_test, pre, timer, ipcs, epochs, est, t_start,
                      make_plan(p, ipcs, epochs))
        return 0

    # ---- 1-2. data; 4. select, invert, generate (cifar10_common: each stage resumes or skips) ---------------
    t = time.time()
    _, distill, test = common.data_splits(shared, cache, p["test_per_class"])
    timer.add("data", time.time() - t)
    log(f"data: distilled split {distill} (first {p['distill_per_class']}/class used), test {test}")
    log(f"generator: {model} ({model_hash[:12]}); teacher accuracy on its class-prompt samples "
        f"{(pre.get('quality') or {}).get('accuracy')}")  # fmt: skip
    run = common.distill_run(root / "run", distill, model, teacher, p, max(ipcs), args.device, progress, timer)

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
             "model_hash": model_hash, "preset": p, "invert_final_loss": common._last_loss(run),
             "prompt_fidelity": fid,
             "generate_teacher_accuracy": generated_teacher_accuracy(run)},
            indent=1) + "\n")  # fmt: skip
        (RESULTS_DIR / f"{name}_fidelity.md").write_text("\n".join(fidelity_table(fid)) + "\n")
        log(f"--until fidelity: wrote {RESULTS_DIR / (name + '_fidelity.json')} and .md")
        return 0

    # ---- 4. evaluate -----------------------------------------------------------------------------------------
    results_path = run / "eval" / "results.json"
    # rows an earlier session committed (same preset, generator and run inputs) are not trained again
    n = common.import_committed(RESULTS_DIR / f"{name}.json", results_path, tag, model_hash, common.run_inputs(run),
                                run)
    if n:
        log(f"imported {n} entries measured on the same generator and run inputs from {RESULTS_DIR / name}.json")
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
        return has_entry(existing(), method, protocol, ipc, regen, n_epochs, seeds)

    plan = make_plan(p, ipcs, epochs)
    paper_ipcs = sorted(i for i in ipcs if epochs[i] >= 300) or sorted(ipcs)
    if args.only:  # PROTOCOL:IPC, PROTOCOL:IPC:METHOD or PROTOCOL:IPC:METHOD:fresh|fixed; `equal-bytes`
        only: dict[str, set | None] = {}
        for part in (x.strip() for x in args.only.split(",") if x.strip()):
            bits = part.split(":")
            row, method, kind = ":".join(bits[:2]), *(bits[2:4] + ["", ""])[:2]
            if (method and method not in (*METHODS, "full")) or kind not in ("", "fresh", "fixed"):
                raise SystemExit(f"--only {part}: unknown method {method!r} or kind {kind!r} (fresh, fixed); "
                                 f"methods are {', '.join(METHODS)}")
            if not method or (row in only and only[row] is None):
                only[row] = None  # every method of the row
            else:
                only[row] = (only.get(row) or set()) | {(method, kind)}
        known = {"equal-bytes"} | {f"{pr}:{i}" for pr in ("p1", "p2") for i in [*ipcs, "full"]}
        if set(only) - known:
            raise SystemExit(f"--only: unknown rows {sorted(set(only) - known)}; rows are {sorted(known)}")
        kept = []
        for it in plan:
            row = it if it == "equal-bytes" else f"{it[0]}:{it[1] or 'full'}"
            if row not in only:
                continue
            if it != "equal-bytes" and only[row] is not None:
                kind = "fresh" if it[3] else "fixed"
                it = (*it[:4], [m for m in it[4] if {(m, ""), (m, kind)} & only[row]])
                if not it[4]:
                    continue
            kept.append(it)
        plan = kept

    def run_eval(protocol, ipc, n_epochs, regen, methods) -> None:
        seeds = p["full_seeds"] if methods == ["full"] else p["seeds"]
        todo = [m for m in methods if not have(m, protocol, ipc, regen, n_epochs, seeds)]
        what = (f"evaluate {protocol} IPC {'all' if ipc is None else ipc}: {', '.join(methods)}, regen_every "
                f"{regen or 'fixed'}, {n_epochs} epochs x {seeds} seeds")
        seconds = common.evaluate_missing(
            what, todo, "cifar10_world", run=str(run), test=str(test), protocol=protocol, student=STUDENT,
            ipc=ipc or max(ipcs), epochs=n_epochs, seeds=seeds, regen_every=regen,
            eval_every=p["eval_every"] or n_epochs, device=args.device, progress=progress,
        )  # fmt: skip
        if seconds is not None:
            timer.add(f"evaluate_{protocol}", seconds)

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
    write_outputs(
        name, args, p, tag, root, model, run, test, pre, timer, ipcs, epochs, est, t_start, make_plan(p, ipcs, epochs)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
