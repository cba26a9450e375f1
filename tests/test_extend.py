"""Resume details cluster runs hit: extending a finished run, the best checkpoint, resume=never."""

import pytest
import torch
from test_train import metrics

from conftest import compose
from ethos.study import train

BASE = ["debug=tiny", "logger=csv", "optim.schedule=linear", "optim.warmup=2", "optim.min_lr_ratio=0.1",
        "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "optim.lr=2e-3"]


def lrs(run_dir) -> dict[int, float]:
    m = metrics(run_dir)
    key = sorted(k for k in m if k.startswith("lr-"))[0]  # the decayed group's LR
    return dict(m[key])


@pytest.mark.slow
def test_extension_continues_the_schedule_and_best_is_ranked_by_its_step(cache_dir, tmp_path):
    train(compose(BASE + ["trainer.max_steps=8"], output_dir=tmp_path))
    first = lrs(tmp_path)
    train(compose(BASE + ["trainer.max_steps=16"], output_dir=tmp_path))  # the same run dir: resumes
    lr = lrs(tmp_path)
    assert sorted(lr) == list(range(16)) and all(lr[s] == first[s] for s in range(8))
    one_step = max(abs(first[s + 1] - first[s]) for s in range(2, 7))
    assert abs(lr[8] - lr[7]) <= one_step + 1e-12  # no jump at the extension
    after = [lr[s] for s in range(8, 16)]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    peak = max(lr.values())
    assert min(after) >= 0.1 * peak - 1e-12  # never below the floor

    best = next((tmp_path / "checkpoints").glob("best-step*.ckpt"))
    ckpt = torch.load(best, weights_only=True)
    history = ckpt["val_history"]  # (step, val/loss) of every validation up to this checkpoint
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["val_history"]
    fit = [(s, v) for s, v in final if s > 0]  # step 0 is the untrained baseline, before fit
    step, loss = min(fit, key=lambda sv: sv[1])
    assert ckpt["global_step"] == step and history[-1] == (step, loss)
    score = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))["best_model_score"]
    assert float(score) == loss


@pytest.mark.slow
def test_resume_never_starts_a_fresh_run(cache_dir, tmp_path):
    train(compose(BASE + ["trainer.max_steps=4", "logger=csv"], output_dir=tmp_path))
    train(compose(BASE + ["trainer.max_steps=3", "resume=never"], output_dir=tmp_path))
    steps = [s for s, _ in metrics(tmp_path)["train/loss"]]
    assert steps == [0, 1, 2]  # a new log, not appended to the previous run's
    previous = list((tmp_path / "previous").iterdir())
    assert len(previous) == 1 and (previous[0] / "csv" / "metrics.csv").is_file()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
