"""What a newcomer sees: one line per log message (Hydra's handler only), no advertising tips."""

import re
from collections import Counter

import pytest

from conftest import run_cli

HYDRA_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[[\w.]+\]\[(\w+)\] - (.*)$", re.M)
PLAIN_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL): (.*)$", re.M)  # Lightning's own console format


def messages(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        m = HYDRA_LINE.match(line) or PLAIN_LINE.match(line)
        if m:
            out.append(m.group(2).strip())
    return out


@pytest.mark.slow
def test_default_run_logs_each_message_once(cache_dir, tmp_path):
    res = run_cli(["debug=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   f"paths.log_dir={tmp_path}"], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    msgs = messages(out)
    assert any("Seed set to" in m for m in msgs) and any(m.startswith("data train:") for m in msgs), out[-3000:]
    twice = [m for m, n in Counter(msgs).items() if n > 1]
    assert not twice, twice
    assert not PLAIN_LINE.search(out), "Lightning's own console handler is still attached"
    assert "Tip:" not in out and "litlogger" not in out
    log_file = next((tmp_path / "train" / "runs").glob("*/train.log"))  # Hydra's copy in the run dir
    file_msgs = messages(log_file.read_text())
    assert file_msgs and not [m for m, n in Counter(file_msgs).items() if n > 1]
