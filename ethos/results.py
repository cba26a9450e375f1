"""One table per study: `python -m ethos.results DIR [--group NAME]`, also written at the end of every multirun.

Every run dir under DIR (one with a config_resolved.yaml) becomes a row: its overrides, variant, parameter
counts, best and final validation loss, downstream accuracy when a fine-tune names it as its pretrained run,
tokens/s and status. Rows that differ only in `seed` form a group, reported as mean ± std over its finished
runs. Written beside the runs as results.csv (per run), results_groups.csv, results.md (both tables) and
val_curves.png (validation loss of every run, one colour per group); logged to W&B as tables when the runs
used W&B. A run that failed, was interrupted or cannot be read is a marked row, never an error.
"""

import argparse
import json
import math
import os
from pathlib import Path

from hydra.experimental.callback import Callback

from ethos.rundir import STATUS_FILE, run_dir_of

GROUP_BY_EXCLUDED = ("seed",)  # what varies within a group
NUMERIC = ["params_total", "params_non_embedding", "params_attention", "val_loss_best", "val_loss_final",
           "train_loss_final", "downstream_acc", "tokens_per_sec", "steps"]


def find_runs(root: Path) -> list[Path]:
    """Run dirs under root, not those set aside by resume=never (<run dir>/previous/...)."""
    found = {p.parent for name in ("config_resolved.yaml", STATUS_FILE) for p in root.rglob(name)}
    return sorted(d for d in found if "previous" not in d.relative_to(root).parts)


def _metrics(run_dir: Path):
    import pandas as pd

    path = run_dir / "csv" / "metrics.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def _last(df, key: str):
    col = df[key].dropna() if key in df else []
    return float(col.iloc[-1]) if len(col) else math.nan


def _overrides(run_dir: Path) -> tuple[list[str], dict]:
    """The run's command-line overrides (minus the run-dir exclusions, e.g. logger) and Hydra's group choices."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.exists():  # composed in-process (tests, notebooks): no Hydra record
        return [], {}
    hydra = OmegaConf.load(path).hydra
    excluded = set(hydra.job.config.override_dirname.exclude_keys)
    task = [o for o in hydra.overrides.task if o.split("=", 1)[0].lstrip("+~") not in excluded]
    return task, OmegaConf.to_container(hydra.runtime.choices)


def run_row(run_dir: Path, root: Path) -> dict:
    from omegaconf import OmegaConf

    row = {"run": str(run_dir.relative_to(root)) or ".", "status": "unknown"}
    try:
        overrides, choices = _overrides(run_dir)
        resolved = run_dir / "config_resolved.yaml"  # absent when the job failed before training
        cfg = OmegaConf.load(resolved) if resolved.exists() else OmegaConf.create({"model": {"attn": {}}})
        row["overrides"] = " ".join(overrides)  # as typed: values may hold commas ([0.9,0.95])
        row["variant"] = choices.get("model") or str(cfg.model.attn.get("_target_", "")).rsplit(".", 1)[-1].lower()
        row["seed"] = cfg.get("seed")
        row["task"] = choices.get("task") or ""
        row["pretrained"] = str(cfg.get("pretrained") or "")
        hparams = run_dir / "csv" / "hparams.yaml"
        params = OmegaConf.to_container(OmegaConf.load(hparams)) if hparams.exists() else {}
        for key in ("total", "non_embedding", "attention"):
            row[f"params_{key}"] = params.get(f"params/{key}", math.nan)
        df = _metrics(run_dir)
        val = df["val/loss"].dropna() if "val/loss" in df else []
        row["val_loss_best"] = float(val.min()) if len(val) else math.nan
        row["val_loss_final"] = _last(df, "val/loss")
        row["train_loss_final"] = _last(df, "train/loss")
        row["val_acc_best"] = float(df["val/acc"].max()) if "val/acc" in df and df["val/acc"].notna().any() \
            else math.nan
        rate = df["perf/tokens_per_sec"].dropna() if "perf/tokens_per_sec" in df else []
        row["tokens_per_sec"] = float(rate.mean()) if len(rate) else math.nan
        row["steps"] = int(df["step"].max()) + 1 if "step" in df and len(df) else 0
        status = run_dir / STATUS_FILE
        if status.exists():
            record = json.loads(status.read_text())
            row["status"], row["error"], row["multirun"] = record["status"], record.get("error"), record.get("group")
    except Exception as e:  # a broken run dir is a row saying so, not the end of the table
        row["status"], row["error"] = "unreadable", f"{type(e).__name__}: {e}"
    return row


def gather(root: Path, group: str | None = None):
    """The per-run table (a pandas DataFrame); `group`: only the runs of that multirun (status.json)."""
    import pandas as pd
    from tqdm.auto import tqdm

    rows = [run_row(d, root) for d in tqdm(find_runs(root), desc="runs", unit="run", disable=None)]
    df = pd.DataFrame(rows)
    for col in ("run", "status", "seed", "overrides", "group", "variant", "task", "pretrained", "error", "multirun",
                "val_acc_best", *NUMERIC):  # an empty dir still gives (empty) tables
        if col not in df:
            df[col] = math.nan if col in (*NUMERIC, "val_acc_best") else ""
    if group is not None and len(df):
        df = df[df["multirun"] == group].reset_index(drop=True)
    # a group is named by what varies between the runs (but the seed); what all share would only repeat
    overrides = [dict(o.split("=", 1) for o in str(r).split() if "=" in o) if r == r else {}
                 for r in df["overrides"]]
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1 and k not in GROUP_BY_EXCLUDED]
    df["group"] = [",".join(f"{k}={o[k]}" for k in varying if k in o) or "(all)" for o in overrides]
    # downstream: a fine-tune's accuracy belongs to the row of the run it started from
    row_of = {(root / r).resolve(): i for i, r in df["run"].items()}
    df["downstream_acc"] = math.nan
    nested = []
    for j, ft in df[df["pretrained"].astype(str) != ""].iterrows():
        source = run_dir_of(ft["pretrained"]).resolve()
        i = row_of.get(source)
        if i is not None:
            df.loc[i, "downstream_acc"] = ft["val_acc_best"]
            if (root / ft["run"]).resolve().is_relative_to(source):  # finetune_after: part of its run's row
                nested.append(j)
    return df.drop(index=nested).reset_index(drop=True)


def summarize(df):
    """Per group (all overrides but the seed): run counts by status, then mean and std of each number over the
    finished runs."""
    import pandas as pd

    if not len(df):
        return pd.DataFrame()
    done = df[df["status"] == "done"]
    counts = df.groupby("group", dropna=False)["status"].agg(runs="size", done=lambda s: int((s == "done").sum()))
    stats = done.groupby("group", dropna=False)[NUMERIC].agg(["mean", "std"])
    stats.columns = [f"{k}_{s}" for k, s in stats.columns]
    variant = df.groupby("group", dropna=False)["variant"].first()
    return pd.concat([variant, counts, stats], axis=1).reset_index()


def _pm(mean: float, std: float) -> str:
    if mean != mean:  # nan
        return ""
    digits = 0 if abs(mean) >= 1000 else 4
    return f"{mean:.{digits}f}" + ("" if std != std else f" ± {std:.{digits}f}")


def markdown(df, groups) -> str:
    per_run = df[["group", "variant", "seed", "status", "params_total", "params_non_embedding", "params_attention",
                  "val_loss_best", "val_loss_final", "downstream_acc", "tokens_per_sec", "error"]]
    lines = ["# Results", "", f"{len(df)} runs, {int((df['status'] == 'done').sum())} done.", "",
             "## Per group (mean ± std over seeds, finished runs)", ""]
    if len(groups):
        table = groups[["group", "variant", "runs", "done"]].copy()
        for key in ("params_total", "val_loss_best", "val_loss_final", "downstream_acc", "tokens_per_sec"):
            table[key] = [_pm(m, s) for m, s in zip(groups[f"{key}_mean"], groups[f"{key}_std"])]
        lines.append(table.to_markdown(index=False))
    per_run = per_run.sort_values(["group", "seed"], na_position="last")
    per_run = per_run.astype(object).where(per_run.notna(), None)  # blank cells, not "nan"
    lines += ["", "## Per run", "", per_run.to_markdown(index=False, floatfmt=".4g", missingval=""), ""]
    return "\n".join(lines)


def plot_curves(df, root: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {g: plt.cm.tab10(i % 10) for i, g in enumerate(sorted(df["group"].astype(str).unique()))}
    labelled = set()
    for _, row in df.iterrows():
        m = _metrics(root / row["run"]) if row["status"] != "unreadable" else None
        if m is None or "val/loss" not in m:
            continue
        val = m[["step", "val/loss"]].dropna()
        group = str(row["group"])
        ax.plot(val["step"], val["val/loss"], color=colours[group], alpha=0.8,
                linestyle="-" if row["status"] == "done" else ":", marker=".",
                label=None if group in labelled else (group or "(no overrides)"))
        labelled.add(group)
    ax.set_xlabel("step")
    ax.set_ylabel("val/loss")
    ax.set_title("validation loss per run (dotted: not finished)")
    if labelled:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_wandb(df, groups, root: Path, group: str | None) -> None:
    import wandb

    from ethos.loggers import has_wandb_key

    mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")
    where = root / ".results"  # hidden: the sweep dir lists run dirs only
    where.mkdir(exist_ok=True)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ethos"), group=group, name="results",
                     job_type="results", dir=str(where), mode=mode, reinit="finish_previous")
    run.log({"results/runs": wandb.Table(dataframe=df.astype(str)),
             "results/groups": wandb.Table(dataframe=groups.astype(str))})
    run.finish()


def write_results(root: Path, group: str | None = None, use_wandb: bool | None = None):
    """Write the tables and plot into root; returns (per-run, per-group) DataFrames."""
    from omegaconf import OmegaConf

    root = Path(root)
    df = gather(root, group)
    groups = summarize(df)
    df.to_csv(root / "results.csv", index=False)
    groups.to_csv(root / "results_groups.csv", index=False)
    (root / "results.md").write_text(markdown(df, groups))
    plot_curves(df, root, root / "val_curves.png")
    if use_wandb is None:  # as the runs did: any of them logged to W&B
        use_wandb = any("wandb" in (OmegaConf.load(root / r / "config_resolved.yaml").get("logger") or {})
                        for r in df["run"] if (root / r / "config_resolved.yaml").exists())
    if use_wandb and os.environ.get("WANDB_MODE") != "disabled":
        log_to_wandb(df, groups, root, group)
    return df, groups


class WriteResults(Callback):
    """Hydra callback (ethos/conf/hydra/default.yaml): the table of a multirun's own runs when it ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        import logging

        group = os.environ.get("ETHOS_GROUP")
        try:
            for sweep in sweep_dirs(config, group):
                write_results(sweep, group=group)
                logging.getLogger(__name__).info(f"results: {sweep / 'results.md'}")
        except Exception:  # the runs are done and saved; a table that fails must not fail the multirun
            logging.getLogger(__name__).exception("results table not written")


def sweep_dirs(config, group: str | None) -> list[Path]:
    """Where this multirun's runs are. The sweep dir is per job (outputs/<task_name>/multiruns): a swept
    experiment sets its own task_name, so the runs may not be where the multirun's own config says. Found by
    their status.json (its group), else the configured dir."""
    own = Path(config.hydra.sweep.dir)
    found = set()
    for pattern, root in (("*/status.json", own), ("*/multiruns/*/status.json", Path(config.paths.log_dir))):
        for status in root.glob(pattern) if root.is_dir() else []:
            try:
                if json.loads(status.read_text()).get("group") == group:
                    found.add(status.parent.parent)
            except (OSError, ValueError):  # a job writing it right now, or a broken one: its dir is found by others
                continue
    return sorted(found) or [own]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ethos.results", description=__doc__.splitlines()[0])
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
