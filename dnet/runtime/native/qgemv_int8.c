/* 4-bit products by integer dot products (AVX-512 VNNI), as exact as float32.
 *
 * The float loops of qgemv.c spend three vector operations on every 16 weights
 * (a shift, a table lookup, a multiply-add): on two cores that, not memory, set
 * the pace of a decode step. Here each x value becomes an integer on a power-of-
 * two grid of its group of 32: X = round(x / step), step = 2^(e - 23) where the
 * group's largest |x| is below 2^e (2^(e - 22) when that largest value is within
 * 0.4% of 2^e), so the rounding error is at most 2^-24 of 2^e: float32's own
 * precision of the group's largest value. |X| <= TOP = 127 * (1 + 2^8 + 2^16), so
 * X is three signed bytes, X = hi * 2^16 + mid * 2^8 + lo, and one VNNI
 * instruction multiplies 64 weights (unsigned nibbles) by 64 such bytes and adds
 * them four by four into 32-bit lanes. Per block of 16 words (128 weights) and
 * row, six of those and two shifts (hi, then mid, then lo, Horner's way) give
 * each word's exact integer sum of q * X; it becomes a float once, times the
 * scale of the word's group and the step of its x-group:
 *
 *   y[r][n] = sum_words scale * step * (sum q * X)  +  sum_g bias[g] * xsum[g]
 *
 * where xsum are the float sums of x per weight group. The integer sums are
 * exact (a word's is at most 8 * 15 * TOP < 2^30), so the result differs from the
 * exact product by the grid's rounding and float32 rounding of the sums over
 * words: measured, 1.0-1.4x the errors of the AVX-512 float loop. A row's result
 * is the same alone or batched.
 */
#include "qgemv.h"

#include <math.h>

#if defined(__x86_64__)
#define TI8 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

enum { XGROUP = 32, BLOCK_BYTES = 384 /* 3 pieces x (even, odd) x 64 */ };

/* The largest |X|: three signed bytes, 127 each. */
#define TOP (127 * (1 + 256 + 65536))

/* Blocks of 16 words (128 values): how many for k values. */
static inline int blocks_of(int k) { return (k / 8 + 15) / 16; }

/* One row's grid: for block b, piece p (0 hi, 1 mid, 2 lo), the 64 bytes that the
 * block's low nibbles multiply (byte 4j + t: value 8 (16b + j) + 2t) and then the
 * 64 its high nibbles multiply (value + 1), so a group of 32 values puts its even
 * values' bytes in 16 bytes side by side and its odd values' 64 further; missing
 * words' bytes are zero. Also the step of each word (lane) of each block, and the
 * float sums of x per weight group. */
TI8 static void layout_row(int k, const float *x, int group, int8_t *xq, float *xstep,
                           float *xsum) {
    int blocks = blocks_of(k);
    memset(xq, 0, (size_t)blocks * BLOCK_BYTES);
    memset(xstep, 0, sizeof(float) * blocks * 16);
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                            28, 30);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    for (int g = 0; g < k / XGROUP; g++) {
        __m512 a = _mm512_loadu_ps(x + g * XGROUP), b = _mm512_loadu_ps(x + g * XGROUP + 16);
        float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        /* max ignores a nan: look for one (x != x) */
        if (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q))
            top = NAN;
        int e = 0;
        float step = 1.0f;
        __m512i X[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        if (!isfinite(top)) {
            step = NAN; /* inf or nan in: nan out, as the float loops give */
        } else if (top > 0.0f) {
            frexpf(top, &e); /* top < 2^e */
            if (e < -100) e = -100; /* so that the step stays a normal float */
            if (ldexpf(top, 23 - e) > (float)TOP) e++; /* three signed bytes hold TOP */
            step = ldexpf(1.0f, e - 23);
            __m512 up = _mm512_set1_ps((float)(23 - e));
            X[0] = _mm512_cvtps_epi32(_mm512_scalef_ps(a, up)); /* exact, then rounded */
            X[1] = _mm512_cvtps_epi32(_mm512_scalef_ps(b, up));
        }
        int8_t *at = xq + (long)(g / 4) * BLOCK_BYTES + (g % 4) * 16;
        for (int p = 2; p >= 0; p--) { /* lo, mid, hi: each the rest's low byte, signed */
            __m512i piece[2];
            for (int h = 0; h < 2; h++) {
                piece[h] = _mm512_srai_epi32(_mm512_slli_epi32(X[h], 24), 24);
                X[h] = _mm512_srai_epi32(_mm512_sub_epi32(X[h], piece[h]), 8);
            }
            __m512i even = _mm512_permutex2var_epi32(piece[0], evens, piece[1]);
            __m512i odd = _mm512_permutex2var_epi32(piece[0], odds, piece[1]);
            _mm_storeu_si128((__m128i *)(at + p * 128), _mm512_cvtepi32_epi8(even));
            _mm_storeu_si128((__m128i *)(at + p * 128 + 64), _mm512_cvtepi32_epi8(odd));
        }
        for (int j = 0; j < 4; j++) xstep[(g / 4) * 16 + (g % 4) * 4 + j] = step;
    }
    for (int g = 0; g < k / group; g++) {
        float s = 0.0f;
        for (int i = 0; i < group; i++) s += x[g * group + i];
        xsum[g] = s;
    }
}

/* `count` (1..16) scales or biases from `p` + base as floats, the other lanes 0
 * (masked loads: nothing is read past the row's last group). */
TI8 static inline __m512 params16(const void *p, int dtype, long base, int count) {
    __mmask16 keep = count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1);
    if (dtype == F32) return _mm512_maskz_loadu_ps(keep, (const float *)p + base);
    __m256i h = _mm256_maskz_loadu_epi16(keep, (const uint16_t *)p + base);
    if (dtype == F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); /* bf16 */
}

/* Blocks b..b+u-1 of one output row into `lanes` (even or odd blocks' lanes). */
TI8 __attribute__((always_inline)) static inline void blocks_i8(
    const int m, const int u, int b, int words, int shift, const uint32_t *wn,
    const int8_t *xq, long qstride, const float *xstep, long sstride, const void *scales,
    int dtype, long gbase, int groups, const __m512i *idx, __m512 *even, __m512 *odd) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512i lo[4], hi[4], acc[4][MAX_ROWS];
    for (int j = 0; j < u; j++) {
        int left = words - (b + j) * 16;
        /* non-temporal: the weights pass through once a step, and would otherwise push
         * the KV cache and activations out of L3 (2-4% a step at the 0.6B shape) */
        _mm_prefetch((const char *)(wn + (b + j) * 16 + PREFETCH_WORDS), _MM_HINT_NTA);
        __m512i v = left >= 16 ? _mm512_loadu_si512(wn + (b + j) * 16)
                               : _mm512_maskz_loadu_epi32((__mmask16)((1u << left) - 1),
                                                          wn + (b + j) * 16);
        lo[j] = _mm512_and_si512(v, low);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < m; r++) acc[j][r] = _mm512_setzero_si512();
    }
    for (int p = 0; p < 3; p++) {
        if (p)
            for (int j = 0; j < u; j++)
                for (int r = 0; r < m; r++) acc[j][r] = _mm512_slli_epi32(acc[j][r], 8);
        for (int j = 0; j < u; j++)
            for (int r = 0; r < m; r++) {
                const int8_t *xb = xq + r * qstride + (long)(b + j) * BLOCK_BYTES + p * 128;
                acc[j][r] = _mm512_dpbusd_epi32(acc[j][r], lo[j], _mm512_loadu_si512(xb));
                acc[j][r] = _mm512_dpbusd_epi32(acc[j][r], hi[j], _mm512_loadu_si512(xb + 64));
            }
    }
    /* the scales of these blocks' groups (at most 16: 4 blocks of 4 groups), then
     * each lane's by a table lookup (idx: lane by lane, group of the lane's word) */
    int g0 = (b * 128) >> shift;
    __m512 sc16 = params16(scales, dtype, gbase + g0, groups - g0);
    for (int j = 0; j < u; j++) {
        __m512 sc = _mm512_permutexvar_ps(idx[j], sc16);
        __m512 *lanes = j & 1 ? odd : even;
        for (int r = 0; r < m; r++) {
            __m512 f = _mm512_mul_ps(sc, _mm512_loadu_ps(xstep + r * sstride + (b + j) * 16));
            lanes[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j][r]), f, lanes[r]);
        }
    }
}

TI8 __attribute__((always_inline)) static inline void row_i8_body(
    const int m, int n, int k, const int8_t *xq, const float *xstep, const float *xsum,
    const uint32_t *w, const void *scales, const void *biases, int dtype, int group, float *y,
    int ldy) {
    int words = k / 8, blocks = blocks_of(k), shift = group_shift(group), groups = k >> shift;
    const uint32_t *wn = w + (long)n * words;
    long qstride = (long)blocks * BLOCK_BYTES, sstride = (long)blocks * 16, gbase = (long)n * groups;
    __m512 lanes[MAX_ROWS], odd[MAX_ROWS];
    for (int r = 0; r < m; r++) lanes[r] = odd[r] = _mm512_setzero_ps();
    /* block j of four: lane l's word's group, from the first block's first group */
    const __m512i values = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(8));
    __m512i idx[4];
    for (int j = 0; j < 4; j++)
        idx[j] = _mm512_srli_epi32(_mm512_add_epi32(values, _mm512_set1_epi32(j * 128)), shift);
    const int u = m <= 2 ? 4 : m <= 4 ? 2 : 1;
    int b = 0;
    for (; b + u <= blocks; b += u) /* even blocks into lanes, odd ones into odd */
        blocks_i8(m, u, b, words, shift, wn, xq, qstride, xstep, sstride, scales, dtype, gbase,
                  groups, idx, b & 1 ? odd : lanes, b & 1 ? lanes : odd);
    for (; b < blocks; b++)
        blocks_i8(m, 1, b, words, shift, wn, xq, qstride, xstep, sstride, scales, dtype, gbase,
                  groups, idx, b & 1 ? odd : lanes, b & 1 ? odd : lanes);
    for (int r = 0; r < m; r++) lanes[r] = _mm512_add_ps(lanes[r], odd[r]);
    for (int g = 0; g < groups; g += 16) { /* the biases' part */
        __m512 bias = params16(biases, dtype, gbase + g, groups - g);
        __mmask16 keep = groups - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (groups - g)) - 1);
        for (int r = 0; r < m; r++)
            lanes[r] = _mm512_fmadd_ps(bias, _mm512_maskz_loadu_ps(keep, xsum + (long)r * groups + g),
                                       lanes[r]);
    }
    for (int r = 0; r < m; r++) {
        __m512 l = lanes[r];
        __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(l),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(l), 1)));
        __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
        __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
        y[(long)r * ldy + n] = _mm_cvtss_f32(h2) + _mm_cvtss_f32(_mm_shuffle_ps(h2, h2, 1));
    }
}

typedef void (*row_i8_fn)(int, int, const int8_t *, const float *, const float *,
                          const uint32_t *, const void *, const void *, int, int, float *, int);

#define ROW_I8(M)                                                                          \
    TI8 static void row_i8_##M(int n, int k, const int8_t *xq, const float *xstep,         \
                               const float *xsum, const uint32_t *w, const void *scales,   \
                               const void *biases, int dtype, int group, float *y,         \
                               int ldy) {                                                  \
        row_i8_body(M, n, k, xq, xstep, xsum, w, scales, biases, dtype, group, y, ldy);    \
    }
ROW_I8(1) ROW_I8(2) ROW_I8(3) ROW_I8(4) ROW_I8(5) ROW_I8(6) ROW_I8(7) ROW_I8(8)

static const row_i8_fn ROWS_I8[MAX_ROWS] = {row_i8_1, row_i8_2, row_i8_3, row_i8_4,
                                            row_i8_5, row_i8_6, row_i8_7, row_i8_8};

int dnet_have_int8(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

int dnet_int8_many(int m, int k, const float *x, int ldx, int dtype, int group,
                   const dnet_qpart *parts, int count) {
    if (!dnet_have_int8() || count < 1 || count > MAX_PARTS) return -1;
    int blocks = blocks_of(k), groups = k / group;
    size_t qbytes = (size_t)m * blocks * BLOCK_BYTES;
    size_t floats = (size_t)m * blocks * 16 + (size_t)m * groups;
    int8_t *xq = aligned_alloc(64, (qbytes + sizeof(float) * floats + 63) / 64 * 64);
    if (!xq) return -1;
    float *xstep = (float *)(xq + qbytes), *xsum = xstep + (size_t)m * blocks * 16;
    for (int r = 0; r < m; r++)
        layout_row(k, x + (long)r * ldx, group, xq + (long)r * blocks * BLOCK_BYTES,
                   xstep + (long)r * blocks * 16, xsum + (long)r * groups);
    /* The parts' rows as one range, split among the threads once. */
    int end[MAX_PARTS], total = 0;
    for (int i = 0; i < count; i++) end[i] = total += parts[i].n;
    long work = (long)total * k;
#pragma omp parallel for schedule(static) if (work >= 262144)
    for (int j = 0; j < total; j++) {
        int i = 0;
        while (j >= end[i]) i++;
        const dnet_qpart *p = &parts[i];
        ROWS_I8[m - 1](j - (end[i] - p->n), k, xq, xstep, xsum, p->w, p->scales, p->biases,
                       dtype, group, p->y, p->ldy);
    }
    free(xq);
    return 0;
}
#else
int dnet_have_int8(void) { return 0; }
int dnet_int8_many(int m, int k, const float *x, int ldx, int dtype, int group,
                   const dnet_qpart *parts, int count) {
    return -1;
}
#endif
