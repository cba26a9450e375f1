"""T5-style span corruption of one document, for a decoder (docs/design.md §12).

Raffel et al. (2020) §3.1.4 and Tay et al. (UL2, 2022): a fraction `density` of the tokens, in spans of mean
length `mean_span`, is cut out; each span is replaced by one sentinel in the input, and the target lists every
sentinel followed by the span it stands for:

    original   a b c d e f g h
    corrupted  a <0> d e <1> h          (the input: the model reads it, no loss on it)
    targets    <0> b c <1> f g          (the continuation: next-token loss on every token, sentinels included)

The counts follow T5's `random_spans_noise_mask`: round(n x density) noise tokens (at least 1, at most n - 1)
in round(noise / mean_span) spans (at least 1), the span lengths and the gaps between them random partitions,
the document opening with kept tokens. A document grows by 2 x spans tokens; the caller fits it to its row.
"""

import torch


def partition(total: int, parts: int, g: torch.Generator) -> list[int]:
    """`total` split into `parts` positive lengths, uniformly over the compositions."""
    cuts = (torch.randperm(total - 1, generator=g)[:parts - 1] + 1).sort().values.tolist()
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def span_counts(n: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) for a document of n >= 2 tokens."""
    noise = min(max(1, round(n * density)), n - 1)
    spans = max(1, min(round(noise / mean_span), noise, n - noise))
    return noise, spans


def corrupt(n: int, density: float, mean_span: float, g: torch.Generator) -> list[tuple[int, int]]:
    """The noise spans [start, end) of a document of n >= 2 tokens, in order."""
    noise, m = span_counts(n, density, mean_span)
    noisy, kept = partition(noise, m, g), partition(n - noise, m, g)
    spans, at = [], 0
    for keep, cut in zip(kept, noisy):
        at += keep
        spans.append((at, at + cut))
        at += cut
    return spans


def apply(tokens: list[int], spans: list[tuple[int, int]], sentinels: list[int]) -> tuple[list[int], list[int],
                                                                                           list[int], list[int]]:
    """(corrupted input, targets, and the original index of every input and target token, -1 for a sentinel)."""
    inp, tgt, inp_at, tgt_at, at = [], [], [], [], 0
    for i, (s, e) in enumerate(spans):
        inp += tokens[at:s] + [sentinels[i]]
        inp_at += [*range(at, s), -1]
        tgt += [sentinels[i]] + tokens[s:e]
        tgt_at += [-1, *range(s, e)]
        at = e
    return inp + tokens[at:], tgt, inp_at + list(range(at, len(tokens))), tgt_at


def restore(inp: list[int], tgt: list[int], sentinels: list[int]) -> list[int]:
    """The original document from its corrupted input and targets: every sentinel of the input replaced by
    what follows the same sentinel in the targets, up to the next one."""
    fill, cur = {}, None
    where = {s: i for i, s in enumerate(sentinels)}
    for t in tgt:
        if t in where:
            cur = t
            fill[cur] = []
        elif cur is None:
            raise ValueError("targets must open with a sentinel")
        else:
            fill[cur].append(t)
    out = []
    for t in inp:
        out += fill.pop(t) if t in where else [t]
    if fill:
        raise ValueError(f"sentinels in the targets but not in the input: {sorted(fill)}")
    return out
