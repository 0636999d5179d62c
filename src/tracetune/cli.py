"""Thin dispatch: parse arguments, call one function per verb, map errors to exit codes.

Exit codes: 0 success; 1 a check found problems (data validate, verify); 2 user error (bad config, data,
model source, run directory); 3 a quality gate failed (everything was still written).
"""

from __future__ import annotations

import argparse
import json
import sys

from tracetune.errors import TracetuneError
from tracetune.logs import setup_console


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_epochs=3")


def cmd_config(args) -> int:
    from tracetune.config import dump_config, explain, load_config

    if args.action == "explain":
        print("\n".join(explain()))
        return 0
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg) if args.action == "show" else f"{args.config}: OK")
    return 0


def cmd_data(args) -> int:
    from tracetune.data import commands

    if args.action == "validate":
        return commands.validate(args.file, args.format, args.eval, args.against, args.tokenizer, args.max_seq_length)
    if args.action == "stats":
        return commands.stats(args.file, args.format, args.tokenizer)
    return commands.synth(args.num, args.seed, args.output, args.eval, args.exclude)


def cmd_models(args) -> int:
    from tracetune.models.sources import PACKAGED, TINY_ARCHS, is_prepared, packaged_dir, prepare_packaged

    if args.action == "prepare":
        print(prepare_packaged(args.name.removeprefix("packaged:")))
        return 0
    for name, spec in PACKAGED.items():
        state = f"cached in {packaged_dir(name)}" if is_prepared(name) else "not converted yet (tracetune models prepare)"
        print(f"packaged:{name:<14} {spec.description}; {state}")
    for arch in TINY_ARCHS:
        print(f"tiny:{arch:<19} 2-layer random {arch} with a character tokenizer, for tests")
    print("<directory>               a local Hugging Face model directory")
    print("<org>/<name>              a hub id: downloaded where the network allows, else read from the HF cache")
    return 0


def cmd_train(args) -> int:
    from tracetune.config import load_config
    from tracetune.pipeline import train_stage

    cfg = load_config(args.config, args.overrides)
    print(train_stage(cfg, sys.argv))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracetune", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("config", help="explain, show or check a config")
    p.add_argument("action", choices=["explain", "show", "check"])
    p.add_argument("config", nargs="?", help="YAML config (show, check)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)

    p = verbs.add_parser("data", help="validate, describe or generate data")
    p.add_argument("action", choices=["validate", "stats", "synth"])
    p.add_argument("file", nargs="?", help="JSONL file (validate, stats)")
    p.add_argument("--format", default="auto", choices=["auto", "native", "eval", "gsm8k", "chat", "alpaca"])
    p.add_argument("--eval", action="store_true", help="the file is (validate) or should be (synth) an eval set")
    p.add_argument("--against", help="validate: training file to check an eval set against for leakage")
    p.add_argument("--tokenizer", help="model source whose tokenizer measures lengths (validate, stats)")
    p.add_argument("--max-seq-length", type=int, help="validate: flag records longer than this many tokens")
    p.add_argument("--num", type=int, default=1000, help="synth: number of records")
    p.add_argument("--seed", type=int, default=0, help="synth: seed")
    p.add_argument("-o", "--output", help="synth: output file")
    p.add_argument("--exclude", help="synth: never emit a prompt that occurs in this file")
    p.set_defaults(func=cmd_data)

    p = verbs.add_parser("models", help="list model sources or convert a packaged one")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("name", nargs="?", help="prepare: packaged model name, e.g. gemma3-270m")
    p.set_defaults(func=cmd_models)

    p = verbs.add_parser("train", help="fine-tune into a new run directory")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_console()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TracetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except json.JSONDecodeError as exc:  # a corrupted file inside a run directory
        print(f"error: invalid JSON: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
