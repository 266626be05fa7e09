// Fused CPU selective scan (forward and backward) with route-aware indexing.
//
// Plain C ABI, no torch or Python headers: backbones/kernel/ builds this file once per instruction-set
// level (MLS_WIDTH = float lanes per vector: 16 for x86-64-v4, 8 for x86-64-v3, 4 for baseline x86-64 and
// aarch64) and calls it through ctypes. The maths is backbones/ssm.py's selective_scan, per channel d and
// state n:
//
//     dt_t = softplus(delta_t + bias)            (or delta_t + bias)
//     h_t  = exp((dt_t + g_t dt_{t-1}) A[n]) h_{t-1} + dt_t B_t[n] u_t
//     y_t  = (sum_n C_t[n] h_t[n] + D u_t) * silu(z_t)
//
// g_t is 0 unless `gaps` is given: token pruning's aligned scan (backbones/ssm.py, aligned_inputs), where g_t
// pruned positions between step t-1 and step t of a route still decay the state with the step size of the
// kept token before them (dt_{t-1}, the previous step in the route's own order; 0 before the first step).
// Without gaps the scan is compiled without the extra term (a template flag), so it costs nothing there.
//
// Layout. Every per-token tensor is described by a base pointer and four element strides (batch, route,
// channel or state, position), so channels-last and channel-major data are both read in place. A problem
// has `routes` routes of `channels` channels each; route k's parameters are rows k*channels.. of A, D and
// delta_bias. Route k, step t reads source position table[k][t] (-1: padding, which reads u = delta = z =
// B = C = 0, exactly what scanning a zero-padded map does), or t when there is no table. The output is
// either per route at step t, or "merged": summed over routes (times merge_weight) at the source
// position, which is how every scan pattern's merge works.
//
// Work split. One vector holds `W` channels of one (batch, route); a task is a tile of W channels (in
// backward a group of tiles, sized for enough tasks per thread) of one batch element and one route, or of
// all routes when several routes write the same output elements (merged output, or a route-shared u in
// backward), so no two tasks ever write the same element. Tokens
// are processed in blocks of W steps: each input block is loaded into registers (a plain vector load per
// step when channels are contiguous, an in-register W x W transpose when positions are contiguous), the
// recurrence runs with the state in registers, and the output block is written back the same way.
//
// Backward recomputes. The forward pass (when asked) stores the state at the start of every chunk of
// `chunk` steps; backward walks chunks from the last, recomputes that chunk's states and decays from its
// checkpoint, then runs the adjoint recurrence lambda_t = C_t g_t + a_{t+1} lambda_{t+1} backwards. No
// step divides by a decay, so any |A dt| is safe. Sums over channels (dB, dC) are reduced across the
// vector lanes with a shuffle tree and across channel tiles through per-task partial rows; sums over
// tokens (dA, dD, d bias) are accumulated in fp32 per chunk and in double across chunks and tasks. All
// reductions have a fixed order, so results do not depend on the thread count or the schedule. With gaps,
// step t's decay also depends on dt_{t-1}: the adjoint sweep hands g_t * dL/d(decay step)_t back to step
// t-1, which it visits next (across chunk boundaries too), and each chunk's recomputation starts from
// dt at the step before the chunk, recomputed from delta.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#ifndef MLS_WIDTH
#error "compile with -DMLS_WIDTH=<float lanes per vector>"
#endif

extern "C" {

typedef struct {
    float* data;
    int64_t batch, route, inner, pos;  // element strides; `inner` is the channel (or state) axis
} mls_tensor;

typedef struct {
    int64_t batch, routes, channels, d_state;
    int64_t length;     // steps per route
    int64_t positions;  // size of the position axis of the inputs (and of a merged output)
    const int32_t* table;  // routes x length source positions (-1: padding), or NULL for t -> t
    const float* gaps;     // NULL, or g of step t of route k of batch b at gaps[b * gaps_batch + k * gaps_route + t]
    int64_t gaps_batch, gaps_route;
    mls_tensor u, delta, z, B, C, y;  // z.data may be NULL
    const float* A;           // (routes * channels, d_state)
    const float* D;           // (routes * channels) or NULL
    const float* delta_bias;  // (routes * channels) or NULL
    int32_t softplus;
    int32_t merged;  // y[b, pos, c] = merge_weight * sum over routes and steps reading pos
    float merge_weight;
    float* states;   // NULL, or (batch, routes, ceil(length / chunk), d_state, channels): chunk-start states
    int64_t chunk;   // a multiple of the vector width
    int32_t threads;
} mls_problem;

typedef struct {
    mls_tensor gy;                      // gradient of y, y's layout
    mls_tensor du, ddelta, dz, dB, dC;  // the inputs' layouts; dB and dC must be zero on entry
    float* dA;                          // (routes * channels, d_state), written
    float* dD;                          // (routes * channels) or NULL, written
    float* dbias;                       // (routes * channels) or NULL, written
    int32_t accumulate;  // du/ddelta/dz: several steps may read one element (shared u, repeated positions)
} mls_grads;

}  // extern "C"

namespace {

constexpr int W = MLS_WIDTH;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef float vf_unaligned __attribute__((vector_size(4 * W), aligned(4), __may_alias__));

#if MLS_WIDTH == 16
constexpr vi kLo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
constexpr vi kHi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
constexpr vi kEven = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
constexpr vi kOdd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
#elif MLS_WIDTH == 8
constexpr vi kLo = {0, 8, 1, 9, 2, 10, 3, 11};
constexpr vi kHi = {4, 12, 5, 13, 6, 14, 7, 15};
constexpr vi kEven = {0, 2, 4, 6, 8, 10, 12, 14};
constexpr vi kOdd = {1, 3, 5, 7, 9, 11, 13, 15};
#elif MLS_WIDTH == 4
constexpr vi kLo = {0, 4, 1, 5};
constexpr vi kHi = {2, 6, 3, 7};
constexpr vi kEven = {0, 2, 4, 6};
constexpr vi kOdd = {1, 3, 5, 7};
#else
#error "MLS_WIDTH must be 4, 8 or 16"
#endif

constexpr float kLog2e = 1.44269504088896341f;

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }

// 2^f for f in [-0.5, 0.5], degree-6 polynomial (relative error < 1e-7).
inline vf exp2_fraction(vf f) {
    vf p = splat(1.5345809515565634e-4f);
    p = p * f + 1.3399930903688073e-3f;
    p = p * f + 9.618489071726799e-3f;
    p = p * f + 5.550328642129898e-2f;
    p = p * f + 2.4022646248340607e-1f;
    p = p * f + 6.931471824645996e-1f;
    return p * f + 1.0f;
}

// 2^x: 2^round(x) times the polynomial of the rest.
#if MLS_WIDTH == 16 && defined(__AVX512F__)
// vscalefps saturates to 0 / inf by itself (subnormals are flushed, see FlushDenormals). The all-lanes masked
// forms of the intrinsics are used because the plain ones trip GCC 12's -Wmaybe-uninitialized.
inline vf vexp2(vf x) {
    const __m512 rounded = _mm512_mask_roundscale_ps((__m512)x, 0xffff, (__m512)x,
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 p = (__m512)exp2_fraction(x - (vf)rounded);
    return (vf)_mm512_mask_scalef_ps(p, 0xffff, p, rounded);
}
#else
inline vf vexp2(vf x) {  // the argument is clamped to [-125, 127], so the result is a normal float
    x = vmin(vmax(x, splat(-125.0f)), splat(127.0f));
    const vf rounded = (x + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
    const vi scale = (__builtin_convertvector(rounded, vi) + 127) << 23;
    return exp2_fraction(x - rounded) * (vf)scale;
}
#endif

inline vf vexp(vf x) { return vexp2(x * kLog2e); }

// 1 / x from the hardware's reciprocal estimate refined by Newton steps (error ~1 ulp); a division costs
// several times more and each step of the scan needs one or two.
inline vf vrcp(vf x) {
#if MLS_WIDTH == 16 && defined(__AVX512F__)
    vf r = (vf)_mm512_mask_rcp14_ps((__m512)x, 0xffff, (__m512)x);  // 14 bits (masked form: see vexp2)
#elif MLS_WIDTH == 8 && defined(__AVX__)
    vf r = (vf)_mm256_rcp_ps((__m256)x);    // 12 bits
#elif MLS_WIDTH == 4 && defined(__SSE__)
    vf r = (vf)_mm_rcp_ps((__m128)x);       // 12 bits
#elif MLS_WIDTH == 4 && defined(__ARM_NEON)
    vf r = (vf)vrecpeq_f32((float32x4_t)x);  // 8 bits
    r = r * (2.0f - x * r);
#else
    return 1.0f / x;
#endif
    return r * (2.0f - x * r);
}

inline vf vabs(vf x) {
    return (vf)((vi)x & 0x7fffffff);
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(e) = 2 atanh(e / (2 + e)) as an odd series in
// s = e / (2 + e) <= 1/3 (truncation below 2e-8 relative). For x > 20 this returns x exactly, like torch.
// Optionally also sigmoid(x), the derivative, from the same exp.
inline vf vsoftplus(vf x, vf* sigmoid = nullptr) {
    const vf e = vexp(-vabs(x));
    const vf s = e * vrcp(2.0f + e);
    const vf s2 = s * s;
    vf p = splat(2.0f / 13.0f);
    p = p * s2 + 2.0f / 11.0f;
    p = p * s2 + 2.0f / 9.0f;
    p = p * s2 + 2.0f / 7.0f;
    p = p * s2 + 2.0f / 5.0f;
    p = p * s2 + 2.0f / 3.0f;
    const vf log1p_e = 2.0f * s + s * s2 * p;
    if (sigmoid) {
        const vf r = vrcp(1.0f + e);
        *sigmoid = x >= 0.0f ? r : e * r;
    }
    return vmax(x, splat(0.0f)) + log1p_e;
}

inline vf vsigmoid(vf x) { return vrcp(1.0f + vexp(-x)); }

// In-place transpose of a W x W block held as W vectors (log2(W) rounds of interleaving row p with row
// p + W/2).
inline void transpose(vf* rows) {
    for (int round = 1; round < W; round *= 2) {
        vf next[W];
        for (int p = 0; p < W / 2; ++p) {
            next[2 * p] = __builtin_shuffle(rows[p], rows[p + W / 2], kLo);
            next[2 * p + 1] = __builtin_shuffle(rows[p], rows[p + W / 2], kHi);
        }
        for (int p = 0; p < W; ++p) rows[p] = next[p];
    }
}

// Lane j of the result is the sum of the lanes of v[j] (pairwise tree; v is overwritten).
inline vf sum_lanes(vf* v) {
    for (int n = W; n > 1; n /= 2)
        for (int m = 0; m < n / 2; ++m)
            v[m] = __builtin_shuffle(v[2 * m], v[2 * m + 1], kEven) + __builtin_shuffle(v[2 * m], v[2 * m + 1], kOdd);
    return v[0];
}

// ----------------------------------------------------------------------------- blocks of W steps

struct Block {
    int T;                  // steps in the block (W except at the end of a route)
    int64_t pos[W];         // source position of each step, -1 for padding
    int direction;          // +1 / -1: the positions are one contiguous run (no padding), else 0
    int64_t low;            // smallest position of the run
};

inline void make_block(const int32_t* route_table, int64_t t0, int T, Block& block) {
    block.T = T;
    for (int i = 0; i < T; ++i) block.pos[i] = route_table ? route_table[t0 + i] : t0 + i;
    block.direction = 0;
    if (T != W) return;
    bool up = block.pos[0] >= 0, down = block.pos[W - 1] >= 0;
    for (int i = 1; i < W; ++i) {
        up = up && block.pos[i] == block.pos[0] + i;
        down = down && block.pos[i] == block.pos[0] - i;
    }
    if (up) block.direction = 1, block.low = block.pos[0];
    else if (down) block.direction = -1, block.low = block.pos[W - 1];
}

// A (batch, route, channel tile) view of a tensor: base points at channel c0, `lanes` channels are valid.
struct View {
    float* base;
    int64_t channel, pos;
    int lanes;
};

inline View view(const mls_tensor& t, int64_t b, int64_t k, int64_t c0, int lanes) {
    if (!t.data) return View{nullptr, t.inner, t.pos, lanes};
    return View{t.data + b * t.batch + k * t.route + c0 * t.inner, t.inner, t.pos, lanes};
}

void load_block(const View& v, const Block& block, vf* out) {
    if (v.channel == 1 && v.lanes == W) {
        for (int i = 0; i < block.T; ++i)
            out[i] = block.pos[i] < 0 ? splat(0.0f) : load(v.base + block.pos[i] * v.pos);
        return;
    }
    if (v.pos == 1 && v.lanes == W && block.direction) {
        vf rows[W];
        for (int j = 0; j < W; ++j) rows[j] = load(v.base + j * v.channel + block.low);
        transpose(rows);
        for (int i = 0; i < W; ++i) out[i] = rows[block.direction > 0 ? i : W - 1 - i];
        return;
    }
    for (int i = 0; i < block.T; ++i) {
        vf x = splat(0.0f);
        if (block.pos[i] >= 0) {
            const float* src = v.base + block.pos[i] * v.pos;
            for (int j = 0; j < v.lanes; ++j) x[j] = src[j * v.channel];
        }
        out[i] = x;
    }
}

void store_block(const View& v, const Block& block, const vf* in, bool add) {
    if (v.channel == 1 && v.lanes == W) {
        for (int i = 0; i < block.T; ++i) {
            if (block.pos[i] < 0) continue;
            float* dst = v.base + block.pos[i] * v.pos;
            store(dst, add ? load(dst) + in[i] : in[i]);
        }
        return;
    }
    if (v.pos == 1 && v.lanes == W && block.direction) {
        vf rows[W];
        for (int i = 0; i < W; ++i) rows[i] = in[block.direction > 0 ? i : W - 1 - i];
        transpose(rows);
        for (int j = 0; j < W; ++j) {
            float* dst = v.base + j * v.channel + block.low;
            store(dst, add ? load(dst) + rows[j] : rows[j]);
        }
        return;
    }
    for (int i = 0; i < block.T; ++i) {
        if (block.pos[i] < 0) continue;
        float* dst = v.base + block.pos[i] * v.pos;
        for (int j = 0; j < v.lanes; ++j) {
            float& d = dst[j * v.channel];
            d = add ? d + in[i][j] : in[i][j];
        }
    }
}

// Ask for the cache lines of steps t0..t0+T-1 ahead of use: with one stream per channel row (channel-major
// data), a route that jumps across the map or a backward walk, the hardware prefetchers cannot follow.
// `near`: into L1 (the next blocks), else into L2 (the next chunk, a whole chunk's work ahead).
template <bool write, bool near>
void prefetch_steps(const View& v, const int32_t* route_table, int64_t t0, int64_t T) {
    constexpr int locality = near ? 3 : 2;
    if (!v.base) return;
    if (v.channel == 1) {
        for (int64_t t = t0; t < t0 + T; ++t) {
            const int64_t pos = route_table ? route_table[t] : t;
            if (pos >= 0) __builtin_prefetch(v.base + pos * v.pos, write, locality);
        }
    } else if (v.pos == 1) {
        for (int64_t t = t0; t < t0 + T; t += 16) {
            const int64_t pos = route_table ? route_table[t] : t;
            if (pos < 0) continue;
            for (int j = 0; j < v.lanes; ++j) __builtin_prefetch(v.base + j * v.channel + pos, write, locality);
        }
    }
}

void zero_positions(const View& v, int64_t positions) {
    for (int64_t p = 0; p < positions; ++p) {
        float* dst = v.base + p * v.pos;
        if (v.channel == 1 && v.lanes == W) store(dst, splat(0.0f));
        else for (int j = 0; j < v.lanes; ++j) dst[j * v.channel] = 0.0f;
    }
}

// Per-lane parameters of a channel tile: row (k * channels + c0 + j) of a (rows, width) array; 0 beyond.
inline vf lane_param(const float* p, int64_t row0, int lanes, int64_t width, int64_t col, float scale = 1.0f) {
    vf x = splat(0.0f);
    if (p)
        for (int j = 0; j < lanes; ++j) x[j] = p[(row0 + j) * width + col] * scale;
    return x;
}

// Grow-only per-thread scratch (aligned for vf).
vf* scratch(std::vector<vf>& buffer, size_t count) {
    if (buffer.size() < count) buffer.resize(count);
    return buffer.data();
}

struct FlushDenormals {  // subnormal floats are slow (x86) and meaningless here: flush them; restore on exit
#if defined(__SSE2__)
    unsigned int saved;
    FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
    ~FlushDenormals() { _mm_setcsr(saved); }
#elif defined(__aarch64__)
    uint64_t saved;
    FlushDenormals() {
        __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved));
        __asm__ __volatile__("msr fpcr, %0" : : "r"(saved | (uint64_t(1) << 24)));  // FZ
    }
    ~FlushDenormals() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved)); }
#else
    FlushDenormals() {}
#endif
};

char g_error[256] = "";

// ----------------------------------------------------------------------------- the scan

struct Setup {
    const mls_problem& p;
    int64_t tiles, nchunks;
    std::vector<float> bc;  // (batch, routes, length, 2 * d_state): B_t then C_t of every step, 0 at padding

    explicit Setup(const mls_problem& problem)
        : p(problem), tiles((problem.channels + W - 1) / W),
          nchunks((problem.length + problem.chunk - 1) / problem.chunk),
          bc(size_t(problem.batch * problem.routes * problem.length * 2 * problem.d_state)) {}

    const int32_t* route_table(int64_t k) const { return p.table ? p.table + k * p.length : nullptr; }

    const float* gap_row(int64_t b, int64_t k) const { return p.gaps + b * p.gaps_batch + k * p.gaps_route; }

    void stage_bc() {
        const int64_t N = p.d_state, L = p.length, rows = p.batch * p.routes;
#pragma omp parallel for num_threads(p.threads) schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t b = r / p.routes, k = r % p.routes;
            const int32_t* table = route_table(k);
            float* out = bc.data() + r * L * 2 * N;
            const float* Bp = p.B.data + b * p.B.batch + k * p.B.route;
            const float* Cp = p.C.data + b * p.C.batch + k * p.C.route;
            for (int64_t t = 0; t < L; ++t) {
                const int64_t pos = table ? table[t] : t;
                for (int64_t n = 0; n < N; ++n) {
                    out[t * 2 * N + n] = pos < 0 ? 0.0f : Bp[n * p.B.inner + pos * p.B.pos];
                    out[t * 2 * N + N + n] = pos < 0 ? 0.0f : Cp[n * p.C.inner + pos * p.C.pos];
                }
            }
        }
    }

    const float* bc_row(int64_t b, int64_t k) const {
        return bc.data() + (b * p.routes + k) * p.length * 2 * p.d_state;
    }

    float* state_at(int64_t b, int64_t k, int64_t chunk, int64_t c0) const {
        return p.states + ((b * p.routes + k) * nchunks + chunk) * p.d_state * p.channels + c0;
    }
};

// Step sizes of a block: softplus(delta + bias) (and its derivative) or delta + bias.
inline void step_sizes(const mls_problem& p, const vf* raw, vf bias, int T, vf* dt, vf* sigmoid) {
    for (int i = 0; i < T; ++i) {
        const vf x = raw[i] + bias;
        if (p.softplus) dt[i] = vsoftplus(x, sigmoid ? &sigmoid[i] : nullptr);
        else {
            dt[i] = x;
            if (sigmoid) sigmoid[i] = splat(1.0f);
        }
    }
}

// out[0..n) += the lane sums of v[0..n), W at a time (v is overwritten; it must hold n rounded up to a
// multiple of W vectors, the extra ones zero).
inline void add_lane_sums(vf* v, int64_t n, float* out) {
    for (int64_t g = 0; g < n; g += W) {
        const vf sums = sum_lanes(v + g);
        if (g + W <= n) store(out + g, load(out + g) + sums);
        else for (int64_t j = 0; j < n - g; ++j) out[g + j] += sums[j];
    }
}

// NS = d_state known at compile time, or 0 for any; kGaps: the problem has gaps (the aligned scan)
template <int NS, bool kGaps>
struct Scan {
    // dB/dC products are summed over the lanes right away when the states fill whole vectors, else
    // collected per chunk and summed W at a time
    static constexpr bool kDirect = NS > 0 && NS % W == 0;

    static int states(const mls_problem& p) { return NS ? NS : int(p.d_state); }

    // Forward over one route of one channel tile; y gets this route's output (added when `add_y`).
    static void forward_route(const Setup& s, int64_t b, int64_t k, int64_t c0, int lanes, bool add_y,
                              vf* work) {
        const mls_problem& p = s.p;
        const int N = states(p);
        const int64_t row0 = k * p.channels + c0;
        vf* A2 = work;      // A * log2(e), per state
        vf* h = work + N;   // state
        for (int n = 0; n < N; ++n) A2[n] = lane_param(p.A, row0, lanes, N, n, kLog2e), h[n] = splat(0.0f);
        vf hr[NS ? NS : 1];
        if (NS) for (int n = 0; n < N; ++n) hr[n] = h[n];
        const vf Dv = lane_param(p.D, row0, lanes, 1, 0), bias = lane_param(p.delta_bias, row0, lanes, 1, 0);
        const View u = view(p.u, b, k, c0, lanes), delta = view(p.delta, b, k, c0, lanes);
        const View z = view(p.z, b, k, c0, lanes), y = view(p.y, b, p.merged ? 0 : k, c0, lanes);
        const int32_t* table = s.route_table(k);
        const float* bc = s.bc_row(b, k);
        const float* gap = kGaps ? s.gap_row(b, k) : nullptr;
        vf dt_before = splat(0.0f);  // dt of the step before (gaps only)
        Block block, out_block;
        vf ub[W], dt[W], gate[W], yb[W];
        for (int64_t t0 = 0; t0 < p.length; t0 += W) {
            const int T = int(std::min<int64_t>(W, p.length - t0));
            if (p.states && t0 % p.chunk == 0) {
                float* dst = s.state_at(b, k, t0 / p.chunk, c0);
                for (int n = 0; n < N; ++n) {
                    const vf hn = NS ? hr[n] : h[n];
                    if (lanes == W) store(dst + n * p.channels, hn);
                    else for (int j = 0; j < lanes; ++j) dst[n * p.channels + j] = hn[j];
                }
            }
            const int64_t ahead = t0 + 2 * W, ahead_T = std::min<int64_t>(W, p.length - ahead);
            if (ahead_T > 0) {
                prefetch_steps<false, true>(u, table, ahead, ahead_T);
                prefetch_steps<false, true>(delta, table, ahead, ahead_T);
                if (p.z.data) prefetch_steps<false, true>(z, table, ahead, ahead_T);
                prefetch_steps<true, true>(y, p.merged ? table : nullptr, ahead, ahead_T);
            }
            make_block(table, t0, T, block);
            load_block(u, block, ub);
            load_block(delta, block, yb);
            step_sizes(p, yb, bias, T, dt, nullptr);
            if (p.z.data) {
                load_block(z, block, gate);
                for (int i = 0; i < T; ++i) gate[i] = gate[i] * vsigmoid(gate[i]);
            }
            for (int i = 0; i < T; ++i) {
                const float* Bt = bc + (t0 + i) * 2 * N;
                const float* Ct = Bt + N;
                const vf dtv = dt[i], dtu = dtv * ub[i];
                vf decay_dt = dtv;
                if (kGaps) {
                    decay_dt = dtv + gap[t0 + i] * dt_before;
                    dt_before = dtv;
                }
                vf acc = Dv * ub[i];
                if (NS) {
#pragma GCC unroll 16
                    for (int n = 0; n < NS; ++n) {
                        hr[n] = vexp2(decay_dt * A2[n]) * hr[n] + dtu * Bt[n];
                        acc += hr[n] * Ct[n];
                    }
                } else {
                    for (int n = 0; n < N; ++n) {
                        h[n] = vexp2(decay_dt * A2[n]) * h[n] + dtu * Bt[n];
                        acc += h[n] * Ct[n];
                    }
                }
                if (p.z.data) acc *= gate[i];
                yb[i] = p.merged ? acc * p.merge_weight : acc;
            }
            if (p.merged) {
                store_block(y, block, yb, add_y);
            } else {
                make_block(nullptr, t0, T, out_block);
                store_block(y, out_block, yb, add_y);
            }
        }
    }

    // Backward over one route of one channel tile. pB/pC: this task's (length, d_state) partial rows of
    // dB/dC for route k (added to); acc: (d_state + 2) x W doubles of per-lane dA, dD, d bias (added to).
    static void backward_route(const Setup& s, const mls_grads& g, int64_t b, int64_t k, int64_t c0, int lanes,
                               float* pB, float* pC, double* acc, std::vector<vf>& buffer) {
        const mls_problem& p = s.p;
        const int N = states(p);
        const int64_t Q = p.chunk, L = p.length, row0 = k * p.channels + c0;
        // scratch: A2, A, carry, dA, h (N each); per chunk: ub, dtb, sgb, gb, gyb, zb, dzb, dub, ddb, deb (Q
        // each); hist_h, hist_a, prodB, prodC (Q * N + W each)
        vf* w = scratch(buffer, size_t(5 * N + 10 * Q + 4 * (Q * N + W)));
        vf *A2 = w, *A = w + N, *carry = w + 2 * N, *dA = w + 3 * N, *h = w + 4 * N;
        vf *ub = w + 5 * N, *dtb = ub + Q, *sgb = dtb + Q, *gb = sgb + Q, *gyb = gb + Q, *zb = gyb + Q;
        vf *dzb = zb + Q, *dub = dzb + Q, *ddb = dub + Q;
        vf* deb = kGaps ? ddb + Q : dtb;  // the step size each step decays with (dt + g dt_before, or dt)
        vf *hist_h = ddb + 2 * Q, *hist_a = hist_h + Q * N + W, *prodB = hist_a + Q * N + W;
        vf *prodC = prodB + Q * N + W;
        for (int n = 0; n < N; ++n) {
            A[n] = lane_param(p.A, row0, lanes, N, n);
            A2[n] = A[n] * kLog2e;
            carry[n] = splat(0.0f);
        }
        const vf Dv = lane_param(p.D, row0, lanes, 1, 0), bias = lane_param(p.delta_bias, row0, lanes, 1, 0);
        const bool has_z = p.z.data != nullptr;
        const View u = view(p.u, b, k, c0, lanes), delta = view(p.delta, b, k, c0, lanes);
        const View z = view(p.z, b, k, c0, lanes);
        const View gy = view(g.gy, b, p.merged ? 0 : k, c0, lanes);
        const View du = view(g.du, b, k, c0, lanes), ddelta = view(g.ddelta, b, k, c0, lanes);
        const View dz = view(g.dz, b, k, c0, lanes);
        const int32_t* table = s.route_table(k);
        const float* bc = s.bc_row(b, k);
        const float gy_scale = p.merged ? p.merge_weight : 1.0f;
        const float* gap = kGaps ? s.gap_row(b, k) : nullptr;
        vf handed_back = splat(0.0f);  // g_{t+1} * dL/d(decay step)_{t+1}, owed to dt_t (gaps only)
        Block block, out_block;
        vf raw[W];

        for (int64_t chunk = s.nchunks - 1; chunk >= 0; --chunk) {
            const int64_t t0 = chunk * Q;
            const int T = int(std::min<int64_t>(Q, L - t0));
            // inputs of the chunk; meanwhile the same steps of the chunk before (next in line) go to L2
            for (int i0 = 0; i0 < T; i0 += W) {
                const int Tb = std::min(W, T - i0);
                if (chunk > 0) {
                    const int64_t prev = t0 - Q + i0;
                    prefetch_steps<false, false>(u, table, prev, W);
                    prefetch_steps<false, false>(delta, table, prev, W);
                    prefetch_steps<false, false>(gy, p.merged ? table : nullptr, prev, W);
                    if (has_z) prefetch_steps<false, false>(z, table, prev, W);
                    prefetch_steps<true, false>(du, table, prev, W);
                    prefetch_steps<true, false>(ddelta, table, prev, W);
                }
                make_block(table, t0 + i0, Tb, block);
                load_block(u, block, ub + i0);
                load_block(delta, block, raw);
                step_sizes(p, raw, bias, Tb, dtb + i0, sgb + i0);
                if (p.merged) {
                    load_block(gy, block, gyb + i0);
                } else {
                    make_block(nullptr, t0 + i0, Tb, out_block);
                    load_block(gy, out_block, gyb + i0);
                }
                for (int i = i0; i < i0 + Tb; ++i) gyb[i] *= gy_scale;
                if (has_z) load_block(z, block, zb + i0);
            }
            if (kGaps) {  // the decay steps, from dt at the step before the chunk (0 before the route's first)
                vf dt_before = splat(0.0f);
                if (t0 > 0) {
                    make_block(table, t0 - 1, 1, block);
                    load_block(delta, block, raw);
                    step_sizes(p, raw, bias, 1, &dt_before, nullptr);
                }
                for (int i = 0; i < T; ++i) deb[i] = dtb[i] + gap[t0 + i] * (i ? dtb[i - 1] : dt_before);
            }
            // recompute the chunk's states and decays from its checkpoint
            const float* start = s.state_at(b, k, chunk, c0);
            for (int n = 0; n < N; ++n) {
                vf x = splat(0.0f);
                for (int j = 0; j < lanes; ++j) x[j] = start[n * p.channels + j];
                h[n] = x;
            }
            vf hr[NS ? NS : 1];
            if (NS) for (int n = 0; n < N; ++n) hr[n] = h[n];
            for (int i = 0; i < T; ++i) {
                const float* Bt = bc + (t0 + i) * 2 * N;
                const float* Ct = Bt + N;
                const vf dtv = dtb[i], dtu = dtv * ub[i], decay_dt = deb[i];
                vf* hh = hist_h + i * N;
                vf* ha = hist_a + i * N;
                if (NS) {  // the state stays in registers; the history is only written
#pragma GCC unroll 16
                    for (int n = 0; n < NS; ++n) {
                        ha[n] = vexp2(decay_dt * A2[n]);
                        hh[n] = hr[n] = ha[n] * hr[n] + dtu * Bt[n];
                    }
                } else {
                    for (int n = 0; n < N; ++n) {
                        ha[n] = vexp2(decay_dt * A2[n]);
                        hh[n] = ha[n] * (i ? hh[n - N] : h[n]) + dtu * Bt[n];
                    }
                }
                vf gv = gyb[i];
                if (has_z) {  // the gate's gradient needs the ungated output
                    vf yp = Dv * ub[i];
                    for (int n = 0; n < N; ++n) yp += hh[n] * Ct[n];
                    const vf zv = zb[i], sig = vsigmoid(zv);
                    dzb[i] = gv * yp * sig * (1.0f + zv * (1.0f - sig));
                    gv *= zv * sig;
                }
                gb[i] = gv;
                if (kDirect) {
                    vf pc[NS ? NS : 1];
                    for (int n = 0; n < N; ++n) pc[n] = gv * hh[n];
                    add_lane_sums(pc, N, pC + (t0 + i) * N);
                } else {
                    vf* pc = prodC + i * N;
                    for (int n = 0; n < N; ++n) pc[n] = gv * hh[n];
                }
            }
            // adjoint sweep backwards through the chunk
            vf dA_chunk[NS ? NS : 1];
            for (int n = 0; n < N; ++n) (NS ? dA_chunk[n] : dA[n]) = splat(0.0f);
            vf dD_chunk = splat(0.0f), dbias_chunk = splat(0.0f);
            for (int i = T - 1; i >= 0; --i) {
                const float* Bt = bc + (t0 + i) * 2 * N;
                const float* Ct = Bt + N;
                const vf gv = gb[i], dtv = dtb[i], uv = ub[i], dtu = dtv * uv, decay_dt = deb[i];
                const vf* hp = i ? hist_h + (i - 1) * N : h;
                const vf* ha = hist_a + i * N;
                vf direct[kDirect ? NS : 1];
                vf* pb = kDirect ? direct : prodB + i * N;
                vf sum_lb = splat(0.0f), ddt = splat(0.0f);
                if (NS) {
#pragma GCC unroll 16
                    for (int n = 0; n < NS; ++n) {
                        const vf lam = gv * Ct[n] + carry[n];
                        const vf q = lam * hp[n] * ha[n];  // dL/d(decay) * decay
                        dA_chunk[n] += q * decay_dt;
                        ddt += q * A[n];
                        sum_lb += lam * Bt[n];
                        pb[n] = lam * dtu;
                        carry[n] = lam * ha[n];
                    }
                } else {
                    for (int n = 0; n < N; ++n) {
                        const vf lam = gv * Ct[n] + carry[n];
                        const vf q = lam * hp[n] * ha[n];
                        dA[n] += q * decay_dt;
                        ddt += q * A[n];
                        sum_lb += lam * Bt[n];
                        pb[n] = lam * dtu;
                        carry[n] = lam * ha[n];
                    }
                }
                if (kDirect) add_lane_sums(pb, N, pB + (t0 + i) * N);
                dub[i] = gv * Dv + dtv * sum_lb;
                if (kGaps) {  // ddt so far is dL/d(decay step): g_t of it belongs to dt_{t-1}
                    const vf owed = handed_back;
                    handed_back = gap[t0 + i] * ddt;
                    ddt += owed;
                }
                ddt += uv * sum_lb;
                dD_chunk += gv * uv;
                const vf dd = p.softplus ? ddt * sgb[i] : ddt;
                dbias_chunk += dd;
                ddb[i] = dd;
            }
            // outputs of the chunk
            for (int i0 = 0; i0 < T; i0 += W) {
                const int Tb = std::min(W, T - i0);
                make_block(table, t0 + i0, Tb, block);
                store_block(du, block, dub + i0, g.accumulate);
                store_block(ddelta, block, ddb + i0, g.accumulate);
                if (has_z) store_block(dz, block, dzb + i0, g.accumulate);
            }
            if (!kDirect) {  // dB, dC: sum the chunk's (step, state) products over the lanes
                const int64_t count = int64_t(T) * N;
                for (int n = 0; n < W; ++n) prodB[count + n] = prodC[count + n] = splat(0.0f);
                add_lane_sums(prodB, count, pB + t0 * N);
                add_lane_sums(prodC, count, pC + t0 * N);
            }
            for (int n = 0; n < N; ++n) {
                const vf v = NS ? dA_chunk[n] : dA[n];
                for (int j = 0; j < W; ++j) acc[n * W + j] += v[j];
            }
            for (int j = 0; j < W; ++j) acc[N * W + j] += dD_chunk[j], acc[(N + 1) * W + j] += dbias_chunk[j];
        }
    }
};

// fn(task, per-thread scratch) for every task, on `threads` OpenMP threads with subnormals flushed; the
// dynamic schedule balances tasks of uneven cost. False (with the message set) when memory ran out.
template <typename Fn>
bool run_tasks(int threads, int64_t tasks, const char* what, Fn&& fn) {
    std::atomic<bool> failed(false);
#pragma omp parallel num_threads(threads)
    {
        FlushDenormals flush;
        std::vector<vf> buffer;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            try {
                fn(task, buffer);
            } catch (const std::bad_alloc&) {
                failed = true;
            }
        }
    }
    if (failed) std::snprintf(g_error, sizeof g_error, "out of memory in the selective-scan %s", what);
    return !failed;
}

template <int NS, bool kGaps>
int forward_impl(const mls_problem& p) {
    Setup s(p);
    s.stage_bc();
    const bool grouped = p.merged && p.routes > 1;
    const int64_t units = grouped ? 1 : p.routes, tasks = p.batch * units * s.tiles;
    const bool ok = run_tasks(p.threads, tasks, "forward", [&](int64_t task, std::vector<vf>& buffer) {
        const int64_t tile = task % s.tiles, unit = task / s.tiles % units, b = task / s.tiles / units;
        const int64_t c0 = tile * W;
        const int lanes = int(std::min<int64_t>(W, p.channels - c0));
        vf* work = scratch(buffer, size_t(2 * p.d_state));
        if (p.merged) zero_positions(view(p.y, b, 0, c0, lanes), p.positions);
        for (int64_t k = grouped ? 0 : unit; k < (grouped ? p.routes : unit + 1); ++k)
            Scan<NS, kGaps>::forward_route(s, b, k, c0, lanes, p.merged, work);
    });
    return ok ? 0 : 1;
}

template <int NS, bool kGaps>
int backward_impl(const mls_problem& p, const mls_grads& g) {
    Setup s(p);
    s.stage_bc();
    const int64_t N = p.d_state, L = p.length, K = p.routes;
    const bool shared = K > 1 && (g.du.route == 0 || g.ddelta.route == 0 || (p.z.data && g.dz.route == 0));
    const int64_t units = shared ? 1 : K;
    // channel tiles per task: enough tasks for the threads (and load balance), few enough partial rows
    const int64_t per_group = std::max<int64_t>(1, p.batch * units * s.tiles / (8 * int64_t(p.threads)));
    const int64_t groups = (s.tiles + per_group - 1) / per_group, tasks = p.batch * units * groups;
    std::vector<float> partial(size_t(p.batch * K * groups * L * N * 2));   // dB and dC rows per (b, k, group)
    std::vector<double> lanes_acc(size_t(p.batch * K * s.tiles * (N + 2) * W));  // dA, dD, dbias per tile
    const bool ok = run_tasks(p.threads, tasks, "backward", [&](int64_t task, std::vector<vf>& buffer) {
        const int64_t group = task % groups, unit = task / groups % units, b = task / groups / units;
        const int64_t k_begin = shared ? 0 : unit, k_end = shared ? K : unit + 1;
        const int64_t tile_end = std::min(s.tiles, (group + 1) * per_group);
        auto lanes_of = [&](int64_t tile) { return int(std::min<int64_t>(W, p.channels - tile * W)); };
        if (g.accumulate) {  // this task's regions of du/ddelta/dz, zeroed once (routes then add)
            for (int64_t tile = group * per_group; tile < tile_end; ++tile) {
                for (int64_t k = k_begin; k < k_end; ++k) {
                    const int64_t c0 = tile * W;
                    if (k == k_begin || g.du.route) zero_positions(view(g.du, b, k, c0, lanes_of(tile)), p.positions);
                    if (k == k_begin || g.ddelta.route)
                        zero_positions(view(g.ddelta, b, k, c0, lanes_of(tile)), p.positions);
                    if (p.z.data && (k == k_begin || g.dz.route))
                        zero_positions(view(g.dz, b, k, c0, lanes_of(tile)), p.positions);
                }
            }
        }
        for (int64_t k = k_begin; k < k_end; ++k) {
            float* pB = partial.data() + ((b * K + k) * groups + group) * L * N * 2;
            std::fill(pB, pB + L * N * 2, 0.0f);
            for (int64_t tile = group * per_group; tile < tile_end; ++tile) {
                double* acc = lanes_acc.data() + ((b * K + k) * s.tiles + tile) * (N + 2) * W;
                Scan<NS, kGaps>::backward_route(s, g, b, k, tile * W, lanes_of(tile), pB, pB + L * N, acc, buffer);
            }
        }
    });
    if (!ok) return 1;
    // dB, dC: sum the groups' partial rows and add them at each step's source position
#pragma omp parallel for num_threads(p.threads) schedule(static)
    for (int64_t r = 0; r < p.batch * K; ++r) {
        const int64_t b = r / K, k = r % K;
        const int32_t* table = s.route_table(k);
        float* dB = g.dB.data + b * g.dB.batch + k * g.dB.route;
        float* dC = g.dC.data + b * g.dC.batch + k * g.dC.route;
        const float* rows = partial.data() + r * groups * L * N * 2;
        for (int64_t t = 0; t < L; ++t) {
            const int64_t pos = table ? table[t] : t;
            if (pos < 0) continue;
            for (int64_t n = 0; n < N; ++n) {
                float sb = 0.0f, sc = 0.0f;
                for (int64_t gi = 0; gi < groups; ++gi) {
                    sb += rows[gi * L * N * 2 + t * N + n];
                    sc += rows[gi * L * N * 2 + L * N + t * N + n];
                }
                dB[n * g.dB.inner + pos * g.dB.pos] += sb;
                dC[n * g.dC.inner + pos * g.dC.pos] += sc;
            }
        }
    }
    // dA, dD, d bias: sum over the batch
    for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < p.channels; ++c) {
            const int64_t tile = c / W, j = c % W, row = k * p.channels + c;
            for (int64_t n = 0; n < N + 2; ++n) {
                double total = 0.0;
                for (int64_t b = 0; b < p.batch; ++b)
                    total += lanes_acc[((b * K + k) * s.tiles + tile) * (N + 2) * W + n * W + j];
                if (n < N) g.dA[row * N + n] = float(total);
                else if (n == N && g.dD) g.dD[row] = float(total);
                else if (n == N + 1 && g.dbias) g.dbias[row] = float(total);
            }
        }
    }
    return 0;
}

template <template <int> class Impl, typename... Args>
int dispatch(int64_t d_state, Args&&... args) {
    switch (d_state) {
        case 1: return Impl<1>::run(args...);
        case 2: return Impl<2>::run(args...);
        case 4: return Impl<4>::run(args...);
        case 8: return Impl<8>::run(args...);
        case 16: return Impl<16>::run(args...);
        default: return Impl<0>::run(args...);
    }
}

template <int NS>
struct Forward {
    static int run(const mls_problem& p) { return p.gaps ? forward_impl<NS, true>(p) : forward_impl<NS, false>(p); }
};

template <int NS>
struct Backward {
    static int run(const mls_problem& p, const mls_grads& g) {
        return p.gaps ? backward_impl<NS, true>(p, g) : backward_impl<NS, false>(p, g);
    }
};

const char* check(const mls_problem* p) {
    if (!p) return "no problem given";
    if (p->batch < 1 || p->routes < 1 || p->channels < 1 || p->d_state < 1 || p->length < 1)
        return "batch, routes, channels, d_state and length must all be >= 1";
    if (p->chunk < W || p->chunk % W) return "chunk must be a positive multiple of the vector width";
    if (p->threads < 1) return "threads must be >= 1";
    if (!p->table && p->length > p->positions) return "without a table, length must not exceed positions";
    return nullptr;
}

}  // namespace

extern "C" {

int mls_width(void) { return W; }

const char* mls_last_error(void) { return g_error; }

int mls_forward(const mls_problem* p) {
    if (const char* error = check(p)) {
        std::snprintf(g_error, sizeof g_error, "%s", error);
        return 2;
    }
    try {
        return dispatch<Forward>(p->d_state, *p);
    } catch (const std::bad_alloc&) {
        std::snprintf(g_error, sizeof g_error, "out of memory in the selective-scan forward");
        return 1;
    }
}

int mls_backward(const mls_problem* p, const mls_grads* g) {
    if (const char* error = check(p)) {
        std::snprintf(g_error, sizeof g_error, "%s", error);
        return 2;
    }
    if (!p->states || !g) {
        std::snprintf(g_error, sizeof g_error, "backward needs the forward's chunk states and gradient buffers");
        return 2;
    }
    try {
        return dispatch<Backward>(p->d_state, *p, *g);
    } catch (const std::bad_alloc&) {
        std::snprintf(g_error, sizeof g_error, "out of memory in the selective-scan backward");
        return 1;
    }
}

// Highest x86-64 level this CPU runs (4, 3 or 1; 0 elsewhere). Call it from the baseline build only.
int mls_cpu_level(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 4;
    if (__builtin_cpu_supports("x86-64-v3")) return 3;
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"
