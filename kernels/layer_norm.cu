// LayerNorm over the last dimension, forward and backward, x in f32 / bf16 /
// f16 with f32 weight and bias; every sum in f32. Semantics:
// src/ops/layer_norm.rs (the f64 CPU reference and the formulas).
//
// A warp owns a row. Its statistics (two passes: the mean, then the mean of
// squared deviations, so a large common offset does not cancel) come from one
// function, row_stats, so the forward and both backward kernels see the same
// x_hat. The forward can save them (mean, rstd per row) for the backward
// kernels, which then skip both passes over x; without them they recompute
// the same values. The weight/bias gradients are column sums over
// rows: chunks of CHUNK rows give partial sums (in row order), then the last
// block to finish adds the partials in chunk order with one thread per
// column, so the result does not depend on scheduling (the one atomic only
// elects that block).
#include "common.cuh"

namespace {

constexpr int WARPS = 8;     // warps (rows) per block in the row kernels
constexpr int CHUNK = 64;    // rows per partial sum of the weight gradients

struct Stats {
    float mean, rstd;
};

// The row kernels walk a row in packs of N elements: lane l takes packs
// l, l + 32, ..., each element of a pack in order. N = 16 / sizeof(T)
// (16-byte loads and stores of x, dy, y, dx; the f32 weight and bias in N
// f32, 16 or 32 bytes) when the row length is a multiple of it and every
// pointer is aligned to its pack; N = 1 otherwise (element c to lane c % 32).
template <typename T>
__host__ __device__ constexpr int vec_n() {
    return 16 / (int)sizeof(T);
}

// Whether the N-element packs apply: h a multiple of N, the T pointers
// aligned to 16 bytes and the f32 ones to N * 4.
template <typename T>
__device__ __forceinline__ bool packs_fit(int h, const void* t0, const void* t1, const void* t2,
                                          const float* f0, const float* f1) {
    constexpr int N = vec_n<T>();
    const uintptr_t t = (uintptr_t)t0 | (uintptr_t)t1 | (uintptr_t)t2;
    const uintptr_t f = (uintptr_t)f0 | (uintptr_t)f1;
    return h % N == 0 && t % 16 == 0 && f % (N * sizeof(float)) == 0;
}

template <typename T, int N>
__device__ __forceinline__ Stats row_stats_n(const T* __restrict__ x, int h, float eps, int lane) {
    float s = 0.f;
    for (int c = lane * N; c < h; c += 32 * N) {
        float v[N];
        tf::load_f32<T, N>(x + c, v);
#pragma unroll
        for (int i = 0; i < N; ++i) s += v[i];
    }
    const float mean = tf::warp_sum(s) / (float)h;
    float q = 0.f;
    for (int c = lane * N; c < h; c += 32 * N) {
        float v[N];
        tf::load_f32<T, N>(x + c, v);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float d = v[i] - mean;
            q = fmaf(d, d, q);
        }
    }
    const float var = tf::warp_sum(q) / (float)h;
    return Stats{mean, 1.f / sqrtf(var + eps)};
}

// A row's statistics in packs where x alone allows them (h a multiple of N,
// x aligned to 16 bytes): the same choice, so the same x_hat, in every
// kernel that reads x, whatever the other pointers' alignment.
template <typename T>
__device__ __forceinline__ Stats row_stats(const T* __restrict__ x, int h, float eps, int lane) {
    constexpr int N = vec_n<T>();
    if (h % N == 0 && (uintptr_t)x % 16 == 0) return row_stats_n<T, N>(x, h, eps, lane);
    return row_stats_n<T, 1>(x, h, eps, lane);
}

// Row r's statistics: the forward's saved ones when there are, else
// computed (the same function the forward used, so the same values).
template <typename T>
__device__ __forceinline__ Stats stats_of(const T* __restrict__ xr, const float2* __restrict__ saved,
                                          int64_t r, int h, float eps, int lane) {
    if (saved) {
        const float2 s = saved[r];
        return Stats{s.x, s.y};
    }
    return row_stats(xr, h, eps, lane);
}

template <typename T, int N>
__device__ void fwd(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                    T* __restrict__ y, float2* __restrict__ save, int64_t rows, int h, float eps) {
    const int lane = threadIdx.x % 32;
    for (int64_t r = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32; r < rows;
         r += (int64_t)gridDim.x * WARPS) {
        const T* xr = x + r * h;
        const Stats st = row_stats(xr, h, eps, lane);
        if (save && lane == 0) save[r] = make_float2(st.mean, st.rstd);
        T* yr = y + r * h;
        for (int c = lane * N; c < h; c += 32 * N) {
            float v[N], wv[N], bv[N], out[N];
            tf::load_f32<T, N>(xr + c, v);
            tf::load_f32<float, N>(w + c, wv);
            tf::load_f32<float, N>(b + c, bv);
#pragma unroll
            for (int i = 0; i < N; ++i) out[i] = fmaf((v[i] - st.mean) * st.rstd, wv[i], bv[i]);
            tf::store_f32<T, N>(yr + c, out);
        }
    }
}

// g = dy * w and x_hat for the pack at column c of a row (both passes of
// bwd_dx compute them alike).
template <typename T, int N>
__device__ __forceinline__ void grad_terms(const T* __restrict__ xr, const T* __restrict__ dyr,
                                           const float* __restrict__ w, int c, Stats st,
                                           float (&g)[N], float (&xh)[N]) {
    float v[N], d[N], wv[N];
    tf::load_f32<T, N>(xr + c, v);
    tf::load_f32<T, N>(dyr + c, d);
    tf::load_f32<float, N>(w + c, wv);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        g[i] = d[i] * wv[i];
        xh[i] = (v[i] - st.mean) * st.rstd;
    }
}

// dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * w.
template <typename T, int N>
__device__ void bwd_dx(const T* __restrict__ x, const float* __restrict__ w, const T* __restrict__ dy,
                       T* __restrict__ dx, const float2* __restrict__ saved, int64_t rows, int h,
                       float eps) {
    const int lane = threadIdx.x % 32;
    for (int64_t r = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32; r < rows;
         r += (int64_t)gridDim.x * WARPS) {
        const T* xr = x + r * h;
        const T* dyr = dy + r * h;
        const Stats st = stats_of(xr, saved, r, h, eps, lane);
        float sg = 0.f, sgx = 0.f;
        for (int c = lane * N; c < h; c += 32 * N) {
            float g[N], xh[N];
            grad_terms<T, N>(xr, dyr, w, c, st, g, xh);
#pragma unroll
            for (int i = 0; i < N; ++i) {
                sg += g[i];
                sgx = fmaf(g[i], xh[i], sgx);
            }
        }
        const float mg = tf::warp_sum(sg) / (float)h;
        const float mgx = tf::warp_sum(sgx) / (float)h;
        T* dxr = dx + r * h;
        for (int c = lane * N; c < h; c += 32 * N) {
            float g[N], xh[N], out[N];
            grad_terms<T, N>(xr, dyr, w, c, st, g, xh);
#pragma unroll
            for (int i = 0; i < N; ++i) out[i] = st.rstd * (g[i] - mg - xh[i] * mgx);
            tf::store_f32<T, N>(dxr + c, out);
        }
    }
}

// part[chunk][c] = sum over the chunk's rows of dy * x_hat (column c), and
// part[chunk][h + c] = sum of dy, in row order.
template <typename T>
__device__ void bwd_partial(const T* __restrict__ x, const T* __restrict__ dy,
                            const float2* __restrict__ saved, float* __restrict__ part, int64_t rows,
                            int h, float eps) {
    __shared__ Stats st[CHUNK];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t first = (int64_t)blockIdx.x * CHUNK;
    const int n = (int)min((int64_t)CHUNK, rows - first);
    for (int i = warp; i < n; i += blockDim.x / 32) {
        const Stats s = stats_of(x + (first + i) * h, saved, first + i, h, eps, lane);
        if (lane == 0) st[i] = s;
    }
    __syncthreads();
    float* out = part + (int64_t)blockIdx.x * 2 * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        float sw = 0.f, sb = 0.f;
        for (int i = 0; i < n; ++i) {
            const int64_t k = (first + i) * h + c;
            const float d = tf::to_f32(dy[k]);
            const float xh = (tf::to_f32(x[k]) - st[i].mean) * st[i].rstd;
            sw = fmaf(d, xh, sw);
            sb += d;
        }
        out[c] = sw;
        out[h + c] = sb;
    }
}

// The last block of the partial-sum grid to finish adds the partials:
// out[j] = sum over chunks of part[chunk][j], j < 2h, in chunk order (the
// threadFenceReduction pattern). Every thread fences its partial writes
// before thread 0 takes a ticket; atomicInc wraps the counter back to 0 on
// the last ticket, so the persistent counter is ready for the next launch
// without a memset (and a CUDA graph can replay the kernel).
__device__ void reduce_if_last(const float* part, float* __restrict__ out, unsigned* counter, int h2) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicInc(counter, gridDim.x - 1) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int j = threadIdx.x; j < h2; j += blockDim.x) {
        float s = 0.f;
        for (int64_t k = 0; k < gridDim.x; ++k) s += __ldcg(part + k * h2 + j);
        out[j] = s;
    }
}

}  // namespace

// The row kernels take the N-element packs where they fit (packs_fit), else
// single elements; the branch is uniform over the grid.
#define LN_ENTRIES(SUF, T)                                                                          \
    extern "C" __global__ void layer_norm_fwd_##SUF(const T* x, const float* w, const float* b, T* y, \
                                                    float2* save, int64_t rows, int h, float eps) { \
        if (packs_fit<T>(h, x, y, y, w, b))                                                          \
            fwd<T, vec_n<T>()>(x, w, b, y, save, rows, h, eps);                                      \
        else                                                                                        \
            fwd<T, 1>(x, w, b, y, save, rows, h, eps);                                               \
    }                                                                                               \
    extern "C" __global__ void layer_norm_bwd_dx_##SUF(const T* x, const float* w, const T* dy,     \
                                                       T* dx, const float2* saved, int64_t rows,    \
                                                       int h, float eps) {                           \
        if (packs_fit<T>(h, x, dy, dx, w, w))                                                        \
            bwd_dx<T, vec_n<T>()>(x, w, dy, dx, saved, rows, h, eps);                                \
        else                                                                                        \
            bwd_dx<T, 1>(x, w, dy, dx, saved, rows, h, eps);                                         \
    }                                                                                               \
    extern "C" __global__ void layer_norm_bwd_wb_##SUF(const T* x, const T* dy, const float2* saved, \
                                                       float* part, float* out, unsigned* counter,   \
                                                       int64_t rows, int h, float eps) {             \
        bwd_partial<T>(x, dy, saved, part, rows, h, eps);                                            \
        reduce_if_last(part, out, counter, 2 * h);                                                   \
    }

LN_ENTRIES(f32, float)
LN_ENTRIES(f16, __half)
LN_ENTRIES(bf16, __nv_bfloat16)
