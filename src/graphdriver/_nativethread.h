/* What graphdriver's native worker threads share (_fastdigest.c, _fastzstd.c, _fastapply.c):
 * futex sleeps and wake-ups on a 32-bit word, and starting a thread that takes no signal.
 * A header of static functions: each extension gets its own copy, no symbol is exported. */
#ifndef GRAPHDRIVER_NATIVETHREAD_H
#define GRAPHDRIVER_NATIVETHREAD_H

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline void
futex_wait(_Atomic uint32_t *word, uint32_t seen)
{
    /* returns at once if *word is no longer *seen* (a wake-up came in between) */
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
}

static inline void
futex_wake(_Atomic uint32_t *word)
{
    atomic_fetch_add(word, 1);
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* pthread_create with every signal blocked in the new thread: signals go to the threads that
 * handle them (Python's main thread).  Returns pthread_create's error number (0: started). */
static inline int
start_signalless_thread(pthread_t *thread, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    int err;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    err = pthread_create(thread, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return err;
}

#endif
