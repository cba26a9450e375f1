"""Data parallel on CPU (gloo): 2 processes with micro-batch m train as 1 process with 2m, masks differ by
rank but not by world size, and a 2-process run stopped by a signal resumes to the same state."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from conftest import ROOT, assert_same_training_state, compose
from ethos.data.collate import MLMCollator
from ethos.data.packing import Blocks, pack
from ethos.data.sampling import EvalBatchSampler, Indexed, StepBatchSampler
from ethos.data.streaming import StreamBlocks
from ethos.data.tokenizer import train_tokenizer
from ethos.fit import in_batches
from ethos.study import train

STEPS = 6
# MLM masks ~15% of each row, so the ranks count different numbers of targets: the weights match only if each
# rank's loss is weighted by its share of the global count (LanguageModel.training_step)
COMMON = ["debug=tiny", "logger=csv", "model.dropout=0", "validate_first=false",
          f"trainer.val_check_interval={STEPS}", "callbacks.checkpoint.every_n_train_steps=2",
          "optim.schedule=constant", "optim.warmup=0", "print_config=false", "trainer.precision=32-true"]
TWO = ["trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=8"]


def run_ddp(tmp: Path, name: str, steps: int, extra=(), objective="clm", strategy="ddp") -> subprocess.CompletedProcess:
    """train.py with 2 processes (trainer=ddp or fsdp): rank 0 re-runs the command for rank 1 (same run dir)."""
    args = [sys.executable, str(ROOT / "train.py"), *COMMON, f"task={objective}", f"trainer={strategy}", *TWO,
            f"trainer.max_steps={steps}",
            f"paths.log_dir={tmp}", f"run_name={name}", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def ckpt(run_dir: Path) -> dict:
    """The latest last*.ckpt: after a stop, ModelCheckpoint versions its own (last-v1.ckpt) beside GracefulStop's."""
    found = [torch.load(f, weights_only=True) for f in (run_dir / "checkpoints").glob("last*.ckpt")]
    return max(found, key=lambda c: c["global_step"])


def straight(tmp_path_factory, objective: str, strategy: str = "ddp") -> Path:
    tmp = tmp_path_factory.mktemp(f"{strategy}_{objective}")
    res = run_ddp(tmp, "straight", STEPS, objective=objective, strategy=strategy)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "train" / "runs" / "straight"


@pytest.fixture(scope="module")
def ddp_run(cache_dir, tmp_path_factory) -> Path:
    return straight(tmp_path_factory, "clm")


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(v) for row in csv.DictReader(f) if (v := row["train/loss"])]


def one_process(out: Path, objective: str, steps: int = STEPS, extra=()) -> Path:
    train(compose(COMMON + [f"task={objective}", "trainer=cpu", "data.batch_size=16",
                            f"trainer.max_steps={steps}", *extra], output_dir=out))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,objective", [("ddp", "clm"), ("ddp", "mlm"), ("fsdp", "mlm")])
def test_two_processes_train_as_one_with_the_global_batch(strategy, objective, ddp_run, cache_dir,
                                                          tmp_path_factory):
    # fsdp (FSDP2 on gloo) shards every parameter and AdamW state between the 2 processes; MLM's head runs
    # outside the encoder's forward, on the root unit's gathered embedding
    ddp = ddp_run if (strategy, objective) == ("ddp", "clm") else straight(tmp_path_factory, objective, strategy)
    one = one_process(tmp_path_factory.mktemp(f"one_{objective}"), objective)
    # all-reduce (and FSDP's reduce-scatter) sum in another order
    assert_same_training_state(ckpt(one), ckpt(ddp), rtol=1e-4, atol=1e-6,
                               opt_atol=1e-8 if strategy == "ddp" else 1e-7)
    # the logged loss is the global batch's, not rank 0's
    assert train_losses(ddp) == pytest.approx(train_losses(one), rel=1e-5)
    assert "trainer/effective_batch_size: 16" in (ddp / "csv" / "hparams.yaml").read_text()
    with open(ddp / "csv" / "metrics.csv") as f:
        logged = [v for row in csv.DictReader(f) if (v := row["trainer/effective_batch_size"])]
    assert logged == ["16"]


def stop_after(step: int) -> list[str]:
    """SIGINT to every rank in the training step after optimizer step `step` (slurm_cluster.SignalAt)."""
    return ["+callbacks.stopper._target_=slurm_cluster.SignalAt", f"+callbacks.stopper.step={step}",
            "+callbacks.stopper.signal_name=SIGINT", "+callbacks.stopper.training=true"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_process_run_stopped_by_a_signal_resumes_exactly(ddp_run, tmp_path):
    stop = stop_after(2)
    res = run_ddp(tmp_path, "split", STEPS, stop)
    assert res.returncode != 0, res.stderr[-3000:]  # stopped, not finished
    run_dir = tmp_path / "train" / "runs" / "split"
    assert ckpt(run_dir)["global_step"] == 3  # GracefulStop saves after the step that saw the signal
    res = run_ddp(tmp_path, "split", STEPS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout + res.stderr
    assert_same_training_state(ckpt(ddp_run), ckpt(run_dir), rtol=1e-6, atol=1e-7, opt_atol=1e-9)


# -- masks: a pure function of (seed, micro-batch, position in the global batch) ---------------------------
@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    from test_text_data import sentences

    tok = train_tokenizer(sentences(500), 90, tmp_path_factory.mktemp("tok"))
    rows, _ = pack(Dataset.from_dict({"text": sentences(400)}), tok, 16)
    return tok, rows


def batches(tok, rows, bs: int, rank: int = 0, world: int = 1, n: int = 12) -> list[dict]:
    sampler = StepBatchSampler(len(rows), bs, n, seed=5, rank=rank, world_size=world)
    ds, collate = Indexed(rows), MLMCollator(tok, seed=1, seq_len=16)
    return [collate([ds[k] for k in keys]) for keys in sampler]


def test_ranks_mask_differently_and_together_mask_as_one_process(blocks):
    tok, rows = blocks
    one = batches(tok, rows, 8)
    r0, r1 = batches(tok, rows, 4, 0, 2), batches(tok, rows, 4, 1, 2)
    for g, a, b in zip(one, r0, r1):
        for k in g:
            assert torch.equal(g[k], torch.cat([a[k], b[k]])), k
    # packed rows share their layout ([CLS] + full block): masks seeded by the micro-batch alone would put
    # the two ranks' masks at the same positions
    masked = [torch.stack([x["labels"] != -100 for x in r]) for r in (r0, r1)]
    assert not torch.equal(*masked)


def test_streaming_rows_take_their_rank_positions(blocks):
    tok, rows = blocks
    docs = Dataset.from_dict({"text": ["the cat sees the dog ."] * 64}).to_iterable_dataset()
    seen = []
    for rank in (0, 1):
        ds = StreamBlocks(docs, Blocks(tok, 16), lambda items: items, batch_size=4, total=2, rank=rank)
        seen.append([[(it["batch_idx"], it["batch_pos"]) for it in batch] for batch in ds])
    assert seen[0][1] == [(1, p) for p in range(4)] and seen[1][1] == [(1, p) for p in range(4, 8)]


def test_eval_masks_depend_on_the_sample_alone():
    keys = [k for batch in EvalBatchSampler(10, 3, rank=1, world_size=2) for k in batch]
    assert keys == [(EvalBatchSampler.OFFSET, i, i) for i in range(1, 10, 2)]


def test_val_check_interval_counts_optimizer_steps():
    cfg = compose(["trainer.accumulate_grad_batches=4", "trainer.val_check_interval=5"]).trainer
    assert in_batches(cfg) == {"val_check_interval": 20}  # Lightning counts micro-batches
    assert in_batches(compose(["trainer.val_check_interval=0.5"]).trainer) == {}  # a fraction: no unit


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_moves_between_one_process_and_fsdp(cache_dir, tmp_path):
    """Checkpoints have one format whatever the strategy: a run started on 1 process, continued on 2 FSDP
    processes (stopped there by a signal), and finished on 1 process again ends as if it had run on 1 process
    throughout, AdamW state on the right parameters. (Lightning's own FSDP checkpoints key AdamW state by
    position in module.parameters(): a one-process checkpoint would load onto the wrong parameters.)"""
    run_dir = tmp_path / "train" / "runs" / "moved"
    one_process(run_dir, "mlm", steps=3)
    stop = stop_after(4)
    res = run_ddp(tmp_path, "moved", STEPS, stop, objective="mlm", strategy="fsdp")
    assert res.returncode != 0 and "resuming from" in res.stdout + res.stderr, res.stderr[-3000:]
    assert ckpt(run_dir)["global_step"] == 5
    one_process(run_dir, "mlm")  # the same run dir: resumes from its last.ckpt
    assert_same_training_state(ckpt(one_process(tmp_path / "one", "mlm")), ckpt(run_dir), rtol=1e-4, atol=1e-6,
                               opt_atol=1e-7)


@pytest.mark.slow
def test_attention_stats_over_two_processes(ddp_run):
    """Each rank measures the first rows of its own first validation batch; the run logs the mean of the ranks'
    averages and the largest of their max_activation. Checked against `measure` on each rank's rows, in one
    process, with the weights of the step (its checkpoint)."""
    from types import SimpleNamespace

    from ethos.callbacks.attention_stats import measure
    from ethos.config import instantiate
    from ethos.data.tokenizer import special_ids
    from ethos.pretrained import load_task

    cfg = compose(COMMON + ["task=clm", "trainer=ddp", *TWO, f"trainer.max_steps={STEPS}"])
    rows = cfg.callbacks.attention_stats.batch_size
    task, _ = load_task(ddp_run / "checkpoints" / "last.ckpt")
    per_rank = []
    for rank in range(2):
        dm = instantiate(cfg.data)
        dm.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, max_steps=STEPS, global_rank=rank,
                                     world_size=2, lightning_module=task)  # the task picks the collator (CLM)
        dm.prepare_data()
        dm.setup("fit")
        batch = {k: v[:rows] for k, v in next(iter(dm.val_dataloader())).items() if isinstance(v, torch.Tensor)}
        per_rank.append(measure(task, batch, special_ids(dm.tokenizer)[1]))
    assert per_rank[0] != per_rank[1]  # the ranks saw different rows
    with open(ddp_run / "csv" / "metrics.csv") as f:
        (logged,) = [r for r in csv.DictReader(f) if r.get("artifacts/layer0/entropy")]
    assert logged["val/loss"]  # the one validation, at the end: the weights of the last checkpoint
    for key in per_rank[0]:
        reduce = max if key.endswith("/max_activation") else (lambda a, b: (a + b) / 2)
        assert float(logged[key]) == pytest.approx(reduce(per_rank[0][key], per_rank[1][key]), rel=1e-4), key


@pytest.mark.slow
def test_rank_callback_gathers_sharded_weights(tmp_path):
    """Under FSDP2 every rank gathers each layer's attention weights together and rank 0 measures them: the
    logged ranks at the last step equal those of the matrices built from the checkpoint (test_ranks.expected)."""
    from test_ranks import expected
    from test_train import metrics

    from ethos.pretrained import load_task

    res = run_ddp(tmp_path, "ranks", STEPS, ["callbacks.ranks.every_n_steps=3"], objective="mlm", strategy="fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "train" / "runs" / "ranks"
    m = metrics(run)
    state = ckpt(run)
    assert state["global_step"] == STEPS
    want = expected(state["state_dict"], load_task(run)[0].model.trunk.blocks)
    for key, value in want.items():
        assert [s for s, _ in m[key]] == [0, 3, 6], key
        assert m[key][-1][1] == value, key


# The standard MoE (ethos/models/moe/routed.py): experts replicated on every process; the balancing bias moves
# by the loads summed over both processes, so it takes the one-process run's values exactly
MOE = ["model=moe", "model.ffn.num_experts=8", "model.ffn.top_k=2", "model.ffn.d_expert=32", "model.ffn.n_shared=1",
       "model.ffn.bias_rate=0.01", "model.ffn.aux_loss=0.01"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_moe_trains_on_two_processes_as_one_bias_included(strategy, cache_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"{strategy}_moe")
    res = run_ddp(tmp, "moe", STEPS, MOE, strategy=strategy)
    assert res.returncode == 0, res.stderr[-3000:]
    two = ckpt(tmp / "train" / "runs" / "moe")
    one = ckpt(one_process(tmp_path_factory.mktemp("one_moe"), "clm", extra=MOE))
    assert_same_training_state(one, two, rtol=1e-4, atol=1e-6, opt_atol=1e-7)
    biases = [k for k in one["state_dict"] if k.endswith(".ffn.bias")]
    assert len(biases) == 2 and all(one["state_dict"][k].abs().sum() > 0 for k in biases)  # it moved
    for k in biases:  # multiples of bias_rate: equal, not close
        assert torch.equal(one["state_dict"][k], two["state_dict"][k]), k
