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

/* The weight's values idx .. idx + VW - 1 of a row as fp32: W8 from int8 codes, W4 from 4-bit
 * codes two per byte (in each run of 32 values, byte j holds value j in its low nibble and value
 * j + 16 in its high one) plus `bias` (Q4_0's -8), the same integers as the int8 codes. */
#if VW == 16
static inline __m512 widen16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline __m512 nib16(const uint8_t *p, int high, int bias) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    if (high) b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(bias)));
}
#define W8(cv, idx, bias) widen16((const int8_t *)(cv) + (idx))
#define W4(cv, idx, bias) nib16((const uint8_t *)(cv) + ((idx) >> 5) * 16, ((idx) >> 4) & 1, bias)
#elif VW == 8
static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline __m256 nib8(const uint8_t *p, int high, int bias) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    if (high) b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(bias)));
}
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define W8(cv, idx, bias) widen8((const int8_t *)(cv) + (idx))
#define W4(cv, idx, bias)                                                                       \
    nib8((const uint8_t *)(cv) + ((idx) >> 5) * 16 + ((idx) & 15), ((idx) >> 4) & 1, bias)
#endif
/* One value, for the plain C build and the dequantize. */
static inline float one8(const void *cv, int64_t idx, int bias) {
    (void)bias;
    return (float)((const int8_t *)cv)[idx];
}
static inline float one4(const void *cv, int64_t idx, int bias) {
    const uint8_t byte = ((const uint8_t *)cv)[(idx >> 5) * 16 + (idx & 15)];
    return (float)((((idx >> 4) & 1) ? byte >> 4 : byte & 0x0F) + bias);
}

/* One output row n for M_ rows of x (M_ a compile-time constant in each instance); cv: the row's
 * codes, read through WIDEN / ONE (int8 or 4-bit). */
#define ROW_KERNEL(NAME, M_, BODY, WIDEN, ONE)                                                  \
    static void NAME##_##M_(const void *cv, const float *sc, const float *of, int64_t G,         \
                            const float *x, int64_t ldx, const float *sx, int64_t groups,       \
                            float *y, int64_t ldy, int64_t n, int bias) {                       \
        float zacc[M_];                                                                         \
        for (int m = 0; m < M_; m++) zacc[m] = 0.0f;                                            \
        BODY(M_, WIDEN, ONE)                                                                    \
        if (of)                                                                                 \
            for (int64_t g = 0; g < groups; g++)                                                \
                for (int m = 0; m < M_; m++) zacc[m] += of[g] * sx[m * groups + g];             \
        for (int m = 0; m < M_; m++) y[m * ldy + n] = ROW_RESULT(m) + zacc[m];                  \
    }

#if VW == 16
#define ROW_BODY(M_, WIDEN, ONE)                                                                \
    __m512 acc[M_];                                                                             \
    for (int m = 0; m < M_; m++) acc[m] = _mm512_setzero_ps();                                  \
    for (int64_t g = 0; g < groups; g++) {                                                      \
        const __m512 s = _mm512_set1_ps(sc[g]);                                                 \
        __m512 t[M_];                                                                           \
        for (int m = 0; m < M_; m++) t[m] = _mm512_setzero_ps();                                \
        for (int64_t j = 0; j < G; j += 16) {                                                   \
            const __m512 w = WIDEN(cv, g * G + j, bias);                                        \
            for (int m = 0; m < M_; m++)                                                        \
                t[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * ldx + g * G + j), t[m]);      \
        }                                                                                       \
        for (int m = 0; m < M_; m++) acc[m] = _mm512_fmadd_ps(s, t[m], acc[m]);                 \
    }
#define ROW_RESULT(m) _mm512_reduce_add_ps(acc[m])
/* 4-bit codes, 32 values a step: one widening of the run's 16 bytes to 32-bit lanes, whose low
 * 4 bits (then the next 4, after a shift) index a 16-entry table of the fp32 values bias + 0 ..
 * bias + 15 (vpermps reads only an index's low 4 bits): two ops per 16 values, as for int8
 * codes, and the same values multiplied in the same order (the same bits). */
#define ROW_BODY4(M_, WIDEN, ONE)                                                               \
    const __m512 table = _mm512_add_ps(                                                         \
        _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),                   \
        _mm512_set1_ps((float)bias));                                                           \
    __m512 acc[M_];                                                                             \
    for (int m = 0; m < M_; m++) acc[m] = _mm512_setzero_ps();                                  \
    for (int64_t g = 0; g < groups; g++) {                                                      \
        const __m512 s = _mm512_set1_ps(sc[g]);                                                 \
        __m512 t[M_];                                                                           \
        for (int m = 0; m < M_; m++) t[m] = _mm512_setzero_ps();                                \
        for (int64_t j = 0; j < G; j += 32) {                                                   \
            const __m512i d = _mm512_cvtepu8_epi32(                                             \
                _mm_loadu_si128((const __m128i *)((const uint8_t *)cv + (g * G + j) / 2)));     \
            const __m512 w0 = _mm512_permutexvar_ps(d, table);                                  \
            const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);            \
            for (int m = 0; m < M_; m++) {                                                      \
                const float *xm = x + m * ldx + g * G + j;                                      \
                t[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), t[m]);                          \
                t[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), t[m]);                     \
            }                                                                                   \
        }                                                                                       \
        for (int m = 0; m < M_; m++) acc[m] = _mm512_fmadd_ps(s, t[m], acc[m]);                 \
    }
#elif VW == 8
#define ROW_BODY(M_, WIDEN, ONE)                                                                \
    __m256 acc[M_];                                                                             \
    for (int m = 0; m < M_; m++) acc[m] = _mm256_setzero_ps();                                  \
    for (int64_t g = 0; g < groups; g++) {                                                      \
        const __m256 s = _mm256_set1_ps(sc[g]);                                                 \
        __m256 t[M_];                                                                           \
        for (int m = 0; m < M_; m++) t[m] = _mm256_setzero_ps();                                \
        for (int64_t j = 0; j < G; j += 8) {                                                    \
            const __m256 w = WIDEN(cv, g * G + j, bias);                                        \
            for (int m = 0; m < M_; m++)                                                        \
                t[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + g * G + j), t[m]);      \
        }                                                                                       \
        for (int m = 0; m < M_; m++) acc[m] = _mm256_fmadd_ps(s, t[m], acc[m]);                 \
    }
#define ROW_RESULT(m) hsum8(acc[m])
#else
#define ROW_BODY(M_, WIDEN, ONE)                                                                \
    float acc[M_];                                                                              \
    for (int m = 0; m < M_; m++) acc[m] = 0.0f;                                                 \
    for (int64_t g = 0; g < groups; g++) {                                                      \
        for (int m = 0; m < M_; m++) {                                                          \
            float t = 0.0f;                                                                     \
            for (int64_t j = 0; j < G; j++)                                                     \
                t += ONE(cv, g * G + j, bias) * x[m * ldx + g * G + j];                         \
            acc[m] += sc[g] * t;                                                                \
        }                                                                                       \
    }
#define ROW_RESULT(m) acc[m]
#endif

#ifndef ROW_BODY4
#define ROW_BODY4 ROW_BODY
#endif

#define ROW_KERNELS(NAME, BODY, WIDEN, ONE)                                                     \
    ROW_KERNEL(NAME, 1, BODY, WIDEN, ONE)                                                       \
    ROW_KERNEL(NAME, 2, BODY, WIDEN, ONE)                                                       \
    ROW_KERNEL(NAME, 3, BODY, WIDEN, ONE)                                                       \
    ROW_KERNEL(NAME, 4, BODY, WIDEN, ONE)                                                       \
    ROW_KERNEL(NAME, 5, BODY, WIDEN, ONE)                                                       \
    ROW_KERNEL(NAME, 6, BODY, WIDEN, ONE)                                                       \
    ROW_KERNEL(NAME, 7, BODY, WIDEN, ONE)                                                       \
    ROW_KERNEL(NAME, 8, BODY, WIDEN, ONE)
ROW_KERNELS(row8, ROW_BODY, W8, one8)
ROW_KERNELS(row4, ROW_BODY4, W4, one4)

typedef void (*row_fn)(const void *, const float *, const float *, int64_t, const float *,
                       int64_t, const float *, int64_t, float *, int64_t, int64_t, int);
static const row_fn ROWS8[MAX_M + 1] = {0,       row8_1, row8_2, row8_3, row8_4,
                                        row8_5, row8_6, row8_7, row8_8};
static const row_fn ROWS4[MAX_M + 1] = {0,       row4_1, row4_2, row4_3, row4_4,
                                        row4_5, row4_6, row4_7, row4_8};

#define SX_STACK 4096
static int gemm(const row_fn *rows, int64_t row_bytes, const void *codes, int bias,
                const float *scale, const float *offset, int64_t N, int64_t K, int64_t G,
                const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy, float *sx,
                int threads) {
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
    const row_fn row = rows[M];
    const float *sums = sx;
    const uint8_t *base = (const uint8_t *)codes;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        row(base + n * row_bytes, scale + n * groups, offset ? offset + n * groups : 0, G, x, ldx,
            sums, groups, y, ldy, n, bias);
    free(owned);
    return 0;
}

/* codes int8 [N, K], scale fp32 [N, K / G], offset fp32 [N, K / G] or NULL, x fp32 [M, K] with
 * row stride ldx, y fp32 [M, N] with row stride ldy, sx scratch fp32 [M, K / G] (NULL: the
 * kernel finds its own); threads: the OpenMP team size (the caller's torch.get_num_threads()).
 * Returns 0, or -1 for arguments it cannot take (the caller checks them first), -2 when no
 * scratch could be allocated. */
int codes_gemm(const int8_t *codes, const float *scale, const float *offset, int64_t N, int64_t K,
               int64_t G, const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy,
               float *sx, int threads) {
    return gemm(ROWS8, K, codes, 0, scale, offset, N, K, G, x, ldx, M, y, ldy, sx, threads);
}

/* codes_gemm on 4-bit codes two per byte, uint8 [N, K / 2] (see W4), each plus bias: the same
 * values as int8 codes, so the same sums in the same order (the same bits). G a multiple of 32. */
int codes4_gemm(const uint8_t *codes4, int bias, const float *scale, const float *offset,
                int64_t N, int64_t K, int64_t G, const float *x, int64_t ldx, int64_t M, float *y,
                int64_t ldy, float *sx, int threads) {
    if (G % 32 != 0) return -1;
    return gemm(ROWS4, K / 2, codes4, bias, scale, offset, N, K, G, x, ldx, M, y, ldy, sx,
                threads);
}

/* The fp32 weight rows [rows, K] of 4-bit codes: (code + bias) * scale (+ offset), each product
 * and sum rounded to fp32 as torch's codes.float() * scale + offset rounds them. */
int codes4_dequant(const uint8_t *codes4, int bias, const float *scale, const float *offset,
                   int64_t rows, int64_t K, int64_t G, float *out, int threads) {
    if (G < 32 || G % 32 != 0 || K % G != 0 || threads < 1) return -1;
    const int64_t groups = K / G;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = codes4 + r * (K / 2);
        for (int64_t g = 0; g < groups; g++) {
            const float s = scale[r * groups + g];
            for (int64_t j = 0; j < G; j++) {
                const float w = one4(c, g * G + j, bias) * s;
                out[r * K + g * G + j] = offset ? w + offset[r * groups + g] : w;
            }
        }
    }
    return 0;
}
