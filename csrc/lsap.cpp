// Rectangular shortest-augmenting-path assignment, after Jonker & Volgenant (1987) and its
// rectangular form by Crouse (2016, "On implementing 2D rectangular assignment algorithms").
//
// Linear program for rows <= cols: minimise sum c_ij x_ij subject to every row assigned once and
// every column at most once. Its dual: maximise sum u_i + sum v_j with u_i + v_j <= c_ij and
// v_j <= 0, where complementary slackness needs c_ij = u_i + v_j on assigned pairs and v_j = 0 on
// free columns. Every step below keeps those conditions, so the final assignment is optimal.
// When rows == cols every column is assigned in the end and v_j is unconstrained, which lets
// square problems start from LAPJV's column reduction instead.
//
// Steps: a cheap start (row or column reduction, then augmenting row reduction) assigns most
// rows; each row still free is then assigned by one Dijkstra search for the shortest augmenting
// path over reduced costs, O(rows * cols) per row.
#include "lsap.h"

#include <algorithm>
#include <limits>
#include <utility>

namespace fmf {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Minimum of x[0:n], n >= 1. Four running minima instead of one break the chain of dependent
// compares, which otherwise limits the scan to one entry per compare latency.
double min_of(const double* x, int64_t n) {
  double m0 = x[0], m1 = x[0], m2 = x[0], m3 = x[0];
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    m0 = std::min(m0, x[j]);
    m1 = std::min(m1, x[j + 1]);
    m2 = std::min(m2, x[j + 2]);
    m3 = std::min(m3, x[j + 3]);
  }
  for (; j < n; ++j) m0 = std::min(m0, x[j]);
  return std::min(std::min(m0, m1), std::min(m2, m3));
}

// Row reduction, the cheap start of LAPJV for the rectangular case: u_i = min_j c_ij with v = 0
// is dual feasible, and a row whose cheapest column is still free can take it at once (a tight
// pair). With rows << cols (100 queries vs ~20 segments, transposed) almost every row is settled
// here and only the few collisions need an augmenting path.
void row_reduction(const double* cost, int64_t rows, int64_t cols, int64_t* col4row,
                   LsapWorkspace& ws) {
  for (int64_t i = 0; i < rows; ++i) {
    const double* ci = cost + i * cols;
    const double row_min = min_of(ci, cols);
    const int64_t best = std::find(ci, ci + cols, row_min) - ci;  // first cheapest column
    ws.u[i] = row_min;
    if (ws.row4col[best] < 0) {
      ws.row4col[best] = i;
      col4row[i] = best;
    } else {
      col4row[i] = -1;
      ws.free_rows.push_back(i);
    }
  }
}

// Column reduction with reduction transfer, LAPJV's start for square problems. There every
// column ends up assigned, so v need not stay <= 0: v_j = min_i c_ij with u = 0 is dual
// feasible, and each column takes its cheapest row if that row is still free (columns in
// reverse order, as in LAPJV). Each assigned row i then hands its slack to its column:
// v_j -= min over the row's other columns of c_ik - v_k, which keeps the pair tight, makes u_i
// that slack, and steers the free rows towards other columns.
void column_reduction(const double* cost, int64_t n, int64_t* col4row, LsapWorkspace& ws) {
  double* v = ws.v.data();
  int64_t* row4col = ws.row4col.data();
  int64_t* cheapest_row = ws.path.data();  // scratch until the searches start
  for (int64_t j = 0; j < n; ++j) {
    v[j] = cost[j];
    cheapest_row[j] = 0;
  }
  // Row by row, so the matrix is read in memory order.
  for (int64_t i = 1; i < n; ++i) {
    const double* ci = cost + i * n;
    for (int64_t j = 0; j < n; ++j) {
      cheapest_row[j] = ci[j] < v[j] ? i : cheapest_row[j];
      v[j] = std::min(ci[j], v[j]);
    }
  }
  std::fill(col4row, col4row + n, -1);
  for (int64_t j = n - 1; j >= 0; --j) {
    const int64_t i = cheapest_row[j];
    if (col4row[i] < 0) {
      col4row[i] = j;
      row4col[j] = i;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t own = col4row[i];
    if (own < 0) {
      ws.free_rows.push_back(i);
      continue;
    }
    if (n < 2) continue;  // no other column to hand slack to
    const double* ci = cost + i * n;
    double slack = kInf;
    for (int64_t j = 0; j < n; ++j) slack = std::min(slack, j == own ? kInf : ci[j] - v[j]);
    v[own] -= slack;
  }
}

// The two smallest reduced prices c_ij - v_j of a row, with their columns (cols >= 2).
struct TwoCheapest {
  double first, second;
  int64_t first_col, second_col;
};

TwoCheapest two_cheapest(const double* cost_row, const double* v, int64_t cols) {
  TwoCheapest t{kInf, kInf, 0, 0};
  for (int64_t j = 0; j < cols; ++j) {
    const double price = cost_row[j] - v[j];
    if (price < t.second) {
      if (price < t.first) {
        t.second = t.first;
        t.second_col = t.first_col;
        t.first = price;
        t.first_col = j;
      } else {
        t.second = price;
        t.second_col = j;
      }
    }
  }
  return t;
}

// Augmenting row reduction (LAPJV), two passes over the rows that the reduction left free.
// A free row takes its cheapest column j1 and lowers v_j1 by the gap to its second cheapest,
// so that it stays tight there while the row it displaces now prefers another column; that row
// is retried at once. An auction in all but name: cheap, and on square problems it leaves a
// fraction of the free rows for the O(rows * cols)-per-row augmenting paths. Lowering v_j only
// relaxes other rows' constraints and a column, once taken, is never freed, so v <= 0 and v = 0
// on free columns still hold (rectangular case). Row duals are recomputed afterwards as u_i = c_ij - v_j on each
// assigned pair. The immediate retries are capped (the reduction is only a head start: rows
// left over go to the exact augmenting paths), which bounds its time on adversarial inputs.
void augmenting_row_reduction(const double* cost, int64_t rows, int64_t cols,
                              int64_t* col4row, LsapWorkspace& ws) {
  double* v = ws.v.data();
  int64_t* row4col = ws.row4col.data();
  std::vector<int64_t>& free_rows = ws.free_rows;
  std::vector<int64_t>& still_free = ws.scanned_rows;  // spare buffer until the searches start
  for (int pass = 0; pass < 2 && !free_rows.empty(); ++pass) {
    still_free.clear();
    int64_t retries_left = 2 * rows;
    size_t k = 0;
    while (k < free_rows.size()) {
      const int64_t row = free_rows[k++];
      const TwoCheapest t = two_cheapest(cost + row * cols, v, cols);
      int64_t col = t.first_col;
      const double lowered = v[col] - (t.second - t.first);
      // In floating point a tiny gap may not change v: then take the second column instead,
      // or two rows could keep displacing each other from the first.
      const bool lowers = lowered < v[col];
      if (lowers) {
        v[col] = lowered;
      } else if (row4col[col] >= 0) {
        col = t.second_col;
      }
      const int64_t displaced = row4col[col];
      row4col[col] = row;
      col4row[row] = col;
      if (displaced < 0) continue;
      col4row[displaced] = -1;
      if (lowers && retries_left-- > 0) {
        free_rows[--k] = displaced;
      } else {
        still_free.push_back(displaced);
      }
    }
    std::swap(free_rows, still_free);
  }
  for (int64_t i = 0; i < rows; ++i) {
    if (col4row[i] >= 0) ws.u[i] = cost[i * cols + col4row[i]] - v[col4row[i]];
  }
}

// One Dijkstra step: relaxes every unscanned column through `row`, reached at distance
// `dist`, and returns the position in `unscanned` of the closest column. The relaxation is
// written with selects rather than branches: whether a column gets closer is a coin flip that
// the branch predictor cannot learn.
int64_t relax_row(const double* cost_row, double dist, double u_row, int64_t row,
                  const int64_t* unscanned, int64_t num_unscanned, LsapWorkspace& ws) {
  const double* v = ws.v.data();
  const int64_t* row4col = ws.row4col.data();
  double* shortest = ws.shortest.data();
  int64_t* path = ws.path.data();
  const double base = dist - u_row;
  double lowest = kInf;
  int64_t lowest_pos = 0;
  for (int64_t k = 0; k < num_unscanned; ++k) {
    const int64_t j = unscanned[k];
    const double reduced = base + cost_row[j] - v[j];
    const double before = shortest[j];
    path[j] = reduced < before ? row : path[j];
    const double d = std::min(reduced, before);
    shortest[j] = d;
    // On ties prefer a free column: the search can stop there instead of growing the tree.
    if (d <= lowest && (d < lowest || row4col[j] < 0)) {
      lowest = d;
      lowest_pos = k;
    }
  }
  return lowest_pos;
}

// Dijkstra from the free row `start` over reduced costs c_ij - u_i - v_j (non-negative on
// every row already assigned, so the search is exact) until it settles a free column.
// Returns that column; ws.path holds the alternating path and ws.shortest the distances.
// `min_dist` receives the length of the shortest augmenting path.
int64_t shortest_path(const double* cost, int64_t cols, int64_t start, LsapWorkspace& ws,
                      double& min_dist) {
  int64_t* unscanned = ws.unscanned.data();
  int64_t num_unscanned = cols;
  for (int64_t j = 0; j < cols; ++j) {
    unscanned[j] = j;
    ws.shortest[j] = kInf;
  }
  ws.scanned_rows.clear();
  ws.scanned_cols.clear();

  double dist = 0.0;
  int64_t row = start;
  for (;;) {
    ws.scanned_rows.push_back(row);
    const int64_t pos =
        relax_row(cost + row * cols, dist, ws.u[row], row, unscanned, num_unscanned, ws);
    const int64_t col = unscanned[pos];
    dist = ws.shortest[col];
    ws.scanned_cols.push_back(col);
    unscanned[pos] = unscanned[--num_unscanned];
    if (ws.row4col[col] < 0) {
      min_dist = dist;
      return col;
    }
    row = ws.row4col[col];
  }
}

// Dual update after a search, then flip the assignment along the path ending at `sink`.
// The updates keep u_i + v_j = c_ij on every assigned pair and u_i + v_j <= c_ij elsewhere
// (the standard Dijkstra potential update restricted to settled vertices).
void augment(int64_t start, int64_t sink, double min_dist, int64_t* col4row, LsapWorkspace& ws) {
  ws.u[start] += min_dist;
  for (size_t k = 1; k < ws.scanned_rows.size(); ++k) {
    const int64_t i = ws.scanned_rows[k];
    ws.u[i] += min_dist - ws.shortest[col4row[i]];
  }
  // The sink is settled at distance min_dist: its v does not move (a free column keeps v = 0).
  for (const int64_t j : ws.scanned_cols) ws.v[j] -= min_dist - ws.shortest[j];

  int64_t col = sink;
  for (;;) {
    const int64_t row = ws.path[col];
    ws.row4col[col] = row;
    std::swap(col4row[row], col);
    if (row == start) break;
  }
}

}  // namespace

void solve_rectangular(const double* cost, int64_t rows, int64_t cols, int64_t* col4row,
                       LsapWorkspace& ws) {
  if (rows == 0) return;
  ws.u.assign(rows, 0.0);
  ws.v.assign(cols, 0.0);
  ws.row4col.assign(cols, -1);
  ws.shortest.resize(cols);
  ws.path.resize(cols);
  ws.unscanned.resize(cols);
  ws.free_rows.clear();

  if (rows == cols) {
    column_reduction(cost, rows, col4row, ws);
  } else {
    row_reduction(cost, rows, cols, col4row, ws);
  }
  augmenting_row_reduction(cost, rows, cols, col4row, ws);
  for (const int64_t start : ws.free_rows) {
    double min_dist = 0.0;
    const int64_t sink = shortest_path(cost, cols, start, ws, min_dist);
    augment(start, sink, min_dist, col4row, ws);
  }
}

}  // namespace fmf
