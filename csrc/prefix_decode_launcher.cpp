// Backend "cuda" entry point: checks every input with TORCH_CHECK, plans the split-KV launch, allocates the
// outputs and the per-split partials, and runs the kernels of prefix_decode_kernel.cu on the current stream.
// The Python side (prefix_kernels/ops/cuda_prefix_attention.py) has already validated the call; these checks
// guard the kernel against any other caller.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "prefix_decode.h"

namespace {

constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
constexpr double kLog2e = 1.4426950408889634;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), name, ": expected q's device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
}

// The kernels read rows of D elements with 128-bit loads: unit stride along D, every row 16-byte aligned.
void check_vector_layout(const at::Tensor& t, const char* name) {
  if (t.numel() == 0) return;  // nothing is read
  TORCH_CHECK(t.stride(-1) == 1, name, ": the last dim must be contiguous, got stride ", t.stride(-1));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": data must be 16-byte aligned");
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) % 8 == 0, name, ": the stride of dim ", d,
                " must be a multiple of 8 elements, got ", t.stride(d));
  }
}

// [B, H, N, D], or a shared [H, N, D] read with batch stride 0.
prefix_decode::Strided strided(const at::Tensor& t) {
  if (t.dim() == 3) return {t.data_ptr(), 0, t.stride(0), t.stride(1)};
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

}  // namespace

// q [B, Hq, Sq, D]; k, v [B, Hkv, Skv, D]; prefix_k, prefix_v [Hkv, P, D] shared, [B, Hkv, P, D] per row, or a
// bank [N, Hkv, P, D] with prefix_index int64 [B]; prefix_lengths int64 [B] (row b sees its first
// prefix_lengths[b] prefix keys, each in [0, P]; the caller checks the values); key_mask bool [B or 1, Skv]
// (true = attend).
// Returns o [B, Hq, Sq, D] in q's dtype and lse [B, Hq, Sq] float32 (natural log).
std::vector<at::Tensor> prefix_decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                              const std::optional<at::Tensor>& prefix_index,
                                              const std::optional<at::Tensor>& prefix_lengths,
                                              const std::optional<at::Tensor>& key_mask, bool causal,
                                              double scale) {
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q: expected float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 4, "q: expected [B, Hq, Sq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k: expected [B, Hkv, Skv, D], got ", k.sizes());
  TORCH_CHECK(prefix_k.dim() == 3 || prefix_k.dim() == 4, "prefix_k: expected [Hkv, P, D] or [N, Hkv, P, D], got ",
              prefix_k.sizes());
  check_like_q(k, "k", q);
  check_like_q(v, "v", q);
  check_like_q(prefix_k, "prefix_k", q);
  check_like_q(prefix_v, "prefix_v", q);

  const int64_t batch = q.size(0), heads_q = q.size(1), seq_q = q.size(2), head_dim = q.size(3);
  const int64_t heads_kv = k.size(1), seq_kv = k.size(2), prefix_len = prefix_k.size(-2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256, "q: head dim must be 64, 128 or 256, got ",
              head_dim);
  TORCH_CHECK(seq_q <= prefix_decode::kRowsPerBlock, "q: the decode kernel takes Sq <= ",
              prefix_decode::kRowsPerBlock, ", got ", seq_q);
  TORCH_CHECK(k.size(0) == batch && k.size(3) == head_dim, "k: expected [B=", batch, ", Hkv, Skv, D=", head_dim,
              "], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, "k: Hq=", heads_q, " must be a multiple of Hkv=", heads_kv);
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), "prefix_v: expected the shape of prefix_k ", prefix_k.sizes(),
              ", got ", prefix_v.sizes());
  TORCH_CHECK(prefix_k.size(-3) == heads_kv && prefix_k.size(-1) == head_dim, "prefix_k: expected [..., Hkv=",
              heads_kv, ", P, D=", head_dim, "], got ", prefix_k.sizes());
  TORCH_CHECK(std::max({batch, heads_q, seq_kv, prefix_len}) <= kMaxInt - prefix_decode::kKeysPerTile,
              "q, k, prefix_k: sizes must fit in 32-bit integers");
  if (prefix_index) {
    const at::Tensor& index = *prefix_index;
    TORCH_CHECK(prefix_k.dim() == 4, "prefix_index: needs a bank prefix_k [N, Hkv, P, D], got ", prefix_k.sizes());
    TORCH_CHECK(index.device() == q.device() && index.scalar_type() == at::kLong && index.dim() == 1 &&
                    index.size(0) == batch && index.is_contiguous(),
                "prefix_index: expected a contiguous int64 [", batch, "] on ", q.device(), ", got ",
                index.scalar_type(), " ", index.sizes(), " on ", index.device());
  } else {
    TORCH_CHECK(prefix_k.dim() == 3 || prefix_k.size(0) == batch,
                "prefix_k: a 4-D prefix without prefix_index is one per row, expected first dim B=", batch, ", got ",
                prefix_k.sizes());
  }
  if (prefix_lengths) {
    const at::Tensor& lengths = *prefix_lengths;
    TORCH_CHECK(prefix_k.dim() == 4, "prefix_lengths: needs a per-row or bank prefix_k [N, Hkv, P, D], got ",
                prefix_k.sizes());
    TORCH_CHECK(lengths.device() == q.device() && lengths.scalar_type() == at::kLong && lengths.dim() == 1 &&
                    lengths.size(0) == batch && lengths.is_contiguous(),
                "prefix_lengths: expected a contiguous int64 [", batch, "] on ", q.device(), ", got ",
                lengths.scalar_type(), " ", lengths.sizes(), " on ", lengths.device());
  }
  if (key_mask) {
    const at::Tensor& mask = *key_mask;
    TORCH_CHECK(mask.device() == q.device() && mask.scalar_type() == at::kBool && mask.dim() == 2 &&
                    (mask.size(0) == 1 || mask.size(0) == batch) && mask.size(1) == seq_kv,
                "attention_mask: expected a bool key-padding mask [B=", batch, " or 1, Skv=", seq_kv, "] on ",
                q.device(), ", got ", mask.scalar_type(), " ", mask.sizes(), " on ", mask.device());
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale: expected a positive finite float, got ", scale);
  check_vector_layout(q, "q");
  check_vector_layout(k, "k");
  check_vector_layout(v, "v");
  check_vector_layout(prefix_k, "prefix_k");
  check_vector_layout(prefix_v, "prefix_v");

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor o = at::empty({batch, heads_q, seq_q, head_dim}, q.options());
  at::Tensor lse = at::empty({batch, heads_q, seq_q}, q.options().dtype(at::kFloat));
  const int64_t rows = batch * heads_q * seq_q;
  if (rows == 0) return {o, lse};

  // The plan: one block per (batch row, GQA group, chunk of 16 of its query rows) per split. Decode batches
  // rarely fill the GPU on their own, so the sequence is split until one wave of resident blocks (the kernel's
  // occupancy, as FlashInfer sizes its grid) is full, with no split shorter than kMinSplitKeys.
  const int64_t row_chunks = ceil_div(heads_q / heads_kv * seq_q, prefix_decode::kRowsPerBlock);
  const int64_t blocks = batch * heads_kv * row_chunks;
  TORCH_CHECK(blocks <= kMaxInt && rows <= kMaxInt, "q: too many query rows for one launch: ", rows);
  const auto dtype = q.scalar_type() == at::kHalf ? prefix_decode::Dtype::kHalf : prefix_decode::Dtype::kBFloat16;
  int sm_count = 0, blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, q.get_device()));
  C10_CUDA_CHECK(prefix_decode::resident_blocks(dtype, static_cast<int>(head_dim), &blocks_per_sm));
  int64_t seq_splits = 0, split_len = prefix_decode::kKeysPerTile;
  if (seq_kv > 0) {
    const int64_t wave = std::max<int64_t>(blocks_per_sm, 1) * sm_count;
    seq_splits = std::clamp<int64_t>(wave / blocks - 1, 1, ceil_div(seq_kv, prefix_decode::kMinSplitKeys));
    split_len = ceil_div(ceil_div(seq_kv, seq_splits), prefix_decode::kKeysPerTile) * prefix_decode::kKeysPerTile;
    seq_splits = ceil_div(seq_kv, split_len);
  }
  const int64_t num_splits = 1 + seq_splits;  // split 0 is the prefix
  at::Tensor o_part = at::empty({rows, num_splits, head_dim}, q.options().dtype(at::kFloat));
  at::Tensor lse_part = at::empty({rows, num_splits}, q.options().dtype(at::kFloat));

  prefix_decode::Params params{};
  params.q = strided(q);
  params.k = strided(k);
  params.v = strided(v);
  params.pk = strided(prefix_k);
  params.pv = strided(prefix_v);
  params.prefix_index = prefix_index ? prefix_index->data_ptr<int64_t>() : nullptr;
  params.prefix_lengths = prefix_lengths ? prefix_lengths->data_ptr<int64_t>() : nullptr;
  if (key_mask) {
    params.key_mask = reinterpret_cast<const uint8_t*>(key_mask->data_ptr<bool>());
    params.key_mask_stride_b = key_mask->size(0) == 1 ? 0 : key_mask->stride(0);
    params.key_mask_stride_n = key_mask->stride(1);
  }
  params.batch = static_cast<int>(batch);
  params.heads_q = static_cast<int>(heads_q);
  params.heads_kv = static_cast<int>(heads_kv);
  params.seq_q = static_cast<int>(seq_q);
  params.seq_kv = static_cast<int>(seq_kv);
  params.prefix_len = static_cast<int>(prefix_len);
  params.causal = causal;
  params.scale_log2 = static_cast<float>(scale * kLog2e);
  params.num_splits = static_cast<int>(num_splits);
  params.split_len = static_cast<int>(split_len);
  params.row_chunks = static_cast<int>(row_chunks);
  params.o_part = o_part.data_ptr<float>();
  params.lse_part = lse_part.data_ptr<float>();
  params.o = o.data_ptr();
  params.lse = lse.data_ptr<float>();

  C10_CUDA_CHECK(prefix_decode::launch(params, dtype, static_cast<int>(head_dim), c10::cuda::getCurrentCUDAStream()));
  return {o, lse};
}
