/* Attention of one row's query heads over a cache of keys and values (the fused
 * decode step, decode.c): the portable loop, and one in AVX-512 registers.
 *
 * At 77 positions the portable loop took ~24 us a layer on one core here (SSE2,
 * the output rows read and written back for every position); the AVX-512 loop
 * keeps each head's sums in 16-wide registers.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* A dot product of n values in eight running sums (so the compiler can keep them
 * in one vector), added in a fixed order. */
static inline float dot(const float *a, const float *b, int n) {
    float part[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) part[j] += a[i + j] * b[i + j];
    float s = ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Each of n rows of `span` scores (p) as softmax weights: exp(score - top), over
 * their sum. */
static void softmax(float *p, int n, int span, const float *top) {
    for (int h = 0; h < n; h++) {
        float *ph = p + (long)h * span, total = 0.0f;
        for (int t = 0; t < span; t++) {
            ph[t] = expf(ph[t] - top[h]);
            total += ph[t];
        }
        for (int t = 0; t < span; t++) ph[t] /= total;
    }
}

/* The `n` query heads of one row that share a key/value head (adjacent in q and
 * out, `d` apart): out_h = softmax(q_h.K^T * scale) V over slots [first, last].
 * Each key and value row is read once for all of them (at 400 positions, reading
 * them once per query head doubled Qwen3-0.6B's cache traffic). p holds n rows of
 * last - first + 1 scores. Each head's sums are in the same order as alone. */
static void attend_portable(const float *q, int n, const float *keys, int64_t kt, const float *values,
                   int64_t vt, int first, int last, int d, float scale, float *p, float *out) {
    int span = last - first + 1;
    float qs[n * d], top[n];
    for (int i = 0; i < n * d; i++) qs[i] = q[i] * scale;
    for (int h = 0; h < n; h++) top[h] = -INFINITY;
    for (int t = first; t <= last; t++) {
        const float *kr = keys + t * kt;
        for (int h = 0; h < n; h++) {
            float sc = dot(qs + h * d, kr, d);
            p[h * span + t - first] = sc;
            if (sc > top[h]) top[h] = sc;
        }
    }
    softmax(p, n, span, top);
    for (int i = 0; i < n * d; i++) out[i] = 0.0f;
    for (int t = 0; t < span; t++) {
        const float *restrict vr = values + (first + t) * vt;
        for (int h = 0; h < n; h++) {
            float w = p[h * span + t];
            float *restrict o = out + h * d;
            for (int i = 0; i < d; i++) o[i] += w * vr[i];
        }
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

#define T512A __attribute__((target("avx512f,avx512vl,avx2,fma")))

/* attend_portable's sums, 16 lanes wide (head_dim a multiple of 16). */
T512A static void attend512(const float *q, int n, const float *keys, int64_t kt,
                            const float *values, int64_t vt, int first, int last, int d,
                            float scale, float *p, float *out) {
    int span = last - first + 1;
    float qs[n * d], top[n];
    for (int i = 0; i < n * d; i++) qs[i] = q[i] * scale;
    for (int h = 0; h < n; h++) top[h] = -INFINITY;
    for (int t = first; t <= last; t++) {
        const float *kr = keys + t * kt;
        for (int h = 0; h < n; h++) {
            const float *qh = qs + h * d;
            __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
            int i = 0;
            for (; i + 32 <= d; i += 32) {
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), _mm512_loadu_ps(kr + i), a);
                b = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i + 16), _mm512_loadu_ps(kr + i + 16), b);
            }
            if (i < d) a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), _mm512_loadu_ps(kr + i), a);
            float sc = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
            p[h * span + t - first] = sc;
            if (sc > top[h]) top[h] = sc;
        }
    }
    softmax(p, n, span, top);
    memset(out, 0, sizeof(float) * n * d);
    for (int t = 0; t < span; t++) {
        const float *vr = values + (first + t) * vt;
        for (int h = 0; h < n; h++) {
            __m512 w = _mm512_set1_ps(p[h * span + t]);
            float *o = out + h * d;
            for (int i = 0; i < d; i += 16)
                _mm512_storeu_ps(o + i, _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + i),
                                                        _mm512_loadu_ps(o + i)));
        }
    }
}

static int wide = -1;
#endif

/* For tests (dnet_qgemv_use_vectors): 0, the portable loop; 1, the widest here. */
void dnet_attend_use_wide(int on) {
#if defined(__x86_64__)
    wide = -1;
    if (!on) wide = 0;
#else
    (void)on;
#endif
}

/* out_h = softmax(q_h . K^T * scale) V over slots [first, last], for the n query
 * heads of one row that share a key/value head (see attend_portable). */
void dnet_attend(const float *q, int n, const float *keys, int64_t kt, const float *values,
                 int64_t vt, int first, int last, int d, float scale, float *p, float *out) {
#if defined(__x86_64__)
    if (wide < 0) {
        __builtin_cpu_init();
        wide = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("fma");
    }
    if (wide && d % 16 == 0) {
        attend512(q, n, keys, kt, values, vt, first, last, d, scale, p, out);
        return;
    }
#endif
    attend_portable(q, n, keys, kt, values, vt, first, last, d, scale, p, out);
}
