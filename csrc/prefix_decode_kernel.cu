// Split-KV ("flash-decoding") prefix attention for decode shapes (Sq <= 16), forward only. Free of torch headers.
//
// Split kernel, grid (B * Hkv * row_chunks, num_splits): a block takes the query rows of one GQA group (the
// Hq / Hkv heads sharing a KV head, times Sq; up to kRowsPerBlock of them) and one split of the keys. Split 0
// is the prefix, read from its own tensor (batch stride 0 when shared, through prefix_index for a bank; a row
// sees its first prefix_lengths[b] keys when lengths are given); the other splits are equal ranges of the
// sequence keys. The block stages 32 keys at a time in shared memory through a cp.async pipeline of kStages
// buffers (the next tiles load while this one is computed), so each K/V byte is read once for the whole group,
// and runs an online softmax in base 2 with fp32 accumulators. It writes its normalised output and
// log2-sum-exp2 per query row.
//
// Combine kernel: one warp per query row weighs the splits by their log-sum-exp and writes o and lse.

#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "prefix_decode.h"

namespace prefix_decode {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Registers for three resident split blocks per SM (12 warps): what shared memory allows at D = 128 on H100.
constexpr int kMinBlocksPerSm = 3;
constexpr float kLn2 = 0.6931471805599453f;

// Two 16-bit values in a 32-bit word, to and from fp32.
template <typename T>
struct Pair;

template <>
struct Pair<__half> {
  static __device__ float2 unpack(uint32_t bits) {
    __half2 h;
    memcpy(&h, &bits, sizeof(h));
    return __half22float2(h);
  }
  static __device__ uint32_t pack(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    uint32_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
};

template <>
struct Pair<__nv_bfloat16> {
  static __device__ float2 unpack(uint32_t bits) {
    __nv_bfloat162 h;
    memcpy(&h, &bits, sizeof(h));
    return __bfloat1622float2(h);
  }
  static __device__ uint32_t pack(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    uint32_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
};

// Eight 16-bit values in one 128-bit word, to and from fp32.
template <typename T>
__device__ void unpack8(const uint4& word, float (&out)[8]) {
  const uint32_t bits[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Pair<T>::unpack(bits[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ uint4 pack8(const float (&in)[8]) {
  return make_uint4(Pair<T>::pack(in[0], in[1]), Pair<T>::pack(in[2], in[3]), Pair<T>::pack(in[4], in[5]),
                    Pair<T>::pack(in[6], in[7]));
}

__device__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Asynchronous 16-byte copies global -> shared (sm_80+), grouped so a block can wait for all but the newest.
__device__ void cp_async16(void* shared, const void* global) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global));
}

__device__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Pipeline depth: three tiles in flight; two at D = 256, where a stage is twice as large.
__host__ __device__ constexpr int stages_for(int head_dim) { return head_dim >= 256 ? 2 : 3; }

// Dynamic shared memory of the split kernel: kStages K and V tiles of kKeysPerTile keys, each key padded by one
// 16-byte word (the 32 lanes that each read a different key then hit different banks).
__host__ __device__ constexpr int kv_shared_bytes(int head_dim) {
  return 2 * stages_for(head_dim) * kKeysPerTile * (head_dim / 8 + 1) * static_cast<int>(sizeof(uint4));
}

// Element [b, h, 0, 0] of a strided tensor; int64 offsets.
template <typename T>
__device__ const T* head_base(const Strided& t, int64_t b, int64_t h) {
  return static_cast<const T*>(t.data) + b * t.stride_b + h * t.stride_h;
}

// One tile of K/V (keys n0 .. n0 + 32, those before `end`) into shared memory, asynchronously; consecutive threads
// copy consecutive 16-byte words of a key row (coalesced). A ragged last tile leaves stale words past its keys,
// which the kernel's masks skip.
template <typename T, int D>
__device__ void load_tile(uint4 (&k_tile)[kKeysPerTile][D / 8 + 1], uint4 (&v_tile)[kKeysPerTile][D / 8 + 1],
                          const T* k_base, const T* v_base, int64_t k_step, int64_t v_step, int n0, int end) {
  constexpr int kWords = D / 8;
  const int tile_keys = min(kKeysPerTile, end - n0);
  for (int u = threadIdx.x; u < tile_keys * kWords; u += kThreads) {
    const int j = u / kWords, w = u % kWords;
    cp_async16(&k_tile[j][w], reinterpret_cast<const uint4*>(k_base + (n0 + j) * k_step) + w);
    cp_async16(&v_tile[j][w], reinterpret_cast<const uint4*>(v_base + (n0 + j) * v_step) + w);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) split_kernel(const Params p) {
  constexpr int kWords = D / 8;                 // 128-bit words per key or query row
  constexpr int kStages = stages_for(D);
  constexpr int kRowsPerWarp = kRowsPerBlock / kWarps;
  constexpr int kRowLanes = kThreads / kWords;  // P.V: threads sharing a word column, each on its own rows
  constexpr int kRowsPerThread = kRowsPerBlock / kRowLanes;
  static_assert(kKeysPerTile == 32, "the softmax gives each lane of a warp one key of the tile");
  static_assert(kThreads % kWords == 0 && kRowsPerBlock % kRowLanes == 0, "P.V threads must tile the rows");

  using KeyTile = uint4[kKeysPerTile][kWords + 1];  // [keys, D] one tile, padded (see kv_shared_bytes)
  extern __shared__ uint4 s_kv[];
  KeyTile* s_k = reinterpret_cast<KeyTile*>(s_kv);  // [kStages] tiles of keys, then of values
  KeyTile* s_v = s_k + kStages;
  __shared__ uint4 s_q[kRowsPerBlock][kWords];  // [rows, D] the group's queries
  __shared__ float s_p[kRowsPerBlock][kKeysPerTile + 1];  // [rows, keys] the tile's probabilities
  __shared__ float s_row_scale[kRowsPerBlock];  // the running-max correction of a tile, at the end 1 / sum

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int split = blockIdx.y;
  const int chunk = blockIdx.x % p.row_chunks;
  const int b = blockIdx.x / p.row_chunks / p.heads_kv;
  const int h_kv = blockIdx.x / p.row_chunks % p.heads_kv;
  const int group = p.heads_q / p.heads_kv;
  const int group_rows = group * p.seq_q;
  const int row0 = chunk * kRowsPerBlock;
  const int rows = min(kRowsPerBlock, group_rows - row0);
  // Block row m is grouped row g = row0 + m: query head h_kv * group + g / Sq at position g % Sq (repeat_kv
  // order), which is row first_row + m of the flattened [B, Hq, Sq].
  const int64_t first_row = (static_cast<int64_t>(b) * p.heads_kv + h_kv) * group_rows + row0;

  for (int u = tid; u < rows * kWords; u += kThreads) {
    const int m = u / kWords, w = u % kWords, g = row0 + m;
    const T* q_row = head_base<T>(p.q, b, h_kv * group + g / p.seq_q) + (g % p.seq_q) * p.q.stride_n;
    s_q[m][w] = reinterpret_cast<const uint4*>(q_row)[w];
  }

  // This split's keys [begin, end), in the prefix (split 0) or in the sequence.
  const bool is_prefix = split == 0;
  int begin = 0, end = p.prefix_len;
  const T *k_base, *v_base;
  int64_t k_step, v_step;
  if (is_prefix) {
    const int64_t entry = p.prefix_index ? p.prefix_index[b] : b;  // a shared prefix has stride_b = 0
    if (p.prefix_lengths) end = static_cast<int>(p.prefix_lengths[b]);  // checked to lie in [0, P]
    k_base = head_base<T>(p.pk, entry, h_kv);
    v_base = head_base<T>(p.pv, entry, h_kv);
    k_step = p.pk.stride_n;
    v_step = p.pv.stride_n;
  } else {
    begin = (split - 1) * p.split_len;
    end = min(p.seq_kv, begin + p.split_len);
    k_base = head_base<T>(p.k, b, h_kv);
    v_base = head_base<T>(p.v, b, h_kv);
    k_step = p.k.stride_n;
    v_step = p.v.stride_n;
  }
  const int tiles = end > begin ? (end - begin + kKeysPerTile - 1) / kKeysPerTile : 0;

  // Prologue: the first kStages - 1 tiles in flight. Every step commits one group (empty past the last tile),
  // so "all groups but the newest kStages - 1 are done" always means "tile t has landed".
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < tiles) {
      load_tile<T, D>(s_k[t % kStages], s_v[t % kStages], k_base, v_base, k_step, v_step, begin + t * kKeysPerTile,
                      end);
    }
    cp_async_commit();
  }

  float acc[kRowsPerThread][8] = {};  // P.V: this thread's 8 output columns of its rows, unnormalised
  float run_max[kRowsPerWarp], run_sum[kRowsPerWarp];  // softmax: the rows of this warp
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    run_max[j] = -INFINITY;
    run_sum[j] = 0.f;
  }
  const int word = tid % kWords, row_lane = tid / kWords;

  for (int t = 0; t < tiles; ++t) {
    const int next = t + kStages - 1;  // into the stage tile t - 1 has finished with
    if (next < tiles) {
      load_tile<T, D>(s_k[next % kStages], s_v[next % kStages], k_base, v_base, k_step, v_step,
                      begin + next * kKeysPerTile, end);
    }
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();
    const KeyTile& k_tile = s_k[t % kStages];
    const KeyTile& v_tile = s_v[t % kStages];
    const int n0 = begin + t * kKeysPerTile, tile_keys = min(kKeysPerTile, end - n0);

    // Scores and online softmax: warp `warp` owns rows warp, warp + kWarps, ...; lane = key of the tile.
    const int n = n0 + lane;
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int m = warp + j * kWarps;
      if (m >= rows) continue;  // uniform across the warp, so the shuffles below stay converged
      bool visible = lane < tile_keys;
      if (!is_prefix) {  // prefix keys are seen by every query
        const int i = (row0 + m) % p.seq_q;
        if (p.causal) visible = visible && n <= p.seq_kv - p.seq_q + i;  // bottom-right aligned
        if (p.key_mask) visible = visible && p.key_mask[b * p.key_mask_stride_b + n * p.key_mask_stride_n];
      }
      float s = -INFINITY;
      if (visible) {
        float dot = 0.f;
#pragma unroll 4
        for (int w = 0; w < kWords; ++w) {
          float qf[8], kf[8];
          unpack8<T>(s_q[m][w], qf);
          unpack8<T>(k_tile[lane][w], kf);
#pragma unroll
          for (int e = 0; e < 8; ++e) dot = fmaf(qf[e], kf[e], dot);
        }
        s = dot * p.scale_log2;
      }
      const float new_max = fmaxf(run_max[j], warp_max(s));
      const float ref = new_max == -INFINITY ? 0.f : new_max;  // no key seen yet: exp2(-inf - 0) = 0, not NaN
      const float prob = exp2f(s - ref);
      const float correction = exp2f(run_max[j] - ref);
      run_sum[j] = run_sum[j] * correction + warp_sum(prob);
      run_max[j] = new_max;
      s_p[m][lane] = prob;
      if (lane == 0) s_row_scale[m] = correction;
    }
    __syncthreads();

    // P.V: thread (row_lane, word) owns output columns [8 * word, 8 * word + 8) of rows row_lane + j * kRowLanes.
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int m = row_lane + j * kRowLanes;
      if (m >= rows) continue;
      const float correction = s_row_scale[m];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[j][e] *= correction;
      for (int key = 0; key < tile_keys; ++key) {
        const float prob = s_p[m][key];
        float vf[8];
        unpack8<T>(v_tile[key][word], vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] = fmaf(prob, vf[e], acc[j][e]);
      }
    }
    __syncthreads();  // the next step overwrites s_p and, with its loads, this tile's stage
  }
  cp_async_wait<0>();  // no copy may outlive the block

  // The split's result per row: output normalised by its sum, and log2-sum-exp2 (0 and -inf if it saw no key).
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int m = warp + j * kWarps;
    if (m >= rows || lane != 0) continue;
    const bool seen = run_sum[j] > 0.f;
    s_row_scale[m] = seen ? 1.f / run_sum[j] : 0.f;
    p.lse_part[(first_row + m) * p.num_splits + split] = seen ? run_max[j] + log2f(run_sum[j]) : -INFINITY;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int m = row_lane + j * kRowLanes;
    if (m >= rows) continue;
    const float inv_sum = s_row_scale[m];
    float4* out = reinterpret_cast<float4*>(p.o_part + ((first_row + m) * p.num_splits + split) * D + word * 8);
    out[0] = make_float4(acc[j][0] * inv_sum, acc[j][1] * inv_sum, acc[j][2] * inv_sum, acc[j][3] * inv_sum);
    out[1] = make_float4(acc[j][4] * inv_sum, acc[j][5] * inv_sum, acc[j][6] * inv_sum, acc[j][7] * inv_sum);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) combine_kernel(const Params p) {
  constexpr int kWords = D / 8;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= static_cast<int64_t>(p.batch) * p.heads_q * p.seq_q) return;

  const float* lse = p.lse_part + row * p.num_splits;  // [num_splits], base 2
  float top = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) top = fmaxf(top, lse[s]);
  const bool seen = top != -INFINITY;  // else no split saw a key: o = 0, lse = -inf
  const int splits = seen ? p.num_splits : 0;
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += exp2f(lse[s] - top);

  uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(p.o) + row * D);
  for (int w = lane; w < kWords; w += 32) {
    float acc[8] = {};
    for (int s = 0; s < splits; ++s) {
      const float weight = exp2f(lse[s] - top) / total;
      const float4* part = reinterpret_cast<const float4*>(p.o_part + (row * p.num_splits + s) * D + w * 8);
      const float4 lo = part[0], hi = part[1];
      const float values[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = fmaf(weight, values[e], acc[e]);
    }
    out[w] = pack8<T>(acc);
  }
  if (lane == 0) p.lse[row] = seen ? (top + log2f(total)) * kLn2 : -INFINITY;
}

template <typename T, int D>
cudaError_t launch_typed(const Params& p, cudaStream_t stream) {
  const dim3 split_grid(p.batch * p.heads_kv * p.row_chunks, p.num_splits);
  split_kernel<T, D><<<split_grid, kThreads, kv_shared_bytes(D), stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seq_q;
  combine_kernel<T, D><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The split kernel asks for more than the default 48 KB of shared memory at D = 256; allow what it needs.
template <typename T, int D>
cudaError_t allow_shared(int* blocks_per_sm) {
  cudaError_t err = cudaFuncSetAttribute(split_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kv_shared_bytes(D));
  if (err != cudaSuccess || blocks_per_sm == nullptr) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, split_kernel<T, D>, kThreads,
                                                       kv_shared_bytes(D));
}

template <int D>
cudaError_t launch_dim(const Params& p, Dtype dtype, cudaStream_t stream) {
  if (dtype == Dtype::kHalf) {
    const cudaError_t err = allow_shared<__half, D>(nullptr);
    return err != cudaSuccess ? err : launch_typed<__half, D>(p, stream);
  }
  const cudaError_t err = allow_shared<__nv_bfloat16, D>(nullptr);
  return err != cudaSuccess ? err : launch_typed<__nv_bfloat16, D>(p, stream);
}

template <int D>
cudaError_t resident_dim(Dtype dtype, int* blocks_per_sm) {
  return dtype == Dtype::kHalf ? allow_shared<__half, D>(blocks_per_sm)
                               : allow_shared<__nv_bfloat16, D>(blocks_per_sm);
}

}  // namespace

cudaError_t resident_blocks(Dtype dtype, int head_dim, int* blocks_per_sm) {
  switch (head_dim) {
    case 64:
      return resident_dim<64>(dtype, blocks_per_sm);
    case 128:
      return resident_dim<128>(dtype, blocks_per_sm);
    case 256:
      return resident_dim<256>(dtype, blocks_per_sm);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch(const Params& params, Dtype dtype, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      return launch_dim<64>(params, dtype, stream);
    case 128:
      return launch_dim<128>(params, dtype, stream);
    case 256:
      return launch_dim<256>(params, dtype, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace prefix_decode
