"""tools/max_context.py: the search finds a length that fits, the next one does not, and more
memory never gives a shorter one."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

from megalong.utils.memory import estimate_memory

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("max_context", REPO / "tools/max_context.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("max_context", mod)  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bound_fits_and_the_next_step_does_not():
    mc = _tool()
    for sp_mode, sp, tiled, acts in (("s2_halo", 1, False, False), ("ulysses", 8, True, True)):
        base = mc.base_inputs("llama2-7b", "8×A100-80G", sp_mode, sp, tiled, acts, keeps_restored=False)
        n = mc.search(base)
        assert n % sp == 0
        assert estimate_memory(replace(base, seq_len=n)).fits
        over = estimate_memory(replace(base, seq_len=n + sp))
        assert not over.fits and mc.binding(over).startswith(("GPU:", "host:"))


def test_more_memory_never_shortens_the_context():
    mc = _tool()
    base = mc.base_inputs("llama3-8b", "8×H100-80G", "s2_halo", 8, True, False)
    found = [mc.search(replace(base, gpu_memory_gb=gb)) for gb in (24, 40, 80, 141)]
    assert all(a < b for a, b in zip(found, found[1:])), found
    assert mc.search(replace(base, gpu_memory_gb=4)) is None  # the model states alone do not fit
