/* RMSNorm of fp32 rows, optionally after the residual add, in torch's arithmetic order: the CPU
 * backend's "c" rms_norm (backends/cpu/native.py), one call where torch takes ~8 small ops.
 *
 *   h = x + residual (if any), y[i] = (h[i] * (1 / sqrt(sum(h^2) / n + eps))) * w[i]
 *
 * Each square, product and sum rounded to fp32 (built with -ffp-contract=off), and sum(h^2) taken
 * in the order of torch's vectorized inner-dimension sum (ATen's cascade sum): `lanes`-wide
 * vectors, four interleaved vector accumulators summed through cascade levels, leftover vectors
 * into the first, the four combined, then the scalar tail, then the lanes one by one. The lane
 * width torch used is found by the loader's self-check (backends/cpu/ckernels.py), which keeps
 * this kernel only if it gives torch's bits; rows of fewer than 16 or more than 16384 values are
 * left to torch (there its reduction takes other paths). */
#include <math.h>
#include <stdint.h>

#define MAX_LANES 16
#define LEVELS 4
#define ILP 4

static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t bits = 0;
    for (uint64_t v = (uint64_t)(x - 1); v; v >>= 1) bits++;
    return bits;
}

/* acc[k][l] += h[(row * ILP + k) * lanes + l]^2 for the ILP vectors of one row */
static inline void add_row(float acc[ILP][MAX_LANES], const float *h, int64_t row, int lanes) {
    for (int k = 0; k < ILP; k++)
        for (int l = 0; l < lanes; l++) {
            const float x = h[(row * ILP + k) * lanes + l];
            const float sq = x * x;
            acc[k][l] += sq;
        }
}

static float sum_squares(const float *h, int64_t n, int lanes) {
    const int64_t vecs = n / lanes, rows = vecs / ILP;
    const int64_t power = ceil_log2(rows) / LEVELS > 4 ? ceil_log2(rows) / LEVELS : 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    float acc[LEVELS][ILP][MAX_LANES] = {{{0}}};
    int64_t i = 0;
    while (i + step <= rows) {
        for (int64_t j = 0; j < step; j++, i++) add_row(acc[0], h, i, lanes);
        for (int j = 1; j < LEVELS; j++) { /* carry a full level into the next */
            for (int k = 0; k < ILP; k++)
                for (int l = 0; l < lanes; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if (i & (mask << (j * power))) break;
        }
    }
    for (; i < rows; i++) add_row(acc[0], h, i, lanes);
    for (int j = 1; j < LEVELS; j++)
        for (int k = 0; k < ILP; k++)
            for (int l = 0; l < lanes; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t v = rows * ILP; v < vecs; v++)
        for (int l = 0; l < lanes; l++) {
            const float x = h[v * lanes + l];
            const float sq = x * x;
            acc[0][0][l] += sq;
        }
    for (int k = 1; k < ILP; k++)
        for (int l = 0; l < lanes; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t t = vecs * lanes; t < n; t++) {
        const float sq = h[t] * h[t];
        total += sq;
    }
    for (int l = 0; l < lanes; l++) total += acc[0][0][l];
    return total;
}

/* x, residual (or NULL), h_out (with residual: x + residual goes here), y: fp32 [rows, n]
 * contiguous; w fp32 [n]. Returns 0; -1 for sizes it does not take. */
int rms_norm_f32(const float *x, const float *residual, float *h_out, const float *w, float *y,
                 int64_t rows, int64_t n, float eps, int lanes) {
    if (rows < 0 || n < 1 || lanes < 1 || lanes > MAX_LANES) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const float *h = x + r * n;
        if (residual) {
            float *hr = h_out + r * n;
            for (int64_t i = 0; i < n; i++) hr[i] = h[i] + residual[r * n + i];
            h = hr;
        }
        const float mean = sum_squares(h, n, lanes) / (float)n;
        const float inv = 1.0f / sqrtf(mean + eps);
        float *yr = y + r * n;
        for (int64_t i = 0; i < n; i++) {
            const float t = h[i] * inv;
            yr[i] = t * w[i];
        }
    }
    return 0;
}
