"""The experiment recipes reproduce their references (docs/design.md §5): data, tokenizer, task and schedule as
composed, and `debug=smoke` swaps in the offline corpus without touching the rest."""

import pytest
import torch

from conftest import compose
from ethos.checks import check
from ethos.tasks.registry import task_target

ENCODER = {"subspace_encoder_mha": ("MHA", 32), "subspace_encoder_mla": ("MLA", 16),
           "subspace_encoder_mla_o": ("MLAO", 32)}


@pytest.mark.parametrize("experiment", ENCODER)
def test_subspace_encoder_recipes(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}"], output_dir=tmp_path)
    check(cfg)
    d = cfg.data
    assert d._target_ == "ethos.data.hub.WikiText103DataModule" and d.path == "Salesforce/wikitext"
    assert d.name == "wikitext-103-raw-v1" and d.tokenizer == "bert-base-uncased" and not d.offline
    assert (d.seq_len, d.batch_size, d.mlm_probability) == (128, 256, 0.15)
    assert task_target(cfg) == "ethos.tasks.mlm.MaskedLM"
    m = cfg.model
    assert (m.n_layers, m.d_model, m.n_heads, m.ffn.d_ff, m.norm) == (6, 256, 8, 1024, "rmsnorm")
    attn, rope = ENCODER[experiment]
    assert m.attn._target_.endswith(f".{attn}") and m.rope_dims == rope
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.warmup, o.schedule) == (5e-4, 0.01, 0.1, "linear")
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (50_000, 2000)


def test_ethos_paper_recipe(tmp_path):
    cfg = compose(["experiment=ethos_paper"], output_dir=tmp_path)
    check(cfg)
    assert task_target(cfg) == "ethos.tasks.clm.CausalLM"  # the paper's causal decoder
    d = cfg.data
    assert d._target_ == "ethos.data.hub.C4DataModule" and (d.path, d.name) == ("allenai/c4", "en")
    assert d.streaming and d.tokenizer == "gpt2"
    m = cfg.model
    assert (m.d_model, m.n_layers, m.num_dense_layers) == (1024, 16, 2)
    assert (m.attn.q_latent, m.attn.kv_latent, m.attn.rope_style) == (768, 256, "decoupled")
    f = m.ffn
    assert (f.num_experts, f.d_latent, f.d_hidden, f.top_k, f.n_heads, f.d_query) == (512**2, 128, 512, 16, 8, 512)


@pytest.mark.parametrize("experiment", ["subspace_decoder_mla", "subspace_decoder_mla_o"])
def test_subspace_decoder_recipes(experiment, tmp_path):
    from ethos.checks import build_model_config
    from ethos.models.decoder import Decoder

    cfg = compose([f"experiment={experiment}"], output_dir=tmp_path)
    check(cfg)
    assert task_target(cfg) == "ethos.tasks.clm.CausalLM"
    d = cfg.data
    assert d._target_ == "ethos.data.hub.WikiText103DataModule" and d.tokenizer == "gpt2" and not d.offline
    assert (d.seq_len, d.batch_size, cfg.trainer.accumulate_grad_batches) == (1024, 128, 8)
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.head_dim, m.rope_dims, m.ffn.d_ff) == (256, 6, 8, 32, 32, 1024)
    assert (m.attn.q_latent, m.attn.kv_latent, m.attn.rope_style) == (96, 64, "partial")
    assert m.attn.get("o_latent") == (96 if experiment.endswith("_o") else None)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.max_steps) == (5e-4, 0.01, 12500)
    with torch.device("meta"):
        params = sum(p.numel() for p in Decoder(build_model_config(cfg), 50257).parameters())
    if experiment.endswith("_o"):  # MLA-o swaps W_O (256 x 256) for W_OA (256 -> 96) and W_OB (96 -> 256)
        with torch.device("meta"):
            mla = Decoder(build_model_config(compose(["experiment=subspace_decoder_mla"])), 50257)
        assert sum(p.numel() for p in mla.parameters()) - params == 6 * (256 * 256 - 96 * (256 + 256))


@pytest.mark.parametrize("experiment", [*ENCODER, "ethos_paper", "subspace_decoder_mla", "subspace_decoder_mla_o"])
def test_smoke_swaps_in_the_offline_corpus_only(experiment, tmp_path):
    full = compose([f"experiment={experiment}"], output_dir=tmp_path)
    smoke = compose([f"experiment={experiment}", "debug=smoke"], output_dir=tmp_path)
    assert smoke.data.offline and smoke.data.tokenizer is None  # no hub: its own tokenizer on the offline corpus
    assert smoke.data._target_ == full.data._target_ and smoke.model == full.model
    assert task_target(smoke) == task_target(full)
    assert smoke.trainer.max_steps == 60


@pytest.mark.slow
def test_offline_stand_in_reads_the_python_docs(tmp_path):
    from ethos.data.hub import WikiText103DataModule

    dm = WikiText103DataModule(cache_dir=str(tmp_path), offline=True)
    docs = dm.load_documents()
    assert len(docs["train"]) > 1000 and "validation" not in docs  # held out by the text pipeline
    streamed = dm.load_documents(streaming=True)
    assert next(iter(streamed["train"]))["text"] == docs["train"][0]["text"]


@pytest.mark.slow
def test_vit_recipe_and_its_offline_smoke_run(tmp_path):
    from ethos.study import train

    cfg = compose(["experiment=subspace_vit_cifar10"], output_dir=tmp_path)
    check(cfg)
    assert task_target(cfg) == "ethos.tasks.classify.ImageClassifier"
    assert (cfg.data.path, cfg.data.img_size, cfg.data.batch_size, cfg.data.offline) == ("uoft-cs/cifar10", 32, 256,
                                                                                         False)
    assert (cfg.task.patch_size, cfg.task.pool, cfg.task.label_smoothing) == (4, "cls", 0.1)
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.rope_dims, m.ffn.d_ff) == (192, 12, 12, 0, 384)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.max_steps) == (1e-3, 0.05, 19500)
    # debug=smoke: generated shapes at 32 px stand in for CIFAR-10; the model and the task stay
    smoke = compose(["experiment=subspace_vit_cifar10", "debug=smoke", "trainer.max_steps=2",
                     "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=csv"],
                    output_dir=tmp_path / "smoke")
    assert smoke.data.offline and smoke.model == cfg.model and smoke.task == cfg.task
    train(smoke)
    ckpt = torch.load(tmp_path / "smoke" / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert (hp["num_classes"], hp["img_size"], hp["patch_size"], hp["label_smoothing"]) == (6, 32, 4, 0.1)
