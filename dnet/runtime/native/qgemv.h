/* What the quantized kernel's C files share (qgemv.c, qgemv_int8.c, decode.c,
 * attention.c): sizes, the scale types, group shifts, and the entry points they
 * call in one another. */
#ifndef DNET_QGEMV_H
#define DNET_QGEMV_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

enum { MAX_ROWS = 8, F32 = 0, F16 = 1, BF16 = 2 };

/* How far ahead along the weights the vector loops prefetch, in words (2 KiB):
 * the hardware's own prefetching left two threads at ~18 GB/s of packed weights
 * here, this at ~21 (94 MB of matrices, one row of activations). */
#ifndef PREFETCH_WORDS
#define PREFETCH_WORDS 512
#endif

#if defined(__x86_64__)
/* log2 of a group size (32, 64 or 128): groups are found by shifts, not by
 * divisions, which cost tens of cycles a block. */
static inline int group_shift(int group) { return group == 32 ? 5 : group == 64 ? 6 : 7; }

#endif

/* One matrix of several that multiply the same x (q, k and v; gate and up): n rows
 * of packed weights, scales and biases, and where its products go. */
typedef struct {
    int n;
    const uint32_t *w;
    const void *scales, *biases;
    float *y;
    int ldy;
} dnet_qpart;

enum { MAX_PARTS = 4 };

/* y = x . W^T for each part (same k, group and scale type), x laid out once and
 * the parts' rows split among the threads as one: by the int8 loop (qgemv_int8.c,
 * 4-bit weights, AVX-512 VNNI), 0, or -1 where it cannot run (no VNNI, no memory);
 * by whichever loop runs here (dnet_qgemv_many, qgemv.c). */
int dnet_qgemv(int m, int n, int k, const float *x, int ldx, const uint32_t *w,
               const void *scales, const void *biases, int dtype, int bits, int group,
               float *y, int ldy);
int dnet_int8_many(int m, int k, const float *x, int ldx, int dtype, int group,
                   const dnet_qpart *parts, int count);
int dnet_qgemv_many(int m, int k, const float *x, int ldx, int dtype, int bits, int group,
                    const dnet_qpart *parts, int count);
int dnet_have_int8(void);
void dnet_attend_use_wide(int on); /* attention.c */
#endif
