"""S²-Attn kernels vs the dense reference (outputs and q/k/v gradients), causality, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from megalong.attention import combine_segments_and_padding, full_attention, s2_attention
from megalong.attention.s2attn import s2_mask

FAST_BACKENDS = ["sdpa", "flash"]  # flash: the real kernel on CUDA, else flash-attn's interface on CPU


def _flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def _flash_on_cpu(request):
    """Tests run with backend=flash use tests/flash_standin.py where flash-attn and CUDA are missing."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "flash" and not _flash_available():
        request.getfixturevalue("flash_standin")


def _device_for(backend: str) -> str:
    return "cuda" if backend == "flash" and _flash_available() else "cpu"


def _qkv(b, h, hk, n, d=16, dtype=torch.float32, device="cpu", seed=0, token_major=False):
    gen = torch.Generator().manual_seed(seed)

    def make(heads):
        if token_major:  # transformers' layout: (B, N, H, D) memory seen as (B, H, N, D)
            x = torch.randn(b, n, heads, d, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(b, heads, n, d, generator=gen)
        return x.to(device=device, dtype=dtype).requires_grad_(True)

    return make(h), make(hk), make(hk)


def _out_and_grads(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, *grads)


def _tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


def _assert_matches_reference(backend, dtype, b, h, hk, n, g, segment_ids=None, token_major=False):
    device = _device_for(backend)
    q, k, v = _qkv(b, h, hk, n, dtype=dtype, device=device, token_major=token_major)
    seg = None if segment_ids is None else segment_ids.to(device)
    fast = _out_and_grads(lambda *x: s2_attention(*x, g, backend=backend, segment_ids=seg), q, k, v)
    # The reference always runs in fp32 on the same (possibly bf16-rounded) inputs.
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = _out_and_grads(lambda *x: s2_attention(*x, g, backend="reference", segment_ids=seg), q32, k32, v32)
    for name, a, r in zip(("out", "dq", "dk", "dv"), fast, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.float(), r, **_tol(dtype), msg=lambda m, name=name: f"{name}: {m}")


# (B, H, H_kv, N, G): odd N, N < G (below and above G/2), G not dividing N, GQA 1 / 2 / H/2, odd H
SHAPES = [
    (1, 4, 4, 37, 8),  # odd N, partial groups
    (2, 8, 2, 30, 8),  # G does not divide N, GQA H_kv=2
    (2, 8, 1, 33, 6),  # MQA
    (1, 8, 4, 40, 8),  # H_kv = H/2, N a multiple of G
    (2, 6, 3, 23, 6),  # H/2 not a multiple of the repeat (kv heads gathered)
    (1, 5, 5, 19, 4),  # odd H
    (3, 3, 1, 9, 4),  # odd H, MQA, batch 3
    (1, 4, 2, 5, 16),  # N < G/2
    (2, 4, 2, 11, 16),  # G/2 < N < G
    (1, 1, 1, 13, 4),  # a single head is 'shifted' (⌊1/2⌋ = 0)
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}K{}N{}G{}".format(*s))
def test_matches_reference_fp32_and_bf16(backend, shape):
    if backend == "sdpa":
        _assert_matches_reference(backend, torch.float32, *shape)
    _assert_matches_reference(backend, torch.bfloat16, *shape)


def _padding(b, n, lengths, left):
    mask = torch.zeros(b, n, dtype=torch.long)
    for row, length in enumerate(lengths):
        if left:
            mask[row, n - length :] = 1
        else:
            mask[row, :length] = 1
    return mask


def _packed_segments():
    # Row 0: docs of 3 (< G/2), 13 (crosses group boundaries), 2, 11; row 1: 20 and 9.
    row0 = [0] * 3 + [1] * 13 + [2] * 2 + [3] * 11
    row1 = [5] * 20 + [9] * 9
    return torch.tensor([row0, row1])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hk", [1, 2, 4])
def test_segments_match_reference(backend, dtype, hk):
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn is fp16/bf16 only")
    _assert_matches_reference(backend, dtype, 2, 8, hk, 29, 8, segment_ids=_packed_segments())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_padding_matches_reference(backend, left):
    dtype = torch.float32 if backend == "sdpa" else torch.bfloat16
    docs = combine_segments_and_padding(None, _padding(3, 26, [26, 19, 3], left))
    _assert_matches_reference(backend, dtype, 3, 4, 2, 26, 8, segment_ids=docs)


def test_padding_and_segments_combine():
    seg = _packed_segments()
    mask = torch.ones_like(seg)
    mask[1, -4:] = 0  # right padding inside the last document of row 1
    docs = combine_segments_and_padding(seg, mask)
    _assert_matches_reference("sdpa", torch.float32, 2, 4, 2, 29, 8, segment_ids=docs)


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_padding_semantics(left):
    """Valid tokens never see pad keys, groups start at the first valid token, pads stay finite."""
    n, length, g = 24, 17, 8
    mask = _padding(1, n, [length], left)
    docs = combine_segments_and_padding(None, mask)
    q, k, v = _qkv(1, 4, 2, n)
    out = s2_attention(q, k, v, g, segment_ids=docs)
    valid = slice(n - length, n) if left else slice(0, length)
    alone = s2_attention(q[:, :, valid], k[:, :, valid], v[:, :, valid], g)
    torch.testing.assert_close(out[:, :, valid], alone, atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_segments_are_independent_rows():
    """Each document behaves exactly like its own row (positions counted from its start)."""
    seg = _packed_segments()
    q, k, v = _qkv(2, 4, 2, 29)
    out = s2_attention(q, k, v, 8, segment_ids=seg)
    for row in range(2):
        starts = [0] + [i for i in range(1, 29) if seg[row, i] != seg[row, i - 1]] + [29]
        for s, e in zip(starts[:-1], starts[1:]):
            alone = s2_attention(
                q[row : row + 1, :, s:e], k[row : row + 1, :, s:e], v[row : row + 1, :, s:e], 8
            )
            torch.testing.assert_close(out[row : row + 1, :, s:e], alone, atol=1e-6, rtol=1e-6)


def _brute_force(q, k, v, g, segment_ids):
    """Per-(b, h, i, j) loops over the formula in DESIGN.md; no shared code with the backends."""
    b, h, n, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        seg = segment_ids[bi].tolist()
        start = [0] * n
        for x in range(1, n):
            start[x] = x if seg[x] != seg[x - 1] else start[x - 1]
        for hi in range(h):
            shift = 0 if hi < h // 2 else g // 2
            for i in range(n):
                keys = []
                for j in range(n):
                    same_doc = start[j] == start[i]
                    gi, gj = (i - start[i] + shift) // g, (j - start[j] + shift) // g
                    if j <= i and same_doc and gi == gj:
                        keys.append(j)
                kv = hi // rep
                scores = torch.stack([q[bi, hi, i] @ k[bi, kv, j] / math.sqrt(d) for j in keys])
                weights = scores.softmax(0)
                out[bi, hi, i] = sum(w * v[bi, kv, j] for w, j in zip(weights, keys))
    return out


def test_reference_matches_brute_force_loop():
    seg = torch.tensor([[0] * 3 + [1] * 10, [4] * 13])
    q, k, v = (x.detach().double() for x in _qkv(2, 5, 5, 13, d=4))
    ref = s2_attention(q, k, v, 4, backend="reference", segment_ids=seg)
    torch.testing.assert_close(ref, _brute_force(q, k, v, 4, seg))
    q, k, v = (x.detach().double() for x in _qkv(1, 6, 3, 11, d=4, seed=3))
    seg = torch.zeros(1, 11, dtype=torch.long)
    torch.testing.assert_close(s2_attention(q, k, v, 6, backend="reference"), _brute_force(q, k, v, 6, seg))


def test_reference_mask_has_no_wraparound():
    m = s2_mask(1, 2, 16, 8, None, "cpu")[0]  # (H, N, N)
    shifted = m[1]
    assert not shifted.triu(1).any()  # nothing above the diagonal, in particular no first-group leak
    assert shifted[3, :4].all() and not shifted[4, :4].any()  # [0, 4) then [4, 12)
    assert shifted[12, 12] and not shifted[12, :12].any()


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("segmented", [False, True], ids=["rows", "segments"])
def test_causality_probe(backend, segmented):
    """Changing tokens after position i never changes outputs at or before i (first group too)."""
    device = _device_for(backend)
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    n, g = 29, 8
    seg = _packed_segments().to(device) if segmented else None
    q, k, v = (x.detach() for x in _qkv(2, 4, 2, n, dtype=dtype, device=device))
    base = s2_attention(q, k, v, g, backend=backend, segment_ids=seg)
    for i in (0, 1, g // 2 - 1, g // 2, g, 17, n - 2):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, i + 1 :] += 10.0 * torch.randn_like(x[:, :, i + 1 :])
        out = s2_attention(q2, k2, v2, g, backend=backend, segment_ids=seg)
        torch.testing.assert_close(out[:, :, : i + 1], base[:, :, : i + 1], atol=1e-6, rtol=1e-6)


def test_future_tokens_never_leak_into_first_group():
    """The roll-based implementation's leak: first tokens of the shifted half seeing the last ones."""
    q, k, v = (x.detach() for x in _qkv(1, 2, 2, 16))
    base = s2_attention(q, k, v, 8)
    v2 = v.clone()
    v2[:, :, -4:] = 1e3
    torch.testing.assert_close(s2_attention(q, k, v2, 8)[:, :, :12], base[:, :, :12], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_large_group_equals_full_attention(backend):
    """With G ≥ 2N every group covers the row in both halves: S²-Attn is full causal attention."""
    device = _device_for(backend)
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    q, k, v = (x.detach() for x in _qkv(2, 4, 2, 13, dtype=dtype, device=device))
    full = full_attention(q, k, v, backend=backend)
    for g in (26, 64):
        torch.testing.assert_close(s2_attention(q, k, v, g, backend=backend), full, **_tol(dtype))


def test_group_at_least_n_keeps_shifted_half_split_at_half_group():
    """G/2 < N ≤ G: the unshifted half is full attention; the shifted half still cuts at G/2
    (grp1(x) = ⌊(x + G/2)/G⌋ is the contract), so it equals full attention on [0, G/2), [G/2, N)."""
    q, k, v = (x.detach() for x in _qkv(1, 4, 4, 12))
    out, full = s2_attention(q, k, v, 16), full_attention(q, k, v)
    torch.testing.assert_close(out[:, :2], full[:, :2], atol=1e-6, rtol=1e-6)
    pieces = [full_attention(q[:, 2:, s:e], k[:, 2:, s:e], v[:, 2:, s:e]) for s, e in ((0, 8), (8, 12))]
    torch.testing.assert_close(out[:, 2:], torch.cat(pieces, dim=2), atol=1e-6, rtol=1e-6)


def test_token_major_inputs_match_contiguous():
    """transformers hands over (B, N, H, D) memory seen as (B, H, N, D); results must not depend on it."""
    token_major = _qkv(2, 8, 2, 35, token_major=True)
    contiguous = [x.detach().contiguous().requires_grad_(True) for x in token_major]
    assert not token_major[0].is_contiguous() and contiguous[0].is_contiguous()
    a = _out_and_grads(lambda *x: s2_attention(*x, 8), *token_major)
    b = _out_and_grads(lambda *x: s2_attention(*x, 8), *contiguous)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("segmented", [False, True], ids=["rows", "segments"])
def test_full_attention_matches_reference(backend, segmented):
    device = _device_for(backend)
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    seg = _packed_segments().to(device) if segmented else None
    q, k, v = _qkv(2, 8, 2, 29, dtype=dtype, device=device)
    fast = _out_and_grads(lambda *x: full_attention(*x, backend=backend, segment_ids=seg), q, k, v)
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = _out_and_grads(lambda *x: full_attention(*x, backend="reference", segment_ids=seg), q32, k32, v32)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a.float(), r, **_tol(dtype))


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("segmented", [False, True], ids=["rows", "segments"])
@pytest.mark.parametrize("q_len", [1, 5])
def test_full_attention_with_kv_cache(backend, segmented, q_len):
    """Queries are the last Q of the K positions: equal to the last rows of the uncached result."""
    device = _device_for(backend)
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    seg = _packed_segments().to(device) if segmented else None
    q, k, v = (x.detach() for x in _qkv(2, 8, 2, 29, dtype=dtype, device=device))
    whole = full_attention(q, k, v, backend="reference", segment_ids=seg)
    cached = full_attention(q[:, :, -q_len:], k, v, backend=backend, segment_ids=seg)
    torch.testing.assert_close(cached.float(), whole[:, :, -q_len:].float(), **_tol(dtype))


def test_layout_cache_sees_in_place_changes():
    seg = _packed_segments()
    q, k, v = (x.detach() for x in _qkv(2, 4, 2, 29))
    s2_attention(q, k, v, 8, segment_ids=seg)
    seg[0, :16] = 7  # same tensor object, new version: the cached layout must not be reused
    ref = s2_attention(q, k, v, 8, backend="reference", segment_ids=seg)
    torch.testing.assert_close(s2_attention(q, k, v, 8, segment_ids=seg), ref, atol=2e-5, rtol=2e-5)


def test_scale_is_honoured():
    q, k, v = (x.detach() for x in _qkv(1, 4, 2, 20))
    for backend in ("sdpa", "reference"):
        a = s2_attention(q, k, v, 8, backend=backend, scale=0.3)
        b = s2_attention(q * (0.3 * 4.0), k, v, 8, backend=backend)  # default scale is 1/sqrt(16)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(group_size=7), "odd.*use 6 or 8"),
        (dict(group_size=0), "positive even"),
        (dict(group_size=8, backend="triton"), "not one of"),
        (dict(group_size=8, segment_ids=torch.zeros(2, 5, dtype=torch.long)), "segment_ids has shape"),
        (dict(group_size=8, segment_ids=torch.zeros(1, 12)), "integer"),
    ],
)
def test_user_errors_name_value_and_fix(kwargs, match):
    q, k, v = (x.detach() for x in _qkv(1, 4, 2, 12))
    with pytest.raises(ValueError, match=match):
        s2_attention(q, k, v, **kwargs)


def test_shape_errors():
    q, k, v = (x.detach() for x in _qkv(1, 4, 3, 12))
    with pytest.raises(ValueError, match="multiple of 3 kv heads"):
        s2_attention(q, k, v, 8)
    q, k, v = (x.detach() for x in _qkv(1, 4, 2, 12))
    with pytest.raises(ValueError, match="use full_attention"):
        s2_attention(q[:, :, :4], k, v, 8)


def test_flash_missing_or_misused_is_a_clear_error():
    from megalong.attention.flash import import_flash_attn

    q, k, v = (x.detach() for x in _qkv(1, 4, 2, 12))
    with pytest.raises(ValueError, match="fp16/bf16 CUDA"):
        s2_attention(q, k, v, 8, backend="flash")
    if _flash_available():
        return
    with pytest.raises(ImportError, match="pip install flash-attn"):
        import_flash_attn()


def _windowed_brute_force(q, k, v, window, segment_ids):
    """Each query over the last ``window`` keys of its document, one softmax per query (no shared code)."""
    b, h, q_len, d = q.shape
    kv_len, rep = k.shape[2], h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        seg = segment_ids[bi].tolist() if segment_ids is not None else [0] * kv_len
        for qi in range(q_len):
            i = kv_len - q_len + qi
            keys = [j for j in range(max(0, i - window + 1), i + 1) if all(seg[x] == seg[i] for x in range(j, i + 1))]
            for hi in range(h):
                kk, vv = k[bi, hi // rep, keys], v[bi, hi // rep, keys]
                out[bi, hi, qi] = ((kk @ q[bi, hi, qi]) / math.sqrt(d)).softmax(0) @ vv
    return out


def test_window_reference_matches_brute_force():
    seg = _packed_segments()
    q, k, v = (x.detach().double() for x in _qkv(2, 4, 2, 29, d=4))
    for window, s, q_len in ((7, None, 29), (7, seg, 29), (5, seg, 3), (1, None, 29)):
        ref = full_attention(q[:, :, -q_len:], k, v, backend="reference", segment_ids=s, window=window)
        torch.testing.assert_close(ref, _windowed_brute_force(q[:, :, -q_len:], k, v, window, s))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("segmented", [False, True], ids=["rows", "segments"])
@pytest.mark.parametrize("q_len", [29, 5], ids=["square", "kv_cache"])
def test_full_attention_window_matches_reference(backend, segmented, q_len):
    """A sliding window shorter than the row (Mistral v0.1's): outputs and q/k/v gradients vs the reference."""
    device = _device_for(backend)
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    seg = _packed_segments().to(device) if segmented else None
    q, k, v = _qkv(2, 8, 2, 29, dtype=dtype, device=device)
    q_part = q[:, :, -q_len:]

    def windowed(backend_name):
        return lambda q_, k_, v_: full_attention(q_, k_, v_, backend=backend_name, segment_ids=seg, window=7)

    fast = _out_and_grads(windowed(backend), q_part, k, v)
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q_part, k, v))
    ref = _out_and_grads(windowed("reference"), q32, k32, v32)
    for name, a, r in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a.float(), r, **_tol(dtype), msg=lambda m, name=name: f"{name}: {m}")
    unwindowed = full_attention(q32.detach(), k32.detach(), v32.detach(), backend="reference", segment_ids=seg)
    assert not torch.allclose(ref[0], unwindowed, atol=1e-3)  # the window really cuts
    whole = full_attention(q32.detach(), k32.detach(), v32.detach(), backend="reference", segment_ids=seg, window=29)
    torch.testing.assert_close(whole, unwindowed)  # a window as long as the keys is no window


def test_flash_gets_deterministic_and_window(flash_standin):
    """attention.deterministic reaches every flash-attn call; the window becomes window_size=(W - 1, 0)."""
    q, k, v = (x.detach() for x in _qkv(2, 4, 2, 29, dtype=torch.bfloat16))
    seg = _packed_segments()
    for det in (True, False):
        flash_standin.clear()
        s2_attention(q, k, v, 8, backend="flash", segment_ids=seg, deterministic=det)
        full_attention(q, k, v, backend="flash", deterministic=det)
        full_attention(q, k, v, backend="flash", segment_ids=seg, window=7, deterministic=det)
        assert [c["fn"] for c in flash_standin] == ["varlen", "varlen", "dense", "varlen"]
        assert all(c["deterministic"] is det and c["causal"] for c in flash_standin), flash_standin
        assert [c["window_size"] for c in flash_standin] == [(-1, -1)] * 3 + [(6, 0)]
