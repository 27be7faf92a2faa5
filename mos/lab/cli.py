"""The `mos` command line: `mos train|profile [--config FILE] [--set key=value ...]` and
`mos predict --checkpoint FILE --data LOG --out FILE`.

`main(argv)` returns the exit code instead of exiting, so tests call it directly. Config
mistakes, and input the run finds unusable (`mos.lab.errors.InputError`: a log without a needed
column, an empty file, a device this machine lacks, a damaged checkpoint), end with one line on
stderr and exit code 2, never a traceback.

Only argparse and the standard library load before the arguments are parsed, so `--help` and
`--version` answer at once; torch, triton and the lab load when a command runs.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

from mos import __version__
from mos.lab import host_memory

_TRAIN_EPILOG = """\
precedence: built-in defaults < --config file < --set overrides (left to right).
--set values are YAML, so types come out right:
  --set train.seeds=[0,1,2] model.mos.num_themes=16 model.mos.max_theme_tokens=null
  --set models=[mos] train.progress=bar
results: one JSON line per (model, seed) appended to <train.out_dir>/results.jsonl,
and a table of test AUC / GAUC / LogLoss (mean ± std over seeds) on stdout.
data: --data synthetic | movielens | sample | path/to/log.csv|.tsv|.parquet (columns: docs/lab.md, "Real data").
more than one process: torchrun --standalone --nproc_per_node=2 -m mos train ...
checkpoints: <train.out_dir>/checkpoints/<model>-seed<seed>.pt; --resume continues from them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mos",
        description="Mixture-of-Sequence (MoS) for long-sequence CTR prediction: train and compare "
                    "the MoS model against its single-encoder backbone.")
    parser.add_argument("--version", action="version", version=f"mos {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser(
        "train", help="train every model in `models` for every seed and print the comparison",
        description="Load the data (--data), train each model kind for each seed with early stopping\n"
                    "on validation AUC, and report test metrics.",
        epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_options(train)
    _add_data_option(train)
    train.add_argument("--resume", action="store_true",
                       help="continue every run from its checkpoint (same as train.resume=true); finished runs are kept")
    profile = commands.add_parser(
        "profile", help="FLOPs versus accuracy: MoS, its ablations and the MoE baselines",
        description="Train every variant in `models` for every seed (finished runs are reused), count\n"
                    "FLOPs per example, and write the table, CSV/JSON and plots to train.out_dir.",
        epilog=_PROFILE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_options(profile)
    _add_data_option(profile)
    profile.add_argument("--quick", action="store_true", help="tiny sizes, one seed, one epoch (a smoke run)")
    profile.add_argument("--jobs", type=int, default=1, metavar="N",
                         help="train N runs at once, each in its own process with one thread (default 1); "
                              "the numbers equal a serial run's with train.threads=1")
    profile.add_argument("--no-tuning", action="store_true",
                         help="skip profile.grid: every model runs with its profile.per_model options")
    profile.add_argument("--report-only", action="store_true",
                         help="train nothing: report the finished runs in <out_dir>/runs/ and name the missing ones")
    scoring = commands.add_parser(
        "predict", help="score a log with a trained model: one CSV row per scored event",
        description="Read the log (--data) with the checkpoint's column names, label and history options and\n"
                    "the same checks as training; write the model's click probability for every event\n"
                    "with enough history before it.",
        epilog=_PREDICT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    scoring.add_argument("--checkpoint", required=True, metavar="FILE",
                         help="a checkpoint of `mos train`: <out_dir>/checkpoints/<model>-seed<seed>.pt")
    scoring.add_argument("--data", required=True, metavar="LOG", help="the log to score (.csv, .tsv, .parquet)")
    scoring.add_argument("--out", required=True, metavar="FILE", help="where the scores go (CSV; - for stdout)")
    scoring.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                         help="override a key of the checkpoint's config, e.g. data.logs.user_column=uid")
    return parser


def _add_config_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", metavar="FILE",
                         help="YAML config, or the name of a shipped one: default, profile")
    command.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend",
                         default=[], help="override one dotted config key, e.g. train.lr=0.001")
    command.add_argument("--quiet", action="store_true", help="no per-epoch log lines (same as train.quiet=true)")
    command.add_argument("--print-config", action="store_true",
                         help="print the merged config as YAML and exit without training")


def _add_data_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--data", metavar="SOURCE",
                         help="synthetic, movielens, sample (the log shipped with the lab) or a log file path (same as data.source=SOURCE)")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The `--set` form of the flags that stand for a config key."""
    overrides = ["train.quiet=true"] if args.quiet else []
    if getattr(args, "data", None) is not None:
        # JSON is YAML: the path stays a string whatever it looks like ("2024.csv", "null").
        overrides.append(f"data.source={json.dumps(args.data)}")
    if getattr(args, "resume", False):
        overrides.append("train.resume=true")
    return overrides


# What the lab needs beyond the layer's torch and numpy: the "lab" extra of the distribution.
_LAB_LIBRARIES = ("yaml", "tqdm", "matplotlib")


_PROFILE_EPILOG = """\
models: any of the variants in mos/lab/variants.py, e.g.
  --set "models=[backbone,stacked_backbone,gshard,dselect_k,expert_choice,mos,mos_no_short]"
options: profile.per_model gives a model its own options; profile.grid lists option sets tried
on profile.tuning_seeds, the best on validation is kept (configs/profile.yaml shows both).
resumable: a run whose configuration has not changed is read from <out_dir>/runs/ again, so an
interrupted profile continues where it stopped; --report-only trains nothing."""


_PREDICT_EPILOG = """\
columns: line (in the log), the user and item ids, the label where the log has one, score.
A row naming an item the model never saw is refused and counted in the report (stderr)."""


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    host_memory.use_huge_pages()        # before torch makes its first tensor
    args = build_parser().parse_args(argv)
    args.command_line = "python -m mos " + shlex.join(argv)
    try:
        return _command(args)
    except ModuleNotFoundError as err:
        if err.name not in _LAB_LIBRARIES:
            raise
        print(f"mos {args.command}: error: the command line needs the lab's libraries ({err.name} is not "
              f"installed): pip install 'mixture-of-sequence[lab]'", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    # Loaded after parsing: --help and argument errors need none of it.
    from mos.lab.checkpoint import CheckpointError
    from mos.lab.data.movielens import MovieLensUnavailable
    from mos.lab.errors import InputError

    try:
        if args.command == "predict":
            from mos.lab.predict import predict

            rows = predict(args.checkpoint, args.data, args.out, args.overrides)
            print(f"{rows} scores written to {args.out}", file=sys.stderr)
            return 0
        return _train_or_profile(args)
    except (InputError, CheckpointError) as err:
        print(f"mos {args.command}: error: {err}", file=sys.stderr)
        return 2
    except MovieLensUnavailable as err:   # no network or a changed download: the data, not the code
        print(f"mos {args.command}: error: MovieLens-100k is unavailable: {err}", file=sys.stderr)
        return 2


def _train_or_profile(args: argparse.Namespace) -> int:
    from mos.lab.config_io import dump_yaml, load_run_config

    profiling = args.command == "profile"
    if profiling:      # the profile's figures need matplotlib; training does not
        from mos.lab.profiling import profile, quick_overrides
    quick = quick_overrides() if profiling and args.quick else []
    overrides = quick + args.overrides + _flag_overrides(args)
    try:
        run_cfg = load_run_config(args.config, overrides)
    except (ValueError, TypeError, OSError) as err:
        print(f"mos {args.command}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(run_cfg), end="")
        return 0
    if not (profiling and args.report_only):
        # Before the data loads and a run trains: a file or an uncreatable place there would
        # otherwise fail only when the first result is written.
        out_dir = Path(run_cfg.train.out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"mos {args.command}: error: train.out_dir: expected a folder that can be created or exists, got "
                  f"{str(out_dir)!r} ({err.strerror or err})", file=sys.stderr)
            return 2
    if profiling:
        profile(run_cfg, report_only=args.report_only, jobs=args.jobs, tune=not args.no_tuning,
                command=args.command_line)
    else:
        from mos.lab.train import run

        run(run_cfg)
    return 0
