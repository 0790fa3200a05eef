"""BENCHMARKS.md's demo and busy-machine sections (benchmarks/results/demo_fresh_clone*.json, busy_machine.json,
thread_candidates.json)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import RESULTS, _load

DEMO_ROWS = [("p1", "d3m"), ("p1", "rded"), ("p1", "random-real"), ("p1", "random-real@d3m"), ("p2", "d3m"),
             ("p2", "random-real")]  # fmt: skip


def demo_section(demo_path: Path) -> list[str]:
    """From `results/demo_fresh_clone.json` (demo_from_clone.py: set-up + demo from a fresh clone), else from a
    local demo run's demo.json."""
    clone = _load("demo_fresh_clone.json")
    if clone is not None:
        demo, results = clone["demo"], clone["results"]
    elif demo_path.is_file():
        demo = json.loads(demo_path.read_text())
        results = json.loads(Path(demo["results"]).read_text())
    else:
        return [
            "## `promptset demo` (digits, 8 px, offline)",
            "",
            "Not measured with the current code yet: run `python3 benchmarks/demo_from_clone.py`, then this script.",
            "",
        ]
    cmd = demo.get("command", "promptset demo")
    t = demo["timings_s"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total")
    lines = ["## `promptset demo` (digits, 8 px, offline)", ""]
    if clone is not None:
        m, w = clone["machine"], clone["wall_s"]
        lines += [
            f"From a fresh clone (`python3 benchmarks/demo_from_clone.py`, commit {clone['commit'][:7]}): "
            f"`{clone['command']}` took **{w['total']:.0f} s** = set-up {w['setup']:.0f} s (a new `.venv`, torch "
            f"and promptset installed) + demo {w['demo']:.0f} s, on {m['cpu']}, {m['cores']} cores, 1-min load "
            f"average {m['loadavg_1min_before_setup']} before set-up and {m['loadavg_1min_before_demo']} before the "
            "demo.",
            "",
        ]
    lines += [
        f"Command: `{cmd}`. Demo wall time {t['total']:.0f} s ({stages}); {demo.get('torch_threads', '?')} torch "
        "thread(s). Students: ConvNet-3 on held-out "
        "digits, mean ± std over seeds. P1 = stored soft labels, no augmentation, fresh d3m images every few "
        "epochs (the paper's protocol; d3m's bytes include the soft labels of every round); P2 = one-hot "
        "labels with augmentation. Digits are 8x8, so one 384-d fp32 prompt (1,536 B) costs as much as 8 raw "
        "images: prompts pay off at high resolution, not here.",
        "",
        "| protocol | method | IPC | epochs | stored bytes | IPC-equivalent | final top-1 | best top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(results["entries"].values(), key=lambda e: (e["protocol"], e["method"] != "d3m", e["method"]))
    for e in rows:
        lines.append(
            f"| {e['protocol'].upper()} | {e['method']} | {e['ipc']} | {e['epochs']} | {e['stored_bytes']:,} | "
            f"{e['ipc_equivalent']:.2f} | {e['final_top1']['mean']:.2f} ± {e['final_top1']['std']:.2f} | "
            f"{e['best_top1']['mean']:.2f} ± {e['best_top1']['std']:.2f} |"
        )
    fresh = [e for e in results["entries"].values() if (e.get("distilled") or {}).get("rounds", 1) > 1]
    orders = sorted({e["recipe"].get("round_order", "sequential") for e in fresh})
    if orders and orders != ["mixed"]:
        lines += ["", f"d3m's fresh rounds in this table were trained in the **{', '.join(orders)}** round order "
                      "(measured before `evaluate --round-order mixed` became the default; see the fresh-rounds "
                      "ablation below): rerun `benchmarks/demo_from_clone.py` for the current default."]
    if demo.get("reading"):
        lines += ["", demo["reading"].replace("reading: ", "Reading (printed by the demo): ", 1)]
    q = demo.get("generator_quality", {}).get("quality", {})
    if q:
        lines += [
            "",
            f"Generator quality: the demo teacher classifies {100 * q['accuracy']:.1f}% of the mini "
            f"generator's class-prompt samples correctly (chance {100 * q['chance']:.0f}%, "
            f"{q['samples']} samples).",
        ]
    others = sorted(RESULTS.glob("demo_fresh_clone_*.json"))
    if others:
        lines += [
            "",
            "The same command at other commits or with another number of torch threads (floating-point sums "
            "then run in another order, so the generator, the prompts and every student differ): the ± above is "
            "over student seeds only, for one generator and one inversion; these rows show how much that one draw "
            "moves the d3m rows. `demo_fresh_clone_before_seed_selection.json` is the demo before seed selection "
            "became the default (G = 1, fresh rounds then trained in sequence).",
            "",
            "| run | commit | torch threads | demo s | generator accuracy | "
            + " | ".join(f"{p.upper()} {m}" for p, m in DEMO_ROWS)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(DEMO_ROWS),
        ]
        for path in [None, *others]:
            run = clone if path is None else json.loads(path.read_text())
            if run is None:
                continue
            d = run["demo"]
            acc = {(e["protocol"], e["method"]): e["final_top1"]["mean"] for e in run["results"]["entries"].values()}
            qa = d.get("generator_quality", {}).get("quality", {}).get("accuracy")
            lines.append(
                f"| {'above' if path is None else path.name} | {str(run.get('commit', ''))[:7]} "
                f"| {d.get('torch_threads')} "
                f"| {run['wall_s']['demo']:.0f} | "
                + ("-" if qa is None else f"{100 * qa:.1f}%")
                + " | "
                + " | ".join("-" if acc.get(k) is None else f"{acc[k]:.1f}" for k in DEMO_ROWS)
                + " |"
            )
    return lines + [""]


# the script that measured the thread candidates: a diagnostic, deleted once this section and CHANGELOG.md held its
# finding (issue 34)
THREAD_CANDIDATES = "a diagnostic since deleted: `git log --all -- benchmarks/thread_candidates.py` finds it"


def busy_machine_section() -> list[str]:
    """From `results/thread_candidates.json` and `results/busy_machine.json`: bits and speed on a busy machine."""
    head = ["## Bits and speed on a busy machine", ""]
    lines = list(head)
    cand = _load("thread_candidates.json")
    if cand is None:
        lines += [f"Candidates not measured: no benchmarks/results/thread_candidates.json ({THREAD_CANDIDATES}).", ""]
    else:
        lines += [
            f"`python benchmarks/thread_candidates.py` ({THREAD_CANDIDATES}) on {cand['cpu']} ({cand['cores']} "
            f"cores): {cand['workload']}, a fresh process per run, median of {cand['repeats']}, idle and beside one "
            "`while True: pass` process. "
            "*same bits*: the prompts and every PNG hash the same idle and busy. *adaptive* is what promptset did "
            "before (threads for the idle cores: 2 idle, 1 beside a busy process).",
            "",
            "| candidate | idle s | busy s | busy / idle | same bits idle and busy |",
            "|---|---|---|---|---|",
        ]
        for name, r in cand["summary"].items():
            lines.append(f"| {name} | {r['idle_s']:.1f} | {r['busy_s']:.1f} | {r['busy_over_idle']:.2f}x | "
                         f"{'yes' if r['same_bits_idle_and_busy'] else 'no'} |")
        lines += ["", "promptset runs `2 promptset`: one fixed count per process (torch's default, recorded), and "
                  "`import promptset` sets OMP_WAIT_POLICY before torch loads OpenMP: `active` when the other "
                  "processes leave the cores idle at start, `passive` when they keep half a core or more busy. "
                  "`2 passive` (every process, the first choice) cost up to 1.5x idle on these small operations; the "
                  "spin counts were the slowest beside a busy loop. The wait policy never changes a bit, the thread "
                  "count does (`1 thread` vs the others).", ""]
    data = _load("busy_machine.json")
    if data is None or data.get("version") != 2:
        return lines + ["Demo and API rows not measured yet: `python benchmarks/busy_machine.py`.", ""]
    lines += [
        f"`python benchmarks/busy_machine.py`: `promptset demo{' --quick' if data.get('quick') else ''}` and a "
        f"Python-API inversion (`promptset.invert`, tiny SD, {data['api_invert']['classes']} classes, "
        f"{data['api_invert']['steps']} steps, batch {data['api_invert']['batch_size']}, "
        f"{data['api_invert']['size']} px) from spawn to exit on {data['cpu']} ({data['cores']} cores), no "
        "PROMPTSET_THREADS, idle and beside one busy loop; *default* is promptset's choice at start (active idle, "
        "passive busy), *spinning* OMP_WAIT_POLICY=active and *passive* OMP_WAIT_POLICY=passive whatever the load. "
        "*busy cores before*: the cores all processes kept busy in the 2 s before the run (the busy loop included).",
        "",
        "| workload | waits | machine | seconds | busy cores before | busy process | bits (fingerprint) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _key, r in sorted(data["rows"].items()):
        secs = f"> {r['seconds']:.0f} (stopped)" if r.get("timed_out") else f"{r['seconds']:.1f}"
        bits = r.get("bits") or {}
        fp = f"prompts {(bits.get('prompts') or '-')[:8]}"
        fp += f", labels {bits['labels'][:8]}" if bits.get("labels") else ""
        lines.append(f"| {r['workload']} | {r['waiting']} | {r['load']} | {secs} | {r.get('busy_cores_before', '-')} "
                     f"| {r.get('busy_process') or '-'} | {fp} |")
    facts = [f"{k.replace('/busy_over_idle', '')}: busy/idle {v:.2f}x" for k, v in sorted(data.items())
             if k.endswith("busy_over_idle")]
    facts += [f"{k.replace('/same_bits_in_every_row', '')}: same bits in every row: {'yes' if v else 'NO'}"
              for k, v in sorted(data.items()) if k.endswith("same_bits_in_every_row")]
    if facts:
        lines += ["", "; ".join(facts) + "."]
    return lines + [""]
