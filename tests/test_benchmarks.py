"""Every benchmark the README names runs, at toy sizes, and writes the table its claims are read from (the
timings themselves are only meaningful run alone, at the scripts' default sizes). Where a script checks its
own result (the resumed stream's first batch, the spectra tool against its dense reference) the check is
asserted here too."""

import csv
import math
import subprocess
import sys

import pytest

from conftest import ROOT


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, f"{script} {' '.join(args)}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def table(path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{path} is empty"
    return rows


def positive(rows: list[dict], *columns: str) -> None:
    for r in rows:
        for c in columns:
            assert math.isfinite(float(r[c])) and float(r[c]) > 0, (c, r)


TINY_ATTENTION = ("--d-model", "64", "--seq", "16", "--tokens", "64", "--warmup", "0", "--repeats", "1")


@pytest.mark.slow
def test_bench_attention(tmp_path):
    run("bench_attention.py", *TINY_ATTENTION, "--out", str(tmp_path / "attention"))
    rows = table(tmp_path / "attention.csv")
    assert {r["variant"] for r in rows} == {"MHA", "MLA", "MLA-o"}
    positive(rows, "ms", "time_vs_mha", "time_vs_mla", "flops_vs_mla")
    assert (tmp_path / "attention.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_attention_scores(tmp_path):
    run("bench_attention.py", "--scores", *TINY_ATTENTION, "--out", str(tmp_path / "attention"))
    rows = table(tmp_path / "attention_scores.csv")
    assert {"softmax", "softmax1", "sigmoid", "relu"} <= {r["score"] for r in rows}
    positive(rows, "ms", "time_vs_softmax")


@pytest.mark.slow
def test_bench_experts(tmp_path):
    run("bench_experts.py", "--configs", "small", "--tokens", "64", "--warmup", "0", "--repeats", "1",
        "--out", str(tmp_path))
    rows = table(tmp_path / "bench_experts.csv")
    assert len({r["impl"] for r in rows}) >= 3
    positive(rows, "ms", "params_m", "speedup_vs_naive")


@pytest.mark.slow
def test_bench_backbones(tmp_path):
    run("bench_backbones.py", "--warmup", "0", "--repeats", "1", "--text-batch", "2", "--img-batch", "2",
        "--data-batches", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "backbones"))
    rows = table(tmp_path / "backbones.csv")
    assert [r["pair"] for r in rows] == ["encoder", "vit"]
    positive(rows, "ours_ms", "ref_ms", "speedup", "data_ms")


@pytest.mark.slow
def test_bench_data(tmp_path):
    run("bench_data.py", "--sizes", "1e4", "--source", "synthetic", "--batches", "5", "--old-batches", "1",
        "--stream-steps", "50", "--shuffle-buffer", "10", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path))
    positive(table(tmp_path / "bench_data.csv"), "new_ms", "old_ms", "old_over_new")
    (resume,) = table(tmp_path / "bench_data_resume.csv")
    assert resume["first_batch_equal"] == "True" and int(resume["micro_batch"]) == 50


@pytest.mark.slow
def test_bench_ranks(tmp_path):
    run("bench_ranks.py", "--repeats", "2", "--batch", "4", "--layers", "2", "--out", str(tmp_path / "ranks"))
    rows = table(tmp_path / "ranks.csv")
    pairs = {(v, d) for v in ("mha", "mla") for d in ("float64", "float32")}
    assert {(r["variant"], r["dtype"]) for r in rows} == pairs
    positive(rows, "step_ms", "callback_ms", "overhead_pct")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bench_spectra_agrees_with_its_dense_reference(tmp_path, dtype):
    """At a quarter of DeepSeek-V3's shapes, in FP8: the tool's singular values match the dense reference's of
    the same precision (dequantise, svdvals of every full matrix, fused products materialised)."""
    out = run("bench_spectra.py", "--quick", "--out", str(tmp_path / "spectra"),
              "--variants", f"tool:{dtype},reference:{dtype}")
    rows = {r["variant"]: r for r in table(tmp_path / "spectra.csv")}
    tool = rows[f"tool:{dtype}"]
    # float64: the tool holds FP8 x scale in float32 and the reference in float64, ~1e-7 of s_1 apart;
    # float32: the tool's Gram matrices square the condition number (~1e-5 of s_1)
    assert float(tool["max_rel_diff_vs_reference"]) < (1e-6 if dtype == "float64" else 1e-4)
    positive([tool], "rss_growth_mb", "speedup_vs_reference", "s_per_layer")
    assert "targets" in out and (tmp_path / "spectra.png").stat().st_size > 0


def test_median_times_round_robin():
    """Warm-up rounds of every step, then one of each per repeat in turn, `before` ahead of each timed one."""
    from ethos.bench import median_times

    calls = []
    steps = {k: (lambda k=k: calls.append(k)) for k in "ab"}
    med = median_times(steps, "cpu", warmup=1, repeats=3, before=lambda: calls.append("-"))
    assert calls == ["a", "b"] + ["-", "a", "-", "b"] * 3
    assert set(med) == {"a", "b"} and all(t >= 0 for t in med.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is read from /proc")
def test_step_peak_memory_sees_what_a_step_allocates():
    import torch

    from ethos.bench import step_peak_mb

    def step():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched, freed when the step returns
        return float(x[-1])

    assert 60 < step_peak_mb(step, "cpu") < 80
    assert step_peak_mb(lambda: None, "cpu") < 4


TINY_DECODER = ["model.d_model=32", "model.n_heads=4", "model.head_dim=8", "model.rope_dims=8", "model.n_layers=1",
                "model.ffn.d_ff=64"]


@pytest.mark.slow
def test_bench_decoder(tmp_path):
    # the modern recipe only (the reference differs in overrides alone): one torch.compile, not two, in CI
    run("bench_decoder.py", "--configs", "modern", "--warmup", "1", "--repeats", "1", "--batch", "2", "--seq-len",
        "32", "--doc-len", "10", "--vocab", "64", "--overrides", *TINY_DECODER, "--out", str(tmp_path / "decoder"))
    rows = table(tmp_path / "decoder.csv")
    assert {(r["config"], r["compiled"], r["doc_mask"]) for r in rows} == {
        ("modern", comp, mask) for comp in ("False", "True") for mask in ("False", "True")}
    positive(rows, "ms", "tokens_per_s", "compiled_over_eager", "masked_over_unmasked")
    assert (tmp_path / "decoder.png").stat().st_size > 0


@pytest.mark.slow
def test_decoder_ablation(tmp_path, cache_dir):
    """Two rows, two steps: the table's contribution is the baseline's final val/bpb minus the row's, read from
    the runs' own metrics."""
    run("decoder_ablation.py", "--steps", "2", "--evals", "1", "--rows", "baseline,qk_norm", "--batch-size", "4",
        "--extra", *TINY_DECODER, "data.eval_batch_size=64", "trainer.limit_val_batches=2",
        "--out", str(tmp_path / "ablation"))
    rows = {r["row"]: r for r in table(tmp_path / "ablation" / "steps2" / "ablation.csv")}
    finals = {}
    for name in ("baseline", "qk_norm"):
        metrics = list(csv.DictReader(open(tmp_path / "ablation" / "steps2" / name / "csv" / "metrics.csv")))
        finals[name] = [float(m["val/bpb"]) for m in metrics if m.get("val/bpb")][-1]
        assert math.isclose(float(rows[name]["final_bpb"]), finals[name], abs_tol=1e-4)
    assert math.isclose(float(rows["qk_norm"]["contribution"]), finals["baseline"] - finals["qk_norm"], abs_tol=2e-4)
    assert (tmp_path / "ablation" / "steps2" / "ablation.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_moe(tmp_path):
    out = run("bench_moe.py", "--configs", "ablation", "--tokens", "128", "--warmup", "0", "--repeats", "1",
              "--out", str(tmp_path))
    rows = table(tmp_path / "bench_moe.csv")
    impls = {r["impl"] for r in rows}
    assert {"moe", "moe-padded", "loop", "dense"} <= impls
    positive(rows, "ms", "x_vs_loop", "params_m", "active_params_m")
    # the script's own check: our layer computes the loop's (and transformers') layer on the same weights
    assert all(float(r["max_abs_dev_vs_loop"]) < 1e-5 for r in rows)
    assert all(r["max_abs_dev_vs_hf"] == "" or float(r["max_abs_dev_vs_hf"]) < 1e-5 for r in rows)
    assert "against the loop's" in out
