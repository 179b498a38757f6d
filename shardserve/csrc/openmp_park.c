// Parking the caller's OpenMP team between engine steps (workers/cpu_openmp.py). Inside one parallel region
// the master waits until an eventfd has counted the signals it expects (or a timeout), while every other
// thread of the team sleeps on a futex. So no worker spins on a core the server's event loop needs, and the
// team the next step runs on is the same one: its threads, their stacks and thread-local buffers stay warm
// (a team started afresh after omp_pause_resource_all made a one-sequence prefill step ~1.5x slower).
#define _GNU_SOURCE
#include <stdint.h>

#ifdef __linux__
#include <limits.h>
#include <linux/futex.h>
#include <omp.h>
#include <poll.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

// Returns the signals counted (what was written to `fd`); fewer than `signals` when the timeout came first.
int64_t park_openmp_workers(int64_t fd, int64_t signals, int64_t timeout_ns, int num_threads) {
    atomic_int done = 0;
    int64_t counted = 0;
#pragma omp parallel num_threads(num_threads)
    {
        if (omp_get_thread_num() == 0) {
            const int64_t deadline = now_ns() + timeout_ns;
            while (counted < signals) {
                const int64_t left = deadline - now_ns();
                if (left <= 0)
                    break;
                struct pollfd ready = {.fd = (int)fd, .events = POLLIN};
                struct timespec wait = {left / 1000000000, left % 1000000000};
                uint64_t value;
                if (ppoll(&ready, 1, &wait, NULL) > 0 && read((int)fd, &value, sizeof value) == sizeof value)
                    counted += (int64_t)value;
            }
            atomic_store(&done, 1);
            syscall(SYS_futex, (int *)&done, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
        } else {
            while (!atomic_load(&done))
                syscall(SYS_futex, (int *)&done, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        }
    }
    return counted;
}
#else
int64_t park_openmp_workers(int64_t fd, int64_t signals, int64_t timeout_ns, int num_threads) {
    (void)fd, (void)signals, (void)timeout_ns, (void)num_threads;
    return -1;  // no futexes or eventfds: the caller falls back to releasing the pool
}
#endif
