"""Downstream fine-tuning (or a linear probe) of a pretrained text backbone: a classification head on a
pooled hidden state, cross-entropy, accuracy from torchmetrics.

Pooling: `cls` (the encoder's first token, [CLS]), `mean` (over real tokens), or `last` (the decoder's last
real token, the only one that has seen the whole input). The prompt objectives' runs (docs/design.md §12): a
prefix-LM's decoder reads the input as one prefix (`prefix`), an encoder–decoder's encoder reads it
(`backbone=seq2seq`), both with the ids their objective added (`extra_vocab`). `pretrained`: a run dir (its
checkpoints/last.ckpt) or a checkpoint file; its backbone weights are loaded tensor for tensor, and anything but
a head that does not match is an error naming the keys (ethos.pretrained). `lora`: LoRA adapters on the
backbone's projections instead of a full fine-tune (ethos/models/lora.py); the adapter is saved to
<run dir>/adapter at the end.
"""

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import TypedDict  # pydantic (the config check) needs it before Python 3.12

from ethos.models import lora as lora_
from ethos.models.blocks import TextBackbone
from ethos.models.config import ModelConfig
from ethos.models.decoder import Decoder
from ethos.models.encoder import Encoder
from ethos.models.seq2seq import EncoderDecoder
from ethos.optim import OptimConfig
from ethos.tasks.base import Task
from ethos.types import NonNegativeInt, PositiveFloat


class Seq2SeqSizes(TypedDict, total=False):
    """An encoder–decoder backbone's sizes (ethos/tasks/seq2seq.py)."""

    encoder_layers: int | None
    decoder_layers: int | None
    cross_kv_heads: int | None


class SequenceClassifier(Task):
    def __init__(self, model: ModelConfig, optim: OptimConfig, vocab_size: int, num_classes: int, pad_id: int = 0,
                 backbone: Literal["encoder", "decoder", "seq2seq"] = "encoder",
                 pooling: Literal["cls", "mean", "last"] = "cls", pretrained: str | None = None, freeze: bool = False,
                 dropout: float = 0.1, backbone_lr_scale: PositiveFloat = 1.0, lora: lora_.LoraOptions | None = None,
                 prefix: bool = False, extra_vocab: NonNegativeInt = 0, seq2seq: Seq2SeqSizes | None = None):
        lora = lora_.options(lora)  # a plain dict (or None: off) before the hyperparameters are saved
        seq2seq = dict(seq2seq) if seq2seq is not None else None
        super().__init__(optim)
        self.save_hyperparameters(ignore=["model", "optim"])
        vocab_size += extra_vocab  # a prompt objective's own ids (ethos/data/prompts.py): the checkpoint has them
        if backbone == "seq2seq":
            self.model = EncoderDecoder(model, vocab_size, pad_id, **(seq2seq or {}))
        else:
            self.model = (Decoder if backbone == "decoder" else Encoder)(model, vocab_size, pad_id)
        self.seq2seq, self.prefix = backbone == "seq2seq", prefix
        if hasattr(self.model, "mlm_bias"):  # the MLM head's bias: a pretraining head, unused here (and an
            self.model.register_parameter("mlm_bias", None)  # unused parameter would stall DDP)
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(model.d_model, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.adopt_backbone(pretrained, freeze, backbone_lr_scale=backbone_lr_scale)  # its head is outside self.model
        if self.seq2seq:  # the decoder side is never used: no gradient, so DDP does not wait for one
            for m in (self.model.trunk, self.model.lm_head):
                for p in (m.parameters() if m is not None else ()):
                    p.requires_grad_(False)
        self.lora = lora
        if self.lora is not None:  # after the pretrained weights are in: peft freezes them, the adapters train
            self.model = lora_.attach(self.model, self.lora)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def on_train_end(self) -> None:
        if self.lora is not None and self.trainer.is_global_zero:  # peft's adapter files: config + safetensors
            self.model.save_pretrained(str(Path(self.trainer.default_root_dir) / "adapter"))

    def pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        last = mask.long().sum(1) - 1  # right padding: the last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.seq2seq:  # the encoder reads the input; the decoder is not used
            hidden = self.model.encode(input_ids, attention_mask.bool())
        else:  # `prefix`: a prefix-LM's decoder reads the whole input bidirectionally, as it read its prompts
            hidden = self.model(input_ids, attention_mask.bool(), prefix=attention_mask.long() if self.prefix else None)
        return self.head(self.drop(self.pool(hidden, attention_mask)))

    def batch_dims(self, batch: dict) -> tuple[int, int]:
        return tuple(batch["input_ids"].shape)  # padded per batch: every position counts

    def flops_per_token(self, batch_size: int, tokens_per_sample: int) -> float:
        # the trunk at every position, no vocabulary head; the classifier once per sample
        trunk = TextBackbone.flops_per_token(self.model, tokens_per_sample, batch_size, 0.0)
        return trunk + 2 * self.head.in_features * self.head.out_features / tokens_per_sample

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.train_acc(logits, batch["labels"])
        self.log_dict({"train/loss": loss, "train/acc": self.train_acc}, prog_bar=True)
        return self.with_aux_loss(loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.val_acc.update(logits, batch["labels"])
        self.log("val/loss", loss, batch_size=len(logits), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.log("val/acc", acc, prog_bar=True)
        self.val_acc.reset()
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.record_val(loss)
