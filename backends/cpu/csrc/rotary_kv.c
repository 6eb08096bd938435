/* NeoX rotary embedding on fp32 query and key rows, and optionally the rotated key and the value
 * written into fp32 paged KV caches: the CPU backend's "c" rotary and its fused rotary + KV
 * write (backends/cpu/native.py), one pass where torch takes ~20 small ops at decode sizes.
 *
 * For each token t at position p = pos[t] and each head, with c = cs[p, i], s = cs[p, half + i]
 * (cos in the first half of a cache row of rot values, sin in the second) and i < half = rot / 2:
 *
 *   out[i]        = x[i] * c - x[half + i] * s
 *   out[half + i] = x[half + i] * c + x[i] * s
 *   out[j]        = x[j] for rot <= j < D
 *
 * each product rounded to fp32, then the sum (built with -ffp-contract=off: no fused multiply-add),
 * which is what the reference (backends/cpu/rotary.py) computes with torch's elementwise ops: the
 * same bits. Inputs are [T, H, D] with any token stride and heads D apart; outputs contiguous.
 * Every position and slot is checked before anything is written. */
#include <stdint.h>

static void rotate_row(const float *x, float *o, const float *c, const float *s, int64_t half,
                       int64_t rot, int64_t D) {
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[half + i];
        const float a = x1 * c[i], b = x2 * s[i];
        const float e = x2 * c[i], f = x1 * s[i];
        o[i] = a - b;
        o[half + i] = e + f;
    }
    for (int64_t j = rot; j < D; j++) o[j] = x[j];
}

/* pos int64 [T]; q [T, Hq, D] (token stride q_tok), k [T, Hk, D] (k_tok), cs fp32 [max_pos, rot];
 * q_out [T, Hq, D], k_out [T, Hk, D] contiguous. v (v_tok), kc, vc (fp32 [num_slots, Hk, D]) and
 * slots (int64 [T], -1 skips) are NULL for the rotary alone. Returns 0; -1: a position outside
 * 0..max_pos-1; -2: a slot outside -1..num_slots-1; -3: bad sizes. Nothing is written unless 0. */
int rotary_kv_f32(const int64_t *pos, int64_t T, const float *q, int64_t q_tok, int64_t Hq,
                  const float *k, int64_t k_tok, int64_t Hk, int64_t D, int64_t rot,
                  const float *cs, int64_t max_pos, float *q_out, float *k_out, const float *v,
                  int64_t v_tok, float *kc, float *vc, const int64_t *slots, int64_t num_slots) {
    if (T < 0 || Hq < 0 || Hk < 0 || D < 1 || rot < 0 || rot % 2 || rot > D) return -3;
    for (int64_t t = 0; t < T; t++)
        if (pos[t] < 0 || pos[t] >= max_pos) return -1;
    if (slots)
        for (int64_t t = 0; t < T; t++)
            if (slots[t] < -1 || slots[t] >= num_slots) return -2;
    const int64_t half = rot / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cs + pos[t] * rot, *s = c + half;
        for (int64_t h = 0; h < Hq; h++)
            rotate_row(q + t * q_tok + h * D, q_out + (t * Hq + h) * D, c, s, half, rot, D);
        for (int64_t h = 0; h < Hk; h++)
            rotate_row(k + t * k_tok + h * D, k_out + (t * Hk + h) * D, c, s, half, rot, D);
        if (slots && slots[t] >= 0) {
            float *kd = kc + slots[t] * Hk * D, *vd = vc + slots[t] * Hk * D;
            const float *ks = k_out + t * Hk * D, *vs = v + t * v_tok;
            for (int64_t h = 0; h < Hk; h++)
                for (int64_t d = 0; d < D; d++) {
                    kd[h * D + d] = ks[h * D + d];
                    vd[h * D + d] = vs[h * D + d];
                }
        }
    }
    return 0;
}
