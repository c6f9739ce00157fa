"""CPU process set-up: the allocator policy's precedence and the single-process rendezvous."""

from __future__ import annotations

import pytest

from megalong.utils.cpu_runtime import RENDEZVOUS, configure_cpu_allocator, single_process_rendezvous


@pytest.mark.parametrize("env, expect", [
    ({"MEGALONG_CPU_MALLOC": "glibc"}, "glibc's default policy"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc from LD_PRELOAD"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_=65536 (left as set)"),
    ({}, "fixed mmap threshold of 128 KiB"),
])
def test_allocator_policy_explicit_setting_wins(env, expect):
    assert expect in configure_cpu_allocator(env)


def test_allocator_policy_rejects_unknown_value():
    with pytest.raises(ValueError, match="use 'fixed' .* or 'glibc'"):
        configure_cpu_allocator({"MEGALONG_CPU_MALLOC": "tcmalloc"})


def test_rendezvous_only_when_nothing_is_set():
    env = single_process_rendezvous({})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536
    for key in RENDEZVOUS:  # any one of them set: the launcher (or the user) owns the rendezvous
        assert single_process_rendezvous({key: "0"}) == {}
