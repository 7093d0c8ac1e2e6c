/* The vote-sized parts of EM routing (capsnet.nn.em_kernel), forward and backward.

   Convolutional matrix capsules make a vote V = M W (4x4 matrices, row-major, 16 floats)
   for every (window, output type, input) of every image: 5.3 million floats an image in
   the paper's ConvCaps1, which torch would write and read many times an iteration. Here a
   "block" is one image's window: its input poses (inputs x 16 floats) and the weights
   (inputs x outputs x 16) stay in the core's cache, and each vote is made again where it is
   used, kept only in a buffer of one block's votes for one output. Making the votes and
   using them are separate loops, each simple for the compiler's vectoriser: gcc 12 made
   code up to 5x slower of one loop doing both. Blocks run in parallel; the
   weights' gradient is summed in a buffer of each thread's, which the caller adds up.

   Shapes, with B blocks, I inputs, O outputs and 16 = a pose:
     poses (B, I, 16), weight (I, O, 16), share (B, O, I), mean and spread (B, O, 16),
     inverse (B, O, 16), scaled (B, O, I). */

#include <stdint.h>
#include <string.h>
#include <omp.h>

#define POSE 16
#define CHUNK 32  /* votes the deviations make at a time, on the stack */

/* v = m w */
static inline void vote(const float *restrict m, const float *restrict w, float *restrict v) {
    for (int p = 0; p < 4; p++)
        for (int r = 0; r < 4; r++)
            v[4 * p + r] = m[4 * p] * w[r] + m[4 * p + 1] * w[4 + r]
                         + m[4 * p + 2] * w[8 + r] + m[4 * p + 3] * w[12 + r];
}

/* The gradients of v = m w: gm += gv w^T, gw += m^T gv. */
static inline void vote_backward(const float *restrict m, const float *restrict w,
                                 const float *restrict gv, float *restrict gm,
                                 float *restrict gw) {
    for (int p = 0; p < 4; p++)
        for (int q = 0; q < 4; q++)
            gm[4 * p + q] += gv[4 * p] * w[4 * q] + gv[4 * p + 1] * w[4 * q + 1]
                           + gv[4 * p + 2] * w[4 * q + 2] + gv[4 * p + 3] * w[4 * q + 3];
    for (int q = 0; q < 4; q++)
        for (int r = 0; r < 4; r++)
            gw[4 * q + r] += m[q] * gv[r] + m[4 + q] * gv[4 + r]
                           + m[8 + q] * gv[8 + r] + m[12 + q] * gv[12 + r];
}

/* Floats of scratch one thread needs: a block's votes for one output, and with
   weight_grad its own weight gradient. */
int64_t em_scratch(int64_t inputs, int64_t outputs, int weight_grad) {
    return inputs * POSE + (weight_grad ? inputs * outputs * POSE : 0);
}

/* The M-step's moments: mean = sum_i share_i V_i, spread = sum_i share_i (V_i - mean)^2. */
void em_moments(const float *poses, const float *weight, const float *share, int64_t blocks,
                int64_t inputs, int64_t outputs, int threads, float *scratch, float *mean,
                float *spread) {
    #pragma omp parallel num_threads(threads)
    {
        float *votes = scratch + omp_get_thread_num() * em_scratch(inputs, outputs, 0);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const float *m = poses + b * inputs * POSE;
            for (int64_t o = 0; o < outputs; o++) {
                const float *s = share + (b * outputs + o) * inputs;
                float mu[POSE] = {0}, var[POSE] = {0};
                for (int64_t i = 0; i < inputs; i++)
                    vote(m + i * POSE, weight + (i * outputs + o) * POSE, votes + i * POSE);
                for (int64_t i = 0; i < inputs; i++)
                    for (int h = 0; h < POSE; h++) mu[h] += s[i] * votes[i * POSE + h];
                for (int64_t i = 0; i < inputs; i++)
                    for (int h = 0; h < POSE; h++) {
                        float d = votes[i * POSE + h] - mu[h];
                        var[h] += s[i] * d * d;
                    }
                memcpy(mean + (b * outputs + o) * POSE, mu, sizeof mu);
                memcpy(spread + (b * outputs + o) * POSE, var, sizeof var);
            }
        }
    }
}

/* From the gradients of mean and spread, those of poses, share and (into each thread's
   scratch) weight. With d_i = V_i - mean and D = sum_i share_i d_i, the spread's path
   through the mean adds -2 D g_spread to g_mean; then
   g_share_i = sum_h g_mean_h V_ih + g_spread_h d_ih^2 and
   g_V_i = share_i (g_mean + 2 g_spread d_i). */
void em_moments_backward(const float *poses, const float *weight, const float *share,
                         const float *mean, const float *grad_mean, const float *grad_spread,
                         int64_t blocks, int64_t inputs, int64_t outputs, int threads,
                         float *scratch, float *grad_poses, float *grad_share) {
    #pragma omp parallel num_threads(threads)
    {
        float *votes = scratch + omp_get_thread_num() * em_scratch(inputs, outputs, 1);
        float *grad_weight = votes + inputs * POSE;  /* zeros from the caller */
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const float *m = poses + b * inputs * POSE;
            float *gm = grad_poses + b * inputs * POSE;
            memset(gm, 0, sizeof(float) * inputs * POSE);
            for (int64_t o = 0; o < outputs; o++) {
                const int64_t bo = b * outputs + o;
                const float *s = share + bo * inputs, *mu = mean + bo * POSE;
                const float *gvar = grad_spread + bo * POSE;
                float deviation[POSE] = {0}, gmu[POSE];
                for (int64_t i = 0; i < inputs; i++)
                    vote(m + i * POSE, weight + (i * outputs + o) * POSE, votes + i * POSE);
                for (int64_t i = 0; i < inputs; i++)
                    for (int h = 0; h < POSE; h++)
                        deviation[h] += s[i] * (votes[i * POSE + h] - mu[h]);
                for (int h = 0; h < POSE; h++)
                    gmu[h] = grad_mean[bo * POSE + h] - 2 * gvar[h] * deviation[h];
                for (int64_t i = 0; i < inputs; i++) {
                    const float *v = votes + i * POSE;
                    float gv[POSE], gs = 0;
                    for (int h = 0; h < POSE; h++) {
                        float d = v[h] - mu[h];
                        gs += gmu[h] * v[h] + gvar[h] * d * d;
                        gv[h] = s[i] * (gmu[h] + 2 * gvar[h] * d);
                    }
                    grad_share[bo * inputs + i] = gs;
                    vote_backward(m + i * POSE, weight + (i * outputs + o) * POSE, gv,
                                  gm + i * POSE, grad_weight + (i * outputs + o) * POSE);
                }
            }
        }
    }
}

/* The E-step's squared deviations: scaled_i = sum_h (V_ih - mean_h)^2 inverse_h. */
void em_deviations(const float *poses, const float *weight, const float *mean,
                   const float *inverse, int64_t blocks, int64_t inputs, int64_t outputs,
                   int threads, float *scaled) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const float *m = poses + b * inputs * POSE;
        for (int64_t o = 0; o < outputs; o++) {
            const int64_t bo = b * outputs + o;
            const float *mu = mean + bo * POSE, *u = inverse + bo * POSE;
            for (int64_t start = 0; start < inputs; start += CHUNK) {
                const int64_t n = inputs - start < CHUNK ? inputs - start : CHUNK;
                float v[CHUNK * POSE];
                for (int64_t i = 0; i < n; i++)
                    vote(m + (start + i) * POSE, weight + ((start + i) * outputs + o) * POSE,
                         v + i * POSE);
                for (int64_t i = 0; i < n; i++) {
                    float sum = 0;
                    for (int h = 0; h < POSE; h++) {
                        float d = v[i * POSE + h] - mu[h];
                        sum += d * d * u[h];
                    }
                    scaled[bo * inputs + start + i] = sum;
                }
            }
        }
    }
}

/* From the gradient of scaled, those of poses, mean, inverse and (into each thread's
   scratch) weight: g_V_i = 2 g_i d_i inverse, g_mean = -sum_i g_V_i,
   g_inverse = sum_i g_i d_i^2. */
void em_deviations_backward(const float *poses, const float *weight, const float *mean,
                            const float *inverse, const float *grad_scaled, int64_t blocks,
                            int64_t inputs, int64_t outputs, int threads, float *scratch,
                            float *grad_poses, float *grad_mean, float *grad_inverse) {
    #pragma omp parallel num_threads(threads)
    {
        float *votes = scratch + omp_get_thread_num() * em_scratch(inputs, outputs, 1);
        float *grad_weight = votes + inputs * POSE;  /* zeros from the caller */
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const float *m = poses + b * inputs * POSE;
            float *gm = grad_poses + b * inputs * POSE;
            memset(gm, 0, sizeof(float) * inputs * POSE);
            for (int64_t o = 0; o < outputs; o++) {
                const int64_t bo = b * outputs + o;
                const float *mu = mean + bo * POSE, *u = inverse + bo * POSE;
                float gmu[POSE] = {0}, gu[POSE] = {0};
                for (int64_t i = 0; i < inputs; i++)
                    vote(m + i * POSE, weight + (i * outputs + o) * POSE, votes + i * POSE);
                for (int64_t i = 0; i < inputs; i++) {
                    float gv[POSE];
                    const float *v = votes + i * POSE;
                    const float g = grad_scaled[bo * inputs + i];
                    for (int h = 0; h < POSE; h++) {
                        float d = v[h] - mu[h];
                        gv[h] = 2 * g * d * u[h];
                        gmu[h] -= gv[h];
                        gu[h] += g * d * d;
                    }
                    vote_backward(m + i * POSE, weight + (i * outputs + o) * POSE, gv,
                                  gm + i * POSE, grad_weight + (i * outputs + o) * POSE);
                }
                memcpy(grad_mean + bo * POSE, gmu, sizeof gmu);
                memcpy(grad_inverse + bo * POSE, gu, sizeof gu);
            }
        }
    }
}
