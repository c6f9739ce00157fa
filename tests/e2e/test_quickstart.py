"""The README's main command, shortened: launch/quickstart.sh end to end (corpus, tokenizer, data,
2-rank base pretraining, 2-rank ZeRO-3 LongLoRA extension, export, evaluation, generation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.assets import REPO, clean_shm

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quickstart_end_to_end(tmp_path):
    qs = tmp_path / "qs"
    env = dict(os.environ, QS_DIR=str(qs), QS_BASE_STEPS="60", QS_EXT_STEPS="30", QS_EVAL_WINDOWS="16",
               PYTHON=sys.executable, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(["bash", "launch/quickstart.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    clean_shm()
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "perplexity on the validation split" in out
    for d in ("base_hf", "base_pi_hf", "extended_hf", "extended_adapter"):
        assert (qs / d / "config.json").is_file(), d
    cfg = json.loads((qs / "extended_hf" / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0} and cfg["max_position_embeddings"] == 1024
    ppl = {m: json.loads((qs / "eval" / f"ppl_{m}_longlora.json").read_text())["ppl"]
           for m in ("base_hf", "base_pi_hf", "extended_hf")}
    assert ppl["extended_hf"] < ppl["base_pi_hf"], ppl  # extension beats interpolation alone
    assert (qs / "eval" / "passkey_extended.png").is_file()
    assert (qs / "extend_run" / "metrics.jsonl").is_file()
