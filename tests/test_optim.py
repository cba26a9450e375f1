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
    r"\.ffn\.(shared\.)?(w13|w1|w2)\.weight$",     # dense FFNs (SwiGLU, MLP), MoE's shared experts
    r"\.ffn\.(w13|w2)$",                           # MoE's routed experts: (E, d, 2f) and (E, f, d) tables
    r"\.ffn\.gate\.weight$",                       # MoE's router
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
def reference_lr(step: int, total: int, warmup: int, kind: str, min_ratio: float, decay_fraction: float = 0.2
                 ) -> float:
    """lr / peak at `step` (transformers' convention: warm-up from 0, so step 0 trains at lr 0)."""
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    if kind == "wsd":  # nanochat's warmdown: at the peak until the last round(fraction * total) steps
        decay = round(decay_fraction * total)
        if step <= total - decay:
            return 1.0
        progress = (total - step) / decay  # 1 -> 0 over the decay
        return progress + (1 - progress) * min_ratio
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * max(0.0, 1 - (step - warmup) / (total - warmup))
    progress = (step - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "wsd"])
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
        decay_steps = round(0.2 * total) if kind == "wsd" else total - w  # the last step is one step above the floor
        assert after[-1] == pytest.approx(min_ratio, abs=1 / decay_steps + 1e-9) and after[0] > 0.9
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


# -- WSD: warm-up, stable, decay -------------------------------------------------------------------------------
def test_wsd_values_by_hand():
    f = LRSchedule("wsd", warmup=10, total=100, min_ratio=0.1, decay_fraction=0.2)  # the decay starts at 80
    hand = {0: 0.0, 5: 0.5, 10: 1.0, 50: 1.0, 79: 1.0, 80: 1.0, 85: 0.1 + 0.9 * 0.75, 90: 0.55, 95: 0.325,
            99: 0.1 + 0.9 * 0.05, 100: 0.1, 120: 0.1}
    assert {s: f(s) for s in hand} == pytest.approx(hand, abs=1e-12)
    full = LRSchedule("wsd", warmup=10, total=100, decay_fraction=1.0)  # decay over everything: linear
    assert [full(s) for s in range(101)] == pytest.approx([LRSchedule("linear", 10, 100)(s) for s in range(101)])
    none = LRSchedule("wsd", warmup=10, total=100, min_ratio=0.1, decay_fraction=0.0)  # no decay: constant
    assert [none(s) for s in range(100)] == [LRSchedule("constant", 10, 100)(s) for s in range(100)]


@pytest.mark.parametrize("warmup,min_ratio,fraction", [(0.1, 0.0, 0.2), (7, 0.1, 0.3), (0.0, 0.0, 0.5)])
def test_wsd_equals_transformers(warmup, min_ratio, fraction):
    """Ours against transformers' warmup_stable_decay with a linear decay, from the end of warm-up on (its
    warm-up starts at min_lr_ratio, ours at 0: equal from the first step when the floor is 0)."""
    from transformers import get_wsd_schedule

    total = 40
    o = OptimConfig(warmup=warmup, schedule="wsd", min_lr_ratio=min_ratio, decay_fraction=fraction)
    w = int(warmup * total) if warmup < 1 else int(warmup)
    ours = schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), o, total).lr_lambdas[0]
    decay = round(fraction * total)
    ref = get_wsd_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_warmup_steps=w,
                           num_decay_steps=decay, num_stable_steps=total - w - decay, decay_type="linear",
                           min_lr_ratio=min_ratio).lr_lambdas[0]
    for step in range(w if min_ratio else 0, total + 5):
        assert ours(step) == pytest.approx(ref(step), abs=1e-12), step


def resumed(f: LRSchedule, step: int, total: int, o: OptimConfig) -> LRSchedule:
    """`f`'s state as LambdaLR saves it at `step`, restored into the schedule the resumed run builds, extended."""
    g = LRSchedule(o.schedule, f.warmup, total, o.min_lr_ratio, o.decay_fraction)
    g.__dict__.update(dict(f.__dict__))
    g.extend(step, total)
    return g


WSD = OptimConfig(schedule="wsd", min_lr_ratio=0.1, decay_fraction=0.2)


def test_wsd_extended_before_the_decay_keeps_the_peak_and_moves_the_decay():
    f = LRSchedule("wsd", warmup=10, total=100, min_ratio=0.1, decay_fraction=0.2)
    g = resumed(f, 60, 200, WSD)  # at step 60 of 100 (decay from 80): the stable phase goes on
    planned = LRSchedule("wsd", warmup=10, total=200, min_ratio=0.1, decay_fraction=0.2)  # as if run for 200
    assert [g(s) for s in range(60, 201)] == [planned(s) for s in range(60, 201)]
    assert g(60) == g(160) == 1.0 and g(180) == pytest.approx(0.55) and g(200) == pytest.approx(0.1)
    at_start = resumed(f, 80, 200, WSD)  # at the first step of the decay the LR is still the peak: not begun
    assert [at_start(s) for s in range(80, 201)] == [planned(s) for s in range(80, 201)]
    # shortened so that the new decay would have begun before the resume step: it begins there, from the peak
    h = resumed(f, 60, 70, WSD)  # (the new decay would start at 70 - 14 = 56)
    assert h(60) == 1.0 and h(65) == pytest.approx(0.55) and h(70) == pytest.approx(0.1)


def test_wsd_extended_during_the_decay_goes_on_from_where_it_is():
    f = LRSchedule("wsd", warmup=10, total=100, min_ratio=0.1, decay_fraction=0.2)
    g = resumed(f, 90, 140, WSD)  # halfway down (0.55): from there, linearly to the floor at 140
    assert g(90) == pytest.approx(f(90)) == pytest.approx(0.55)
    assert g(115) == pytest.approx(0.1 + 0.45 * 0.5) and g(140) == pytest.approx(0.1)
    after = [g(s) for s in range(90, 141)]
    assert all(b < a for a, b in zip(after, after[1:]))
    finished = resumed(f, 100, 150, WSD)  # extended after the end: stays at the floor
    assert finished(100) == finished(125) == finished(150) == pytest.approx(0.1)


def test_wsd_extension_through_lambdalr_state():
    """The path a resume takes: LambdaLR's state_dict holds the schedule; on_train_start re-targets it."""
    o = OptimConfig(lr=1.0, warmup=10, schedule="wsd", min_lr_ratio=0.1, decay_fraction=0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
    sched = schedule(opt, o, 100)
    for _ in range(60):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
    sched2 = schedule(opt2, o, 200)
    opt2.load_state_dict(opt.state_dict())  # Lightning's order: the optimizer (its groups' lr), then the schedule
    sched2.load_state_dict(sched.state_dict())
    sched2.lr_lambdas[0].extend(60, 200)
    lrs = []
    for _ in range(60, 200):
        lrs.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert lrs[:100] == [1.0] * 100 and lrs[120] == pytest.approx(0.55) and lrs[-1] == pytest.approx(0.1 + 0.9 / 40)
