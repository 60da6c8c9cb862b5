// The transforms of csrc/winograd_cpu.cpp, included there once for each instruction set (in a namespace of its own,
// under `#pragma GCC target`): GCC's vector extensions below become one AVX-512 register of 16 channels only in code
// compiled for it. Each transform takes the same sums in the same order as the formulas in winograd_cpu.cpp, one
// channel per lane, so every instruction set gives the same numbers.

typedef float Floats __attribute__((vector_size(kBlock * sizeof(float))));

// `width` (<= kBlock) channels from `from`; the lanes beyond them are zero.
inline Floats load(const float* from, int64_t width) {
  Floats v = {};
  if (width == kBlock) {
    std::memcpy(&v, from, sizeof(v));
  } else {
    std::memcpy(&v, from, width * sizeof(float));
  }
  return v;
}

inline void store(float* to, const Floats& v, int64_t width) {
  if (width == kBlock) {
    std::memcpy(to, &v, sizeof(v));
  } else {
    std::memcpy(to, &v, width * sizeof(float));
  }
}

// V[p, tile, c] = (B^T d B)[p] for the 16 positions p of each tile's 4x4 input block (rows 2 ty - 1 ... 2 ty + 2,
// zero outside the image), at v + p * layout.position + tile * layout.tile + c.
void input_tiles(const float* input, float* v, const Geometry& g, const Layout& layout, int64_t channels,
                 int64_t begin, int64_t end) {
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t image = tile / (g.tiles_h * g.tiles_w);
    const int64_t y0 = (tile / g.tiles_w) % g.tiles_h * 2 - 1;
    const int64_t x0 = tile % g.tiles_w * 2 - 1;
    const float* at[4][4];  // the block's pixels, nullptr outside the image
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const int64_t y = y0 + i, x = x0 + j;
        at[i][j] = y >= 0 && y < g.height && x >= 0 && x < g.width
                       ? input + ((image * g.height + y) * g.width + x) * channels
                       : nullptr;
      }
    }
    for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - c0);
      Floats d[4][4];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          d[i][j] = at[i][j] ? load(at[i][j] + c0, width) : Floats{};
        }
      }
      Floats t[4][4];  // B^T d: combinations of rows
      for (int j = 0; j < 4; ++j) {
        t[0][j] = d[0][j] - d[2][j];
        t[1][j] = d[1][j] + d[2][j];
        t[2][j] = d[2][j] - d[1][j];
        t[3][j] = d[1][j] - d[3][j];
      }
      for (int i = 0; i < 4; ++i) {  // (B^T d) B: combinations of columns
        const Floats row[4] = {t[i][0] - t[i][2], t[i][1] + t[i][2], t[i][2] - t[i][1], t[i][1] - t[i][3]};
        for (int j = 0; j < 4; ++j) {
          store(v + (i * 4 + j) * layout.position + tile * layout.tile + c0, row[j], width);
        }
      }
    }
  }
}

// The 2x2 outputs of each tile from its 16 products M[p, tile, k]: A^T M A + bias, then the ReLU (a NaN stays NaN,
// as std::max(x, 0) keeps it). M[p, tile, k] is at m + p * layout.position + tile * layout.tile + k.
void output_tiles(const float* m, const float* bias, float* output, const Geometry& g, const Layout& layout,
                  int64_t channels, bool relu, int64_t begin, int64_t end) {
  const Floats zero = {};
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t image = tile / (g.tiles_h * g.tiles_w);
    const int64_t y0 = (tile / g.tiles_w) % g.tiles_h * 2;
    const int64_t x0 = tile % g.tiles_w * 2;
    for (int64_t k0 = 0; k0 < channels; k0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - k0);
      Floats s[2][4];  // A^T M: combinations of rows
      for (int j = 0; j < 4; ++j) {
        const Floats m0 = load(m + (0 * 4 + j) * layout.position + tile * layout.tile + k0, width);
        const Floats m1 = load(m + (1 * 4 + j) * layout.position + tile * layout.tile + k0, width);
        const Floats m2 = load(m + (2 * 4 + j) * layout.position + tile * layout.tile + k0, width);
        const Floats m3 = load(m + (3 * 4 + j) * layout.position + tile * layout.tile + k0, width);
        s[0][j] = m0 + m1 + m2;
        s[1][j] = m1 - m2 - m3;
      }
      const Floats b = load(bias + k0, width);
      for (int i = 0; i < 2; ++i) {
        const int64_t y = y0 + i;
        if (y >= g.height) {
          continue;
        }
        Floats out[2] = {s[i][0] + s[i][1] + s[i][2] + b, s[i][1] - s[i][2] - s[i][3] + b};  // (A^T M) A
        for (int j = 0; j < 2; ++j) {
          const int64_t x = x0 + j;
          if (x >= g.width) {
            continue;
          }
          if (relu) {
            out[j] = out[j] < zero ? zero : out[j];
          }
          store(output + ((image * g.height + y) * g.width + x) * channels + k0, out[j], width);
        }
      }
    }
  }
}
