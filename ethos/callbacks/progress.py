"""Rich progress bar that names the step budget instead of Lightning's "Epoch 0/-2" for step-based runs."""

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        t = self.trainer
        if t.max_epochs is not None and t.max_epochs > 0:
            return super()._get_train_description(current_epoch)
        text = f"train ({t.max_steps} steps)"
        return f"{text:{len(self.validation_description)}}"
