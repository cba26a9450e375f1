"""`python -m ethos.results DIR [--group NAME] [--wandb]`: the results table of the run dirs under DIR."""

import argparse
from pathlib import Path

from ethos.results import __doc__ as about
from ethos.results import write_results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ethos.results", description=about.splitlines()[0])
    p.add_argument("dir", type=Path, help="a directory of run dirs (e.g. logs/train/multiruns)")
    p.add_argument("--group", help="only the runs of this multirun (its W&B group / ETHOS_GROUP)")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                   help="log the tables to W&B (default: when the runs used W&B)")
    args = p.parse_args(argv)
    if not args.dir.is_dir():
        p.error(f"dir={args.dir}: not a directory")
    df, _ = write_results(args.dir, args.group, args.wandb)
    print(f"{len(df)} runs -> {args.dir / 'results.md'}, results.csv, results_groups.csv, val_curves.png")


if __name__ == "__main__":
    main()
