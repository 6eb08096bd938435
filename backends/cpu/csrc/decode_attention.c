/* Paged attention for decode batches on fp32 caches: every sequence has one query token (at
 * position seq_len - 1), which attends to the sequence's KV tokens 0 .. seq_len - 1 (the last
 * `window` of them with a sliding window) straight from the paged caches, one (sequence, query
 * head) per OpenMP work item: the CPU backend's "c" attention (backends/cpu/cattention.py), where
 * torch needs a gather of the pages and an SDPA call per layer.
 *
 *   s_t = scale * q . k_t   (soft_cap: cap * tanh(s_t / cap))
 *   o   = sum_t exp(s_t - max s) v_t / sum_t exp(s_t - max s)
 *
 * fp32 throughout (expf, tanhf), summed in token order: the reference's values within fp32
 * roundoff, not its bits. Query head h reads KV head h / (Hq / Hk). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* q [S, Hq, D] contiguous; kc, vc [NB, BS, Hk, D] contiguous; tables int32 [S, max_blocks]
 * (row stride ld_table); seq_lens int32 [S]; qsl int32 [S + 1]; out [S, Hq, D]. window 0: none;
 * soft_cap 0: none. Returns 0; -1: not a decode batch (qsl is not 0, 1, .., S); -2: a seq_len
 * below 1 or past its table row; -3: a block id outside 0..NB-1; -4: bad sizes; -5: no memory.
 * Nothing is written unless 0. */
int decode_attention_f32(const float *q, const float *kc, const float *vc, const int32_t *tables,
                         int64_t ld_table, int64_t max_blocks, const int32_t *seq_lens,
                         const int32_t *qsl, int64_t S, int64_t Hq, int64_t Hk, int64_t D,
                         int64_t BS, int64_t NB, float scale, int64_t window, float soft_cap,
                         float *out, int threads) {
    if (S < 0 || Hq < 1 || Hk < 1 || Hq % Hk || D < 1 || BS < 1 || threads < 1) return -4;
    int64_t longest = 0;
    for (int64_t s = 0; s <= S; s++)
        if (qsl[s] != s) return -1;
    for (int64_t s = 0; s < S; s++) {
        const int64_t len = seq_lens[s];
        if (len < 1 || len > max_blocks * BS) return -2;
        for (int64_t b = 0; b < (len + BS - 1) / BS; b++) {
            const int32_t id = tables[s * ld_table + b];
            if (id < 0 || id >= NB) return -3;
        }
        if (len > longest) longest = len;
    }
    const int64_t group = Hq / Hk, row = Hk * D;
    float *scores = (float *)malloc((size_t)(threads * (longest > 0 ? longest : 1)) * sizeof(float));
    if (!scores) return -5;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < S * Hq; item++) {
        const int64_t s = item / Hq, h = item % Hq, kh = h / group;
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *sc = scores + tid * longest;
        const int64_t len = seq_lens[s];
        const int64_t first = (window > 0 && len > window) ? len - window : 0;
        const float *qv = q + (s * Hq + h) * D;
        const int32_t *tab = tables + s * ld_table;
        float m = -INFINITY;
        for (int64_t t = first; t < len; t++) {
            const float *kv = kc + (int64_t)tab[t / BS] * BS * row + (t % BS) * row + kh * D;
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++) dot += qv[d] * kv[d];
            float x = scale * dot;
            if (soft_cap > 0.0f) x = soft_cap * tanhf(x / soft_cap);
            sc[t] = x;
            if (x > m) m = x;
        }
        float l = 0.0f;
        float *o = out + (s * Hq + h) * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t t = first; t < len; t++) {
            const float e = expf(sc[t] - m);
            l += e;
            const float *vv = vc + (int64_t)tab[t / BS] * BS * row + (t % BS) * row + kh * D;
            for (int64_t d = 0; d < D; d++) o[d] += e * vv[d];
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; d++) o[d] *= inv;
    }
    free(scores);
    return 0;
}
