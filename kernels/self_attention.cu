// Multi-head self-attention of short sequences in one kernel forward and
// two backward, reading Q, K, V and writing the context in the [B, L, H]
// layout of the dense layers (H = heads * dh): no head-split copies, no
// batched GEMMs, no score tensor in global memory forward.
//
// Q, K and V are rows of `ld` elements apart: ld = H for three [B, L, H]
// tensors, ld = 3H for the packed [B, L, 3H] output of one fused Q/K/V
// layer (k = q + H, v = q + 2H). The backward writes dq, dk, dv `part`
// elements apart with rows `ldo` apart: stacked [3, B, L, H] (part = B*L*H,
// ldo = H) or packed [B, L, 3H] (part = H, ldo = 3H), the gradient of the
// fused layer's output. The context y and its gradient g are [B, L, H].
// Semantics: src/ops/self_attention.rs (the CPU op).
//
// One block per (batch row, head). Its keys and values (forward), or its
// queries and incoming gradients (backward, columns), are staged in shared
// memory as f32 with a row stride of dh + 1 words, so that the lanes of a
// warp reading one element of 32 different rows hit 32 different banks.
// Each warp then takes rows of the score matrix: one query (forward,
// backward rows) or one key (backward columns) at a time, the scores of a
// row spread over the lanes, the dh outputs of a row spread over them too.
// The arithmetic is f32 throughout; T only at the loads and stores, and
// for the probabilities, which are rounded to T as the unfused path's
// attention-probabilities op rounds them.
//
// The dropout mask is the dropout op's over the [B, heads, L, L]
// probabilities (element ((b * heads + h) * L + i) * L + j), so the fused
// and the unfused path drop the same elements for the same stream.
#include "common.cuh"

namespace {

struct Shape {
    int L, heads, dh;
    // Element (b, 0, h, 0) of a tensor with rows `ld` apart, for this
    // block's b and h.
    __device__ __forceinline__ long long base(long long ld) const {
        const int b = blockIdx.x / heads, h = blockIdx.x % heads;
        return (long long)b * L * ld + (long long)h * dh;
    }
    __device__ __forceinline__ long long H() const { return (long long)heads * dh; }
    __device__ __forceinline__ int stride() const { return dh + 1; }
};

// This block's rows [L, dh] of x (rows ld apart) into shared memory as f32.
template <typename T>
__device__ __forceinline__ void stage(const Shape& s, const T* __restrict__ x, long long ld,
                                      float* dst) {
    const long long base = s.base(ld);
    for (int t = threadIdx.x; t < s.L * s.dh; t += blockDim.x) {
        const int j = t / s.dh, d = t - j * s.dh;
        dst[j * s.stride() + d] = tf::to_f32(x[base + (long long)j * ld + d]);
    }
}

struct Drop {
    int on;
    uint64_t seed, offset;
    uint32_t threshold;
    float scale;
    __device__ __forceinline__ bool keep(uint64_t e) const {
        return tf::kept(seed, offset, e, threshold);
    }
};

// The probabilities of query row i (its f32 values in qrow) into prow:
// p_j = round_T(softmax(q.k_j * scale + bias_j)), all lanes of the warp.
template <typename T>
__device__ __forceinline__ void probs(const Shape& s, const float* qrow, const float* Ks,
                                      const T* __restrict__ brow, float scale, float* prow) {
    const int lane = threadIdx.x & 31;
    float m = -INFINITY;
    for (int j = lane; j < s.L; j += 32) {
        const float* kj = Ks + j * s.stride();
        float dot = 0.f;
        for (int d = 0; d < s.dh; ++d) dot += qrow[d] * kj[d];
        const float z = dot * scale + tf::to_f32(brow[j]);
        prow[j] = z;
        m = fmaxf(m, z);
    }
    m = tf::warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < s.L; j += 32) {
        const float e = expf(prow[j] - m);
        prow[j] = e;
        sum += e;
    }
    sum = tf::warp_sum(sum);
    for (int j = lane; j < s.L; j += 32) prow[j] = tf::to_f32(tf::from_f32<T>(prow[j] / sum));
}

// A kept probability as the dropout op writes it: scaled in f32, rounded to T.
template <typename T>
__device__ __forceinline__ float scaled(const Drop& dr, float p) {
    return tf::to_f32(tf::from_f32<T>(__fmul_rn(p, dr.scale)));
}

// The probability after dropout.
template <typename T>
__device__ __forceinline__ float dropped(const Drop& dr, float p, uint64_t e) {
    if (!dr.on) return p;
    return dr.keep(e) ? scaled<T>(dr, p) : 0.f;
}

// y = dropout(softmax(q k^T * scale + bias)) v per head.
// Shared memory: Ks, Vs [L][dh + 1], then per warp qrow [dh] and prow [L].
template <typename T>
__device__ void fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const T* __restrict__ bias, T* __restrict__ y, long long ld, Shape s,
                    float scale, Drop dr) {
    extern __shared__ float sm[];
    float* Ks = sm;
    float* Vs = Ks + s.L * s.stride();
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* qrow = Vs + s.L * s.stride() + warp * (s.dh + s.L);
    float* prow = qrow + s.dh;
    stage(s, k, ld, Ks);
    stage(s, v, ld, Vs);
    __syncthreads();
    const long long base = s.base(ld), ybase = s.base(s.H()), H = s.H();
    const T* brow = bias + (long long)(blockIdx.x / s.heads) * s.L;
    for (int i = warp; i < s.L; i += warps) {
        for (int d = lane; d < s.dh; d += 32) qrow[d] = tf::to_f32(q[base + i * ld + d]);
        __syncwarp();
        probs(s, qrow, Ks, brow, scale, prow);
        const uint64_t row = (uint64_t)blockIdx.x * s.L + i;
        for (int j = lane; j < s.L; j += 32) prow[j] = dropped<T>(dr, prow[j], row * s.L + j);
        __syncwarp();
        for (int d = lane; d < s.dh; d += 32) {
            float acc = 0.f;
            for (int j = 0; j < s.L; ++j) acc += prow[j] * Vs[j * s.stride() + d];
            y[ybase + i * H + d] = tf::from_f32<T>(acc);
        }
        __syncwarp();
    }
}

// Backward, by query rows: recomputes p, then with dP_j = g_i . v_j through
// the dropout (d_j), ds_j = scale * p_j * (d_j - sum_j d_j p_j); writes
// dq_i = sum_j ds_j k_j to out's first part and ds and the dropped
// probabilities pd to the f32 scratch rows for the column pass.
// Shared memory: Ks, Vs [L][dh + 1], then per warp qrow, grow [dh], prow,
// drow [L].
template <typename T>
__device__ void bwd_rows(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const T* __restrict__ bias,
                         const T* __restrict__ g, T* __restrict__ out, float* __restrict__ ds,
                         float* __restrict__ pd, long long ld, long long ldo, Shape s,
                         float scale, Drop dr) {
    extern __shared__ float sm[];
    float* Ks = sm;
    float* Vs = Ks + s.L * s.stride();
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* qrow = Vs + s.L * s.stride() + warp * (2 * s.dh + 2 * s.L);
    float* grow = qrow + s.dh;
    float* prow = grow + s.dh;
    float* drow = prow + s.L;
    stage(s, k, ld, Ks);
    stage(s, v, ld, Vs);
    __syncthreads();
    const long long base = s.base(ld), gbase = s.base(s.H()), obase = s.base(ldo), H = s.H();
    const T* brow = bias + (long long)(blockIdx.x / s.heads) * s.L;
    for (int i = warp; i < s.L; i += warps) {
        for (int d = lane; d < s.dh; d += 32) {
            qrow[d] = tf::to_f32(q[base + i * ld + d]);
            grow[d] = tf::to_f32(g[gbase + i * H + d]);
        }
        __syncwarp();
        probs(s, qrow, Ks, brow, scale, prow);
        const uint64_t row = (uint64_t)blockIdx.x * s.L + i;
        float dot = 0.f;
        for (int j = lane; j < s.L; j += 32) {
            const float* vj = Vs + j * s.stride();
            float dp = 0.f;
            for (int d = 0; d < s.dh; ++d) dp += grow[d] * vj[d];
            const uint64_t e = row * s.L + j;
            // One Philox draw serves the probability and its gradient.
            const bool keep = !dr.on || dr.keep(e);
            const float dj = !dr.on ? dp : keep ? __fmul_rn(dp, dr.scale) : 0.f;
            pd[e] = !dr.on ? prow[j] : keep ? scaled<T>(dr, prow[j]) : 0.f;
            drow[j] = dj;
            dot += dj * prow[j];
        }
        dot = tf::warp_sum(dot);
        for (int j = lane; j < s.L; j += 32) {
            const float v_ = scale * prow[j] * (drow[j] - dot);
            drow[j] = v_;
            ds[row * s.L + j] = v_;
        }
        __syncwarp();
        for (int d = lane; d < s.dh; d += 32) {
            float acc = 0.f;
            for (int j = 0; j < s.L; ++j) acc += drow[j] * Ks[j * s.stride() + d];
            out[obase + i * ldo + d] = tf::from_f32<T>(acc);
        }
        __syncwarp();
    }
}

// Backward, by key columns: dk_j = sum_i ds_ij q_i into out's second part
// and dv_j = sum_i pd_ij g_i into its third.
// Shared memory: Qs, Gs [L][dh + 1].
template <typename T>
__device__ void bwd_cols(const T* __restrict__ q, const T* __restrict__ g,
                         const float* __restrict__ ds, const float* __restrict__ pd,
                         T* __restrict__ out, long long part, long long ld, long long ldo,
                         Shape s) {
    extern __shared__ float sm[];
    float* Qs = sm;
    float* Gs = Qs + s.L * s.stride();
    stage(s, q, ld, Qs);
    stage(s, g, s.H(), Gs);
    __syncthreads();
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long obase = s.base(ldo);
    const float* dsb = ds + (long long)blockIdx.x * s.L * s.L;
    const float* pdb = pd + (long long)blockIdx.x * s.L * s.L;
    for (int j = warp; j < s.L; j += warps) {
        for (int d = lane; d < s.dh; d += 32) {
            float ak = 0.f, av = 0.f;
            for (int i = 0; i < s.L; ++i) {
                ak += dsb[(long long)i * s.L + j] * Qs[i * s.stride() + d];
                av += pdb[(long long)i * s.L + j] * Gs[i * s.stride() + d];
            }
            out[part + obase + j * ldo + d] = tf::from_f32<T>(ak);
            out[2 * part + obase + j * ldo + d] = tf::from_f32<T>(av);
        }
    }
}

}  // namespace

#define SELF_ATTN_ENTRIES(SUF, T)                                                                  \
    extern "C" __global__ void self_attn_fwd_##SUF(                                                \
        const T* q, const T* k, const T* v, const T* bias, T* y, long long ld, int L, int heads,   \
        int dh, float scale, int drop, uint64_t seed, uint64_t offset, const uint64_t* base,       \
        uint32_t threshold, float dscale) {                                                        \
        fwd<T>(q, k, v, bias, y, ld, Shape{L, heads, dh}, scale,                                   \
               Drop{drop, seed, tf::philox_offset(base, offset), threshold, dscale});              \
    }                                                                                              \
    extern "C" __global__ void self_attn_bwd_rows_##SUF(                                           \
        const T* q, const T* k, const T* v, const T* bias, const T* g, T* out, float* ds,          \
        float* pd, long long ld, long long ldo, int L, int heads, int dh, float scale, int drop,   \
        uint64_t seed, uint64_t offset, const uint64_t* base, uint32_t threshold, float dscale) {  \
        bwd_rows<T>(q, k, v, bias, g, out, ds, pd, ld, ldo, Shape{L, heads, dh}, scale,            \
                    Drop{drop, seed, tf::philox_offset(base, offset), threshold, dscale});         \
    }                                                                                              \
    extern "C" __global__ void self_attn_bwd_cols_##SUF(const T* q, const T* g, const float* ds,   \
                                                        const float* pd, T* out, long long part,   \
                                                        long long ld, long long ldo, int L,        \
                                                        int heads, int dh) {                       \
        bwd_cols<T>(q, g, ds, pd, out, part, ld, ldo, Shape{L, heads, dh});                        \
    }

SELF_ATTN_ENTRIES(f32, float)
SELF_ATTN_ENTRIES(f16, __half)
SELF_ATTN_ENTRIES(bf16, __nv_bfloat16)
