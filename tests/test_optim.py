"""The training maths every task shares: one weight-decay rule, and the LR schedule value by value."""

import math
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import compose
from ethos.checks import check
from ethos.config import CONF_DIR
from ethos.optim import LRSchedule, OptimConfig, schedule
from ethos.tasks.registry import task_for

# Every parameter of every model must match patterns of exactly one of the two lists: the rule, spelled
# out by name. A new kind of parameter fails the test until it is listed here.
NO_DECAY = [
    r"norm\.(weight|bias)$",                       # RMSNorm / LayerNorm gains, the router's BatchNorm
    r"\.bias$",                                    # every bias
    r"^model\.embed\.weight$",                     # token embedding (and the tied MLM / LM head)
    r"^model\.pos_embed(\.weight)?$",              # learned positions (text table, ViT parameter)
    r"^model\.cls_token$",
    r"^model\.mlm_bias$",
    r"\.router\.sub_keys$",                        # expert keys (PEER and ETHOS alike)
    r"\.ffn\.(down|up)\.weight$",                  # PEER's expert tables u_i, v_i
    r"\.ffn\.latents$",                            # ETHOS's expert table z_i
    r"\.attn\.attend\.sink$",                      # score=sink: learned per-head null logits
]
DECAY = [
    r"\.attn\.(qkv|out|qkv_a|q_b|kv_b|o_a|o_b)\.weight$",  # attention projections (MHA, MLA, MLA-o)
    r"\.attn\.attend\.gate\.weight$",              # the output gate's projection W_g
    r"\.ffn\.(w13|w1|w2)\.weight$",                # dense FFNs (SwiGLU, MLP)
    r"\.router\.query\.weight$",                   # the product-key router's query projection
    r"\.ffn\.(w1|w_u|w_v)$",                       # ETHOS's generator: shared projections
    r"^model\.patch_embed\.proj\.weight$",         # ViT patch projection (a conv)
    r"^model\.head\.weight$",                      # classifier
]

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
BACKBONES = {"encoder": [], "decoder": ["task=clm"], "vit": ["data=shapes"]}
EXTRA = {"mlp-ffn": ["model/ffn=mlp"], "learned-pos": ["model.learned_pos=true"],
         "dense-layers": ["model.num_dense_layers=1"], "layernorm": ["model.norm=layernorm"],
         "sink-head-gate": ["model.attn.score=sink", "model.attn.gate=head", "model.attn.bias=true"],
         "mla-sink-gate-dense": ["model=mla", "model.attn.score=sink", "model.attn.gate=elementwise",
                                 "model.num_dense_layers=1"]}


def build_task(overrides: list[str], tmp_path):
    cfg = compose(["debug=tiny", *overrides], output_dir=tmp_path)
    model_cfg, optim = check(cfg)
    sizes = {"num_classes": 6, "img_size": 32, "patch_size": 4} if "data=shapes" in overrides else \
        {"vocab_size": 100, "pad_id": 0}
    return task_for(cfg)(model=model_cfg, optim=optim, **sizes)


def expected_decay(name: str) -> bool:
    no = [p for p in NO_DECAY if re.search(p, name)]
    yes = [p for p in DECAY if re.search(p, name)]
    assert bool(no) != bool(yes), f"{name}: matches {no + yes} (list it in exactly one table)"
    return bool(yes)


def groups_by_name(task) -> dict[str, float]:
    group_of = {id(p): g["weight_decay"] for g in task.param_groups() for p in g["params"]}
    names = dict(task.named_parameters())
    assert len(group_of) == len(names), "every trainable parameter is in exactly one group"
    return {n: group_of[id(p)] for n, p in names.items()}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("model", MODELS + list(EXTRA))
def test_weight_decay_rule_for_every_model(model, backbone, tmp_path):
    overrides = [*BACKBONES[backbone], *(EXTRA[model] if model in EXTRA else [f"model={model}"])]
    with torch.device("meta"):
        task = build_task(overrides + ["optim.weight_decay=0.1"], tmp_path)
    groups = groups_by_name(task)
    for name, wd in groups.items():
        assert wd == (0.1 if expected_decay(name) else 0.0), f"{name}: weight decay {wd}"
    assert any(wd for wd in groups.values()) and not all(groups.values())


def test_peer_and_ethos_experts_follow_the_same_rule(tmp_path):
    with torch.device("meta"):
        peer = groups_by_name(build_task(["model=peer", "optim.weight_decay=0.1"], tmp_path))
        ethos = groups_by_name(build_task(["model=ethos", "optim.weight_decay=0.1"], tmp_path))
    layer = "model.trunk.blocks.1.ffn"  # layer 0 of ethos is dense
    for table in ("down.weight", "up.weight"):
        assert peer[f"{layer}.{table}"] == 0.0
    assert ethos[f"{layer}.latents"] == 0.0
    for groups in (peer, ethos):
        assert groups[f"{layer}.router.sub_keys"] == 0.0
        assert groups[f"{layer}.router.query.weight"] == 0.1
        assert groups[f"{layer}.router.norm.weight"] == 0.0
    assert all(ethos[f"{layer}.{w}"] == 0.1 for w in ("w1", "w_u", "w_v"))


# -- LR schedule: the values the optimizer sees, against the formulas written out -----------------
def reference_lr(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """lr / peak at `step` (transformers' convention: warm-up from 0, so step 0 trains at lr 0)."""
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * max(0.0, 1 - (step - warmup) / (total - warmup))
    progress = (step - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,min_ratio", [(0.1, 0.0), (7, 0.1), (0.0, 0.0)])
def test_schedule_value_by_value(kind, warmup, min_ratio):
    o = OptimConfig(lr=3e-4, warmup=warmup, schedule=kind, min_lr_ratio=min_ratio)
    total = 50
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=o.lr)
    sched = schedule(opt, o, total)
    w = int(warmup * total) if warmup < 1 else int(warmup)
    got = []
    for step in range(total):
        got.append(opt.param_groups[0]["lr"] / o.lr)
        assert got[-1] == pytest.approx(reference_lr(step, total, w, kind, min_ratio), abs=1e-9), step
        opt.step()
        sched.step()
    after = got[w:]
    if kind != "constant":  # decays, never rises, and ends at the floor
        assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
        assert after[-1] == pytest.approx(min_ratio, abs=1 / (total - w) + 1e-9) and after[0] > 0.9
    assert max(got) == pytest.approx(1.0, abs=0.02)


def test_task_wires_schedule_and_groups(tmp_path):
    task = build_task(["model=mla", "optim.schedule=cosine", "optim.warmup=4", "optim.min_lr_ratio=0.1",
                       "optim.weight_decay=0.05"], tmp_path)
    task._trainer = SimpleNamespace(max_steps=20, estimated_stepping_batches=20)
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    expect = [task.optim.lr * reference_lr(s, 20, 4, "cosine", 0.1) for s in range(20)]
    assert lrs == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,min_ratio", [(0.1, 0.0), (7, 0.1), (0.0, 0.0)])
def test_schedule_equals_transformers(kind, warmup, min_ratio):
    """Ours, value by value, against transformers' schedulers of the same shape."""
    from transformers import get_scheduler

    o = OptimConfig(lr=1e-3, warmup=warmup, schedule=kind, min_lr_ratio=min_ratio)
    total = 40
    w = int(warmup * total) if warmup < 1 else int(warmup)
    name, kwargs = {"linear": ("polynomial", {"lr_end": o.lr * min_ratio, "power": 1.0}),
                    "cosine": ("cosine_with_min_lr", {"min_lr_rate": min_ratio}),
                    "constant": ("constant_with_warmup", {})}[kind]
    ours = schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr), o, total)
    ref = get_scheduler(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr), num_warmup_steps=w,
                        num_training_steps=total, scheduler_specific_kwargs=kwargs)
    for step in range(total + 1):  # (past the end transformers' cosine rises again; ours stays at the floor)
        assert ours.lr_lambdas[0](step) == pytest.approx(ref.lr_lambdas[0](step), abs=1e-12), step


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_extension_continues_without_a_jump(kind):
    f = LRSchedule(kind, warmup=10, total=100, min_ratio=0.1)
    before = [f(s) for s in range(60)]
    state = dict(f.__dict__)  # what LambdaLR saves in the checkpoint
    g = LRSchedule(kind, warmup=20, total=200, min_ratio=0.1)  # as rebuilt by the resumed run ...
    g.__dict__.update(state)  # ... then restored from the checkpoint ...
    g.extend(60, 200)  # ... and re-targeted to the new max_steps
    steps = [abs(f(s + 1) - f(s)) for s in range(10, 99)]
    assert abs(g(60) - before[-1]) <= max(steps) + 1e-12 and g(60) == pytest.approx(f(60))
    after = [g(s) for s in range(60, 201)]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:])) and after[-1] == pytest.approx(0.1)
    assert after[20] > f(80)  # the remaining decay is stretched over the longer run
    finished = LRSchedule(kind, warmup=10, total=100, min_ratio=0.1)
    finished.extend(100, 150)  # extended after the end: stays at the floor (no jump back up)
    assert finished(100) == finished(150) == pytest.approx(0.1)
