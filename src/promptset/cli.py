"""The `promptset` command: one argparse subcommand per stage, generated from the stage's config dataclass.

Precedence: defaults < `--config file.yaml` (its section for the command, or its top level) < flags. The CLI is thin:
it parses, calls the verb, and turns `UserError` into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from . import __version__
from .config import add_arguments, load_yaml, resolve
from .errors import TrainingDiverged, UserError

# command -> help; a stage's module is promptset.stages.<command> with <Command>Config and <command>()
COMMANDS = {
    "select": "D3M step 1: the teacher's best crops, as collages",
    "invert": "D3M step 2: one learned token per class, one run",
    "generate": "regenerate images (and soft labels)",
    "evaluate": "train students, test on the real test split",
    "budget": "stored bytes of a run vs real images at IPC k",
    "export": "prompts as diffusers textual-inversion files",
    "report": "Markdown table and accuracy-vs-bytes plot of runs",
    "caption": "a caption per image from its pixels (colours, size, texture, ...), for pretrain --captions",
    "pretrain": "train the small offline mini generator",
    "teacher": "train a teacher classifier (for select, soft labels, P3) on an ImageFolder",
    "pack": "the distilled set as one self-describing, checksummed file",
    "materialize": "a packed set back into an ImageFolder and its labels, with the same generator",
    "coverage": "precision, recall, density, coverage of a set against real images, beside a random real set",
    "demo": "the whole pipeline on a built-in dataset, in minutes on CPU",
}


def _load(command: str):
    """(config class, verb) of a command."""
    from . import pipeline

    if command == "demo":
        return pipeline.DemoConfig, pipeline.demo
    return pipeline.stage(command)


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import STAGE_ORDER

    parser = argparse.ArgumentParser(
        prog="promptset",
        description="Distill an image dataset into one learned text prompt per class (D3M, arXiv 2403.07142).",
    )
    parser.add_argument("--version", action="version", version=f"promptset {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        cls, _ = _load(name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help=f"YAML file of options (its '{name}:' section, or top level)")
        add_arguments(p, cls)
    intro = textwrap.fill(
        "Run the stages named in a YAML config, in order: " + ", ".join(STAGE_ORDER) + ". Each stage reads its own "
        "section (a list of sections runs that stage once per item, e.g. evaluate once per protocol); a top-level "
        "'run:' fills the run folder of every stage. A top-level 'paths:' block names the inputs once (data, "
        "model, teacher); any string in a section refers to one as ${name}. Override any value with --set, "
        "repeated:", 79)
    p = sub.add_parser("run", help="all stages from one config file (a recipe), or --plan its cost",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=(
        intro + "\n"
        "  --set paths.NAME=VALUE      a path variable (--set paths.model=/models/sd-v1-5)\n"
        "  --set SECTION.OPTION=VALUE  an option of a stage section, in every item of a\n"
        "                              list section (--set evaluate.seeds=1)\n"
        "  --set run=DIR               the run folder (as --run)\n"
        + textwrap.fill("Precedence: the stage's defaults < the file < --set. Relative paths are relative to the "
                        "current directory. The recipes of the paper's settings are in recipes/ "
                        "(recipes/README.md).", 79)))
    p.add_argument("--config", required=True, help="YAML file with one section per stage (e.g. "
                   "recipes/cifar10-sd15.yaml)")
    p.add_argument("--run", help="run folder (overrides the file's 'run:')")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the file: paths.NAME=VALUE, SECTION.OPTION=VALUE or run=DIR (repeat)")
    p.add_argument("--plan", action="store_true", help="print the work, stored bytes, FLOPs and estimated time of "
                   "every stage, then stop: nothing is trained, generated or written, and no weights are needed")
    p.add_argument("--plan-device", default="", metavar="NAME", help="with --plan: estimate the time on this GPU "
                   "from its peak dense FLOP/s at --plan-utilization (h100, h200, a100, l40s, l4, a10, rtx4090, "
                   "v100, t4), or on 'cpu' from a rate measured here (default: the device at hand)")
    p.add_argument("--plan-utilization", type=float, default=0.4, metavar="U",
                   help="with --plan-device GPU: the fraction of peak FLOP/s assumed (default: 0.4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        from .threads import ensure

        ensure()  # one torch CPU thread count for the whole command, whatever the load (threads.py)
        if args.command == "run":
            from .pipeline import run_all

            if args.plan:
                from .plan import print_plan

                print_plan(args.config, args.run, args.sets, device=args.plan_device,
                           utilization=args.plan_utilization)
            elif args.plan_device:
                raise UserError("--plan-device is a --plan option; add --plan (nothing runs then)")
            else:
                run_all(args.config, args.run, args.sets)
            return 0
        cls, fn = _load(args.command)
        flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        for key in [k for k in flags if k.endswith("_arg")]:  # a positional argument (see config.opt)
            name = key[: -len("_arg")]
            if name in flags and flags[name] != flags[key]:
                raise UserError(f"{flags[key]!r} and --{name.replace('_', '-')} {flags[name]!r} name two different "
                                "inputs; give one")
            flags[name] = flags.pop(key)
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
