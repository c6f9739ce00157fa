import pytest
import torch

from megalong.engine.loss import ChunkedLMHead, chunked_cross_entropy, plain_cross_entropy


def _inputs(B, N, d, V, dtype=torch.float32, ignore_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, N), generator=g)
    labels[torch.rand(B, N, generator=g) < ignore_frac] = -100
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_plain_value_and_grads(chunk, bias):
    h, w, labels = _inputs(2, 37, 16, 53)
    b = torch.randn(53, generator=torch.Generator().manual_seed(1)).requires_grad_() if bias else None
    loss, count = chunked_cross_entropy(h, w, labels, bias=b, chunk_size=chunk)
    g_h, g_w, *g_b = torch.autograd.grad(2.5 * loss, [h, w] + ([b] if bias else []))
    logits = torch.nn.functional.linear(h, w, b)
    ref, ref_count = plain_cross_entropy(logits, labels)
    r_h, r_w, *r_b = torch.autograd.grad(2.5 * ref, [h, w] + ([b] if bias else []))
    assert count.item() == ref_count.item() == int((labels != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_h, r_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_w, r_w, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(g_b[0], r_b[0], rtol=1e-5, atol=1e-6)


def test_chunked_bf16_close_to_fp32_reference():
    h, w, labels = _inputs(1, 64, 32, 97, ignore_frac=0.0)
    loss, _ = chunked_cross_entropy(h.detach().bfloat16().requires_grad_(), w.detach().bfloat16(), labels, chunk_size=16)
    ref, _ = plain_cross_entropy(torch.nn.functional.linear(h, w), labels)
    torch.testing.assert_close(loss, ref.detach(), rtol=2e-2, atol=2e-2)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    h, w, labels = _inputs(1, 9, 8, 11)
    labels[:] = -100
    loss, count = chunked_cross_entropy(h, w, labels, chunk_size=4)
    loss.backward()
    assert count.item() == 0 and loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_frozen_weight_gets_no_grad_and_head_module_matches():
    h, w, labels = _inputs(2, 10, 8, 13)
    head = torch.nn.Linear(8, 13, bias=False)
    head.weight.requires_grad_(False)
    mod = ChunkedLMHead(head, chunk_size=3)
    assert mod.weight is head.weight
    loss, _ = mod(h, labels)
    loss.backward()
    ref, _ = plain_cross_entropy(head(h), labels)
    torch.testing.assert_close(loss, ref)
    assert head.weight.grad is None and h.grad is not None


def test_shape_mismatch_is_an_error():
    h, w, labels = _inputs(1, 5, 4, 7)
    with pytest.raises(ValueError, match="labels have"):
        chunked_cross_entropy(h, w, labels[:, :4])


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_token_losses_equal_plain_per_token_cross_entropy_without_grad(chunk):
    from megalong.engine.loss import chunked_token_losses

    h, w, labels = _inputs(2, 37, 16, 53)
    b = torch.randn(53)
    out = chunked_token_losses(h, w, labels, bias=b, chunk_size=chunk)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b).transpose(1, 2), labels,
                                            reduction="none")  # (B, N), 0 where ignored
    assert out.shape == labels.shape and out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(out[labels == -100]) == 0


def test_gradients_come_from_the_forward_pass_once():
    """The loss is the last operation: its gradients are computed in forward (no second logits
    matmul) and scaled by the incoming scalar in backward; a second backward through the same graph
    is refused instead of returning doubly scaled gradients; without autograd no gradient is built."""
    h, w, labels = _inputs(1, 20, 8, 13)
    loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=6)
    (0.5 * loss).backward(retain_graph=True)
    ref, _ = plain_cross_entropy(torch.nn.functional.linear(h, w), labels)
    r_h, r_w = torch.autograd.grad(0.5 * ref, [h, w])
    torch.testing.assert_close(h.grad, r_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, r_w, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    with torch.no_grad():
        again, _ = chunked_cross_entropy(h, w, labels, chunk_size=6)
    assert again.grad_fn is None and torch.equal(again, loss.detach())


@pytest.mark.parametrize("chunk", [7, 1000])
def test_final_logit_softcap_equals_capped_plain_value_and_grads(chunk):
    """Gemma's c·tanh(z/c) on the logits: loss and the gradients through the tanh equal autograd's."""
    h, w, labels = _inputs(2, 37, 16, 53)
    w.data.mul_(4)  # logits of a few units, so that a cap of 2 bends them
    loss, _ = chunked_cross_entropy(h, w, labels, chunk_size=chunk, softcap=2.0)
    g_h, g_w = torch.autograd.grad(1.5 * loss, [h, w])
    z = torch.nn.functional.linear(h, w)
    assert (z.abs() > 2).float().mean() > 0.2
    ref, _ = plain_cross_entropy(2.0 * torch.tanh(z / 2.0), labels)
    r_h, r_w = torch.autograd.grad(1.5 * ref, [h, w])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_h, r_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_w, r_w, rtol=1e-5, atol=1e-6)
    uncapped, _ = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
    assert not torch.allclose(uncapped, loss, rtol=1e-3)


def test_train_module_applies_the_models_final_logit_softcapping():
    """TrainModule's chunked loss equals cross-entropy of the model's own (capped) logits (Gemma 3 config)."""
    from megalong.engine.model import TrainModule
    from megalong.models import create_model
    from tests.conftest import tiny_config

    cfg = tiny_config("gemma3_text", head_dim=16, final_logit_softcapping=0.5)
    model = create_model(cfg, seed=0)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # logits past the cap
    x = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(3))
    got, count = TrainModule(model, loss_chunk_size=8)(input_ids=x[:, :-1], labels=x[:, 1:])
    got.backward()
    got_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=x[:, :-1]).logits
    assert logits.abs().max() <= 0.5 and TrainModule(model).loss_head.softcap == 0.5
    ref, ref_count = plain_cross_entropy(logits, x[:, 1:])
    ref.backward()
    assert count == ref_count == 40
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, model.lm_head.weight.grad, rtol=1e-5, atol=1e-6)
