"""routed_attention on every backend against an fp64 oracle that gathers token by token.

The oracle walks each row's cached tokens in Python (page = page_table[b, t // page_size],
slot = t % page_size), appends the row's new tokens and runs softmax attention in fp64 on the
CPU. It shares no index math with the kernels. Pools are permuted, pages are shared and aliased
across rows, every slot no row attends is NaN, and page-table entries past a row's pages are
garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import kvpo_kernels
from kvpo_kernels import registry
from kvpo_kernels.ops import routed_attention as ra
from tests.oracle import BACKENDS, assert_close_to_oracle

DTYPES = {
    "torch": (torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float32, torch.float16, torch.bfloat16),
    # the interpreter's bf16 tl.dot is broken; on a GPU bf16 is tested too
    "triton": (torch.float32, torch.float16)
    + (() if registry.TRITON_INTERPRET else (torch.bfloat16,)),
}
BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in DTYPES[b]]
# the Triton interpreter runs numpy per block: its long case is the "medium" one
INTERPRETER_SKIPS = {"long, odd head dim"}
# page-table entries past a row's pages: must never be read
GARBAGE_PAGE = 10**6
LONG_TABLE = [int(i) for i in torch.randperm(40, generator=torch.Generator().manual_seed(3))]


def oracle(q, k_new, v_new, kv_pages, page_table, ctx_lens, scale, dtype=torch.float64):
    """Routed attention by per-token gather, computed entirely in ``dtype`` on the CPU."""
    q, k_new, v_new, kv_pages = (t.cpu() for t in (q, k_new, v_new, kv_pages))
    batch, lq, heads, dim = q.shape
    page_size, kv_heads = kv_pages.shape[2], kv_pages.shape[3]
    outs, lses = [], []
    for b in range(batch):
        keys, values = [], []
        for t in range(int(ctx_lens[b])):
            page = int(page_table[b, t // page_size])
            keys.append(kv_pages[page, 0, t % page_size])
            values.append(kv_pages[page, 1, t % page_size])
        keys += list(k_new[b].unbind(0))
        values += list(v_new[b].unbind(0))
        if not keys:
            outs.append(torch.zeros(lq, heads, dim, dtype=dtype))
            lses.append(torch.full((heads, lq), float("-inf"), dtype=dtype))
            continue
        # head h reads kv head h // (H / H_kv)
        kh = torch.stack(keys).to(dtype).repeat_interleave(heads // kv_heads, dim=1)
        vh = torch.stack(values).to(dtype).repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[b].to(dtype), kh) * scale
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vh))
        lses.append(torch.logsumexp(scores, dim=-1))
    return torch.stack(outs), torch.stack(lses)


@dataclass
class Case:
    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    kv_pages: torch.Tensor
    page_table: torch.Tensor
    ctx_lens: torch.Tensor

    def args(self):
        return self.q, self.k_new, self.v_new, self.kv_pages, self.page_table, self.ctx_lens

    def to(self, device):
        return Case(*(t.to(device) for t in self.args()))


def make_case(tables, ctx_lens, *, lq=5, ln=4, heads=4, kv_heads=2, dim=16, page_size=7,
              num_pages=12, dtype=torch.float32, seed=0):  # fmt: skip
    """A pool whose every slot that no row attends is NaN, with the given page tables."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(tables)
    pool = torch.randn(num_pages, 2, page_size, kv_heads, dim, generator=gen)
    attended = torch.zeros(num_pages, page_size, dtype=torch.bool)
    for row, n in zip(tables, ctx_lens):
        for t in range(n):
            attended[row[t // page_size], t % page_size] = True
    pool.masked_fill_(~attended[:, None, :, None, None], float("nan"))
    width = max(len(r) for r in tables) + 1
    table = torch.full((batch, width), GARBAGE_PAGE, dtype=torch.int32)
    for b, row in enumerate(tables):
        table[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
    q = torch.randn(batch, lq, heads, dim, generator=gen)
    k_new = torch.randn(batch, ln, kv_heads, dim, generator=gen)
    v_new = torch.randn(batch, ln, kv_heads, dim, generator=gen)
    return Case(
        q.to(dtype), k_new.to(dtype), v_new.to(dtype), pool.to(dtype), table,
        torch.tensor(ctx_lens, dtype=torch.int32),
    )  # fmt: skip


# rows share page 5 and 2, row 2 attends page 7 twice (aliased), row 1 has no context, row 0
# ends mid-page; the pool order is a permutation unrelated to attention order
CASES = {
    "shared+aliased+empty+gqa": lambda **kw: make_case(
        [[5, 2, 9], [], [7, 7, 3, 5]], [17, 0, 26], **kw
    ),
    "ln=0": lambda **kw: make_case([[4, 1], [1, 8]], [9, 14], ln=0, **kw),
    "b=1 lq=1 mha": lambda **kw: make_case([[3, 0]], [11], lq=1, ln=2, heads=2, kv_heads=2, **kw),
    "empty row, no new tokens": lambda **kw: make_case([[6], []], [4, 0], ln=0, **kw),
    # several key blocks of the triton kernels (32 tokens); D not a multiple of 16
    "medium, odd head dim": lambda **kw: make_case(
        [LONG_TABLE[:6], LONG_TABLE[3:8] + [LONG_TABLE[4]]],
        [71, 50],
        lq=40,
        ln=37,
        dim=40,
        page_size=13,
        num_pages=40,
        **kw,
    ),
    # several key blocks, query tiles and new-token tiles of the C++ kernel (96 tokens, 96 lanes)
    "long, odd head dim": lambda **kw: make_case(
        [LONG_TABLE[:16], LONG_TABLE[8:19] + [LONG_TABLE[9]]],
        [200, 150],
        lq=100,
        ln=110,
        dim=40,
        page_size=13,
        num_pages=40,
        **kw,
    ),
}


def _skip_unless_usable(backend, device):
    if backend == "cpp" and device.type != "cpu":
        pytest.skip("the cpp backend of routed_attention has CPU kernels only")


def _params(names):
    return [
        pytest.param(backend, dtype, name, id=f"{backend}-{str(dtype)[6:]}-{name}")
        for backend, dtype in BACKEND_DTYPES
        for name in names
        if not (backend == "triton" and registry.TRITON_INTERPRET and name in INTERPRETER_SKIPS)
    ]


def _grads(case, fn, compute, weights):
    """Gradients of sum(out * w_out) + sum(lse * w_lse) w.r.t. q, k_new, v_new in ``compute``."""
    inputs = [t.detach().to(compute).requires_grad_() for t in case.args()[:3]]
    pool = case.kv_pages.to(compute)
    out, lse = fn(*inputs, pool, case.page_table, case.ctx_lens)
    lse = lse.masked_fill(torch.isinf(lse), 0.0)  # empty rows: no gradient from -inf
    w_out, w_lse = weights
    w_out, w_lse = w_out.to(out.device, compute), w_lse.to(lse.device, lse.dtype)
    loss = (out.to(compute) * w_out).sum() + (lse * w_lse).sum()
    return [g.cpu() for g in torch.autograd.grad(loss, inputs)]


def check_against_oracle(case, backend, device, what, *, scale=None, gradients=True):
    """out, lse and (optionally) the gradients of q, k_new, v_new on ``backend`` and ``device``
    are within 2x of eager PyTorch's error in the case's dtype, against the fp64 oracle."""
    dtype = case.q.dtype
    on_device, case = case.to(device), case.to("cpu")
    scale_value = 1 / math.sqrt(case.q.shape[-1]) if scale is None else scale

    def kernel(*args):
        return kvpo_kernels.routed_attention(*args, scale=scale, return_lse=True, backend=backend)

    def reference(*args, dtype=torch.float64):
        return oracle(*args, scale_value, dtype=dtype)

    out, lse = (t.cpu() for t in kernel(*on_device.args()))
    batch, lq, heads, _ = case.q.shape
    assert out.dtype == dtype and out.shape == case.q.shape
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, lq)
    ref_out, ref_lse = reference(*case.args())
    eager_out, eager_lse = reference(*case.args(), dtype=dtype)
    assert_close_to_oracle(out, eager_out, ref_out, what=f"{what} out")
    assert_close_to_oracle(lse, eager_lse.float(), ref_lse.float(), what=f"{what} lse")
    if not gradients:
        return
    gen = torch.Generator().manual_seed(1)
    weights = (
        torch.randn(case.q.shape, generator=gen),
        torch.randn(batch, heads, lq, generator=gen),
    )
    got = _grads(on_device, kernel, dtype, weights)
    ref = _grads(case, reference, torch.float64, weights)
    eager = _grads(case, lambda *a: reference(*a, dtype=dtype), dtype, weights)
    for label, g, r, e in zip(("dq", "dk_new", "dv_new"), got, ref, eager):
        assert g.dtype == dtype
        assert_close_to_oracle(g, e, r, what=f"{what} {label}")


@pytest.mark.parametrize("backend,dtype,name", _params(CASES))
def test_forward_matches_fp64_oracle(backend, dtype, name, device):
    _skip_unless_usable(backend, device)
    case = CASES[name](dtype=dtype)
    check_against_oracle(case, backend, device, f"{backend} {dtype} {name}", gradients=False)


GRADIENT_CASES = ["shared+aliased+empty+gqa", "b=1 lq=1 mha", "medium, odd head dim",
                  "long, odd head dim"]  # fmt: skip


@pytest.mark.parametrize("backend,dtype,name", _params(GRADIENT_CASES))
def test_gradients_match_fp64_oracle(backend, dtype, name, device):
    _skip_unless_usable(backend, device)
    case = CASES[name](dtype=dtype)
    check_against_oracle(case, backend, device, f"{backend} {dtype} {name}", scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_give_zero_and_minus_inf(backend, device):
    _skip_unless_usable(backend, device)
    case = CASES["empty row, no new tokens"]().to(device)
    out, lse = kvpo_kernels.routed_attention(*case.args(), return_lse=True, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_portable_path_matches_fp64_oracle(monkeypatch, dtype):
    # the C++ kernel's instruction set is chosen per call; force the portable C++ tiles
    monkeypatch.setenv("KVPO_CPU_ISA", "generic")
    case = CASES["long, odd head dim"](dtype=dtype)
    check_against_oracle(case, "cpp", torch.device("cpu"), f"generic {dtype}")


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("backend", BACKENDS)
def test_common_head_dims(backend, dim, device):
    _skip_unless_usable(backend, device)
    case = make_case([[3, 0], [0]], [11, 6], lq=9, ln=3, heads=2, kv_heads=1, dim=dim)
    check_against_oracle(case, backend, device, f"{backend} D={dim}")


def test_pool_that_requires_grad_is_rejected():
    case = CASES["ln=0"]()
    with pytest.raises(ValueError, match="kv_pages requires grad"):
        kvpo_kernels.routed_attention(
            *case.args()[:3], case.kv_pages.requires_grad_(), *case.args()[4:]
        )


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda c: c.ctx_lens.fill_(36), ValueError, r"ctx_lens\[0\] = 36, expected 0\.\.35"),
        (
            lambda c: c.page_table.__setitem__((1, 0), 12),
            IndexError,
            r"page_table\[1, 0\] names 12",
        ),
        (lambda c: setattr(c, "ctx_lens", c.ctx_lens.long()), TypeError, "ctx_lens must be int32"),
        (lambda c: setattr(c, "k_new", c.k_new[:, :, :1]), ValueError, "k_new must be"),
        (lambda c: setattr(c, "q", c.q[..., :3, :]), ValueError, "multiple of kv_pages' 2 heads"),
        (lambda c: setattr(c, "q", c.q.double()), TypeError, "k_new is torch.float32, q is"),
        (
            lambda c: setattr(
                c, "kv_pages", c.kv_pages.transpose(2, 3).contiguous().transpose(2, 3)
            ),
            ValueError,
            "each page of kv_pages must be contiguous",
        ),
    ],
)
def test_bad_arguments_are_rejected(mutate, err, match):
    case = make_case([[4, 1, 2, 3], [1, 8]], [9, 14])
    mutate(case)
    with pytest.raises(err, match=match):
        kvpo_kernels.routed_attention(*case.args(), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_view_of_a_multi_layer_pool(backend, device):
    # a layer of a [P, L, 2, ps, H, D] pool: pages contiguous, page stride = L pages
    _skip_unless_usable(backend, device)
    case = CASES["shared+aliased+empty+gqa"]()
    pools = torch.stack([torch.full_like(case.kv_pages, float("nan")), case.kv_pages], dim=1)
    case.kv_pages = pools[:, 1]
    assert not case.kv_pages.is_contiguous()
    check_against_oracle(case, backend, device, f"{backend} layer view", gradients=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device):
    _skip_unless_usable(backend, device)
    case = CASES["shared+aliased+empty+gqa"](lq=3, ln=2).to(device)
    q, k_new, v_new = (t.requires_grad_() for t in case.args()[:3])
    args = (q, k_new, v_new, *case.args()[3:], 0.25, backend)
    torch.library.opcheck(ra._forward_op, args)
    out, lse = ra._forward_op(*args)
    torch.library.opcheck(
        ra._backward_op,
        (torch.randn_like(out), torch.randn_like(lse), *[a.detach() for a in args[:3]],
         *case.args()[3:], out.detach(), lse.detach(), 0.25, backend),
    )  # fmt: skip


def test_torch_compile_traces_a_caller(device):
    case = CASES["shared+aliased+empty+gqa"]().to(device)

    def block(q, k_new, v_new, kv_pages, page_table, ctx_lens):
        out, lse = kvpo_kernels.routed_attention(
            q * 2, k_new, v_new, kv_pages, page_table, ctx_lens, return_lse=True
        )
        return out.sum(-1) + lse.transpose(1, 2).nan_to_num(0, neginf=0)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    q = case.q.clone().requires_grad_()
    got = compiled(q, *case.args()[1:])
    got.sum().backward()
    q_ref = case.q.clone().requires_grad_()
    expected = block(q_ref, *case.args()[1:])
    expected.sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(q.grad, q_ref.grad)
