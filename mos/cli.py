"""The `mos` command line: `mos train [--config FILE] [--set key=value ...]`.

`main(argv)` returns the exit code instead of exiting, so tests call it directly. Config
mistakes end with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from mos.config_io import dump_yaml, load_run_config
from mos.train import run

_TRAIN_EPILOG = """\
precedence: built-in defaults < --config file < --set overrides (left to right).
--set values are YAML, so types come out right:
  --set train.seeds=[0,1,2] model.mos.num_themes=16 model.mos.capacity=null
  --set models=[mos] train.progress=bar
results: one JSON line per (model, seed) appended to <train.out_dir>/results.jsonl,
and a table of test AUC / GAUC / LogLoss (mean ± std over seeds) on stdout."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mos",
        description="Mixture-of-Sequence (MoS) for long-sequence CTR prediction: train and compare "
                    "the MoS model against its single-encoder backbone.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser(
        "train", help="train every model in `models` for every seed and print the comparison",
        description="Generate the data, train each model kind for each seed with early stopping\n"
                    "on validation AUC, and report test metrics.",
        epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", metavar="FILE", help="YAML config (e.g. configs/default.yaml)")
    train.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend",
                       default=[], help="override one dotted config key, e.g. train.lr=0.001")
    train.add_argument("--quiet", action="store_true", help="no per-epoch log lines (same as train.quiet=true)")
    train.add_argument("--print-config", action="store_true",
                       help="print the merged config as YAML and exit without training")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = args.overrides + (["train.quiet=true"] if args.quiet else [])
    try:
        run_cfg = load_run_config(args.config, overrides)
    except (ValueError, TypeError, OSError) as err:
        print(f"mos {args.command}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(run_cfg), end="")
        return 0
    run(run_cfg)
    return 0
