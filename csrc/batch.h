// Solving many assignment problems on a pool of threads, without the Python interpreter.
#pragma once

#include <cstdint>
#include <string>
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

// kFailed: solving threw something other than std::bad_alloc (see ProblemStatus::error).
enum class SolveStatus : uint8_t { kOk, kNonFinite, kOutOfMemory, kFailed };

struct ProblemStatus {
  SolveStatus status = SolveStatus::kOk;
  std::string error;  // kFailed: the exception's what(), or "unknown exception"
};

// Solves problem k into outs[k] for every k, minimising (or maximising) the total cost, on at
// most `max_threads` threads: the calling thread and helpers from the process's pool (pool.h).
// Each problem is solved by exactly one thread with the same arithmetic, so the results do not
// depend on the thread count. Never throws from a worker: whatever solving one problem throws
// is caught and recorded in its status; the other problems are still solved. Returns one status
// per problem; the outputs of a problem that is not kOk are unspecified.
std::vector<ProblemStatus> solve_batch(const std::vector<MatrixView>& problems,
                                       const std::vector<AssignmentOut>& outs, bool maximize,
                                       int max_threads);

// Test hook (fastmaskformer._C._inject_failure, tests/test_assignment.py): until disarmed,
// solving problem `index` of any batch throws instead, so that tests can follow a worker's
// exception to Python. Not for use while other threads solve.
enum class InjectedFailure : uint8_t { kNone, kStdException, kUnknown, kBadAlloc };
void inject_failure(int64_t index, InjectedFailure kind);

}  // namespace fmf
