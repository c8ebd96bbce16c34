"""Command line: ``stablelora train CONFIG.yaml [section.key=value ...]``, ``stablelora demo``, listings."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _offline_env() -> None:
    # No model hub is reachable: never try. Caches stay out of the way of the user's own.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _positive_minutes(text: str) -> float:
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give the minutes as a number > 0, e.g. --time-budget 90")
    return minutes


def _train(args) -> int:
    from stablelora.train.config import load_config
    from stablelora.train.errors import RunError

    cfg = load_config(args.config, args.overrides, output_dir=args.output_dir)  # before the heavy imports
    from stablelora.eval import headline
    from stablelora.train.run import run_training

    eval_before = None
    if args.eval_before:
        try:
            eval_before = json.loads(Path(args.eval_before).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"--eval-before {args.eval_before}: cannot read it as JSON ({err}).") from err
    metrics = run_training(cfg, resume=args.resume, eval_before=eval_before)
    print(f"run directory: {cfg.run_dir}")
    for name, after in metrics["eval_after"].items():
        key, value = headline(after)
        print(f"{name}: {key} {headline(metrics['eval_before'][name])[1]:.3f} -> {value:.3f}")
    return 0


def _demo(args) -> int:
    from stablelora.demo import run_demo

    run_demo(args.output_dir, steps=args.steps, overrides=args.overrides)
    return 0


def _compare(args) -> int:
    from stablelora.benchmark.grid import load_compare_config, planned_records
    from stablelora.benchmark.records import load_records
    from stablelora.benchmark.runner import run_grid

    cfg = load_compare_config(args.config, output_dir=args.output_dir)
    if args.results_only:
        from stablelora.benchmark.render import write_results

        records = planned_records(cfg, load_records(cfg))
        if not records:
            raise ValueError(f"no finished runs under {cfg.records_dir}: run 'stablelora compare {args.config}' first.")
        write_results(cfg, records)
        print(f"results: {cfg.output_dir / 'results.md'} ({len(records)} of {cfg.total_runs()} runs)")
        return 0
    if args.dry_run:
        from stablelora.benchmark.grid import plan, setting_label

        records = load_records(cfg)
        known = plan(cfg, records)
        for run in known:
            state = "done" if run.run_id in records else "to run"
            print(f"{state:7s} {run.method} ({run.role}) {setting_label(run.setting)} seed {run.seed}")
        later = cfg.total_runs() - len(known)
        print(f"{sum(run.run_id in records for run in known)} of {cfg.total_runs()} runs done" +
              (f"; {later} more are planned once tuning has chosen their settings" if later else ""))
        return 0
    run_grid(cfg, time_budget_minutes=args.time_budget)
    return 0


def _theory(args) -> int:
    from pathlib import Path

    from stablelora.diagnostics.theory import format_table, plot, run_theory
    from stablelora.fileio import write_atomic

    widths = [int(w) for w in args.widths.split(",")]
    if len(widths) < 2 or any(w < 8 for w in widths):
        raise ValueError(f"--widths needs at least two widths >= 8, got {args.widths!r}.")
    results, fits, verdicts = run_theory(widths, steps=args.steps, tail=max(1, args.steps // 6))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, fits, str(out / "theory.png"))
    text = "\n".join([format_table(results), "", *verdicts])
    write_atomic(out / "theory.md", f"Command: stablelora theory --widths {args.widths} --steps {args.steps}\n\n"
                                    f"{text}\n\n![log-log](theory.png)\n")
    print(text)
    print(f"\nplot: {out / 'theory.png'}")
    return 0


def _list(what: str) -> int:
    if what == "methods":
        from stablelora.methods import method_table

        print(method_table())
    elif what == "models":
        from stablelora.assets.models import NAMED_MODELS

        for m in NAMED_MODELS.values():
            print(f"{m.name:32s} {m.kind:10s} {m.description}")
    else:
        from stablelora.assets.tasks import TASKS

        for name, (family, _) in TASKS.items():
            print(f"{name:16s} {family}")
        print(f"{'jsonl':16s} your own files: data.train_file, data.eval_file, data.format")
    return 0


_INTERRUPTED = {
    "compare": "Interrupted: finished runs are kept in the records; the run in flight starts over. Run the same "
               "command again to continue.",
}


def _quiet_library_notices() -> None:
    """Deprecation notices addressed to library authors (transformers 5 about an attribute PEFT and Trainer read),
    not to someone running a job."""
    import warnings

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    _offline_env()
    _quiet_library_notices()
    parser = argparse.ArgumentParser(prog="stablelora", description="Stable LoRA fine-tuning, offline.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one configuration (YAML + section.key=value overrides)")
    train.add_argument("config", nargs="?", help="YAML config (see configs/); optional if --help-keys")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. method.optimizer=stable-lora")
    train.add_argument("--output-dir", help="run directory (default: training.output_dir)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    train.add_argument("--help-keys", metavar="SECTION", help="list the keys of a config section and exit")
    train.add_argument("--eval-before", metavar="JSON", help="reuse this evaluation of the untrained model (same model "
                       "and eval split; compare passes one to every run) instead of evaluating again")

    demo = sub.add_parser("demo", help="plain LoRA vs Stable-LoRA on a real model and dataset, ~10 min on 2 CPUs")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="training steps per method (default: the demo's)")
    demo.add_argument("overrides", nargs="*", help="section.key=value applied to both runs")

    report = sub.add_parser("report", help="stability plots and a Markdown summary from run directories")
    report.add_argument("runs", nargs="+", help="run directories written by stablelora train")
    report.add_argument("--output", help="output directory (default: RUN/report for one run, ./report otherwise)")

    compare = sub.add_parser("compare", help="benchmark grid: methods x seeds x learning rates, resumable, with "
                             "results.md/json and plots")
    compare.add_argument("config", help="compare YAML (see configs/compare/)")
    compare.add_argument("--output-dir", help="results directory (default: the config's output_dir)")
    compare.add_argument("--time-budget", type=_positive_minutes, metavar="MINUTES",
                         help="start no run that would end after this many minutes; run again to continue")
    compare.add_argument("--dry-run", action="store_true", help="list the runs, done and to do, and exit")
    compare.add_argument("--results-only", action="store_true", help="rewrite results from the records, run nothing")

    theory = sub.add_parser("theory", help="width-scaling check of the Stable-LoRA theory (CPU, a few minutes)")
    theory.add_argument("--widths", default="128,256,512,1024,2048,4096", help="comma-separated widths n")
    theory.add_argument("--steps", type=int, default=300)
    theory.add_argument("--output", default="theory", help="directory for theory.png and theory.md")

    for name in ("methods", "models", "tasks"):
        sub.add_parser(name, help=f"list the available {name}")

    # overrides may also follow options (train cfg.yaml --output-dir d a.b=1): collect the leftovers
    args, leftover = parser.parse_known_args(argv)
    stray = [x for x in leftover if "=" not in x or x.startswith("-")]
    if stray or (leftover and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or leftover)}")
    if leftover:
        args.overrides = list(args.overrides) + leftover
    try:
        return _dispatch(parser, args)
    except ModuleNotFoundError as err:
        module = (err.name or "").split(".")[0]
        extra = _EXTRA_OF_MODULE.get(module)
        if extra is None or os.environ.get("STABLELORA_DEBUG"):
            raise
        package = {"yaml": "pyyaml", "reasoning_gym": "reasoning-gym"}.get(module, module)
        print(f"error: stablelora {args.command} needs the {package} package, which `pip install stablelora` "
              f"(the optimizer only) does not bring: pip install 'stablelora[{extra}]'", file=sys.stderr)
        return 2


# The packages of the extras in pyproject.toml, by the module they import as
_EXTRA_OF_MODULE = {
    **dict.fromkeys(["transformers", "accelerate", "datasets", "safetensors", "yaml", "tensorboard", "matplotlib",
                     "tqdm"], "train"),
    **dict.fromkeys(["gguf", "reasoning_gym"], "train,assets"),
    "trl": "trl",
    "bitsandbytes": "qlora",
}


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from stablelora.benchmark.grid import CompareError
    from stablelora.reporting.report import ReportError
    from stablelora.train.config import ConfigError
    from stablelora.train.errors import RunError

    try:
        if args.command == "train":
            if args.help_keys:
                from stablelora.train.config import help_keys

                print(help_keys(args.help_keys))
                return 0
            if args.config is None:
                parser.error("train needs a CONFIG.yaml (examples in configs/)")
            return _train(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "theory":
            return _theory(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "report":
            from stablelora.reporting.report import write_report

            output = args.output or (f"{args.runs[0]}/report" if len(args.runs) == 1 else "report")
            print(f"report written: {write_report(args.runs, output)}")
            return 0
        return _list(args.command)
    except (ConfigError, CompareError, RunError, ReportError, FileNotFoundError, ValueError) as err:
        # user-facing problems are raised as these, with the fix in the message; STABLELORA_DEBUG=1 shows where
        if os.environ.get("STABLELORA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"\n{str(err) or _INTERRUPTED.get(args.command, 'Interrupted.')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
