/* Paged attention for decode-like batches on fp32 caches: each sequence has 1 to MAX_QUERY query
 * tokens, its last ones (the last at position seq_len - 1: a decode step, or a speculative step's
 * last token and drafts); query token i of a sequence with q of them sits at position
 * p = seq_len - q + i and attends causally to the sequence's KV tokens 0 .. p (the last `window`
 * of them with a sliding window) straight from the paged caches, one (query token, query head)
 * per OpenMP work item: the CPU backend's "c" attention (backends/cpu/cattention.py), where torch
 * needs a gather of the pages and an SDPA call per layer.
 *
 *   s_t = scale * q . k_t   (soft_cap: cap * tanh(s_t / cap))
 *   o   = sum_t exp(s_t - max s) v_t / sum_t exp(s_t - max s)
 *
 * fp32 throughout (tanhf, an inlined exp within about 1 ulp of expf), each q . k in 16
 * interleaved partial sums (so the compiler vectorizes it; one running sum waited on every add's
 * latency), the outputs summed in token order, the pages walked block by block (no division per
 * token): the reference's values within fp32 roundoff, not its bits. Query head h reads KV head
 * h / (Hq / Hk). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16
#define MAX_QUERY 8 /* query tokens a sequence may have; more (a prefill chunk) is SDPA's work */

/* a . b over D values: lane l sums the products at d = l, l + 16, ..; the lanes then halve
 * pairwise (16 -> 8 -> 4 -> 2 -> 1); the products past the last whole 16 go in one by one. */
static inline float dot(const float *a, const float *b, int64_t D) {
    float acc[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[d + l] * b[d + l];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    float sum = acc[0];
    for (; d < D; d++) sum += a[d] * b[d];
    return sum;
}

/* exp(x) for x <= 0 (a score minus the row's max), branch-free so the loop over a row
 * vectorizes: x clamped at -87 (e^-87 ~ 1.6e-38: weights that small add nothing to a sum that
 * holds a 1), x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so n ln2 is exact enough),
 * e^r by its degree-7 Taylor-like minimax polynomial (Cephes' expf coefficients; about 1 ulp),
 * times 2^n built in the exponent bits. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * (r * r) + r) + 1.0f;
    union {
        int32_t i;
        float f;
    } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

/* q [T, Hq, D] contiguous (T = qsl[S]); kc, vc [NB, BS, Hk, D] contiguous; tables int32
 * [S, max_blocks] (row stride ld_table); seq_lens int32 [S]; qsl int32 [S + 1]; out [T, Hq, D].
 * window 0: none; soft_cap 0: none. Returns 0; -1: not such a batch (qsl does not start at 0,
 * or a sequence has no query token or more than MAX_QUERY; checked first), or a sequence has
 * more query tokens than its seq_len; -2: a seq_len below 1 or past its table row; -3: a block
 * id outside 0..NB-1; -4: bad sizes; -5: no memory. Nothing is written unless 0. */
int decode_attention_f32(const float *q, const float *kc, const float *vc, const int32_t *tables,
                         int64_t ld_table, int64_t max_blocks, const int32_t *seq_lens,
                         const int32_t *qsl, int64_t S, int64_t Hq, int64_t Hk, int64_t D,
                         int64_t BS, int64_t NB, float scale, int64_t window, float soft_cap,
                         float *out, int threads) {
    if (S < 0 || Hq < 1 || Hk < 1 || Hq % Hk || D < 1 || BS < 1 || threads < 1) return -4;
    int64_t longest = 0;
    if (qsl[0] != 0) return -1;
    for (int64_t s = 0; s < S; s++) {
        const int64_t nq = (int64_t)qsl[s + 1] - qsl[s];
        if (nq < 1 || nq > MAX_QUERY) return -1;
    }
    for (int64_t s = 0; s < S; s++) {
        const int64_t len = seq_lens[s];
        if (len < 1 || len > max_blocks * BS) return -2;
        for (int64_t b = 0; b < (len + BS - 1) / BS; b++) {
            const int32_t id = tables[s * ld_table + b];
            if (id < 0 || id >= NB) return -3;
        }
        if (len > longest) longest = len;
    }
    for (int64_t s = 0; s < S; s++) /* more query tokens than the sequence has: not ours */
        if ((int64_t)qsl[s + 1] - qsl[s] > seq_lens[s]) return -1;
    const int64_t group = Hq / Hk, row = Hk * D, T = S > 0 ? qsl[S] : 0;
    const size_t per_thread = (size_t)(longest > 0 ? longest : 1);
    float *scores = (float *)malloc((size_t)threads * per_thread * sizeof(float));
    int64_t *seq_of = (int64_t *)malloc((size_t)(T > 0 ? T : 1) * sizeof(int64_t));
    if (!scores || !seq_of) {
        free(scores);
        free(seq_of);
        return -5;
    }
    for (int64_t s = 0; s < S; s++)
        for (int64_t r = qsl[s]; r < qsl[s + 1]; r++) seq_of[r] = s;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < T * Hq; item++) {
        const int64_t r = item / Hq, h = item % Hq, kh = h / group, s = seq_of[r];
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *sc = scores + tid * longest;
        /* the query token's own position + 1: the tokens it sees (causal) */
        const int64_t len = seq_lens[s] - ((int64_t)qsl[s + 1] - 1 - r);
        const int64_t first = (window > 0 && len > window) ? len - window : 0;
        const float *qv = q + (r * Hq + h) * D;
        const int32_t *tab = tables + s * ld_table;
        /* tokens block by block: one table read and no division per token */
        float m = -INFINITY;
        for (int64_t b = first / BS, t = first; t < len; b++) {
            const float *kb = kc + (int64_t)tab[b] * BS * row + kh * D;
            for (int64_t j = t - b * BS; j < BS && t < len; j++, t++) {
                float x = scale * dot(qv, kb + j * row, D);
                if (soft_cap > 0.0f) x = soft_cap * tanhf(x / soft_cap);
                sc[t] = x;
                if (x > m) m = x;
            }
        }
        for (int64_t t = first; t < len; t++) sc[t] = exp_nonpositive(sc[t] - m);
        float l = 0.0f;
        float *o = out + (r * Hq + h) * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t b = first / BS, t = first; t < len; b++) {
            const float *vb = vc + (int64_t)tab[b] * BS * row + kh * D;
            for (int64_t j = t - b * BS; j < BS && t < len; j++, t++) {
                const float e = sc[t], *vv = vb + j * row;
                l += e;
                for (int64_t d = 0; d < D; d++) o[d] += e * vv[d];
            }
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; d++) o[d] *= inv;
    }
    free(scores);
    free(seq_of);
    return 0;
}
