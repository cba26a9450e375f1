"""End-to-end training: the loss falls, resuming continues exactly, interruption loses nothing."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_same_training_state, compose, run_cli
from ethos.study import train

TINY = ["debug=tiny", "logger=csv"]


def metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k not in ("step", "epoch") and v:
                    out.setdefault(k, []).append((int(row["step"]), float(v)))
    return out


@pytest.mark.slow
def test_short_run_loss_falls(cache_dir, tmp_path):
    cfg = compose(TINY + ["trainer.max_steps=60", "trainer.val_check_interval=20", "optim.lr=2e-3"],
                  output_dir=tmp_path)
    final = train(cfg)
    m = metrics(tmp_path)
    val = [v for _, v in m["val/loss"]]
    train_loss = [v for _, v in m["train/loss"]]
    assert len(val) == 4 and val[-1] < val[1] - 0.3 < val[0], val  # val[0]: untrained, step 0
    assert m["val/loss"][0][0] == 0
    assert train_loss[-1] < train_loss[0] - 1.0, train_loss
    assert final == pytest.approx(val[-1])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert any((tmp_path / "checkpoints").glob("best-step*.ckpt"))
    assert (tmp_path / "config_resolved.yaml").is_file()


def resume_cfg(out: Path, steps: int, extra: tuple[str, ...] = ()):
    return compose(TINY + [f"trainer.max_steps={steps}", "trainer.val_check_interval=4",
                           "callbacks.checkpoint.every_n_train_steps=4", "optim.schedule=constant",
                           "optim.warmup=0", *extra], output_dir=out)


@pytest.mark.slow
def test_resume_continues_with_identical_state(cache_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(resume_cfg(straight, 10))
    train(resume_cfg(split, 6))  # stops at 6 ...
    first = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 6
    train(resume_cfg(split, 10))  # ... and the same command with more steps resumes there
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == 10
    assert_same_training_state(a, split / "checkpoints" / "last.ckpt")
    steps = [s for s, _ in metrics(split)["train/loss"]]
    assert len(steps) == len(set(steps)) == 10  # no step logged twice or missing
    assert (split / "wandb_id.txt").exists() is False  # csv logger: no W&B state written


@pytest.mark.slow
def test_moe_resume_continues_the_balancing_bias(cache_dir, tmp_path):
    """model=moe stopped and resumed: weights, optimizer state and the bias (a buffer, updated outside the
    gradient) equal an uninterrupted run's."""
    moe = ("model=moe", "model.ffn.num_experts=8", "model.ffn.top_k=2", "model.ffn.d_expert=32",
           "model.ffn.bias_rate=0.01")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(resume_cfg(straight, 10, moe))
    train(resume_cfg(split, 6, moe))
    train(resume_cfg(split, 10, moe))
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert_same_training_state(a, split / "checkpoints" / "last.ckpt")
    biases = [k for k in a["state_dict"] if k.endswith(".ffn.bias")]
    assert biases and all(a["state_dict"][k].abs().sum() > 0 for k in biases)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in biases)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interrupt_saves_and_same_command_resumes(cache_dir, tmp_path):
    common = [sys.executable, str(ROOT / "train.py"), *TINY, "callbacks.checkpoint.every_n_train_steps=5",
              f"paths.log_dir={tmp_path}"]
    args = common + ["trainer.max_steps=100000"]
    name = "callbacks.checkpoint.every_n_train_steps=5,debug=tiny,trainer.max_steps=100000"
    run_dir = tmp_path / "train" / "runs" / name
    log = open(tmp_path / "log.txt", "w")  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 200
        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "log.txt").read_text()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    stopped = ckpt["global_step"]
    assert 5 <= stopped < 100000, out
    assert "re-run the same command to resume" in out
    # the same command resumes from the saved step (max_steps lowered so the test stays short)
    res = subprocess.run(common + [f"trainer.max_steps={stopped + 3}", f"run_name='{run_dir.name}'"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stdout + res.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stopped + 3


@pytest.mark.slow
def test_multirun_goes_on_after_a_failed_job(cache_dir, tmp_path):
    res = run_cli(["-m", *TINY, "trainer.max_steps=3", "model.n_heads=7,4", f"paths.log_dir={tmp_path}"],
                  cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "model.n_heads=7: must divide" in res.stderr
    runs = tmp_path / "train" / "multiruns"
    good = runs / "debug=tiny,model.n_heads=4,trainer.max_steps=3"
    assert torch.load(good / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (runs / "debug=tiny,model.n_heads=7,trainer.max_steps=3" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("objective", [("task=mixture", "task.n_sentinels=20", "task.prefix_loss=mlm"),
                                       ("task=seq2seq", "task.encoder_layers=1")], ids=["mixture", "seq2seq"])
def test_prompt_objectives_resume_exactly(cache_dir, tmp_path, objective):
    """The prompt objectives' layouts are drawn per sample from (seed, micro-batch, position): a run stopped and
    resumed lays out the same batches and ends in the uninterrupted run's state (docs/design.md §12.2)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(resume_cfg(straight, 10, ("model=mha", *objective)))
    train(resume_cfg(split, 6, ("model=mha", *objective)))
    train(resume_cfg(split, 10, ("model=mha", *objective)))
    assert_same_training_state(straight / "checkpoints" / "last.ckpt", split / "checkpoints" / "last.ckpt")
