"""Per expert layer: fraction of experts used in the step, unevenness, router score entropy."""

import lightning as L


class ExpertStats(L.Callback):
    """Logs the `stats` dict that expert FFNs (PEER, latent experts) keep after each training forward."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % trainer.log_every_n_steps:
            return
        metrics = {}
        for name, module in pl_module.named_modules():
            stats = getattr(module, "stats", None)
            if isinstance(stats, dict) and stats:
                layer = name.replace("model.trunk.blocks.", "layer").replace(".ffn", "")
                metrics.update({f"experts/{layer}/{k}": v for k, v in stats.items()})
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
