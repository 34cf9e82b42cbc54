// The interface between the torch-aware launcher and the torch-free decode kernels of prefix_decode_kernel.cu.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace prefix_decode {

// Query rows of one GQA group that a block serves: the Hq / Hkv heads sharing a KV head, times Sq.
// A group with more rows is served by several blocks (each then reads the group's K/V again).
constexpr int kRowsPerBlock = 16;
// Keys a block stages in shared memory at a time; one per lane of a warp in the softmax.
constexpr int kKeysPerTile = 32;
// A split of the sequence keeps at least this many keys, so the partial it writes (D floats per query row)
// stays small next to the K/V it reads.
constexpr int kMinSplitKeys = 256;

enum class Dtype { kHalf, kBFloat16 };

// A [batch, head, token, D] tensor read through its strides (in elements; the D dimension is contiguous).
// A prefix shared by every row has stride_b = 0.
struct Strided {
  const void* data;
  int64_t stride_b, stride_h, stride_n;
};

struct Params {
  Strided q;         // [B, Hq, Sq, D]
  Strided k, v;      // [B, Hkv, Skv, D]
  Strided pk, pv;    // [B, Hkv, P, D] per row, [N, Hkv, P, D] a bank, or a shared [Hkv, P, D] (stride_b = 0)
  const int64_t* prefix_index;  // [B] bank entry of each row, or null
  const int64_t* prefix_lengths;  // [B] row b sees prefix keys [0, prefix_lengths[b]), or null (all P)
  const uint8_t* key_mask;      // bool [B or 1, Skv], true = attend, or null
  int64_t key_mask_stride_b, key_mask_stride_n;
  int batch, heads_q, heads_kv, seq_q, seq_kv, prefix_len;
  bool causal;
  float scale_log2;  // scale * log2(e): the kernels work in base 2

  // The split plan: split 0 is the prefix, split s >= 1 the sequence keys [(s-1) * split_len, s * split_len).
  int num_splits, split_len, row_chunks;

  float* o_part;    // [R, num_splits, D] each split's normalised output, R = B * Hq * Sq
  float* lse_part;  // [R, num_splits] each split's log2-sum-exp2 (-inf when it saw no key)
  void* o;          // [R, D] contiguous, in q's dtype
  float* lse;       // [R] natural log
};

// How many split-kernel blocks one SM of the current device keeps resident for this dtype and head dim (64, 128
// or 256): the launcher sizes the split count so one wave of blocks fills the GPU.
cudaError_t resident_blocks(Dtype dtype, int head_dim, int* blocks_per_sm);

// Launch the split kernel then the combine kernel on `stream`; head_dim is 64, 128 or 256.
cudaError_t launch(const Params& params, Dtype dtype, int head_dim, cudaStream_t stream);

}  // namespace prefix_decode
