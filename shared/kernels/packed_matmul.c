/* y[M,N] = x[M,K] @ W^T (+ bias) for fp32 weights stored as 8-column panels.
 *
 * W[N,K] is packed as P[N/8][K][8] (P[j][k][c] = W[8j + c][k]): each panel is one contiguous
 * stream, so a decode step (M small) reads every weight once, front to back, at memory speed.
 * Panels are split across the OpenMP threads (the runtime torch itself uses). AVX2 + FMA.
 */
#include <immintrin.h>
#include <stddef.h>

/* one row of x against one panel: four independent accumulators over k */
static inline void row_panel(const float *x, const float *p, float *y, int K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int k = 0;
  for (; k + 4 <= K; k += 4) {
    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(p + 8 * k), a0);
    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), _mm256_loadu_ps(p + 8 * k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 2), _mm256_loadu_ps(p + 8 * k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 3), _mm256_loadu_ps(p + 8 * k + 24), a3);
  }
  for (; k < K; k++) a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(p + 8 * k), a0);
  _mm256_storeu_ps(y, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}


/* one row against two adjacent panels: two streams in flight at once (~15% faster than one) */
static inline void row_panel2(const float *x, const float *p0, const float *p1, float *y, int K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  int k = 0;
  for (; k + 2 <= K; k += 2) {
    __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
    a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(p0 + 8 * k), a0);
    b0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(p1 + 8 * k), b0);
    a1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(p0 + 8 * k + 8), a1);
    b1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(p1 + 8 * k + 8), b1);
  }
  for (; k < K; k++) {
    __m256 x0 = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(p0 + 8 * k), a0);
    b0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(p1 + 8 * k), b0);
  }
  _mm256_storeu_ps(y, _mm256_add_ps(a0, a1));
  _mm256_storeu_ps(y + 8, _mm256_add_ps(b0, b1));
}

/* up to 6 rows of x against two adjacent panels (16 columns): 12 accumulators in registers */
static inline void rows_panel2(const float *x, int ldx, const float *p0, const float *p1, float *y, int ldy,
                               int rows, int K) {
  __m256 c[6][2];
  for (int m = 0; m < 6; m++) c[m][0] = c[m][1] = _mm256_setzero_ps();
  for (int k = 0; k < K; k++) {
    __m256 w0 = _mm256_loadu_ps(p0 + 8 * k), w1 = _mm256_loadu_ps(p1 + 8 * k);
    for (int m = 0; m < rows; m++) {
      __m256 xv = _mm256_broadcast_ss(x + (size_t)m * ldx + k);
      c[m][0] = _mm256_fmadd_ps(xv, w0, c[m][0]);
      c[m][1] = _mm256_fmadd_ps(xv, w1, c[m][1]);
    }
  }
  for (int m = 0; m < rows; m++) {
    _mm256_storeu_ps(y + (size_t)m * ldy, c[m][0]);
    _mm256_storeu_ps(y + (size_t)m * ldy + 8, c[m][1]);
  }
}

static inline void rows_panel1(const float *x, int ldx, const float *p, float *y, int ldy, int rows, int K) {
  __m256 c[6];
  for (int m = 0; m < 6; m++) c[m] = _mm256_setzero_ps();
  for (int k = 0; k < K; k++) {
    __m256 w = _mm256_loadu_ps(p + 8 * k);
    for (int m = 0; m < rows; m++) c[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (size_t)m * ldx + k), w, c[m]);
  }
  for (int m = 0; m < rows; m++) _mm256_storeu_ps(y + (size_t)m * ldy, c[m]);
}

void packed_matmul(const float *x, const float *packed, const float *bias, float *y, int M, int K, int N) {
  const int pairs = N / 16, odd = (N / 8) % 2;
  const size_t panel = (size_t)K * 8;
#pragma omp parallel for schedule(static)
  for (int j = 0; j < pairs + odd; j++) {
    const float *p0 = packed + (size_t)(2 * j) * panel;
    const int col = 16 * j, two = j < pairs;
    if (M == 1) {
      if (two) row_panel2(x, p0, p0 + panel, y + col, K);
      else row_panel(x, p0, y + col, K);
    } else {
      for (int m0 = 0; m0 < M; m0 += 6) {
        const int rows = M - m0 < 6 ? M - m0 : 6;
        if (two) rows_panel2(x + (size_t)m0 * K, K, p0, p0 + panel, y + (size_t)m0 * N + col, N, rows, K);
        else rows_panel1(x + (size_t)m0 * K, K, p0, y + (size_t)m0 * N + col, N, rows, K);
      }
    }
    if (bias)
      for (int m = 0; m < M; m++)
        for (int c = col; c < col + (two ? 16 : 8); c++) y[(size_t)m * N + c] += bias[c];
  }
}

/* ---- fused decode step of one transformer layer (one new token per row) ------------------ */
#include <math.h>
#include <stdlib.h>
#include <string.h>

static void rmsnorm(const float *x, const float *w, float eps, float *out, int B, int H) {
  for (int b = 0; b < B; b++) {
    const float *xb = x + (size_t)b * H;
    float ss = 0.f;
    for (int i = 0; i < H; i++) ss += xb[i] * xb[i];
    const float r = 1.0f / sqrtf(ss / H + eps);
    for (int i = 0; i < H; i++) out[(size_t)b * H + i] = w[i] * (xb[i] * r);
  }
}

/* rotate-half RoPE on n heads of size d, in place */
static void rope(float *v, const float *cos, const float *sin, int n, int d) {
  const int h = d / 2;
  for (int j = 0; j < n; j++) {
    float *x = v + (size_t)j * d;
    for (int i = 0; i < h; i++) {
      const float a = x[i], b = x[i + h];
      x[i] = a * cos[i] - b * sin[i];
      x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
  }
}

/* Attention half of a layer for B rows, one token each:
 *   h = rmsnorm(x); qkv = h W_qkv^T (+b), group-major [q (r heads); k; v] per kv group;
 *   RoPE on q, k; k, v written to cache slot pos[b] of cache row b; softmax attention over
 *   slots <= pos[b]; out = attn W_proj^T (this rank's partial sum; the caller reduces it).
 * kc, vc: this layer's cache [rows][groups][max_seq][d]. cos, sin: [B][d]. */
void decode_attention(const float *x, const float *ln_w, float eps, const float *wqkv, const float *bqkv,
                      const float *wproj, const float *cos, const float *sin, float *kc, float *vc,
                      const long *pos, int B, int H, int groups, int r, int d, int max_seq, float *out,
                      float *scratch) {
  const int nq = groups * r, qkv_n = groups * (r + 2) * d, attn_n = nq * d;
  float *h = scratch, *qkv = h + (size_t)B * H, *attn = qkv + (size_t)B * qkv_n;
  rmsnorm(x, ln_w, eps, h, B, H);
  packed_matmul(h, wqkv, bqkv, qkv, B, H, qkv_n);
  const float scale = 1.0f / sqrtf((float)d);
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; b++) {
    for (int g = 0; g < groups; g++) {
      float *blk = qkv + (size_t)b * qkv_n + (size_t)g * (r + 2) * d;
      float *q = blk, *k = blk + (size_t)r * d, *v = k + d;
      const float *cb = cos + (size_t)b * d, *sb = sin + (size_t)b * d;
      rope(q, cb, sb, r, d);
      rope(k, cb, sb, 1, d);
      const long p = pos[b];
      float *K = kc + ((size_t)b * groups + g) * max_seq * d, *V = vc + ((size_t)b * groups + g) * max_seq * d;
      memcpy(K + p * d, k, d * sizeof(float));
      memcpy(V + p * d, v, d * sizeof(float));
      float *s = malloc(sizeof(float) * (p + 1));
      for (int j = 0; j < r; j++) {
        const float *qj = q + (size_t)j * d;
        float m = -INFINITY;
        for (long t = 0; t <= p; t++) {
          float acc = 0.f;
          for (int i = 0; i < d; i++) acc += qj[i] * K[t * d + i];
          s[t] = acc * scale;
          if (s[t] > m) m = s[t];
        }
        float sum = 0.f;
        for (long t = 0; t <= p; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
        float *o = attn + (size_t)b * attn_n + (size_t)(g * r + j) * d;
        for (int i = 0; i < d; i++) o[i] = 0.f;
        for (long t = 0; t <= p; t++) {
          const float w = s[t] / sum;
          for (int i = 0; i < d; i++) o[i] += w * V[t * d + i];
        }
      }
      free(s);
    }
  }
  packed_matmul(attn, wproj, NULL, out, B, attn_n, H);
}

/* MLP half: out = (silu(gate) * up) W_fc2^T with [gate; up] = rmsnorm(x) W_fc1^T (this rank's part). */
void decode_mlp(const float *x, const float *ln_w, float eps, const float *wfc1, const float *wfc2, int B, int H,
                int F, float *out, float *scratch) {
  float *h = scratch, *fc1 = h + (size_t)B * H, *act = fc1 + (size_t)B * 2 * F;
  rmsnorm(x, ln_w, eps, h, B, H);
  packed_matmul(h, wfc1, NULL, fc1, B, H, 2 * F);
  for (int b = 0; b < B; b++)
    for (int i = 0; i < F; i++) {
      const float g = fc1[(size_t)b * 2 * F + i], u = fc1[(size_t)b * 2 * F + F + i];
      act[(size_t)b * F + i] = g / (1.0f + expf(-g)) * u;
    }
  packed_matmul(act, wfc2, NULL, out, B, F, H);
}

/* Every layer of a stage (tensor parallel size 1) for one new token per row: x (B, H) in place.
 * Weights per layer come as arrays of pointers; layer l's cache is kc + l * layer_stride. */
void decode_layers(int L, float *x, const float *const *ln1, const float *const *wqkv, const float *const *bqkv,
                   const float *const *wproj, const float *const *ln2, const float *const *wfc1,
                   const float *const *wfc2, float eps, const float *cos, const float *sin, float *kc, float *vc,
                   long layer_stride, const long *pos, int B, int H, int groups, int r, int d, int max_seq, int F,
                   float *scratch) {
  const int qkv_n = groups * (r + 2) * d, attn_n = groups * r * d;
  float *out = scratch, *work = out + (size_t)B * H;
  (void)qkv_n; (void)attn_n;
  for (int l = 0; l < L; l++) {
    decode_attention(x, ln1[l], eps, wqkv[l], bqkv ? bqkv[l] : NULL, wproj[l], cos, sin, kc + l * layer_stride,
                     vc + l * layer_stride, pos, B, H, groups, r, d, max_seq, out, work);
    for (size_t i = 0; i < (size_t)B * H; i++) x[i] += out[i];
    decode_mlp(x, ln2[l], eps, wfc1[l], wfc2[l], B, H, F, out, work);
    for (size_t i = 0; i < (size_t)B * H; i++) x[i] += out[i];
  }
}
