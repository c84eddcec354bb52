// Shared device helpers for tunefuse kernels: dtype I/O, Philox4x32-10,
// warp/block reductions. Every kernel accumulates in f32.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace tf {

// ---- dtype I/O -------------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// N elements of T moved as one aligned access (N * sizeof(T) <= 16 bytes).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[N]) {
    Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[N]) {
    Pack<T, N> pk;
#pragma unroll
    for (int i = 0; i < N; ++i) pk.v[i] = from_f32<T>(in[i]);
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// ---- Philox4x32-10 (Salmon et al., SC'11; Random123's constants) ------------
struct U4 {
    uint32_t x, y, z, w;
};

__device__ __forceinline__ U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        uint32_t hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        uint32_t hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
        k0 += W0;
        k1 += W1;
    }
    return c;
}

// The random words for group g (elements 4g..4g+3) of a call keyed by `seed`
// and started at counter `offset`: counter = offset + g as a 64-bit number in
// words 0-1, words 2-3 zero; key = the two halves of the seed. The CPU
// reference (src/philox.rs) defines the same mapping.
__device__ __forceinline__ U4 philox_group(uint64_t seed, uint64_t offset, uint64_t g) {
    uint64_t c = offset + g;
    return philox4x32_10(U4{(uint32_t)c, (uint32_t)(c >> 32), 0u, 0u}, (uint32_t)seed,
                         (uint32_t)(seed >> 32));
}

// A call's first counter when part of it lives in device memory: a draw
// inside a training step passes its offset relative to the step's start and
// `base`, the address of a device counter holding that start (src/cuda.rs
// `PhiloxAnchor`); elsewhere `base` is null and the offset absolute. The
// arguments are then the same at every step of one shape, which is what a
// captured CUDA graph replays, and the counters the same as without it.
__device__ __forceinline__ uint64_t philox_offset(const uint64_t* base, uint64_t offset) {
    return base ? offset + *base : offset;
}

__device__ __forceinline__ uint32_t word(const U4& u, int i) {
    return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

// The dropout op's mask (kernels/mixout.cu): element e of a call is kept
// when word e % 4 of Philox group e / 4, shifted right by 8, is at least
// the threshold.
__device__ __forceinline__ bool kept(uint64_t seed, uint64_t offset, uint64_t e,
                                     uint32_t threshold) {
    const U4 w = philox_group(seed, offset, e >> 2);
    return (word(w, (int)(e & 3)) >> 8) >= threshold;
}

// ---- reductions --------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

}  // namespace tf
