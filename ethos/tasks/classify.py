"""Image classification with the ViT: cross-entropy (label smoothing, mixup soft targets), top-1/top-5 accuracy.

The model-side settings are this task's: patch size (null: from the image size, `auto_patch_size`), pooling
and label smoothing. The data gives the images, their size, and mixup / cutmix (a batch transform).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from ethos.models.config import ModelConfig
from ethos.models.vit import ViT, auto_patch_size
from ethos.optim import OptimConfig
from ethos.tasks.base import Task
from ethos.types import HalfOpenUnit, PositiveFloat, PositiveInt


def classification_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class indices, or against a distribution per row (mixup / cutmix targets from timm's
    Mixup). Smoothing is affine, so smoothing mixed one-hots equals mixing smoothed ones (what timm's
    Mixup(label_smoothing=eps) gives): the data mixes, the task smooths; F.cross_entropy does both."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


class ImageClassifier(Task):
    def __init__(self, model: ModelConfig, optim: OptimConfig, num_classes: int, img_size: int = 224,
                 patch_size: PositiveInt | None = None, in_chans: int = 3, pool: Literal["cls", "avg"] = "cls",
                 label_smoothing: HalfOpenUnit = 0.0, pretrained: str | None = None, freeze: bool = False,
                 backbone_lr_scale: PositiveFloat = 1.0):
        super().__init__(optim)
        patch_size = patch_size or auto_patch_size(img_size)
        self.save_hyperparameters(ignore=["model", "optim"])
        self.model = ViT(model, num_classes, img_size, patch_size, in_chans, pool)
        # fine-tune (task=classify) or probe (task=probe) a pretrained ViT: a fresh head
        self.adopt_backbone(pretrained, freeze, new=("head.",), backbone_lr_scale=backbone_lr_scale)
        if model.compile:
            self.model.trunk.compile()
        self.label_smoothing = label_smoothing
        # over the whole split (micro averages): the per-image loss and accuracy
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.val_skipped = SumMetric()
        self.train_skipped = 0  # unreadable images replaced so far in this process (also logged)

    def batch_dims(self, batch: dict) -> tuple[int, int]:
        return batch["image"].shape[0], self.model.patch_embed.num_patches  # patches are the tokens

    def nominal_batch_dims(self) -> tuple[int, int] | None:
        batch_size = getattr(getattr(self._trainer, "datamodule", None), "batch_size", None)
        return (batch_size, self.model.patch_embed.num_patches) if batch_size else None

    def flops_per_token(self, batch_size: int, tokens_per_sample: int) -> float:
        return self.model.flops_per_token(batch_size=batch_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        target = batch.get("target", batch["label"])  # mixup / cutmix soft targets, else the labels
        loss = classification_loss(logits, target, self.label_smoothing)
        acc = (logits.argmax(-1) == batch["label"]).float().mean()  # vs the dominant (unmixed) label
        self.train_skipped += int(batch["skipped"])
        n = batch["label"].shape[0]
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, batch_size=n)
        self.log("train/skipped_images", float(self.train_skipped), batch_size=n)
        return self.with_aux_loss(loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_skipped.update(batch["skipped"])
        n = batch["label"].shape[0]
        if n == 0:  # every image of the batch was unreadable
            return
        logits = self.model(batch["image"]).float()
        loss = F.cross_entropy(logits, batch["label"])  # no smoothing: comparable across settings
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(logits, batch["label"])
        self.val_acc5.update(logits, batch["label"])

    def on_validation_epoch_end(self) -> None:
        self.record_val(self.val_loss.compute())
        self.log_dict({"val/loss": self.val_loss.compute(), "val/acc": self.val_acc.compute(),
                       "val/acc5": self.val_acc5.compute(), "val/skipped_images": self.val_skipped.compute()},
                      prog_bar=True)
        for m in (self.val_loss, self.val_acc, self.val_acc5, self.val_skipped):
            m.reset()
