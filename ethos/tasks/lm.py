"""What masked and causal language modelling share: per-token metrics and their logging, and bits per byte."""

import math

import torch
from torchmetrics import MeanMetric, Metric

from ethos.optim import OptimConfig
from ethos.tasks.base import Task


class BitsPerByte(Metric):
    """Summed target NLL (nats) / (ln 2 x summed UTF-8 bytes of the targets) over everything updated: the loss
    in a unit no tokenizer changes (docs/design.md §10.3). Sums, not a mean of ratios: token- and byte-weighted over
    the whole split, reduced across processes; float64, so the byte count stays exact on any split."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, n_bytes: torch.Tensor) -> None:
        self.nll += nll.detach().double()
        self.bytes += n_bytes.double()

    def compute(self) -> torch.Tensor:
        return self.nll / (math.log(2) * self.bytes)


class LanguageModel(Task):
    """Subclasses build `self.model` and implement `_step(batch) -> (loss, n_correct, n_targets)` and
    `target_bytes(batch)`, the summed UTF-8 bytes of the tokens `_step` counts."""

    def __init__(self, optim: OptimConfig):
        super().__init__(optim)
        # token-weighted means: the epoch value is the per-token loss over the whole split
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()
        self.val_bpb = BitsPerByte()

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError

    def target_bytes(self, batch: dict) -> torch.Tensor | None:
        raise NotImplementedError

    def next_token_bytes(self, batch: dict) -> torch.Tensor | None:
        """`target_bytes` of the next-token objectives: bytes of labels[t + 1], the token position t predicts."""
        if "bytes" not in batch:
            return None
        return batch["bytes"][:, 1:][batch["labels"][:, 1:] != -100].sum()

    @staticmethod
    def documents(batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(doc_ids, positions) of a document-masked batch (ethos/data/collate.py), else None."""
        return batch.get("doc_ids"), batch.get("positions")

    def batch_dims(self, batch: dict) -> tuple[int, int]:
        return tuple(batch["input_ids"].shape)  # every position counts, padding included

    def nominal_batch_dims(self) -> tuple[int, int] | None:
        dm = getattr(self._trainer, "datamodule", None)
        if getattr(dm, "batch_size", None) and getattr(dm, "seq_len", None):
            return dm.batch_size, dm.seq_len
        return None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, correct, n = self._step(batch)
        n_bytes = self.target_bytes(batch)
        nbytes = loss.new_tensor(0.0) if n_bytes is None else n_bytes.float()
        world = self.trainer.world_size
        if world > 1:
            # Ranks count different numbers of targets (MLM masks ~15% per row, padding varies) and DDP
            # averages gradients: weight this rank's mean by its share of the global count, so the step is the
            # global batch's per-token mean, as one process with the whole batch takes it. One 4-float all-reduce.
            stats = torch.stack([loss.detach() * n, correct.float(), loss.new_tensor(float(n)), nbytes])
            nll, correct, total, nbytes = self.trainer.strategy.reduce(stats, reduce_op="sum")
            logged, acc = nll / total.clamp(min=1), correct / total.clamp(min=1)
            loss = loss * (n * world / total.clamp(min=1))
        else:
            logged, acc = loss.detach(), correct / max(n, 1)
            nll = logged * n
        self.log_dict({"train/loss": logged, "train/acc": acc, "train/ppl": torch.exp(logged.clamp(max=30))},
                      prog_bar=True, batch_size=n)
        if n_bytes is not None:
            self.log("train/bpb", nll / (math.log(2) * nbytes.clamp(min=1)), batch_size=n)
        return self.with_aux_loss(loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, correct, n = self._step(batch)
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(correct / max(n, 1), weight=n)
        n_bytes = self.target_bytes(batch)
        if n_bytes is not None and n > 0:  # summed NLL = mean loss x count
            self.val_bpb.update(loss * n, n_bytes)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.record_val(loss)
        bpb = self.val_bpb.compute()  # every process takes part in the reduction, whatever it saw
        metrics = {"val/loss": loss, "val/acc": self.val_acc.compute(), "val/ppl": torch.exp(loss.clamp(max=30))}
        if self.val_bpb.update_count:  # not from batches without byte counts (blocks made elsewhere)
            metrics["val/bpb"] = bpb.float()
        self.log_dict(metrics, prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_bpb.reset()
