"""Safe loading: a checkpoint whose pickle would run code, or a file that is not a checkpoint, is refused in one
line naming the path by every path that reads one, and the code never runs."""

import builtins
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from ethos import checkpoint
from ethos.errors import ConfigError


class Payload:
    """Unpickling this calls exec(code): the marker file exists afterwards iff the code ran."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('ran')"

    def __reduce__(self):
        return builtins.exec, (self.code,)


def malicious(run: Path, dest: Path, marker: Path) -> Path:
    """A real run dir (tokenizer, config) whose last.ckpt also holds the payload: everything else is valid."""
    shutil.copytree(run, dest)
    path = dest / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["extra"] = Payload(marker)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def evil(mha_run, tmp_path):
    marker = tmp_path / "code_ran"
    return malicious(mha_run, tmp_path / "evil_run", marker), marker


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.slow
def test_the_payload_would_run_without_weights_only(evil):  # the test's file really is dangerous
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.slow
def test_our_checkpoints_load_with_weights_only(mha_run, vit_run):
    for run in (mha_run, vit_run):
        ckpt = checkpoint.load(run / "checkpoints" / "last.ckpt")
        assert ckpt["state_dict"] and ckpt["optimizer_states"] and ckpt["ethos"]["task"]


@pytest.mark.slow
def test_load_refuses_in_one_line(evil, tmp_path):
    path, marker = evil
    with pytest.raises(ConfigError) as e:
        checkpoint.load(path, key="ckpt_path")
    assert str(e.value).startswith(f"ckpt_path={path}: refused") and "exec" in str(e.value)
    assert "\n" not in str(e.value) and not marker.exists()
    text = tmp_path / "notes.txt"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    for bad, why in ((text, "not a PyTorch checkpoint"), (tmp_path / "missing.ckpt", "no such file")):
        with pytest.raises(ConfigError, match=f"^ckpt_path={bad}: {why}"):
            checkpoint.load(bad, key="ckpt_path")


@pytest.mark.slow
def test_load_task_and_load_backbone_refuse(evil):
    from ethos.pretrained import load_backbone, load_task

    path, marker = evil
    with pytest.raises(ConfigError, match="refused"):
        load_task(path)
    with pytest.raises(ConfigError, match="refused"):
        load_backbone(torch.nn.Linear(1, 1), path)
    assert not marker.exists()


@pytest.mark.slow
def test_the_command_line_refuses_in_one_line_with_exit_code_2(evil, tmp_path):
    path, marker = evil
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    base = ["debug=tiny", "logger=csv", "print_config=false", "trainer.max_steps=2"]
    cases = [
        ([f"ckpt_path={path}"], f"ckpt_path={path}: refused"),
        ([f"ckpt_path={text}"], f"ckpt_path={text}: not a PyTorch checkpoint"),
        (["task=finetune", "data=docstrings", f"pretrained={path.parents[1]}"], f"pretrained={path}: refused"),
        (["task=finetune", "data=docstrings", f"pretrained={path}"], f"pretrained={path}: refused"),
    ]
    for i, (args, expected) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = run_cli([*base, *args, f"paths.output_dir={out}"], cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert expected in one_line(r.stderr), r.stderr
        assert not (out / "csv").exists()  # nothing trained
    assert not marker.exists()


@pytest.mark.slow
def test_a_checkpoint_outside_its_run_dir_fails_in_one_line(mha_run, tmp_path):
    lone = tmp_path / "lone.ckpt"
    shutil.copy(mha_run / "checkpoints" / "last.ckpt", lone)
    r = run_cli(["task=finetune", "data=docstrings", f"pretrained={lone}", "debug=tiny", "logger=csv",
                 f"paths.output_dir={tmp_path / 'ft'}"], cwd=tmp_path)
    assert r.returncode == 2 and "data.tokenizer" in one_line(r.stderr), r.stderr
    assert f"pretrained={lone}" in r.stderr



@pytest.mark.slow
def test_the_analysis_readers_refuse_in_one_line(evil, tmp_path, capsys):
    """The spectra tool, the retrofit and the ranks' reader (EthosSource) read ethos runs through load_task."""
    from ethos.analysis import retrofit, spectra
    from ethos.analysis.ethos_runs import EthosSource

    path, marker = evil
    with pytest.raises(ConfigError, match="refused"):
        EthosSource(path)
    for main, args in ((spectra.main, [str(path), "--out", str(tmp_path / "s")]),
                       (retrofit.main, [str(path), "--ranks", "4", "--out", str(tmp_path / "r")])):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and "refused" in one_line(capsys.readouterr().err)
    assert not marker.exists()
