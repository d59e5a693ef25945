// Solving many assignment problems on a pool of threads, without the Python interpreter.
#pragma once

#include <cstdint>
#include <vector>

namespace fmf {

enum class DType : uint8_t { kFloat32, kFloat64 };

// A strided rows x cols matrix in memory owned by the caller (a numpy array or a block of one).
// Strides are in bytes and may be zero or negative, as numpy allows.
struct MatrixView {
  const char* data;
  DType dtype;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t col_stride;
};

// Where the solution of one problem goes: min(rows, cols) entries each, rows ascending.
struct AssignmentOut {
  int64_t* row_ind;
  int64_t* col_ind;
};

enum class SolveStatus : uint8_t { kOk, kNonFinite, kOutOfMemory };

// Solves problem k into outs[k] for every k, minimising (or maximising) the total cost, on at
// most `max_threads` threads (the calling thread included). Each problem is solved by exactly
// one thread with the same arithmetic, so the results do not depend on the thread count.
// Returns one status per problem; the outputs of a problem that is not kOk are unspecified.
std::vector<SolveStatus> solve_batch(const std::vector<MatrixView>& problems,
                                     const std::vector<AssignmentOut>& outs, bool maximize,
                                     int max_threads);

}  // namespace fmf
