#include "pool.h"

#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace fmf {
namespace {

// The most helper threads worth having: one per logical CPU besides the caller's. When the
// count is unknown (0), callers' requests are taken as they come. Asked once: glibc reads /sys.
size_t max_helpers(size_t wanted) {
  static const size_t cpus = std::thread::hardware_concurrency();
  return cpus == 0 ? wanted : std::min(wanted, cpus - 1);
}

// One run_on_pool call, on its caller's stack. It stays in the queue while helpers may still
// join it, and the caller returns only when it is out of the queue and no helper is inside body.
struct Job {
  const std::function<void()>* body;
  int open_slots;   // helpers that may still join
  int running = 0;  // helpers inside body now
};

// The process's pool (see pool() below). Never destroyed: a fork child drops the parent's (whose
// threads do not exist there and whose lock one of them may have held at the fork) untouched.
class Pool;
std::mutex g_pool_mu;  // guards g_pool; held across fork() so the child sees a settled pointer
Pool* g_pool = nullptr;

void before_fork() { g_pool_mu.lock(); }
void after_fork_in_parent() { g_pool_mu.unlock(); }
void after_fork_in_child() {
  g_pool = nullptr;
  g_pool_mu.unlock();
}

// Registered while the extension loads, under Python's import lock and GIL: a handler registered
// while another thread is in fork() would be skipped for that fork. Without the handlers the
// pool never starts a thread.
const bool g_fork_handlers =
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) == 0;

class Pool {
 public:
  void run(int helpers, const std::function<void()>& body) {
    Job job{&body, 0};
    int slots = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (helpers > 0 && g_fork_handlers && !shut_down_) {
        grow(max_helpers(static_cast<size_t>(helpers)));
        slots = static_cast<int>(std::min(static_cast<size_t>(helpers), threads_.size()));
      }
      job.open_slots = slots;
      if (slots > 0) queue_.push_back(&job);
    }
    for (int i = 0; i < slots; ++i) work_ready_.notify_one();
    body();
    std::unique_lock<std::mutex> lock(mu_);
    if (job.open_slots > 0) queue_.erase(std::find(queue_.begin(), queue_.end(), &job));
    helper_left_.wait(lock, [&job] { return job.running == 0; });
  }

  void shutdown() {
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      shut_down_ = true;
      threads.swap(threads_);
    }
    work_ready_.notify_all();
    for (std::thread& t : threads) t.join();
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(threads_.size()), started_, shut_down_};
  }

 private:
  // Starts threads until there are `wanted`, or the system refuses one. Called with mu_ held.
  void grow(size_t wanted) {
    while (threads_.size() < wanted) {
      try {
        threads_.emplace_back([this] { serve(); });
      } catch (const std::system_error&) {
        return;  // the threads we have share the work
      }
      ++started_;
    }
  }

  // A pool thread: joins queued jobs, oldest first, until shutdown.
  void serve() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      work_ready_.wait(lock, [this] { return shut_down_ || !queue_.empty(); });
      if (shut_down_) return;  // callers of queued jobs finish them alone
      Job* job = queue_.front();
      if (--job->open_slots == 0) queue_.pop_front();
      ++job->running;
      lock.unlock();
      (*job->body)();
      lock.lock();
      if (--job->running == 0) helper_left_.notify_all();  // job may be gone after this
    }
  }

  std::mutex mu_;
  std::condition_variable work_ready_;   // pool threads wait here for a queued job
  std::condition_variable helper_left_;  // callers wait here for their helpers to return
  std::deque<Job*> queue_;
  std::vector<std::thread> threads_;
  int64_t started_ = 0;
  bool shut_down_ = false;
};

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (g_pool == nullptr) g_pool = new Pool();
  return *g_pool;
}

}  // namespace

void run_on_pool(int helpers, const std::function<void()>& body) {
  if (helpers <= 0) {
    body();
    return;
  }
  pool().run(helpers, body);
}

void shutdown_pool() { pool().shutdown(); }

PoolStats pool_stats() { return pool().stats(); }

}  // namespace fmf
