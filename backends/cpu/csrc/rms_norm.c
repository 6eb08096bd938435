/* RMSNorm over the last dimension of fp32 rows, optionally after a residual add, in one pass per
 * row: h = x (+ r), y = (h * (1 / sqrt(mean(h^2) + eps))) * w. fp32 throughout; the sum of
 * squares runs in 16 independent lanes (vectorized) added in a fixed order, so a row's result
 * does not depend on the other rows or the thread count. Built at first use by
 * backends/cpu/ckernels.py beside codes_gemm.c (same flags, no fp contraction). */
#include <math.h>
#include <stdint.h>

#define LANES 16

static float sum_squares(const float *h, int64_t H) {
    float acc[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= H; k += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += h[k + j] * h[k + j];
    float tail = 0.0f;
    for (; k < H; k++) tail += h[k] * h[k];
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += acc[j];
    return s + tail;
}

static void norm_row(const float *x, const float *r, const float *w, float *y, float *h,
                     int64_t H, float eps) {
    const float *src = x;
    if (r) { /* h = x + r, kept: the next residual */
        for (int64_t k = 0; k < H; k++) h[k] = x[k] + r[k];
        src = h;
    }
    const float inv = 1.0f / sqrtf(sum_squares(src, H) / (float)H + eps);
    for (int64_t k = 0; k < H; k++) y[k] = (src[k] * inv) * w[k];
}

/* x, r (or NULL), y, h (NULL when r is): contiguous fp32 [M, H]; w fp32 [H]. Returns 0, or -1
 * for arguments it cannot take. */
int rms_norm_f32(const float *x, const float *r, const float *w, float *y, float *h, int64_t M,
                 int64_t H, float eps, int threads) {
    if (M < 0 || H < 1 || !(eps > 0.0f) || threads < 1 || (r && !h)) return -1;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (M * H >= (1 << 16))
    for (int64_t m = 0; m < M; m++)
        norm_row(x + m * H, r ? r + m * H : 0, w, y + m * H, r ? h + m * H : 0, H, eps);
    return 0;
}
