#include "batch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <stdexcept>

#include "lsap.h"
#include "pool.h"

namespace fmf {
namespace {

// Handing work to a pool thread (waking it, waiting for it to return) costs 15-20 us on the
// 2-core development machine under load (starting a thread instead: ~35 us), as much as solving
// a few 100x20 problems, so small batches run on fewer threads than allowed. Units:
// estimate_work() below.
constexpr double kWorkPerThread = 2.0e5;

// Rough cost of one problem: reading every entry plus the augmenting paths, which for random
// costs grow like short_side^2 * long_side / 8. About 3e3 units per microsecond on 100x20
// problems (within a factor of 3 for 100x8 .. 200x100); handing work to a thread is worth
// ~5e4 units.
double estimate_work(const MatrixView& m) {
  const double lo = static_cast<double>(std::min(m.rows, m.cols));
  const double hi = static_cast<double>(std::max(m.rows, m.cols));
  return lo * hi + lo * lo * hi / 8.0;
}

int choose_threads(const std::vector<MatrixView>& problems, int max_threads) {
  double work = 0.0;
  for (const MatrixView& m : problems) work += estimate_work(m);
  const double useful = 1.0 + work / kWorkPerThread;
  const double cap = static_cast<double>(std::min<size_t>(problems.size(), max_threads));
  return static_cast<int>(std::max(1.0, std::min(cap, useful)));
}

template <typename T>
T load_entry(const char* p) {
  T x;
  std::memcpy(&x, p, sizeof(T));  // numpy arrays may be unaligned
  return x;
}

// True when no entry of x[0:n] is NaN or +-inf. x * 0 is 0 for a finite x and NaN otherwise;
// eight independent sums of those let the compiler use vector instructions (no -ffast-math).
bool all_finite(const double* x, int64_t n) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int l = 0; l < 8; ++l) lane[l] += x[k + l] * 0.0;
  }
  for (; k < n; ++k) lane[0] += x[k] * 0.0;
  double total = 0.0;
  for (const double s : lane) total += s;
  return total == 0.0;
}

// Copies the strided matrix into `out` as float64 row-major, transposed when asked so that the
// solver always sees rows <= cols, and negated when maximising. Returns false on a non-finite
// entry (the caller reports which one, from the original array).
template <typename T>
bool load_matrix(const MatrixView& m, bool transpose, bool negate, double* out) {
  const double sign = negate ? -1.0 : 1.0;
  // Walk `out` in order, reading the input through swapped strides when transposing: strided
  // reads of a small matrix are cheaper than strided writes.
  const int64_t out_rows = transpose ? m.cols : m.rows;
  const int64_t out_cols = transpose ? m.rows : m.cols;
  const int64_t step_r = transpose ? m.col_stride : m.row_stride;
  const int64_t step_c = transpose ? m.row_stride : m.col_stride;
  for (int64_t r = 0; r < out_rows; ++r) {
    const char* src = m.data + r * step_r;
    double* dst = out + r * out_cols;
    for (int64_t c = 0; c < out_cols; ++c) {
      dst[c] = sign * static_cast<double>(load_entry<T>(src + c * step_c));
    }
  }
  return all_finite(out, m.rows * m.cols);
}

// Scratch of one worker thread: the solver's workspace and the dense float64 copy of a problem.
struct Worker {
  LsapWorkspace ws;
  std::vector<double> cost;
  std::vector<int64_t> col4row;
};

SolveStatus solve_one(const MatrixView& m, const AssignmentOut& out, bool maximize,
                      Worker& w) {
  if (m.rows == 0 || m.cols == 0) return SolveStatus::kOk;
  const bool transpose = m.rows > m.cols;
  const int64_t rows = transpose ? m.cols : m.rows;  // the solver's short side
  const int64_t cols = transpose ? m.rows : m.cols;
  w.cost.resize(static_cast<size_t>(rows * cols));
  w.col4row.resize(static_cast<size_t>(rows));
  const bool finite = m.dtype == DType::kFloat32
                          ? load_matrix<float>(m, transpose, maximize, w.cost.data())
                          : load_matrix<double>(m, transpose, maximize, w.cost.data());
  if (!finite) return SolveStatus::kNonFinite;

  solve_rectangular(w.cost.data(), rows, cols, w.col4row.data(), w.ws);
  if (!transpose) {
    for (int64_t i = 0; i < rows; ++i) {
      out.row_ind[i] = i;
      out.col_ind[i] = w.col4row[i];
    }
    return SolveStatus::kOk;
  }
  // The solver's columns are the input's rows: walk them in order to emit rows ascending.
  int64_t k = 0;
  for (int64_t r = 0; r < cols; ++r) {
    const int64_t c = w.ws.row4col[r];
    if (c >= 0) {
      out.row_ind[k] = r;
      out.col_ind[k] = c;
      ++k;
    }
  }
  return SolveStatus::kOk;
}

// inject_failure()'s target; a negative index is disarmed.
std::atomic<int64_t> g_fail_index{-1};
std::atomic<InjectedFailure> g_fail_kind{InjectedFailure::kNone};

struct UnknownFailure {};  // thrown by the hook as something that is not a std::exception

void maybe_fail(size_t k) {
  if (static_cast<int64_t>(k) != g_fail_index.load(std::memory_order_relaxed)) return;
  switch (g_fail_kind.load(std::memory_order_relaxed)) {
    case InjectedFailure::kStdException: throw std::logic_error("injected failure");
    case InjectedFailure::kUnknown: throw UnknownFailure{};
    case InjectedFailure::kBadAlloc: throw std::bad_alloc();
    case InjectedFailure::kNone: return;
  }
}

// Marks problem k failed with the message `what`, which copying may find no memory for.
void record_failure(ProblemStatus& s, const char* what) noexcept {
  try {
    s.error = what;
    s.status = SolveStatus::kFailed;
  } catch (const std::bad_alloc&) {
    s.status = SolveStatus::kOutOfMemory;
  }
}

}  // namespace

void inject_failure(int64_t index, InjectedFailure kind) {
  g_fail_kind.store(kind);
  g_fail_index.store(kind == InjectedFailure::kNone ? -1 : index);
}

std::vector<ProblemStatus> solve_batch(const std::vector<MatrixView>& problems,
                                       const std::vector<AssignmentOut>& outs, bool maximize,
                                       int max_threads) {
  std::vector<ProblemStatus> status(problems.size());
  std::atomic<size_t> next{0};
  // Problems are handed out one at a time, so a large one does not stall a whole thread's share,
  // and a helper that joins late takes only what is left. Nothing escapes a thread: the pool's
  // threads have no one to throw to, and the caller must wait for its helpers.
  auto work = [&]() {
    Worker w;
    for (size_t k = next.fetch_add(1); k < problems.size(); k = next.fetch_add(1)) {
      try {
        maybe_fail(k);
        status[k].status = solve_one(problems[k], outs[k], maximize, w);
      } catch (const std::bad_alloc&) {
        status[k].status = SolveStatus::kOutOfMemory;
      } catch (const std::exception& e) {
        record_failure(status[k], e.what());
      } catch (...) {
        record_failure(status[k], "unknown exception");
      }
    }
  };
  // std::ref: the std::function then holds a pointer to `work`, no copy on the heap.
  run_on_pool(choose_threads(problems, std::max(1, max_threads)) - 1, std::ref(work));
  return status;
}

}  // namespace fmf
