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
    assert expect in configure_cpu_allocator(env, block_bytes=2**20) or not env  # small rows: explicit still wins


def test_allocator_auto_follows_the_activation_size():
    """auto (default): glibc's policy below AUTO_BLOCK_BYTES (the quickstart: 4 layers x 4 MiB), the fixed
    threshold at or above it (a 24-layer 135M model at N = 1024: 144 MiB) and when the size is unknown."""
    from megalong.utils.cpu_runtime import AUTO_BLOCK_BYTES, activation_block_bytes

    quickstart = activation_block_bytes(8, 256, 1, 512, 4, layers=4)  # micro 8 x 256, intermediate 512, fp32
    smol = activation_block_bytes(1, 1024, 1, 1536, 4, layers=24)
    assert quickstart == 16 * 2**20 < AUTO_BLOCK_BYTES <= smol == 144 * 2**20
    assert activation_block_bytes(1, 16384, 2, 1536, 4) == 48 * 2**20  # sp splits the row
    assert "glibc's default policy (auto: activations of 16.0 MiB" in configure_cpu_allocator({}, quickstart)
    assert "fixed mmap threshold of 128 KiB (auto: activations of 144 MiB" in configure_cpu_allocator({}, smol)
    assert "fixed mmap threshold" in configure_cpu_allocator({}, None)
    assert "fixed mmap threshold" in configure_cpu_allocator({"MEGALONG_CPU_MALLOC": "fixed"}, quickstart)


def test_allocator_policy_rejects_unknown_value():
    with pytest.raises(ValueError, match="use 'auto' .*'fixed' or 'glibc'"):
        configure_cpu_allocator({"MEGALONG_CPU_MALLOC": "tcmalloc"})


def test_rendezvous_only_when_nothing_is_set():
    env = single_process_rendezvous({})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536
    for key in RENDEZVOUS:  # any one of them set: the launcher (or the user) owns the rendezvous
        assert single_process_rendezvous({key: "0"}) == {}
