/* moezoo's decode kernel: a whole top-k MoE layer on a few tokens in one call, for CPUs.
 *
 * At one to a few tokens a MoE layer is memory- and overhead-bound: each expert's weights are read once and the
 * arithmetic is small, so the two dozen framework calls of the eager path (router, top-k, one GEMV pair per expert,
 * the shared expert, the sums) cost more than the work. This file does the router, the top-k, the chosen experts
 * and the shared expert in one C call (built by moezoo/kernels/cpu_decode.py with the machine's compiler, for the
 * running CPU's vector ISA).
 *
 * Layouts (row-major fp32, as the moezoo MoE block stores them):
 *   x [T, D]; router_w [E, D] (+ router_b [E] or NULL); score_bias [E] or NULL (chooses only);
 *   w_in [E, G*H, D] (gated: the H gate rows, then the H up rows; G = 2, else G = 1); w_out [E, D, H];
 *   shared: gate [HS, D] (NULL when not gated), up [HS, D], down [D, HS]; HS = 0: no shared expert.
 * packed_in, packed_out, packed_shared_in, packed_shared_out: the same weights in the packed layout (panels, below)
 * or NULL (then read as rows); packed_shared_in holds the gate rows then the up rows.
 * expert_map [E] (int64) or NULL: router row e scores the layer's expert expert_map[e] (MoIIE's one-modality
 * routers over their own columns); the experts' tensors then hold E_out experts.
 * Outputs: y [T, D]; ids [T, K] (int64 expert ids, by descending choice score); weights [T, K]; probs [T, E_out]
 * (the scores; unrouted columns 0); logits [T, E_out]. scratch: at least T * (GH + 3 * D + 2 * E) floats with
 * GH = G * max(H, HS); T at most MAX_TOKENS.
 *
 * Returns 0; 1 when a router logit is not finite (the caller then takes the eager path, which says so); 2 when T
 * is more than MAX_TOKENS. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_TOKENS 256
#define MAX_DYNAMIC 64  /* dynamic experts of dcmoe_decode_f32 */

enum { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3 };

/* exp(v) in plain arithmetic, so that loops over it vectorise (glibc's expf is a scalar call, which at 16 tokens
 * cost more than the GEMVs): v clamped to [-87, 88]; n = round(v / ln 2) by the 1.5 * 2^23 shift (which leaves n in
 * the low mantissa bits), r = v - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts, exact for the first), a degree-6
 * Taylor polynomial for exp(r) (within 2 ulp), and 2^n written into a float's exponent bits. The branch-free
 * clamps vectorise with -fno-trapping-math. */
static inline float exp_vec(float v) {
    v = v < -87.0f ? -87.0f : v;
    v = v > 88.0f ? 88.0f : v;
    float shifted = v * 1.44269504088896341f + 12582912.0f;
    float n = shifted - 12582912.0f;
    float r = v - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float activate(float v, int kind) {
    switch (kind) {
    case ACT_SILU: return v / (1.0f + exp_vec(-v));
    case ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case ACT_GELU_TANH: {  /* 0.5 v (1 + tanh(u)) = v / (1 + exp(-2u)) */
        float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
        return v / (1.0f + exp_vec(-2.0f * u));
    }
    default: return v > 0.0f ? v : 0.0f;
    }
}

/* act(gate) * up (gated: up = h + H) or act(h) over a hidden row; one branch-free loop per activation, so that
 * the SiLU and tanh-GELU loops vectorise */
static void activate_row(float *h, int H, int gated, int kind) {
    const float *up = h + H;
    if (kind == ACT_SILU && gated) {
        for (int j = 0; j < H; j++) h[j] = h[j] / (1.0f + exp_vec(-h[j])) * up[j];
    } else if (kind == ACT_SILU) {
        for (int j = 0; j < H; j++) h[j] = h[j] / (1.0f + exp_vec(-h[j]));
    } else if (kind == ACT_GELU_TANH) {
        for (int j = 0; j < H; j++) h[j] = activate(h[j], ACT_GELU_TANH);
        if (gated)
            for (int j = 0; j < H; j++) h[j] *= up[j];
    } else {
        for (int j = 0; j < H; j++) h[j] = activate(h[j], kind);
        if (gated)
            for (int j = 0; j < H; j++) h[j] *= up[j];
    }
}

/* 8-float vectors (GCC/Clang vector extensions: AVX2 registers, or half an AVX-512 one); unaligned loads */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4)));

static inline v8f load8(const float *p) { return *(const v8f_unaligned *)p; }

static inline float sum8(v8f v) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}

/* out[m][r] = W[r] . X[m] for R = 4 weight rows and MT <= 3 tokens: 12 vector accumulators, so that each weight
 * load feeds MT products and each token load R; the lanes are summed once at the end. */
static inline __attribute__((always_inline)) void tile(const float *W, int D, const float *X, int ldx, int MT,
                                                       float *out, int ldo) {
    v8f acc[3][4] = {{{0}}};
    int d = 0;
    for (; d + 8 <= D; d += 8) {
        v8f w0 = load8(W + d), w1 = load8(W + D + d), w2 = load8(W + 2 * D + d), w3 = load8(W + 3 * D + d);
        for (int m = 0; m < MT; m++) {
            v8f x = load8(X + (int64_t)m * ldx + d);
            acc[m][0] += w0 * x; acc[m][1] += w1 * x; acc[m][2] += w2 * x; acc[m][3] += w3 * x;
        }
    }
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < 4; r++) {
            float s = sum8(acc[m][r]);
            for (int e = d; e < D; e++) s += W[(int64_t)r * D + e] * X[(int64_t)m * ldx + e];
            out[(int64_t)m * ldo + r] = s;
        }
}

/* out[m][n] = sum_d W[n][d] * X[m][d] for the M token rows of X (stride ldx) and the N weight rows of W (stride D);
 * out rows of stride ldo. Each weight row is read once for all M tokens: the weights stream from memory once. */
static void weight_rows_times(const float *W, int N, int D, const float *X, int M, int ldx, float *out, int ldo) {
    int n = 0;
    for (; n + 4 <= N; n += 4) {
        const float *w = W + (int64_t)n * D;
        int m = 0;
        for (; m + 3 <= M; m += 3) tile(w, D, X + (int64_t)m * ldx, ldx, 3, out + (int64_t)m * ldo + n, ldo);
        if (M - m == 2) tile(w, D, X + (int64_t)m * ldx, ldx, 2, out + (int64_t)m * ldo + n, ldo);
        if (M - m == 1) tile(w, D, X + (int64_t)m * ldx, ldx, 1, out + (int64_t)m * ldo + n, ldo);
    }
    for (; n < N; n++) {
        const float *w = W + (int64_t)n * D;
        for (int m = 0; m < M; m++) {
            const float *x = X + (int64_t)m * ldx;
            float a = 0.0f;
#pragma omp simd reduction(+ : a)
            for (int d = 0; d < D; d++) a += w[d] * x[d];
            out[(int64_t)m * ldo + n] = a;
        }
    }
}

/* The packed layout of a frozen layer (cpu_decode.py's pack_panels): W [N, K] as ceil(N / 16) panels of 16 outputs,
 * each [K][16] (zero rows past N). A token's product with a panel is a broadcast of its k-th input times the
 * panel's k-th 16 weights: 6 tokens x 16 outputs = 12 vector accumulators, no lane sums, the panel read in order. */
static inline __attribute__((always_inline)) void panel_block(const float *panel, int K, const float *X, int ldx,
                                                              int MB, float *out, int ldo, int width) {
    v8f acc[6][2] = {{{0}}};
    for (int k = 0; k < K; k++) {
        v8f w0 = load8(panel + (int64_t)k * 16), w1 = load8(panel + (int64_t)k * 16 + 8);
        for (int m = 0; m < MB; m++) {
            float x = X[(int64_t)m * ldx + k];
            acc[m][0] += x * w0;
            acc[m][1] += x * w1;
        }
    }
    for (int m = 0; m < MB; m++) {
        float *o = out + (int64_t)m * ldo;
        if (width == 16) {
            *(v8f_unaligned *)o = acc[m][0];
            *(v8f_unaligned *)(o + 8) = acc[m][1];
        } else {
            for (int j = 0; j < width; j++) o[j] = j < 8 ? acc[m][0][j] : acc[m][1][j - 8];
        }
    }
}

static void panel_times(const float *WP, int N, int K, const float *X, int M, int ldx, float *out, int ldo) {
    for (int p = 0; p * 16 < N; p++) {
        const float *panel = WP + (int64_t)p * K * 16;
        int width = N - 16 * p < 16 ? N - 16 * p : 16;
        float *o = out + 16 * p;
        int m = 0;
        for (; m + 6 <= M; m += 6) panel_block(panel, K, X + (int64_t)m * ldx, ldx, 6, o + (int64_t)m * ldo, ldo, width);
        const float *x = X + (int64_t)m * ldx;
        float *om = o + (int64_t)m * ldo;
        switch (M - m) {
        case 5: panel_block(panel, K, x, ldx, 5, om, ldo, width); break;
        case 4: panel_block(panel, K, x, ldx, 4, om, ldo, width); break;
        case 3: panel_block(panel, K, x, ldx, 3, om, ldo, width); break;
        case 2: panel_block(panel, K, x, ldx, 2, om, ldo, width); break;
        case 1: panel_block(panel, K, x, ldx, 1, om, ldo, width); break;
        default: break;
        }
    }
}

/* A weight matrix [N, K] as the layer holds it (rows) or packed (panels); exactly one is set. */
typedef struct {
    const float *rows, *panels;
} Matrix;

static inline Matrix offset(Matrix w, int64_t rows_offset, int64_t panels_offset) {
    Matrix out = {w.rows ? w.rows + rows_offset : NULL, w.panels ? w.panels + panels_offset : NULL};
    return out;
}

static void times(Matrix W, int N, int K, const float *X, int M, int ldx, float *out, int ldo) {
    if (W.panels)
        panel_times(W.panels, N, K, X, M, ldx, out, ldo);
    else
        weight_rows_times(W.rows, N, K, X, M, ldx, out, ldo);
}

static inline int64_t panel_floats(int N, int K) { return (int64_t)((N + 15) / 16) * 16 * K; }

/* acc[m] += scale[m] * FFN(X[m]) for M token rows: h = W_in X (gated: act(gate) * up, else act(h)), then W_out h. */
static void add_mlp(Matrix w_in, const float *w_gate, Matrix w_out, int D, int H, int gated, int act,
                    const float *X, int M, int ldx, const float *scale, float *acc, int ld_acc, float *h, float *y) {
    int G = gated ? 2 : 1;
    if (w_gate) {  /* separate gate and up matrices (the shared expert's nn.Linear pair, unpacked) */
        weight_rows_times(w_gate, H, D, X, M, ldx, h, G * H);
        times(w_in, H, D, X, M, ldx, h + H, G * H);
    } else {
        times(w_in, G * H, D, X, M, ldx, h, G * H);
    }
    for (int m = 0; m < M; m++) activate_row(h + (int64_t)m * G * H, H, gated, act);
    times(w_out, D, H, h, M, G * H, y, D);
    for (int m = 0; m < M; m++) {
        float s = scale ? scale[m] : 1.0f, *a = acc + (int64_t)m * ld_acc;
        const float *ym = y + (int64_t)m * D;
        for (int d = 0; d < D; d++) a[d] += s * ym[d];
    }
}

/* Scores, choice and weights of one token (topk_route's rule): softmax or sigmoid scores, the k best by score
 * (+ score_bias if given), ties to the lower id; weights are the unbiased scores, renormalised and scaled. */
static int route_token(const float *logits, int E, int K, int sigmoid_scoring, const float *score_bias,
                       int renormalize, float scaling, float *probs, int64_t *ids, float *weights) {
    for (int e = 0; e < E; e++)
        if (!isfinite(logits[e])) return 1;
    if (sigmoid_scoring) {
        for (int e = 0; e < E; e++) probs[e] = 1.0f / (1.0f + expf(-logits[e]));
    } else {
        float top = logits[0], total = 0.0f;
        for (int e = 1; e < E; e++) top = logits[e] > top ? logits[e] : top;
        for (int e = 0; e < E; e++) total += probs[e] = expf(logits[e] - top);
        for (int e = 0; e < E; e++) probs[e] /= total;
    }
    float sum = 0.0f;
    for (int k = 0; k < K; k++) {
        int best = -1;
        float best_score = -INFINITY;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= ids[j] == e;
            float s = probs[e] + (score_bias ? score_bias[e] : 0.0f);
            if (!taken && (best < 0 || s > best_score)) best = e, best_score = s;
        }
        ids[k] = best;
        sum += weights[k] = probs[best];
    }
    for (int k = 0; k < K; k++) {
        if (renormalize) weights[k] /= sum + 1e-20f;
        weights[k] *= scaling;
    }
    return 0;
}

/* y[t] += w * FFN_e(x[t]) for every slot (t, k) of ids / weights [T, slots] that chose a computed expert e < E
 * (-1 and null experts' ids are skipped). Each chosen expert runs once, over the tokens that chose it (gathered
 * into x_rows), so its weights stream once; expert_map (or NULL) gives its index in w_in / w_out. */
static void add_chosen_experts(int T, int D, int E, int H, int gated, int act, const int64_t *ids,
                               const float *weights, int slots, const int64_t *expert_map, Matrix w_in, Matrix w_out,
                               const float *x, float *y, float *h, float *x_rows, float *y_tmp, float *acc) {
    int G = gated ? 2 : 1, rows[MAX_TOKENS];
    float scale[MAX_TOKENS];
    for (int e = 0; e < E; e++) {
        int M = 0;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < slots; k++)
                if (ids[t * slots + k] == e) {
                    rows[M] = t, scale[M] = weights[t * slots + k];
                    memcpy(x_rows + (int64_t)M * D, x + (int64_t)t * D, sizeof(float) * D);
                    M++;
                }
        if (M == 0) continue;
        int64_t expert = expert_map ? expert_map[e] : e;
        memset(acc, 0, sizeof(float) * M * D);  /* the expert's weighted outputs, then added to their tokens' */
        add_mlp(offset(w_in, expert * G * H * D, expert * panel_floats(G * H, D)), NULL,
                offset(w_out, expert * D * H, expert * panel_floats(D, H)), D, H, gated, act, x_rows, M, D, scale, acc,
                D, h, y_tmp);
        for (int m = 0; m < M; m++)
            for (int d = 0; d < D; d++) y[(int64_t)rows[m] * D + d] += acc[(int64_t)m * D + d];
    }
}

int moe_decode_f32(int T, int D, int E, int H, int K, int HS, int gated, int act, int sigmoid_scoring,
                   int renormalize, float scaling, int E_out, const int64_t *expert_map, const float *x,
                   const float *router_w, const float *router_b, const float *score_bias, const float *w_in,
                   const float *w_out, const float *shared_gate, const float *shared_up, const float *shared_down,
                   const float *packed_in, const float *packed_out, const float *packed_shared_in,
                   const float *packed_shared_out, float *y, int64_t *ids, float *weights, float *probs,
                   float *logits, float *scratch) {
    int G = gated ? 2 : 1, GH = G * (H > HS ? H : HS);
    if (T > MAX_TOKENS) return 2;
    float *h = scratch, *x_rows = h + (int64_t)T * GH, *y_tmp = x_rows + (int64_t)T * D,
          *acc = y_tmp + (int64_t)T * D, *local_logits = acc + (int64_t)T * D, *local_probs = local_logits + T * E;
    weight_rows_times(router_w, E, D, x, T, D, local_logits, E);
    for (int t = 0; t < T; t++) {
        if (router_b)
            for (int e = 0; e < E; e++) local_logits[t * E + e] += router_b[e];
        if (route_token(local_logits + t * E, E, K, sigmoid_scoring, score_bias, renormalize, scaling,
                        local_probs + t * E, ids + t * K, weights + t * K))
            return 1;
    }
    memset(y, 0, sizeof(float) * T * D);
    Matrix expert_in = {packed_in ? NULL : w_in, packed_in}, expert_out = {packed_out ? NULL : w_out, packed_out};
    if (HS > 0) {
        Matrix s_in = {packed_shared_in ? NULL : shared_up, packed_shared_in};
        Matrix s_out = {packed_shared_out ? NULL : shared_down, packed_shared_out};
        add_mlp(s_in, gated && !packed_shared_in ? shared_gate : NULL, s_out, D, HS, gated, act, x, T, D, NULL, y, D,
                h, y_tmp);
    }
    add_chosen_experts(T, D, E, H, gated, act, ids, weights, K, expert_map, expert_in, expert_out, x, y, h, x_rows,
                       y_tmp, acc);
    /* the record in the layer's expert ids: routed columns placed by expert_map, the others 0 */
    memset(probs, 0, sizeof(float) * T * E_out);
    memset(logits, 0, sizeof(float) * T * E_out);
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++) {
            int64_t column = expert_map ? expert_map[e] : e;
            probs[t * E_out + column] = local_probs[t * E + e];
            logits[t * E_out + column] = local_logits[t * E + e];
        }
        if (expert_map)
            for (int k = 0; k < K; k++) ids[t * K + k] = expert_map[ids[t * K + k]];
    }
    return 0;
}

/* UniMoE-Audio's dynamic-capacity layer (moezoo.zoo.layers.dcmoe, without token dropping) on a few tokens.
 * gate_w [N + S, D]: the N dynamic experts' rows (the E computed ones, then the null ones), then the S shared
 * experts'. Per token (moezoo.kernels.routing.top_p_near_tie_route and DynamicCapacityMoE._gated_shares):
 *   probs = softmax of the N dynamic logits; experts by descending probability (ties: lower id), each taken while
 *   the mass before it (summed in double) is below top_p and its probability is positive;
 *   multiplier of a chosen expert = 1 / sum of exp(l_j - l_i) over the experts j not taken before it whose logit is
 *   not far from l_i (relative gap (l_i - l_j) / max(|l_i|, |l_j|) above 2 tie_tolerance; 0/0 is a tie), in double;
 *   weights = multipliers / (their sum + renorm_eps);
 *   with shared experts: g = softmax over the chosen dynamic and all shared logits, weights *= sum of g over the
 *   chosen dynamic ones, shared expert s weighted by g_s.
 * y = sum over chosen computed experts (id < E) of weight * SwiGLU_e(x) + sum_s g_s * SwiGLU_s(x).
 * packed_*: the experts' and shared experts' weights as panels (or NULL: read as rows), as for moe_decode_f32.
 * Outputs: ids [T, N] (-1 after a token's chosen ones), weights [T, N], probs [T, N], logits [T, N] (dynamic).
 * scratch: T * (2 * max(H, HS) + 3 * D + 2 * (N + S)) floats.
 * Returns the most experts a token chose (>= 1); -1 for a non-finite logit; -2 for more than MAX_TOKENS tokens or
 * MAX_DYNAMIC dynamic experts. */
int dcmoe_decode_f32(int T, int D, int N, int E, int S, int H, int HS, int act, double top_p,
                     double tie_tolerance, double renorm_eps, const float *x, const float *gate_w, const float *w_in,
                     const float *w_out, const float *shared_w_in, const float *shared_w_out, const float *packed_in,
                     const float *packed_out, const float *packed_shared_in, const float *packed_shared_out, float *y,
                     int64_t *ids, float *weights, float *probs, float *logits, float *scratch) {
    if (T > MAX_TOKENS || N > MAX_DYNAMIC) return -2;
    int G = N + S, GH = 2 * (H > HS ? H : HS);
    float *h = scratch, *x_rows = h + (int64_t)T * GH, *y_tmp = x_rows + (int64_t)T * D,
          *acc = y_tmp + (int64_t)T * D, *all_logits = acc + (int64_t)T * D, *shares = all_logits + T * G;
    weight_rows_times(gate_w, G, D, x, T, D, all_logits, G);
    int columns = 0;
    for (int t = 0; t < T; t++) {
        const float *l = all_logits + t * G;
        float *p = probs + t * N, *w = weights + t * N;
        int64_t *chosen = ids + t * N;
        for (int j = 0; j < G; j++)
            if (!isfinite(l[j])) return -1;
        float top = l[0], total = 0.0f;
        for (int j = 1; j < N; j++) top = l[j] > top ? l[j] : top;
        for (int j = 0; j < N; j++) total += p[j] = expf(l[j] - top);
        for (int j = 0; j < N; j++) p[j] /= total, logits[t * N + j] = l[j];
        /* the top-p set, by descending probability */
        int k = 0;
        double before = 0.0;
        for (; k < N; k++) {
            int best = -1;
            for (int j = 0; j < N; j++) {
                int taken = 0;
                for (int i = 0; i < k; i++) taken |= chosen[i] == j;
                if (!taken && (best < 0 || p[j] > p[best])) best = j;
            }
            if (!(before < top_p) || !(p[best] > 0.0f)) break;
            chosen[k] = best;
            before += p[best];
        }
        for (int i = k; i < N; i++) chosen[i] = -1, w[i] = 0.0f;
        if (k > columns) columns = k;
        /* near-tie multipliers, then renormalised */
        double sum = 0.0, m[MAX_DYNAMIC];
        for (int i = 0; i < k; i++) {
            double lead = l[chosen[i]], near = 0.0;
            for (int j = 0; j < N; j++) {
                int taken = 0;
                for (int q = 0; q < i; q++) taken |= chosen[q] == j;
                double other = l[j], scale = fabs(lead) > fabs(other) ? fabs(lead) : fabs(other);
                int far = scale > 0.0 && (lead - other) / scale > 2.0 * tie_tolerance;
                if (!taken && !far) near += exp(other - lead);
            }
            sum += m[i] = 1.0 / near;
        }
        for (int i = 0; i < k; i++) w[i] = (float)(m[i] / (sum + renorm_eps));
        if (S > 0) {  /* the gated shares: a softmax over the chosen dynamic and the shared logits */
            float g_top = l[N], g_total = 0.0f, dynamic = 0.0f;
            for (int i = 0; i < k; i++) g_top = l[chosen[i]] > g_top ? l[chosen[i]] : g_top;
            for (int s = 1; s < S; s++) g_top = l[N + s] > g_top ? l[N + s] : g_top;
            for (int i = 0; i < k; i++) g_total += expf(l[chosen[i]] - g_top);
            for (int s = 0; s < S; s++) g_total += shares[t * S + s] = expf(l[N + s] - g_top);
            for (int i = 0; i < k; i++) dynamic += expf(l[chosen[i]] - g_top) / g_total;
            for (int s = 0; s < S; s++) shares[t * S + s] /= g_total;
            for (int i = 0; i < k; i++) w[i] *= dynamic;
        }
    }
    memset(y, 0, sizeof(float) * T * D);
    float scale[MAX_TOKENS];
    for (int s = 0; s < S; s++) {
        for (int t = 0; t < T; t++) scale[t] = shares[t * S + s];
        Matrix s_in = {packed_shared_in ? NULL : shared_w_in, packed_shared_in};
        Matrix s_out = {packed_shared_out ? NULL : shared_w_out, packed_shared_out};
        add_mlp(offset(s_in, (int64_t)s * 2 * HS * D, s * panel_floats(2 * HS, D)), NULL,
                offset(s_out, (int64_t)s * D * HS, s * panel_floats(D, HS)), D, HS, 1, act, x, T, D, scale, y, D, h,
                y_tmp);
    }
    Matrix e_in = {packed_in ? NULL : w_in, packed_in}, e_out = {packed_out ? NULL : w_out, packed_out};
    add_chosen_experts(T, D, E, H, 1, act, ids, weights, N, NULL, e_in, e_out, x, y, h, x_rows, y_tmp, acc);
    return columns;
}

/* The training walk's gated-SiLU backward over rows of one expert (moezoo/kernels/cpu_backend.py, not a decode
 * step; it shares this library's build). Per row c, from the pre-activations h = [gate | up] (H each), the
 * gradient g = dL/d(w a) at the row's weighted activation and its routing weight w[c]:
 *   a = silu(gate) * up,  dw[c] = <g, a>,  aw = w a (the input of W_out's gradient),
 *   dgate = w g up silu'(gate),  dup = w g silu(gate),  with silu'(v) = s (1 + v (1 - s)), s = sigmoid(v).
 * One pass over the rows where torch makes eight elementwise calls, each reading and writing [C, H] floats. The
 * sigmoids of a block of GLU_BLOCK columns go to a stack buffer first: GCC's code for the one loop with the
 * exponential inside ran at 2.6 ns an element on AMD Zen 3 (AVX2 only), the two loops at 1.0. */
#define GLU_BLOCK 256
void glu_silu_backward_f32(int64_t C, int H, const float *restrict h, int64_t ldh, const float *restrict g, int64_t ldg,
                           const float *restrict w, float *restrict aw, int64_t ldaw, float *restrict gh, int64_t ldgh,
                           float *restrict dw) {
    float sig[GLU_BLOCK];
    for (int64_t c = 0; c < C; c++) {
        const float weight = w[c];
        float dot = 0.0f;
        for (int j0 = 0; j0 < H; j0 += GLU_BLOCK) {
            const int n = H - j0 < GLU_BLOCK ? H - j0 : GLU_BLOCK;
            const float *gate = h + c * ldh + j0, *up = gate + H, *grad = g + c * ldg + j0;
            float *a_w = aw + c * ldaw + j0, *d_gate = gh + c * ldgh + j0, *d_up = d_gate + H;
            for (int j = 0; j < n; j++) sig[j] = 1.0f / (1.0f + exp_vec(-gate[j]));
#pragma omp simd reduction(+ : dot)
            for (int j = 0; j < n; j++) {
                float v = gate[j], s = sig[j], act = v * s, a = act * up[j];
                float dz = grad[j] * weight;
                dot += grad[j] * a;
                a_w[j] = a * weight;
                d_up[j] = dz * act;
                d_gate[j] = dz * up[j] * s * (1.0f + v * (1.0f - s));
            }
        }
        dw[c] = dot;
    }
}
