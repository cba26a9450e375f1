"""Tokenizers for the text pipeline: training one here (BERT-style WordPiece or byte-level BPE, both with
BERT's special tokens) and the special ids (block start, document separator, pad) of any tokenizer."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ethos.errors import ConfigError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts, vocab_size: int, path: Path, kind: str = "wordpiece") -> PreTrainedTokenizerFast:
    """BERT-uncased-style WordPiece, or byte-level BPE, trained with HF `tokenizers` and saved as a
    transformers tokenizer. Both get the same BERT special tokens, so MLM and CLM work with either."""
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    else:  # byte-level BPE (GPT-2 style): no unknown tokens, case kept
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(path))
    return fast


def special_ids(tokenizer) -> tuple[int | None, int, int]:
    """(block start, document separator, pad): BERT's [CLS]/[SEP]/[PAD], else BOS/EOS (GPT-2 style)."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if sep is None:
        raise ConfigError(f"data.tokenizer={tokenizer.name_or_path!r}: has neither a SEP nor an EOS token "
                          "to separate documents")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep  # masked by length, not id
    return start, sep, pad
