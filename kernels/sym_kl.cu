// Symmetric KL (R3F / SMART) and one-directional KL over logits [rows, V].
// Math and semantics: src/ops/sym_kl.rs (the CPU reference) and DESIGN.md.
//
// One kernel computes, per row, the loss and (optionally) both gradients:
//   pass 1 streams the row once with an online max / sum-exp for a and b and
//          the running sums T_a = sum e^{a-m_a} d, T_b = sum e^{b-m_b} d (d = a-b),
//   pass 2 (only when gradients are asked for) re-reads the row, which is
//          then mostly in L2, and writes grad_a / grad_b.
// Entries whose softmax weight is exactly 0 contribute nothing, so entries
// that are -inf in both inputs are ignored; NaN propagates.
#include "common.cuh"

namespace {

enum Mode : int { SYM_FULL = 0, SYM_DETACHED = 1, KL = 2 };

struct RowStats {
    float ma, sa, ta, mb, sb, tb;
};

// Weighted term that is exactly 0 when the weight is 0 (d may be -inf there).
__device__ __forceinline__ float wterm(float w, float d) { return w == 0.f ? 0.f : w * d; }

template <int VEC>
__device__ __forceinline__ void accumulate(RowStats& s, const float (&a)[VEC], const float (&b)[VEC]) {
    float ca = a[0], cb = b[0];
#pragma unroll
    for (int i = 1; i < VEC; ++i) {
        ca = fmaxf(ca, a[i]);
        cb = fmaxf(cb, b[i]);
    }
    if (ca > s.ma) {
        float f = __expf(s.ma - ca);
        s.sa *= f;
        s.ta *= f;
        s.ma = ca;
    }
    if (cb > s.mb) {
        float f = __expf(s.mb - cb);
        s.sb *= f;
        s.tb *= f;
        s.mb = cb;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        // While a thread has seen only -inf, its max is -inf and a[i] - max
        // would be NaN: such entries weigh 0 (found on an H200, 2026-11-26:
        // a bf16 row spread over lanes gave NaN where the f32 one did not).
        float ea = s.ma == -INFINITY ? 0.f : __expf(a[i] - s.ma);
        float eb = s.mb == -INFINITY ? 0.f : __expf(b[i] - s.mb);
        float d = a[i] - b[i];
        s.sa += ea;
        s.ta += wterm(ea, d);
        s.sb += eb;
        s.tb += wterm(eb, d);
    }
}

// Reduction over the TPR threads that own one row: a warp (TPR == 32) or the
// whole block (TPR == blockDim.x, then `red` holds one float per warp).
template <int TPR, bool MAX>
__device__ __forceinline__ float row_reduce(float v, float* red) {
    v = MAX ? tf::warp_max(v) : tf::warp_sum(v);
    if (TPR == 32) return v;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // `red` may still be read by a previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    const int nw = TPR >> 5;
    float r = lane < nw ? red[lane] : (MAX ? -INFINITY : 0.f);
    return MAX ? tf::warp_max(r) : tf::warp_sum(r);
}

// Applies `f(j, a_j, b_j)` to element j of the row for every element the
// calling thread owns: a scalar head up to the VEC alignment, VEC-wide packs,
// and a scalar tail. `head` is the same for every row pointer passed.
template <typename T, int VEC, int TPR, typename F>
__device__ __forceinline__ void for_row(const T* a, const T* b, int64_t V, int64_t head, int lane, F f) {
    for (int64_t j = lane; j < head; j += TPR) {
        float x[1] = {tf::to_f32(a[j])}, y[1] = {tf::to_f32(b[j])};
        f(j, x, y);
    }
    const int64_t nvec = (V - head) / VEC;
    for (int64_t k = lane; k < nvec; k += TPR) {
        const int64_t j = head + k * VEC;
        float x[VEC], y[VEC];
        tf::load_f32<T, VEC>(a + j, x);
        tf::load_f32<T, VEC>(b + j, y);
        f(j, x, y);
    }
    for (int64_t j = head + nvec * VEC + lane; j < V; j += TPR) {
        float x[1] = {tf::to_f32(a[j])}, y[1] = {tf::to_f32(b[j])};
        f(j, x, y);
    }
}

template <typename T, int N>
__device__ __forceinline__ void store_row(T* p, int64_t j, const float (&v)[N]) {
    if (N == 1) {
        p[j] = tf::from_f32<T>(v[0]);
    } else {
        tf::store_f32<T, N>(p + j, v);
    }
}

template <typename T, int VEC, int TPR>
__device__ void sym_kl_body(const T* __restrict__ a, const T* __restrict__ b, int64_t rows, int64_t V,
                            const float* __restrict__ row_mask,
                            const float* __restrict__ gscale, int64_t gscale_stride,
                            const float* __restrict__ inv_count, float gmul, int mode,
                            float* __restrict__ loss, T* __restrict__ grad_a, T* __restrict__ grad_b) {
    __shared__ float red[32];
    const int rows_per_block = blockDim.x / TPR;
    const int64_t row = (int64_t)blockIdx.x * rows_per_block + threadIdx.x / TPR;
    const int lane = threadIdx.x % TPR;
    // Block mode has exactly one row per block, so every thread reaches the
    // block barriers; warp mode returns whole warps.
    if (row >= rows) return;
    const T* ar = a + row * V;
    const T* br = b + row * V;
    // Rows start at row * V elements: the scalar head that brings them to the
    // VEC alignment of the (equally aligned) base pointers.
    const int misalign = (int)((reinterpret_cast<uintptr_t>(ar) / sizeof(T)) % VEC);
    const int64_t head = misalign == 0 ? 0 : (V < VEC - misalign ? V : VEC - misalign);

    const bool counted = row_mask == nullptr || row_mask[row] != 0.f;
    if (!counted) {
        if (loss != nullptr && lane == 0) loss[row] = 0.f;
        if (grad_a != nullptr || grad_b != nullptr) {
            for (int64_t j = lane; j < V; j += TPR) {
                if (grad_a) grad_a[row * V + j] = tf::from_f32<T>(0.f);
                if (grad_b) grad_b[row * V + j] = tf::from_f32<T>(0.f);
            }
        }
        return;
    }

    RowStats s{-INFINITY, 0.f, 0.f, -INFINITY, 0.f, 0.f};
    for_row<T, VEC, TPR>(ar, br, V, head, lane, [&](int64_t, auto& x, auto& y) { accumulate(s, x, y); });

    const float ma = row_reduce<TPR, true>(s.ma, red);
    const float mb = row_reduce<TPR, true>(s.mb, red);
    const float fa = s.ma == -INFINITY ? 0.f : __expf(s.ma - ma);
    const float fb = s.mb == -INFINITY ? 0.f : __expf(s.mb - mb);
    const float sa = row_reduce<TPR, false>(s.sa * fa, red);
    const float ta = row_reduce<TPR, false>(s.ta * fa, red);
    const float sb = row_reduce<TPR, false>(s.sb * fb, red);
    const float tb = row_reduce<TPR, false>(s.tb * fb, red);
    const float ep = ta / sa, eq = tb / sb;  // E_p[d], E_q[d]

    if (loss != nullptr && lane == 0) {
        loss[row] = mode == KL ? -eq + (ma + logf(sa)) - (mb + logf(sb)) : ep - eq;
    }
    if (grad_a == nullptr && grad_b == nullptr) return;

    float f = gmul;
    if (gscale != nullptr) f *= gscale[row * gscale_stride];
    if (inv_count != nullptr) f *= *inv_count;
    const float ia = 1.f / sa, ib = 1.f / sb;
    T* gar = grad_a ? grad_a + row * V : nullptr;
    T* gbr = grad_b ? grad_b + row * V : nullptr;
    for_row<T, VEC, TPR>(ar, br, V, head, lane, [&](int64_t j, auto& x, auto& y) {
        constexpr int N = sizeof(x) / sizeof(float);
        float ga[N], gb[N];
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float p = __expf(x[i] - ma) * ia, q = __expf(y[i] - mb) * ib;
            const float d = x[i] - y[i];
            if (mode == SYM_FULL) {
                ga[i] = f * (wterm(p, d - ep) + (p - q));
                gb[i] = f * (wterm(q, eq - d) + (q - p));
            } else {
                ga[i] = f * (p - q);
                gb[i] = -ga[i];
            }
        }
        if (gar) store_row<T, N>(gar, j, ga);
        if (gbr) store_row<T, N>(gbr, j, gb);
    });
}

// Deterministic single-block sum of the per-row losses (fixed order).
__device__ float block_sum_fixed(float v) {
    __shared__ float red[32];
    v = tf::warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f;
    r = tf::warp_sum(r);
    __syncthreads();
    return r;
}

}  // namespace

#define SYM_KL_ENTRY(NAME, T, VEC, TPR)                                                            \
    extern "C" __global__ void __launch_bounds__(TPR == 32 ? 256 : TPR)                          \
        NAME(const T* a, const T* b, int64_t rows, int64_t V, const float* row_mask,              \
             const float* gscale, int64_t gscale_stride, const float* inv_count, float gmul,       \
             int mode, float* loss, T* grad_a, T* grad_b) {                                       \
        sym_kl_body<T, VEC, TPR>(a, b, rows, V, row_mask, gscale, gscale_stride, inv_count, \
                                 gmul, mode, loss, grad_a, grad_b);                               \
    }

// Names: sym_kl_<dtype>_v<VEC>_<warp|block>. Warp mode: 32 threads per row,
// 8 rows per 256-thread block (V <= 1024). Block mode: 1024 threads per row.
// v1: scalar accesses; vw: 16-byte accesses (4 f32 or 8 f16/bf16), used when
// all row pointers share one alignment modulo 16 bytes.
#define SYM_KL_DTYPE(SUF, T, VW)                      \
    SYM_KL_ENTRY(sym_kl_##SUF##_v1_warp, T, 1, 32)    \
    SYM_KL_ENTRY(sym_kl_##SUF##_v1_block, T, 1, 1024) \
    SYM_KL_ENTRY(sym_kl_##SUF##_vw_warp, T, VW, 32)   \
    SYM_KL_ENTRY(sym_kl_##SUF##_vw_block, T, VW, 1024)

SYM_KL_DTYPE(f32, float, 4)
SYM_KL_DTYPE(f16, __half, 8)
SYM_KL_DTYPE(bf16, __nv_bfloat16, 8)

// Number of counted rows -> 1 / max(count, 1), for batchmean with a row mask.
extern "C" __global__ void sym_kl_inv_count(const float* row_mask, int64_t rows, float* inv_count) {
    float c = 0.f;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) c += row_mask[r] != 0.f ? 1.f : 0.f;
    c = block_sum_fixed(c);
    if (threadIdx.x == 0) *inv_count = 1.f / fmaxf(c, 1.f);
}

// out[0] = mul * (inv_count ? *inv_count : 1) * sum(per_row); one block.
extern "C" __global__ void sym_kl_reduce(const float* per_row, int64_t rows, const float* inv_count,
                                         float mul, float* out) {
    float s = 0.f;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) s += per_row[r];
    s = block_sum_fixed(s);
    if (threadIdx.x == 0) out[0] = s * mul * (inv_count ? *inv_count : 1.f);
}

// Gradients computed in the forward pass assumed the loss would receive the
// gradient `expected`; scale each row by gres[row * stride] / expected, doing
// nothing (not even a write) for rows where the two agree.
template <typename T>
__device__ void rescale_body(T* g, int64_t rows, int64_t V, const float* gres, int64_t stride,
                             float expected) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float s = gres[r * stride];
        if (s == expected) {
            if (stride == 0) return;
            continue;
        }
        const float k = s / expected;
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
            g[r * V + j] = tf::from_f32<T>(tf::to_f32(g[r * V + j]) * k);
        }
    }
}

extern "C" __global__ void sym_kl_rescale_f32(float* g, int64_t rows, int64_t V, const float* gres,
                                              int64_t stride, float expected) {
    rescale_body(g, rows, V, gres, stride, expected);
}
extern "C" __global__ void sym_kl_rescale_f16(__half* g, int64_t rows, int64_t V, const float* gres,
                                              int64_t stride, float expected) {
    rescale_body(g, rows, V, gres, stride, expected);
}
extern "C" __global__ void sym_kl_rescale_bf16(__nv_bfloat16* g, int64_t rows, int64_t V,
                                               const float* gres, int64_t stride, float expected) {
    rescale_body(g, rows, V, gres, stride, expected);
}
