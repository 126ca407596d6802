// One decoder layer of a Llama-family model for one new token per row, in a single call, on our block
// matmul (q4_kernel.cpp, included: one translation unit, one library). backend/decode_step.py calls it
// once per layer; the math is DecodeStep's (RMSNorm, RoPE, grouped-query attention over the KV cache,
// SwiGLU), all float32 outside the matmuls.
//
// Why: at one token per step the torch version of this layer is ~30 small ops, and on a CPU their
// dispatch cost (~10 us each) was half of a SmolLM2 decode step, as much as all the matmuls.
#include <math.h>

#include "q4_kernel.cpp"

// e^x, x clamped to [-88, 88] (float32's range): e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2,
// e^r by its Taylor series to r^7 (relative error ~1e-7), 2^n applied by scalef.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    const float c[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (float k : c) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
    return _mm512_scalef_ps(p, n);
}

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// out = x / sqrt(mean(x^2) + eps) * w, one row of n (a multiple of 16)
static void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
    __m512 ss = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) ss = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), ss);
    __m512 inv = _mm512_set1_ps(1.0f / sqrtf(hsum(ss) / n + eps));
    for (int i = 0; i < n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv), _mm512_loadu_ps(w + i)));
}

// rotate one head in place as HF's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin (hd = 2 * half)
static void rope(float* x, const float* cos, const float* sin, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static inline __m512 load_head(const float* p, int i) { return _mm512_loadu_ps(p + i); }

// softmax(q . k_s / sqrt(hd)) . v_s over the valid slots s of one row's kv head, for `rep` query heads
static void attend(const float* q, int rep, const float* k, const float* v, int from, int to, int hd,
                   float* out, float* scores) {
    float scale = 1.0f / sqrtf((float)hd);
    for (int r = 0; r < rep; r++, q += hd, out += hd) {
        float top = -INFINITY;
        for (int s = from; s < to; s++) {
            __m512 dot = _mm512_setzero_ps();
            for (int i = 0; i < hd; i += 16) dot = _mm512_fmadd_ps(load_head(q, i), load_head(k + (size_t)s * hd, i), dot);
            scores[s] = hsum(dot) * scale;
            top = scores[s] > top ? scores[s] : top;
        }
        float total = 0.0f;
        for (int s = from; s < to; s++) {  // scalar exp: a few hundred slots, not worth vectorizing here
            scores[s] = expf(scores[s] - top);
            total += scores[s];
        }
        for (int i = 0; i < hd; i += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int s = from; s < to; s++) acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[s]), load_head(v + (size_t)s * hd, i), acc);
            _mm512_storeu_ps(out + i, _mm512_mul_ps(acc, _mm512_set1_ps(1.0f / total)));
        }
    }
}

struct Matrix {              // packed operands of one matrix (backend/q4_kernel.py `pack`)
    const uint8_t* w;
    const uint16_t* scales;
    int q8;                  // 0 = Q4_1, 1 = Q8_0
};

static int run(Matrix m, const float* x, int M, int K, int N, float* y, int threads) {
    return m.q8 ? matmul(Q8_TILES, 512, 16, x, M, K, m.w, m.scales, N, y, threads)
                : matmul(Q4_TILES, 256, 32, x, M, K, m.w, m.scales, N, y, threads);
}

// x [B, dim] float32, updated in place (the residual stream). cos/sin: [B, hd] rows, or one row shared
// (cs_stride 0). Cache k/v: [B, KV, slots, hd] float32; this token goes to slot pos; row b attends to
// slots start[b]..pos (start NULL: from 0).
extern "C" int decode_layer(float* x, int B, int dim, float eps, const float* ln1, Matrix qkv, Matrix o,
                            const float* ln2, Matrix gate_up, Matrix down, int H, int KV, int hd, int hidden,
                            const float* cos, const float* sin, int cs_stride, float* kc, float* vc, int slots,
                            int pos, const int64_t* start, int threads) {
    if (dim % 32 || hidden % 32 || hd % 16 || H % KV || pos >= slots) return 1;
    int nq = (H + 2 * KV) * hd, rep = H / KV;
    size_t floats = (size_t)B * (dim + nq + H * hd + 3 * hidden + dim);
    float* mem = (float*)malloc(floats * 4);
    if (!mem) return 2;
    float *h = mem, *qkv_out = h + (size_t)B * dim, *att = qkv_out + (size_t)B * nq,
          *gu = att + (size_t)B * H * hd, *act = gu + (size_t)B * 2 * hidden, *y = act + (size_t)B * hidden;
    int rc = 0;

    for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * dim, ln1, dim, eps, h + (size_t)b * dim);
    if ((rc = run(qkv, h, B, dim, nq, qkv_out, threads))) goto done;
    for (int b = 0; b < B; b++) {
        float* row = qkv_out + (size_t)b * nq;
        for (int j = 0; j < H + KV; j++) rope(row + j * hd, cos + (size_t)b * cs_stride, sin + (size_t)b * cs_stride, hd);
        for (int g = 0; g < KV; g++) {
            size_t slot = (((size_t)b * KV + g) * slots + pos) * hd;
            memcpy(kc + slot, row + (H + g) * hd, hd * 4);
            memcpy(vc + slot, row + (H + KV + g) * hd, hd * 4);
        }
    }
    #pragma omp parallel num_threads(threads)
    {
        float* scores = (float*)malloc((size_t)(pos + 1) * 4);
        if (!scores) rc = 2;  // every thread still runs the loop's barrier; its share is skipped
        #pragma omp for schedule(static)
        for (int bg = 0; bg < B * KV; bg++) {
            if (!scores) continue;
            int b = bg / KV, g = bg % KV;
            size_t base = ((size_t)b * KV + g) * slots * hd;
            attend(qkv_out + (size_t)b * nq + g * rep * hd, rep, kc + base, vc + base, start ? (int)start[b] : 0,
                   pos + 1, hd, att + (size_t)b * H * hd + g * rep * hd, scores);
        }
        free(scores);
    }
    if (rc || (rc = run(o, att, B, H * hd, dim, y, threads))) goto done;
    for (size_t i = 0; i < (size_t)B * dim; i++) x[i] += y[i];

    for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * dim, ln2, dim, eps, h + (size_t)b * dim);
    if ((rc = run(gate_up, h, B, dim, 2 * hidden, gu, threads))) goto done;
    for (int b = 0; b < B; b++)  // SwiGLU: silu(gate) * up
        for (int i = 0; i < hidden; i += 16) {
            __m512 g = _mm512_loadu_ps(gu + (size_t)b * 2 * hidden + i);
            __m512 u = _mm512_loadu_ps(gu + (size_t)b * 2 * hidden + hidden + i);
            __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_storeu_ps(act + (size_t)b * hidden + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
        }
    if ((rc = run(down, act, B, hidden, dim, y, threads))) goto done;
    for (size_t i = 0; i < (size_t)B * dim; i++) x[i] += y[i];
done:
    free(mem);
    return rc;
}
