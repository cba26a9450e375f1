"""The encoder–decoder objective (`task=seq2seq`, docs/design.md §12): each packed document's prefix (or, with
span corruption, its corrupted text) is encoded bidirectionally, and its continuation (or the spans behind the
sentinels) is decoded causally with cross-attention to it. The same batches as the prefix-LM's, laid out in two
rows (ethos/data/prompts.py), so the two objectives see the same tokens and targets.

`encoder_layers`, `decoder_layers` (default model.n_layers each) and `cross_kv_heads` (GQA in cross-attention;
null: MHA) size the model; `EncoderDecoder.param_count` and `flops_per_token` give its cost in closed form to
match a decoder at equal parameters or FLOPs (experiment=prompt_encoding does).
"""

from torch import Tensor

from ethos.errors import ConfigError
from ethos.models.config import ModelConfig
from ethos.models.seq2seq import EncoderDecoder, cross_mask
from ethos.optim import OptimConfig
from ethos.tasks.prefix_lm import PrefixLM, check_paradigms, plain
from ethos.types import NonNegativeInt, OpenUnit, PositiveFloat, PositiveInt


class Seq2Seq(PrefixLM):
    seq2seq = True

    @staticmethod
    def check_options(cfg) -> None:
        t = cfg.task
        check_paradigms(dict(t.get("paradigms") or {"prefix": 1.0}), allowed=("prefix", "span"))
        PrefixLM.check_options(cfg)
        kv = t.get("cross_kv_heads")
        if kv is not None and (kv < 1 or cfg.model.n_heads % kv):
            valid = ", ".join(str(g) for g in range(1, cfg.model.n_heads + 1) if cfg.model.n_heads % g == 0)
            raise ConfigError(f"task.cross_kv_heads={kv}: must divide model.n_heads={cfg.model.n_heads} "
                              f"(valid: {valid}, or null for MHA)")

    def __init__(self, model: ModelConfig, optim: OptimConfig, vocab_size: int, pad_id: int = 0,
                 paradigms: dict[str, float] | None = None, prefix_range: tuple[float, float] = (0.25, 0.75),
                 prefix_sep: str | None = None, mode_tokens: bool = False, span_density: OpenUnit = 0.15,
                 span_mean: PositiveFloat = 3.0, n_sentinels: NonNegativeInt = 100,
                 encoder_layers: PositiveInt | None = None, decoder_layers: PositiveInt | None = None,
                 cross_kv_heads: PositiveInt | None = None):
        paradigms, prefix_range = plain(paradigms), plain(prefix_range)  # see PrefixLM
        self.sizes = dict(encoder_layers=encoder_layers, decoder_layers=decoder_layers, cross_kv_heads=cross_kv_heads)
        super().__init__(model, optim, vocab_size, pad_id, paradigms=paradigms, prefix_range=prefix_range,
                         prefix_sep=prefix_sep, mode_tokens=mode_tokens, span_density=span_density,
                         span_mean=span_mean, n_sentinels=n_sentinels)
        for key in ("prefix_loss", "prefix_loss_weight", "mlm_probability"):  # PrefixLM's, not ours: a checkpoint
            self.hparams.pop(key, None)  # rebuilds the task from its hyperparameters (ethos.pretrained.load_task)
        if model.compile:  # the decoder trunk is compiled by PrefixLM
            self.model.encoder.compile()

    @classmethod
    def finetune_options(cls, task_cfg) -> dict:
        """A fine-tune reads the encoder, mean-pooled (T5's encoder for classification)."""
        sizes = {k: task_cfg.get(k) for k in ("encoder_layers", "decoder_layers", "cross_kv_heads")}
        return {**super().finetune_options(task_cfg), "backbone": "seq2seq", "pooling": "mean", "prefix": False,
                "seq2seq": sizes}

    def build_model(self, model: ModelConfig, vocab_size: int, pad_id: int) -> EncoderDecoder:
        return EncoderDecoder(model, vocab_size, pad_id, **self.sizes)

    def flops_per_token(self, batch_size: int, tokens_per_sample: int) -> float:
        return self.model.flops_per_token(seq_len=tokens_per_sample, batch_size=batch_size)

    def forward_hidden(self, batch: dict, prefix: bool = True) -> Tensor:
        m = self.model
        memory = m.encode(batch["enc_input_ids"], batch["enc_attention_mask"], batch.get("enc_doc_ids")
                          if "doc_ids" in batch else None, batch.get("enc_positions"))
        cross = cross_mask(batch["dec_doc_ids"], batch["enc_doc_ids"], batch["enc_attention_mask"],
                           by_document="doc_ids" in batch)
        return m.decode(batch["input_ids"], memory, cross, batch["attention_mask"], batch.get("doc_ids"),
                        batch.get("positions"))
