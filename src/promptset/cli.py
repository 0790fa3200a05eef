"""The `promptset` command: one argparse subcommand per stage, generated from the stage's config dataclass.

Precedence: defaults < `--config file.yaml` (its section for the command, or its top level) < flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .config import add_arguments, load_yaml, resolve
from .errors import TrainingDiverged, UserError

# command -> (module, config class, function, help)
COMMANDS = {
    "select": ("promptset.select", "SelectConfig", "select", "D3M step 1: the teacher's best crops, as collages"),
    "invert": ("promptset.invert", "InvertConfig", "invert", "D3M step 2: one learned token per class, one run"),
    "generate": ("promptset.generate", "GenerateConfig", "generate", "regenerate images (and soft labels)"),
    "evaluate": ("promptset.evaluate", "EvaluateConfig", "evaluate", "train students, test on the real test split"),
    "budget": ("promptset.budget", "BudgetConfig", "budget", "stored bytes of a run vs real images at IPC k"),
    "export": ("promptset.export", "ExportConfig", "export", "prompts as diffusers textual-inversion files"),
    "report": ("promptset.report", "ReportConfig", "report", "Markdown table and accuracy-vs-bytes plot of runs"),
    "pretrain": ("promptset.pretrain", "PretrainConfig", "pretrain", "train the small offline mini generator"),
    "demo": ("promptset.demo", "DemoConfig", "demo", "the whole pipeline on a built-in dataset, in minutes on CPU"),
}
STAGE_ORDER = ["select", "invert", "generate", "budget", "evaluate", "report"]


def _load(command: str):
    module, cls_name, fn_name, _ = COMMANDS[command]
    mod = importlib.import_module(module)
    return getattr(mod, cls_name), getattr(mod, fn_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptset",
        description="Distill an image dataset into one learned text prompt per class (D3M, arXiv 2403.07142).",
    )
    parser.add_argument("--version", action="version", version=f"promptset {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_text) in COMMANDS.items():
        try:
            cls, _ = _load(name)
        except ModuleNotFoundError as err:
            if not err.name or not err.name.startswith("promptset"):
                raise
            continue  # stage not built in this version
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help=f"YAML file of options (its '{name}:' section, or top level)")
        add_arguments(p, cls)
    p = sub.add_parser("run", help="all stages from one config file", description=(
        "Run the stages named in a YAML config, in order: " + ", ".join(STAGE_ORDER) +
        ". Each stage reads its own section; a top-level 'run:' fills the run folder of every stage."))
    p.add_argument("--config", required=True, help="YAML file with one section per stage")
    p.add_argument("--run", help="run folder (overrides the file's 'run:')")
    return parser


def run_all(config_path: str, run: str | None) -> None:
    data = load_yaml(config_path)
    run = run or data.get("run")
    if not run:
        raise UserError(f"--config {config_path}: give the run folder as a top-level 'run:' or pass --run")
    stages = [s for s in STAGE_ORDER if s in data]
    unknown = [k for k in data if k not in STAGE_ORDER and k != "run"]
    if unknown:
        raise UserError(f"--config {config_path}: unknown sections {unknown}; known: {STAGE_ORDER}")
    if not stages:
        raise UserError(f"--config {config_path}: no stage sections ({', '.join(STAGE_ORDER)})")
    for stage in stages:
        cls, fn = _load(stage)
        section = dict(data[stage] or {})
        fields = cls.__dataclass_fields__
        for key in ("out", "run"):
            if key in fields and key not in section and not (stage == "generate" and key == "out"):
                section[key] = run
        if stage == "report":
            section.setdefault("runs", run)
        print(f"== promptset run: {stage} ==", flush=True)
        fn(resolve(cls, section, {}, source=f"--config {config_path} [{stage}]"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            run_all(args.config, args.run)
            return 0
        cls, fn = _load(args.command)
        flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        config = resolve(cls, load_yaml(args.config, args.command), flags)
        fn(config)
        return 0
    except UserError as err:
        print(f"promptset {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except TrainingDiverged as err:
        print(f"promptset {args.command}: stopped: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"promptset {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        from .dist import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
