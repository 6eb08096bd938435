/* One decoder layer of a GGUF model's decode step in one call (backends/cpu/decoder.py): the
 * C kernels the CPU backend's ops run (codes GEMM, RMSNorm, rotary + KV write, decode attention),
 * called through the function pointers of the libraries the backend loaded (the same code), on
 * the same inputs in the same order as `Backend.gguf_decoder_layers` composes the ops, so the
 * same bits. SiLU-and-mul stays with torch between two calls (its exp is torch's).
 *
 * decoder_layer_f32(L, prev, s, act, hidden, residual, first):
 *   act != NULL: hidden = prev->down(act)      (the previous layer's down projection)
 *   first:       residual = hidden; x = rms_norm(hidden)
 *   else:        residual = hidden + residual; x = rms_norm(residual)
 *   qkv = L->qkv(x); q, k rotated and k, v written to L's caches; a = attention(q)
 *   residual = L->o(a) + residual; x = rms_norm(residual); gu = L->gate_up(x)
 * Returns 0, or the failing stage's code: 100 + the codes GEMM's, 200 + rms_norm's, 300 +
 * rotary_kv's (-1: a position, -2: a slot out of range), 400 + the attention's (-2: a length,
 * -3: a block id out of range). */
#include <stdint.h>
#include <string.h>

typedef int (*codes_fn)(const void *, const float *, const float *, int64_t, int64_t, int64_t,
                        const float *, int64_t, int64_t, float *, int64_t, float *, int);
typedef int (*codes4_fn)(const void *, int, const float *, const float *, int64_t, int64_t,
                         int64_t, const float *, int64_t, int64_t, float *, int64_t, float *, int);
typedef int (*rms_fn)(const float *, const float *, float *, const float *, float *, int64_t,
                      int64_t, float, int);
typedef int (*rotary_fn)(const int64_t *, int64_t, const float *, int64_t, int64_t, const float *,
                         int64_t, int64_t, int64_t, int64_t, const float *, int64_t, float *,
                         float *, const float *, int64_t, float *, float *, const int64_t *,
                         int64_t);
typedef int (*attention_fn)(const float *, const float *, const float *, const int32_t *, int64_t,
                            int64_t, const int32_t *, const int32_t *, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, float, int64_t, float, float *, int);

typedef struct {
    codes_fn codes;
    codes4_fn codes4;
    rms_fn rms;
    rotary_fn rotary;
    attention_fn attention;
} kernels_t;

typedef struct { /* a codes weight as CodesWeight holds it */
    const void *codes;
    const float *scale, *offset;
    int64_t n, k, group;
    int64_t nibbles, bias; /* nibbles: 4-bit codes two per byte, each plus bias */
} weight_t;

typedef struct {
    const float *in_norm, *post_norm;
    weight_t qkv, o, gate_up, down;
    float *kc, *vc;
    int64_t hq, hk, window;
    float scale;
} layer_t;

typedef struct { /* one decode-like step: T tokens of S sequences (each its last 1 to 8) */
    const kernels_t *kern;
    int64_t T, hidden, D, rot, max_pos, num_slots, ld_table, max_blocks, BS, S, max_m, NB;
    float eps;
    int64_t lanes, threads;
    const int64_t *pos, *slots;
    const float *cs;
    const int32_t *tables, *seq_lens, *qsl;
    float *x, *qkv, *q, *k, *attn, *o, *gu; /* scratch rows, T of each width */
} step_t;

/* y [m, n] = x [m, k] @ W.T, max_m rows a call in order (as the backend's codes_linear calls the
 * kernel for more rows than one call takes: the same bits, each row on its own). */
static int gemm(const kernels_t *kern, const weight_t *w, const float *x, int64_t m, float *y,
                int64_t max_m, int threads) {
    for (int64_t r = 0; r < m; r += max_m) {
        const int64_t rows = m - r < max_m ? m - r : max_m;
        const float *xr = x + r * w->k;
        float *yr = y + r * w->n;
        const int rc = w->nibbles ? kern->codes4(w->codes, (int)w->bias, w->scale, w->offset,
                                                 w->n, w->k, w->group, xr, w->k, rows, yr, w->n,
                                                 NULL, threads)
                                  : kern->codes(w->codes, w->scale, w->offset, w->n, w->k,
                                                w->group, xr, w->k, rows, yr, w->n, NULL, threads);
        if (rc != 0) return rc;
    }
    return 0;
}

#define CHECK(stage, call)                                                                        \
    do {                                                                                          \
        const int rc_ = (call);                                                                   \
        if (rc_ != 0) return (stage) - rc_;                                                       \
    } while (0)

int decoder_layer_f32(const layer_t *L, const layer_t *prev, const step_t *s, const float *act,
                      float *hidden, float *residual, int64_t first) {
    const kernels_t *kern = s->kern;
    const int threads = (int)s->threads;
    const int64_t T = s->T, D = s->D, nqkv = L->qkv.n;
    if (act != NULL) CHECK(100, gemm(kern, &prev->down, act, T, hidden, s->max_m, threads));
    if (first) {
        memcpy(residual, hidden, (size_t)(T * s->hidden) * sizeof(float));
        CHECK(200, kern->rms(hidden, NULL, NULL, L->in_norm, s->x, T, s->hidden, s->eps,
                             (int)s->lanes));
    } else {
        CHECK(200, kern->rms(hidden, residual, residual, L->in_norm, s->x, T, s->hidden, s->eps,
                             (int)s->lanes));
    }
    CHECK(100, gemm(kern, &L->qkv, s->x, T, s->qkv, s->max_m, threads));
    CHECK(300, kern->rotary(s->pos, T, s->qkv, nqkv, L->hq, s->qkv + L->hq * D, nqkv, L->hk, D,
                            s->rot, s->cs, s->max_pos, s->q, s->k, s->qkv + (L->hq + L->hk) * D,
                            nqkv, L->kc, L->vc, s->slots, s->num_slots));
    CHECK(400, kern->attention(s->q, L->kc, L->vc, s->tables, s->ld_table, s->max_blocks,
                               s->seq_lens, s->qsl, s->S, L->hq, L->hk, D, s->BS, s->NB, L->scale,
                               L->window, 0.0f, s->attn, threads));
    CHECK(100, gemm(kern, &L->o, s->attn, T, s->o, s->max_m, threads));
    CHECK(200, kern->rms(s->o, residual, residual, L->post_norm, s->x, T, s->hidden, s->eps,
                         (int)s->lanes));
    CHECK(100, gemm(kern, &L->gate_up, s->x, T, s->gu, s->max_m, threads));
    return 0;
}
