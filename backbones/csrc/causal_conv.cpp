// Fused CPU bidirectional causal depthwise conv1d + SiLU (forward and backward), for Vim's mixer.
//
// Plain C ABI, no torch or Python headers; built by backbones/kernel/ into the same library as the selective
// scan, once per instruction-set level (MLS_WIDTH = float lanes per vector). The maths, per channel c of a
// token sequence x (batch, length, channels), with a kernel of `width` taps per direction k:
//
//     a0_t = bias0 + sum_j w0[j] x_{t - (width - 1) + j}     causal conv (Mamba's Conv1d, padding width - 1)
//     a1_t = bias1 + sum_j w1[j] x_{t + (width - 1) - j}     the causal conv of the reversed sequence, read
//                                                           back in token order (an anti-causal conv)
//     y_k,t = silu(a_k,t) = a_k,t * sigmoid(a_k,t)
//
// with x = 0 outside [0, length). Output y is (batch, length, 2, channels): for each token both directions'
// channels, channels innermost, which is the layout the selective scan's route-aware path reads in place.
//
// Work split. A task is one batch element and one block of kBlock tokens (a fixed split, so results do not
// depend on the thread count). Inside it the tokens are walked one by one and, for each, the channels one
// vector of W lanes at a time (a partial vector for the last channels), so every token's row of x, y, dy and
// dx is read or written in one sequential sweep. Backward recomputes the pre-activations a instead of saving
// them: a task computes g_k,t = dy_k,t * silu'(a_k,t) over its block plus the width - 1 tokens either side
// that its dx needs, keeping the last 2 width - 1 rows of g in a ring, and
// dx_t = sum_j w0[j] g0_{t + (width - 1) - j} + w1[j] g1_{t - (width - 1) + j}. The weight and bias gradients
// are summed in fp32 over a task's tokens into per-task partial rows, then over tasks in double in task
// order (a fixed order).

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <vector>

#ifndef MLS_WIDTH
#error "compile with -DMLS_WIDTH=<float lanes per vector>"
#endif

extern "C" {

typedef struct {
    const float* x;            // (batch, length, channels); channel stride 1
    int64_t x_batch, x_token;  // element strides of x
    const float* weight;       // (2, width, channels) contiguous: direction, tap, channel
    const float* bias;         // (2, channels) or NULL
    int64_t batch, length, channels, width;
    int32_t threads;
} mcc_problem;

}  // extern "C"

namespace {

constexpr int W = MLS_WIDTH;
constexpr int kMaxWidth = 8;
constexpr int64_t kBlock = 64;  // tokens per task
typedef float vec __attribute__((vector_size(4 * W)));
typedef int32_t ivec __attribute__((vector_size(4 * W)));
typedef float vec_unaligned __attribute__((vector_size(4 * W), aligned(4), __may_alias__));

char g_error[256] = "";

inline vec broadcast(float value) { return vec{} + value; }

// `lanes` channels from p (the rest of the vector zero); a whole vector with a plain load.
inline vec load_lanes(const float* p, int lanes) {
    if (lanes == W) return *reinterpret_cast<const vec_unaligned*>(p);
    vec v{};
    std::memcpy(&v, p, sizeof(float) * size_t(lanes));
    return v;
}

inline void store_lanes(float* p, vec v, int lanes) {
    if (lanes == W) *reinterpret_cast<vec_unaligned*>(p) = v;
    else std::memcpy(p, &v, sizeof(float) * size_t(lanes));
}

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact product), e^r by its Taylor series to
// r^7 (truncation < 6e-9 relative), times 2^n built in the exponent bits. x is clamped to [-87, 88], so 2^n
// stays a normal float; e^-87 is 2e-38, which is 0 for every use here (sigmoid of -87 or less).
inline vec exp_approx(vec x) {
    x = x < -87.0f ? broadcast(-87.0f) : x;
    x = x > 88.0f ? broadcast(88.0f) : x;
    const vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
    const vec r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    vec p = broadcast(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return p * (vec)bits;  // a same-size vector cast reinterprets the bits
}

inline vec sigmoid(vec a) { return 1.0f / (1.0f + exp_approx(-a)); }

// The 2K - 1 tokens t - (K - 1) .. t + (K - 1) of batch element x, channels c0.. (zero outside the sequence).
template <int K>
inline void window(const mcc_problem& p, const float* x, int64_t t, int64_t c0, int lanes, vec* win) {
    for (int i = 0; i < 2 * K - 1; ++i) {
        const int64_t s = t - (K - 1) + i;
        win[i] = s < 0 || s >= p.length ? vec{} : load_lanes(x + s * p.x_token + c0, lanes);
    }
}

// Tap j of direction k multiplies this window entry: direction 0 reads x_{t - (K - 1) + j}, direction 1
// x_{t + (K - 1) - j}.
template <int K>
constexpr int tap(int k, int j) { return k ? 2 * K - 2 - j : j; }

// Pre-activations of both directions from the window around a token.
template <int K>
inline void pre(const mcc_problem& p, const vec* win, int64_t c0, int lanes, vec* a) {
    for (int k = 0; k < 2; ++k) {
        a[k] = p.bias ? load_lanes(p.bias + k * p.channels + c0, lanes) : vec{};
        for (int j = 0; j < K; ++j)
            a[k] += load_lanes(p.weight + (k * K + j) * p.channels + c0, lanes) * win[tap<K>(k, j)];
    }
}

// Tokens outer, channels inner: every token's row of x and y is read and written in one sweep.
template <int K>
void forward_task(const mcc_problem& p, int64_t b, int64_t t0, int64_t t1, float* y) {
    const float* x = p.x + b * p.x_batch;
    for (int64_t t = t0; t < t1; ++t) {
        float* out = y + (b * p.length + t) * 2 * p.channels;
        for (int64_t c0 = 0; c0 < p.channels; c0 += W) {
            const int lanes = int(std::min<int64_t>(W, p.channels - c0));
            vec win[2 * K - 1], a[2];
            window<K>(p, x, t, c0, lanes, win);
            pre<K>(p, win, c0, lanes, a);
            for (int k = 0; k < 2; ++k) store_lanes(out + k * p.channels + c0, a[k] * sigmoid(a[k]), lanes);
        }
    }
}

// g = dy * silu'(a) of the tokens [lo, hi) = [t0, t1) and the K - 1 either side, in one sweep; the last 2K - 1
// tokens' g rows stay in a ring, from which dx of token s - (K - 1) follows once token s is done. partial:
// this task's rows (2 directions x (K taps + bias) x channels) of the weight/bias gradient sums.
template <int K>
void backward_task(const mcc_problem& p, int64_t b, int64_t t0, int64_t t1, const float* gy, float* dx,
                   float* partial) {
    constexpr int64_t kRing = 2 * kMaxWidth;  // >= 2K - 1 rows
    const int64_t lo = std::max<int64_t>(0, t0 - (K - 1)), hi = std::min(p.length, t1 + (K - 1));
    const int64_t C = p.channels;
    const float* x = p.x + b * p.x_batch;
    std::vector<float> ring(size_t(kRing * 2 * C));
    std::fill(partial, partial + 2 * (K + 1) * C, 0.0f);
    auto g_row = [&](int64_t s) { return ring.data() + s % kRing * 2 * C; };
    for (int64_t s = lo; s < t1 + K - 1; ++s) {
        if (s < hi) {
            const float* dy = gy + (b * p.length + s) * 2 * C;
            float* g = g_row(s);
            for (int64_t c0 = 0; c0 < C; c0 += W) {
                const int lanes = int(std::min<int64_t>(W, C - c0));
                vec win[2 * K - 1], a[2];
                window<K>(p, x, s, c0, lanes, win);
                pre<K>(p, win, c0, lanes, a);
                for (int k = 0; k < 2; ++k) {
                    const vec sig = sigmoid(a[k]);
                    const vec gk = load_lanes(dy + k * C + c0, lanes) * sig * (1.0f + a[k] * (1.0f - sig));
                    store_lanes(g + k * C + c0, gk, lanes);
                    if (s < t0 || s >= t1) continue;
                    float* rows = partial + k * (K + 1) * C + c0;
                    for (int j = 0; j < K; ++j)
                        store_lanes(rows + j * C, load_lanes(rows + j * C, lanes) + gk * win[tap<K>(k, j)], lanes);
                    store_lanes(rows + K * C, load_lanes(rows + K * C, lanes) + gk, lanes);
                }
            }
        }
        const int64_t t = s - (K - 1);
        if (t < t0) continue;
        auto g_at = [&](int64_t u, int k, int64_t c0, int lanes) {
            return u < lo || u >= hi ? vec{} : load_lanes(g_row(u) + k * C + c0, lanes);
        };
        for (int64_t c0 = 0; c0 < C; c0 += W) {
            const int lanes = int(std::min<int64_t>(W, C - c0));
            vec sum{};
            for (int j = 0; j < K; ++j) {
                sum += load_lanes(p.weight + j * C + c0, lanes) * g_at(t + (K - 1) - j, 0, c0, lanes);
                sum += load_lanes(p.weight + (K + j) * C + c0, lanes) * g_at(t - (K - 1) + j, 1, c0, lanes);
            }
            store_lanes(dx + (b * p.length + t) * C + c0, sum, lanes);
        }
    }
}

template <int K>
struct Forward {
    static void run(const mcc_problem& p, float* y) {
        const int64_t blocks = (p.length + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(p.threads) schedule(static)
        for (int64_t task = 0; task < p.batch * blocks; ++task) {
            const int64_t b = task / blocks, t0 = task % blocks * kBlock;
            forward_task<K>(p, b, t0, std::min(p.length, t0 + kBlock), y);
        }
    }
};

template <int K>
struct Backward {
    static void run(const mcc_problem& p, const float* gy, float* dx, float* dweight, float* dbias) {
        const int64_t blocks = (p.length + kBlock - 1) / kBlock, tasks = p.batch * blocks;
        const int64_t row = 2 * (K + 1) * p.channels;  // one task's partial sums
        std::vector<float> partial(size_t(tasks * row));
#pragma omp parallel for num_threads(p.threads) schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t b = task / blocks, t0 = task % blocks * kBlock;
            backward_task<K>(p, b, t0, std::min(p.length, t0 + kBlock), gy, dx, partial.data() + task * row);
        }
#pragma omp parallel for num_threads(p.threads) schedule(static)
        for (int64_t i = 0; i < row; ++i) {
            double total = 0.0;
            for (int64_t task = 0; task < tasks; ++task) total += partial[size_t(task * row + i)];
            const int64_t k = i / ((K + 1) * p.channels), j = i / p.channels % (K + 1), c = i % p.channels;
            if (j < K) dweight[(k * K + j) * p.channels + c] = float(total);
            else if (dbias) dbias[k * p.channels + c] = float(total);
        }
    }
};

template <template <int> class Impl, typename... Args>
void dispatch(int64_t width, Args&&... args) {
    switch (width) {
        case 1: return Impl<1>::run(args...);
        case 2: return Impl<2>::run(args...);
        case 3: return Impl<3>::run(args...);
        case 4: return Impl<4>::run(args...);
        case 5: return Impl<5>::run(args...);
        case 6: return Impl<6>::run(args...);
        case 7: return Impl<7>::run(args...);
        default: return Impl<8>::run(args...);
    }
}

const char* check(const mcc_problem* p) {
    if (!p || !p->x || !p->weight) return "no problem, input or weight given";
    if (p->batch < 1 || p->length < 1 || p->channels < 1) return "batch, length and channels must all be >= 1";
    if (p->width < 1 || p->width > kMaxWidth) return "the conv width must be 1..8";
    if (p->threads < 1) return "threads must be >= 1";
    return nullptr;
}

template <typename Fn>
int guarded(const mcc_problem* p, const char* what, Fn&& fn) {
    if (const char* error = check(p)) {
        std::snprintf(g_error, sizeof g_error, "%s", error);
        return 2;
    }
    try {
        fn();
    } catch (const std::bad_alloc&) {
        std::snprintf(g_error, sizeof g_error, "out of memory in the causal conv %s", what);
        return 1;
    }
    return 0;
}

}  // namespace

extern "C" {

const char* mcc_last_error(void) { return g_error; }

// y: (batch, length, 2, channels) contiguous, written.
int mcc_forward(const mcc_problem* p, float* y) {
    return guarded(p, "forward", [&] { dispatch<Forward>(p->width, *p, y); });
}

// gy: y's gradient, y's layout; dx: (batch, length, channels) contiguous; dweight: (2, width, channels);
// dbias: (2, channels) or NULL. All written.
int mcc_backward(const mcc_problem* p, const float* gy, float* dx, float* dweight, float* dbias) {
    return guarded(p, "backward", [&] { dispatch<Backward>(p->width, *p, gy, dx, dweight, dbias); });
}

}  // extern "C"
