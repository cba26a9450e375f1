"""Prefix-LM and the mixture of denoisers on the decoder (docs/design.md §12): how the prompt part of a sequence
is attended to and trained, everything else equal.

`task=prefix_lm`: each packed document is split at a prefix boundary; the prefix attends bidirectionally within
itself, the continuation causally (ethos.models.scores.Docs.prefix), and the loss is on the continuation.
`prefix_loss` adds the prefix's own: `clm` (a second, causal pass predicts the prefix tokens, weighted by
`prefix_loss_weight`) or `mlm` (masked prefix tokens predicted in place under the bidirectional prefix: GLM).
`task=mixture`: per document, causal LM, prefix-LM or span corruption, sampled by `paradigms` weights, opened by
a mode token (UL2); losses are logged per paradigm (`train/loss_<paradigm>`, `val/loss_<paradigm>`).

val/loss and val/bpb count the targets of the objective (for a prefix-LM the continuations only), so they are
comparable between runs of one objective; across objectives compare the probes' continuation bits per byte
(ethos/analysis/prompts.py), which scores every model on the same split of the same documents.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor
from torchmetrics import MeanMetric

from ethos.data.prompts import PARADIGMS, PromptCollator, PromptTokens
from ethos.errors import ConfigError
from ethos.models.config import ModelConfig
from ethos.models.decoder import Decoder
from ethos.optim import OptimConfig
from ethos.tasks.lm import LanguageModel
from ethos.types import NonNegativeFloat, NonNegativeInt, OpenUnit, PositiveFloat

PrefixLoss = Literal["none", "clm", "mlm"]


def check_paradigms(paradigms: dict[str, float], allowed: tuple[str, ...] = PARADIGMS) -> dict[str, float]:
    bad = [k for k, v in paradigms.items() if k not in allowed or not isinstance(v, (int, float)) or v < 0]
    if bad or not any(v > 0 for v in paradigms.values()):
        raise ConfigError(f"task.paradigms={dict(paradigms)}: weights >= 0, at least one > 0, over "
                          f"{', '.join(allowed)}")
    return {k: float(v) for k, v in paradigms.items() if v > 0}


def plain(value):
    """A Hydra dict or list argument as a plain one (the task's hyperparameters go into checkpoints)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_range(prefix_range) -> tuple[float, float]:
    lo, hi = (float(x) for x in prefix_range)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"task.prefix_range={list(prefix_range)}: two fractions 0 <= lo <= hi <= 1")
    return lo, hi


class PrefixLM(LanguageModel):
    seq2seq = False  # the collator's layout: one decoder row (here) or an encoder and a decoder row

    @staticmethod
    def check_options(cfg) -> None:
        """The rules across task keys, run by the config check before any data is read (ethos/checks.py)."""
        t = cfg.task
        paradigms = check_paradigms(dict(t.get("paradigms") or {"prefix": 1.0}))
        check_range(t.get("prefix_range", (0.25, 0.75)))
        if "span" in paradigms and t.get("n_sentinels", 100) < 1:
            raise ConfigError(f"task.n_sentinels={t.n_sentinels}: span corruption needs at least 1")
        if t.get("prefix_loss", "none") != "none" and "prefix" not in paradigms:
            raise ConfigError(f"task.prefix_loss={t.prefix_loss}: no document is split (task.paradigms="
                              f"{dict(t.paradigms)} has no prefix weight); set none")

    def __init__(self, model: ModelConfig, optim: OptimConfig, vocab_size: int, pad_id: int = 0,
                 paradigms: dict[str, float] | None = None, prefix_range: tuple[float, float] = (0.25, 0.75),
                 prefix_sep: str | None = None, prefix_loss: PrefixLoss = "none",
                 prefix_loss_weight: NonNegativeFloat = 1.0, mlm_probability: OpenUnit = 0.15,
                 mode_tokens: bool = False, span_density: OpenUnit = 0.15, span_mean: PositiveFloat = 3.0,
                 n_sentinels: NonNegativeInt = 100):
        # plain containers before the hyperparameters are saved: checkpoints hold no OmegaConf (ethos/checkpoint.py)
        paradigms, prefix_range = plain(paradigms), plain(prefix_range)
        super().__init__(optim)
        self.save_hyperparameters(ignore=["model", "optim"])
        self.paradigms = check_paradigms(paradigms or {"prefix": 1.0})
        self.prefix_range = check_range(prefix_range)
        self.prefix_loss, self.prefix_loss_weight = prefix_loss, prefix_loss_weight
        self.options = dict(prefix_sep=prefix_sep, prefix_loss=prefix_loss, mlm_probability=mlm_probability,
                            span_density=span_density, span_mean=span_mean)
        self.tokens = self.prompt_tokens(vocab_size, self.paradigms, prefix_loss, mode_tokens, n_sentinels)
        self.model = self.build_model(model, vocab_size + self.tokens.extra, pad_id)
        if model.compile:
            self.model.trunk.compile()
        self.val_paradigm = torch.nn.ModuleDict({p: MeanMetric() for p in self.paradigms})
        self._aux: Tensor | None = None

    @staticmethod
    def prompt_tokens(vocab_size: int, paradigms: dict, prefix_loss: str = "none", mode_tokens: bool = False,
                      n_sentinels: int = 100) -> PromptTokens:
        """The ids this objective adds to the tokenizer's (ethos/data/prompts.py)."""
        spans = n_sentinels if paradigms.get("span", 0) > 0 else 0
        return PromptTokens.build(vocab_size, prefix_loss == "mlm", mode_tokens, spans)

    @classmethod
    def finetune_options(cls, task_cfg) -> dict:
        """How a fine-tune reads this objective's backbone (ethos/study.py): the decoder with its extra ids, the
        input as a prefix when the objective trained prefixes."""
        paradigms = check_paradigms(dict(task_cfg.get("paradigms") or {"prefix": 1.0}))
        extra = cls.prompt_tokens(0, paradigms, task_cfg.get("prefix_loss", "none"),
                                  task_cfg.get("mode_tokens", False), task_cfg.get("n_sentinels", 100)).extra
        return {"backbone": "decoder", "pooling": "last", "prefix": "prefix" in paradigms, "extra_vocab": extra}

    def build_model(self, model: ModelConfig, vocab_size: int, pad_id: int):
        return Decoder(model, vocab_size, pad_id)

    def collator(self, dm) -> PromptCollator:
        """The data module's batches for this objective (ethos/data/text.py asks for them)."""
        return PromptCollator(dm.tokenizer, self.tokens, dm.seq_len, self.paradigms, self.prefix_range,
                              seed=dm.seed, doc_mask=dm.doc_mask, reset_positions=dm.reset_positions,
                              seq2seq=self.seq2seq, **self.options)

    def flops_per_token(self, batch_size: int, tokens_per_sample: int) -> float:
        once = self.model.flops_per_token(seq_len=tokens_per_sample, batch_size=batch_size)
        return once * (2 if self.prefix_loss == "clm" else 1)  # the prefix's causal pass is a second forward

    def forward_hidden(self, batch: dict, prefix: bool = True) -> Tensor:
        return self.model(batch["input_ids"], batch["attention_mask"], batch.get("doc_ids"), batch.get("positions"),
                          batch.get("prefix") if prefix else None)

    def continuation_loss(self, hidden: Tensor, batch: dict) -> tuple[Tensor, Tensor, int]:
        """Mean next-token NLL of the labelled targets (position t predicts labels[t + 1]), logged per paradigm;
        (loss, correct, count)."""
        target = batch["labels"][:, 1:]
        sel = target != -100
        logits = self.model.logits(hidden[:, :-1][sel])
        target = target[sel]
        nll = F.cross_entropy(logits.float(), target, reduction="none")
        self.log_paradigms(nll, batch["paradigm"][:, 1:][sel])
        loss = nll.mean() if len(nll) else nll.sum()
        return loss, (logits.argmax(-1) == target).sum(), int(sel.sum())

    def _step(self, batch: dict) -> tuple[Tensor, Tensor, int]:
        hidden = self.forward_hidden(batch)
        out = self.continuation_loss(hidden, batch)
        self._aux = None
        if "mlm_labels" in batch:  # masked prefix tokens, predicted in place under the bidirectional prefix
            at = batch["mlm_labels"] != -100
            self._aux = self.prefix_nll(hidden[at], batch["mlm_labels"][at], "mlm")
        if "prefix_labels" in batch and self.training:  # the prefix predicted again, by a causal pass
            at = batch["prefix_labels"][:, 1:] != -100
            causal = self.forward_hidden(batch, prefix=False)[:, :-1]
            self._aux = self.prefix_nll(causal[at], batch["prefix_labels"][:, 1:][at], "clm")
        return out

    def prefix_nll(self, hidden: Tensor, labels: Tensor, name: str) -> Tensor:
        nll = F.cross_entropy(self.model.logits(hidden).float(), labels) if len(labels) else hidden.sum() * 0
        self.log(f"{'train' if self.training else 'val'}/prefix_{name}", nll.detach(), batch_size=max(1, len(labels)))
        return nll

    def with_aux_loss(self, loss: Tensor) -> Tensor:
        """The prefix's own loss joins the step's (its weight times its mean), after the expert layers'."""
        loss = super().with_aux_loss(loss)
        return loss if self._aux is None else loss + self.prefix_loss_weight * self._aux

    def log_paradigms(self, nll: Tensor, paradigm: Tensor) -> None:
        if len(self.paradigms) < 2:
            return
        for i, p in enumerate(PARADIGMS):
            at = paradigm == i
            n = int(at.sum())
            if p not in self.paradigms or not n:
                continue
            mean = nll[at].detach().mean()
            if self.training:
                self.log(f"train/loss_{p}", mean, batch_size=n)
            else:
                self.val_paradigm[p].update(mean, weight=n)

    def on_validation_epoch_end(self) -> None:
        for p, m in self.val_paradigm.items():
            if m.update_count:
                self.log(f"val/loss_{p}", m.compute())
            m.reset()
        super().on_validation_epoch_end()

    target_bytes = LanguageModel.next_token_bytes  # mode tokens and sentinels carry 0 bytes (data/prompts.py)

