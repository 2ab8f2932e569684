// Dispatcher registration of routed attention and its CPU implementation (torch side only).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

#include "kvpo/routed_attention.h"
#include "tensor_views.h"

namespace kvpo {
namespace {

DType elem_type(const at::Tensor& t) {
  const DType type = dtype_of(t, "routed_attention");
  TORCH_CHECK(type != DType::F64, "routed_attention: expected float32, float16 or bfloat16, got ",
              t.scalar_type());
  return type;
}

// Shape of the call, after checking every tensor against q's.
RoutedAttentionShape check_shapes(const at::Tensor& q, const at::Tensor& k_new,
                                  const at::Tensor& v_new, const at::Tensor& kv_pages,
                                  const at::Tensor& page_table, const at::Tensor& ctx_lens) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, Lq, H, D], got ", q.sizes());
  TORCH_CHECK(kv_pages.dim() == 5 && kv_pages.size(1) == 2,
              "kv_pages must be [P, 2, page_size, H_kv, D], got ", kv_pages.sizes());
  const RoutedAttentionShape s{q.size(0), q.size(1), k_new.size(1),
                               q.size(2), kv_pages.size(3), q.size(3)};
  TORCH_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, "q's ", s.heads,
              " heads must be a multiple of kv_pages' ", s.kv_heads);
  TORCH_CHECK(kv_pages.size(4) == s.dim, "kv_pages has head dim ", kv_pages.size(4), ", q ", s.dim);
  for (const at::Tensor* t : {&k_new, &v_new}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({s.batch, s.ln, s.kv_heads, s.dim}),
                "k_new and v_new must be [B, Ln, H_kv, D] = [", s.batch, ", ", s.ln, ", ",
                s.kv_heads, ", ", s.dim, "], got ", t->sizes());
  }
  for (const at::Tensor* t : {&k_new, &v_new, &kv_pages}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "all inputs must be ", q.scalar_type(),
                ", got ", t->scalar_type());
  }
  const int64_t page_elems = kv_pages.size(2) * s.kv_heads * s.dim;
  TORCH_CHECK(kv_pages.stride(4) == 1 && kv_pages.stride(3) == s.dim &&
                  kv_pages.stride(2) == s.kv_heads * s.dim && kv_pages.stride(1) == page_elems,
              "each page of kv_pages must be contiguous, got strides ", kv_pages.strides());
  TORCH_CHECK(page_table.scalar_type() == at::kInt && ctx_lens.scalar_type() == at::kInt,
              "page_table and ctx_lens must be int32");
  TORCH_CHECK(page_table.dim() == 2 && page_table.size(0) == s.batch && page_table.stride(1) == 1,
              "page_table must be [B, max_pages] with unit stride, got ", page_table.sizes());
  TORCH_CHECK(ctx_lens.dim() == 1 && ctx_lens.size(0) == s.batch && ctx_lens.is_contiguous(),
              "ctx_lens must be a contiguous [B] tensor, got ", ctx_lens.sizes());
  return s;
}

PagedContext paged_context(const at::Tensor& kv_pages, const at::Tensor& page_table,
                           const at::Tensor& ctx_lens) {
  return PagedContext{kv_pages.data_ptr(), kv_pages.stride(0), kv_pages.size(2),
                      page_table.data_ptr<int32_t>(), page_table.stride(0),
                      ctx_lens.data_ptr<int32_t>()};
}

std::tuple<at::Tensor, at::Tensor> routed_attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kv_pages, const at::Tensor& page_table, const at::Tensor& ctx_lens,
    double scale) {
  const at::Tensor q = q_in.contiguous(), k_new = k_in.contiguous(), v_new = v_in.contiguous();
  const RoutedAttentionShape s = check_shapes(q, k_new, v_new, kv_pages, page_table, ctx_lens);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({s.batch, s.heads, s.lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const RoutedAttentionForwardArgs args{q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(),
                                        out.data_ptr(), lse.data_ptr<float>()};
  routed_attention_forward_cpu(s, elem_type(q), paged_context(kv_pages, page_table, ctx_lens),
                               args, static_cast<float>(scale));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& dlse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& kv_pages,
    const at::Tensor& page_table, const at::Tensor& ctx_lens, const at::Tensor& out_in,
    const at::Tensor& lse_in, double scale) {
  const at::Tensor q = q_in.contiguous(), k_new = k_in.contiguous(), v_new = v_in.contiguous();
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous();
  const at::Tensor dlse = dlse_in.contiguous(), lse = lse_in.contiguous();
  const RoutedAttentionShape s = check_shapes(q, k_new, v_new, kv_pages, page_table, ctx_lens);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "dout and out must have q's shape ", q.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "dout and out must be ", q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && dlse.scalar_type() == at::kFloat,
              "lse and dlse must be float32");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.batch, s.heads, s.lq}) &&
                  dlse.sizes() == lse.sizes(),
              "lse and dlse must be [B, H, Lq] = [", s.batch, ", ", s.heads, ", ", s.lq, "]");
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k_new), dv = at::empty_like(v_new);
  if (q.numel() == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const RoutedAttentionBackwardArgs args{
      dout.data_ptr(), dlse.data_ptr<float>(), q.data_ptr(),  k_new.data_ptr(),
      v_new.data_ptr(), out.data_ptr(),        lse.data_ptr<float>(), dq.data_ptr(),
      dk.data_ptr(),    dv.data_ptr()};
  routed_attention_backward_cpu(s, elem_type(q), paged_context(kv_pages, page_table, ctx_lens),
                                args, static_cast<float>(scale));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvpo_C, m) {
  m.def(
      "routed_attention_fwd(Tensor q, Tensor k_new, Tensor v_new, Tensor kv_pages, "
      "Tensor page_table, Tensor ctx_lens, float scale) -> (Tensor, Tensor)");
  m.def(
      "routed_attention_bwd(Tensor dout, Tensor dlse, Tensor q, Tensor k_new, Tensor v_new, "
      "Tensor kv_pages, Tensor page_table, Tensor ctx_lens, Tensor out, Tensor lse, "
      "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvpo_C, CPU, m) {
  m.impl("routed_attention_fwd", &routed_attention_fwd_cpu);
  m.impl("routed_attention_bwd", &routed_attention_bwd_cpu);
}

}  // namespace kvpo
