/* Skinny products with MLX affine-quantized weights: y[M][N] = x[M][K] . W^T for
 * up to MAX_ROWS rows of activations (a decode step), reading each packed weight
 * once and dequantizing it in registers.
 *
 * W is MLX's layout: row n holds K values of `bits` bits (4 or 8) packed little-end
 * first into uint32 words, and a scale and a bias per `group` values (32, 64 or
 * 128), as float32, float16 or bfloat16: w[n][i] = scale[n][g] * q[n][i] + bias[n][g].
 *
 * So y[r][n] = sum_g scale[n][g] * (sum_{i in g} q[n][i] x[r][i])
 *            + sum_g bias[n][g] * (sum_{i in g} x[r][i]).
 *
 * The x rows are first laid out to match the packing: eight words side by side in
 * a vector's lanes, and for each of a word's values one vector of the x values
 * they multiply. A block of eight words is then, per value position, a shift, a
 * mask, a conversion and one FMA per row.
 *
 * Each output element is summed in one fixed order whatever M is: a row's result
 * is the same alone or batched. Rows of W are split among threads (OpenMP) above a
 * size threshold.
 *
 * Where the CPU has AVX-512 VNNI, 4-bit weights take the integer loop of
 * qgemv_int8.c instead (level 3), a third of the operations per weight.
 */
#include "qgemv.h"

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float param(const void *p, int dtype, long i) {
    if (dtype == F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (dtype == F16) return half_to_float(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Values per word, and of those, which x each multiplies once laid out. */
static inline int per_word(int bits) { return 32 / bits; }

/* Lay x (M rows of K) out for blocks of `lanes` words (8, or 16 for AVX-512): for
 * block b, value position p and lane j, the x that word lanes*b+j's p-th value
 * multiplies; a last partial block is laid out the same, its missing lanes zero.
 * Also each row's sum per group. */
static void layout(int m, int k, const float *x, int ldx, int bits, int group, int lanes,
                   float *xl, float *xsum) {
    int vpw = per_word(bits), words = k / vpw, blocks = (words + lanes - 1) / lanes;
    for (int r = 0; r < m; r++) {
        const float *xr = x + (long)r * ldx;
        float *out = xl + (long)r * blocks * lanes * vpw;
        for (int b = 0; b < blocks; b++)
            for (int p = 0; p < vpw; p++)
                for (int j = 0; j < lanes; j++) {
                    int word = b * lanes + j;
                    out[((long)b * vpw + p) * lanes + j] =
                        word < words ? xr[word * vpw + p] : 0.0f;
                }
        for (int g = 0; g < k / group; g++) {
            float s = 0.0f;
            for (int i = 0; i < group; i++) s += xr[g * group + i];
            xsum[(long)r * (k / group) + g] = s;
        }
    }
}

/* Portable: one output row n for m rows. */
static void row_scalar(int m, int n, int k, const float *xl, const float *xsum,
                       const uint32_t *w, const void *scales, const void *biases, int dtype,
                       int bits, int group, float *y, int ldy) {
    int vpw = per_word(bits), words = k / vpw, blocks = (words + 7) / 8, groups = k / group;
    uint32_t mask = (1u << bits) - 1;
    const uint32_t *wn = w + (long)n * words;
    for (int r = 0; r < m; r++) {
        const float *xr = xl + (long)r * blocks * 8 * vpw;
        float lanes[8] = {0};
        for (int b = 0; b < blocks; b++) {
            float acc[8] = {0}, sc[8];
            for (int j = 0; j < 8; j++) {
                int word = b * 8 + j;
                sc[j] = word < words ? param(scales, dtype, (long)n * groups + word * vpw / group)
                                     : 0.0f;
            }
            for (int p = 0; p < vpw; p++)
                for (int j = 0; j < 8; j++) {
                    int word = b * 8 + j;
                    uint32_t v = word < words ? wn[word] : 0;
                    acc[j] += (float)((v >> (p * bits)) & mask) * xr[((long)b * vpw + p) * 8 + j];
                }
            for (int j = 0; j < 8; j++) lanes[j] += acc[j] * sc[j];
        }
        float s = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
                  ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
        float bsum = 0.0f;
        for (int g = 0; g < groups; g++)
            bsum += param(biases, dtype, (long)n * groups + g) * xsum[(long)r * groups + g];
        y[(long)r * ldy + n] = s + bsum;
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

/* A row's scales or biases as float32, eight at a time where the type allows. */
__attribute__((target("avx2,fma,f16c"))) static inline void params_row(
    const void *p, int dtype, long base, int count, float *out) {
    int i = 0;
    if (dtype == F32) {
        memcpy(out, (const float *)p + base, sizeof(float) * count);
        return;
    }
    if (dtype == F16)
        for (; i + 8 <= count; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                          (const __m128i *)((const uint16_t *)p + base + i))));
    for (; i < count; i++) out[i] = param(p, dtype, base + i);
}

/* The scale of each lane's word in the block starting at word `first`: one scale
 * for the block (a group is 8 or more words) or two (4-bit values in groups of 32). */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 scale_lanes(
    const float *sf, int first, int words, int vpw, int gshift) {
    int g = (first * vpw) >> gshift;
    if (first + 8 <= words) {
        if (((1 << gshift) / vpw) >= 8) return _mm256_broadcast_ss(sf + g);
        return _mm256_setr_m128(_mm_broadcast_ss(sf + g), _mm_broadcast_ss(sf + g + 1));
    }
    float sc[8];
    for (int j = 0; j < 8; j++) sc[j] = first + j < words ? sf[((first + j) * vpw) >> gshift] : 0.0f;
    return _mm256_loadu_ps(sc);
}

/* The sums of row_scalar in the same order, eight lanes at a time (fused
 * multiply-adds: the last bits may differ from the portable loop's). Inlined into
 * one function per (rows, bits), so that the accumulators stay in registers and
 * the shifts are constants. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void row_avx2_body(
    const int m, const int bits, int n, int k, const float *xl, const float *xsum,
    const uint32_t *w, const void *scales, const void *biases, int dtype, int group, float *y,
    int ldy) {
    const int vpw = 32 / bits, gshift = group_shift(group);
    int words = k / vpw, blocks = (words + 7) / 8, groups = k >> gshift;
    const uint32_t *wn = w + (long)n * words;
    long stride = (long)blocks * 8 * vpw;
    float sf[groups + 8], bf[groups + 8];
    params_row(scales, dtype, (long)n * groups, groups, sf);
    params_row(biases, dtype, (long)n * groups, groups, bf);
    __m256 lanes[MAX_ROWS];
    for (int r = 0; r < m; r++) lanes[r] = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    int full = words / 8;
    /* `u` blocks at a time, their sums interleaved: each block's sum is a chain of
     * dependent FMAs, and one chain at a time left the FMA units waiting on their
     * latency (6 GB/s a core). The order of every sum is unchanged. */
    const int u = m <= 2 ? 4 : m <= 4 ? 2 : 1;
    int b = 0;
    for (; b + u <= full; b += u) {
        __m256i v[4];
        __m256 acc[4][MAX_ROWS];
        for (int j = 0; j < u; j++) {
            if (((b + j) & 1) == 0) /* a cache line is two blocks */
                _mm_prefetch((const char *)(wn + (b + j) * 8 + PREFETCH_WORDS), _MM_HINT_T0);
            v[j] = _mm256_loadu_si256((const __m256i *)(wn + (b + j) * 8));
            for (int r = 0; r < m; r++) acc[j][r] = _mm256_setzero_ps();
        }
        for (int p = 0; p < vpw; p++)
            for (int j = 0; j < u; j++) {
                const float *xb = xl + (long)(b + j) * vpw * 8 + p * 8;
                __m256 q = _mm256_cvtepi32_ps(
                    _mm256_and_si256(_mm256_srli_epi32(v[j], p * bits), mask));
                for (int r = 0; r < m; r++)
                    acc[j][r] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xb + r * stride), acc[j][r]);
            }
        for (int j = 0; j < u; j++) {
            __m256 sc = scale_lanes(sf, (b + j) * 8, words, vpw, gshift);
            for (int r = 0; r < m; r++) lanes[r] = _mm256_fmadd_ps(acc[j][r], sc, lanes[r]);
        }
    }
    for (; b < blocks; b++) {
        __m256i v;
        if (b < full) {
            v = _mm256_loadu_si256((const __m256i *)(wn + b * 8));
        } else {
            uint32_t tail[8] = {0};
            memcpy(tail, wn + b * 8, (size_t)(words - b * 8) * 4);
            v = _mm256_loadu_si256((const __m256i *)tail);
        }
        __m256 sc = scale_lanes(sf, b * 8, words, vpw, gshift);
        __m256 acc[MAX_ROWS];
        for (int r = 0; r < m; r++) acc[r] = _mm256_setzero_ps();
        const float *xb = xl + (long)b * vpw * 8;
        for (int p = 0; p < vpw; p++) {
            __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, p * bits), mask));
            for (int r = 0; r < m; r++)
                acc[r] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xb + p * 8 + r * stride), acc[r]);
        }
        for (int r = 0; r < m; r++) lanes[r] = _mm256_fmadd_ps(acc[r], sc, lanes[r]);
    }
    for (int r = 0; r < m; r++) {
        /* The biases' part in eight lanes too, then one fixed reduction. */
        const float *xs = xsum + (long)r * groups;
        int g = 0;
        for (; g + 8 <= groups; g += 8)
            lanes[r] = _mm256_fmadd_ps(_mm256_loadu_ps(bf + g), _mm256_loadu_ps(xs + g), lanes[r]);
        float l[8];
        _mm256_storeu_ps(l, lanes[r]);
        float s = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
        for (; g < groups; g++) s += bf[g] * xs[g];
        y[(long)r * ldy + n] = s;
    }
}

typedef void (*row_fn)(int, int, const float *, const float *, const uint32_t *, const void *,
                       const void *, int, int, float *, int);

#define ROW(M, B)                                                                          \
    __attribute__((target("avx2,fma,f16c"))) static void row_##M##_##B(                  \
        int n, int k, const float *xl, const float *xsum, const uint32_t *w,             \
        const void *scales, const void *biases, int dtype, int group, float *y, int ldy) { \
        row_avx2_body(M, B, n, k, xl, xsum, w, scales, biases, dtype, group, y, ldy);    \
    }
ROW(1, 4) ROW(2, 4) ROW(3, 4) ROW(4, 4) ROW(5, 4) ROW(6, 4) ROW(7, 4) ROW(8, 4)
ROW(1, 8) ROW(2, 8) ROW(3, 8) ROW(4, 8) ROW(5, 8) ROW(6, 8) ROW(7, 8) ROW(8, 8)

static const row_fn ROWS4[MAX_ROWS] = {row_1_4, row_2_4, row_3_4, row_4_4,
                                       row_5_4, row_6_4, row_7_4, row_8_4};
static const row_fn ROWS8[MAX_ROWS] = {row_1_8, row_2_8, row_3_8, row_4_8,
                                       row_5_8, row_6_8, row_7_8, row_8_8};

/* The same sums over blocks of 16 words in AVX-512 registers: half the
 * instructions of the AVX2 loop for the same work (its own order, so a row's
 * result is the same alone or batched within this loop). */
#define T512 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw")))
/* Blocks b..b+u-1 of one output row into `lanes`; each block's sum in the order
 * the portable loop's comment gives, u of them interleaved. */
T512 __attribute__((always_inline)) static inline void blocks512(
    const int m, const int bits, const int u, int b, int words, int vpw, int group, int shift,
    const uint32_t *wn, const float *xl, long stride, const float *sf, __m512 table,
    __m512i mask, __m512i word_values, __m512 *even, __m512 *odd) {
    __m512i v[4];
    __m512 acc[4][MAX_ROWS];
    for (int j = 0; j < u; j++) {
        int left = words - (b + j) * 16;
        _mm_prefetch((const char *)(wn + (b + j) * 16 + PREFETCH_WORDS), _MM_HINT_T0);
        v[j] = left >= 16 ? _mm512_loadu_si512(wn + (b + j) * 16)
                          : _mm512_maskz_loadu_epi32((__mmask16)((1u << left) - 1),
                                                     wn + (b + j) * 16);
        for (int r = 0; r < m; r++) acc[j][r] = _mm512_setzero_ps();
    }
    for (int p = 0; p < vpw; p++)
        for (int j = 0; j < u; j++) {
            const float *xb = xl + (long)(b + j) * vpw * 16 + p * 16;
            /* 4 bits: the value's float by a table lookup, which reads only the low 4
             * bits of each lane (no mask, no conversion). */
            __m512 q = bits == 4 ? _mm512_permutexvar_ps(
                                       p ? _mm512_srli_epi32(v[j], p * bits) : v[j], table)
                                 : _mm512_cvtepi32_ps(_mm512_and_si512(
                                       _mm512_srli_epi32(v[j], p * bits), mask));
            for (int r = 0; r < m; r++)
                acc[j][r] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xb + r * stride), acc[j][r]);
        }
    for (int j = 0; j < u; j++) {
        int first = (b + j) * 16 * vpw; /* the block's first value */
        __m512i idx = _mm512_srli_epi32(
            _mm512_add_epi32(word_values, _mm512_set1_epi32(first & (group - 1))), shift);
        __m512 sc = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(sf + (first >> shift)));
        __m512 *lanes = j & 1 ? odd : even;
        for (int r = 0; r < m; r++) lanes[r] = _mm512_fmadd_ps(acc[j][r], sc, lanes[r]);
    }
}

T512 __attribute__((always_inline)) static inline void row_avx512_body(
    const int m, const int bits, int n, int k, const float *xl, const float *xsum,
    const uint32_t *w, const void *scales, const void *biases, int dtype, int group, float *y,
    int ldy) {
    const int vpw = 32 / bits;
    int words = k / vpw, blocks = (words + 15) / 16, groups = k >> group_shift(group);
    const uint32_t *wn = w + (long)n * words;
    long stride = (long)blocks * 16 * vpw;
    float sf[groups + 16], bf[groups + 16];
    params_row(scales, dtype, (long)n * groups, groups, sf);
    params_row(biases, dtype, (long)n * groups, groups, bf);
    if (words % 16) /* a partial last block: its empty lanes' scales must be finite */
        for (int i = groups; i < groups + 16; i++) sf[i] = 0.0f;
    /* Even and odd blocks add into lanes of their own (two chains of FMAs, not
     * one), added together at the end. */
    __m512 lanes[MAX_ROWS], odd[MAX_ROWS];
    for (int r = 0; r < m; r++) lanes[r] = odd[r] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i word_values = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(vpw));
    const int shift = group == 32 ? 5 : group == 64 ? 6 : 7;
    /* u blocks at a time (a constant, so the sums stay in registers), then the
     * rest one by one. */
    const int u = m <= 4 ? 4 : 2;
    int b = 0;
    for (; b + u <= blocks; b += u) /* b stays even */
        blocks512(m, bits, u, b, words, vpw, group, shift, wn, xl, stride, sf, table, mask,
                  word_values, lanes, odd);
    for (; b < blocks; b++)
        if (b & 1)
            blocks512(m, bits, 1, b, words, vpw, group, shift, wn, xl, stride, sf, table, mask,
                      word_values, odd, odd);
        else
            blocks512(m, bits, 1, b, words, vpw, group, shift, wn, xl, stride, sf, table, mask,
                      word_values, lanes, lanes);
    for (int r = 0; r < m; r++) lanes[r] = _mm512_add_ps(lanes[r], odd[r]);
    for (int r = 0; r < m; r++) {
        const float *xs = xsum + (long)r * groups;
        int g = 0;
        for (; g + 16 <= groups; g += 16)
            lanes[r] = _mm512_fmadd_ps(_mm512_loadu_ps(bf + g), _mm512_loadu_ps(xs + g), lanes[r]);
        /* l[i] + l[i + 8], then ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)),
         * in registers. */
        __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(lanes[r]),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                      _mm512_castps_pd(lanes[r]), 1)));
        __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
        __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
        float s = _mm_cvtss_f32(h2) + _mm_cvtss_f32(_mm_shuffle_ps(h2, h2, 1));
        for (; g < groups; g++) s += bf[g] * xs[g];
        y[(long)r * ldy + n] = s;
    }
}

#define ROW512(M, B)                                                                       \
    T512 static void row512_##M##_##B(int n, int k, const float *xl, const float *xsum,    \
                                      const uint32_t *w, const void *scales,               \
                                      const void *biases, int dtype, int group, float *y,  \
                                      int ldy) {                                           \
        row_avx512_body(M, B, n, k, xl, xsum, w, scales, biases, dtype, group, y, ldy);    \
    }
ROW512(1, 4) ROW512(2, 4) ROW512(3, 4) ROW512(4, 4) ROW512(5, 4) ROW512(6, 4) ROW512(7, 4)
ROW512(8, 4) ROW512(1, 8) ROW512(2, 8) ROW512(3, 8) ROW512(4, 8) ROW512(5, 8) ROW512(6, 8)
ROW512(7, 8) ROW512(8, 8)

static const row_fn ROWS512_4[MAX_ROWS] = {row512_1_4, row512_2_4, row512_3_4, row512_4_4,
                                           row512_5_4, row512_6_4, row512_7_4, row512_8_4};
static const row_fn ROWS512_8[MAX_ROWS] = {row512_1_8, row512_2_8, row512_3_8, row512_4_8,
                                           row512_5_8, row512_6_8, row512_7_8, row512_8_8};

static int have_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

static int have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
#else
static int have_avx2(void) { return 0; }
#endif

static int level = -1; /* 0: portable loop, 1: AVX2, 2: AVX-512, 3: VNNI (4-bit) */

static int best_level(void) {
#if defined(__x86_64__)
    if (have_avx512()) return dnet_have_int8() ? 3 : 2;
#endif
    return have_avx2();
}

/* The loop that runs here: 0 portable, 1 AVX2 and FMA, 2 AVX-512, 3 AVX-512 VNNI
 * for 4-bit weights (qgemv_int8.c; 8-bit weights take AVX-512). */
int dnet_qgemv_vectorized(void) {
    if (level < 0) level = getenv("DNET_QGEMV_PORTABLE") ? 0 : best_level();
    return level;
}

/* For tests: run the loop of `want` (as above), or the best below it the CPU has. */
void dnet_qgemv_use_vectors(int want) {
    int best = best_level();
    level = want < best ? want : best;
    if (level == 1 && !have_avx2()) level = 0;
    dnet_attend_use_wide(level >= 2); /* the fused step's attention, alike */
}

/* y = x . W^T. Returns 0, or -1 for arguments it does not take. */
int dnet_qgemv(int m, int n, int k, const float *x, int ldx, const uint32_t *w,
               const void *scales, const void *biases, int dtype, int bits, int group,
               float *y, int ldy) {
    if (m < 1 || m > MAX_ROWS || n < 1 || k < 1 || (bits != 4 && bits != 8) ||
        (group != 32 && group != 64 && group != 128) || k % group || dtype < F32 ||
        dtype > BF16)
        return -1;
    int vec = dnet_qgemv_vectorized();
    if (vec == 3 && bits == 4) {
        dnet_qpart part = {n, w, scales, biases, y, ldy};
        return dnet_int8_many(m, k, x, ldx, dtype, group, &part, 1);
    }
    if (vec == 3) vec = 2;
    int lanes = vec == 2 ? 16 : 8;
    int vpw = per_word(bits), blocks = (k / vpw + lanes - 1) / lanes;
    size_t laid = (size_t)m * blocks * lanes * vpw;
    float *xl = malloc(sizeof(float) * (laid + (size_t)m * (k / group)));
    if (!xl) return -1;
    float *xsum = xl + laid;
    layout(m, k, x, ldx, bits, group, lanes, xl, xsum);
    long work = (long)n * k;
#pragma omp parallel for schedule(static) if (work >= 262144)
    for (int j = 0; j < n; j++) {
#if defined(__x86_64__)
        if (vec == 2) {
            (bits == 4 ? ROWS512_4 : ROWS512_8)[m - 1](j, k, xl, xsum, w, scales, biases, dtype,
                                                       group, y, ldy);
            continue;
        }
        if (vec == 1) {
            (bits == 4 ? ROWS4 : ROWS8)[m - 1](j, k, xl, xsum, w, scales, biases, dtype, group,
                                               y, ldy);
            continue;
        }
#endif
        row_scalar(m, j, k, xl, xsum, w, scales, biases, dtype, bits, group, y, ldy);
    }
    free(xl);
    return 0;
}

int dnet_qgemv_many(int m, int k, const float *x, int ldx, int dtype, int bits, int group,
                    const dnet_qpart *parts, int count) {
    if (m < 1 || m > MAX_ROWS || k < 1 || (group != 32 && group != 64 && group != 128) ||
        k % group || dtype < F32 || dtype > BF16 || count < 1 || count > MAX_PARTS)
        return -1;
    for (int i = 0; i < count; i++)
        if (parts[i].n < 1) return -1;
    if (dnet_qgemv_vectorized() == 3 && bits == 4)
        return dnet_int8_many(m, k, x, ldx, dtype, group, parts, count);
    for (int i = 0; i < count; i++)
        if (dnet_qgemv(m, parts[i].n, k, x, ldx, parts[i].w, parts[i].scales, parts[i].biases,
                       dtype, bits, group, parts[i].y, parts[i].ldy))
            return -1;
    return 0;
}
