// Fused AdamW step (moments, then the parameter), in place, f32 or f64.
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

// mv = [m; v] (2n elements); scale may be null.
template <typename T>
__device__ void moments(T* __restrict__ mv, const T* __restrict__ g, const T* __restrict__ scale,
                        int64_t n, T b1, T ob1, T b2, T ob2) {
    using R = Rn<T>;
    const T k = scale ? *scale : T(1);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const T gi = scale ? R::mul(g[i], k) : g[i];
        const T m = R::add(scal(mv[i], b1), scal(gi, ob1));
        const T v = R::add(scal(mv[n + i], b2), scal(R::mul(gi, gi), ob2));
        mv[i] = m;
        mv[n + i] = v;
    }
}

// anchor non-null: RecAdam's weighting and pull (lam, pull); decay != 0:
// p' -= p * dlr.
template <typename T>
__device__ void update(T* __restrict__ p, const T* __restrict__ mv, const T* __restrict__ anchor,
                       int64_t n, T ic1, T ic2, T eps, T lr, T lam, T pull, T dlr, int decay) {
    using R = Rn<T>;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const T mh = scal(mv[i], ic1);
        const T vh = scal(mv[n + i], ic2);
        T u = R::div(mh, R::add(R::sqrt(vh), eps));
        const T old = p[i];
        if (anchor) u = R::add(scal(u, lam), scal(R::sub(old, anchor[i]), pull));
        T next = R::sub(old, scal(u, lr));
        if (decay) next = R::sub(next, scal(old, dlr));
        p[i] = next;
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
