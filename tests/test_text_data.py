"""Text data: packing, truncation, whole-word masking, hub layouts read offline, local files, streaming."""

import csv
import itertools
import json
import logging
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling

from conftest import compose, run_cli
from ethos.config import instantiate
from ethos.data.collate import MLMCollator
from ethos.data.hub import DataUnavailable, TextFilesDataModule, WikipediaDataModule, WikiText103DataModule
from ethos.data.packing import Blocks, pack
from ethos.data.sampling import sample_seed
from ethos.data.tokenizer import train_tokenizer
from ethos.errors import ConfigError
from ethos.study import train

NOUNS = ["cat", "dog", "bird", "horse", "teacher", "student", "farmer", "doctor"]
VERBS = ["sees", "chases", "helps", "follows"]
ADJS = ["big", "small", "happy", "quiet", "unbelievable", "extraordinary"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """A small grammar: learnable in a few dozen steps, with long words that split into pieces."""
    rng = random.Random(seed)
    return [f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(ADJS)} "
            f"{rng.choice(NOUNS)} ." for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(sentences(500), 90, tmp_path_factory.mktemp("tok"))


def test_pack_reconstructs_the_token_stream(tok):
    docs = sentences(300) + ["", "a much longer line " * 20]
    blocks, stats = pack(Dataset.from_dict({"text": docs}), tok, 16)
    stream = [t for d in docs if d for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
    rows = blocks["input_ids"]
    assert all(r[0] == tok.cls_token_id and len(r) == 16 for r in rows)
    body = [t for r in rows for t in r[1:]]
    assert body == stream[:len(body)] and len(stream) - len(body) < 15  # only the tail is dropped
    assert stats["documents"] == 301 and stats["empty_documents"] == 1 and stats["padding"] == 0
    assert stats["tokens"] == len(stream) - 301  # document tokens, separators not counted


def test_truncate_mode_pads_and_reports_padding(tok):
    docs = sentences(40) + ["the cat sees the dog " * 10]
    blocks, stats = pack(Dataset.from_dict({"text": docs}), tok, 12, packing="truncate")
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    want = [[tok.cls_token_id] + x[:10] + [tok.sep_token_id] for x in ids]
    assert blocks["input_ids"] == want
    real = sum(map(len, want))
    assert stats["padding"] == pytest.approx(1 - real / (12 * len(want)))
    assert stats["truncated_tokens"] == sum(max(0, len(x) - 10) for x in ids) > 0
    batch = MLMCollator(tok, seq_len=12)([{"input_ids": r} for r in want])
    assert batch["input_ids"].shape == (len(want), 12)
    assert batch["attention_mask"].sum(1).tolist() == [len(r) for r in want]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding is never a target
    pads = batch["input_ids"][batch["attention_mask"] == 0]
    assert (pads == tok.pad_token_id).all()


def test_mlm_masks_match_transformers_with_the_same_seed(tok):
    """Each row is transformers' masking of that row alone, seeded by (seed, micro-batch, global position);
    without a position the row in the batch is the position (one process)."""
    blocks, _ = pack(Dataset.from_dict({"text": sentences(200)}), tok, 16)
    items = [{"input_ids": r, "batch_idx": 7} for r in blocks["input_ids"][:8]]
    ours = MLMCollator(tok, seed=3, seq_len=16)(items)
    ref = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    for r, it in enumerate(items):
        ref.generator = torch.Generator().manual_seed(sample_seed(3, 7, r))
        ids, labels = ref.torch_mask_tokens(torch.tensor([it["input_ids"]]))
        assert torch.equal(ours["input_ids"][r], ids[0]) and torch.equal(ours["labels"][r], labels[0])
    at = MLMCollator(tok, seed=3, seq_len=16)([{**it, "batch_pos": 8 + r} for r, it in enumerate(items)])
    assert not torch.equal(at["labels"] != -100, ours["labels"] != -100)  # other positions, other masks


def test_whole_word_masking_masks_all_pieces_together(tok):
    docs = sentences(200, seed=1)
    blocks, _ = pack(Dataset.from_dict({"text": docs}), tok, 24, words=True)
    rows = blocks.select(range(16))
    for r in rows:  # stored word starts follow WordPiece: a '##' piece continues the word before
        toks = tok.convert_ids_to_tokens(r["input_ids"])
        assert [int(not t.startswith("##")) for t in toks] == r["word_start"]
    items = [{**r, "batch_idx": 5} for r in rows]
    out = MLMCollator(tok, mlm_probability=0.3, seed=0, seq_len=24, whole_word_mask=True)(items)
    masked_multi = 0
    for r, labels, inp in zip(rows, out["labels"], out["input_ids"]):
        ids = torch.tensor(r["input_ids"])
        special = torch.isin(ids, torch.tensor(tok.all_special_ids))
        # a word starts at a stored word start or after a special token (a block may open mid-word)
        new = torch.tensor(r["word_start"]).bool() | torch.cat([torch.tensor([True]), special[:-1]])
        word = new.long().cumsum(0).masked_fill(special, -1)
        m = labels != -100
        assert not m[special].any()
        for w in word[~special].unique():
            sel = word == w
            assert m[sel].all() or not m[sel].any()  # all pieces of a word, or none
            masked_multi += int(m[sel].all() and sel.sum() > 1)
        assert (inp[m] == tok.mask_token_id).all()
        assert torch.equal(labels[m], ids[m])
    assert masked_multi > 0  # some multi-piece word was masked (the property is not vacuous)


# -- hub layouts, read offline by the real load_dataset path -------------------------------------
def write_parquet(path: Path, rows: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


def hub_readme(name: str, splits: list[str]) -> str:
    files = "".join(f"  - split: {s}\n    path: {name}/{s}-*\n" for s in splits)
    return f"---\nconfigs:\n- config_name: {name}\n  data_files:\n{files}---\n# local copy\n"


def test_wikipedia_layout_reads_offline(tmp_path, tok):
    root, name = tmp_path / "wikipedia", "20231101.en"
    text = sentences(400, seed=2)
    write_parquet(root / name / "train-00000-of-00001.parquet", {
        "id": [str(i) for i in range(400)], "url": [f"https://en.wikipedia.org/wiki?curid={i}" for i in range(400)],
        "title": [f"Article {i}" for i in range(400)], "text": text})
    (root / "README.md").write_text(hub_readme(name, ["train"]))
    dm = WikipediaDataModule(cache_dir=str(tmp_path / "cache"), path=str(root), name=name, vocab_size=120,
                             seq_len=16, val_fraction=0.1, tokenizer_docs=200)
    dm.prepare_data()
    dm.setup("fit")
    s = dm.stats
    assert (s["train"]["documents"], s["validation"]["documents"]) == (360, 40)  # held out: 10%
    # id/url/title dropped; each token's document start and UTF-8 bytes kept (tests/test_docs_data.py)
    assert dm.splits["train"].column_names == ["input_ids", "doc_start", "bytes"]
    t = dm.tokenizer
    body = [x for r in dm.splits["validation"]["input_ids"] for x in r[1:]]
    segments = t.decode(body).split(t.sep_token)[1:-1]  # whole articles between separators
    squeeze = {x.replace(" ", "") for x in text}  # decode re-spaces punctuation
    assert len(segments) > 20 and all(seg.replace(" ", "") in squeeze for seg in segments)
    assert (dm.data_dir / "tokenizer" / "tokenizer.json").is_file()


def test_wikitext_layout_uses_its_validation_split(tmp_path):
    root, name = tmp_path / "wikitext", "wikitext-103-raw-v1"
    splits = {"train": sentences(300, 3), "validation": [""] + sentences(30, 4), "test": ["never read"] * 5}
    for split, lines in splits.items():
        write_parquet(root / name / f"{split}-00000-of-00001.parquet", {"text": lines})
    (root / "README.md").write_text(hub_readme(name, list(splits)))
    dm = WikiText103DataModule(cache_dir=str(tmp_path / "cache"), path=str(root), vocab_size=120, seq_len=16,
                               packing="truncate")
    dm.prepare_data()
    dm.setup("fit")
    assert set(dm.splits) == {"train", "validation"}  # the test split is never loaded
    v = dm.stats["validation"]
    assert (v["documents"], v["empty_documents"], v["blocks"]) == (30, 1, 30)  # one block per line
    assert 0 < v["padding"] < 1


def test_hub_unreachable_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: like no network
    dm = WikipediaDataModule(cache_dir=str(tmp_path))
    t = time.time()
    with pytest.raises(DataUnavailable, match="could not be reached.*data.data_files=") as err:
        dm.prepare_data()
    assert time.time() - t < 5 and "\n" not in str(err.value)
    assert isinstance(err.value, ConfigError)  # cli prints it as one line, exit code 2


@pytest.mark.slow
def test_cli_data_wiki_offline_one_line(tmp_path):
    res = run_cli(["data=wiki", "logger=csv", "print_config=false"], cwd=tmp_path, timeout=120,
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 2, res.stderr[-2000:]
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("ethos: data unavailable:")]
    assert len(err) == 1 and "wikimedia/wikipedia" in err[0] and "HF_DATASETS_OFFLINE=1" in err[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout


# -- local files -------------------------------------------------------------------------------
def test_missing_files_fail_in_the_constructor(tmp_path):
    cfg = compose(["data=text_files", f"data.data_files={tmp_path}/nope.txt"], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        instantiate(cfg.data)
    msg = str(err.value)
    assert msg.startswith(f"data.data_files='{tmp_path}/nope.txt'") and "valid:" in msg and "\n" not in msg
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ConfigError, match=r"data.data_files=.*\.csv.*valid"):
        TextFilesDataModule(cache_dir=str(tmp_path), data_files=str(tmp_path / "a.csv"))


def test_jsonl_column_and_empty_file_skipped(tmp_path, caplog):
    lines = sentences(200, 5)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"content": t, "n": i}) + "\n" for i, t in enumerate(lines)))
    (tmp_path / "b.jsonl").write_text("")
    dm = TextFilesDataModule(cache_dir=str(tmp_path / "cache"), data_files=[str(tmp_path / "*.jsonl")],
                             text_column="content", vocab_size=120, seq_len=16)
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
    assert "skipped 1 empty file(s)" in caplog.text and "b.jsonl" in caplog.text
    dm.setup()
    assert dm.stats["train"]["documents"] + dm.stats["validation"]["documents"] == 200


def stream_position(loader_state: dict) -> dict:
    """StreamBlocks' state inside a StatefulDataLoader state (single process or its one worker)."""
    if loader_state.get("dataset_state") is not None:
        return loader_state["dataset_state"]
    workers = loader_state["_snapshot"]["_worker_snapshots"]
    return next(iter(workers.values()))["dataset_state"]


def streaming_dm(tmp_path: Path, workers: int = 0, shards: int = 3) -> TextFilesDataModule:
    if not (tmp_path / "empty.txt").exists():  # other processes of a test reuse the files (and tokenizer)
        for i in range(shards):
            (tmp_path / f"part{i}.txt").write_text("\n".join(sentences(150, 6 + i)))
        (tmp_path / "empty.txt").write_text("")
    dm = TextFilesDataModule(cache_dir=str(tmp_path / "cache"), data_files=str(tmp_path / "*.txt"),
                             vocab_size=120, seq_len=16, batch_size=4, streaming=True, val_docs=20,
                             shuffle_buffer=50, num_workers=workers)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_resume_seeks_to_the_exact_next_batch(tmp_path, workers):
    """A loader restored from the state saved after batch k yields batches k, k+1, ... of the straight
    run: at every k (one worker: at every window and pass boundary), masks included."""
    dm = streaming_dm(tmp_path, workers)
    n = 200  # passes of ~80 batches, windows of 50 documents
    dl = dm.train_dataloader()
    assert len(dl) == 1000  # the whole run (no trainer: 1000 steps), so Lightning fetches no batch ahead
    it = iter(dl)
    straight, states = [], [dl.state_dict()]
    for k in range(n):
        straight.append(next(it))
        states.append(dl.state_dict())
        if k % 25 == 3:  # validation reads the same files in between (Lightning: val_check_interval)
            assert len(list(dm.val_dataloader())) > 0
    del it
    pos = [stream_position(s) for s in states]
    assert [p["b"] for p in pos] == list(range(n + 1))
    new_pass = [k for k in range(1, n + 1) if pos[k]["epoch"] != pos[k - 1]["epoch"]]
    new_window = [k for k in range(1, n + 1) if pos[k]["window"] != pos[k - 1]["window"]]
    assert len(new_pass) >= 2 and len(new_window) > 10
    assert not torch.equal(straight[0]["input_ids"], straight[new_pass[0]]["input_ids"])  # passes reshuffled
    if workers == 0:
        ks = range(n - 1)
    else:
        ks = sorted({0, 1, n - 2} | {k + d for k in new_pass + new_window[:4] for d in (-1, 0, 1)})
    for k in ks:
        resumed = dm.train_dataloader()
        resumed.load_state_dict(states[k])
        it = iter(resumed)
        assert same_batches([next(it), next(it)], straight[k:k + 2]), k
        del it
    k = new_pass[0] - 1  # and the whole tail from just before a pass boundary
    resumed = dm.train_dataloader()
    resumed.load_state_dict(states[k])
    assert same_batches(list(itertools.islice(resumed, n - k)), straight[k:])

    val = list(dm.val_dataloader())
    n_val = sum(int(b["attention_mask"].sum()) for b in val)
    assert 0 < n_val <= 20 * 16  # the 20 held-out lines only


def test_streaming_resume_reads_one_window_not_the_consumed_stream(tmp_path, monkeypatch):
    dm = streaming_dm(tmp_path)
    tokenized = []
    tokenize = Blocks.tokenize
    monkeypatch.setattr(Blocks, "tokenize", lambda self, batch: tokenized.append(len(batch["text"])) or
                        tokenize(self, batch))
    dl = dm.train_dataloader()
    it = iter(dl)
    for _ in range(200):
        next(it)
    state = dl.state_dict()
    assert stream_position(state)["epoch"] == 2 and sum(tokenized) > 800  # two passes consumed
    expected = next(it)
    del it
    tokenized.clear()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert same_batches([next(iter(resumed))], [expected])
    assert sum(tokenized) <= 50  # the current window's documents at most (shuffle_buffer=50)


def _resume_on_rank(rank: int, world: int, tmp_path: Path, port: int) -> None:
    """One process of a CPU 'DDP' job: the state saved by rank 0 alone must resume every rank."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dm = streaming_dm(tmp_path, shards=4)
    dm.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, max_steps=1000, global_rank=rank,
                                 world_size=world, lightning_module=None)
    dl = dm.train_dataloader()
    it = iter(dl)
    first = [next(it) for _ in range(60)]  # several windows in: the ranks are at different positions
    state = dl.state_dict()  # collective, like Lightning's checkpoint dump on every rank
    expected = [next(it) for _ in range(3)]
    if rank == 0:  # only rank 0 writes the checkpoint
        torch.save(state, tmp_path / "state.pt")
    dist.barrier()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    it = iter(resumed)
    got = [next(it) for _ in range(3)]
    torch.save({"same": same_batches(got, expected), "first": first[0]["input_ids"], "n": len(state["ranks"])},
               tmp_path / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_streaming_resume_under_ddp_restores_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    streaming_dm(tmp_path, shards=4)  # files and tokenizer, once
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_resume_on_rank, args=(2, tmp_path, port), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["n"] == r1["n"] == 2
    assert r0["same"] and r1["same"]
    assert not torch.equal(r0["first"], r1["first"])  # the ranks read different shards


@pytest.mark.slow
def test_short_run_text_files_loss_falls(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"part{i}.txt").write_text("\n".join(sentences(1500, 10 + i)))
    (tmp_path / "corpus" / "empty.txt").write_text("")
    cfg = compose(["debug=tiny", "logger=csv", "data=text_files", f"data.data_files='{tmp_path}/corpus/*.txt'",
                   "data.vocab_size=200", "data.seq_len=32", f"data.cache_dir={tmp_path}/cache",
                   "trainer.max_steps=40", "trainer.val_check_interval=10", "optim.lr=3e-3",
                   "callbacks=none"], output_dir=tmp_path / "run")
    final = train(cfg)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 5 and val[-1] < val[1] - 0.3 < val[0], val  # val[0]: untrained, step 0
    assert final == pytest.approx(val[-1])
    # the same masked tokens at every validation (eval masks are seeded by the sample): a constant bpb / loss
    bpb = [float(r["val/bpb"]) for r in rows if r.get("val/bpb")]
    assert len(bpb) == 5 and all(b / v == pytest.approx(bpb[0] / val[0], rel=1e-5) for b, v in zip(bpb, val))
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()  # copied beside the run
