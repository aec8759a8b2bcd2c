/* cblas_sgemm for MLX's CPU backend: skinny products (decode) by kernels here,
 * everything else (prefill) by OpenBLAS.
 *
 * A decode step multiplies a few rows of activations (one per request) by each
 * weight matrix: it should cost one read of the weights. OpenBLAS's and BLIS's
 * sgemm pack their operands for large products and reach about half of this
 * machine's streaming bandwidth at one row, less at four (measured: README). The
 * kernel below streams each weight row once for up to MAX_ROWS rows of
 * activations, on every core (OpenMP), with AVX2 and FMA.
 *
 * A second kernel takes skinny products against a matrix that is not transposed:
 * in a decode step, attention's probabilities times the cached values, one call
 * per head. OpenBLAS packs the values for each of those small calls.
 *
 * Each output element is one dot product summed in one fixed order, whatever the
 * number of rows: a request's row gets bit-identical results alone or batched.
 *
 * Loaded globally ahead of OpenBLAS, so MLX's cblas_sgemm calls land here; the
 * OpenBLAS it forwards to is opened privately from DNET_BLAS_LARGE. Built at run
 * time by dnet.runtime.blas.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, MAX_ROWS = 8 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);

static sgemm_fn large_sgemm;
static int skinny_ok;
static long skinny_calls; /* products the kernel took, for tests and diagnostics */

#if defined(__x86_64__)
#include <immintrin.h>

/* Prefetch distance along a weight row, in floats, into L2: far enough that the
 * loads of the slowest case (eight rows against one weight row) still overlap.
 * Into L2, not L1: the activation rows stay in L1 (measured: 1.1-1.25x at 4 and
 * 8 rows, the same at 1). */
#define AHEAD 2048

__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* Columns j..j+J-1 of c (J weight rows) for M activation rows. The J weight rows
 * run side by side only to keep more loads in flight; each sum is the same. */
#define KERNEL(M, J)                                                                    \
    __attribute__((target("avx2,fma"))) static void k##M##_##J(                         \
        int j, int k, float alpha, const float *a, int lda, const float *w, int ldw,     \
        float beta, float *c, int ldc) {                                                \
        __m256 acc[J][M];                                                               \
        for (int q = 0; q < J; q++)                                                     \
            for (int r = 0; r < M; r++) acc[q][r] = _mm256_setzero_ps();                \
        int i = 0;                                                                      \
        for (; i + 8 <= k; i += 8) {                                                    \
            for (int q = 0; q < J; q++) {                                               \
                const float *wq = w + (long)(j + q) * ldw + i;                          \
                if ((i & 15) == 0) _mm_prefetch((const char *)(wq + AHEAD), _MM_HINT_T1); \
                __m256 x = _mm256_loadu_ps(wq);                                         \
                for (int r = 0; r < M; r++)                                             \
                    acc[q][r] = _mm256_fmadd_ps(x, _mm256_loadu_ps(a + (long)r * lda + i), \
                                                acc[q][r]);                             \
            }                                                                           \
        }                                                                               \
        for (int q = 0; q < J; q++)                                                     \
            for (int r = 0; r < M; r++) {                                               \
                float v = hsum(acc[q][r]);                                              \
                for (int t = i; t < k; t++) v += w[(long)(j + q) * ldw + t] * a[(long)r * lda + t]; \
                float *out = c + (long)r * ldc + j + q;                                 \
                *out = beta == 0.0f ? alpha * v : alpha * v + beta * *out;              \
            }                                                                           \
    }

KERNEL(1, 4) KERNEL(2, 4) KERNEL(3, 3) KERNEL(4, 3) KERNEL(5, 2) KERNEL(6, 2)
KERNEL(7, 1) KERNEL(8, 1)
KERNEL(1, 1) KERNEL(2, 1) KERNEL(3, 1) KERNEL(4, 1) KERNEL(5, 1) KERNEL(6, 1)

typedef void (*kernel_fn)(int, int, float, const float *, int, const float *, int, float,
                          float *, int);
static const kernel_fn wide[MAX_ROWS + 1] = {0, k1_4, k2_4, k3_3, k4_3, k5_2, k6_2, k7_1, k8_1};
static const int width[MAX_ROWS + 1] = {0, 4, 4, 3, 3, 2, 2, 1, 1};
static const kernel_fn narrow[MAX_ROWS + 1] = {0, k1_1, k2_1, k3_1, k4_1, k5_1, k6_1, k7_1, k8_1};

/* Weight rows per task: a multiple of every width, so tasks split no group. */
#define BLOCK 48

/* Activation rows are copied to a 64-byte aligned buffer whose row stride is not a
 * multiple of 4 KiB: rows at such strides (the usual hidden sizes) share L1 sets
 * with each other and with the weight rows. The arithmetic is the same. */
#define PAD 16

static void skinny(int m, int n, int k, float alpha, const float *a0, int lda0,
                   const float *w, int ldw, float beta, float *c, int ldc) {
    int lda = ((k + 15) & ~15) + PAD;
    float *a = aligned_alloc(64, sizeof(float) * (size_t)lda * m);
    if (a == NULL) {
        a = (float *)a0;
        lda = lda0;
    } else {
        for (int r = 0; r < m; r++)
            for (int t = 0; t < k; t++) a[(long)r * lda + t] = a0[(long)r * lda0 + t];
    }
    int blocks = (n + BLOCK - 1) / BLOCK;
    long work = (long)n * k;
#pragma omp parallel for schedule(static) if (work >= 65536)
    for (int b = 0; b < blocks; b++) {
        int j = b * BLOCK, end = j + BLOCK < n ? j + BLOCK : n, step = width[m];
        for (; j + step <= end; j += step) wide[m](j, k, alpha, a, lda, w, ldw, beta, c, ldc);
        for (; j < end; j++) narrow[m](j, k, alpha, a, lda, w, ldw, beta, c, ldc);
    }
    if (a != a0) free(a);
}

/* Columns j..j+8*V-1 of row r of c = a @ b, b (k x n) as stored: each output sums
 * over k in order, one fused multiply-add at a time. */
#define NN_KERNEL(V)                                                                    \
    __attribute__((target("avx2,fma"))) static void nn##V(                              \
        int r, int j, int k, float alpha, const float *a, int lda, const float *b,       \
        int ldb, float beta, float *c, int ldc) {                                       \
        __m256 acc[V];                                                                  \
        for (int q = 0; q < V; q++) acc[q] = _mm256_setzero_ps();                       \
        const float *ar = a + (long)r * lda;                                            \
        for (int t = 0; t < k; t++) {                                                   \
            __m256 s = _mm256_broadcast_ss(ar + t);                                     \
            const float *bt = b + (long)t * ldb + j;                                    \
            for (int q = 0; q < V; q++)                                                 \
                acc[q] = _mm256_fmadd_ps(s, _mm256_loadu_ps(bt + 8 * q), acc[q]);       \
        }                                                                               \
        float *out = c + (long)r * ldc + j;                                             \
        for (int q = 0; q < V; q++) {                                                   \
            __m256 v = _mm256_mul_ps(_mm256_set1_ps(alpha), acc[q]);                    \
            if (beta != 0.0f)                                                           \
                v = _mm256_fmadd_ps(_mm256_set1_ps(beta), _mm256_loadu_ps(out + 8 * q), v); \
            _mm256_storeu_ps(out + 8 * q, v);                                           \
        }                                                                               \
    }

NN_KERNEL(8) NN_KERNEL(1)

__attribute__((target("avx2,fma"))) static void nn_tail(int r, int j, int k, float alpha,
                                                        const float *a, int lda,
                                                        const float *b, int ldb, float beta,
                                                        float *c, int ldc) {
    float v = 0.0f;
    for (int t = 0; t < k; t++) v = __builtin_fmaf(a[(long)r * lda + t], b[(long)t * ldb + j], v);
    float *out = c + (long)r * ldc + j;
    *out = beta == 0.0f ? alpha * v : __builtin_fmaf(beta, *out, alpha * v);
}

/* Tasks of 64 columns of one row; a long context's product runs on every core. */
static void skinny_nn(int m, int n, int k, float alpha, const float *a, int lda,
                      const float *b, int ldb, float beta, float *c, int ldc) {
    int per_row = (n + 63) / 64, tasks = m * per_row;
    long work = (long)m * n * k;
#pragma omp parallel for schedule(static) if (work >= 1048576)
    for (int task = 0; task < tasks; task++) {
        int r = task / per_row, j = (task % per_row) * 64, end = j + 64 < n ? j + 64 : n;
        if (j + 64 <= end) {
            nn8(r, j, k, alpha, a, lda, b, ldb, beta, c, ldc);
            continue;
        }
        for (; j + 8 <= end; j += 8) nn1(r, j, k, alpha, a, lda, b, ldb, beta, c, ldc);
        for (; j < end; j++) nn_tail(r, j, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
}
#endif

__attribute__((constructor)) static void dnet_sgemm_dispatch_init(void) {
    const char *path = getenv("DNET_BLAS_LARGE");
    if (path == NULL || *path == '\0') return;
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "dnet sgemm dispatch: %s\n", dlerror());
        return;
    }
    large_sgemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
#if defined(__x86_64__)
    __builtin_cpu_init();
    skinny_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
}

/* 1 when products are forwarded and skinny ones take the kernel here. */
int dnet_sgemm_dispatch_ready(void) { return large_sgemm != NULL && skinny_ok; }

long dnet_sgemm_skinny_calls(void) { return skinny_calls; }

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
#if defined(__x86_64__)
    /* Activations (m x k) times stored weights (n x k) transposed: x @ W.T. */
    if (skinny_ok && order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS &&
        m >= 1 && m <= MAX_ROWS && k >= 1) {
        skinny(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        skinny_calls++;
        return;
    }
    /* Activations times a matrix as stored (attention's values): a @ b. */
    if (skinny_ok && order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == NO_TRANS &&
        m >= 1 && m <= MAX_ROWS && k >= 1) {
        skinny_nn(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        skinny_calls++;
        return;
    }
#endif
    large_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
