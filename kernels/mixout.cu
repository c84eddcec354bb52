// Mixout, dropout and dropout followed by a residual add, from one
// counter-based RNG (Philox4x32-10).
// Semantics: src/ops/mixout.rs (the CPU reference) and DESIGN.md.
//
// Element i uses word i % 4 of the Philox block for counter offset + i / 4;
// each thread owns 16 bytes of consecutive elements (one or two groups of
// 4) and makes one Philox call per group. It is kept when (word >> 8) >= threshold, threshold = ceil(p * 2^24),
// i.e. with probability 1 - p. The arithmetic uses explicit round-to-nearest
// intrinsics (no fma contraction) so the results equal the CPU's bit for bit.
#include "common.cuh"

namespace {

// What a launch computes; u is the second operand (mixout's pretrained
// weight, the residual of dropout + add).
enum Mode { DROPOUT, MIXOUT, DROPOUT_ADD };

// Elements per thread: 16 bytes of T (4 in f32, 8 in bf16 and f16), so
// aligned chunks move in one 16-byte access per operand; E / 4 Philox
// groups each.
template <typename T>
__host__ __device__ constexpr int chunk_elems() {
    return 16 / (int)sizeof(T);
}

// One chunk of up to E elements starting at element E * c.
template <typename T, int MODE>
__device__ __forceinline__ void chunk(const T* __restrict__ x, const T* __restrict__ u, T* __restrict__ y,
                                      int64_t n, int64_t c, uint64_t seed, uint64_t offset,
                                      uint32_t threshold, float scale) {
    constexpr int E = chunk_elems<T>(), G = E / 4;
    tf::U4 r[G];
#pragma unroll
    for (int j = 0; j < G; ++j) r[j] = tf::philox_group(seed, offset, (uint64_t)(c * G + j));
    const int64_t base = c * E;
    float xv[E], uv[E], out[E];
    const bool full = base + E <= n;
    const bool aligned = full && (reinterpret_cast<uintptr_t>(x + base) % 16 == 0) &&
                         (reinterpret_cast<uintptr_t>(y + base) % 16 == 0) &&
                         (MODE == DROPOUT || reinterpret_cast<uintptr_t>(u + base) % 16 == 0);
    if (aligned) {
        tf::load_f32<T, E>(x + base, xv);
        if (MODE != DROPOUT) tf::load_f32<T, E>(u + base, uv);
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) {
            xv[i] = base + i < n ? tf::to_f32(x[base + i]) : 0.f;
            uv[i] = MODE != DROPOUT && base + i < n ? tf::to_f32(u[base + i]) : 0.f;
        }
    }
#pragma unroll
    for (int i = 0; i < E; ++i) {
        const bool keep = (tf::word(r[i / 4], i % 4) >> 8) >= threshold;
        if (MODE == MIXOUT) {
            // u + M * (w - u) / (1 - p)
            out[i] = keep ? __fadd_rn(uv[i], __fmul_rn(__fsub_rn(xv[i], uv[i]), scale)) : uv[i];
        } else if (MODE == DROPOUT_ADD) {
            // The dropped value rounded to T, as the dropout op stores it,
            // plus the residual: the two ops composed, bit for bit.
            const float d = tf::to_f32(tf::from_f32<T>(keep ? __fmul_rn(xv[i], scale) : 0.f));
            out[i] = __fadd_rn(d, uv[i]);
        } else {
            out[i] = keep ? __fmul_rn(xv[i], scale) : 0.f;
        }
    }
    if (aligned) {
        tf::store_f32<T, E>(y + base, out);
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i)
            if (base + i < n) y[base + i] = tf::from_f32<T>(out[i]);
    }
}

template <typename T, int MODE>
__device__ void run(const T* x, const T* u, T* y, int64_t n, uint64_t seed, uint64_t offset,
                    uint32_t threshold, float scale) {
    constexpr int E = chunk_elems<T>();
    const int64_t chunks = (n + E - 1) / E;
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < chunks;
         c += (int64_t)gridDim.x * blockDim.x) {
        chunk<T, MODE>(x, u, y, n, c, seed, offset, threshold, scale);
    }
}

}  // namespace

// mixout: y = u + M * (w - u) * scale. Its gradient w.r.t. w is dropout of the
// incoming gradient with the same seed/offset, so backward is `dropout`.
// dropout_add: y = dropout(x) + r (its backward is dropout for x, the
// identity for r).
#define MIXOUT_ENTRIES(SUF, T)                                                                    \
    extern "C" __global__ void mixout_##SUF(const T* w, const T* u, T* y, int64_t n, uint64_t seed, \
                                            uint64_t offset, const uint64_t* base,                \
                                            uint32_t threshold, float scale) {                    \
        run<T, MIXOUT>(w, u, y, n, seed, tf::philox_offset(base, offset), threshold, scale);       \
    }                                                                                             \
    extern "C" __global__ void dropout_##SUF(const T* x, T* y, int64_t n, uint64_t seed,           \
                                             uint64_t offset, const uint64_t* base,               \
                                             uint32_t threshold, float scale) {                   \
        run<T, DROPOUT>(x, nullptr, y, n, seed, tf::philox_offset(base, offset), threshold,        \
                        scale);                                                                   \
    }                                                                                             \
    extern "C" __global__ void dropout_add_##SUF(const T* x, const T* r, T* y, int64_t n,          \
                                                 uint64_t seed, uint64_t offset,                  \
                                                 const uint64_t* base, uint32_t threshold,        \
                                                 float scale) {                                   \
        run<T, DROPOUT_ADD>(x, r, y, n, seed, tf::philox_offset(base, offset), threshold, scale);  \
    }

MIXOUT_ENTRIES(f32, float)
MIXOUT_ENTRIES(f16, __half)
MIXOUT_ENTRIES(bf16, __nv_bfloat16)

// Moves a step's Philox counter on by the counters the step drew (one
// thread): the last launch of a step whose draws read their start from the
// counter (src/cuda.rs `PhiloxAnchor`).
extern "C" __global__ void philox_advance(uint64_t* base, uint64_t n) { *base += n; }
