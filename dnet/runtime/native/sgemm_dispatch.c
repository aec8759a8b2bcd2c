/* cblas_sgemm for MLX's CPU backend, split by shape between two BLAS libraries.
 *
 * Skinny products (decode: a few rows against a weight matrix) go to the "small"
 * library (BLIS, whose unpacked kernels read each weight once however many rows
 * there are); everything else (prefill) goes to the "large" one (OpenBLAS).
 * Both are opened privately (RTLD_LOCAL) from the paths in DNET_BLAS_SMALL and
 * DNET_BLAS_LARGE; this library is loaded globally ahead of them, so MLX's
 * cblas_sgemm calls land here. Built at run time by dnet.runtime.blas.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);

static sgemm_fn small_sgemm, large_sgemm;
static int max_small_rows = 16;

static sgemm_fn open_sgemm(const char *path) {
    if (path == NULL || *path == '\0') return NULL;
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "dnet sgemm dispatch: %s\n", dlerror());
        return NULL;
    }
    return (sgemm_fn)dlsym(lib, "cblas_sgemm");
}

__attribute__((constructor)) static void dnet_sgemm_dispatch_init(void) {
    small_sgemm = open_sgemm(getenv("DNET_BLAS_SMALL"));
    large_sgemm = open_sgemm(getenv("DNET_BLAS_LARGE"));
    const char *rows = getenv("DNET_BLAS_SMALL_ROWS");
    if (rows != NULL && atoi(rows) > 0) max_small_rows = atoi(rows);
}

int dnet_sgemm_dispatch_ready(void) { return small_sgemm != NULL && large_sgemm != NULL; }

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    int rows = m < n ? m : n;
    sgemm_fn fn = rows <= max_small_rows ? small_sgemm : large_sgemm;
    fn(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
