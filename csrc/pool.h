// A process-wide pool of persistent worker threads for solve_batch (batch.cpp).
//
// Lifecycle: created empty on first use; threads start lazily, when a call wants more helpers
// than the pool has (never more than the machine's logical CPUs minus one, the caller being the
// other), and then serve every later call from any thread. At interpreter exit the module calls
// shutdown_pool(), which joins them. A child created by fork() inherits none of the threads and
// possibly a lock held by one of them: a pthread_atfork handler makes the child forget the
// parent's pool (leaked, never touched again) so that its first call builds a fresh one.
#pragma once

#include <cstdint>
#include <functional>

namespace fmf {

// Runs body() on the calling thread and, at the same time, on up to `helpers` pool threads, then
// returns once every one of them has returned. Helpers join when they are free: one may run body
// after the caller's own run has ended, or none at all, so body must share its work out
// dynamically (each run takes items until none remain). body must not throw. Safe to call from
// several threads at once; with helpers <= 0, or after shutdown_pool(), the caller runs it alone.
void run_on_pool(int helpers, const std::function<void()>& body);

// Joins every pool thread once each has finished the body it is running. Later calls run on
// their caller alone. Idempotent.
void shutdown_pool();

struct PoolStats {
  int64_t threads;  // pool threads alive now
  int64_t started;  // threads this process's pool has started in total (a fork child: its own)
  bool shut_down;
};
PoolStats pool_stats();

}  // namespace fmf
