"""The shape of the package (rooms, import direction, module size) and defects that need no pipeline run.

Every verb refuses an option it does not know; a stochastic sampler's images depend on their seeds alone; int8
prompts decode to the nearest stored grid point; model fingerprints cover every byte and pin Hub commits.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import promptset
from promptset.artifacts import PromptSet, fingerprint_path, hub_fingerprint, load_tensors, snapshot_commit
from promptset.backends import create_backend
from promptset.backends.sampling import Job, TextConditioner, generate_batch
from promptset.config import resolve
from promptset.errors import UserError

SRC = Path(promptset.__file__).resolve().parent
VERBS = ("select", "invert", "generate", "export", "budget", "evaluate", "report", "pretrain", "pack", "materialize",
         "coverage", "demo")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every promptset module imported by each module, at the top or inside a function (lazy imports count)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def test_no_module_over_600_lines():
    sizes = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_stages_never_import_each_other_and_imports_have_no_cycle():
    graph = _imports()
    stages = {m for m in graph if m.startswith("promptset.stages.")}
    assert {s.rpartition(".")[2] for s in stages} >= set(VERBS) - {"demo"}
    for stage in stages:
        assert not graph[stage] & stages, f"{stage} imports {graph[stage] & stages}"
    rooms = ("promptset.evaluation", "promptset.backends", "promptset.models")
    for module, imported in graph.items():  # the rooms below the stages never reach up into them
        if module.startswith(rooms):
            assert not imported & stages and "promptset.pipeline" not in imported, module
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodule is not a cycle
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize(
    "verb, typo, nearest",
    [("select", "outt", "out"), ("invert", "stepz", "steps"), ("generate", "guidanse", "guidance"),
     ("export", "runn", "run"), ("budget", "ipc", "ipcs"), ("evaluate", "epoch", "epochs"),
     ("report", "run", "runs"), ("pretrain", "lrr", "lr"), ("demo", "quik", "quick"), ("pack", "entri", "entry"),
     ("materialize", "forse", "force"), ("coverage", "reall", "real")],
)  # fmt: skip
def test_every_verb_refuses_an_unknown_option_naming_the_nearest(verb, typo, nearest):
    with pytest.raises(UserError, match=rf"promptset\.{verb}\(\): unknown option '{typo}'; did you mean '{nearest}'"):
        getattr(promptset, verb)(**{typo: 5})
    with pytest.raises(UserError, match=r"unknown option 'zzzz'; known: "):  # nothing near: every option listed
        getattr(promptset, verb)(zzzz=5)


def test_invert_stepz_is_refused_and_the_callers_config_is_not_modified(tmp_path):
    with pytest.raises(UserError, match=r"unknown option 'stepz'; did you mean 'steps'\?"):
        promptset.invert(out=str(tmp_path / "run"), stepz=5)
    from promptset.stages.invert import InvertConfig

    cfg = InvertConfig(out=str(tmp_path / "run"))
    with pytest.raises(UserError, match="--model is required"):
        promptset.invert(cfg, steps=7)
    assert cfg.steps == 500
    with pytest.raises(UserError, match=r"\[invert\]: unknown option 'stepz'; did you mean 'steps'\?"):
        resolve(InvertConfig, {"stepz": 5}, {}, source="--config run.yaml [invert]")


def test_stochastic_sampler_image_depends_only_on_its_seed(tiny_sd):
    """ddpm adds noise at every step: it comes from the image's own generator, never the global RNG (defect 1)."""
    backend = create_backend("sd", str(tiny_sd), device="cpu", sampler="ddpm")
    cond = TextConditioner(backend, ["a photo of a car", "a photo of a cat", "a photo of a dog"])
    kw = dict(steps=4, guidance=1.0, factor=1, image_size=backend.resolution, uncond=None, micro_batch=2)
    a, b, c = Job(0, 0, 11), Job(1, 0, 12), Job(2, 0, 13)
    first = generate_batch(backend, cond, [a, b], **kw)
    torch.rand(7)  # global random state moves on between the calls
    second = generate_batch(backend, cond, [c, a], **kw)  # same seed, other batch neighbours and position
    assert torch.equal(first[0], second[1])
    other_seed = generate_batch(backend, cond, [Job(0, 0, 99), b], **kw)
    assert not torch.equal(first[0], other_seed[0])


def test_int8_prompts_decode_to_the_nearest_stored_grid_point(tmp_path):
    """Quantised with the scale as stored (fp16), so q * scale is the nearest grid point to each value (defect 5)."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 2, 64, generator=g) * 0.37
    prompts = PromptSet(emb, [f"<c{i}>" for i in range(10)], [f"c{i}" for i in range(10)], "a photo of {token}",
                        "sd", "model", "hash", stored_dtype="int8")  # fmt: skip
    prompts.save(tmp_path / "prompts.safetensors")
    tensors, _ = load_tensors(tmp_path / "prompts.safetensors")
    assert tensors["embeddings"].dtype == torch.int8 and tensors["scales"].dtype == torch.float16
    step = tensors["scales"].float()  # (C, V, 1)
    decoded = PromptSet.load(tmp_path / "prompts.safetensors").embeddings
    assert float(((decoded - emb).abs() / step).max()) <= 0.5 + 1e-4
    assert prompts.stored_bytes() == 10 * 2 * 64 + 10 * 2 * 2


def test_fingerprint_covers_every_byte_and_pins_hub_commits(tmp_path):
    """Fine-tunes differing only mid-file get different fingerprints; a Hub model its resolved commit (defect 6)."""
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    for name, flip in (("a", False), ("b", True)):
        weights = data.copy()
        weights[len(weights) // 2] ^= flip
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "unet" / "model.safetensors").write_bytes(weights.tobytes())
    assert fingerprint_path(tmp_path / "a") != fingerprint_path(tmp_path / "b")
    assert fingerprint_path(tmp_path / "a" / "unet" / "model.safetensors") != fingerprint_path(
        tmp_path / "b" / "unet" / "model.safetensors"
    )
    assert fingerprint_path(tmp_path / "a") == fingerprint_path(tmp_path / "a")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = f"/hf/hub/models--org--sd/snapshots/{commit}/unet"
    assert snapshot_commit(snapshot) == commit and snapshot_commit(tmp_path) is None
    assert hub_fingerprint("org/sd", "main", snapshot_commit(snapshot)) == f"hub:org/sd@{commit}"
    assert hub_fingerprint("org/sd", None, None) == "hub:org/sd@main"


def _patches_of_promptset(path: Path) -> list[str]:
    """Assignments to attributes of promptset modules (or setattr on them) in a script: run-time patches."""
    import ast

    tree = ast.parse(path.read_text())
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("promptset")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("promptset"):
            aliases |= {a.asname or a.name for a in node.names}

    def rooted(expr) -> bool:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return isinstance(expr, ast.Name) and expr.id in aliases

    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []  # fmt: skip
        found += [f"line {node.lineno}" for t in targets if isinstance(t, ast.Attribute) and rooted(t.value)]
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr" and node.args:
            if rooted(node.args[0]):
                found.append(f"line {node.lineno} (setattr)")
    return found


REPO = Path(__file__).resolve().parents[1]
# Python outside the package: speed benchmarks and their helpers, diagnostics, the CIFAR-10 world study, tools
SCRIPT_DIRS = ("benchmarks", "benchmarks/diagnostics", "experiments/cifar10", "tools", "tools/benchmarks_md")
SCRIPTS = sorted(p.relative_to(REPO).as_posix() for d in SCRIPT_DIRS for p in (REPO / d).glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_drivers_patch_nothing_inside_promptset(script):
    assert _patches_of_promptset(REPO / script) == []


def test_the_patch_detector_finds_a_patch(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import promptset.backends.sampling as gen\nfrom promptset import stages\n"
                      "gen.generate_batch = None\nsetattr(stages.invert, 'x', 1)\n")  # fmt: skip
    assert len(_patches_of_promptset(script)) == 2


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _broken_local_imports(path: Path) -> list[str]:
    """`from sibling import name` lines of a script whose sibling module defines no such name. A sibling is a file
    beside the script (`from pkg.mod import` and `from .mod import` too) or one of the speed benchmarks' helpers in
    benchmarks/, which the study and the diagnostics put on their path."""
    broken = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.ImportFrom) and node.module):
            continue
        rel = node.module.replace(".", "/") + ".py"
        found = [d / rel for d in (path.parent, REPO / "benchmarks") if (d / rel).is_file()][:1]
        if found:
            defined = _top_level_names(found[0])
            broken += [f"line {node.lineno}: {node.module}.{a.name}" for a in node.names if a.name not in defined]
    return broken


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_scripts_import_only_what_their_siblings_define(script):
    assert _broken_local_imports(REPO / script) == []


def test_no_script_outside_the_package_over_600_lines():
    sizes = {s: len((REPO / s).read_text().splitlines()) for s in SCRIPTS}
    assert max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_every_script_outside_the_package_answers_help():
    """`--help` of every script with a command line (benchmarks, diagnostics, the CIFAR-10 study, tools) from where it
    lives, all in one process: its imports resolve and its flags parse."""
    import subprocess
    import sys

    scripts = [s for s in SCRIPTS if 'if __name__ == "__main__"' in (REPO / s).read_text()]
    assert any(s.startswith("experiments/cifar10/") for s in scripts) and "tools/write_benchmarks_md.py" in scripts
    code = (
        "import os, runpy, sys\n"
        "failed = []\n"
        "for script in sys.argv[1:]:\n"
        "    sys.argv = [script, '--help']\n"
        "    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` puts it first\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "        failed.append(script + ': no exit')\n"
        "    except SystemExit as stop:\n"
        "        if stop.code not in (0, None):\n"
        "            failed.append(f'{script}: exit {stop.code}')\n"
        "    except Exception as err:\n"
        "        failed.append(f'{script}: {type(err).__name__}: {err}')\n"
        "print('FAILED', failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *scripts], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_the_import_check_finds_a_moved_name(tmp_path):
    (tmp_path / "lib.py").write_text("A = 1\ndef f():\n    pass\n")
    (tmp_path / "user.py").write_text("from lib import A, f, SPLIT\n")
    assert _broken_local_imports(tmp_path / "user.py") == ["line 1: lib.SPLIT"]
