"""Loggers keep a resumed run whole: same W&B run id, CSV rows appended without duplicates."""

import csv

from ethos.loggers import CSVLogger, has_wandb_key, wandb_logger


def test_wandb_offline_without_key_and_same_run_id_on_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not has_wandb_key()
    first = wandb_logger(save_dir=str(tmp_path))
    second = wandb_logger(save_dir=str(tmp_path))
    assert first._offline
    assert first._wandb_init["id"] == second._wandb_init["id"] == (tmp_path / "wandb_id.txt").read_text()
    assert first._wandb_init["resume"] == "allow"
    other = wandb_logger(save_dir=str(tmp_path / "other"))
    assert other._wandb_init["id"] != first._wandb_init["id"]


def test_csv_logger_appends_on_resume_and_drops_redone_steps(tmp_path):
    first = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    first.log_metrics({"val/loss": 7.5}, step=5)
    first.save()
    # resumed from a checkpoint at step 4: steps 4 and 5 will be logged again
    second = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    second.drop_after(4)
    for step in range(4, 8):
        second.log_metrics({"train/loss": 20.0 + step}, step=step)
    second.save()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    train = [(int(r["step"]), float(r["train/loss"])) for r in rows if r["train/loss"]]
    assert train == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0), (4, 24.0), (5, 25.0), (6, 26.0), (7, 27.0)]
    assert not any(r.get("val/loss") for r in rows)  # the val row at step 5 belonged to the redone steps
