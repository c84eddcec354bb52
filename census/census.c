/*
 * The step census: counts every call a tunefuse `cuda` binary makes into the
 * CUDA driver, runtime, cuBLAS and cuRAND, so that the GPU work of a training
 * step (kernel launches, memsets, copies, allocations, events,
 * synchronisations, library calls) can be counted exactly.
 *
 * One source, two builds (scripts/step-census.sh builds both):
 *
 *   -DCENSUS_STANDIN  a stand-in for the libraries on a machine without a GPU.
 *                     Allocations are zero-filled host memory, copies and
 *                     memsets are real memcpy/memset, kernel launches and
 *                     cuBLAS/cuRAND calls do nothing. Numerics are
 *                     meaningless; the counts are what the real driver sees
 *                     as long as no control flow depends on values read back
 *                     from the device (every such read is itself counted as
 *                     a device-to-host copy).
 *   (default)         an interposer for a machine with a GPU: each function
 *                     counts, then calls the real one (dlsym RTLD_NEXT). Run
 *                     with LD_PRELOAD. It sees only calls made through the
 *                     dynamic symbols: cuBLAS's own kernels are launched
 *                     inside cuBLAS and are counted as one cuBLAS call, the
 *                     same as in the stand-in.
 *
 * Either way the library is LD_PRELOADed, and the process reads the running
 * totals through tunefuse_census_json(); the difference of two readings is
 * the census of what ran between them.
 *
 * Only the functions a tunefuse binary imports are defined (the list is the
 * undefined dynamic symbols of the release binary: `nm -D --undefined-only`).
 * A function the stand-in cannot honestly emulate (it would have to invent a
 * kernel's attributes) fails with "not supported" and is counted under
 * "unsupported", so a run that needs it is visible, never silently wrong.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext, *CUstream, *CUevent, *CUfunction, *CUmodule;
typedef int cudaError_t;
typedef void *cudaStream_t;
typedef int cublasStatus_t;
typedef void *cublasHandle_t;
typedef int curandStatus_t;
typedef void *curandGenerator_t;
typedef void *cublasLtHandle_t, *cublasLtMatmulDesc_t, *cublasLtMatrixLayout_t, *cublasLtMatmulPreference_t;
typedef struct {
  uint64_t data[8];
} cublasLtMatmulAlgo_t;
typedef struct {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  int state;
  float wavesCount;
  int reserved[4];
} cublasLtMatmulHeuristicResult_t;
typedef struct {
  unsigned x, y, z;
} dim3;

/* What each call is, for the per-step table. "gpu ops" in the report are
 * kernels + memsets + copies + cuBLAS + cuRAND calls. */
#define CATEGORIES(X)                                                          \
  X(kernels) X(memsets) X(htod) X(dtoh) X(dtod) X(allocs) X(frees) X(events)   \
  X(syncs) X(cublas) X(curand) X(modules) X(graphs) X(graph_nodes)           \
  X(capture_errors) X(unsupported) X(other)
enum category {
#define X(c) CAT_##c,
  CATEGORIES(X)
#undef X
      NCAT
};
static const char *category_names[] = {
#define X(c) #c,
    CATEGORIES(X)
#undef X
};

#define SYMBOLS(X)                                                             \
  X(cuInit, other) X(cuDeviceGet, other) X(cuDeviceGetAttribute, other)        \
  X(cuDeviceGetName, other) X(cuDevicePrimaryCtxRetain, other)                 \
  X(cuDevicePrimaryCtxRelease_v2, other) X(cuCtxSetCurrent, other)             \
  X(cuCtxGetCurrent, other) X(cuCtxDestroy_v2, other) X(cuEventCreate, events) \
  X(cuEventDestroy_v2, events) X(cuEventRecord, events)                        \
  X(cuStreamWaitEvent, events) X(cuStreamSynchronize, syncs)                   \
  X(cuStreamDestroy_v2, other) X(cuStreamIsCapturing, other)                   \
  X(cuStreamBeginCapture_v2, other) X(cuStreamEndCapture, other)               \
  X(cuGraphInstantiateWithFlags, other) X(cuGraphLaunch, graphs)               \
  X(cuGraphUpload, other) X(cuGraphExecDestroy, other) X(cuGraphDestroy, other) \
  X(cuFuncSetAttribute, other) X(cuGetErrorString, other)                      \
  X(cuLaunchKernel, kernels) X(cuMemAllocAsync, allocs)                        \
  X(cuMemAlloc_v2, allocs) X(cuMemFreeAsync, frees) X(cuMemFree_v2, frees)     \
  X(cuMemcpyDtoDAsync_v2, dtod) X(cuMemcpyDtoHAsync_v2, dtoh)                  \
  X(cuMemcpyHtoDAsync_v2, htod) X(cuMemcpyPeerAsync, dtod)                     \
  X(cuMemsetD8Async, memsets) X(cuModuleGetFunction, modules)                  \
  X(cuModuleLoad, modules) X(cuModuleLoadData, modules)                        \
  X(cuModuleUnload, modules) X(cublasCreate_v2, other)                         \
  X(cublasDestroy_v2, other) X(cublasSetStream_v2, other)                      \
  X(cublasSetWorkspace_v2, other)                                              \
  X(cublasGemmStridedBatchedEx, cublas) X(cublasDgemmStridedBatched, cublas)   \
  X(cublasLtCreate, other) X(cublasLtDestroy, other)                           \
  X(cublasLtMatrixLayoutCreate, other) X(cublasLtMatrixLayoutDestroy, other)   \
  X(cublasLtMatrixLayoutSetAttribute, other)                                   \
  X(cublasLtMatmulDescCreate, other) X(cublasLtMatmulDescDestroy, other)       \
  X(cublasLtMatmulDescSetAttribute, other)                                     \
  X(cublasLtMatmulPreferenceCreate, other)                                     \
  X(cublasLtMatmulPreferenceDestroy, other)                                    \
  X(cublasLtMatmulPreferenceSetAttribute, other)                               \
  X(cublasLtMatmulAlgoGetHeuristic, other) X(cublasLtMatmul, cublas)           \
  X(cudaDeviceGetAttribute, other) X(cudaFree, frees)                          \
  X(cudaFreeAsync_ptsz, frees) X(cudaFuncGetAttributes, other)                 \
  X(cudaFuncSetAttribute, other) X(cudaGetDevice, other)                       \
  X(cudaGetDeviceCount, other) X(cudaGetErrorName, other)                      \
  X(cudaGetErrorString, other) X(cudaGetLastError, other)                      \
  X(cudaMalloc, allocs) X(cudaMallocAsync_ptsz, allocs)                        \
  X(cudaMemsetAsync_ptsz, memsets)                                             \
  X(cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags, other)             \
  X(cudaPeekAtLastError, other) X(cudaSetDevice, other)                        \
  X(cudaStreamSynchronize_ptsz, syncs) X(curandCreateGenerator, other)         \
  X(curandDestroyGenerator, other) X(curandGenerateNormal, curand)             \
  X(curandGenerateNormalDouble, curand) X(curandGenerateUniform, curand)       \
  X(curandGenerateUniformDouble, curand)                                       \
  X(curandSetPseudoRandomGeneratorSeed, other) X(curandSetStream, other)      \
  X(__cudaRegisterFatBinary, modules) X(__cudaRegisterFatBinaryEnd, modules)   \
  X(__cudaUnregisterFatBinary, modules) X(__cudaRegisterFunction, modules)     \
  X(__cudaRegisterVar, modules) X(__cudaGetKernel, other)                      \
  X(__cudaPushCallConfiguration, other) X(__cudaPopCallConfiguration, other)   \
  X(__cudaLaunchKernel_ptsz, kernels)

enum symbol {
#define X(s, c) SYM_##s,
  SYMBOLS(X)
#undef X
      NSYM
};
static const char *symbol_names[] = {
#define X(s, c) #s,
    SYMBOLS(X)
#undef X
};
static const enum category symbol_category[] = {
#define X(s, c) CAT_##c,
    SYMBOLS(X)
#undef X
};

static uint64_t calls[NSYM];
static uint64_t unsupported_calls;
/* Bytes moved by copies and memsets, and the FLOPs cuBLAS was asked for. */
static uint64_t bytes_htod, bytes_dtoh, bytes_dtod, bytes_memset, gemm_flops;
/* Nanoseconds spent inside this library (and, interposed, in the real
 * functions it calls): the caller's host time is the wall time minus this. */
static uint64_t inside_ns;

static inline void add(uint64_t *c, uint64_t v) {
  __atomic_fetch_add(c, v, __ATOMIC_RELAXED);
}
static inline uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}
static inline uint64_t enter(void) { return now_ns(); }

/* Stream capture (CUDA graphs). While a capture is active the GPU
 * operations the process asks for are recorded into the graph, not run;
 * they are counted as calls as usual and also as graph nodes, so the
 * census shows both what a capture recorded and that a replayed step asks
 * for one graph launch. The state follows cuStreamBeginCapture_v2 and
 * cuStreamEndCapture in both builds; the values are the driver's
 * CUstreamCaptureStatus (none, active, invalidated). The process captures
 * on its one stream, so one state is enough. */
static int capture_state;
static uint64_t graph_nodes, capture_errors;
static inline int gpu_op(enum category c) {
  return c == CAT_kernels || c == CAT_memsets || c == CAT_htod || c == CAT_dtoh || c == CAT_dtod ||
         c == CAT_cublas || c == CAT_curand;
}
static inline void leave(enum symbol s, uint64_t t0) {
  add(&calls[s], 1);
  if (__atomic_load_n(&capture_state, __ATOMIC_ACQUIRE) && gpu_op(symbol_category[s])) add(&graph_nodes, 1);
  add(&inside_ns, now_ns() - t0);
}

/* Kernel launches by function name. A function handle (the stand-in's own,
 * or the real driver's) maps to its entry through an open-addressing table;
 * entries are only ever added. */
#define MAX_FUNCS 8192
#define MAX_PARAMS 64
struct func {
  const void *handle;
  const void *module;
  char name[160];
  uint64_t launches;
  /* The byte size of each parameter, from the module's PTX (see
   * parse_ptx); nparams < 0 while unknown. */
  int nparams;
  uint32_t psize[MAX_PARAMS];
};
static struct func funcs[MAX_FUNCS];
static size_t nfuncs;
static struct func *by_handle[2 * MAX_FUNCS];
static pthread_mutex_t funcs_lock = PTHREAD_MUTEX_INITIALIZER;
static struct func unknown_func = {0, 0, "(function not seen at cuModuleGetFunction)", 0, -1, {0}};

static size_t slot_of(const void *h) {
  uint64_t x = (uint64_t)(uintptr_t)h;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return (size_t)(x % (2 * MAX_FUNCS));
}

/* Registers `name` of `module` under `handle` (stand-in: handle 0 asks for
 * the entry itself as the handle; one entry per module and name, as the
 * driver returns one handle per module and name). */
static struct func *register_func(const void *handle, const void *module, const char *name) {
  pthread_mutex_lock(&funcs_lock);
  struct func *f = NULL;
  if (!handle) {
    for (size_t i = 0; i < nfuncs; i++)
      if (funcs[i].module == module && strncmp(funcs[i].name, name, sizeof funcs[i].name - 1) == 0)
        f = &funcs[i];
  } else {
    for (size_t s = slot_of(handle);; s = (s + 1) % (2 * MAX_FUNCS)) {
      if (!by_handle[s]) break;
      if (by_handle[s]->handle == handle) { f = by_handle[s]; break; }
    }
  }
  if (!f && nfuncs < MAX_FUNCS) {
    f = &funcs[nfuncs++];
    f->module = module;
    f->nparams = -1;
    snprintf(f->name, sizeof f->name, "%s", name ? name : "?");
    f->handle = handle ? handle : (const void *)f;
    size_t s = slot_of(f->handle);
    while (by_handle[s]) s = (s + 1) % (2 * MAX_FUNCS);
    by_handle[s] = f;
  }
  pthread_mutex_unlock(&funcs_lock);
  return f ? f : &unknown_func;
}

static struct func *func_of(const void *handle) {
  pthread_mutex_lock(&funcs_lock);
  struct func *f = &unknown_func;
  for (size_t s = slot_of(handle);; s = (s + 1) % (2 * MAX_FUNCS)) {
    if (!by_handle[s]) break;
    if (by_handle[s]->handle == handle) { f = by_handle[s]; break; }
  }
  pthread_mutex_unlock(&funcs_lock);
  return f;
}

/* A developer's aid for finding where launches come from: with
 * TUNEFUSE_CENSUS_TRACE set to a substring, every kernel launch whose function
 * name contains it, and every memset or host-to-device copy when it is
 * "memset" or "htod", prints its call
 * stack to stderr as offsets into the binary ("tunefuse(+0x...)"), which
 * `addr2line -f -C -e BINARY OFFSET...` turns into function names. Counting
 * is unchanged. */
static void trace(const char *what) {
  static const char *want;
  static int ready;
  if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {
    want = getenv("TUNEFUSE_CENSUS_TRACE");
    __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
  }
  if (!want || !*want || !strstr(what, want)) return;
  void *frames[64];
  int n = backtrace(frames, 64);
  fprintf(stderr, "census trace: %s\n", what);
  backtrace_symbols_fd(frames, n, 2);
}

/* ------------------------------------------------------------------------ */
/* Kernel arguments, for what a CUDA graph would bake in. A captured graph
 * replays every kernel with the arguments it had at capture; an argument
 * that changes from one step to the next (a Philox offset, a learning rate,
 * a step count) makes the replay wrong unless it is read from device memory
 * instead. Device addresses are exempt: inside a capture the step's
 * allocations are the graph's own and keep their addresses.
 *
 * So each launch is logged with its arguments' bytes, and each 8-byte
 * aligned word that lies inside a live device allocation is written as
 * "pppppppppppppppp" instead of its value: two steps of one batch shape then
 * log the same text exactly where a replay would be right. The sizes of the
 * arguments come from the PTX that cuModuleLoadData receives (the `.param`
 * list of each `.entry`); a kernel loaded otherwise (a cubin, or compiled
 * into the binary and launched through the runtime) is logged with unknown
 * arguments. What this does not see: cuBLAS's own kernels and its scalars
 * (alpha, beta), memset values and the contents of host-to-device copies
 * (the batch upload, which a graph takes from static buffers). */

/* Parameter sizes per (module, entry), as parsed. */
struct entry {
  const void *module;
  char name[160];
  int n;
  uint32_t size[MAX_PARAMS];
};
static struct entry *entries;
static size_t nentries, entries_cap;
static pthread_mutex_t entries_lock = PTHREAD_MUTEX_INITIALIZER;

/* Bytes of a PTX parameter type (.b8 … .u64, .f16 … .f64), 0 if not one. */
static uint32_t ptx_type_bytes(const char *t, size_t n) {
  if (n < 3 || t[0] != '.' || !strchr("bufs", t[1])) return 0;
  int bits = 0;
  for (size_t i = 2; i < n; i++) {
    if (t[i] < '0' || t[i] > '9') return 0;
    bits = bits * 10 + (t[i] - '0');
  }
  return bits == 8 || bits == 16 || bits == 32 || bits == 64 ? (uint32_t)bits / 8 : 0;
}

/* Reads the parameter list of every `.entry` in a PTX text. Each parameter
 * is `.param [.ptr] [.global] [.align N] .TYPE NAME[COUNT]`; anything else
 * leaves the entry's sizes unknown (n = -1). */
static void parse_ptx(const void *module, const void *image) {
  const char *p = image;
  if (!p || memcmp(p, "\x7f" "ELF", 4) == 0 || !strstr(p, ".entry")) return;
  pthread_mutex_lock(&entries_lock);
  for (const char *s = p; (s = strstr(s, ".entry"));) {
    s += 6;
    if (*s != ' ' && *s != '\t') continue;
    while (*s == ' ' || *s == '\t') s++;
    const char *name = s;
    while (*s && *s != '(' && *s != ' ' && *s != '\t' && *s != '\n' && *s != '\r') s++;
    size_t name_len = (size_t)(s - name);
    const char *open = strchr(s, '('), *close = open ? strchr(open, ')') : NULL;
    if (!open || !close) break;
    if (nentries == entries_cap) {
      size_t cap = entries_cap ? 2 * entries_cap : 1024;
      struct entry *e = realloc(entries, cap * sizeof *e);
      if (!e) break;
      entries = e, entries_cap = cap;
    }
    struct entry *e = &entries[nentries++];
    memset(e, 0, sizeof *e);
    e->module = module;
    snprintf(e->name, sizeof e->name, "%.*s", (int)name_len, name);
    for (const char *q = open + 1; q < close && e->n >= 0;) {
      const char *param = strstr(q, ".param");
      if (!param || param >= close) break;
      q = param + 6;
      uint32_t bytes = 0, count = 1;
      /* Tokens up to the comma or the closing parenthesis. */
      while (q < close && *q != ',') {
        while (q < close && (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')) q++;
        const char *t = q;
        while (q < close && *q != ' ' && *q != '\t' && *q != '\n' && *q != '\r' && *q != ',') q++;
        size_t n = (size_t)(q - t);
        if (!n) continue;
        uint32_t b = ptx_type_bytes(t, n);
        if (b) bytes = b;
        else if (t[0] != '.' && memchr(t, '[', n)) count = (uint32_t)strtoul((const char *)memchr(t, '[', n) + 1, NULL, 10);
      }
      if (q < close) q++;
      if (!bytes || !count || e->n >= MAX_PARAMS) e->n = -1;
      else e->size[e->n++] = bytes * count;
    }
    s = close;
  }
  pthread_mutex_unlock(&entries_lock);
}

/* Gives f the parameter sizes parsed for (module, name), or unknown sizes
 * when there are none (a handle the driver reuses for another function
 * must not keep the old one's). The shared entry of functions the table has
 * no room for stays unknown. */
static void learn_params(struct func *f, const void *module, const char *name) {
  if (f == &unknown_func) return;
  __atomic_store_n(&f->nparams, -1, __ATOMIC_RELEASE);
  pthread_mutex_lock(&entries_lock);
  for (size_t i = nentries; i-- > 0;)
    if (entries[i].module == module && strncmp(entries[i].name, name, sizeof entries[i].name - 1) == 0) {
      if (entries[i].n >= 0) {
        memcpy(f->psize, entries[i].size, sizeof f->psize);
        __atomic_store_n(&f->nparams, entries[i].n, __ATOMIC_RELEASE);
      }
      break;
    }
  pthread_mutex_unlock(&entries_lock);
}

/* Live device allocations, sorted by start address. */
struct range {
  uint64_t lo, hi;
};
static struct range *ranges;
static size_t nranges, ranges_cap;
static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;

/* The first range whose start is above v. */
static size_t range_after(uint64_t v) {
  size_t lo = 0, hi = nranges;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (ranges[mid].lo <= v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
static void range_add(uint64_t p, size_t n) {
  pthread_mutex_lock(&ranges_lock);
  if (nranges == ranges_cap) {
    size_t cap = ranges_cap ? 2 * ranges_cap : 4096;
    struct range *r = realloc(ranges, cap * sizeof *r);
    if (!r) { pthread_mutex_unlock(&ranges_lock); return; }
    ranges = r, ranges_cap = cap;
  }
  size_t i = range_after(p);
  memmove(&ranges[i + 1], &ranges[i], (nranges - i) * sizeof *ranges);
  ranges[i] = (struct range){p, p + (n ? n : 1)};
  nranges++;
  pthread_mutex_unlock(&ranges_lock);
}
static void range_remove(uint64_t p) {
  pthread_mutex_lock(&ranges_lock);
  size_t i = range_after(p);
  if (i > 0 && ranges[i - 1].lo == p) {
    memmove(&ranges[i - 1], &ranges[i], (nranges - i) * sizeof *ranges);
    nranges--;
  }
  pthread_mutex_unlock(&ranges_lock);
}
/* The start of the live allocation holding v, or 0. */
static uint64_t range_start_of(uint64_t v) {
  pthread_mutex_lock(&ranges_lock);
  size_t i = range_after(v);
  uint64_t lo = i > 0 && v < ranges[i - 1].hi ? ranges[i - 1].lo : 0;
  pthread_mutex_unlock(&ranges_lock);
  return lo;
}
static int is_device_address(uint64_t v) { return range_start_of(v) != 0; }

/* The launch log: a JSON array's elements, appended while logging is on
 * (from the first tunefuse_census_args call). */
static char *args_log;
static size_t args_len, args_cap;
static int args_on;
static pthread_mutex_t args_lock = PTHREAD_MUTEX_INITIALIZER;

static void args_put(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n <= 0) return;
  if (args_len + (size_t)n + 1 > args_cap) {
    size_t cap = args_cap ? args_cap : 1 << 20;
    while (args_len + (size_t)n + 1 > cap) cap *= 2;
    char *b = realloc(args_log, cap);
    if (!b) return;
    args_log = b, args_cap = cap;
  }
  va_start(ap, fmt);
  vsnprintf(args_log + args_len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  args_len += (size_t)n;
}

static void log_launch(const struct func *f, void **params) {
  if (!__atomic_load_n(&args_on, __ATOMIC_ACQUIRE)) return;
  int n = __atomic_load_n(&f->nparams, __ATOMIC_ACQUIRE);
  pthread_mutex_lock(&args_lock);
  args_put("%s{\"k\":\"", args_len ? "," : "");
  for (const char *c = f->name; *c; c++) args_put(*c == '"' || *c == '\\' ? "\\%c" : "%c", *c);
  if (n < 0 || !params) {
    args_put("\",\"p\":null}");
  } else {
    args_put("\",\"p\":[");
    for (int i = 0; i < n; i++) {
      const unsigned char *b = params[i];
      uint32_t size = f->psize[i];
      args_put("%s\"", i ? "," : "");
      for (uint32_t off = 0; off < size;) {
        uint64_t w;
        if (off % 8 == 0 && off + 8 <= size && (memcpy(&w, b + off, 8), is_device_address(w))) {
          args_put("pppppppppppppppp");
          off += 8;
        } else {
          args_put("%02x", b[off++]);
        }
      }
      args_put("\"");
    }
    args_put("]}");
  }
  pthread_mutex_unlock(&args_lock);
}

/* The launches logged since the last call, as a JSON array written into buf
 * (at most cap bytes, NUL-terminated), and the log emptied; returns the
 * length the array needs, and when that is more than cap writes and empties
 * nothing, so the caller can retry with a larger buffer. With buf NULL the
 * log is emptied unread. The first call turns logging on. */
size_t tunefuse_census_args(char *buf, size_t cap) {
  pthread_mutex_lock(&args_lock);
  size_t need = args_len + 3;
  if (!buf) {
    args_len = 0;
  } else if (need <= cap) {
    buf[0] = '[';
    if (args_len) memcpy(buf + 1, args_log, args_len);
    buf[args_len + 1] = ']';
    buf[args_len + 2] = 0;
    args_len = 0;
  }
  __atomic_store_n(&args_on, 1, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&args_lock);
  return need;
}

/* The running totals as one JSON object, written into buf (at most cap
 * bytes, NUL-terminated); returns the length the whole object needs, so a
 * caller whose buffer was too small can retry with a larger one. */
static size_t json_len;
static void put(char *buf, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  size_t room = json_len < cap ? cap - json_len : 0;
  int n = vsnprintf(room ? buf + json_len : NULL, room, fmt, ap);
  va_end(ap);
  if (n > 0) json_len += (size_t)n;
}

static void put_name(char *buf, size_t cap, const char *s) {
  put(buf, cap, "\"");
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') put(buf, cap, "\\%c", *s);
    else if ((unsigned char)*s < 0x20) put(buf, cap, "\\u%04x", *s);
    else put(buf, cap, "%c", *s);
  }
  put(buf, cap, "\"");
}

#ifdef CENSUS_STANDIN
#define MODE "stand-in"
#else
#define MODE "interposer"
#endif

size_t tunefuse_census_json(char *buf, size_t cap) {
  static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
  pthread_mutex_lock(&lock);
  json_len = 0;
  uint64_t cat[NCAT] = {0};
  for (int s = 0; s < NSYM; s++) cat[symbol_category[s]] += __atomic_load_n(&calls[s], __ATOMIC_RELAXED);
  cat[CAT_unsupported] = __atomic_load_n(&unsupported_calls, __ATOMIC_RELAXED);
  cat[CAT_graph_nodes] = __atomic_load_n(&graph_nodes, __ATOMIC_RELAXED);
  cat[CAT_capture_errors] = __atomic_load_n(&capture_errors, __ATOMIC_RELAXED);
  put(buf, cap, "{\"mode\":\"" MODE "\",\"inside_ns\":%llu,\"categories\":{",
      (unsigned long long)__atomic_load_n(&inside_ns, __ATOMIC_RELAXED));
  for (int c = 0; c < NCAT; c++)
    put(buf, cap, "%s\"%s\":%llu", c ? "," : "", category_names[c], (unsigned long long)cat[c]);
  put(buf, cap, "},\"bytes\":{\"htod\":%llu,\"dtoh\":%llu,\"dtod\":%llu,\"memset\":%llu},\"gemm_flops\":%llu,\"calls\":{",
      (unsigned long long)bytes_htod, (unsigned long long)bytes_dtoh, (unsigned long long)bytes_dtod,
      (unsigned long long)bytes_memset, (unsigned long long)gemm_flops);
  int first = 1;
  for (int s = 0; s < NSYM; s++) {
    uint64_t n = __atomic_load_n(&calls[s], __ATOMIC_RELAXED);
    if (!n) continue;
    put(buf, cap, "%s\"%s\":%llu", first ? "" : ",", symbol_names[s], (unsigned long long)n);
    first = 0;
  }
  put(buf, cap, "},\"kernels\":{");
  pthread_mutex_lock(&funcs_lock);
  first = 1;
  struct func *all[MAX_FUNCS + 1];
  size_t n = 0;
  for (size_t i = 0; i < nfuncs; i++) all[n++] = &funcs[i];
  all[n++] = &unknown_func;
  for (size_t i = 0; i < n; i++) {
    uint64_t l = __atomic_load_n(&all[i]->launches, __ATOMIC_RELAXED);
    if (!l) continue;
    /* The same kernel name in two modules (or loaded twice) is summed by
     * the reader; here each entry is written as it is. */
    put(buf, cap, "%s", first ? "" : ",");
    put_name(buf, cap, all[i]->name);
    put(buf, cap, ":%llu", (unsigned long long)l);
    first = 0;
  }
  pthread_mutex_unlock(&funcs_lock);
  put(buf, cap, "}}");
  size_t len = json_len;
  pthread_mutex_unlock(&lock);
  return len + 1;
}

__attribute__((unused)) static void unsupported(const char *what) {
  add(&unsupported_calls, 1);
  static __thread int said;
  if (!said) {
    fprintf(stderr, "tunefuse census stand-in: %s is not supported (the call fails; counted as unsupported)\n", what);
    said = 1;
  }
}

/* ------------------------------------------------------------------------ */
/* Each function: count, then either the stand-in body (which sets r) or the
 * real function. AFTER runs in both modes once r is known. */
#ifdef CENSUS_STANDIN
#define DEF(ret, name, params, args, standin, after)                          \
  ret name params {                                                          \
    uint64_t t0 = enter();                                                   \
    ret r;                                                                   \
    standin;                                                                 \
    after;                                                                   \
    leave(SYM_##name, t0);                                                   \
    return r;                                                                \
  }
#else
static void *real_symbol(const char *name) {
  void *p = dlsym(RTLD_NEXT, name);
  if (!p) {
    fprintf(stderr, "tunefuse census interposer: %s not found in the real libraries\n", name);
    abort();
  }
  return p;
}
#define DEF(ret, name, params, args, standin, after)                          \
  ret name params {                                                          \
    static ret(*real) params;                                                \
    if (!real) real = (ret(*) params)real_symbol(#name);                     \
    uint64_t t0 = enter();                                                   \
    ret r = real args;                                                       \
    after;                                                                   \
    leave(SYM_##name, t0);                                                   \
    return r;                                                                \
  }
#endif
#define NOTHING (void)0
/* For the functions that return nothing. */
#ifdef CENSUS_STANDIN
#define DEF_VOID(name, params, args, standin, after)                          \
  void name params {                                                         \
    uint64_t t0 = enter();                                                   \
    standin;                                                                 \
    after;                                                                   \
    leave(SYM_##name, t0);                                                   \
  }
#else
#define DEF_VOID(name, params, args, standin, after)                          \
  void name params {                                                         \
    static void(*real) params;                                               \
    if (!real) real = (void(*) params)real_symbol(#name);                    \
    uint64_t t0 = enter();                                                   \
    real args;                                                               \
    after;                                                                   \
    leave(SYM_##name, t0);                                                   \
  }
#endif

/* Device attributes the stand-in answers (an H100 SXM's, the card the
 * census is usually compared with); any other attribute is 0. */
__attribute__((unused)) static int attribute(int a) {
  switch (a) {
  case 1: return 1024;   /* max threads per block */
  case 2: case 3: return 1024;
  case 4: return 65535;
  case 8: return 49152;  /* shared memory per block */
  case 10: return 32;    /* warp size */
  case 16: return 132;   /* multiprocessors */
  case 39: return 2048;  /* max threads per multiprocessor */
  case 75: return 9;     /* compute capability */
  case 76: return 0;
  case 81: return 233472;
  case 82: return 65536;
  case 83: return 1;     /* managed memory */
  case 89: return 1;     /* concurrent managed access */
  case 97: return 232448; /* opt-in shared memory per block */
  case 115: return 1;    /* memory pools */
  default: return 0;
  }
}

__attribute__((unused)) static void *host_alloc(size_t n) { return calloc(n ? n : 1, 1); }
__attribute__((unused)) static int standin_device, standin_ctx, standin_module, standin_handle;

/* What the driver refuses during a capture, emulated by the stand-in so
 * that a step that could not be captured on a GPU fails here too: a copy
 * between the host's pageable memory and the device, a synchronisation, a
 * synchronous allocation (each fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
 * and invalidates the capture, whose end then fails with
 * CUDA_ERROR_STREAM_CAPTURE_INVALIDATED), and a stream-ordered free of memory
 * the capture did not allocate (CUDA_ERROR_INVALID_VALUE: inside a capture a
 * free becomes a graph node and may only name the graph's own allocations).
 * Each is counted under capture_errors and named on stderr. */
#define CAPTURE_UNSUPPORTED 900
#define CAPTURE_INVALIDATED 901
__attribute__((unused)) static int capture_refuses(const char *what) {
  if (!__atomic_load_n(&capture_state, __ATOMIC_ACQUIRE)) return 0;
  add(&capture_errors, 1);
  fprintf(stderr, "tunefuse census stand-in: %s during a stream capture (the driver refuses it)\n", what);
  __atomic_store_n(&capture_state, 2, __ATOMIC_RELEASE);
  return 1;
}

/* The allocations a capture made that it has not freed: graph allocations.
 * A graph whose allocations outlive it may be launched again only after
 * they are freed (CUDA_ERROR_INVALID_VALUE otherwise), which the stand-in
 * checks at cuGraphLaunch. */
struct ptrs {
  uint64_t *p;
  size_t n, cap;
};
__attribute__((unused)) static struct ptrs capture_allocs;
__attribute__((unused)) static void ptrs_add(struct ptrs *s, uint64_t p) {
  if (s->n == s->cap) {
    size_t cap = s->cap ? 2 * s->cap : 256;
    uint64_t *q = realloc(s->p, cap * sizeof *q);
    if (!q) return;
    s->p = q, s->cap = cap;
  }
  s->p[s->n++] = p;
}
__attribute__((unused)) static int ptrs_remove(struct ptrs *s, uint64_t p) {
  for (size_t i = s->n; i-- > 0;)
    if (s->p[i] == p) {
      s->p[i] = s->p[--s->n];
      return 1;
    }
  return 0;
}
/* Whether p is the start of a live allocation. */
__attribute__((unused)) static int is_live(uint64_t p) { return p && range_start_of(p) == p; }
/* The allocations (by start) that the operations of the capture in
 * progress name and that the capture did not make itself: a replay reads
 * and writes them at the addresses captured, so each must still be live
 * whenever the graph launches. */
__attribute__((unused)) static struct ptrs capture_uses;
__attribute__((unused)) static int ptrs_has(const struct ptrs *s, uint64_t p) {
  for (size_t i = 0; i < s->n; i++)
    if (s->p[i] == p) return 1;
  return 0;
}
/* Notes a device address an operation of the capture in progress names. */
__attribute__((unused)) static void capture_use(uint64_t v) {
#ifndef CENSUS_STANDIN
  /* Interposed, the real driver keeps the graph's memory. */
  return;
#endif
  if (__atomic_load_n(&capture_state, __ATOMIC_ACQUIRE) != 1) return;
  uint64_t lo = range_start_of(v);
  if (lo && !ptrs_has(&capture_allocs, lo) && !ptrs_has(&capture_uses, lo)) ptrs_add(&capture_uses, lo);
}
/* Every 8-byte word of a kernel's arguments that is a device address (the
 * sizes from the PTX; kernels of unknown arguments are not seen). */
__attribute__((unused)) static void capture_use_args(const struct func *f, void **params) {
#ifndef CENSUS_STANDIN
  return;
#endif
  if (__atomic_load_n(&capture_state, __ATOMIC_ACQUIRE) != 1 || !params) return;
  int n = __atomic_load_n(&f->nparams, __ATOMIC_ACQUIRE);
  for (int i = 0; i < n; i++)
    for (uint32_t off = 0; off + 8 <= f->psize[i]; off += 8) {
      uint64_t w;
      memcpy(&w, (const unsigned char *)params[i] + off, 8);
      capture_use(w);
    }
}

/* A stand-in graph (and its executable form): the allocations it leaves
 * live, the allocations from outside it that it names, and whether it was
 * launched. */
struct standin_graph {
  struct ptrs live, uses;
  int launched;
};
__attribute__((unused)) static CUresult standin_end_capture(void **graph) {
  int state = __atomic_exchange_n(&capture_state, 0, __ATOMIC_ACQ_REL);
  struct ptrs left = capture_allocs, uses = capture_uses;
  capture_allocs = (struct ptrs){0};
  capture_uses = (struct ptrs){0};
  if (state != 1) {
    free(left.p);
    free(uses.p);
    *graph = NULL;
    return state == 2 ? CAPTURE_INVALIDATED : 1;
  }
  struct standin_graph *g = calloc(1, sizeof *g);
  if (!g) return 2;
  g->live = left;
  g->uses = uses;
  *graph = g;
  return 0;
}
__attribute__((unused)) static CUresult standin_instantiate(void **exec, void *graph) {
  struct standin_graph *g = graph, *e = calloc(1, sizeof *e);
  if (!g || !e) {
    free(e);
    return 1;
  }
  for (size_t i = 0; i < g->live.n; i++) ptrs_add(&e->live, g->live.p[i]);
  for (size_t i = 0; i < g->uses.n; i++) ptrs_add(&e->uses, g->uses.p[i]);
  *exec = e;
  return 0;
}
__attribute__((unused)) static CUresult standin_launch(void *exec) {
  struct standin_graph *e = exec;
  if (!e) return 1;
  /* (A freed address that a later allocation happens to reuse passes: the
   * stand-in's memory is the host's, which reuses addresses.) */
  for (size_t i = 0; i < e->uses.n; i++)
    if (!is_live(e->uses.p[i])) {
      add(&capture_errors, 1);
      fprintf(stderr, "tunefuse census stand-in: a graph launched after memory its operations name "
                      "was freed (the replay would read or write freed memory)\n");
      return 1;
    }
  if (e->launched)
    for (size_t i = 0; i < e->live.n; i++)
      if (is_live(e->live.p[i])) {
        add(&capture_errors, 1);
        fprintf(stderr, "tunefuse census stand-in: a graph launched again while an allocation it made "
                        "is still live (the driver refuses it)\n");
        return 1;
      }
  e->launched = 1;
  return 0;
}
__attribute__((unused)) static void standin_graph_free(void *graph) {
  struct standin_graph *g = graph;
  if (g) free(g->live.p), free(g->uses.p);
  free(g);
}
/* A stream-ordered free: inside a capture only of the capture's own
 * allocations (then a graph node; the memory is released here at once,
 * as no replay reads it), otherwise at once. */
__attribute__((unused)) static CUresult standin_free_async(uint64_t p) {
  if (__atomic_load_n(&capture_state, __ATOMIC_ACQUIRE) == 1 && !ptrs_remove(&capture_allocs, p)) {
    add(&capture_errors, 1);
    fprintf(stderr, "tunefuse census stand-in: a stream-ordered free, during a capture, of memory "
                    "allocated before it (the driver refuses it)\n");
    __atomic_store_n(&capture_state, 2, __ATOMIC_RELEASE);
    return 1;
  }
  range_remove(p);
  free((void *)(uintptr_t)p);
  return 0;
}
__attribute__((unused)) static CUresult standin_alloc_async(CUdeviceptr *p, size_t n) {
  *p = (CUdeviceptr)(uintptr_t)host_alloc(n);
  if (!*p) return 2;
  if (__atomic_load_n(&capture_state, __ATOMIC_ACQUIRE) == 1) ptrs_add(&capture_allocs, *p);
  return 0;
}

/* Driver. */
DEF(CUresult, cuInit, (unsigned flags), (flags), r = 0, NOTHING)
DEF(CUresult, cuDeviceGet, (CUdevice * d, int ordinal), (d, ordinal), (*d = ordinal, r = ordinal == 0 ? 0 : 101), NOTHING)
DEF(CUresult, cuDeviceGetAttribute, (int *v, int a, CUdevice d), (v, a, d), (*v = attribute(a), r = 0), NOTHING)
DEF(CUresult, cuDeviceGetName, (char *name, int len, CUdevice d), (name, len, d),
    (snprintf(name, (size_t)len, "tunefuse census stand-in"), r = 0), NOTHING)
DEF(CUresult, cuDevicePrimaryCtxRetain, (CUcontext * c, CUdevice d), (c, d), (*c = &standin_ctx, r = 0), NOTHING)
DEF(CUresult, cuDevicePrimaryCtxRelease_v2, (CUdevice d), (d), r = 0, NOTHING)
__attribute__((unused)) static __thread CUcontext standin_current;
DEF(CUresult, cuCtxSetCurrent, (CUcontext c), (c), (standin_current = c, r = 0), NOTHING)
DEF(CUresult, cuCtxGetCurrent, (CUcontext * c), (c), (*c = standin_current, r = 0), NOTHING)
DEF(CUresult, cuCtxDestroy_v2, (CUcontext c), (c), r = 0, NOTHING)
DEF(CUresult, cuEventCreate, (CUevent * e, unsigned flags), (e, flags), (*e = host_alloc(8), r = 0), NOTHING)
DEF(CUresult, cuEventDestroy_v2, (CUevent e), (e), (free(e), r = 0), NOTHING)
DEF(CUresult, cuEventRecord, (CUevent e, CUstream s), (e, s), r = 0, NOTHING)
DEF(CUresult, cuStreamWaitEvent, (CUstream s, CUevent e, unsigned flags), (s, e, flags), r = 0, NOTHING)
DEF(CUresult, cuStreamSynchronize, (CUstream s), (s),
    r = capture_refuses("cuStreamSynchronize") ? CAPTURE_UNSUPPORTED : 0, NOTHING)
DEF(CUresult, cuStreamDestroy_v2, (CUstream s), (s), r = 0, NOTHING)
DEF(CUresult, cuStreamIsCapturing, (CUstream s, int *status), (s, status),
    (*status = __atomic_load_n(&capture_state, __ATOMIC_ACQUIRE), r = 0), NOTHING)
DEF(CUresult, cuStreamBeginCapture_v2, (CUstream s, int mode), (s, mode),
    r = __atomic_load_n(&capture_state, __ATOMIC_ACQUIRE) ? 1 : 0,
    if (r == 0) __atomic_store_n(&capture_state, 1, __ATOMIC_RELEASE))
#ifdef CENSUS_STANDIN
DEF(CUresult, cuStreamEndCapture, (CUstream s, void **graph), (s, graph), r = standin_end_capture(graph), NOTHING)
#else
DEF(CUresult, cuStreamEndCapture, (CUstream s, void **graph), (s, graph), r = 0,
    __atomic_store_n(&capture_state, 0, __ATOMIC_RELEASE))
#endif
DEF(CUresult, cuGraphInstantiateWithFlags, (void **exec, void *graph, unsigned long long flags),
    (exec, graph, flags), r = standin_instantiate(exec, graph), NOTHING)
DEF(CUresult, cuGraphLaunch, (void *exec, CUstream s), (exec, s), r = standin_launch(exec), NOTHING)
DEF(CUresult, cuGraphUpload, (void *exec, CUstream s), (exec, s), r = 0, NOTHING)
DEF(CUresult, cuGraphExecDestroy, (void *exec), (exec), (standin_graph_free(exec), r = 0), NOTHING)
DEF(CUresult, cuGraphDestroy, (void *graph), (graph), (standin_graph_free(graph), r = 0), NOTHING)
DEF(CUresult, cuFuncSetAttribute, (CUfunction f, int a, int v), (f, a, v), r = 0, NOTHING)
DEF(CUresult, cuGetErrorString, (CUresult e, const char **s), (e, s),
    (*s = "error returned by the tunefuse census stand-in", r = 0), NOTHING)
DEF(CUresult, cuLaunchKernel,
    (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
     unsigned shmem, CUstream s, void **params, void **extra),
    (f, gx, gy, gz, bx, by, bz, shmem, s, params, extra), r = 0,
    (add(&func_of(f)->launches, 1), trace(func_of(f)->name), log_launch(func_of(f), params),
     capture_use_args(func_of(f), params)))
/* A freed allocation leaves the live ranges: in the stand-in before its
 * memory is freed, in the interposer after the real call. */
#ifdef CENSUS_STANDIN
#define RANGE_REMOVE_AFTER(p) NOTHING
#else
#define RANGE_REMOVE_AFTER(p) range_remove(p)
#endif
DEF(CUresult, cuMemAllocAsync, (CUdeviceptr * p, size_t n, CUstream s), (p, n, s),
    r = standin_alloc_async(p, n), if (r == 0) range_add(*p, n))
DEF(CUresult, cuMemAlloc_v2, (CUdeviceptr * p, size_t n), (p, n),
    if (capture_refuses("cuMemAlloc")) r = CAPTURE_UNSUPPORTED;
    else (*p = (CUdeviceptr)(uintptr_t)host_alloc(n), r = *p ? 0 : 2), if (r == 0) range_add(*p, n))
DEF(CUresult, cuMemFreeAsync, (CUdeviceptr p, CUstream s), (p, s), r = standin_free_async(p),
    if (r == 0) RANGE_REMOVE_AFTER(p))
DEF(CUresult, cuMemFree_v2, (CUdeviceptr p), (p), (range_remove(p), free((void *)(uintptr_t)p), r = 0),
    RANGE_REMOVE_AFTER(p))
DEF(CUresult, cuMemcpyDtoDAsync_v2, (CUdeviceptr d, CUdeviceptr src, size_t n, CUstream s), (d, src, n, s),
    (memmove((void *)(uintptr_t)d, (const void *)(uintptr_t)src, n), r = 0),
    (add(&bytes_dtod, n), capture_use(d), capture_use(src)))
DEF(CUresult, cuMemcpyDtoHAsync_v2, (void *d, CUdeviceptr src, size_t n, CUstream s), (d, src, n, s),
    if (capture_refuses("a device-to-host copy to pageable memory")) r = CAPTURE_UNSUPPORTED;
    else (memcpy(d, (const void *)(uintptr_t)src, n), r = 0), add(&bytes_dtoh, n))
DEF(CUresult, cuMemcpyHtoDAsync_v2, (CUdeviceptr d, const void *src, size_t n, CUstream s), (d, src, n, s),
    if (capture_refuses("a host-to-device copy from pageable memory")) r = CAPTURE_UNSUPPORTED;
    else (memcpy((void *)(uintptr_t)d, src, n), r = 0), (add(&bytes_htod, n), trace("htod")))
DEF(CUresult, cuMemcpyPeerAsync,
    (CUdeviceptr d, CUcontext dc, CUdeviceptr src, CUcontext sc, size_t n, CUstream s), (d, dc, src, sc, n, s),
    (memmove((void *)(uintptr_t)d, (const void *)(uintptr_t)src, n), r = 0), add(&bytes_dtod, n))
DEF(CUresult, cuMemsetD8Async, (CUdeviceptr d, unsigned char v, size_t n, CUstream s), (d, v, n, s),
    (memset((void *)(uintptr_t)d, v, n), r = 0), (add(&bytes_memset, n), trace("memset"), capture_use(d)))
DEF(CUresult, cuModuleGetFunction, (CUfunction * f, CUmodule m, const char *name), (f, m, name),
    (*f = (CUfunction)register_func(NULL, m, name)->handle, r = 0),
    if (r == 0) learn_params(register_func(*f, m, name), m, name))
DEF(CUresult, cuModuleLoad, (CUmodule * m, const char *path), (m, path), (*m = host_alloc(8), r = 0), NOTHING)
DEF(CUresult, cuModuleLoadData, (CUmodule * m, const void *image), (m, image), (*m = host_alloc(8), r = 0),
    if (r == 0) parse_ptx(*m, image))
DEF(CUresult, cuModuleUnload, (CUmodule m), (m), r = 0, NOTHING)

/* cuBLAS. */
DEF(cublasStatus_t, cublasCreate_v2, (cublasHandle_t * h), (h), (*h = &standin_handle, r = 0), NOTHING)
DEF(cublasStatus_t, cublasDestroy_v2, (cublasHandle_t h), (h), r = 0, NOTHING)
DEF(cublasStatus_t, cublasSetStream_v2, (cublasHandle_t h, cudaStream_t s), (h, s), r = 0, NOTHING)
DEF(cublasStatus_t, cublasSetWorkspace_v2, (cublasHandle_t h, void *ws, size_t n), (h, ws, n), r = 0, NOTHING)
DEF(cublasStatus_t, cublasGemmStridedBatchedEx,
    (cublasHandle_t h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int at, int lda,
     long long sa, const void *B, int bt, int ldb, long long sb, const void *beta, void *C, int ct, int ldc,
     long long sc, int batch, int compute, int algo),
    (h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch, compute, algo), r = 0,
    (add(&gemm_flops, 2ull * (uint64_t)m * (uint64_t)n * (uint64_t)k * (uint64_t)batch),
     capture_use((uint64_t)(uintptr_t)A), capture_use((uint64_t)(uintptr_t)B), capture_use((uint64_t)(uintptr_t)C)))
DEF(cublasStatus_t, cublasDgemmStridedBatched,
    (cublasHandle_t h, int ta, int tb, int m, int n, int k, const double *alpha, const double *A, int lda,
     long long sa, const double *B, int ldb, long long sb, const double *beta, double *C, int ldc, long long sc,
     int batch),
    (h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch), r = 0,
    add(&gemm_flops, 2ull * (uint64_t)m * (uint64_t)n * (uint64_t)k * (uint64_t)batch))

/* cuBLASLt (the GEMMs with a bias epilogue). Its handles are opaque; for the
 * FLOP count, each layout's rows and columns and each descriptor's TRANSA
 * are remembered here, keyed by handle, in both builds (the interposer
 * records what the real library returned). */
#define LT_SLOTS 16384
#define LT_TOMBSTONE ((const void *)1)
struct lt_shape {
  const void *h;
  uint64_t rows, cols;
  int transa;
};
static struct lt_shape lt_shapes[LT_SLOTS];
static pthread_mutex_t lt_lock = PTHREAD_MUTEX_INITIALIZER;
/* Open addressing on the handle (forgotten entries become tombstones, which
 * lookups step over and inserts reuse). */
static struct lt_shape *lt_slot(const void *h, int create) {
  struct lt_shape *reuse = NULL;
  size_t s = slot_of(h) % LT_SLOTS;
  for (size_t i = 0; i < LT_SLOTS; i++, s = (s + 1) % LT_SLOTS) {
    struct lt_shape *e = &lt_shapes[s];
    if (e->h == h) return e;
    if (e->h == LT_TOMBSTONE && !reuse) reuse = e;
    if (!e->h) {
      if (!reuse) reuse = e;
      break;
    }
  }
  if (!create || !reuse) return NULL;
  memset(reuse, 0, sizeof *reuse);
  reuse->h = h;
  return reuse;
}
static void lt_remember(const void *h, uint64_t rows, uint64_t cols) {
  pthread_mutex_lock(&lt_lock);
  struct lt_shape *e = lt_slot(h, 1);
  if (e) e->rows = rows, e->cols = cols;
  pthread_mutex_unlock(&lt_lock);
}
static void lt_forget(const void *h) {
  pthread_mutex_lock(&lt_lock);
  struct lt_shape *e = lt_slot(h, 0);
  if (e) e->h = LT_TOMBSTONE;
  pthread_mutex_unlock(&lt_lock);
}
static void lt_set_transa(const void *desc, int attr, const void *buf) {
  if (attr != 3 /* CUBLASLT_MATMUL_DESC_TRANSA */) return;
  pthread_mutex_lock(&lt_lock);
  struct lt_shape *e = lt_slot(desc, 1);
  if (e) e->transa = *(const int *)buf;
  pthread_mutex_unlock(&lt_lock);
}
/* 2·m·n·k of D = op(A)·B: D is m×n, op(A) is m×k. */
static void lt_flops(const void *desc, const void *a, const void *d) {
  pthread_mutex_lock(&lt_lock);
  struct lt_shape *ds = lt_slot(desc, 0), *as = lt_slot(a, 0), *dd = lt_slot(d, 0);
  if (as && dd) {
    uint64_t k = ds && ds->transa ? as->rows : as->cols;
    add(&gemm_flops, 2ull * dd->rows * dd->cols * k);
  }
  pthread_mutex_unlock(&lt_lock);
}
__attribute__((unused)) static int standin_lt_handle;
/* A destroyed handle's entry goes: in the stand-in before its memory is
 * freed, in the interposer after the real call. */
#ifdef CENSUS_STANDIN
#define LT_FORGET_AFTER(h) NOTHING
#else
#define LT_FORGET_AFTER(h) lt_forget(h)
#endif
DEF(cublasStatus_t, cublasLtCreate, (cublasLtHandle_t * h), (h), (*h = &standin_lt_handle, r = 0), NOTHING)
DEF(cublasStatus_t, cublasLtDestroy, (cublasLtHandle_t h), (h), r = 0, NOTHING)
DEF(cublasStatus_t, cublasLtMatrixLayoutCreate,
    (cublasLtMatrixLayout_t * l, int type, uint64_t rows, uint64_t cols, int64_t ld), (l, type, rows, cols, ld),
    (*l = host_alloc(8), r = 0), if (r == 0) lt_remember(*l, rows, cols))
DEF(cublasStatus_t, cublasLtMatrixLayoutDestroy, (cublasLtMatrixLayout_t l), (l), (lt_forget(l), free(l), r = 0),
    LT_FORGET_AFTER(l))
DEF(cublasStatus_t, cublasLtMatrixLayoutSetAttribute, (cublasLtMatrixLayout_t l, int attr, const void *buf, size_t n),
    (l, attr, buf, n), r = 0, NOTHING)
DEF(cublasStatus_t, cublasLtMatmulDescCreate, (cublasLtMatmulDesc_t * d, int compute, int scale),
    (d, compute, scale), (*d = host_alloc(8), r = 0), NOTHING)
DEF(cublasStatus_t, cublasLtMatmulDescDestroy, (cublasLtMatmulDesc_t d), (d), (lt_forget(d), free(d), r = 0),
    LT_FORGET_AFTER(d))
DEF(cublasStatus_t, cublasLtMatmulDescSetAttribute, (cublasLtMatmulDesc_t d, int attr, const void *buf, size_t n),
    (d, attr, buf, n), r = 0, if (r == 0) lt_set_transa(d, attr, buf))
DEF(cublasStatus_t, cublasLtMatmulPreferenceCreate, (cublasLtMatmulPreference_t * p), (p),
    (*p = host_alloc(8), r = 0), NOTHING)
DEF(cublasStatus_t, cublasLtMatmulPreferenceDestroy, (cublasLtMatmulPreference_t p), (p), (free(p), r = 0), NOTHING)
DEF(cublasStatus_t, cublasLtMatmulPreferenceSetAttribute,
    (cublasLtMatmulPreference_t p, int attr, const void *buf, size_t n), (p, attr, buf, n), r = 0, NOTHING)
/* The stand-in offers one algorithm that needs no workspace. */
DEF(cublasStatus_t, cublasLtMatmulAlgoGetHeuristic,
    (cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
     cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dl, cublasLtMatmulPreference_t p, int requested,
     cublasLtMatmulHeuristicResult_t *results, int *count),
    (h, d, a, b, c, dl, p, requested, results, count),
    (memset(results, 0, sizeof *results), *count = requested > 0, r = 0), NOTHING)
DEF(cublasStatus_t, cublasLtMatmul,
    (cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *A, cublasLtMatrixLayout_t al,
     const void *B, cublasLtMatrixLayout_t bl, const void *beta, const void *C, cublasLtMatrixLayout_t cl, void *D,
     cublasLtMatrixLayout_t dl, const cublasLtMatmulAlgo_t *algo, void *ws, size_t wsn, cudaStream_t s),
    (h, d, alpha, A, al, B, bl, beta, C, cl, D, dl, algo, ws, wsn, s), r = 0,
    (lt_flops(d, al, dl), capture_use((uint64_t)(uintptr_t)A), capture_use((uint64_t)(uintptr_t)B),
     capture_use((uint64_t)(uintptr_t)C), capture_use((uint64_t)(uintptr_t)D)))

/* CUDA runtime (imported by kernels candle compiles into the binary). */
DEF(cudaError_t, cudaDeviceGetAttribute, (int *v, int a, int d), (v, a, d), (*v = attribute(a), r = 0), NOTHING)
DEF(cudaError_t, cudaFree, (void *p), (p), (range_remove((uint64_t)(uintptr_t)p), free(p), r = 0),
    RANGE_REMOVE_AFTER((uint64_t)(uintptr_t)p))
DEF(cudaError_t, cudaFreeAsync_ptsz, (void *p, cudaStream_t s), (p, s),
    (range_remove((uint64_t)(uintptr_t)p), free(p), r = 0), RANGE_REMOVE_AFTER((uint64_t)(uintptr_t)p))
DEF(cudaError_t, cudaFuncGetAttributes, (void *attr, const void *f), (attr, f),
    (unsupported("cudaFuncGetAttributes"), r = 801), NOTHING)
DEF(cudaError_t, cudaFuncSetAttribute, (const void *f, int a, int v), (f, a, v), r = 0, NOTHING)
DEF(cudaError_t, cudaGetDevice, (int *d), (d), (*d = standin_device, r = 0), NOTHING)
DEF(cudaError_t, cudaGetDeviceCount, (int *n), (n), (*n = 1, r = 0), NOTHING)
DEF(const char *, cudaGetErrorName, (cudaError_t e), (e), r = "cudaErrorCensusStandIn", NOTHING)
DEF(const char *, cudaGetErrorString, (cudaError_t e), (e), r = "error returned by the tunefuse census stand-in",
    NOTHING)
DEF(cudaError_t, cudaGetLastError, (void), (), r = 0, NOTHING)
DEF(cudaError_t, cudaMalloc, (void **p, size_t n), (p, n),
    if (capture_refuses("cudaMalloc")) r = CAPTURE_UNSUPPORTED; else (*p = host_alloc(n), r = *p ? 0 : 2),
    if (r == 0) range_add((uint64_t)(uintptr_t)*p, n))
DEF(cudaError_t, cudaMallocAsync_ptsz, (void **p, size_t n, cudaStream_t s), (p, n, s),
    (*p = host_alloc(n), r = *p ? 0 : 2), if (r == 0) range_add((uint64_t)(uintptr_t)*p, n))
DEF(cudaError_t, cudaMemsetAsync_ptsz, (void *p, int v, size_t n, cudaStream_t s), (p, v, n, s),
    (memset(p, v, n), r = 0), (add(&bytes_memset, n), trace("memset")))
DEF(cudaError_t, cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags,
    (int *blocks, const void *f, int threads, size_t shmem, unsigned flags), (blocks, f, threads, shmem, flags),
    (unsupported("cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags"), r = 801), NOTHING)
DEF(cudaError_t, cudaPeekAtLastError, (void), (), r = 0, NOTHING)
DEF(cudaError_t, cudaSetDevice, (int d), (d), (standin_device = d, r = 0), NOTHING)
DEF(cudaError_t, cudaStreamSynchronize_ptsz, (cudaStream_t s), (s),
    r = capture_refuses("cudaStreamSynchronize") ? CAPTURE_UNSUPPORTED : 0, NOTHING)

/* cuRAND. */
DEF(curandStatus_t, curandCreateGenerator, (curandGenerator_t * g, int type), (g, type),
    (*g = &standin_module, r = 0), NOTHING)
DEF(curandStatus_t, curandDestroyGenerator, (curandGenerator_t g), (g), r = 0, NOTHING)
DEF(curandStatus_t, curandGenerateNormal, (curandGenerator_t g, float *o, size_t n, float mean, float sd),
    (g, o, n, mean, sd), r = 0, NOTHING)
DEF(curandStatus_t, curandGenerateNormalDouble, (curandGenerator_t g, double *o, size_t n, double mean, double sd),
    (g, o, n, mean, sd), r = 0, NOTHING)
DEF(curandStatus_t, curandGenerateUniform, (curandGenerator_t g, float *o, size_t n), (g, o, n), r = 0, NOTHING)
DEF(curandStatus_t, curandGenerateUniformDouble, (curandGenerator_t g, double *o, size_t n), (g, o, n), r = 0,
    NOTHING)
DEF(curandStatus_t, curandSetPseudoRandomGeneratorSeed, (curandGenerator_t g, unsigned long long seed), (g, seed),
    r = 0, NOTHING)
DEF(curandStatus_t, curandSetStream, (curandGenerator_t g, cudaStream_t s), (g, s), r = 0, NOTHING)

/* The host side of kernels compiled into the binary by nvcc (candle's
 * static kernel libraries): registration at load, and launches through the
 * runtime, named by the device function they were registered with. */
DEF(void **, __cudaRegisterFatBinary, (void *fatbin), (fatbin), r = host_alloc(16), NOTHING)
DEF_VOID(__cudaRegisterFatBinaryEnd, (void **h), (h), NOTHING, NOTHING)
DEF_VOID(__cudaUnregisterFatBinary, (void **h), (h), NOTHING, NOTHING)
DEF_VOID(__cudaRegisterFunction,
         (void **h, const char *host_fun, char *device_fun, const char *device_name, int thread_limit, void *tid,
          void *bid, void *bdim, void *gdim, int *wsize),
         (h, host_fun, device_fun, device_name, thread_limit, tid, bid, bdim, gdim, wsize), NOTHING,
         register_func(host_fun, h, device_name))
DEF_VOID(__cudaRegisterVar,
         (void **h, char *host_var, char *device_address, const char *device_name, int ext, size_t size,
          int constant, int global),
         (h, host_var, device_address, device_name, ext, size, constant, global), NOTHING, NOTHING)
DEF(cudaError_t, __cudaGetKernel, (void **kernel, const void *f), (kernel, f), (*kernel = (void *)f, r = 0),
    NOTHING)
DEF(unsigned, __cudaPushCallConfiguration, (dim3 grid, dim3 block, size_t shmem, void *stream),
    (grid, block, shmem, stream), r = 0, NOTHING)
DEF(cudaError_t, __cudaPopCallConfiguration, (dim3 * grid, dim3 * block, size_t * shmem, void *stream),
    (grid, block, shmem, stream), r = 0, NOTHING)
DEF(cudaError_t, __cudaLaunchKernel_ptsz,
    (const void *f, dim3 grid, dim3 block, void **args, size_t shmem, cudaStream_t s),
    (f, grid, block, args, shmem, s), r = 0, (add(&func_of(f)->launches, 1), log_launch(func_of(f), NULL)))
