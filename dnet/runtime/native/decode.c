/* One decode step of the dense llama/qwen layer, whole, for a few rows (or a short
 * prefill chunk of one request): the layers a slice holds, one after another, in
 * one call and without MLX.
 *
 * Built into one library with qgemv.c, whose products it calls. Per layer:
 *
 *   h = x + o(attention(rope(norm_q(q(rms(x)))), rope(norm_k(k(rms(x)))), v(rms(x))))
 *   x = h + down(silu(gate(rms(h))) * up(rms(h)))
 *
 * what mlx_lm's llama, qwen2 and qwen3 blocks compute, in float32. The keys and
 * values are written into mlx_lm's own cache arrays (KVCache or BatchKVCache), at
 * the slots the caller gives each row (see dnet_decode_layers), so that steps
 * here and prefill by MLX share them. Rotary angles come from MLX's
 * own rope as a table of cosines and sines per row (dnet.runtime.fused), so every
 * rope variant MLX implements gives the same angles here.
 *
 * The order of each sum is fixed and does not depend on the number of rows: a
 * row's result is the same alone or batched.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qgemv.h"



typedef struct {
    const uint32_t *w;
    const void *scales, *biases;
    const float *bias; /* an added bias (qwen2's q, k, v), or NULL */
    int32_t n, k, dtype, bits, group, pad;
} dnet_qmatrix;

typedef struct {
    const float *attn_norm, *mlp_norm; /* [hidden] */
    const float *q_norm, *k_norm;      /* [head_dim] (qwen3), or NULL */
    dnet_qmatrix q, k, v, o, gate, up, down;
} dnet_layer;

typedef struct {
    int32_t hidden, heads, kv_heads, head_dim, inter, rope_dims, rope_traditional, pad;
    float eps, qk_eps, scale, pad2;
} dnet_shape;

/* Where a layer's cache is: element strides of [batch, kv head, slot] (the head
 * dimension is contiguous). */
typedef struct {
    float *keys, *values;
    int64_t kb, kh, kt, vb, vh, vt;
} dnet_kv;

static int product(const dnet_qmatrix *m, int rows, const float *x, float *y) {
    for (int r = 0; r < rows; r += MAX_ROWS) {
        int n = rows - r < MAX_ROWS ? rows - r : MAX_ROWS;
        if (dnet_qgemv(n, m->n, m->k, x + (long)r * m->k, m->k, m->w, m->scales, m->biases,
                       m->dtype, m->bits, m->group, y + (long)r * m->n, m->n))
            return -1;
    }
    if (m->bias)
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < m->n; j++) y[(long)r * m->n + j] += m->bias[j];
    return 0;
}

/* Products of one x by `count` matrices (q, k, v; gate, up): x laid out once and
 * all their rows split among the threads at once, where the matrices are alike
 * (same k and quantization); one by one where they are not. */
static int products(const dnet_qmatrix *const *ms, float *const *ys, int count, int rows,
                    const float *x) {
    const dnet_qmatrix *a = ms[0];
    for (int i = 1; i < count; i++)
        if (ms[i]->k != a->k || ms[i]->dtype != a->dtype || ms[i]->bits != a->bits ||
            ms[i]->group != a->group) {
            for (int j = 0; j < count; j++)
                if (product(ms[j], rows, x, ys[j])) return -1;
            return 0;
        }
    for (int r = 0; r < rows; r += MAX_ROWS) {
        int n = rows - r < MAX_ROWS ? rows - r : MAX_ROWS;
        dnet_qpart parts[MAX_PARTS];
        for (int i = 0; i < count; i++)
            parts[i] = (dnet_qpart){ms[i]->n, ms[i]->w, ms[i]->scales, ms[i]->biases,
                                    ys[i] + (long)r * ms[i]->n, ms[i]->n};
        if (dnet_qgemv_many(n, a->k, x + (long)r * a->k, a->k, a->dtype, a->bits, a->group,
                            parts, count))
            return -1;
    }
    for (int i = 0; i < count; i++)
        if (ms[i]->bias)
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < ms[i]->n; j++) ys[i][(long)r * ms[i]->n + j] += ms[i]->bias[j];
    return 0;
}

/* y = x / sqrt(mean(x^2) + eps) * w, as mx.fast.rms_norm. */
static void rms(int n, const float *x, const float *w, float eps, float *y) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += x[i] * x[i];
    float inv = 1.0f / sqrtf(s / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = w[i] * (x[i] * inv);
}

/* Rotate the first `dims` values of a head by the row's table: cos[i], sin[i] for
 * pair i, pairs (i, i + dims/2), or (2i, 2i + 1) when traditional. */
static void rope(float *x, int dims, int traditional, const float *cs, const float *sn) {
    int half = dims / 2;
    for (int i = 0; i < half; i++) {
        int a = traditional ? 2 * i : i, b = traditional ? 2 * i + 1 : i + half;
        float x1 = x[a], x2 = x[b];
        x[a] = x1 * cs[i] - x2 * sn[i];
        x[b] = x1 * sn[i] + x2 * cs[i];
    }
}

/* attention.c */
void dnet_attend(const float *q, int n, const float *keys, int64_t kt, const float *values,
                 int64_t vt, int first, int last, int d, float scale, float *p, float *out);

typedef struct {
    float *h, *q, *k, *v, *a, *g, *u, *p;
} scratch;

/* Where each row of a step goes: its row of the cache arrays (batch), the slot its
 * key and value are written to, and the first slot it attends (it attends up to
 * its own). A batched decode step: rows of different batch rows, one slot. A
 * prefill chunk of one request: rows of batch row 0 at consecutive slots, so row
 * r attends the rows before it (causal). */
typedef struct {
    const int32_t *batch, *slot, *first;
    int most; /* the largest slot + 1 */
} places;

static int attention_block(const dnet_shape *s, const dnet_layer *l, const dnet_kv *kv,
                           int rows, float *x, const places *at, const float *cos_t,
                           const float *sin_t, scratch *w) {
    int hd = s->head_dim, hq = s->heads * hd, hk = s->kv_heads * hd, half = s->rope_dims / 2;
    for (int r = 0; r < rows; r++)
        rms(s->hidden, x + (long)r * s->hidden, l->attn_norm, s->eps, w->h + (long)r * s->hidden);
    const dnet_qmatrix *qkv[3] = {&l->q, &l->k, &l->v};
    float *out[3] = {w->q, w->k, w->v};
    if (products(qkv, out, 3, rows, w->h)) return -1;
    for (int r = 0; r < rows; r++) {
        const float *cs = cos_t + (long)r * half, *sn = sin_t + (long)r * half;
        for (int h = 0; h < s->heads; h++) {
            float *qh = w->q + (long)r * hq + h * hd;
            if (l->q_norm) rms(hd, qh, l->q_norm, s->qk_eps, qh);
            rope(qh, s->rope_dims, s->rope_traditional, cs, sn);
        }
        for (int h = 0; h < s->kv_heads; h++) {
            float *kh = w->k + (long)r * hk + h * hd;
            if (l->k_norm) rms(hd, kh, l->k_norm, s->qk_eps, kh);
            rope(kh, s->rope_dims, s->rope_traditional, cs, sn);
            long b = at->batch[r], t = at->slot[r];
            memcpy(kv->keys + b * kv->kb + h * kv->kh + t * kv->kt, kh, sizeof(float) * hd);
            memcpy(kv->values + b * kv->vb + h * kv->vh + t * kv->vt,
                   w->v + (long)r * hk + h * hd, sizeof(float) * hd);
        }
    }
    int group = s->heads / s->kv_heads, span = at->most;
    long work = (long)rows * s->heads * span * hd;
#pragma omp parallel for schedule(static) if (work >= 65536)
    for (int rg = 0; rg < rows * s->kv_heads; rg++) {
        int r = rg / s->kv_heads, g = rg % s->kv_heads, h = g * group;
        long b = at->batch[r];
        dnet_attend(w->q + (long)r * hq + h * hd, group, kv->keys + b * kv->kb + g * kv->kh, kv->kt,
               kv->values + b * kv->vb + g * kv->vh, kv->vt, at->first[r], at->slot[r], hd,
               s->scale, w->p + ((long)r * s->heads + h) * span, w->a + (long)r * hq + h * hd);
    }
    if (product(&l->o, rows, w->a, w->h)) return -1;
    for (long i = 0; i < (long)rows * s->hidden; i++) x[i] += w->h[i];
    return 0;
}

static int mlp_block(const dnet_shape *s, const dnet_layer *l, int rows, float *x, scratch *w) {
    for (int r = 0; r < rows; r++)
        rms(s->hidden, x + (long)r * s->hidden, l->mlp_norm, s->eps, w->h + (long)r * s->hidden);
    const dnet_qmatrix *gate_up[2] = {&l->gate, &l->up};
    float *out[2] = {w->g, w->u};
    if (products(gate_up, out, 2, rows, w->h)) return -1;
    for (long i = 0; i < (long)rows * s->inter; i++) {
        float g = w->g[i];
        w->g[i] = g * (1.0f / (1.0f + expf(-g))) * w->u[i];
    }
    if (product(&l->down, rows, w->g, w->h)) return -1;
    for (long i = 0; i < (long)rows * s->hidden; i++) x[i] += w->h[i];
    return 0;
}

/* Layers [0, count) for `rows` rows of x ([rows][hidden], updated in place): row
 * r's key and value go to slot slot[r] of batch row batch[r] of each layer's
 * cache, and it attends over slots [first[r], slot[r]] of that batch row; cos_t
 * and sin_t are [rows][rope_dims / 2]. Returns 0, or -1 (arguments it does not
 * take, or no memory). */
int dnet_decode_layers(const dnet_shape *s, const dnet_layer *layers, const dnet_kv *kv,
                       int count, int rows, float *x, const int32_t *batch,
                       const int32_t *slot, const int32_t *first, const float *cos_t,
                       const float *sin_t) {
    if (rows < 1 || s->kv_heads < 1 || s->heads % s->kv_heads) return -1;
    places at = {batch, slot, first, 0};
    for (int r = 0; r < rows; r++) {
        if (batch[r] < 0 || first[r] < 0 || slot[r] < first[r]) return -1;
        if (slot[r] + 1 > at.most) at.most = slot[r] + 1;
    }
    long hq = (long)s->heads * s->head_dim, hk = (long)s->kv_heads * s->head_dim;
    long wide = hq > s->hidden ? hq : s->hidden;
    long total = rows * (wide + hq + 2 * hk + hq + 2L * s->inter + (long)s->heads * at.most);
    float *buf = malloc(sizeof(float) * total);
    if (!buf) return -1;
    scratch w;
    w.h = buf;
    w.q = w.h + rows * wide;
    w.k = w.q + rows * hq;
    w.v = w.k + rows * hk;
    w.a = w.v + rows * hk;
    w.g = w.a + rows * hq;
    w.u = w.g + (long)rows * s->inter;
    w.p = w.u + (long)rows * s->inter;
    int status = 0;
    for (int i = 0; i < count && status == 0; i++) {
        status = attention_block(s, &layers[i], &kv[i], rows, x, &at, cos_t, sin_t, &w);
        if (status == 0) status = mlp_block(s, &layers[i], rows, x, &w);
    }
    free(buf);
    return status;
}
