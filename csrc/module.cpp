// fastmaskformer._C: the batched assignment solver as seen from Python.
// fastmaskformer/ops/assignment.py is the public entry point: it converts torch tensors, checks
// the sizes of a padded batch and describes non-finite costs; this file checks what it must to
// never crash (dtype, dimensions, bounds) and solves with the GIL released. The threads live in
// a persistent pool (pool.h), joined at interpreter exit.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "batch.h"
#include "pool.h"

namespace py = pybind11;

namespace {

[[noreturn]] void fail(size_t index, const std::string& what) {
  throw py::value_error("problem " + std::to_string(index) + ": " + what);
}

// The solver reads float32 or float64 in native byte order; everything else is refused here
// rather than converted, so integer, bool and complex costs are never silently reinterpreted.
// Returns false for an unsupported dtype.
bool dtype_of(const py::array& a, fmf::DType& out) {
  const py::dtype dt = a.dtype();
  // numpy spells native order '=' even when asked for it explicitly: '<' or '>' is foreign.
  if (dt.byteorder() == '<' || dt.byteorder() == '>') return false;
  if (dt.num() == py::detail::npy_api::NPY_DOUBLE_) out = fmf::DType::kFloat64;
  else if (dt.num() == py::detail::npy_api::NPY_FLOAT_) out = fmf::DType::kFloat32;
  else return false;
  return true;
}

std::string unsupported_dtype(const py::array& a) {
  return "unsupported dtype " + std::string(py::str(a.dtype())) +
         "; costs must be float32 or float64 in native byte order";
}

// One output pair per problem, allocated while we hold the GIL; the workers fill them in.
struct Outputs {
  std::vector<py::array_t<int64_t>> rows, cols;
  std::vector<fmf::AssignmentOut> raw;

  void add(int64_t n) {
    rows.emplace_back(n);
    cols.emplace_back(n);
    raw.push_back({rows.back().mutable_data(), cols.back().mutable_data()});
  }
};

// A worker's failure on problem k as a Python error: MemoryError or RuntimeError.
[[noreturn]] void raise_failure(size_t k, const fmf::ProblemStatus& s) {
  const std::string problem = "problem " + std::to_string(k) + ": ";
  if (s.status == fmf::SolveStatus::kOutOfMemory) {
    py::set_error(PyExc_MemoryError, (problem + "out of memory while solving").c_str());
    throw py::error_already_set();
  }
  throw std::runtime_error(problem + "solver failed: " + s.error);
}

// Runs the batch without the GIL and returns (list of (row_ind, col_ind), -1), or
// (None, k) where k is the first problem with a non-finite cost, for Python to describe.
// The first problem that failed otherwise raises MemoryError or RuntimeError naming it.
py::tuple run(const std::vector<fmf::MatrixView>& problems, bool maximize, int num_threads) {
  Outputs outs;
  for (const fmf::MatrixView& m : problems) outs.add(std::min(m.rows, m.cols));
  std::vector<fmf::ProblemStatus> status;
  {
    py::gil_scoped_release release;
    status = fmf::solve_batch(problems, outs.raw, maximize, num_threads);
  }
  for (size_t k = 0; k < status.size(); ++k) {
    if (status[k].status == fmf::SolveStatus::kNonFinite) return py::make_tuple(py::none(), k);
    if (status[k].status != fmf::SolveStatus::kOk) raise_failure(k, status[k]);
  }
  py::list pairs(problems.size());
  for (size_t k = 0; k < problems.size(); ++k) {
    pairs[k] = py::make_tuple(outs.rows[k], outs.cols[k]);
  }
  return py::make_tuple(pairs, -1);
}

// matrices: sequence of 2-D float32/float64 numpy arrays, any strides.
py::tuple solve_list(const py::sequence& matrices, bool maximize, int num_threads) {
  // Own a reference to every array: the caller's list may change while the GIL is released.
  std::vector<py::array> keep;
  std::vector<fmf::MatrixView> problems;
  keep.reserve(matrices.size());
  problems.reserve(matrices.size());
  for (size_t k = 0; k < matrices.size(); ++k) {
    py::object item = matrices[k];
    if (!py::isinstance<py::array>(item)) fail(k, "expected a numpy array");
    py::array a = py::reinterpret_borrow<py::array>(item);
    if (a.ndim() != 2) {
      fail(k, "expected a 2-D cost matrix, got " + std::to_string(a.ndim()) + "-D");
    }
    fmf::DType dtype;
    if (!dtype_of(a, dtype)) fail(k, unsupported_dtype(a));
    problems.push_back({static_cast<const char*>(a.data()), dtype, a.shape(0), a.shape(1),
                        a.strides(0), a.strides(1)});
    keep.push_back(std::move(a));
  }
  return run(problems, maximize, num_threads);
}

// padded: [N, R, C] float32/float64; sizes: [N, 2] int64 (rows, cols) of each top-left block.
py::tuple solve_padded(const py::array& padded, const py::array_t<int64_t>& sizes, bool maximize,
                       int num_threads) {
  if (padded.ndim() != 3) throw py::value_error("padded costs must be 3-D [N, rows, cols]");
  const size_t n = static_cast<size_t>(padded.shape(0));
  if (sizes.ndim() != 2 || static_cast<size_t>(sizes.shape(0)) != n || sizes.shape(1) != 2) {
    throw py::value_error("sizes must have shape [N, 2] for padded costs of shape [N, R, C]");
  }
  fmf::DType dtype;
  if (!dtype_of(padded, dtype)) throw py::value_error("costs: " + unsupported_dtype(padded));
  auto size = sizes.unchecked<2>();
  std::vector<fmf::MatrixView> problems;
  problems.reserve(n);
  const char* base = static_cast<const char*>(padded.data());
  for (size_t k = 0; k < n; ++k) {
    const int64_t rows = size(k, 0), cols = size(k, 1);
    if (rows < 0 || cols < 0 || rows > padded.shape(1) || cols > padded.shape(2)) {
      fail(k, "size (" + std::to_string(rows) + ", " + std::to_string(cols) +
                  ") does not fit the padded shape");
    }
    problems.push_back({base + static_cast<int64_t>(k) * padded.strides(0), dtype, rows, cols,
                        padded.strides(1), padded.strides(2)});
  }
  return run(problems, maximize, num_threads);
}

// The test hook of batch.h, by name: "std_exception", "unknown", "bad_alloc" or "none".
void inject_failure(int64_t index, const std::string& kind) {
  fmf::InjectedFailure k;
  if (kind == "none") k = fmf::InjectedFailure::kNone;
  else if (kind == "std_exception") k = fmf::InjectedFailure::kStdException;
  else if (kind == "unknown") k = fmf::InjectedFailure::kUnknown;
  else if (kind == "bad_alloc") k = fmf::InjectedFailure::kBadAlloc;
  else throw py::value_error("unknown failure kind '" + kind + "'");
  fmf::inject_failure(index, k);
}

py::dict pool_stats() {
  const fmf::PoolStats s = fmf::pool_stats();
  return py::dict(py::arg("threads") = s.threads, py::arg("started") = s.started,
                  py::arg("shut_down") = s.shut_down);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Batched exact linear sum assignment (see fastmaskformer.ops.assignment)";
  m.def("solve_list", &solve_list, py::arg("matrices"), py::arg("maximize"),
        py::arg("num_threads"),
        "Solve a sequence of 2-D float32/float64 numpy cost matrices. Returns (pairs, -1) with "
        "pairs a list of (row_ind, col_ind) int64 arrays, or (None, k) when problem k has a "
        "non-finite cost.");
  m.def("solve_padded", &solve_padded, py::arg("padded"), py::arg("sizes"), py::arg("maximize"),
        py::arg("num_threads"),
        "Solve the top-left sizes[k] block of padded[k] for every k (padded: [N, R, C], sizes: "
        "[N, 2] int64); same return value as solve_list.");
  m.def("_pool_stats", &pool_stats,
        "The solver's thread pool: {'threads': alive now, 'started': started in total by this "
        "process (a fork child counts its own), 'shut_down': joined at exit}.");
  m.def("_inject_failure", &inject_failure, py::arg("index"), py::arg("kind"),
        "Test hook: until called with kind 'none', solving problem `index` of any batch throws "
        "instead ('std_exception', 'unknown' (not a std::exception) or 'bad_alloc').");
  // The pool's threads are joined while the interpreter is still whole; calls made later (from
  // a daemon thread) run on their caller alone.
  m.def("_shutdown_pool", &fmf::shutdown_pool, py::call_guard<py::gil_scoped_release>(),
        "Join the solver's pool threads (registered with atexit); later solves use one thread.");
  py::module_::import("atexit").attr("register")(m.attr("_shutdown_pool"));
}
