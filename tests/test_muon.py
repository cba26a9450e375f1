"""optim=muon: the optimizer rule for every model, the composite's updates against standalone torch Muon and
AdamW, a state_dict that resumes bit for bit, and a training run stopped and resumed to the same state."""

import io
import re
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from test_optim import BACKBONES, EXTRA, MODELS, build_task
from test_train import metrics, resume_cfg

from conftest import compose
from ethos.checks import check
from ethos.config import CONF_DIR
from ethos.errors import ConfigError
from ethos.optim import LRSchedule, MuonAdamW, OptimConfig
from ethos.study import train

# The rule spelled out by name: every parameter of every model must match patterns of exactly one list.
# A new kind of parameter fails the test until it is listed here.
MUON = [  # the weight-decayed matrices of the Transformer blocks
    r"^model\.trunk\.blocks\.\d+\.attn\.(qkv|out|qkv_a|q_b|kv_b|o_a|o_b)\.weight$",  # MHA, MLA, MLA-o
    r"^model\.trunk\.blocks\.\d+\.attn\.attend\.gate\.weight$",  # the output gate's W_g
    r"^model\.trunk\.blocks\.\d+\.ffn\.(shared\.)?(w13|w1|w2)\.weight$",  # dense FFNs (SwiGLU, MLP), MoE's shared
    r"^model\.trunk\.blocks\.\d+\.ffn\.gate\.weight$",  # MoE's router
    r"^model\.trunk\.blocks\.\d+\.ffn\.router\.query\.weight$",  # the product-key router's query projection
    r"^model\.trunk\.blocks\.\d+\.ffn\.(w1|w_u|w_v)$",  # ETHOS's generator: shared projections
]
ADAMW = [  # everything else
    r"norm\.(weight|bias)$",  # every norm: blocks, final, MLA's latent norms, QK-norm, the router's BatchNorm
    r"\.bias$",  # every bias
    r"^model\.embed\.weight$",  # token embedding (and the tied vocabulary head)
    r"^model\.lm_head\.weight$",  # the untied vocabulary head
    r"^model\.pos_embed(\.weight)?$",  # learned positions (text table, ViT parameter)
    r"^model\.cls_token$",
    r"^model\.mlm_bias$",
    r"^model\.patch_embed\.proj\.weight$",  # ViT patch projection (a conv)
    r"^model\.head\.weight$",  # classifier
    r"\.router\.sub_keys$",  # product keys (PEER and ETHOS alike)
    r"\.ffn\.(down|up)\.weight$",  # PEER's expert tables u_i, v_i
    r"\.ffn\.latents$",  # ETHOS's expert table z_i
    r"\.ffn\.(w13|w2)$",  # MoE's routed experts: 3-D (E, d, 2f), (E, f, d); torch's Muon takes matrices only
    r"\.attn\.attend\.sink$",  # score=sink: learned per-head null logits
]
# every attention and FFN option on the default model, too (new ones are picked up as they appear)
PARTS = {f"{part}-{o.stem}": [f"model/{part}={o.stem}"] for part in ("attn", "ffn")
         for o in sorted((CONF_DIR / "model" / part).glob("*.yaml"))}
VARIANTS = {**EXTRA, **PARTS, "untied-head": ["model.tie_embeddings=false"],
            "qk-norm": ["model=mla", "model.attn.qk_norm=true", "model.attn.rope_style=decoupled"]}


def expected_muon(name: str) -> bool:
    yes = [p for p in MUON if re.search(p, name)]
    no = [p for p in ADAMW if re.search(p, name)]
    assert bool(yes) != bool(no), f"{name}: matches {yes + no} (list it in exactly one table)"
    return bool(yes)


def configured(task, max_steps: int = 20):
    task._trainer = SimpleNamespace(max_steps=max_steps, estimated_stepping_batches=max_steps)
    conf = task.configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("model", MODELS + list(VARIANTS))
def test_optimizer_rule_for_every_model(model, backbone, tmp_path):
    overrides = [*BACKBONES[backbone], *(VARIANTS[model] if model in VARIANTS else [f"model={model}"])]
    with torch.device("meta"):
        task = build_task(["optim=muon", *overrides], tmp_path)
        opt, _ = configured(task)
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = dict(task.named_parameters())
    assert not muon & adamw and len(muon) + len(adamw) == len(names), "every parameter in exactly one optimizer"
    for name, p in names.items():
        assert (id(p) in muon) == expected_muon(name), f"{name}: {'Muon' if id(p) in muon else 'AdamW'}"
    assert muon and adamw
    # the joint groups are the inner optimizers' own dicts, at each optimizer's lr
    assert all(a is b for a, b in zip(opt.param_groups, opt.muon.param_groups + opt.adamw.param_groups, strict=True))
    assert {g["initial_lr"] for g in opt.muon.param_groups} == {0.02}
    assert {g["initial_lr"] for g in opt.adamw.param_groups} == {task.optim.lr}


def test_adamw_is_unchanged_by_the_new_keys(tmp_path):
    with torch.device("meta"):
        opt, _ = configured(build_task(["model=ethos"], tmp_path))
    assert type(opt) is torch.optim.AdamW and all("muon" not in g for g in opt.param_groups)


def test_muon_with_fsdp_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        check(compose(["debug=tiny", "optim=muon", "trainer=fsdp"], output_dir=tmp_path))
    assert "optim.name=muon" in str(err.value) and "trainer=fsdp" in str(err.value)
    assert "\n" not in str(err.value)


def test_finetune_scales_both_optimizers_and_a_probe_has_adamw_only(tmp_path):
    from ethos.tasks.classify import ImageClassifier

    model_cfg, _ = check(compose(["task=classify", "data=shapes", "debug=tiny"], output_dir=tmp_path))
    o = OptimConfig(name="muon", lr=1e-2, muon_lr=0.04, weight_decay=0.1, muon_weight_decay=0.01)
    task = ImageClassifier(model_cfg, o, num_classes=6, img_size=32, patch_size=4)
    task.pretrained_lr_scale, task.fresh = 0.05, ("head.",)  # what adopt_backbone sets for a loaded backbone
    opt, _ = configured(task)
    lr_of = {id(p): (g["initial_lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    params = dict(task.named_parameters())
    assert lr_of[id(params["model.trunk.blocks.0.attn.qkv.weight"])] == (pytest.approx(0.04 * 0.05), 0.01)
    assert lr_of[id(params["model.patch_embed.proj.weight"])] == (pytest.approx(1e-2 * 0.05), 0.1)
    assert lr_of[id(params["model.trunk.norm.weight"])] == (pytest.approx(1e-2 * 0.05), 0.0)
    assert lr_of[id(params["model.head.weight"])] == (1e-2, 0.1)  # the fresh head at the full lr

    probe = ImageClassifier(model_cfg, o, num_classes=6, img_size=32, patch_size=4, freeze=True)
    opt, _ = configured(probe)  # nothing of the trunk trains: plain AdamW over the head
    assert type(opt) is torch.optim.AdamW
    assert [p for g in opt.param_groups for p in g["params"]] == [probe.model.head.weight, probe.model.head.bias]


# -- the composite's arithmetic, against torch's optimizers used alone ---------------------------------------
MUON_RUN = OptimConfig(name="muon", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, muon_lr=0.02,
                muon_momentum=0.9, muon_nesterov=True, muon_ns_steps=5, muon_weight_decay=0.05, warmup=2,
                schedule="wsd", decay_fraction=0.5, min_lr_ratio=0.1)
PICKED = {"hidden": "model.trunk.blocks.1.ffn.w2.weight", "head": "model.lm_head.weight",
          "embed": "model.embed.weight", "norm": "model.trunk.blocks.0.attn_norm.weight"}
STEPS = 8


def clm_task(tmp_path, o: OptimConfig = MUON_RUN):
    task = build_task(["task=clm", "model.tie_embeddings=false"], tmp_path)
    task.optim = o
    return task


def references(task, o: OptimConfig) -> dict[str, tuple[torch.nn.Parameter, torch.optim.Optimizer]]:
    """One standalone optimizer per picked parameter, with the hyperparameters the rule gives it."""
    params = dict(task.named_parameters())
    out = {}
    for key, name in PICKED.items():
        p = torch.nn.Parameter(params[name].detach().clone())
        if key == "hidden":
            opt = torch.optim.Muon([p], lr=o.muon_lr, weight_decay=o.muon_weight_decay, momentum=o.muon_momentum,
                                   nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps)
        else:
            wd = o.weight_decay if key == "head" else 0.0  # decayed: the head's matrix; not: embeddings, norms
            opt = torch.optim.AdamW([p], lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=wd)
        out[key] = p, opt
    return out


def random_grads(task, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {n: torch.randn(p.shape, generator=gen) for n, p in task.named_parameters()}


def test_each_parameter_moves_as_its_optimizer_alone_would(tmp_path):
    task = clm_task(tmp_path)
    opt, sched = configured(task, STEPS)
    refs = references(task, MUON_RUN)
    ref_scheds = [torch.optim.lr_scheduler.LambdaLR(r, LRSchedule("wsd", 2, STEPS, 0.1, 0.5)) for _, r in refs.values()]
    params = dict(task.named_parameters())
    factors = []
    for step in range(STEPS):
        grads = random_grads(task, step)
        for n, p in params.items():
            p.grad = grads[n].clone()
        for key, (p, _) in refs.items():
            p.grad = grads[PICKED[key]].clone()
        factors.append(opt.param_groups[0]["lr"] / MUON_RUN.muon_lr)
        opt.step()
        sched.step()
        for (_, r), s in zip(refs.values(), ref_scheds):
            r.step()
            s.step()
        opt.zero_grad()
        for key, (p, _) in refs.items():
            assert torch.equal(params[PICKED[key]], p), f"{key} after step {step}"
    # warm-up (0, 0.5), stable (1, 1), then the decay to 0.1 over the last half (1, 0.775, 0.55, 0.325)
    assert factors == pytest.approx([0, 0.5, 1, 1, 1, 0.775, 0.55, 0.325])
    assert all(p.grad is None for p in params.values())  # zero_grad reaches both optimizers' parameters
    hidden, head = params[PICKED["hidden"]], params[PICKED["head"]]
    assert set(opt.state[hidden]) == {"momentum_buffer"} and set(opt.state[head]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(opt.state[hidden]["momentum_buffer"], refs["hidden"][1].state[refs["hidden"][0]]
                               ["momentum_buffer"], rtol=0, atol=0)


def test_the_closure_runs_once_and_its_loss_is_returned(tmp_path):
    opt, _ = configured(clm_task(tmp_path))
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(3.0)

    assert opt.step(closure) == 3.0 and calls == [1]


def checkpoint_bytes(obj) -> dict:
    """Through torch.save and torch.load, as a checkpoint goes (no tensor shared with the live optimizer)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def run_steps(task, opt, sched, steps: range) -> None:
    for step in steps:
        for n, g in random_grads(task, step).items():
            dict(task.named_parameters())[n].grad = g
        opt.step()
        sched.step()
        opt.zero_grad()


def test_a_restored_composite_continues_bit_for_bit(tmp_path):
    task = clm_task(tmp_path)
    opt, sched = configured(task, STEPS)
    run_steps(task, opt, sched, range(3))
    saved = checkpoint_bytes({"model": task.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})

    # torch's own format over the joint groups: parameters numbered across them, Muon's first
    n_muon = sum(len(g["params"]) for g in opt.muon.param_groups)
    ids = [i for g in saved["opt"]["param_groups"] for i in g["params"]]
    assert ids == list(range(len(ids))) and set(saved["opt"]["state"]) == set(ids)
    assert all(set(saved["opt"]["state"][i]) == {"momentum_buffer"} for i in range(n_muon))
    assert all("exp_avg" in saved["opt"]["state"][i] for i in ids[n_muon:])

    resumed = clm_task(tmp_path)  # a fresh process: new weights, optimizer and schedule, then the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = configured(resumed, STEPS)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    _optimizer_to_device(opt2, torch.device("cpu"))  # as Lightning does after loading
    # after the load the joint groups and state are still the inner optimizers' own
    assert all(a is b for a, b in zip(opt2.param_groups, opt2.muon.param_groups + opt2.adamw.param_groups,
                                      strict=True))
    assert opt2.state is opt2.muon.state is opt2.adamw.state and len(opt2.state) == len(ids)

    run_steps(task, opt, sched, range(3, STEPS))
    run_steps(resumed, opt2, sched2, range(3, STEPS))
    for (n, a), b in zip(task.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, s in a["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


# -- end to end: a run stopped and resumed under optim=muon equals one run straight through ------------------
ON_MUON = ("optim=muon",)


@pytest.mark.slow
def test_resumed_muon_run_continues_with_identical_state(cache_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(resume_cfg(straight, 10, ON_MUON))
    train(resume_cfg(split, 6, ON_MUON))  # stops at 6 ...
    train(resume_cfg(split, 10, ON_MUON))  # ... and the same command with more steps resumes there
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (straight, split))
    assert a["global_step"] == b["global_step"] == 10
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    kinds = {frozenset(s) for s in sa.values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}  # both saved
    for i in sa:
        for k in sa[i]:
            torch.testing.assert_close(sb[i][k], sa[i][k], rtol=1e-6, atol=1e-9, msg=f"{i}.{k}")
    steps = [s for s, _ in metrics(split)["train/loss"]]
    assert len(steps) == len(set(steps)) == 10
    assert any(k.startswith("lr-MuonAdamW") for k in metrics(split))  # the LR monitor sees the joint groups

