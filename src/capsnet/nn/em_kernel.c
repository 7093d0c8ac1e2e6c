/* The vote-sized parts of EM routing (capsnet.nn.em_kernel), forward and backward.

   Convolutional matrix capsules make a vote V = M W (4x4 matrices, row-major, 16 floats)
   for every (window, output type, input) of every image: 5.3 million floats an image in
   the paper's ConvCaps1, which torch would write and read many times an iteration. Here a
   "block" is one image's window, taken one input capsule at a time: its pose, spread once
   into the permutations the products take, makes its votes for every output type from the
   weights (inputs x outputs x 16, in the core's cache), and each vote is used where it is
   made and never stored;
   where a vote is needed twice, it is made twice. Per-output sums of a block (outputs x 16)
   stay in the first-level cache. Blocks run in parallel; the weights' gradient is summed in
   a buffer of each thread's, which the caller adds up.

   Shapes, with B blocks, I inputs, O outputs and 16 = a pose:
     poses (B, I, 16), weight (I, O, 16), weight_t (I, O, 16) the same matrices transposed,
     offset (I, 16) or NULL, added to each input's every vote (the class capsules' coordinate
     addition, V = M W + offset),
     activations (B, I), assignment logits log_p (B, O, I) and their normalisers log_total
     (B, I) (the assignments are R_oi = exp(log_p_oi - log_total_i), the data assigned to an
     output w_oi = R_oi a_i), mass and bias (B, O), mean, spread and inverse (B, O, 16),
     the E-step's log-sum-exp over outputs lse (B, I). */

#include <stdint.h>
#include <math.h>
#include <string.h>
#include <omp.h>

#ifdef VECTOR_EXP /* glibc's vector expf (libmvec), so that the loops of exp vectorize */
#pragma omp declare simd notinbranch
float expf(float);
#endif

#define POSE 16

/* A pose as one vector of 16 floats (GCC's vector extension: one AVX-512 register, two AVX2
   ones, four SSE ones), read with memcpy as poses need not be aligned. Each 4x4
   product below is four multiply-adds of whole vectors whose lanes are permuted so that
   lane (a, b) holds the terms of element (a, b); every index is a lane, 4 row + column. */
typedef float pose_t __attribute__((vector_size(POSE * sizeof(float))));
typedef int32_t lanes_t __attribute__((vector_size(POSE * sizeof(int32_t))));
/* Half a pose: one AVX2 register. */
#define EIGHT 8
typedef float eight_t __attribute__((vector_size(EIGHT * sizeof(float))));
typedef int32_t eight_lanes_t __attribute__((vector_size(EIGHT * sizeof(int32_t))));

#define LANES(f) {f(0, 0), f(0, 1), f(0, 2), f(0, 3), f(1, 0), f(1, 1), f(1, 2), f(1, 3), \
                  f(2, 0), f(2, 1), f(2, 2), f(2, 3), f(3, 0), f(3, 1), f(3, 2), f(3, 3)}
/* lane (a, b) of the result takes lane ... of the source: */
#define ROW(k) LANES(ROW_##k)            /* (k, b): row k, in every row */
#define COLUMN(k) LANES(COLUMN_##k)      /* (a, k): element k of the same row */
#define ROW_T(k) LANES(ROW_T_##k)        /* (k, a): row k as a column */
#define ROW_0(a, b) (b)
#define ROW_1(a, b) (4 + (b))
#define ROW_2(a, b) (8 + (b))
#define ROW_3(a, b) (12 + (b))
#define COLUMN_0(a, b) (4 * (a))
#define COLUMN_1(a, b) (4 * (a) + 1)
#define COLUMN_2(a, b) (4 * (a) + 2)
#define COLUMN_3(a, b) (4 * (a) + 3)
#define ROW_T_0(a, b) (a)
#define ROW_T_1(a, b) (4 + (a))
#define ROW_T_2(a, b) (8 + (a))
#define ROW_T_3(a, b) (12 + (a))

static inline pose_t load(const float *p) {
    pose_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

#ifdef __AVX512F__
#include <immintrin.h>

static inline void store(float *p, pose_t v) { memcpy(p, &v, sizeof v); }

/* Row k of a pose in every row (lane (a, b): element (k, b)), read from memory: a broadcast
   load, which leaves the shuffle unit to the other products. */
static inline pose_t row(const float *p, int k) {
    return (pose_t)_mm512_broadcast_f32x4(_mm_loadu_ps(p + 4 * k));
}
#elif defined(__AVX__)
#include <immintrin.h>

/* With AVX alone a pose is two registers, and GCC stores and shuffles it float by float
   through the stack: here each half is stored, and broadcast, on its own. */

static inline void store(float *p, pose_t v) {
    _mm256_storeu_ps(p, (__m256)__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_storeu_ps(p + EIGHT,
                     (__m256)__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

static inline pose_t row(const float *p, int k) {
    const eight_t half = (eight_t)_mm256_broadcast_ps((const __m128 *)(p + 4 * k));
    return __builtin_shufflevector(half, half, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                   14, 15);
}
#else
static inline void store(float *p, pose_t v) { memcpy(p, &v, sizeof v); }

static const lanes_t ROWS[4] = {ROW(0), ROW(1), ROW(2), ROW(3)};

static inline pose_t row(const float *p, int k) { return __builtin_shuffle(load(p), ROWS[k]); }
#endif

/* The sums of the lanes of n <= 16 poses, sums[o] = sum_h parts[o][h], eight at a time:
   16 single-lane sums of a pose take about as long as a vote. A pose's two halves are added
   (eight lanes, one register with AVX2), then three rounds of pairwise merges, each adding two
   shuffles of two such vectors, halve the vectors and the lanes each sum is spread over:
   round s leaves in lane l with bit s clear the sum of lanes l and l + s of the first vector,
   with it set those of the second; so lane l ends with the sum of the pose whose index is
   l's three bits reversed. */
#define CHUNK 16
#define LANES_OF(f) {f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7)}
/* lane l of the first operand (bit s clear) or the second (bit s set), and its partner: */
#define KEEP_4(l) ((l) & 4 ? EIGHT + (l) - 4 : (l))
#define MOVE_4(l) ((l) & 4 ? EIGHT + (l) : (l) + 4)
#define KEEP_2(l) ((l) & 2 ? EIGHT + (l) - 2 : (l))
#define MOVE_2(l) ((l) & 2 ? EIGHT + (l) : (l) + 2)
#define KEEP_1(l) ((l) & 1 ? EIGHT + (l) - 1 : (l))
#define MOVE_1(l) ((l) & 1 ? EIGHT + (l) : (l) + 1)
#define MERGE(s, x, y) (__builtin_shuffle(x, y, (eight_lanes_t)LANES_OF(KEEP_##s)) \
                        + __builtin_shuffle(x, y, (eight_lanes_t)LANES_OF(MOVE_##s)))

static const int8_t REVERSED[EIGHT] = {0, 4, 2, 6, 1, 5, 3, 7};

static void totals(float *parts, int64_t n, float *sums) {
    memset(parts + n * POSE, 0, sizeof(float) * (CHUNK - n) * POSE);
    for (int64_t first = 0; first < n; first += EIGHT) {
        eight_t halves[EIGHT], quarters[4], eighths[2];
        for (int j = 0; j < EIGHT; j++) {
            eight_t low, high;  /* read as halves: GCC splits a wider vector float by float */
            memcpy(&low, parts + (first + j) * POSE, sizeof low);
            memcpy(&high, parts + (first + j) * POSE + EIGHT, sizeof high);
            halves[j] = low + high;
        }
        for (int j = 0; j < 4; j++) quarters[j] = MERGE(4, halves[2 * j], halves[2 * j + 1]);
        for (int j = 0; j < 2; j++) eighths[j] = MERGE(2, quarters[2 * j], quarters[2 * j + 1]);
        const eight_t all = MERGE(1, eighths[0], eighths[1]);
        for (int l = 0; l < EIGHT; l++)
            if (first + REVERSED[l] < n) sums[first + REVERSED[l]] = all[l];
    }
}

/* An input capsule's pose m spread for the products below, once for all its outputs:
   column[k] has m(a, k) in lane (a, b), row_t[k] has m(k, a); shift is its offset (zeros
   without). Kept in memory (the first-level cache), where the products read them as
   operands: in registers, nine poses leave too few for the rest where a pose takes two
   (AVX2). */
typedef struct { float column[4][POSE], row_t[4][POSE], shift[POSE]; } spread_t;

/* Input i's pose from poses (B, I, 16) of block b, and its offset. */
static inline void spread_pose(spread_t *spread, const float *poses, const float *offset,
                               int64_t b, int64_t i, int64_t inputs) {
    const pose_t m = load(poses + (b * inputs + i) * POSE);
    store(spread->shift, offset ? load(offset + i * POSE) : (pose_t){0});
    store(spread->column[0], __builtin_shuffle(m, (lanes_t)COLUMN(0)));
    store(spread->column[1], __builtin_shuffle(m, (lanes_t)COLUMN(1)));
    store(spread->column[2], __builtin_shuffle(m, (lanes_t)COLUMN(2)));
    store(spread->column[3], __builtin_shuffle(m, (lanes_t)COLUMN(3)));
    store(spread->row_t[0], __builtin_shuffle(m, (lanes_t)ROW_T(0)));
    store(spread->row_t[1], __builtin_shuffle(m, (lanes_t)ROW_T(1)));
    store(spread->row_t[2], __builtin_shuffle(m, (lanes_t)ROW_T(2)));
    store(spread->row_t[3], __builtin_shuffle(m, (lanes_t)ROW_T(3)));
}

/* The vote m w + shift: (a, b) = sum_k m(a, k) w(k, b) + shift(a, b). */
static inline pose_t vote(const spread_t *m, const float *w) {
    return load(m->column[0]) * row(w, 0) + load(m->column[1]) * row(w, 1)
         + load(m->column[2]) * row(w, 2) + load(m->column[3]) * row(w, 3) + load(m->shift);
}

/* The gradient of m from that of a vote, g w^T: (a, b) = sum_k g(a, k) w(b, k) = sum_k
   g(a, k) w_t(k, b). */
static inline pose_t vote_grad_pose(pose_t g, const float *w_t) {
    return __builtin_shuffle(g, (lanes_t)COLUMN(0)) * row(w_t, 0)
         + __builtin_shuffle(g, (lanes_t)COLUMN(1)) * row(w_t, 1)
         + __builtin_shuffle(g, (lanes_t)COLUMN(2)) * row(w_t, 2)
         + __builtin_shuffle(g, (lanes_t)COLUMN(3)) * row(w_t, 3);
}

/* The gradient of w, m^T g: (a, b) = sum_k m(k, a) g(k, b). */
static inline pose_t vote_grad_weight(const spread_t *m, pose_t g) {
    return load(m->row_t[0]) * __builtin_shuffle(g, (lanes_t)ROW(0))
         + load(m->row_t[1]) * __builtin_shuffle(g, (lanes_t)ROW(1))
         + load(m->row_t[2]) * __builtin_shuffle(g, (lanes_t)ROW(2))
         + load(m->row_t[3]) * __builtin_shuffle(g, (lanes_t)ROW(3));
}

static inline void add(float *p, pose_t v) { store(p, load(p) + v); }

/* Floats of scratch one thread needs: a block's assignments and shares (or, for the
   assignment logits, a row of inputs); in backward also its weight gradient, kept first,
   a block's g_mean, a gradient for each (output, input), the masses and a row of inputs. */
int64_t em_scratch(int64_t inputs, int64_t outputs, int backward) {
    return 2 * inputs * outputs
           + (backward ? (inputs + 1) * outputs * POSE + inputs * outputs + outputs + inputs : 0);
}

/* A block's assignments R_oi = exp(log_p_oi - log_total_i) (log_p NULL: zeros), into r (O, I),
   and the shares of each output's data w_oi = R_oi a_i, share_oi = w_oi / (mass_o + epsilon)
   with mass_o = sum_i w_oi, into share (O, I) and mass (O): made here, in the cache, rather
   than as tensors of their own. */
static void assignments(const float *log_p, const float *log_total, const float *a,
                        int64_t inputs, int64_t outputs, float epsilon, float *r, float *share,
                        float *mass) {
    for (int64_t o = 0; o < outputs; o++) {
        const float *z = log_p ? log_p + o * inputs : NULL;
        for (int64_t i = 0; i < inputs; i++)
            r[o * inputs + i] = expf((z ? z[i] : 0) - log_total[i]);
    }
    for (int64_t o = 0; o < outputs; o++) {
        const float *row = r + o * inputs;
        float sum = 0;
        for (int64_t i = 0; i < inputs; i++) sum += row[i] * a[i];
        const float scale = 1 / (sum + epsilon);
        for (int64_t i = 0; i < inputs; i++) share[o * inputs + i] = row[i] * a[i] * scale;
        mass[o] = sum;
    }
}

/* The M-step's moments of the votes weighted by each output's shares of its data: mean =
   sum_i share_i V_i, spread = sum_i share_i (V_i - mean)^2, and each output's mass (B, O). */
void em_moments(const float *poses, const float *weight, const float *offset,
                const float *log_p, const float *log_total, const float *activations,
                int64_t blocks, int64_t inputs, int64_t outputs, int threads, float epsilon,
                float *scratch, float *mean, float *spread, float *mass) {
    #pragma omp parallel num_threads(threads)
    {
        spread_t m;  /* the input capsule's pose at hand */
        float *r = scratch + omp_get_thread_num() * em_scratch(inputs, outputs, 0);
        float *s = r + outputs * inputs;
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            float *mu = mean + b * outputs * POSE, *var = spread + b * outputs * POSE;
            assignments(log_p ? log_p + b * outputs * inputs : NULL, log_total + b * inputs,
                        activations + b * inputs, inputs, outputs, epsilon, r, s,
                        mass + b * outputs);
            memset(mu, 0, sizeof(float) * outputs * POSE);
            for (int64_t i = 0; i < inputs; i++) {
                spread_pose(&m, poses, offset, b, i, inputs);
                for (int64_t o = 0; o < outputs; o++)
                    add(mu + o * POSE, s[o * inputs + i] * vote(&m, weight + (i * outputs + o) * POSE));
            }
            memset(var, 0, sizeof(float) * outputs * POSE);
            for (int64_t i = 0; i < inputs; i++) {
                spread_pose(&m, poses, offset, b, i, inputs);
                for (int64_t o = 0; o < outputs; o++) {
                    const pose_t d = vote(&m, weight + (i * outputs + o) * POSE) - load(mu + o * POSE);
                    add(var + o * POSE, s[o * inputs + i] * d * d);
                }
            }
        }
    }
}

/* From the gradients of mean, spread and mass, those of poses, log_p (when given), log_total,
   activations and (into each thread's scratch) weight. With d_i = V_i - mean, the spread's
   path through the mean adds -2 D g_spread to g_mean, where D = sum_i share_i d_i =
   mean (1 - sum_i share_i) (as mean = sum_i share_i V_i), so no vote is made for it; then
   g_share_i = sum_h g_mean_h V_ih + g_spread_h d_ih^2,
   g_V_i = share_i (g_mean + 2 g_spread d_i), through the shares and the mass
   g_w_i = (g_share_i - sum_k g_share_k share_k) / (mass + epsilon) + g_mass, and through
   w_i = a_i exp(log_p_i - log_total_i): g_log_p_i = g_w_i w_i, summed over outputs
   -g_log_total_i, and g_a_i = sum over outputs of g_w_i R_i. */
void em_moments_backward(const float *poses, const float *weight, const float *weight_t,
                         const float *offset, const float *log_p, const float *log_total,
                         const float *activations, const float *mean, const float *grad_mean,
                         const float *grad_spread, const float *grad_mass, int64_t blocks,
                         int64_t inputs, int64_t outputs, int threads, float epsilon,
                         float *scratch, float *grad_poses, float *grad_log_p,
                         float *grad_log_total, float *grad_activations) {
    #pragma omp parallel num_threads(threads)
    {
        spread_t m;  /* the input capsule's pose at hand */
        float parts[CHUNK * POSE];  /* a chunk of outputs' terms, and their sums */
        float sums[CHUNK];
        float *grad_weight = scratch + omp_get_thread_num() * em_scratch(inputs, outputs, 1);
        float *gmu = grad_weight + inputs * outputs * POSE;  /* g_mean */
        float *g = gmu + outputs * POSE;  /* g_share, then g_w */
        float *r = g + outputs * inputs, *s = r + outputs * inputs, *mass = s + outputs * inputs;
        float *unused = mass + outputs;
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const float *mu = mean + b * outputs * POSE, *gvar = grad_spread + b * outputs * POSE;
            const float *a = activations + b * inputs;
            assignments(log_p ? log_p + b * outputs * inputs : NULL, log_total + b * inputs, a,
                        inputs, outputs, epsilon, r, s, mass);
            for (int64_t o = 0; o < outputs; o++) {
                const float unshared = epsilon / (mass[o] + epsilon);  /* 1 - sum_i share_i */
                store(gmu + o * POSE, load(grad_mean + (b * outputs + o) * POSE)
                                      - 2 * unshared * load(gvar + o * POSE) * load(mu + o * POSE));
            }
            for (int64_t i = 0; i < inputs; i++) {
                spread_pose(&m, poses, offset, b, i, inputs);
                float *gm = grad_poses + (b * inputs + i) * POSE;
                memset(gm, 0, sizeof(float) * POSE);
                for (int64_t first = 0; first < outputs; first += CHUNK) {
                    const int64_t n = outputs - first < CHUNK ? outputs - first : CHUNK;
                    for (int64_t o = first; o < first + n; o++) {
                        const int64_t io = (i * outputs + o) * POSE;
                        const pose_t v = vote(&m, weight + io), d = v - load(mu + o * POSE);
                        const pose_t g_mean = load(gmu + o * POSE);
                        const pose_t g_spread = load(gvar + o * POSE);
                        store(parts + (o - first) * POSE, g_mean * v + g_spread * d * d);
                        const pose_t gv = s[o * inputs + i] * (g_mean + 2 * g_spread * d);
                        add(gm, vote_grad_pose(gv, weight_t + io));
                        add(grad_weight + io, vote_grad_weight(&m, gv));
                    }
                    totals(parts, n, sums);
                    for (int64_t o = first; o < first + n; o++) g[o * inputs + i] = sums[o - first];
                }
            }
            float *g_total = grad_log_total + b * inputs, *g_a = grad_activations + b * inputs;
            memset(g_total, 0, sizeof(float) * inputs);
            memset(g_a, 0, sizeof(float) * inputs);
            for (int64_t o = 0; o < outputs; o++) {
                const float *g_share = g + o * inputs, *r_o = r + o * inputs;
                const float *share_o = s + o * inputs;
                float shared = 0;
                for (int64_t i = 0; i < inputs; i++) shared += g_share[i] * share_o[i];
                const float scale = 1 / (mass[o] + epsilon), g_mass = grad_mass[b * outputs + o];
                /* without logits, into a row that is thrown away: a loop with no branch
                   vectorizes */
                float *g_lp = grad_log_p ? grad_log_p + (b * outputs + o) * inputs : unused;
                for (int64_t i = 0; i < inputs; i++) {
                    const float g_w = scale * (g_share[i] - shared) + g_mass;
                    const float g_log_p = g_w * r_o[i] * a[i];
                    g_lp[i] = g_log_p;
                    g_total[i] -= g_log_p;
                    g_a[i] += g_w * r_o[i];
                }
            }
        }
    }
}

/* The E-step's assignment logits, log a_j p_j(V_i) = bias - sum_h (V_ih - mean_h)^2 inverse_h
   / 2 with bias (B, O) the rest of the log (log a_j and the log-density's normaliser), into
   logits (B, O, I), and for each input their log-sum-exp over the outputs, lse (B, I). */
void em_assignment_logits(const float *poses, const float *weight, const float *offset,
                          const float *mean, const float *inverse, const float *bias,
                          int64_t blocks, int64_t inputs, int64_t outputs, int threads,
                          float *scratch, float *logits, float *lse) {
    #pragma omp parallel num_threads(threads)
    {
        spread_t m;  /* the input capsule's pose at hand */
        float parts[CHUNK * POSE];  /* a chunk of outputs' terms, and their sums */
        float sums[CHUNK];
        float *peak = scratch + omp_get_thread_num() * em_scratch(inputs, outputs, 0);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const float *mu = mean + b * outputs * POSE, *u = inverse + b * outputs * POSE;
            float *z = logits + b * outputs * inputs, *sum = lse + b * inputs;
            for (int64_t i = 0; i < inputs; i++) {
                spread_pose(&m, poses, offset, b, i, inputs);
                for (int64_t first = 0; first < outputs; first += CHUNK) {
                    const int64_t n = outputs - first < CHUNK ? outputs - first : CHUNK;
                    for (int64_t o = first; o < first + n; o++) {
                        const pose_t d = vote(&m, weight + (i * outputs + o) * POSE)
                                         - load(mu + o * POSE);
                        store(parts + (o - first) * POSE, d * d * load(u + o * POSE));
                    }
                    totals(parts, n, sums);
                    for (int64_t o = first; o < first + n; o++)
                        z[o * inputs + i] = bias[b * outputs + o] - 0.5f * sums[o - first];
                }
            }
            memcpy(peak, z, sizeof(float) * inputs);
            for (int64_t o = 1; o < outputs; o++)
                for (int64_t i = 0; i < inputs; i++)
                    peak[i] = z[o * inputs + i] > peak[i] ? z[o * inputs + i] : peak[i];
            memset(sum, 0, sizeof(float) * inputs);
            for (int64_t o = 0; o < outputs; o++)
                for (int64_t i = 0; i < inputs; i++) sum[i] += expf(z[o * inputs + i] - peak[i]);
            for (int64_t i = 0; i < inputs; i++) sum[i] = peak[i] + logf(sum[i]);
        }
    }
}

/* From the gradients of logits and lse, those of poses, mean, inverse, bias and (into each
   thread's scratch) weight: the logit's whole gradient is
   g_z_i = g_logits_i + g_lse_i exp(z_i - lse_i), so g_bias = sum_i g_z_i and, with the
   scaled deviation's gradient g_i = -g_z_i / 2, g_V_i = 2 g_i d_i inverse,
   g_mean = -sum_i g_V_i and g_inverse = sum_i g_i d_i^2. */
void em_assignment_logits_backward(const float *poses, const float *weight,
                                   const float *weight_t, const float *offset, const float *mean,
                                   const float *inverse, const float *logits, const float *lse,
                                   const float *grad_logits, const float *grad_lse,
                                   int64_t blocks, int64_t inputs, int64_t outputs, int threads,
                                   float *scratch, float *grad_poses, float *grad_mean,
                                   float *grad_inverse, float *grad_bias) {
    #pragma omp parallel num_threads(threads)
    {
        spread_t m;  /* the input capsule's pose at hand */
        float *grad_weight = scratch + omp_get_thread_num() * em_scratch(inputs, outputs, 1);
        float *g = grad_weight + inputs * outputs * POSE;
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const float *mu = mean + b * outputs * POSE, *u = inverse + b * outputs * POSE;
            const float *z = logits + b * outputs * inputs, *g_z = grad_logits + b * outputs * inputs;
            const float *l = lse + b * inputs, *g_l = grad_lse + b * inputs;
            float *gmu = grad_mean + b * outputs * POSE, *gu = grad_inverse + b * outputs * POSE;
            for (int64_t o = 0; o < outputs; o++) {
                float g_bias = 0;
                for (int64_t i = 0; i < inputs; i++) {
                    const float share = expf(z[o * inputs + i] - l[i]);  /* of the lse */
                    const float g_logit = g_z[o * inputs + i] + g_l[i] * share;
                    g_bias += g_logit;
                    g[o * inputs + i] = -0.5f * g_logit;
                }
                grad_bias[b * outputs + o] = g_bias;
            }
            memset(gmu, 0, sizeof(float) * outputs * POSE);
            memset(gu, 0, sizeof(float) * outputs * POSE);
            for (int64_t i = 0; i < inputs; i++) {
                spread_pose(&m, poses, offset, b, i, inputs);
                float *gm = grad_poses + (b * inputs + i) * POSE;
                memset(gm, 0, sizeof(float) * POSE);
                for (int64_t o = 0; o < outputs; o++) {
                    const int64_t io = (i * outputs + o) * POSE;
                    const pose_t d = vote(&m, weight + io) - load(mu + o * POSE);
                    const float g_i = g[o * inputs + i];
                    const pose_t gv = 2 * g_i * d * load(u + o * POSE);
                    add(gmu + o * POSE, -gv);
                    add(gu + o * POSE, g_i * d * d);
                    add(gm, vote_grad_pose(gv, weight_t + io));
                    add(grad_weight + io, vote_grad_weight(&m, gv));
                }
            }
        }
    }
}
