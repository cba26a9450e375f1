"""What every task shares: the optimizer and schedule (ethos/optim.py), fine-tuning a pretrained backbone,
validation history, closed-form FLOPs and parameter counts."""

import lightning as L
import torch

from ethos.models.blocks import count_params
from ethos.models.flops import TRAIN_FACTOR
from ethos.optim import LRSchedule, OptimConfig, clips_under_amp, decays, make_optimizer, schedule, uses_muon
from ethos.parallel import shard
from ethos.pretrained import load_backbone


class Task(L.LightningModule):
    """Subclasses build `self.model` in __init__ and implement the steps."""

    def __init__(self, optim: OptimConfig):
        super().__init__()
        self.optim = optim
        self.val_history: list[tuple[int, float]] = []  # (step, val/loss); kept in checkpoints
        self.recipe: dict | None = None  # what rebuilds this task without Hydra (ethos.pretrained.load_task)

    def record_val(self, loss) -> None:
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, float(loss)))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["val_history"] = list(self.val_history)
        if self.recipe:  # self-describing: the analysis tools and fine-tunes rebuild the model from this alone
            checkpoint["ethos"] = self.recipe

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_history = [tuple(v) for v in checkpoint.get("val_history", [])]

    def adopt_backbone(self, pretrained: str | None, freeze: bool, new: tuple[str, ...] = (),
                       backbone_lr_scale: float = 1.0) -> None:
        """Fine-tuning: `self.model` starts from the pretrained run's weights, but for those under the `new`
        prefixes (a fresh head); `freeze` (a linear probe) trains only those, the rest kept in eval mode.
        `backbone_lr_scale`: the pretrained weights learn at optim.lr x this, the fresh head at optim.lr. A fresh
        head needs a large step to learn in a short fine-tune; the same step on the pretrained weights can wreck
        them (discriminative fine-tuning, Howard & Ruder 2018)."""
        self.pretrained_lr_scale = 1.0
        if pretrained:
            self.pretrained_from = load_backbone(self.model, pretrained, new)
            self.pretrained_lr_scale = backbone_lr_scale
        self.probe = freeze
        self.fresh = new
        if freeze:
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith(new) if new else False)

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # trainer=fsdp (ethos.parallel.FSDP): every process on the data axis
            shard(self.model, self.device_mesh["data_parallel"])

    def param_groups(self) -> list[dict]:
        """Decayed and not decayed (ethos.optim.decays); under optim=muon the hidden matrices apart, marked
        "muon" (ethos.optim.uses_muon: at optim.muon_lr and optim.muon_weight_decay); when fine-tuning with a
        backbone_lr_scale other than 1, each of those split again into the pretrained weights (at the lr of
        their optimizer x the scale) and the rest."""
        o = self.optim
        scale = getattr(self, "pretrained_lr_scale", 1.0)
        fresh = tuple(f"model.{p}" for p in getattr(self, "fresh", ()))
        # (muon, decay, pretrained) -> parameters
        groups: dict[tuple[bool, bool, bool], list] = {(False, True, False): [], (False, False, False): []}
        for prefix, module in self.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    full = f"{prefix}.{name}"
                    pretrained = scale != 1.0 and full.startswith("model.") and not (fresh and full.startswith(fresh))
                    muon = o.name == "muon" and uses_muon(prefix, module, name, p)
                    groups.setdefault((muon, decays(module, name), pretrained), []).append(p)
        out = []
        for (muon, decay, pretrained), params in groups.items():
            lr, wd = (o.muon_lr, o.muon_weight_decay) if muon else (o.lr, o.weight_decay if decay else 0.0)
            group = {"params": params, "weight_decay": wd}
            if o.name == "muon":
                group["muon"] = muon
            if pretrained:
                group["lr"] = lr * scale
            out.append(group)
        return out

    # experts balanced by a bias outside the gradient (ethos.models.moe.MoE): loads summed over the step's
    # micro-batches and processes, then one update per optimizer step, the same on every process
    def balanced_experts(self) -> list:
        return [m for m in self.modules() if hasattr(m, "update_bias")]

    def on_after_backward(self) -> None:
        for m in self.balanced_experts():
            m.accumulate()

    def on_before_optimizer_step(self, optimizer) -> None:
        experts = [m for m in self.balanced_experts() if m.pending is not None]
        if not experts:
            return
        loads = torch.stack([m.pending for m in experts])
        if self.trainer.world_size > 1:  # one all-reduce for every layer
            loads = self.trainer.strategy.reduce(loads, reduce_op="sum")
        for m, load in zip(experts, loads):
            m.update_bias(load)

    def with_aux_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The training loss plus the expert layers' auxiliary losses of this forward (MoE's sequence-wise balance
        loss, when model.ffn.aux_loss > 0), logged as train/aux_loss."""
        aux = [m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None]
        if not aux:
            return loss
        total = torch.stack(aux).sum()
        self.log("train/aux_loss", total.detach())
        return loss + total

    def configure_optimizers(self):
        o = self.optim
        fused = o.fused if o.fused is not None else (self.device.type == "cuda" and not clips_under_amp(self.trainer))
        opt = make_optimizer(self.param_groups(), o, fused)
        total = max(1, self.trainer.max_steps if self.trainer.max_steps > 0
                    else self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule(opt, o, total), "interval": "step"}}

    # FLOPs in closed form (ethos/models/flops.py), for the Throughput callback and the model summary
    def batch_dims(self, batch) -> tuple[int, int]:
        """(samples, tokens per sample) of a batch, as throughput counts them."""
        raise NotImplementedError

    def nominal_batch_dims(self) -> tuple[int, int] | None:
        """batch_dims of a training batch before any is seen (from the data module), or None."""
        return None

    def flops_per_token(self, batch_size: int, tokens_per_sample: int) -> float:
        """Forward FLOPs per token of a batch of that shape (closed form, from the model config)."""
        raise NotImplementedError

    def step_flops(self, batch_size: int, tokens_per_sample: int, training: bool = True) -> float:
        """FLOPs of one step on a batch of that shape: forward, x3 with the backward when training."""
        per_token = self.flops_per_token(batch_size, tokens_per_sample)
        return (TRAIN_FACTOR if training else 1) * per_token * batch_size * tokens_per_sample

    @property
    def flops_per_batch(self) -> float | None:
        """FLOPs of the current batch, read by Lightning's ThroughputMonitor (perf/flops_per_sec, perf/mfu).
        A property, not a plain attribute: the monitor checks once, at its first batch (maybe a
        validation one before training), whether the module has it at all."""
        return getattr(self, "_batch_flops", None)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if getattr(self, "probe", False):  # a probe reads fixed features: no dropout in the frozen backbone
            self.model.eval()
        self._batch_flops = self.step_flops(*self.batch_dims(batch))

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_flops = self.step_flops(*self.batch_dims(batch), training=False)

    def param_counts(self) -> dict[str, int]:
        counts = count_params(self.model)
        for i, block in enumerate(self.model.trunk.blocks):  # per layer: dense and expert layers differ
            layer = count_params(block)
            counts[f"params/layer{i}/total"] = layer["params/total"]
            counts[f"params/layer{i}/attention"] = layer["params/attention"]
        return counts

    def on_train_start(self) -> None:
        # after a resume the scheduler holds the checkpoint's schedule: re-target it to this run's length
        for config in self.trainer.lr_scheduler_configs:
            for fn in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(fn, LRSchedule):
                    fn.extend(self.global_step, max(1, self.trainer.max_steps))

    def effective_batch_size(self) -> int | None:
        """Samples per optimizer step: micro-batch x gradient accumulation x world size."""
        micro = getattr(self.trainer.datamodule, "batch_size", None)
        return None if micro is None else micro * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def on_fit_start(self) -> None:
        counts = self.param_counts()
        batch = self.effective_batch_size()
        for logger in self.loggers:
            logger.log_hyperparams(counts)
            if batch is not None:  # a hyperparameter, and a metric so that it shows beside the curves
                logger.log_hyperparams({"trainer/effective_batch_size": batch})
                logger.log_metrics({"trainer/effective_batch_size": batch}, step=self.global_step)
        self.print("  ".join(f"{k.split('/')[-1]}: {v / 1e6:.2f}M" for k, v in counts.items() if "layer" not in k)
                   + ("" if batch is None else f"  effective batch: {batch}"))
