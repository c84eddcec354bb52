// Adversarial perturbation of input embeddings [B, L, H] with a token mask
// [B, L]: masked noise init and the fused ascent step (SMART, R3F, FreeLB,
// VAT). Semantics: src/ops/perturb.rs (the CPU reference) and DESIGN.md.
//
// An ascent step normalises over a unit (a token's H values, or an
// example's L*H values). Every mode is delta' = alpha*delta + beta*g with
// alpha, beta from six per-unit statistics (an optional clamp for pgd/linf),
// so one reduction pass and one update pass suffice:
//   token units:   one warp per token, 16-byte accesses, shuffle-only
//                  reductions; the update re-reads the row from L1;
//   example units: a statistics kernel over chunks of every example, then an
//                  update kernel whose blocks first combine their example's
//                  chunk statistics in a fixed order (deterministic).
#include "common.cuh"

namespace {

enum Mode : int { PGD = 0, DIRECTION = 1, NORMALIZED = 2 };

struct Stats {
    float sg, sd, sdg, sy;  // sums: g^2, delta^2, delta*g, (delta + eta g)^2
    float mg, my;           // maxima: |g|, |delta + eta g|
};

__device__ __forceinline__ Stats empty_stats() { return Stats{0.f, 0.f, 0.f, 0.f, 0.f, 0.f}; }

// The step's point y = delta + eta g, rounded once (fma).
__device__ __forceinline__ float step_point(float d, float g, float eta) { return fmaf(eta, g, d); }

__device__ __forceinline__ void accumulate(Stats& s, float d, float g, float eta) {
    const float y = step_point(d, g, eta);
    s.sg += g * g;
    s.sd += d * d;
    s.sdg += d * g;
    s.sy += y * y;
    // NaN must survive a max: fmaxf would drop it.
    s.mg = (fabsf(g) > s.mg || g != g) ? fabsf(g) : s.mg;
    s.my = (fabsf(y) > s.my || y != y) ? fabsf(y) : s.my;
}

__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

__device__ __forceinline__ Stats combine(Stats a, const Stats& b) {
    a.sg += b.sg;
    a.sd += b.sd;
    a.sdg += b.sdg;
    a.sy += b.sy;
    a.mg = nan_max(a.mg, b.mg);
    a.my = nan_max(a.my, b.my);
    return a;
}

__device__ __forceinline__ Stats shfl_xor(const Stats& s, int o) {
    return Stats{__shfl_xor_sync(0xffffffffu, s.sg, o), __shfl_xor_sync(0xffffffffu, s.sd, o),
                 __shfl_xor_sync(0xffffffffu, s.sdg, o), __shfl_xor_sync(0xffffffffu, s.sy, o),
                 __shfl_xor_sync(0xffffffffu, s.mg, o), __shfl_xor_sync(0xffffffffu, s.my, o)};
}

// Block-wide combination; every thread gets the result.
__device__ Stats block_stats(Stats s) {
    __shared__ Stats red[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s = combine(s, shfl_xor(s, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = s;
    __syncthreads();
    Stats r = lane < (int)(blockDim.x >> 5) ? red[lane] : empty_stats();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) r = combine(r, shfl_xor(r, o));
    return r;
}

struct Params {
    float eta, eps;  // step; pgd radius or the epsilon of direction / normalized_step
    int mode, l2, has_eps;
};

struct Coef {
    float alpha, beta;
    bool clamp, bad;
};

__device__ Coef coefficients(const Stats& s, const Params& p) {
    const float gn = p.l2 ? sqrtf(s.sg) : s.mg;
    Coef c{0.f, 0.f, false, !isfinite(gn)};
    if (p.mode == PGD) {
        c.alpha = 1.f;
        c.beta = gn > 0.f ? p.eta / gn : 0.f;
        if (p.has_eps) {
            if (p.l2) {
                // |delta + beta g|^2 expanded from the statistics.
                const float xn = sqrtf(fmaxf(s.sd + 2.f * c.beta * s.sdg + c.beta * c.beta * s.sg, 0.f));
                const float k = xn > p.eps ? p.eps / xn : 1.f;
                c.alpha = k;
                c.beta *= k;
            } else {
                c.clamp = true;
            }
        }
    } else if (p.mode == DIRECTION) {
        const float den = gn + p.eps;
        c.beta = gn > 0.f ? p.eta / den : 0.f;
    } else {
        const float yn = p.l2 ? sqrtf(s.sy) : s.my;
        const float den = yn + p.eps;
        c.alpha = den > 0.f ? 1.f / den : 0.f;
        c.beta = p.eta * c.alpha;
    }
    if (c.bad) {  // propagate: the caller skips this batch / example
        c.alpha = c.beta = NAN;
    }
    return c;
}

__device__ __forceinline__ float apply(const Coef& c, const Params& p, float d, float g) {
    // normalized_step is y / (|y| + eps): scale the once-rounded y. The form
    // alpha d + beta g loses y's digits when delta ≈ -eta g (|y| near eps
    // made 3e-5 errors on an H200; the reference computes y first too).
    if (p.mode == NORMALIZED) return c.alpha * step_point(d, g, p.eta);
    float x = (c.alpha == 0.f ? 0.f : c.alpha * d) + c.beta * g;
    if (c.clamp) x = fminf(fmaxf(x, -p.eps), p.eps);
    return x;
}

// ---- token units --------------------------------------------------------------
// One warp per token: the lanes walk the row in 16-byte packs (E = 16 /
// sizeof(T) elements) when H is a multiple of E and the rows are 16-byte
// aligned, element by element otherwise; the statistics combine by shuffles
// alone (no shared memory, no barrier); the update re-reads the row, which
// the first pass left in L1.
template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename T>
__device__ void token_step(const T* delta, const T* grad, const float* mask, T* out, unsigned char* flags,
                           int64_t tokens, int64_t L, int64_t H, Params p) {
    constexpr int E = 16 / (int)sizeof(T);
    const int lane = threadIdx.x & 31;
    const int64_t unit = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // b * L + l
    if (unit >= tokens) return;  // the whole warp: one unit per warp
    const T* d = delta + unit * H;
    const T* g = grad + unit * H;
    T* o = out + unit * H;
    const bool vec = H % E == 0 && aligned16(d) && aligned16(g) && aligned16(o);
    if (mask[unit] == 0.f) {
        if (vec) {
            float z[E] = {};
            for (int64_t j = (int64_t)lane * E; j < H; j += 32 * E) tf::store_f32<T, E>(o + j, z);
        } else {
            for (int64_t j = lane; j < H; j += 32) o[j] = tf::from_f32<T>(0.f);
        }
        return;
    }
    const bool need_d = p.mode != DIRECTION;
    Stats s = empty_stats();
    if (vec) {
        for (int64_t j = (int64_t)lane * E; j < H; j += 32 * E) {
            float dv[E] = {}, gv[E];
            if (need_d) tf::load_f32<T, E>(d + j, dv);
            tf::load_f32<T, E>(g + j, gv);
#pragma unroll
            for (int k = 0; k < E; ++k) accumulate(s, dv[k], gv[k], p.eta);
        }
    } else {
        for (int64_t j = lane; j < H; j += 32)
            accumulate(s, need_d ? tf::to_f32(d[j]) : 0.f, tf::to_f32(g[j]), p.eta);
    }
#pragma unroll
    for (int w = 16; w > 0; w >>= 1) s = combine(s, shfl_xor(s, w));
    const Coef c = coefficients(s, p);
    if (c.bad && lane == 0) flags[unit / L] = 1;
    if (vec) {
        for (int64_t j = (int64_t)lane * E; j < H; j += 32 * E) {
            float dv[E] = {}, gv[E], x[E];
            if (need_d) tf::load_f32<T, E>(d + j, dv);
            tf::load_f32<T, E>(g + j, gv);
#pragma unroll
            for (int k = 0; k < E; ++k) x[k] = apply(c, p, dv[k], gv[k]);
            tf::store_f32<T, E>(o + j, x);
        }
    } else {
        for (int64_t j = lane; j < H; j += 32)
            o[j] = tf::from_f32<T>(apply(c, p, need_d ? tf::to_f32(d[j]) : 0.f, tf::to_f32(g[j])));
    }
}

// ---- example units --------------------------------------------------------------
// Chunk c of example b covers elements [c * chunk, min((c + 1) * chunk, L*H)).
template <typename T>
__device__ void example_stats(const T* delta, const T* grad, const float* mask, Stats* part, int64_t L,
                              int64_t H, int64_t chunk, Params p) {
    const int64_t b = blockIdx.y, c = blockIdx.x, n = L * H;
    const int64_t start = c * chunk, end = min(start + chunk, n);
    const bool need_d = p.mode != DIRECTION;
    Stats s = empty_stats();
    for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) {
        if (mask[b * L + j / H] == 0.f) continue;
        const int64_t i = b * n + j;
        accumulate(s, need_d ? tf::to_f32(delta[i]) : 0.f, tf::to_f32(grad[i]), p.eta);
    }
    s = block_stats(s);
    if (threadIdx.x == 0) part[b * gridDim.x + c] = s;
}

template <typename T>
__device__ void example_update(const T* delta, const T* grad, const float* mask, const Stats* part, T* out,
                               unsigned char* flags, int64_t L, int64_t H, int64_t chunk, Params p) {
    const int64_t b = blockIdx.y, c = blockIdx.x, n = L * H;
    Stats s = empty_stats();
    for (int64_t k = threadIdx.x; k < gridDim.x; k += blockDim.x) s = combine(s, part[b * gridDim.x + k]);
    const Coef cf = coefficients(block_stats(s), p);
    if (c == 0 && threadIdx.x == 0) flags[b] = cf.bad ? 1 : 0;
    const bool need_d = p.mode != DIRECTION;
    const int64_t start = c * chunk, end = min(start + chunk, n);
    for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) {
        const int64_t i = b * n + j;
        const float x = mask[b * L + j / H] == 0.f
                            ? 0.f
                            : apply(cf, p, need_d ? tf::to_f32(delta[i]) : 0.f, tf::to_f32(grad[i]));
        out[i] = tf::from_f32<T>(x);
    }
}

// ---- noise ----------------------------------------------------------------------
// Element i takes word i % 4 of Philox group i / 4 (src/philox.rs). Uniform:
// (2u - 1) sigma with u = (word >> 8) 2^-24, exact to the CPU's bits. Normal:
// Box-Muller on the word pairs (0, 1) and (2, 3) of the group, cos for even
// and sin for odd elements, u1 = ((w >> 8) + 1) 2^-24 in (0, 1].
// Each thread writes 16 bytes of elements (E = 4 in f32, 8 in bf16 and f16:
// E / 4 groups). When H is a multiple of E the E elements lie in one token:
// one division and one mask load for the chunk, and one 16-byte store.
__device__ __forceinline__ void noise_group(const tf::U4& r, float sigma, int normal, float* v) {
    const float inv24 = 1.f / 16777216.f;
    if (normal) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const float u1 = (float)((tf::word(r, 2 * k) >> 8) + 1u) * inv24;
            const float u2 = (float)(tf::word(r, 2 * k + 1) >> 8) * inv24;
            const float rad = sqrtf(-2.f * logf(u1));
            float sn, cs;
            sincospif(2.f * u2, &sn, &cs);
            v[2 * k] = sigma * rad * cs;
            v[2 * k + 1] = sigma * rad * sn;
        }
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float u = (float)(tf::word(r, k) >> 8) * inv24;
            v[k] = __fmul_rn(__fsub_rn(__fmul_rn(2.f, u), 1.f), sigma);
        }
    }
}

template <typename T>
__device__ void noise(T* out, const float* mask, int64_t n, int64_t H, uint64_t seed, uint64_t offset,
                      float sigma, int normal) {
    constexpr int E = 16 / (int)sizeof(T), G = E / 4;
    const int64_t chunks = (n + E - 1) / E;
    const bool one_token = H % E == 0;
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < chunks;
         c += (int64_t)gridDim.x * blockDim.x) {
        float v[E];
#pragma unroll
        for (int j = 0; j < G; ++j)
            noise_group(tf::philox_group(seed, offset, (uint64_t)(c * G + j)), sigma, normal, v + 4 * j);
        const int64_t base = c * E;
        if (one_token && base + E <= n && reinterpret_cast<uintptr_t>(out + base) % 16 == 0) {
            const bool masked = mask[base / H] == 0.f;
#pragma unroll
            for (int k = 0; k < E; ++k) v[k] = masked ? 0.f : v[k];
            tf::store_f32<T, E>(out + base, v);
        } else {
#pragma unroll
            for (int k = 0; k < E; ++k) {
                const int64_t i = base + k;
                if (i < n) out[i] = tf::from_f32<T>(mask[i / H] == 0.f ? 0.f : v[k]);
            }
        }
    }
}

}  // namespace

#define PERTURB_ENTRIES(SUF, T)                                                                          \
    extern "C" __global__ void perturb_token_##SUF(const T* delta, const T* grad, const float* mask,     \
                                                   T* out, unsigned char* flags, int64_t tokens,         \
                                                   int64_t L, int64_t H, float eta, float eps, int mode, \
                                                   int l2, int has_eps) {                                \
        token_step<T>(delta, grad, mask, out, flags, tokens, L, H, Params{eta, eps, mode, l2, has_eps});  \
    }                                                                                                     \
    extern "C" __global__ void perturb_example_stats_##SUF(const T* delta, const T* grad,                  \
                                                           const float* mask, Stats* part, int64_t L,     \
                                                           int64_t H, int64_t chunk, float eta,           \
                                                           float eps, int mode, int l2, int has_eps) {    \
        example_stats<T>(delta, grad, mask, part, L, H, chunk, Params{eta, eps, mode, l2, has_eps});      \
    }                                                                                                     \
    extern "C" __global__ void perturb_example_update_##SUF(                                              \
        const T* delta, const T* grad, const float* mask, const Stats* part, T* out,                     \
        unsigned char* flags, int64_t L, int64_t H, int64_t chunk, float eta, float eps, int mode,        \
        int l2, int has_eps) {                                                                            \
        example_update<T>(delta, grad, mask, part, out, flags, L, H, chunk,                               \
                          Params{eta, eps, mode, l2, has_eps});                                           \
    }                                                                                                     \
    extern "C" __global__ void perturb_noise_##SUF(T* out, const float* mask, int64_t n, int64_t H,       \
                                                   uint64_t seed, uint64_t offset, const uint64_t* base,  \
                                                   float sigma, int normal) {                             \
        noise<T>(out, mask, n, H, seed, tf::philox_offset(base, offset), sigma, normal);                  \
    }

PERTURB_ENTRIES(f32, float)
PERTURB_ENTRIES(f16, __half)
PERTURB_ENTRIES(bf16, __nv_bfloat16)
