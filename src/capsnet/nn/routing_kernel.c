/* Dynamic routing on a CPU, float32, forward and backward (see routing_kernel.py).
 *
 * Compiled with OUT_CAPS, OUT_DIM and IN_DIM defined, so that the short loops unroll and the
 * loops over input capsules, the innermost dimension of everything per example, vectorize:
 *   u            (batch, in_caps, IN_DIM)                 input capsules
 *   weight       (in_caps, OUT_CAPS, OUT_DIM, IN_DIM)     the transformation matrices W
 *   weight_t     (OUT_CAPS, OUT_DIM, IN_DIM, in_caps)     W rearranged by the forward
 *   v            (batch, OUT_CAPS, OUT_DIM)               output capsules
 *   coupling     (batch, iterations, OUT_CAPS, in_caps)   c of every iteration
 *   s            (batch, iterations, OUT_CAPS, OUT_DIM)   s of every iteration (before squash)
 * The predictions u_hat, (OUT_CAPS, OUT_DIM, in_caps) for one example (737 KB for MNIST),
 * are made for one example at a time, stay in the core's cache through the iterations, and
 * are made again in the backward pass rather than kept. Each thread works in its own slice
 * of ``scratch``, of the size that the *_scratch functions give.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define OUT (OUT_CAPS * OUT_DIM)
#define LANES 16 /* input capsules at a time in the transposes and the gradient of W */

#ifdef VECTOR_EXP /* glibc's vector expf (libmvec), so that the softmax vectorizes */
#pragma omp declare simd notinbranch
float expf(float);
#endif

static void transpose_weight(const float *restrict weight, int64_t in_caps, int threads,
                             float *restrict weight_t) {
    /* 16 input capsules at a time: each cache line read is used for 16 outputs. */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t first = 0; first < in_caps; first += LANES) {
        const int64_t last = first + LANES < in_caps ? first + LANES : in_caps;
        for (int ok = 0; ok < OUT * IN_DIM; ok++)
            for (int64_t i = first; i < last; i++)
                weight_t[ok * in_caps + i] = weight[i * OUT * IN_DIM + ok];
    }
}

/* One example's u (in_caps, IN_DIM) -> u_t (IN_DIM, in_caps). */
static void transpose_input(const float *restrict u, int64_t in_caps, float *restrict u_t) {
    for (int64_t i = 0; i < in_caps; i++)
        for (int k = 0; k < IN_DIM; k++)
            u_t[k * in_caps + i] = u[i * IN_DIM + k];
}

/* u_hat[o, i] = sum_k W[i, o, k] u[i, k] for one example. */
static void predict(const float *restrict u_t, const float *restrict weight_t, int64_t in_caps,
                    float *restrict u_hat) {
    for (int o = 0; o < OUT; o++) {
        const float *w = weight_t + o * IN_DIM * in_caps;
        for (int64_t i = 0; i < in_caps; i++) {
            float acc = 0;
            for (int k = 0; k < IN_DIM; k++)
                acc += w[k * in_caps + i] * u_t[k * in_caps + i];
            u_hat[o * in_caps + i] = acc;
        }
    }
}

/* out[i] += sum_d weights[d] rows[d, i]: a weighted sum of OUT_DIM rows of in_caps. */
static void add_weighted_rows(const float *restrict weights, const float *restrict rows,
                              int64_t in_caps, float *restrict out) {
    for (int64_t i = 0; i < in_caps; i++) {
        float sum = 0;
        for (int d = 0; d < OUT_DIM; d++)
            sum += weights[d] * rows[d * in_caps + i];
        out[i] += sum;
    }
}

/* out[j, d] = sum_i weights[j, i] u_hat[j, d, i]: s from the couplings, or the gradient of v
 * from that of the logits. */
static void sum_over_inputs(const float *restrict weights, const float *restrict u_hat,
                            int64_t in_caps, float *restrict out) {
    for (int o = 0; o < OUT; o++) {
        const float *w = weights + (o / OUT_DIM) * in_caps, *uh = u_hat + o * in_caps;
        float sum = 0;
        for (int64_t i = 0; i < in_caps; i++)
            sum += w[i] * uh[i];
        out[o] = sum;
    }
}

/* v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), per output capsule. */
static void squash(const float *restrict s, float eps, float *restrict v) {
    for (int j = 0; j < OUT_CAPS; j++) {
        float n = 0;
        for (int d = 0; d < OUT_DIM; d++)
            n += s[j * OUT_DIM + d] * s[j * OUT_DIM + d];
        const float scale = n / (1 + n) / sqrtf(n + eps);
        for (int d = 0; d < OUT_DIM; d++)
            v[j * OUT_DIM + d] = scale * s[j * OUT_DIM + d];
    }
}

/* The gradient of squash at s: with v = g(n) s and n = |s|^2,
 * grad_s = g grad_v + 2 g'(n) (s . grad_v) s. */
static void squash_backward(const float *restrict s, const float *restrict grad_v, float eps,
                            float *restrict grad_s) {
    for (int j = 0; j < OUT_CAPS; j++) {
        const float *sj = s + j * OUT_DIM, *gj = grad_v + j * OUT_DIM;
        float n = 0, sg = 0;
        for (int d = 0; d < OUT_DIM; d++) {
            n += sj[d] * sj[d];
            sg += sj[d] * gj[d];
        }
        const float root = sqrtf(n + eps);
        const float g = n / (1 + n) / root;
        const float dg = 1 / ((1 + n) * root) - g / (1 + n) - 0.5f * g / (n + eps);
        for (int d = 0; d < OUT_DIM; d++)
            grad_s[j * OUT_DIM + d] = g * gj[d] + 2 * dg * sg * sj[d];
    }
}

/* c[:, i] = softmax over output capsules of logits[:, i], for every input capsule i; with
 * leaky, over one more output whose logit is 0 and whose coupling is dropped. top and total
 * are scratch rows of in_caps. */
static void softmax(const float *restrict logits, int64_t in_caps, int leaky,
                    float *restrict top, float *restrict total, float *restrict c) {
    for (int64_t i = 0; i < in_caps; i++)
        top[i] = leaky ? fmaxf(0, logits[i]) : logits[i];
    for (int j = 1; j < OUT_CAPS; j++)
        for (int64_t i = 0; i < in_caps; i++)
            top[i] = fmaxf(top[i], logits[j * in_caps + i]);
    for (int64_t i = 0; i < in_caps; i++)
        total[i] = leaky ? expf(-top[i]) : 0;
    for (int j = 0; j < OUT_CAPS; j++)
        for (int64_t i = 0; i < in_caps; i++) {
            c[j * in_caps + i] = expf(logits[j * in_caps + i] - top[i]);
            total[i] += c[j * in_caps + i];
        }
    for (int j = 0; j < OUT_CAPS; j++)
        for (int64_t i = 0; i < in_caps; i++)
            c[j * in_caps + i] /= total[i];
}

/* Route one example: fills s and coupling of every iteration (of the last alone, in their
 * first slot, when keep is 0), and v of the last. bias (OUT values) is added to every s, when
 * given. */
static void route_example(const float *restrict u_hat, const float *restrict bias,
                          int64_t in_caps, int iterations, int leaky, int keep, float eps,
                          float *restrict logits, float *restrict coupling, float *restrict s,
                          float *restrict v) {
    memset(logits, 0, sizeof(float) * OUT_CAPS * in_caps);
    for (int t = 0; t < iterations; t++) {
        const int slot = keep ? t : 0;
        float *c = coupling + slot * OUT_CAPS * in_caps, *st = s + slot * OUT;
        softmax(logits, in_caps, leaky, logits + OUT_CAPS * in_caps,
                logits + (OUT_CAPS + 1) * in_caps, c);
        sum_over_inputs(c, u_hat, in_caps, st);
        if (bias)
            for (int o = 0; o < OUT; o++)
                st[o] += bias[o];
        squash(st, eps, v);
        if (t == iterations - 1)
            break;
        for (int j = 0; j < OUT_CAPS; j++)  /* the agreement u_hat . v */
            add_weighted_rows(v + j * OUT_DIM, u_hat + j * OUT_DIM * in_caps, in_caps,
                              logits + j * in_caps);
    }
}

int64_t routing_forward_scratch(int64_t in_caps) {
    return (IN_DIM + OUT + OUT_CAPS + 2) * in_caps;
}

/* coupling and s hold every iteration when keep is 1 (for the backward), the last when 0;
 * bias may be NULL. */
void routing_forward(const float *u, const float *weight, const float *bias, int64_t batch,
                     int64_t in_caps, int iterations, int leaky, int keep, float eps,
                     int threads, float *scratch, float *weight_t, float *v, float *coupling,
                     float *s) {
    const int slots = keep ? iterations : 1;
    transpose_weight(weight, in_caps, threads, weight_t);
    #pragma omp parallel num_threads(threads)
    {
        float *u_t = scratch + omp_get_thread_num() * routing_forward_scratch(in_caps);
        float *u_hat = u_t + IN_DIM * in_caps, *logits = u_hat + OUT * in_caps;
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            transpose_input(u + b * in_caps * IN_DIM, in_caps, u_t);
            predict(u_t, weight_t, in_caps, u_hat);
            route_example(u_hat, bias, in_caps, iterations, leaky, keep, eps, logits,
                          coupling + b * slots * OUT_CAPS * in_caps, s + b * slots * OUT,
                          v + b * OUT);
        }
    }
}

/* Backward through the iterations of one example, last to first: fills grad_s (the gradient
 * of every s, and so of the bias) and grad_logits (slot t >= 1: the gradient of the logits of
 * iteration t). The logits of iteration t are those of t - 1 plus u_hat . v_{t-1}, so the
 * gradient of v_{t-1} is the sum over input capsules of grad_logits_t u_hat. The softmax's
 * gradient is the same with leaky routing: the dropped output's coupling has none. */
static void backward_example(const float *restrict u_hat, const float *restrict grad_v,
                             const float *restrict coupling, const float *restrict s,
                             int64_t in_caps, int iterations, float eps, float *restrict grad_c,
                             float *restrict grad_s, float *restrict grad_logits) {
    float grad[OUT];
    memcpy(grad, grad_v, sizeof grad);
    for (int t = iterations - 1; t >= 0; t--) {
        float *gs = grad_s + t * OUT;
        squash_backward(s + t * OUT, grad, eps, gs);
        if (t == 0)
            break; /* the first coupling is uniform: nothing flows to its logits */
        memset(grad_c, 0, sizeof(float) * OUT_CAPS * in_caps);
        for (int j = 0; j < OUT_CAPS; j++)  /* the gradient of c: u_hat . grad_s */
            add_weighted_rows(gs + j * OUT_DIM, u_hat + j * OUT_DIM * in_caps, in_caps,
                              grad_c + j * in_caps);
        const float *c = coupling + t * OUT_CAPS * in_caps;
        float *gl = grad_logits + t * OUT_CAPS * in_caps;
        float *mean = grad_c + OUT_CAPS * in_caps;
        memset(mean, 0, sizeof(float) * in_caps);
        for (int j = 0; j < OUT_CAPS; j++)
            for (int64_t i = 0; i < in_caps; i++)
                mean[i] += c[j * in_caps + i] * grad_c[j * in_caps + i];
        for (int j = 0; j < OUT_CAPS; j++) {
            const int64_t row = j * in_caps;
            for (int64_t i = 0; i < in_caps; i++)
                gl[row + i] = c[row + i] * (grad_c[row + i] - mean[i]);
            if (t + 1 < iterations)
                for (int64_t i = 0; i < in_caps; i++)
                    gl[row + i] += gl[OUT_CAPS * in_caps + row + i];
        }
        sum_over_inputs(gl, u_hat, in_caps, grad);
    }
}

/* The gradients of u and W for input capsules first..first+LANES of every example (in_caps
 * is a multiple of LANES: routing_kernel.supports). The
 * gradient of u_hat is sum_t c_t grad_s_t + sum_{t>=1} grad_logits_t v_{t-1}; for one output
 * element o the gradient of W (IN_DIM x LANES values) is summed over the batch in registers. */
static void input_gradients(const float *restrict u_t, const float *restrict weight_t,
                            const float *restrict coupling, const float *restrict grad_s,
                            const float *restrict grad_logits, const float *restrict v_all,
                            int64_t batch, int64_t in_caps, int iterations, int64_t first,
                            float *restrict rows, float *restrict grad_u_t,
                            float *restrict grad_weight) {
    const int64_t per_example = (int64_t)iterations * OUT_CAPS * in_caps;
    const int terms = 2 * iterations - 1;
    for (int j = 0; j < OUT_CAPS; j++) {
        /* This output capsule's c_t and grad_logits_t rows of every example, gathered. */
        for (int64_t b = 0; b < batch; b++)
            for (int t = 0; t < iterations; t++) {
                const int64_t at = b * per_example + (t * OUT_CAPS + j) * in_caps + first;
                memcpy(rows + (b * terms + t) * LANES, coupling + at, sizeof(float) * LANES);
                if (t > 0)
                    memcpy(rows + (b * terms + iterations + t - 1) * LANES, grad_logits + at,
                           sizeof(float) * LANES);
            }
        for (int o = j * OUT_DIM; o < (j + 1) * OUT_DIM; o++) {
            float wt[IN_DIM][LANES], gw[IN_DIM][LANES] = {{0}};
            for (int k = 0; k < IN_DIM; k++)
                for (int i = 0; i < LANES; i++)
                    wt[k][i] = weight_t[(o * IN_DIM + k) * in_caps + first + i];
            for (int64_t b = 0; b < batch; b++) {
                const float *rb = rows + b * terms * LANES;
                const float *gsb = grad_s + b * iterations * OUT + o;
                const float *vb = v_all + b * iterations * OUT + o;
                float gu_hat[LANES];
                for (int i = 0; i < LANES; i++)
                    gu_hat[i] = gsb[0] * rb[i];
                for (int t = 1; t < iterations; t++)
                    for (int i = 0; i < LANES; i++)
                        gu_hat[i] += gsb[t * OUT] * rb[t * LANES + i]
                                     + vb[(t - 1) * OUT] * rb[(iterations + t - 1) * LANES + i];
                const float *ub = u_t + b * IN_DIM * in_caps + first;
                float *gub = grad_u_t + b * IN_DIM * in_caps + first;
                for (int k = 0; k < IN_DIM; k++)
                    for (int i = 0; i < LANES; i++) {
                        gw[k][i] += gu_hat[i] * ub[k * in_caps + i];
                        gub[k * in_caps + i] += gu_hat[i] * wt[k][i];
                    }
            }
            for (int i = 0; i < LANES; i++)
                for (int k = 0; k < IN_DIM; k++)
                    grad_weight[((first + i) * OUT + o) * IN_DIM + k] = gw[k][i];
        }
    }
}

int64_t routing_backward_scratch(int64_t batch, int64_t in_caps, int iterations) {
    const int64_t examples = (OUT + OUT_CAPS + 1) * in_caps;
    const int64_t rows = batch * (2 * iterations - 1) * LANES;
    return examples > rows ? examples : rows;
}

/* grad_s, grad_logits and v_all are like s, coupling and s; u_t and grad_u_t hold u and its
 * gradient as (batch, IN_DIM, in_caps). */
void routing_backward(const float *u, const float *weight_t, const float *grad_v,
                      const float *coupling, const float *s, int64_t batch, int64_t in_caps,
                      int iterations, float eps, int threads, float *scratch, float *grad_s,
                      float *grad_logits, float *v_all, float *u_t, float *grad_u_t,
                      float *grad_u, float *grad_weight) {
    const int64_t per_example = (int64_t)iterations * OUT_CAPS * in_caps;
    #pragma omp parallel num_threads(threads)
    {
        float *mine = scratch + omp_get_thread_num() *
                                routing_backward_scratch(batch, in_caps, iterations);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            float *ub = u_t + b * IN_DIM * in_caps;
            transpose_input(u + b * in_caps * IN_DIM, in_caps, ub);
            memset(grad_u_t + b * IN_DIM * in_caps, 0, sizeof(float) * IN_DIM * in_caps);
            predict(ub, weight_t, in_caps, mine);
            backward_example(mine, grad_v + b * OUT, coupling + b * per_example,
                             s + b * iterations * OUT, in_caps, iterations, eps,
                             mine + OUT * in_caps, grad_s + b * iterations * OUT,
                             grad_logits + b * per_example);
            for (int t = 0; t < iterations; t++)
                squash(s + (b * iterations + t) * OUT, eps, v_all + (b * iterations + t) * OUT);
        }
        #pragma omp for schedule(static)
        for (int64_t first = 0; first < in_caps; first += LANES)
            input_gradients(u_t, weight_t, coupling, grad_s, grad_logits, v_all, batch, in_caps,
                            iterations, first, mine, grad_u_t, grad_weight);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; b++)
            for (int64_t i = 0; i < in_caps; i++)
                for (int k = 0; k < IN_DIM; k++)
                    grad_u[(b * in_caps + i) * IN_DIM + k] =
                        grad_u_t[(b * IN_DIM + k) * in_caps + i];
    }
}
