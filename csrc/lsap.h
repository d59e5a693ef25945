// Exact rectangular linear sum assignment (shortest augmenting paths, Jonker-Volgenant family).
#pragma once

#include <cstdint>
#include <vector>

namespace fmf {

// Scratch memory of one thread. Reused across the problems of a batch so that solving a
// problem allocates nothing once the workspace has grown to the largest size seen.
struct LsapWorkspace {
  std::vector<double> u;          // [rows] row duals
  std::vector<double> v;          // [cols] column duals (rectangular: <= 0, 0 if free)
  std::vector<double> shortest;   // [cols] Dijkstra distance of each column in one search
  std::vector<int64_t> path;      // [cols] row from which each column was last reached
  std::vector<int64_t> row4col;   // [cols] row assigned to each column, -1 if free
  std::vector<int64_t> unscanned; // [cols] columns not yet settled in the current search
  std::vector<int64_t> free_rows; // rows the initial row reduction could not assign
  std::vector<int64_t> scanned_rows;
  std::vector<int64_t> scanned_cols;
};

// Minimum-cost assignment of every row of a rows x cols cost matrix with rows <= cols.
//   cost:    [rows, cols] row-major, every entry finite (the caller checks this)
//   col4row: [rows] output, column assigned to each row
// After the call, ws.row4col[0:cols] holds the inverse map (-1 for unassigned columns).
void solve_rectangular(const double* cost, int64_t rows, int64_t cols, int64_t* col4row,
                       LsapWorkspace& ws);

}  // namespace fmf
