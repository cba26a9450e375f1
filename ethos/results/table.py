"""The results table: every run dir under a directory becomes a row (its overrides, variant, parameter counts total
and active per token, best and final validation loss and bits per byte, downstream accuracy, tokens/s, peak memory,
expert-layer balance, the prompt probes where measured, status); runs that differ only in `seed` form a group,
reported as mean ± std over its finished runs; both as Markdown."""

import math
from pathlib import Path

from omegaconf import OmegaConf

from ethos.results.groups import describe, parse_line
from ethos.rundir import STATUS_FILE, read_status_record, run_dir_of

NUMERIC = ["params_total", "params_active", "params_non_embedding", "params_attention", "val_loss_best",
           "val_loss_final", "val_bpb_best", "val_bpb_final", "train_loss_final", "downstream_acc", "tokens_per_sec",
           "peak_memory_gib", "expert_usage", "max_load", "steps", "prompt_bpb", "prompt_help_bpb", "probe_acc"]
# the prompt-encoding probes (ethos/callbacks/prompts.py): columns of the Markdown tables where a run has them
PROMPTS = {"prompt_bpb": "prompts/bpb_with_prompt", "prompt_help_bpb": "prompts/help_bpb",
           "probe_acc": "prompts/probe_acc"}


def find_runs(root: Path) -> list[Path]:
    """Run dirs under root, not those set aside by resume=never (<run dir>/previous/...)."""
    found = {p.parent for name in ("config_resolved.yaml", STATUS_FILE) for p in root.rglob(name)}
    return sorted(d for d in found if "previous" not in d.relative_to(root).parts)


def metrics(run_dir: Path):
    """<run dir>/csv/metrics.csv as a DataFrame (empty when there is none)."""
    import pandas as pd  # a second's import: when a table is made, not when Hydra loads the callback

    path = run_dir / "csv" / "metrics.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def _last(df, key: str):
    col = df[key].dropna() if key in df else []
    return float(col.iloc[-1]) if len(col) else math.nan


def run_overrides(run_dir: Path) -> tuple[list[str] | None, dict]:
    """The run's command-line overrides as Hydra recorded them (minus the run-dir exclusions, e.g. logger) and
    its group choices; None for a run composed in-process (tests, notebooks, a fine-tune): no Hydra record."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.exists():
        return None, {}
    hydra = OmegaConf.load(path).hydra
    excluded = set(hydra.job.config.override_dirname.exclude_keys)
    # as written: a typed +key=${other} is text here, not an interpolation of hydra.yaml; excluded as Hydra
    # excludes them from the run dir's name, by key without its @package
    task = [line for line in OmegaConf.to_container(hydra.overrides.task)
            if parse_line(line)[0].split("@")[0] not in excluded]
    return task, OmegaConf.to_container(hydra.runtime.choices)


def run_row(run_dir: Path, root: Path) -> dict:
    row = {"run": str(run_dir.relative_to(root)) or ".", "status": "unknown", "overrides": None}
    try:
        row["overrides"], choices = run_overrides(run_dir)
        resolved = run_dir / "config_resolved.yaml"  # absent when the job failed before training
        cfg = OmegaConf.load(resolved) if resolved.exists() else OmegaConf.create({"model": {"attn": {}}})
        row["variant"] = choices.get("model") or str(cfg.model.attn.get("_target_", "")).rsplit(".", 1)[-1].lower()
        row["seed"] = cfg.get("seed")
        row["task"] = choices.get("task") or ""
        row["pretrained"] = str(cfg.get("pretrained") or "")
        hparams = run_dir / "csv" / "hparams.yaml"
        params = OmegaConf.to_container(OmegaConf.load(hparams)) if hparams.exists() else {}
        for key in ("total", "active", "non_embedding", "attention"):
            row[f"params_{key}"] = params.get(f"params/{key}", math.nan)
        df = metrics(run_dir)
        for key in ("loss", "bpb"):  # bits per byte: the loss in a unit no tokenizer changes (language models)
            val = df[f"val/{key}"].dropna() if f"val/{key}" in df else []
            row[f"val_{key}_best"] = float(val.min()) if len(val) else math.nan
            row[f"val_{key}_final"] = _last(df, f"val/{key}")
        row["train_loss_final"] = _last(df, "train/loss")
        row["val_acc_best"] = float(df["val/acc"].max()) if "val/acc" in df and df["val/acc"].notna().any() \
            else math.nan
        rate = df["perf/tokens_per_sec"].dropna() if "perf/tokens_per_sec" in df else []
        row["tokens_per_sec"] = float(rate.mean()) if len(rate) else math.nan
        row["peak_memory_gib"] = float(df["perf/peak_memory_gib"].max()) if "perf/peak_memory_gib" in df else math.nan
        for stat in ("expert_usage", "max_load"):  # expert layers: the last logged value, mean over layers
            values = [_last(df, c) for c in df if c.startswith("experts/") and c.endswith(f"/{stat}")]
            row[stat] = sum(values) / len(values) if values else math.nan
        row["steps"] = int(df["step"].max()) + 1 if "step" in df and len(df) else 0
        for col, key in PROMPTS.items():  # the last measurement: the model the run ends with
            row[col] = _last(df, key)
        record = read_status_record(run_dir)
        if record is not None:
            row["status"] = record.get("status") or "unknown"
            row["error"], row["multirun"] = record.get("error"), record.get("group")
        elif (run_dir / STATUS_FILE).exists():
            row["status"], row["error"] = "unreadable", f"{STATUS_FILE}: not a JSON record"
    except Exception as e:  # a broken run dir is a row saying so, not the end of the table
        row["status"], row["error"] = "unreadable", f"{type(e).__name__}: {e}"
    return row


def gather(root: Path, group: str | None = None):
    """The per-run table (a pandas DataFrame); `group`: only the runs of that multirun (status.json). Its
    `overrides` are each run's list as Hydra recorded them (None: no record), its `group` names the run's group
    by what differs between groups (a run without a record: by its run dir)."""
    import pandas as pd  # a second's import: when a table is made, not when Hydra loads the callback
    from tqdm.auto import tqdm  # probes for a notebook when imported: likewise

    root = Path(root)
    rows = [run_row(d, root) for d in tqdm(find_runs(root), desc="runs", unit="run", disable=None)]
    df = pd.DataFrame(rows)
    for col in ("run", "status", "seed", "overrides", "group", "variant", "task", "pretrained", "error", "multirun",
                "val_acc_best", *NUMERIC):  # an empty dir still gives (empty) tables
        if col not in df:
            df[col] = math.nan if col in (*NUMERIC, "val_acc_best") else ""
    if group is not None and len(df):
        df = df[df["multirun"] == group].reset_index(drop=True)
    df = _downstream(df, root)
    names, _ = describe(list(df["overrides"]))
    df["group"] = [name if name is not None else run for name, run in zip(names, df["run"])]
    return df


def _downstream(df, root: Path):
    """A fine-tune's accuracy belongs to the row of the run it started from; one run by finetune_after (in
    <run dir>/finetune/) is part of its run's row, not a row of its own."""
    row_of = {(root / r).resolve(): i for i, r in df["run"].items()}
    df["downstream_acc"] = math.nan
    nested = []
    for j, ft in df[df["pretrained"].fillna("").astype(str) != ""].iterrows():
        source = run_dir_of(ft["pretrained"]).resolve()
        i = row_of.get(source)
        if i is not None:
            df.loc[i, "downstream_acc"] = ft["val_acc_best"]
            if (root / ft["run"]).resolve().is_relative_to(source):
                nested.append(j)
    return df.drop(index=nested).reset_index(drop=True)


def shared_overrides(df) -> list[str]:
    """The overrides every run of the table has alike (as written): what its group names leave out."""
    return describe(list(df["overrides"]))[1] if len(df) else []


def summarize(df):
    """Per group (all overrides but the seed): run counts by status, then mean and std of each number over the
    finished runs."""
    import pandas as pd  # a second's import: when a table is made, not when Hydra loads the callback

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


def prompt_columns(df) -> list[str]:
    """The prompt probes' columns, where some run measured them."""
    return [c for c in PROMPTS if c in df and df[c].notna().any()]


def markdown(df, groups) -> str:
    """results.md: what every run shares, once; then the groups and the runs, each named by what differs."""
    shared = shared_overrides(df)
    lines = ["# Results", "", f"{len(df)} runs, {int((df['status'] == 'done').sum())} done.", ""]
    if shared:
        lines += ["Every run has these overrides; the groups below are named by the others:", "",
                  *(f"- `{o}`" for o in shared), ""]
    lines += ["## Per group (mean ± std over seeds, finished runs)", ""]
    if len(groups):
        table = groups[["group", "variant", "runs", "done"]].copy()
        for key in ("params_total", "params_active", "val_loss_best", "val_loss_final", "val_bpb_best",
                    "val_bpb_final", "downstream_acc", "tokens_per_sec", "peak_memory_gib", "expert_usage", "max_load",
                    *prompt_columns(df)):
            table[key] = [_pm(m, s) for m, s in zip(groups[f"{key}_mean"], groups[f"{key}_std"])]
        lines.append(table.to_markdown(index=False))
    per_run = df[["group", "variant", "seed", "status", "params_total", "params_active", "params_non_embedding",
                  "params_attention", "val_loss_best", "val_loss_final", "val_bpb_best", "val_bpb_final",
                  "downstream_acc", "tokens_per_sec", "peak_memory_gib", "expert_usage", "max_load",
                  *prompt_columns(df), "error"]]
    per_run = per_run.sort_values(["group", "seed"], na_position="last")
    per_run = per_run.astype(object).where(per_run.notna(), None)  # blank cells, not "nan"
    lines += ["", "## Per run", "", per_run.to_markdown(index=False, floatfmt=".4g", missingval=""), ""]
    return "\n".join(lines)
