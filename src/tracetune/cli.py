"""Thin dispatch: parse arguments, call one function per verb, map errors to exit codes.

Exit codes: 0 success; 1 a check found problems (data validate, verify); 2 user error (bad config, data,
model source, run directory); 3 a quality gate failed (everything was still written); 4 training hit a
NaN/inf; 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from tracetune.errors import ConfigError, TracetuneError
from tracetune.layout import RunLayout
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

    tokenizer = None
    if args.tokenizer and args.action in ("validate", "stats"):
        from tracetune.models.sources import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    if args.action == "validate":
        return commands.validate(args.file, args.format, args.eval, args.against, tokenizer, args.max_seq_length)
    if args.action == "stats":
        return commands.stats(args.file, args.format, tokenizer, args.tokenizer)
    return commands.synth(args.num, args.seed, args.output, args.eval, args.exclude)


def cmd_models(args) -> int:
    from tracetune.models.sources import PACKAGED, TINY_ARCHS, is_prepared, packaged_dir, prepare_packaged

    if args.action == "prepare":
        print(prepare_packaged(args.name.removeprefix("packaged:")))
        return 0
    for name, spec in PACKAGED.items():
        state = (
            f"cached in {packaged_dir(name)}" if is_prepared(name) else "not converted yet (tracetune models prepare)"
        )
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


def cmd_eval(args) -> int:
    from tracetune.config import load_config
    from tracetune.layout import run_dir_of_model
    from tracetune.pipeline import eval_stage

    config = args.config
    run_dir = run_dir_of_model(args.model) if config is None else None
    if run_dir is not None:  # a run's model is evaluated as its run evaluated it
        config = RunLayout(run_dir).config
    overrides = [f"model.source={args.model}", f"eval.eval_file={args.eval_set}", *args.overrides]
    if args.demos:
        overrides.insert(0, f"data.train_file={args.demos}")
    elif args.baseline != "zero_shot" and config is None:
        raise ConfigError(
            "tracetune eval", [f"--baseline {args.baseline}: needs training traces; fix: add --demos TRAIN.jsonl"]
        )
    elif args.baseline == "zero_shot":  # zero-shot evaluation needs no training data
        overrides.insert(0, "data.train_file=null")
    cfg = load_config(config, overrides)
    e = cfg.eval
    logging.getLogger("tracetune").info(
        "evaluation settings from %s: precision %s, max_items %s, max_new_tokens %d, batch_size %d, %s, "
        "instruction %r (change with --config or key=value overrides)",
        config or "the built-in defaults",
        e.precision,
        e.max_items,
        e.max_new_tokens,
        e.batch_size,
        f"sampled x{e.num_samples} at temperature {e.temperature}" if e.do_sample else "greedy",
        cfg.data.instruction,
    )
    print(eval_stage(cfg, args.model, Path(args.out) if args.out else None, args.baseline))
    return 0


def cmd_run(args) -> int:
    from tracetune.config import load_config
    from tracetune.errors import GateFailure
    from tracetune.pipeline import run_stage

    if args.verb == "resume":
        cfg = load_config(RunLayout(Path(args.run_dir)).config, args.overrides)
        run_dir = Path(args.run_dir).resolve()  # the directory may have moved since config.yaml was written
        cfg.output.root, cfg.output.run_name = run_dir.parent, run_dir.name
        resume = True
    else:
        cfg = load_config(args.config, args.overrides)
        resume = args.resume
        if resume and cfg.output.run_name is None:
            raise TracetuneError("--resume needs output.run_name (the run directory to continue)")
    run_dir, gates = run_stage(cfg, sys.argv, resume=resume)
    for gate in gates["gates"]:
        print(f"  {gate['status']:<4}  {gate['name']}")
    files = RunLayout(run_dir)
    print(f"run directory: {run_dir}\nsummary: {files.summary}\nreport: {files.report}")
    if not gates["passed"]:
        failed = [g["name"] for g in gates["gates"] if not g["passed"]]
        raise GateFailure(f"quality gates failed: {', '.join(failed)} (see {files.gates})")
    return 0


def cmd_tune(args) -> int:
    from tracetune.tune import BEST_YAML, TABLE, parse_budget, tune

    if args.study:
        study = Path(args.study)
    else:  # beside the config's runs
        from tracetune.config import load_config

        study = load_config(args.config, args.overrides).output.root / f"tune-{Path(args.config).stem}"
    record = tune(args.config, args.overrides, study, parse_budget(args.budget), args.trials)
    best = record["evaluation"]
    print(f"trials: {study / TABLE} ({record['num_trials']} trials, {record['spent_s'] / 60:.1f} min)")
    print(f"best: trial {record['best_trial']}: {' '.join(record['best_overrides'])}")
    print(f"  held-out accuracy {record['best_value']:.1%} (validation split, searched on)")
    if best.get("accuracy") is not None:
        print(
            f"  eval accuracy {best['accuracy']:.1%} (scored once, after the search), gates passed: {best['gates_passed']}"
        )
    print(f"run directory: {study / best['run_dir']}\nconfig to rerun it: {study / BEST_YAML}")
    return 0


def cmd_verify(args) -> int:
    from tracetune.evidence.manifest import verify_run

    run_dir = Path(args.run_dir)
    problems, gates = verify_run(run_dir)
    for gate in gates:
        print(f"  {gate['status']:<4}  {gate['name']}")
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{run_dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_report(args) -> int:
    from tracetune.evidence.card import write_card
    from tracetune.evidence.report import write_report

    write_report(Path(args.run_dir))
    write_card(Path(args.run_dir))
    print(RunLayout(Path(args.run_dir)).summary)
    return 0


def cmd_export(args) -> int:
    from tracetune.errors import GateFailure
    from tracetune.evidence.manifest import write_manifest
    from tracetune.export_stage import export_and_check

    run_dir = Path(args.run_dir)
    if not args.gguf:
        raise TracetuneError("tracetune export: say what to export; fix: add --gguf [--type f16|bf16|q8_0]")
    check = export_and_check(run_dir, args.type)
    write_manifest(run_dir)  # the export's files join the run's evidence
    print(json.dumps(check, indent=2))
    if check.get("passed") is False:
        raise GateFailure(
            f"the GGUF file answers unlike the trained model: {check['gate']} fails (export/gguf_check.json)"
        )
    return 0


def cmd_compare(args) -> int:
    from tracetune.evidence.compare import compare_runs, to_markdown, write_compare_html

    result = compare_runs([Path(r) for r in args.runs])
    print(json.dumps(result, indent=2) if args.json else to_markdown(result))
    if args.html:
        write_compare_html([Path(r) for r in args.runs], result, Path(args.html))
        print(f"page: {args.html}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tracetune.data.traces import FORMATS

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
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS])
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

    p = verbs.add_parser("eval", help="generate and score answers on an eval set")
    p.add_argument("--model", required=True, help="model source or directory (e.g. RUN/final_model)")
    p.add_argument("--eval-set", required=True, help="eval items JSONL")
    p.add_argument("--out", help="output directory (rerunning into it skips finished items)")
    p.add_argument("--config", help="YAML config for generation settings (default: built-in defaults)")
    p.add_argument(
        "--baseline",
        choices=["zero_shot", "few_shot", "few_shot_answer"],
        default="zero_shot",
        help="few_shot: each prompt follows eval.num_shots worked examples drawn from --demos; few_shot_answer: "
        "the same examples as question/answer pairs",
    )
    p.add_argument("--demos", help="few_shot: training traces to draw demonstrations from (else data.train_file)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.max_new_tokens=128")
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("run", help="the whole pipeline: base eval, train, final eval, gates, report")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run directory output.run_name names")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("resume", help="continue an interrupted run from its last committed checkpoint")
    p.add_argument("run_dir")
    p.add_argument(
        "overrides", nargs="*", help="key=value; only train.grad_accum_steps may change (another world size)"
    )
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("tune", help="search the recipe within a budget; evaluate the best trial once")
    _add_config_args(p)
    p.add_argument("--budget", default="30m", help="wall-clock budget of the search, e.g. 30m, 2h (default 30m)")
    p.add_argument("--trials", type=int, help="at most this many trials in all")
    p.add_argument("--study", help="study directory (default OUTPUT_ROOT/tune-<config name>); rerun to resume it")
    p.set_defaults(func=cmd_tune)

    p = verbs.add_parser("verify", help="re-check every hash and recompute every gate of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_verify)

    p = verbs.add_parser("report", help="regenerate summary.md and report.html from a run directory's files")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = verbs.add_parser("export", help="write the final model as GGUF (with an Ollama Modelfile) and check it")
    p.add_argument("run_dir")
    p.add_argument("--gguf", action="store_true", help="export GGUF (llama.cpp, Ollama)")
    p.add_argument("--type", choices=["f16", "bf16", "q8_0"], default="bf16", help="tensor type (1-D tensors stay f32)")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("compare", help="compare two or more run directories")
    p.add_argument("runs", nargs="+")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained page (verdicts, accuracy, tables)")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_console()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides written after options (`tune CONFIG --budget 30m train.lr=1e-4`) join the others
        if not hasattr(args, "overrides") or any("=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except TracetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except json.JSONDecodeError as exc:  # a corrupted file inside a run directory
        print(f"error: invalid JSON: {exc}", file=sys.stderr)
        return 2
    finally:
        if "tracetune.dist" in sys.modules:  # leave torchrun's process group cleanly
            sys.modules["tracetune.dist"].shutdown()


def entry() -> None:
    """The `tracetune` command and `python -m tracetune`: main() (under tcmalloc where installed, see
    allocator.py), then exit with its code.

    A torchrun rank leaves with os._exit once everything is written: torch's DDP keeps gloo's process group
    and its worker threads alive past destroy_process_group, and a rank whose interpreter finalized with them
    running aborted (SIGABRT, then SIGSEGV with "<tstate is freed>") in one CI run of the DDP test.
    """
    from tracetune import allocator

    allocator.maybe_reexec(sys.argv[1:])
    code = main()
    if "WORLD_SIZE" in os.environ:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
