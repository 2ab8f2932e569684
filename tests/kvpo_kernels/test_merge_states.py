"""merge_attention_states against attention over the union of keys and against the closed form."""

import pytest
import torch

import kvpo_kernels
from tests.oracle import assert_close


def _attention(q, k, v):
    """(out [B, L, H, D], lse [B, H, L]) of softmax attention, float64, no mask."""
    scores = torch.einsum("blhd,bkhd->bhlk", q, k)
    out = torch.einsum("bhlk,bkhd->blhd", torch.softmax(scores, -1), v)
    return out, torch.logsumexp(scores, -1)


def test_merge_of_two_key_sets_equals_attention_over_their_union():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 11, 4, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 11, 4, 8, generator=gen, dtype=torch.float64)
    out_a, lse_a = _attention(q, k[:, :6], v[:, :6])
    out_b, lse_b = _attention(q, k[:, 6:], v[:, 6:])
    expected_out, expected_lse = _attention(q, k, v)
    out, lse = kvpo_kernels.merge_attention_states(
        out_a.float(), lse_a.float(), out_b.float(), lse_b.float()
    )
    assert_close(out, expected_out, "out")
    assert_close(lse, expected_lse, "lse")


def test_closed_form_and_empty_sides():
    gen = torch.Generator().manual_seed(1)
    out_a = torch.randn(1, 4, 2, 3, generator=gen)
    out_b = torch.randn(1, 4, 2, 3, generator=gen)
    lse_a = torch.tensor([[[0.5, float("-inf"), 2.0, float("-inf")], [1.0, 3.0, -1.0, 0.0]]])
    lse_b = torch.tensor([[[1.5, 0.25, float("-inf"), float("-inf")], [1.0, -2.0, 4.0, 0.0]]])
    out, lse = kvpo_kernels.merge_attention_states(out_a, lse_a, out_b, lse_b)
    a64, b64 = lse_a.double(), lse_b.double()
    total = a64.exp() + b64.exp()
    expected_lse = total.log()  # log(0) = -inf where both sides are empty
    w_a = (a64.exp() / total).nan_to_num(0.0).transpose(1, 2)[..., None]
    w_b = (b64.exp() / total).nan_to_num(0.0).transpose(1, 2)[..., None]
    expected_out = w_a * out_a.double() + w_b * out_b.double()
    assert_close(lse, expected_lse, "lse")
    assert_close(out, expected_out, "out")
    assert torch.equal(out[0, 3, 0], torch.zeros(3))  # both sides empty: out = 0, lse = -inf
    assert torch.isneginf(lse[0, 0, 3])
    assert torch.equal(out[0, 1, 0], out_b[0, 1, 0])  # one empty side: the other passes through


def test_gradients_match_fp64_autograd_and_stay_finite_on_empty_sides():
    gen = torch.Generator().manual_seed(2)
    out_a = torch.randn(1, 3, 2, 4, generator=gen, dtype=torch.float64)
    out_b = torch.randn(1, 3, 2, 4, generator=gen, dtype=torch.float64)
    lse_a = torch.tensor([[[0.3, float("-inf"), float("-inf")], [1.0, 2.0, 0.5]]])
    lse_b = torch.tensor([[[-0.7, 1.1, float("-inf")], [0.2, -1.0, 0.5]]])
    inputs = [t.float().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = kvpo_kernels.merge_attention_states(*inputs)
    w = torch.randn(out.shape, generator=gen)
    (out * w).sum().backward(retain_graph=True)
    grads = [t.grad.clone() for t in inputs]
    assert all(torch.isfinite(g).all() for g in grads)

    # reference: the closed form in fp64 on the entries with at least one non-empty side
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    a, la, b, lb = ref_inputs
    total = torch.logaddexp(la, lb)
    keep = torch.isfinite(total)
    wa = torch.where(keep, torch.exp(la - total.where(keep, 0.0)), 0.0).transpose(1, 2)[..., None]
    wb = torch.where(keep, torch.exp(lb - total.where(keep, 0.0)), 0.0).transpose(1, 2)[..., None]
    (((wa * a + wb * b) * w.double()).sum()).backward()
    for got, ref in zip(grads, ref_inputs):
        assert_close(got, ref.grad.nan_to_num(0.0), "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_outputs_keep_their_dtype(dtype):
    out_a = torch.randn(1, 2, 1, 4).to(dtype)
    lse = torch.zeros(1, 1, 2)
    out, merged = kvpo_kernels.merge_attention_states(out_a, lse, out_a, lse)
    assert out.dtype == dtype and merged.dtype == torch.float32
    assert torch.equal(out, out_a)  # equal weights of the same state
    assert_close(merged, torch.full((1, 1, 2), 0.6931471805599453), "lse")


def test_shape_errors_name_what_came():
    with pytest.raises(ValueError, match=r"lse_b must be \[B=1, H=2, L=3\], got \(1, 3, 2\)"):
        kvpo_kernels.merge_attention_states(
            torch.zeros(1, 3, 2, 4),
            torch.zeros(1, 2, 3),
            torch.zeros(1, 3, 2, 4),
            torch.zeros(1, 3, 2),
        )
