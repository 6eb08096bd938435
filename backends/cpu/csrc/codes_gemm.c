/* Small-M GEMM on quantized weights kept as int8 codes with one fp32 scale (and optionally one
 * fp32 offset) per group of G consecutive values of a row: the CPU backend's "tiled" GGUF layout
 * (backends/cpu/gguf_fast.py), where every GGUF type reads w[n, k] = codes[n, k] * scale[n, g] +
 * offset[n, g], g = k / G.
 *
 *   y[m, n] = sum_g scale[n, g] * (sum_{k in g} codes[n, k] * x[m, k]) + offset[n, g] * sx[m, g]
 *
 * with sx[m, g] = sum_{k in g} x[m, k]: the same product as x @ w.T in fp32 arithmetic, summed
 * in another order (no fp32 weight is formed), reading 1 byte per weight instead of 4. Each
 * group's codes are widened once and used for every row of x (M <= MAX_M), and output rows are
 * spread over OpenMP threads. Built at first use by backends/cpu/ckernels.py
 * (gcc -O3 -march=native -fopenmp); a machine without a C compiler keeps the torch paths. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VW 8
#else
#define VW 0
#endif

#define MAX_M 8

int codes_gemm_max_m(void) { return MAX_M; }

int codes_gemm_vector_width(void) { return VW; }

int codes_gemm_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Group sums of x: sx[m * groups + g] = sum of x[m, g * G .. g * G + G). */
static void group_sums(const float *x, int64_t ldx, int64_t m_rows, int64_t groups, int64_t G,
                       float *sx) {
    for (int64_t m = 0; m < m_rows; m++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t j = 0; j < G; j++) s += x[m * ldx + g * G + j];
            sx[m * groups + g] = s;
        }
}

#if VW == 16
static inline __m512 widen16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif VW == 8
static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* One output row n for M_ rows of x (M_ a compile-time constant in each instance). */
#define ROW_KERNEL(M_)                                                                          \
    static void row_##M_(const int8_t *c, const float *sc, const float *of,                     \
                         int64_t G, const float *x, int64_t ldx, const float *sx,               \
                         int64_t groups, float *y, int64_t ldy, int64_t n) {                    \
        float zacc[M_];                                                                         \
        for (int m = 0; m < M_; m++) zacc[m] = 0.0f;                                            \
        ROW_BODY(M_)                                                                            \
        if (of)                                                                                 \
            for (int64_t g = 0; g < groups; g++)                                                \
                for (int m = 0; m < M_; m++) zacc[m] += of[g] * sx[m * groups + g];             \
        for (int m = 0; m < M_; m++) y[m * ldy + n] = ROW_RESULT(m) + zacc[m];                  \
    }

#if VW == 16
#define ROW_BODY(M_)                                                                            \
    __m512 acc[M_];                                                                             \
    for (int m = 0; m < M_; m++) acc[m] = _mm512_setzero_ps();                                  \
    for (int64_t g = 0; g < groups; g++) {                                                      \
        const int8_t *cg = c + g * G;                                                           \
        const __m512 s = _mm512_set1_ps(sc[g]);                                                 \
        __m512 t[M_];                                                                           \
        for (int m = 0; m < M_; m++) t[m] = _mm512_setzero_ps();                                \
        for (int64_t j = 0; j < G; j += 16) {                                                   \
            const __m512 w = widen16(cg + j);                                                   \
            for (int m = 0; m < M_; m++)                                                        \
                t[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * ldx + g * G + j), t[m]);      \
        }                                                                                       \
        for (int m = 0; m < M_; m++) acc[m] = _mm512_fmadd_ps(s, t[m], acc[m]);                 \
    }
#define ROW_RESULT(m) _mm512_reduce_add_ps(acc[m])
#elif VW == 8
#define ROW_BODY(M_)                                                                            \
    __m256 acc[M_];                                                                             \
    for (int m = 0; m < M_; m++) acc[m] = _mm256_setzero_ps();                                  \
    for (int64_t g = 0; g < groups; g++) {                                                      \
        const int8_t *cg = c + g * G;                                                           \
        const __m256 s = _mm256_set1_ps(sc[g]);                                                 \
        __m256 t[M_];                                                                           \
        for (int m = 0; m < M_; m++) t[m] = _mm256_setzero_ps();                                \
        for (int64_t j = 0; j < G; j += 8) {                                                    \
            const __m256 w = widen8(cg + j);                                                    \
            for (int m = 0; m < M_; m++)                                                        \
                t[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + g * G + j), t[m]);      \
        }                                                                                       \
        for (int m = 0; m < M_; m++) acc[m] = _mm256_fmadd_ps(s, t[m], acc[m]);                 \
    }
#define ROW_RESULT(m) hsum8(acc[m])
#else
#define ROW_BODY(M_)                                                                            \
    float acc[M_];                                                                              \
    for (int m = 0; m < M_; m++) acc[m] = 0.0f;                                                 \
    for (int64_t g = 0; g < groups; g++) {                                                      \
        const int8_t *cg = c + g * G;                                                           \
        for (int m = 0; m < M_; m++) {                                                          \
            float t = 0.0f;                                                                     \
            for (int64_t j = 0; j < G; j++) t += (float)cg[j] * x[m * ldx + g * G + j];         \
            acc[m] += sc[g] * t;                                                                \
        }                                                                                       \
    }
#define ROW_RESULT(m) acc[m]
#endif

ROW_KERNEL(1)
ROW_KERNEL(2)
ROW_KERNEL(3)
ROW_KERNEL(4)
ROW_KERNEL(5)
ROW_KERNEL(6)
ROW_KERNEL(7)
ROW_KERNEL(8)

typedef void (*row_fn)(const int8_t *, const float *, const float *, int64_t, const float *,
                       int64_t, const float *, int64_t, float *, int64_t, int64_t);
static const row_fn ROWS[MAX_M + 1] = {0, row_1, row_2, row_3, row_4, row_5, row_6, row_7, row_8};

/* codes int8 [N, K], scale fp32 [N, K / G], offset fp32 [N, K / G] or NULL, x fp32 [M, K] with
 * row stride ldx, y fp32 [M, N] with row stride ldy, sx scratch fp32 [M, K / G] (NULL: the
 * kernel finds its own); threads: the OpenMP team size (the caller's torch.get_num_threads()).
 * Returns 0, or -1 for arguments it cannot take (the caller checks them first), -2 when no
 * scratch could be allocated. */
#define SX_STACK 4096
int codes_gemm(const int8_t *codes, const float *scale, const float *offset, int64_t N, int64_t K,
               int64_t G, const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy,
               float *sx, int threads) {
    if (M < 1 || M > MAX_M || G < 1 || K % G != 0 || (VW && G % VW != 0) || threads < 1)
        return -1;
    const int64_t groups = K / G;
    float sx_stack[SX_STACK];
    float *owned = 0;
    if (offset && !sx) {
        if (M * groups <= SX_STACK) {
            sx = sx_stack;
        } else {
            owned = (float *)malloc((size_t)(M * groups) * sizeof(float));
            if (!owned) return -2;
            sx = owned;
        }
    }
    if (offset) group_sums(x, ldx, M, groups, G, sx);
    const row_fn row = ROWS[M];
    const float *sums = sx;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        row(codes + n * K, scale + n * groups, offset ? offset + n * groups : 0, G, x, ldx, sums,
            groups, y, ldy, n);
    free(owned);
    return 0;
}
