"""Throughput and MFU by Lightning's ThroughputMonitor, fed with our closed-form FLOPs; a model summary
that shows those FLOPs.

The task sets `flops_per_batch` before every training batch (closed form, `Task.step_flops`: training
FLOPs per token x tokens in the batch, image batches counting patches), and says how many samples and
tokens a batch holds (`Task.batch_dims`). The library keeps the window and computes the rates, and MFU
where it knows the device peak (CUDA); we only rename its metrics to perf/samples_per_sec,
perf/tokens_per_sec, perf/flops_per_sec (also on CPU) and perf/mfu (world-wide rates on several devices). Beside
them, perf/peak_memory_gib: the device's peak allocated memory on CUDA (torch.cuda.max_memory_allocated), the
process's peak resident memory on CPU (model, optimizer, activations and data alike).
"""

import resource

import torch
from lightning.pytorch.callbacks import RichModelSummary, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from rich import get_console

# the library's names -> ours; without a "device/" prefix they are world-wide (logged when world_size > 1)
NAMES = {"samples_per_sec": "samples_per_sec", "items_per_sec": "tokens_per_sec",
         "flops_per_sec": "flops_per_sec", "mfu": "mfu"}


class Throughput(ThroughputMonitor):
    """Rates over a window of `window_size` training batches (nothing is logged before it is full)."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=self._count_samples, length_fn=self._count_tokens, window_size=window_size)
        self._task = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._task = pl_module

    def _count_samples(self, batch) -> int:
        return self._task.batch_dims(batch)[0]

    def _count_tokens(self, batch) -> int:
        samples, tokens_per_sample = self._task.batch_dims(batch)
        return samples * tokens_per_sample

    def _compute(self, trainer, iter_num: int | None = None) -> None:
        # training only: the library logs validation rates against the validation batch count, a step
        # axis that goes backwards (W&B drops those); it still times validation to leave it out of training.
        # Called after an optimizer step, whose metrics Lightning logs at step global_step - 1 every
        # log_every_n_steps steps: these rates land on the same rows, through the loggers' public API.
        stage, step = trainer.state.stage, trainer.global_step
        every = trainer.log_every_n_steps
        if stage != RunningStage.TRAINING or not every or (step % every and not trainer.should_stop):
            return
        metrics = self._throughputs[stage].compute()
        out = {}
        for key, name in NAMES.items():
            value = metrics.get(key, metrics.get(f"device/{key}"))  # mfu is the same for one device or all
            if value is not None:
                out[f"perf/{name}"] = float(value)
        if out:
            out["perf/peak_memory_gib"] = peak_memory_gib(trainer.strategy.root_device)
        for logger in trainer.loggers if out else ():
            logger.log_metrics(out, step=step - 1)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class ModelSummary(RichModelSummary):
    """Lightning's summary counts FLOPs only by running `example_input_array` through the module (our
    tasks have none: their batches are dicts the steps unpack), so it prints "Total FLOPs: 0". Show the
    closed form instead: forward FLOPs of one training batch, as Lightning's column means."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self._flops = None
        dims = pl_module.nominal_batch_dims() if hasattr(pl_module, "nominal_batch_dims") else None
        if dims is not None:
            self._dims = dims
            self._flops = pl_module.step_flops(*dims, training=False)
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:
        if self._flops is None:  # no data module to read the batch shape from: leave the summary as is
            return super().summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                     total_training_modes, total_flops, **kwargs)
        cols = dict(summary_data)
        if "FLOPs" in cols:  # the backbone's row; the metric modules do no FLOPs indeed
            cols["FLOPs"] = [get_human_readable_count(int(self._flops)) if name == "model" else f
                             for name, f in zip(cols["Name"], cols["FLOPs"])]
        super().summarize(list(cols.items()), total_parameters, trainable_parameters, model_size,
                          total_training_modes, int(self._flops), **kwargs)
        (batch, tokens), fwd = self._dims, self._flops
        get_console().print(
            f"FLOPs (closed form, ethos/models/flops.py): forward of a {batch} x {tokens}-token batch "
            f"{get_human_readable_count(int(fwd))}, training step (3x) {get_human_readable_count(int(3 * fwd))}, "
            f"per token {get_human_readable_count(int(fwd / (batch * tokens)))} forward")
