// The optimiser step's kernels. Fused AdamW step (moments, then the
// parameter), in place, f32 or f64, one tensor per launch; and the
// multi-tensor forms over every trainable tensor at once (f32): the global
// gradient norm with the clipping factor, and AdamW in one pass.
// Semantics: src/ops/adamw.rs (the CPU op, which equals candle's composed
// update bit for bit). Every operation is an explicit round-to-nearest
// intrinsic, in the reference's order, with its "+ 0" kept (x*c + 0 is how
// candle's affine applies a scalar; it turns -0 into +0), so no FMA
// contraction can change a bit.
#include "common.cuh"

namespace {

template <typename T> struct Rn;
template <> struct Rn<float> {
    static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
    static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
    static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
    static __device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
    static __device__ __forceinline__ float sqrt(float a) { return __fsqrt_rn(a); }
};
template <> struct Rn<double> {
    static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
    static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
    static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
    static __device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
    static __device__ __forceinline__ double sqrt(double a) { return __dsqrt_rn(a); }
};

// x * c + 0, as candle's affine with add = 0.
template <typename T> __device__ __forceinline__ T scal(T x, T c) {
    return Rn<T>::add(Rn<T>::mul(x, c), T(0));
}

// One element's moments: m, v from mv[i], mv[n + i] and the (scaled)
// gradient gi.
template <typename T>
__device__ __forceinline__ void moment_elem(T& m, T& v, T gi, T b1, T ob1, T b2, T ob2) {
    using R = Rn<T>;
    m = R::add(scal(m, b1), scal(gi, ob1));
    v = R::add(scal(v, b2), scal(R::mul(gi, gi), ob2));
}

// One element's new parameter value from its moments m, v. anchor_i is
// used when has_anchor (RecAdam's weighting and pull: lam, pull); decay:
// p' -= p * dlr.
template <typename T>
__device__ __forceinline__ T update_elem(T old, T m, T v, bool has_anchor, T anchor_i, T ic1, T ic2,
                                         T eps, T lr, T lam, T pull, T dlr, int decay) {
    using R = Rn<T>;
    const T mh = scal(m, ic1);
    const T vh = scal(v, ic2);
    T u = R::div(mh, R::add(R::sqrt(vh), eps));
    if (has_anchor) u = R::add(scal(u, lam), scal(R::sub(old, anchor_i), pull));
    T next = R::sub(old, scal(u, lr));
    if (decay) next = R::sub(next, scal(old, dlr));
    return next;
}

// mv = [m; v] (2n elements); scale may be null.
template <typename T>
__device__ void moments(T* __restrict__ mv, const T* __restrict__ g, const T* __restrict__ scale,
                        int64_t n, T b1, T ob1, T b2, T ob2) {
    using R = Rn<T>;
    const T k = scale ? *scale : T(1);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const T gi = scale ? R::mul(g[i], k) : g[i];
        T m = mv[i], v = mv[n + i];
        moment_elem(m, v, gi, b1, ob1, b2, ob2);
        mv[i] = m;
        mv[n + i] = v;
    }
}

template <typename T>
__device__ void update(T* __restrict__ p, const T* __restrict__ mv, const T* __restrict__ anchor,
                       int64_t n, T ic1, T ic2, T eps, T lr, T lam, T pull, T dlr, int decay) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        p[i] = update_elem(p[i], mv[i], mv[n + i], anchor != nullptr, anchor ? anchor[i] : T(0), ic1,
                           ic2, eps, lr, lam, pull, dlr, decay);
    }
}

}  // namespace

#define ADAMW_ENTRIES(SUF, T)                                                                     \
    extern "C" __global__ void adamw_moments_##SUF(T* mv, const T* g, const T* scale, int64_t n, \
                                                   T b1, T ob1, T b2, T ob2) {                   \
        moments<T>(mv, g, scale, n, b1, ob1, b2, ob2);                                            \
    }                                                                                             \
    extern "C" __global__ void adamw_update_##SUF(T* p, const T* mv, const T* anchor, int64_t n,  \
                                                  T ic1, T ic2, T eps, T lr, T lam, T pull, T dlr, \
                                                  int decay) {                                    \
        update<T>(p, mv, anchor, n, ic1, ic2, eps, lr, lam, pull, dlr, decay);                    \
    }

ADAMW_ENTRIES(f32, float)
ADAMW_ENTRIES(f64, double)

// ---------------------------------------------------------------------------
// Multi-tensor launches (f32). The host uploads a table: the tensors
// (MtTensor), then the chunks (MtChunk); block b handles chunk b, the
// elements [start, min(start + chunk, n)) of one tensor. The table holds
// only what stays put from step to step (the addresses of the parameters,
// their moments, copies and anchors, sizes, flags), so the host re-uploads
// it only when one of those changes. What changes every step is of two
// kinds. The gradients' addresses (a backward pass allocates them anew)
// travel as a kernel argument (MtStep): inside a captured CUDA graph the
// step's allocations keep their addresses, so a replay passes the right
// ones. The scalars (bias corrections; learning rates, RecAdam's weights
// and decay factors, one MtGroup per distinct set, which each tensor names)
// are written by the host into a device buffer before the launch
// (MtScalars), so the launch's arguments repeat from step to step and a
// replay reads the current values. Layouts are shared with
// src/ops/adamw.rs (multi module), which asserts their sizes.

#define MT_GROUPS 256
#define MT_TENSORS 1024
struct MtGroup {
    float lr, lam, pull, dlr;
};
struct MtScalars {
    float ic1, ic2;  // 1 / (1 - beta^t)
    float pad[2];
    MtGroup group[MT_GROUPS];
};
struct MtStep {
    unsigned long long grad[MT_TENSORS];  // by the tensor's index in the table
};

struct MtTensor {
    // Device addresses: anchor 0 = none; shadow (the bf16 copy of the
    // parameter that mixed precision's forward reads) 0 = none.
    unsigned long long p, mv, anchor, shadow;
    long long n;
    int group;  // its scalars: MtScalars.group[group]
    int decay;
    int g_bf16;  // the gradient is bf16 (else f32)
    int pad;
};

// Element i of gradient g, widened exactly to f32 when it is bf16.
__device__ __forceinline__ float grad_at(const MtTensor& t, unsigned long long g, long long i) {
    return t.g_bf16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(g)[i])
                    : reinterpret_cast<const float*>(g)[i];
}
struct MtChunk {
    int tensor, pad;
    long long start;
};

// AdamW over every tensor of the table in one pass: the same arithmetic as
// adamw_moments then adamw_update (the update reads the moments this
// thread just computed, which are the values the second kernel re-reads).
// scale (the clipping factor, f64) may be null; converted to f32 as the
// per-tensor path converts it.
extern "C" __global__ void adamw_multi_f32(const MtTensor* __restrict__ ts,
                                           const MtChunk* __restrict__ cs, long long chunk,
                                           const double* __restrict__ scale, float b1, float ob1,
                                           float b2, float ob2, float eps,
                                           const MtScalars* __restrict__ sc,
                                           const __grid_constant__ MtStep step) {
    using R = Rn<float>;
    const MtChunk c = cs[blockIdx.x];
    const MtTensor t = ts[c.tensor];
    float* p = reinterpret_cast<float*>(t.p);
    float* mv = reinterpret_cast<float*>(t.mv);
    const float* anchor = reinterpret_cast<const float*>(t.anchor);
    __nv_bfloat16* shadow = reinterpret_cast<__nv_bfloat16*>(t.shadow);
    const MtGroup q = sc->group[t.group];
    const float ic1 = sc->ic1, ic2 = sc->ic2;
    const unsigned long long gp = step.grad[c.tensor];
    const float k = scale ? (float)*scale : 1.f;
    const long long end = min(c.start + chunk, t.n);
    for (long long i = c.start + threadIdx.x; i < end; i += blockDim.x) {
        const float g = grad_at(t, gp, i);
        const float gi = scale ? R::mul(g, k) : g;
        float m = mv[i], v = mv[t.n + i];
        moment_elem(m, v, gi, b1, ob1, b2, ob2);
        mv[i] = m;
        mv[t.n + i] = v;
        const float next = update_elem(p[i], m, v, anchor != nullptr, anchor ? anchor[i] : 0.f,
                                       ic1, ic2, eps, q.lr, q.lam, q.pull, q.dlr, t.decay);
        p[i] = next;
        if (shadow) shadow[i] = __float2bfloat16_rn(next);
    }
}

// shadow = bf16(p) for every tensor of the table (the copies' refresh after
// the parameters were written other than by the step).
extern "C" __global__ void cast_multi_f32_bf16(const MtTensor* __restrict__ ts,
                                               const MtChunk* __restrict__ cs, long long chunk) {
    const MtChunk c = cs[blockIdx.x];
    const MtTensor t = ts[c.tensor];
    const float* p = reinterpret_cast<const float*>(t.p);
    __nv_bfloat16* shadow = reinterpret_cast<__nv_bfloat16*>(t.shadow);
    const long long end = min(c.start + chunk, t.n);
    for (long long i = c.start + threadIdx.x; i < end; i += blockDim.x)
        shadow[i] = __float2bfloat16_rn(p[i]);
}

// Sum of the squared gradient of each chunk (f32 per thread and across the
// block, like the per-tensor f32 sum it replaces), to partial[chunk] as f64.
extern "C" __global__ void sumsq_multi_f32(const MtTensor* __restrict__ ts,
                                           const MtChunk* __restrict__ cs, long long chunk,
                                           double* __restrict__ partial,
                                           const __grid_constant__ MtStep step) {
    __shared__ float warp_sums[32];
    const MtChunk c = cs[blockIdx.x];
    const MtTensor t = ts[c.tensor];
    const long long end = min(c.start + chunk, t.n);
    const unsigned long long gp = step.grad[c.tensor];
    float s = 0.f;
    for (long long i = c.start + threadIdx.x; i < end; i += blockDim.x) {
        const float g = grad_at(t, gp, i);
        s += g * g;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        s = lane < warps ? warp_sums[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (lane == 0) partial[blockIdx.x] = (double)s;
    }
}

// The global norm from the chunks' partial sums (f64), and the clipping
// factor as clip_scale computes it: max/(norm + 1e-6) when norm > max, else
// 1 (also when max <= 0, where nothing is clipped). out = [norm, factor].
// One block.
extern "C" __global__ void norm_scale_f64(const double* __restrict__ partial, int nparts,
                                          double max_norm, double* __restrict__ out) {
    __shared__ double warp_sums[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += partial[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < (int)((blockDim.x + 31) >> 5); w++) total += warp_sums[w];
        const double norm = __dsqrt_rn(total);
        out[0] = norm;
        out[1] = (max_norm > 0.0 && norm > max_norm) ? __ddiv_rn(max_norm, __dadd_rn(norm, 1e-6))
                                                     : 1.0;
    }
}
