import os
import subprocess
import sys
from pathlib import Path

import pytest

from ethos.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # one thread per xdist worker and per subprocess it starts: two workers with a thread pool each on two cores
    # spin against one another, and the suite takes as long as in one process
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """One data cache per session (per xdist worker): the offline corpus is tokenised once, and no test writes
    the repository's own cache, which two workers would race on."""
    path = Path(os.environ.get("ETHOS_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    os.environ["ETHOS_CACHE"] = str(path)
    return path


def compose(overrides: list[str], output_dir: Path | None = None, config_name: str = "train"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ethos.config import register_resolvers

    register_resolvers()
    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else ["paths.output_dir=/nonexistent"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides + extra)


def run_cli(args: list[str], cwd: Path, env: dict | None = None, drop: tuple[str, ...] = (),
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run train.py in a subprocess with this environment plus `env`, minus the `drop` variables."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_same_training_state(a, b, rtol: float = 1e-6, atol: float = 1e-7, opt_atol: float = 1e-9) -> None:
    """Two checkpoints (dicts or paths) at the same step with the same weights and AdamW state."""
    import torch

    a, b = (torch.load(c, weights_only=True) if isinstance(c, (str, Path)) else c for c in (a, b))
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=rtol, atol=atol, msg=k)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):  # squared gradients are tiny: opt_atol is tighter
            torch.testing.assert_close(sb[i][k], sa[i][k], rtol=rtol, atol=opt_atol)


# Tiny pretrained runs, trained once per test session and shared read-only by every test that reads a run
# (fine-tunes, the analysis tools, safe loading). A test that changes a run copies it first.
TINY = ["debug=tiny", "logger=csv", "print_config=false"]


def _pretrain(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    from ethos.study import train

    out = tmp_path_factory.mktemp(name)
    train(compose([*TINY, *overrides], output_dir=out))
    return out


@pytest.fixture(scope="session")
def mha_run(cache_dir, tmp_path_factory) -> Path:
    """The default MHA encoder (masked LM), 30 steps."""
    return _pretrain(tmp_path_factory, "mha_run", ["trainer.max_steps=30", "trainer.val_check_interval=30"])


@pytest.fixture(scope="session")
def mla_run(cache_dir, tmp_path_factory) -> Path:
    """An MLA encoder, 30 steps."""
    return _pretrain(tmp_path_factory, "mla_run", ["model=mla", "trainer.max_steps=30",
                                                   "trainer.val_check_interval=30"])


@pytest.fixture(scope="session")
def vit_run(cache_dir, tmp_path_factory) -> Path:
    """A ViT on the generated shapes, 150 steps."""
    return _pretrain(tmp_path_factory, "vit_run", ["data=shapes", "trainer.max_steps=150",
                                                   "trainer.val_check_interval=150"])
