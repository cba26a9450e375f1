"""The prompt-encoding probes during training (ethos/analysis/prompts.py, docs/design.md §12): after every
`every_n_val`-th validation, on the first `docs` documents of the validation split (the same ones every time),
cut at `split` into prompt and continuation, the model read as its objective trains it to:

    prompts/help_bpb, prompts/bpb_with_prompt, prompts/bpb_without_prompt   how much the prompt helps
    prompts/layer{i}/{prompt,continuation}_{entropy,accuracy}, .../unembed_frac   the logit lens (prompt positions)

    prompts/probe_acc, prompts/probe_chance   with `labels` (docstrings | sst2): the linear probe of the prompt
                                              state, fit on at most `probe_limit` examples per split

Enabled by
experiment=prompt_encoding; elsewhere `+callbacks.prompt_probes._target_=ethos.callbacks.prompts.PromptProbes`.
Every rank computes the same figures (the same documents, the same weights), so nothing is reduced.
"""

from typing import Literal

import lightning as L
import torch

from ethos.errors import ConfigError
from ethos.types import OpenUnit, PositiveInt


class PromptProbes(L.Callback):
    def __init__(self, every_n_val: PositiveInt = 1, docs: PositiveInt = 64, split: OpenUnit = 0.5,
                 directions: PositiveInt = 16, labels: Literal["docstrings", "sst2"] | None = None,
                 labels_path: str = "nyu-mll/glue", probe_limit: PositiveInt = 1000):
        self.every_n_val, self.n_docs, self.split, self.directions = every_n_val, docs, split, directions
        self.labels, self.labels_path, self.probe_limit = labels, labels_path, probe_limit
        self.validations = 0
        self._docs = None

    def state_dict(self) -> dict:
        return {"validations": self.validations}

    def load_state_dict(self, state: dict) -> None:
        self.validations = state.get("validations", 0)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        from ethos.analysis import prompts  # the probes import the tasks: not at config-check time
        from ethos.data.tokenizer import special_ids

        if trainer.sanity_checking:
            return
        self.validations += 1
        dm = getattr(trainer, "datamodule", None)
        if (self.validations - 1) % self.every_n_val or getattr(dm, "splits", None) is None:
            return
        start, sep, _ = special_ids(dm.tokenizer)
        try:
            reader = prompts.Reader.of(pl_module, start if start is not None else sep)
        except ConfigError:  # not a prompt reader (e.g. the fine-tune that follows a run: its callbacks are the run's)
            return
        if self._docs is None:
            self._docs = prompts.documents(dm.splits["validation"], start, self.n_docs)
        if not self._docs:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            help_ = prompts.prompt_help(reader, self._docs, self.split)
            rows = prompts.lens(reader, self._docs, self.directions, self.split)
            if self.labels:
                found = prompts.probe(reader, dm.tokenizer, self.labels, dm.seq_len, self.labels_path,
                                      self.probe_limit)
                help_ |= {"probe_acc": found["probe_acc"], "probe_chance": found["probe_chance"]}
        finally:
            pl_module.train(was_training)
        metrics = {f"prompts/{k}": v for k, v in help_.items() if k != "docs"}
        for r in rows:
            for key in ("entropy", "accuracy", "unembed_frac"):
                metrics[f"prompts/layer{r['layer']}/{r['where']}_{key}"] = r[key]
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)
