// Attention probabilities in one kernel each way: the scaled, masked
// softmax of the scores and its dropout, forward; the dropout's and the
// softmax's backward and the scale, backward.
// Semantics: src/ops/attention.rs (the CPU op). One warp per row of the
// scores; the row is read from global memory once per pass (the row max,
// the sum, the output), which stays in L1/L2 at the lengths an encoder
// runs (up to a few hundred keys). The backward recomputes the
// probabilities from the scores instead of saving them (once per element,
// parked in its output until the row's dot product is known).
//
// The dropout mask is the dropout op's (kernels/mixout.cu): element e of
// the [rows, L] probabilities is kept when word e % 4 of Philox group e / 4
// (seed, offset) shifted right by 8 is at least the threshold; kept values
// are multiplied by scale in f32 and rounded once.
#include "common.cuh"

namespace {

template <typename T> struct Row {
    const T* s;     // scores, [L]
    const T* bias;  // additive mask, [L]
    int L;
    float scale;
    __device__ __forceinline__ float z(int j) const {
        return tf::to_f32(s[j]) * scale + tf::to_f32(bias[j]);
    }
};

// Row max and the sum of exp(z - max), across the warp.
template <typename T>
__device__ __forceinline__ void row_stats(const Row<T>& r, float& m, float& sum) {
    const int lane = threadIdx.x & 31;
    m = -INFINITY;
    for (int j = lane; j < r.L; j += 32) m = fmaxf(m, r.z(j));
    m = tf::warp_max(m);
    sum = 0.f;
    for (int j = lane; j < r.L; j += 32) sum += expf(r.z(j) - m);
    sum = tf::warp_sum(sum);
}

// y = dropout(softmax(s * scale + bias)) per row; without dropout when
// drop == 0. bias row = row / rows_per_bias.
template <typename T>
__device__ void fwd(const T* __restrict__ s, const T* __restrict__ bias, T* __restrict__ y,
                    long long rows, int L, long long rows_per_bias, float scale, int drop,
                    uint64_t seed, uint64_t offset, uint32_t threshold, float dscale) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const Row<T> r{s + row * L, bias + (row / rows_per_bias) * L, L, scale};
    float m, sum;
    row_stats(r, m, sum);
    T* out = y + row * L;
    for (int j = threadIdx.x & 31; j < L; j += 32) {
        const T p = tf::from_f32<T>(expf(r.z(j) - m) / sum);
        if (!drop) {
            out[j] = p;
        } else {
            const uint64_t e = (uint64_t)row * L + j;
            out[j] = tf::kept(seed, offset, e, threshold) ? tf::from_f32<T>(__fmul_rn(tf::to_f32(p), dscale))
                                                      : tf::from_f32<T>(0.f);
        }
    }
}

// ds = scale * p * (dp - sum(dp * p)), p the forward's probabilities (in T),
// dp the incoming gradient through the dropout (in T).
template <typename T>
__device__ void bwd(const T* __restrict__ s, const T* __restrict__ bias, const T* __restrict__ dy,
                    T* __restrict__ ds, long long rows, int L, long long rows_per_bias, float scale,
                    int drop, uint64_t seed, uint64_t offset, uint32_t threshold, float dscale) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const Row<T> r{s + row * L, bias + (row / rows_per_bias) * L, L, scale};
    float m, sum;
    row_stats(r, m, sum);
    const T* g = dy + row * L;
    const int lane = threadIdx.x & 31;
    auto dp_at = [&](int j) -> float {
        if (!drop) return tf::to_f32(g[j]);
        const uint64_t e = (uint64_t)row * L + j;
        return tf::kept(seed, offset, e, threshold)
                   ? tf::to_f32(tf::from_f32<T>(__fmul_rn(tf::to_f32(g[j]), dscale)))
                   : 0.f;
    };
    // p (rounded to T, as the forward returned it) is parked in ds between
    // the two passes: each lane reads back only the elements it wrote.
    T* out = ds + row * L;
    float dot = 0.f;
    for (int j = lane; j < L; j += 32) {
        const T p = tf::from_f32<T>(expf(r.z(j) - m) / sum);
        out[j] = p;
        dot += dp_at(j) * tf::to_f32(p);
    }
    dot = tf::warp_sum(dot);
    for (int j = lane; j < L; j += 32)
        out[j] = tf::from_f32<T>(scale * tf::to_f32(out[j]) * (dp_at(j) - dot));
}

}  // namespace

#define ATTN_ENTRIES(SUF, T)                                                                       \
    extern "C" __global__ void attn_probs_fwd_##SUF(                                               \
        const T* s, const T* bias, T* y, long long rows, int L, long long rows_per_bias,           \
        float scale, int drop, uint64_t seed, uint64_t offset, const uint64_t* base,              \
        uint32_t threshold, float dscale) {                                                        \
        fwd<T>(s, bias, y, rows, L, rows_per_bias, scale, drop, seed,                              \
               tf::philox_offset(base, offset), threshold, dscale);                                \
    }                                                                                              \
    extern "C" __global__ void attn_probs_bwd_##SUF(                                               \
        const T* s, const T* bias, const T* dy, T* ds, long long rows, int L,                      \
        long long rows_per_bias, float scale, int drop, uint64_t seed, uint64_t offset,            \
        const uint64_t* base, uint32_t threshold, float dscale) {                                  \
        bwd<T>(s, bias, dy, ds, rows, L, rows_per_bias, scale, drop, seed,                         \
               tf::philox_offset(base, offset), threshold, dscale);                                \
    }

ATTN_ENTRIES(f32, float)
ATTN_ENTRIES(f16, __half)
ATTN_ENTRIES(bf16, __nv_bfloat16)
