// Fused CPU DCNv4 deformable aggregation (forward and backward), for HRVMamba's DCNv4 layers.
//
// Plain C ABI, no torch or Python headers; built by backbones/kernel/ into the same library as the selective
// scan, once per instruction-set level (MLS_WIDTH = float lanes per vector). The maths are those of
// backbones/dcnv4.py's dcnv4_sample. value is (batch, height, width, group * group_channels), channels last;
// offset_mask is (batch, out_h, out_w, om_channels), where group g owns [g * 3P, (g + 1) * 3P): P (x, y)
// offset pairs, then P mask values, points x-major (i over kernel columns outer, j over rows inner, the
// centre dropped with remove_center). Kernel point p = (i, j) of output pixel (yo, xo) samples at
//
//     x = xo * stride + origin + (i * dilation + dx_p) * offset_scale
//     y = yo * stride + origin + (j * dilation + dy_p) * offset_scale,   origin = half - pad - half * offset_scale
//
// (half = dilation * (kernel_size - 1) / 2, integer division) in pixel-centre coordinates (grid_sample with
// align_corners=False), bilinearly from the 4 neighbours with zeros outside the map, and
// out = sum_p mask_p * sample_p, per group over the group's channels.
//
// Work split. Forward: a task is one output row of one batch element (all groups), so results do not depend
// on the thread count. Backward: a task is one batch element and one group, which owns that group's slice of
// the value gradient exclusively, so the scatter into it has no races and a fixed order; the same pass
// writes the offset and mask gradients of the group's 3P slice of each output pixel. The channels of a group
// are walked one vector of W lanes at a time (a partial vector for the last ones).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>

#ifndef MLS_WIDTH
#error "compile with -DMLS_WIDTH=<float lanes per vector>"
#endif

extern "C" {

typedef struct {
    const float* value;        // (batch, height, width, channels) contiguous
    const float* offset_mask;  // (batch, out_h, out_w, om_channels) contiguous
    int64_t batch, height, width, channels, group;
    int64_t out_h, out_w, om_channels;
    int64_t kernel_size, stride, pad, dilation;
    float offset_scale;
    int32_t remove_center;
    int32_t threads;
} mdc_problem;

}  // extern "C"

namespace {

constexpr int W = MLS_WIDTH;
typedef float vec __attribute__((vector_size(4 * W)));
typedef float vec_unaligned __attribute__((vector_size(4 * W), aligned(4), __may_alias__));

char g_error[256] = "";

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

// Sum of the lanes as a tree (log2(W) dependent adds, a fixed order).
inline float lane_sum(vec v) {
    float a[W];
    std::memcpy(a, &v, sizeof a);
    for (int half = W / 2; half >= 1; half /= 2)
        for (int i = 0; i < half; ++i) a[i] += a[i + half];
    return a[0];
}

// One kernel point's bilinear footprint: the 4 neighbours' element offsets into the value map (-1 when
// outside it) and the fractional position inside the cell, with x0 = floor(x), y0 = floor(y), so that on a
// pixel border the slope is the one-sided one grid_sample (and autograd of dcnv4_sample) uses.
struct Footprint {
    int64_t at[4];  // (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)
    float fx, fy;
    bool any;
};

struct Geometry {
    int64_t points;
    int kx[64], ky[64];  // each point's grid position, in pixels (i * dilation, j * dilation)
    float origin;
};

Geometry geometry(const mdc_problem& p) {
    Geometry g{};
    const int64_t k = p.kernel_size, centre = k / 2;
    for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) {
            if (p.remove_center && i == centre && j == centre) continue;
            g.kx[g.points] = int(i * p.dilation);
            g.ky[g.points] = int(j * p.dilation);
            ++g.points;
        }
    const int64_t half = p.dilation * (k - 1) / 2;
    g.origin = float(half - p.pad) - float(half) * p.offset_scale;
    return g;
}

inline Footprint footprint(const mdc_problem& p, const Geometry& geo, int64_t point, int64_t yo, int64_t xo,
                           float dx, float dy) {
    const float x = float(xo * p.stride) + geo.origin + (float(geo.kx[point]) + dx) * p.offset_scale;
    const float y = float(yo * p.stride) + geo.origin + (float(geo.ky[point]) + dy) * p.offset_scale;
    Footprint f{};
    // x = -1 still has a corner inside (x0 + 1 = 0, weight 0): its slope is not zero, as grid_sample has it.
    f.any = x >= -1.0f && x < float(p.width) && y >= -1.0f && y < float(p.height);
    if (!f.any) return f;
    const float x0f = std::floor(x), y0f = std::floor(y);
    const int64_t x0 = int64_t(x0f), y0 = int64_t(y0f);
    f.fx = x - x0f;
    f.fy = y - y0f;
    for (int c = 0; c < 4; ++c) {
        const int64_t yy = y0 + c / 2, xx = x0 + c % 2;
        f.at[c] = yy >= 0 && yy < p.height && xx >= 0 && xx < p.width ? (yy * p.width + xx) * p.channels : -1;
    }
    return f;
}

// Per output pixel and group, the scalar work first (each point's footprint; up to 4P taps of value offset and
// mask * bilinear weight), then the vector work (the taps' weighted sum, per vector of the group's channels).
void forward_row(const mdc_problem& p, const Geometry& geo, int64_t n, int64_t yo, float* out) {
    const int64_t gc = p.channels / p.group, P = geo.points;
    const float* value = p.value + n * p.height * p.width * p.channels;
    int64_t tap_at[4 * 64];
    float tap_weight[4 * 64];
    for (int64_t xo = 0; xo < p.out_w; ++xo) {
        const float* om = p.offset_mask + ((n * p.out_h + yo) * p.out_w + xo) * p.om_channels;
        float* o = out + ((n * p.out_h + yo) * p.out_w + xo) * p.channels;
        for (int64_t g = 0; g < p.group; ++g) {
            const float* og = om + g * 3 * P;
            int taps = 0;
            for (int64_t q = 0; q < P; ++q) {
                const Footprint f = footprint(p, geo, q, yo, xo, og[2 * q], og[2 * q + 1]);
                if (!f.any) continue;
                const float m = og[2 * P + q];
                const float w[4] = {(1 - f.fy) * (1 - f.fx), (1 - f.fy) * f.fx, f.fy * (1 - f.fx), f.fy * f.fx};
                for (int c = 0; c < 4; ++c)
                    if (f.at[c] >= 0) {
                        tap_at[taps] = f.at[c] + g * gc;
                        tap_weight[taps++] = m * w[c];
                    }
            }
            for (int64_t c0 = 0; c0 < gc; c0 += W) {
                const int lanes = int(std::min<int64_t>(W, gc - c0));
                vec sum{};
                for (int t = 0; t < taps; ++t) sum += tap_weight[t] * load_lanes(value + tap_at[t] + c0, lanes);
                store_lanes(o + g * gc + c0, sum, lanes);
            }
        }
    }
}

// Batch element n, group g: dvalue's slice of the group (exclusively this task's), and the group's 3P slice
// of d offset_mask at every output pixel.
void backward_group(const mdc_problem& p, const Geometry& geo, int64_t n, int64_t g, const float* gout,
                    float* dvalue, float* doffset_mask) {
    const int64_t gc = p.channels / p.group, P = geo.points;
    const float* value = p.value + n * p.height * p.width * p.channels + g * gc;
    float* dv = dvalue + n * p.height * p.width * p.channels + g * gc;
    for (int64_t yo = 0; yo < p.out_h; ++yo)
        for (int64_t xo = 0; xo < p.out_w; ++xo) {
            const int64_t pixel = (n * p.out_h + yo) * p.out_w + xo;
            const float* og = p.offset_mask + pixel * p.om_channels + g * 3 * P;
            float* dog = doffset_mask + pixel * p.om_channels + g * 3 * P;
            const float* go = gout + pixel * p.channels + g * gc;
            for (int64_t q = 0; q < P; ++q) {
                const Footprint f = footprint(p, geo, q, yo, xo, og[2 * q], og[2 * q + 1]);
                float dmask = 0.0f, dx = 0.0f, dy = 0.0f;
                if (f.any) {
                    const float m = og[2 * P + q];
                    const float w[4] = {(1 - f.fy) * (1 - f.fx), (1 - f.fy) * f.fx, f.fy * (1 - f.fx), f.fy * f.fx};
                    vec sample{}, slope_x{}, slope_y{};
                    for (int64_t c0 = 0; c0 < gc; c0 += W) {
                        const int lanes = int(std::min<int64_t>(W, gc - c0));
                        const vec gv = load_lanes(go + c0, lanes);
                        vec v[4];
                        for (int c = 0; c < 4; ++c) {
                            if (f.at[c] < 0) {
                                v[c] = vec{};
                                continue;
                            }
                            v[c] = load_lanes(value + f.at[c] + c0, lanes);
                            float* d = dv + f.at[c] + c0;
                            store_lanes(d, load_lanes(d, lanes) + (m * w[c]) * gv, lanes);
                        }
                        sample += gv * (w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3]);
                        slope_x += gv * ((1 - f.fy) * (v[1] - v[0]) + f.fy * (v[3] - v[2]));
                        slope_y += gv * ((1 - f.fx) * (v[2] - v[0]) + f.fx * (v[3] - v[1]));
                    }
                    dmask = lane_sum(sample);
                    dx = m * p.offset_scale * lane_sum(slope_x);
                    dy = m * p.offset_scale * lane_sum(slope_y);
                }
                dog[2 * q] = dx;
                dog[2 * q + 1] = dy;
                dog[2 * P + q] = dmask;
            }
        }
}

const char* check(const mdc_problem* p) {
    if (!p || !p->value || !p->offset_mask) return "no problem, value or offset_mask given";
    if (p->batch < 1 || p->height < 1 || p->width < 1 || p->out_h < 1 || p->out_w < 1)
        return "batch and the map sizes must all be >= 1";
    if (p->group < 1 || p->channels < 1 || p->channels % p->group) return "channels must be a multiple of group";
    if (p->kernel_size < 1 || p->kernel_size > 8) return "kernel_size must be 1..8";
    if (p->stride < 1 || p->dilation < 1 || p->pad < 0) return "stride and dilation must be >= 1, pad >= 0";
    const int64_t points = p->kernel_size * p->kernel_size - (p->remove_center ? 1 : 0);
    if (points < 1 || p->om_channels < p->group * 3 * points) return "offset_mask has too few channels";
    if (p->threads < 1) return "threads must be >= 1";
    return nullptr;
}

template <typename Fn>
int guarded(const mdc_problem* p, Fn&& fn) {
    if (const char* error = check(p)) {
        std::snprintf(g_error, sizeof g_error, "%s", error);
        return 2;
    }
    fn(geometry(*p));
    return 0;
}

}  // namespace

extern "C" {

const char* mdc_last_error(void) { return g_error; }

// out: (batch, out_h, out_w, channels) contiguous, written.
int mdc_forward(const mdc_problem* p, float* out) {
    return guarded(p, [&](const Geometry& geo) {
#pragma omp parallel for num_threads(p->threads) schedule(static)
        for (int64_t task = 0; task < p->batch * p->out_h; ++task)
            forward_row(*p, geo, task / p->out_h, task % p->out_h, out);
    });
}

// gout: out's gradient, out's layout. dvalue: value's layout; doffset_mask: offset_mask's layout (columns past
// group * 3P are zero). Both written.
int mdc_backward(const mdc_problem* p, const float* gout, float* dvalue, float* doffset_mask) {
    return guarded(p, [&](const Geometry& geo) {
        std::memset(dvalue, 0, sizeof(float) * size_t(p->batch * p->height * p->width * p->channels));
        std::memset(doffset_mask, 0, sizeof(float) * size_t(p->batch * p->out_h * p->out_w * p->om_channels));
#pragma omp parallel for num_threads(p->threads) schedule(static)
        for (int64_t task = 0; task < p->batch * p->group; ++task)
            backward_group(*p, geo, task / p->group, task % p->group, gout, dvalue, doffset_mask);
    });
}

}  // extern "C"
