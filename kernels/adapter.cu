// Fused bottleneck adapter / LoRA delta (DESIGN.md "Fused adapter"):
//   h = x·W_dᵀ + b_d  [T, r],  y = residual + s·(act(h)·W_uᵀ + b_u)  [T, n]
// for x [T, m], with the weights packed as one buffer p = [W_d (r×m), b_d (r),
// W_u (n×r), b_u (n)], or p = [W_d, W_u] when `bias` is 0 (LoRA: no biases;
// src/ops/adapter.rs). Adapters have n = m and the
// residual x; a LoRA delta may have n ≠ m and an explicit residual. Kernels:
//
//   adapter_fwd          one block per 64 rows: the 64×r tile h stays on chip
//                        (shared memory) between the two products; writes y
//                        and, for the backward, h in f32 ([T, RP], RP = r
//                        rounded up to the warp tile).
//   adapter_bwd_rows     one block per 64 rows: dz = s·dy·W_u, dh = dz ⊙ act'(h)
//                        (h from the forward: reading the T×r f32 h costs
//                        T·r·4 bytes, recomputing it would read all of x,
//                        T·m·2 bytes and T·m·r·2 FLOPs more), db_d, and
//                        dx = dh·W_d (+ dy); writes dh ([T, RP], x's dtype)
//                        for the weight gradients.
//   adapter_bwd_weights  one block per 64 columns (of n and m) and slice of rows:
//                        dW_u = s·dyᵀ·act(h), db_u = s·Σ dy, dW_d = dhᵀ·x,
//                        accumulated in f32 with atomics into a buffer laid
//                        out like p (weight gradients are therefore not
//                        bit-reproducible run to run on CUDA; the CPU
//                        reference is).
//   adapter_cast         that f32 buffer into the output dtype.
//
// Products: bf16/f16 on tensor cores (nvcuda::wmma 16×16×16, f32
// accumulation: HMMA on sm_80+); f32 on CUDA cores (SIMT FMA, full f32: no
// tf32 rounding). Operand tiles are staged in shared memory and zero-padded,
// so any m, n ≥ 1 and r ≤ 256 are correct; the vector path (16-byte loads
// and stores) needs m, n and r multiples of 8 and aligned tensors, decided on the
// host. Warp tiles are 16 rows × 16·NF columns with NF = RP/16 ∈ {1, 2, 4, 8,
// 16}: r ∈ {8, 16, 32, 64, 128} fill them exactly.
#include <mma.h>

#include "common.cuh"

namespace tfa {
using namespace tf;

constexpr int BT = 64;       // rows per block (forward, backward rows)
constexpr int KC = 32;       // K chunk over m (or n)
constexpr int NC = 64;       // output columns per chunk / per weight block
constexpr int KT = 32;       // rows per chunk of the weight-gradient reduction
constexpr int THREADS = 128; // 4 warps, each owning 16 rows of a 64-row tile
constexpr int FPAD = 4;      // row padding of f32 staging tiles

__host__ __device__ constexpr int rnd(int b) { return (b + 127) & ~127; }
__host__ __device__ constexpr int mx(int a, int b) { return a > b ? a : b; }

// Shared-memory plan of each kernel (bytes). src/ops/adapter.rs mirrors
// these formulas to size the launch; each kernel checks it got enough.
template <typename T, int NF> struct Plan {
    static constexpr int RP = 16 * NF;
    static constexpr int S = sizeof(T);
    // Operand row padding: 16-bit tiles keep rows 16-byte aligned (wmma
    // needs ld % 8 == 0) and shift banks by 16 bytes; f32 rows are odd so
    // the SIMT column reads do not conflict.
    static constexpr int P = S == 2 ? 8 : 1;
    static constexpr int LK = KC + P, LR = RP + P, LN = NC + P;
    static constexpr int LH = RP + FPAD, LC = NC + FPAD;
    // forward: {x chunk, W_d chunk} | h staging | {W_u chunk, out staging}; then z
    static constexpr int FWD_R1 = mx(rnd(BT * LK * S) + rnd(RP * LK * S),
                                     mx(rnd(BT * LH * 4), rnd(NC * LR * S) + rnd(BT * LC * 4)));
    static constexpr int FWD = FWD_R1 + rnd(BT * LR * S);
    // backward rows: {dy chunk, W_u chunk} | dz staging | {W_d chunk, out staging}; then dh
    static constexpr int ROWS_R1 = mx(rnd(BT * LK * S) + rnd(KC * LR * S),
                                      mx(rnd(BT * LH * 4), rnd(RP * LN * S) + rnd(BT * LC * 4)));
    static constexpr int ROWS = ROWS_R1 + rnd(BT * LR * S);
    // backward weights: {dy or x tile, z or dh tile} | staging
    static constexpr int WEIGHTS = mx(rnd(KT * LN * S) + rnd(KT * LR * S), rnd(NC * LH * 4));
};

__device__ __forceinline__ unsigned dynamic_smem() {
    unsigned v;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(v));
    return v;
}

// Activation codes: the order of `Act` in src/ops/adapter.rs.
__device__ __forceinline__ float act_f(int act, float h) {
    switch (act) {
    case 0: return 0.5f * h * (1.f + erff(h * 0.70710678118654752f));
    case 1: return 0.5f * h * (1.f + tanhf(0.79788456080286536f * (h + 0.044715f * h * h * h)));
    case 2: return fmaxf(h, 0.f);
    case 3: return h / (1.f + expf(-h));
    default: return h;
    }
}

__device__ __forceinline__ float act_df(int act, float h) {
    switch (act) {
    case 0:
        return 0.5f * (1.f + erff(h * 0.70710678118654752f)) +
               h * expf(-0.5f * h * h) * 0.39894228040143268f;
    case 1: {
        float t = tanhf(0.79788456080286536f * (h + 0.044715f * h * h * h));
        return 0.5f * (1.f + t) +
               0.5f * h * (1.f - t * t) * 0.79788456080286536f * (1.f + 0.134145f * h * h);
    }
    case 2: return h > 0.f ? 1.f : 0.f;
    case 3: {
        float sg = 1.f / (1.f + expf(-h));
        return sg * (1.f + h * (1.f - sg));
    }
    default: return 1.f;
    }
}

// ---- shared-memory tiles -----------------------------------------------------

template <typename T> __device__ __forceinline__ T zero() { return from_f32<T>(0.f); }

// Rows [r0, r0+R) × columns [c0, c0+C) of a row-major matrix (leading
// dimension lds, valid below nrows × ncols) into dst (leading dimension ldd),
// zero outside. VEC: 8 elements per access; the caller guarantees C % 8 == 0,
// c0 % 8 == 0, ncols % 8 == 0, lds % 8 == 0 and an aligned src.
template <typename T, bool VEC, int R, int C>
__device__ __forceinline__ void load_tile(T* dst, int ldd, const T* __restrict__ src, long long lds,
                                          long long r0, int c0, long long nrows, int ncols) {
    if constexpr (VEC) {
        constexpr int G = C / 8;
        for (int e = threadIdx.x; e < R * G; e += THREADS) {
            const int i = e / G, j = (e % G) * 8;
            const long long row = r0 + i;
            const int col = c0 + j;
            Pack<T, 8> v;
            if (row < nrows && col < ncols) {
                v = *reinterpret_cast<const Pack<T, 8>*>(src + row * lds + col);
            } else {
#pragma unroll
                for (int q = 0; q < 8; ++q) v.v[q] = zero<T>();
            }
            T* o = dst + i * ldd + j;
            if constexpr (sizeof(T) == 2) {
                *reinterpret_cast<Pack<T, 8>*>(o) = v;  // 16-bit rows are 16-byte aligned
            } else {
#pragma unroll
                for (int q = 0; q < 8; ++q) o[q] = v.v[q];
            }
        }
    } else {
        for (int e = threadIdx.x; e < R * C; e += THREADS) {
            const int i = e / C, j = e % C;
            const long long row = r0 + i;
            const int col = c0 + j;
            dst[i * ldd + j] = (row < nrows && col < ncols) ? src[row * lds + col] : zero<T>();
        }
    }
}

// ---- warp tiles: 16 rows × 16·NF columns, f32 accumulation -------------------
// A (the warp's 16 rows m, K columns k): element (m, k) at A[m*lda + k], or at
// A[m + k*lda] when A_COL. B: element (k, n) at B[k*ldb + n] when B_ROW, else
// at B[k + n*ldb]. K is a multiple of 16 (tiles are zero-padded).

template <typename T, int NF, bool A_COL, bool B_ROW> struct WarpTile {
    using LA = typename std::conditional<A_COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
    using LB = typename std::conditional<B_ROW, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[NF];

    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int f = 0; f < NF; ++f) nvcuda::wmma::fill_fragment(c[f], 0.f);
    }

    __device__ __forceinline__ void mma(const T* A, int lda, const T* B, int ldb, int K) {
        for (int k = 0; k < K; k += 16) {
            nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, LA> a;
            nvcuda::wmma::load_matrix_sync(a, A_COL ? A + k * lda : A + k, lda);
#pragma unroll
            for (int f = 0; f < NF; ++f) {
                nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, LB> b;
                nvcuda::wmma::load_matrix_sync(b, B_ROW ? B + k * ldb + 16 * f : B + k + 16 * f * ldb,
                                               ldb);
                nvcuda::wmma::mma_sync(c[f], a, b, c[f]);
            }
        }
    }

    // Row-major f32 [16][16·NF] at C (leading dimension ldc, a multiple of 4).
    __device__ __forceinline__ void store(float* C, int ldc) {
#pragma unroll
        for (int f = 0; f < NF; ++f)
            nvcuda::wmma::store_matrix_sync(C + 16 * f, c[f], ldc, nvcuda::wmma::mem_row_major);
    }
};

// f32: CUDA-core FMA. Lane l owns column 16f + (l & 15) of every column block
// f and rows (l >> 4) + 2i, i < 8: the same 8·NF values per lane as wmma.
template <int NF, bool A_COL, bool B_ROW> struct WarpTile<float, NF, A_COL, B_ROW> {
    float c[NF][8];

    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int f = 0; f < NF; ++f)
#pragma unroll
            for (int i = 0; i < 8; ++i) c[f][i] = 0.f;
    }

    __device__ __forceinline__ void mma(const float* A, int lda, const float* B, int ldb, int K) {
        const int lane = threadIdx.x & 31, cn = lane & 15, r0 = lane >> 4;
        for (int k = 0; k < K; ++k) {
            float a[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = A_COL ? A[(r0 + 2 * i) + k * lda] : A[(r0 + 2 * i) * lda + k];
#pragma unroll
            for (int f = 0; f < NF; ++f) {
                const int n = 16 * f + cn;
                const float b = B_ROW ? B[k * ldb + n] : B[k + n * ldb];
#pragma unroll
                for (int i = 0; i < 8; ++i) c[f][i] = fmaf(a[i], b, c[f][i]);
            }
        }
    }

    __device__ __forceinline__ void store(float* C, int ldc) {
        const int lane = threadIdx.x & 31, cn = lane & 15, r0 = lane >> 4;
#pragma unroll
        for (int f = 0; f < NF; ++f)
#pragma unroll
            for (int i = 0; i < 8; ++i) C[(r0 + 2 * i) * ldc + 16 * f + cn] = c[f][i];
    }
};

// Writes out[row, j0 + jj] = base + mul·(Cs[i][jj] + add[j0 + jj]) for the
// 64×NC chunk at rows row0.. of [nrows, d] matrices, where base is
// `plus[row, col]` (or 0 when plus is null) and add may be null.
template <typename T, bool VEC>
__device__ __forceinline__ void store_rows(T* __restrict__ out, const T* __restrict__ plus,
                                           const T* __restrict__ add, const float* Cs, int ldc,
                                           float mul, long long row0, int j0, long long nrows,
                                           int d) {
    if constexpr (VEC) {
        constexpr int G = NC / 8;
        for (int e = threadIdx.x; e < BT * G; e += THREADS) {
            const int i = e / G, jj = (e % G) * 8;
            const long long row = row0 + i;
            const int col = j0 + jj;
            if (row >= nrows || col >= d) continue;
            float base[8], o[8];
            if (plus) {
                load_f32<T, 8>(plus + row * d + col, base);
            } else {
#pragma unroll
                for (int q = 0; q < 8; ++q) base[q] = 0.f;
            }
#pragma unroll
            for (int q = 0; q < 8; ++q)
                o[q] = base[q] + mul * (Cs[i * ldc + jj + q] + (add ? to_f32(add[col + q]) : 0.f));
            store_f32<T, 8>(out + row * d + col, o);
        }
    } else {
        for (int e = threadIdx.x; e < BT * NC; e += THREADS) {
            const int i = e / NC, jj = e % NC;
            const long long row = row0 + i;
            const int col = j0 + jj;
            if (row >= nrows || col >= d) continue;
            const float base = plus ? to_f32(plus[row * d + col]) : 0.f;
            out[row * d + col] =
                from_f32<T>(base + mul * (Cs[i * ldc + jj] + (add ? to_f32(add[col]) : 0.f)));
        }
    }
}

// ---- kernels -------------------------------------------------------------------

// res: the residual added to the output (x itself for adapters, the base
// layer's output for LoRA).
template <typename T, int NF, bool VEC>
__device__ void fwd(const T* __restrict__ x, const T* __restrict__ p, const T* __restrict__ res,
                    T* __restrict__ y, float* __restrict__ hout, long long nrows, int m, int n,
                    int r, float scale, int act, int bias) {
    using L = Plan<T, NF>;
    constexpr int RP = L::RP;
    extern __shared__ __align__(128) unsigned char smem[];
    if (dynamic_smem() < (unsigned)L::FWD) __trap();
    T* Xs = reinterpret_cast<T*>(smem);
    T* Ws = reinterpret_cast<T*>(smem + rnd(BT * L::LK * L::S));
    float* Hs = reinterpret_cast<float*>(smem);
    T* Wus = reinterpret_cast<T*>(smem);
    float* Cs = reinterpret_cast<float*>(smem + rnd(NC * L::LR * L::S));
    T* Zs = reinterpret_cast<T*>(smem + L::FWD_R1);

    const int warp = threadIdx.x >> 5;
    const long long row0 = (long long)blockIdx.x * BT;
    const T* wd = p;
    const T* bd = bias ? p + (long long)r * m : nullptr;
    const T* wu = p + (long long)r * m + (bias ? r : 0);
    const T* bu = bias ? wu + (long long)n * r : nullptr;

    // h = x·W_dᵀ over chunks of m.
    WarpTile<T, NF, false, false> acc;
    acc.clear();
    for (int k0 = 0; k0 < m; k0 += KC) {
        __syncthreads();
        load_tile<T, VEC, BT, KC>(Xs, L::LK, x, m, row0, k0, nrows, m);
        load_tile<T, VEC, RP, KC>(Ws, L::LK, wd, m, 0, k0, r, m);
        __syncthreads();
        acc.mma(Xs + warp * 16 * L::LK, L::LK, Ws, L::LK, KC);
    }
    __syncthreads();
    acc.store(Hs + warp * 16 * L::LH, L::LH);
    __syncthreads();
    // + b_d, saved for the backward; z = act(h) stays on chip.
    for (int e = threadIdx.x; e < BT * RP; e += THREADS) {
        const int i = e / RP, k = e % RP;
        const long long row = row0 + i;
        float z = 0.f;
        if (row < nrows) {
            const float hv = k < r ? Hs[i * L::LH + k] + (bd ? to_f32(bd[k]) : 0.f) : 0.f;
            hout[row * RP + k] = hv;
            if (k < r) z = act_f(act, hv);
        }
        Zs[i * L::LR + k] = from_f32<T>(z);
    }
    // y = res + s·(z·W_uᵀ + b_u), NC columns at a time.
    for (int j0 = 0; j0 < n; j0 += NC) {
        __syncthreads();
        load_tile<T, VEC, NC, RP>(Wus, L::LR, wu, r, j0, 0, n, r);
        __syncthreads();
        WarpTile<T, NC / 16, false, false> out;
        out.clear();
        out.mma(Zs + warp * 16 * L::LR, L::LR, Wus, L::LR, RP);
        out.store(Cs + warp * 16 * L::LC, L::LC);
        __syncthreads();
        store_rows<T, VEC>(y, res, bu, Cs, L::LC, scale, row0, j0, nrows, n);
    }
}

// dx gets + dy when res_is_x. gacc: f32 gradients laid out like p (db_d here).
template <typename T, int NF, bool VEC>
__device__ void bwd_rows(const T* __restrict__ dy, const T* __restrict__ p,
                         const float* __restrict__ h, T* __restrict__ dx, T* __restrict__ dh,
                         float* __restrict__ gacc, long long nrows, int m, int n, int r,
                         float scale, int act, int res_is_x, int bias) {
    using L = Plan<T, NF>;
    constexpr int RP = L::RP;
    extern __shared__ __align__(128) unsigned char smem[];
    if (dynamic_smem() < (unsigned)L::ROWS) __trap();
    T* Ys = reinterpret_cast<T*>(smem);
    T* Wt = reinterpret_cast<T*>(smem + rnd(BT * L::LK * L::S));
    float* Stg = reinterpret_cast<float*>(smem);
    T* Wds = reinterpret_cast<T*>(smem);
    float* Cs = reinterpret_cast<float*>(smem + rnd(RP * L::LN * L::S));
    T* Ds = reinterpret_cast<T*>(smem + L::ROWS_R1);

    const int warp = threadIdx.x >> 5;
    const long long row0 = (long long)blockIdx.x * BT;
    const T* wd = p;
    const T* wu = p + (long long)r * m + (bias ? r : 0);

    // dy·W_u over chunks of n (B row-major: W_u rows j, columns k).
    WarpTile<T, NF, false, true> acc;
    acc.clear();
    for (int k0 = 0; k0 < n; k0 += KC) {
        __syncthreads();
        load_tile<T, VEC, BT, KC>(Ys, L::LK, dy, n, row0, k0, nrows, n);
        load_tile<T, VEC, KC, RP>(Wt, L::LR, wu, r, k0, 0, n, r);
        __syncthreads();
        acc.mma(Ys + warp * 16 * L::LK, L::LK, Wt, L::LR, KC);
    }
    __syncthreads();
    acc.store(Stg + warp * 16 * L::LH, L::LH);
    __syncthreads();
    // dh = s·(dy·W_u) ⊙ act'(h)
    for (int e = threadIdx.x; e < BT * RP; e += THREADS) {
        const int i = e / RP, k = e % RP;
        const long long row = row0 + i;
        float g = 0.f;
        if (row < nrows && k < r) g = scale * Stg[i * L::LH + k] * act_df(act, h[row * RP + k]);
        Stg[i * L::LH + k] = g;
        Ds[i * L::LR + k] = from_f32<T>(g);
        if (row < nrows) dh[row * RP + k] = from_f32<T>(g);
    }
    __syncthreads();
    float* dbd = gacc + (long long)r * m;
    for (int k = threadIdx.x; bias && k < r; k += THREADS) {
        float sum = 0.f;
        for (int i = 0; i < BT; ++i) sum += Stg[i * L::LH + k];
        atomicAdd(dbd + k, sum);
    }
    // dx = dh·W_d (+ dy), NC columns of m at a time (B row-major: W_d rows k).
    for (int j0 = 0; j0 < m; j0 += NC) {
        __syncthreads();
        load_tile<T, VEC, RP, NC>(Wds, L::LN, wd, m, 0, j0, r, m);
        __syncthreads();
        WarpTile<T, NC / 16, false, true> out;
        out.clear();
        out.mma(Ds + warp * 16 * L::LR, L::LR, Wds, L::LN, RP);
        out.store(Cs + warp * 16 * L::LC, L::LC);
        __syncthreads();
        // res_is_x implies n == m.
        store_rows<T, VEC>(dx, res_is_x ? dy : nullptr, nullptr, Cs, L::LC, 1.f, row0, j0, nrows,
                           m);
    }
}

// Block (bx, by): columns [64·bx, 64·bx + 64) of n (for dW_u, db_u) and of m
// (for dW_d), rows [by·rows_per, (by+1)·rows_per).
template <typename T, int NF, bool VEC>
__device__ void bwd_weights(const T* __restrict__ x, const T* __restrict__ dy,
                            const float* __restrict__ h, const T* __restrict__ dh,
                            float* __restrict__ gacc, long long nrows, int m, int n, int r,
                            float scale, int act, long long rows_per, int bias) {
    using L = Plan<T, NF>;
    constexpr int RP = L::RP;
    extern __shared__ __align__(128) unsigned char smem[];
    if (dynamic_smem() < (unsigned)L::WEIGHTS) __trap();
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = reinterpret_cast<T*>(smem + rnd(KT * L::LN * L::S));
    float* Stg = reinterpret_cast<float*>(smem);

    const int warp = threadIdx.x >> 5;
    const int j0 = blockIdx.x * NC;
    const long long t_begin = (long long)blockIdx.y * rows_per;
    const long long t_end = t_begin + rows_per < nrows ? t_begin + rows_per : nrows;
    float* dwd = gacc;
    float* dwu = gacc + (long long)r * m + (bias ? r : 0);
    float* dbu = dwu + (long long)n * r;
    float bsum = 0.f;

    // pass 0: dW_u[j][k] = s·Σ_t dy[t][j]·z[t][k]; pass 1: dW_d[k][j] = Σ_t x[t][j]·dh[t][k].
    for (int pass = 0; pass < 2; ++pass) {
        const int d = pass == 0 ? n : m;  // the columns this pass reduces
        if (j0 >= d) continue;            // uniform over the block
        WarpTile<T, NF, true, true> acc;
        acc.clear();
        for (long long t0 = t_begin; t0 < t_end; t0 += KT) {
            __syncthreads();
            load_tile<T, VEC, KT, NC>(As, L::LN, pass == 0 ? dy : x, d, t0, j0, t_end, d);
            if (pass == 0) {
                for (int e = threadIdx.x; e < KT * RP; e += THREADS) {
                    const int i = e / RP, k = e % RP;
                    const long long row = t0 + i;
                    const float z = (row < t_end && k < r) ? act_f(act, h[row * RP + k]) : 0.f;
                    Bs[i * L::LR + k] = from_f32<T>(z);
                }
            } else {
                load_tile<T, true, KT, RP>(Bs, L::LR, dh, RP, t0, 0, t_end, RP);
            }
            __syncthreads();
            if (pass == 0 && threadIdx.x < NC)
                for (int i = 0; i < KT; ++i) bsum += to_f32(As[i * L::LN + threadIdx.x]);
            acc.mma(As + warp * 16, L::LN, Bs, L::LR, KT);
        }
        __syncthreads();
        acc.store(Stg + warp * 16 * L::LH, L::LH);
        __syncthreads();
        if (pass == 0) {
            for (int e = threadIdx.x; e < NC * RP; e += THREADS) {
                const int jj = e / RP, k = e % RP;
                if (j0 + jj < d && k < r)
                    atomicAdd(dwu + (long long)(j0 + jj) * r + k, scale * Stg[jj * L::LH + k]);
            }
        } else {
            for (int e = threadIdx.x; e < NC * RP; e += THREADS) {
                const int k = e / NC, jj = e % NC;
                if (j0 + jj < d && k < r)
                    atomicAdd(dwd + (long long)k * d + j0 + jj, Stg[jj * L::LH + k]);
            }
        }
    }
    if (bias && threadIdx.x < NC && j0 + (int)threadIdx.x < n)
        atomicAdd(dbu + j0 + threadIdx.x, scale * bsum);
}

}  // namespace tfa

#define TF_ADAPTER(T, SFX, NF, VEC)                                                              \
    extern "C" __global__ void __launch_bounds__(tfa::THREADS)                                   \
        adapter_fwd_##SFX##_nf##NF##_v##VEC(const T* x, const T* p, const T* res, T* y,          \
                                              float* h, long long nrows, int m, int n, int r,    \
                                              float scale, int act, int bias) {                  \
        tfa::fwd<T, NF, VEC>(x, p, res, y, h, nrows, m, n, r, scale, act, bias);                 \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(tfa::THREADS)                                   \
        adapter_bwd_rows_##SFX##_nf##NF##_v##VEC(const T* dy, const T* p, const float* h, T* dx, \
                                                   T* dh, float* gacc, long long nrows, int m,   \
                                                   int n, int r, float scale, int act,           \
                                                   int res_is_x, int bias) {                     \
        tfa::bwd_rows<T, NF, VEC>(dy, p, h, dx, dh, gacc, nrows, m, n, r, scale, act, res_is_x,  \
                                  bias);                                                         \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(tfa::THREADS)                                   \
        adapter_bwd_weights_##SFX##_nf##NF##_v##VEC(const T* x, const T* dy, const float* h,     \
                                                      const T* dh, float* gacc, long long nrows, \
                                                      int m, int n, int r, float scale, int act, \
                                                      long long rows_per, int bias) {            \
        tfa::bwd_weights<T, NF, VEC>(x, dy, h, dh, gacc, nrows, m, n, r, scale, act, rows_per,   \
                                     bias);                                                      \
    }

#define TF_ADAPTER_NF(T, SFX, NF) \
    TF_ADAPTER(T, SFX, NF, 0)     \
    TF_ADAPTER(T, SFX, NF, 1)

#define TF_ADAPTER_ALL(T, SFX)                                                                   \
    TF_ADAPTER_NF(T, SFX, 1)                                                                     \
    TF_ADAPTER_NF(T, SFX, 2)                                                                     \
    TF_ADAPTER_NF(T, SFX, 4)                                                                     \
    TF_ADAPTER_NF(T, SFX, 8)                                                                     \
    TF_ADAPTER_NF(T, SFX, 16)                                                                    \
    extern "C" __global__ void adapter_cast_##SFX(const float* src, T* dst, long long n) {       \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;              \
             i += (long long)gridDim.x * blockDim.x)                                             \
            dst[i] = tf::from_f32<T>(src[i]);                                                    \
    }                                                                                            \
    /* The activation alone, elementwise (src/ops/adapter.rs, activation): */                    \
    /* y = act(x), and dx = g * act'(x), in f32, rounded once. */                                \
    extern "C" __global__ void act_fwd_##SFX(const T* __restrict__ x, T* __restrict__ y,         \
                                             long long n, int act) {                             \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;              \
             i += (long long)gridDim.x * blockDim.x)                                             \
            y[i] = tf::from_f32<T>(tfa::act_f(act, tf::to_f32(x[i])));                              \
    }                                                                                            \
    extern "C" __global__ void act_bwd_##SFX(const T* __restrict__ x, const T* __restrict__ g,   \
                                             T* __restrict__ dx, long long n, int act) {         \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;              \
             i += (long long)gridDim.x * blockDim.x)                                             \
            dx[i] = tf::from_f32<T>(tf::to_f32(g[i]) * tfa::act_df(act, tf::to_f32(x[i])));        \
    }

TF_ADAPTER_ALL(float, f32)
TF_ADAPTER_ALL(__half, f16)
TF_ADAPTER_ALL(__nv_bfloat16, bf16)
