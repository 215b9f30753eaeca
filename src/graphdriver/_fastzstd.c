/* Optional native helper of archive/compression.py: a zstd layer decoded by a native thread that
 * never takes the GIL, a ring ahead of the tar reader.
 *
 * Decoder(fd, head) reads the compressed stream from fd (after *head*, the bytes the caller
 * already read to detect it), decodes every frame with libzstd's ZSTD_decompressStream straight
 * into a ring buffer, and readinto() copies from the ring into the reader's buffer: one copy of
 * the decoded bytes, no Python object per chunk, no GIL hand-off.  The hand-over is two counters:
 *   written  bytes the worker has decoded into the ring (written by the worker)
 *   taken    bytes the caller has copied out (written by the caller)
 * Either side sleeps (a futex) only when it must: the caller when the ring is empty, the worker
 * when the ring is full; the caller wakes a sleeping worker once half the ring is free (not for
 * every read), the worker wakes a sleeping caller when it publishes.  Each side announces its
 * sleep in an atomic flag before re-checking the other side's counter (sequentially consistent:
 * one of the two always sees the other), and the other side makes the system call only when
 * that flag is set.
 *
 * Unless fd is a regular file, the worker reads it after a poll() that also watches an eventfd,
 * so close() stops a worker waiting on a pipe that gives nothing more.  A stream cut short (input ends inside a frame) is
 * an error, like corrupt data: both raise Corrupt (a ValueError) once the bytes decoded before
 * it are read; a read error raises OSError with its errno.  libzstd is libzstd.so.1, opened at
 * import (before the confined child's chroot) with dlopen: no zstd headers at build time, the
 * declarations below are its stable ABI.  Import fails (ImportError: compression.py then uses
 * python-zstandard) where it is absent or older than 1.4.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* the ring: 2 MiB (the tar reader takes 256 KiB at a time into its 1 MiB buffer) */
#define RING (2u << 20)
/* the worker decodes at most this much per call, then publishes it */
#define STEP (256u << 10)
/* the worker decodes once this much of the ring is free (no crumbs); one that found less sleeps
 * until RESUME_AT is free */
#define MIN_ROOM (64u << 10)
#define RESUME_AT (RING / 2)
/* compressed bytes per read (128 KiB stays in the L2 cache: 256 KiB reads cost 3x in the kernel) */
#define IN_SIZE (128u << 10)

/* libzstd's stable ABI (zstd.h, v1.4+) */
typedef struct {
    const void *src;
    size_t size;
    size_t pos;
} zin_t;
typedef struct {
    void *dst;
    size_t size;
    size_t pos;
} zout_t;
typedef void *(*create_dctx_fn)(void);
typedef size_t (*free_dctx_fn)(void *);
typedef size_t (*decompress_stream_fn)(void *, zout_t *, zin_t *);
typedef unsigned (*is_error_fn)(size_t);
typedef const char *(*error_name_fn)(size_t);
typedef unsigned (*version_fn)(void);

static create_dctx_fn create_dctx;
static free_dctx_fn free_dctx;
static decompress_stream_fn decompress_stream;
static is_error_fn is_error;
static error_name_fn error_name;

static PyObject *Corrupt;

typedef struct {
    PyObject_HEAD
    int fd;                      /* the caller's: never closed here */
    int pollable;                /* not a regular file: poll it with stop_fd before reading */
    int stop_fd;                 /* eventfd written by close() */
    void *dctx;
    unsigned char *ring;
    unsigned char *in;
    size_t head_len;             /* bytes of *in* preloaded with the caller's head */
    _Atomic uint64_t written;
    _Atomic uint64_t taken;
    _Atomic uint32_t worker_sleeping, caller_sleeping;
    _Atomic uint32_t worker_word, caller_word; /* futex words: bumped by whoever wakes */
    _Atomic int finished;        /* the worker is done: end of data, or an error below */
    _Atomic int stop;
    int err_errno;               /* a read error (set before finished) */
    char err_msg[160];           /* corrupt data (set before finished) */
    pthread_t thread;
    pid_t owner;                 /* the process the worker runs in (a fork's child has none) */
    int started, joined;
} Decoder;

static void
futex_wait(_Atomic uint32_t *word, uint32_t seen)
{
    /* returns at once if *word is no longer *seen* (a wake-up came in between) */
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
}

static void
futex_wake(_Atomic uint32_t *word)
{
    atomic_fetch_add(word, 1);
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static void
wake_caller(Decoder *d)
{
    if (atomic_load(&d->caller_sleeping) && atomic_exchange(&d->caller_sleeping, 0))
        futex_wake(&d->caller_word);
}

/* the worker: wait until at least *want* bytes of the ring are free; 0 if stopped */
static int
wait_room(Decoder *d, uint64_t w, uint64_t want)
{
    while (RING - (w - atomic_load(&d->taken)) < want) {
        if (atomic_load(&d->stop))
            return 0;
        uint32_t seen = atomic_load(&d->worker_word);
        atomic_store(&d->worker_sleeping, 1);
        if (RING - (w - atomic_load(&d->taken)) < RESUME_AT && !atomic_load(&d->stop))
            futex_wait(&d->worker_word, seen);
        atomic_store(&d->worker_sleeping, 0);
    }
    return !atomic_load(&d->stop);
}

/* the worker: read compressed bytes into d->in; >0 read, 0 end of input, -1 error/stop */
static ssize_t
read_input(Decoder *d)
{
    struct pollfd fds[2] = {{d->fd, POLLIN, 0}, {d->stop_fd, POLLIN, 0}};
    for (;;) {
        if (atomic_load(&d->stop))
            return -1;
        if (d->pollable && poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            d->err_errno = errno;
            return -1;
        }
        if (d->pollable && fds[1].revents)
            return -1;
        ssize_t n = read(d->fd, d->in, IN_SIZE);
        if (n >= 0)
            return n;
        if (errno != EINTR && errno != EAGAIN) {
            d->err_errno = errno;
            return -1;
        }
    }
}

static void
set_corrupt(Decoder *d, const char *msg)
{
    snprintf(d->err_msg, sizeof d->err_msg, "%s", msg);
}

static void *
work(void *arg)
{
    Decoder *d = (Decoder *)arg;
    zin_t in = {d->in, d->head_len, 0};
    uint64_t w = 0;
    size_t hint = 1; /* libzstd's: 0 when every frame begun is complete and flushed */
    int at_end = 0;
#ifdef __GLIBC__
    /* named by itself: naming another thread goes through /proc, absent after a chroot */
    pthread_setname_np(pthread_self(), "zstd-decode");
#endif
    for (;;) {
        if (in.pos == in.size && !at_end) {
            ssize_t n = read_input(d);
            if (n < 0)
                break;
            in.size = (size_t)n;
            in.pos = 0;
            at_end = n == 0;
        }
        /* a call after the last frame's end would wait for another frame's header */
        if (at_end && hint == 0)
            break;
        if (!wait_room(d, w, MIN_ROOM))
            break;
        size_t off = (size_t)(w % RING);
        size_t room = RING - (size_t)(w - atomic_load(&d->taken));
        size_t span = RING - off;
        zout_t out = {d->ring + off, 0, 0};
        out.size = room < span ? room : span;
        if (out.size > STEP)
            out.size = STEP;
        hint = decompress_stream(d->dctx, &out, &in);
        if (is_error(hint)) {
            set_corrupt(d, error_name(hint));
            break;
        }
        if (out.pos) {
            w += out.pos;
            atomic_store(&d->written, w);
            wake_caller(d);
        }
        /* at the end of the input, go on while libzstd still flushes what it holds */
        if (at_end && out.pos < out.size) {
            if (hint)
                set_corrupt(d, "truncated frame");
            break;
        }
    }
    atomic_store(&d->finished, 1);
    wake_caller(d);
    return NULL;
}

static void
stop_worker(Decoder *d)
{
    if (!d->started || d->joined)
        return;
    atomic_store(&d->stop, 1);
    uint64_t one = 1;
    if (write(d->stop_fd, &one, sizeof one) < 0) {
        /* an eventfd write fails only when its counter would overflow: it is set already */
    }
    futex_wake(&d->worker_word);
    if (d->owner == getpid()) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(d->thread, NULL);
        Py_END_ALLOW_THREADS
    }
    d->joined = 1;
}

static void
free_resources(Decoder *d)
{
    if (d->dctx && d->joined) {
        free_dctx(d->dctx);
        d->dctx = NULL;
    }
    if (d->joined || !d->started) {
        free(d->ring);
        free(d->in);
        d->ring = d->in = NULL;
    }
    if (d->stop_fd >= 0 && (d->joined || !d->started)) {
        close(d->stop_fd);
        d->stop_fd = -1;
    }
}

static int
Decoder_init(Decoder *d, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "head", NULL};
    int fd;
    Py_buffer head;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*:Decoder", kwlist, &fd, &head))
        return -1;
    if (d->started || d->ring) {
        PyBuffer_Release(&head);
        PyErr_SetString(PyExc_ValueError, "Decoder is initialized once");
        return -1;
    }
    if ((size_t)head.len > IN_SIZE) {
        PyBuffer_Release(&head);
        PyErr_SetString(PyExc_ValueError, "head larger than the input buffer");
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        PyBuffer_Release(&head);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    d->fd = fd;
    d->pollable = !S_ISREG(st.st_mode);
    d->ring = malloc(RING);
    d->in = malloc(IN_SIZE);
    d->dctx = create_dctx();
    d->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (!d->ring || !d->in || !d->dctx || d->stop_fd < 0) {
        int e = errno;
        PyBuffer_Release(&head);
        if (d->dctx) {
            free_dctx(d->dctx);
            d->dctx = NULL;
        }
        free_resources(d);
        errno = e ? e : ENOMEM;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    memcpy(d->in, head.buf, (size_t)head.len);
    d->head_len = (size_t)head.len;
    PyBuffer_Release(&head);

    sigset_t all, old;
    sigfillset(&all);
    /* the worker takes no signal: they go to the threads that handle them (Python's main) */
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = pthread_create(&d->thread, NULL, work, d);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        free_dctx(d->dctx);
        d->dctx = NULL;
        free_resources(d);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    d->owner = getpid();
    d->started = 1;
    return 0;
}

static PyObject *
Decoder_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    Decoder *d = (Decoder *)type->tp_alloc(type, 0);
    if (d) {
        d->fd = -1;
        d->stop_fd = -1;
    }
    return (PyObject *)d;
}

static void
Decoder_dealloc(Decoder *d)
{
    stop_worker(d);
    free_resources(d);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

/* the caller, without the GIL: wait until there are bytes past *r* or the worker finished;
 * -1 when a signal interrupted the wait (the caller runs Python's handlers, then waits again) */
static int
wait_data(Decoder *d, uint64_t r)
{
    int interrupted = 0;
    Py_BEGIN_ALLOW_THREADS
    while (atomic_load(&d->written) == r && !atomic_load(&d->finished)) {
        uint32_t seen = atomic_load(&d->caller_word);
        atomic_store(&d->caller_sleeping, 1);
        if (atomic_load(&d->written) == r && !atomic_load(&d->finished)) {
            if (syscall(SYS_futex, &d->caller_word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0) < 0
                && errno == EINTR) {
                atomic_store(&d->caller_sleeping, 0);
                interrupted = 1;
                break;
            }
        }
        atomic_store(&d->caller_sleeping, 0);
    }
    Py_END_ALLOW_THREADS
    return interrupted ? -1 : 0;
}

static PyObject *
Decoder_readinto(Decoder *d, PyObject *arg)
{
    Py_buffer view;
    if (!d->started || d->joined) {
        PyErr_SetString(PyExc_ValueError, "read of a closed Decoder");
        return NULL;
    }
    if (d->owner != getpid()) {
        PyErr_SetString(PyExc_ValueError, "read of a Decoder whose thread is in another process");
        return NULL;
    }
    if (PyObject_GetBuffer(arg, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    uint64_t r = atomic_load(&d->taken);
    uint64_t w;
    while ((w = atomic_load(&d->written)) == r && !atomic_load(&d->finished) && view.len) {
        if (wait_data(d, r) < 0 && PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    w = atomic_load(&d->written);
    size_t n = (size_t)(w - r);
    if ((size_t)view.len < n)
        n = (size_t)view.len;
    if (n == 0 && view.len) {
        PyBuffer_Release(&view);
        /* finished, and everything decoded was read: the end, or the worker's error */
        if (d->err_errno) {
            errno = d->err_errno;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (d->err_msg[0]) {
            PyErr_SetString(Corrupt, d->err_msg);
            return NULL;
        }
        return PyLong_FromLong(0);
    }
    size_t off = (size_t)(r % RING);
    size_t first = RING - off < n ? RING - off : n;
    memcpy(view.buf, d->ring + off, first);
    if (first < n)
        memcpy((unsigned char *)view.buf + first, d->ring, n - first);
    PyBuffer_Release(&view);
    r += n;
    atomic_store(&d->taken, r);
    if (atomic_load(&d->worker_sleeping) && RING - (w - r) >= RESUME_AT &&
        atomic_exchange(&d->worker_sleeping, 0))
        futex_wake(&d->worker_word);
    return PyLong_FromSize_t(n);
}

static PyObject *
Decoder_close(Decoder *d, PyObject *Py_UNUSED(ignored))
{
    stop_worker(d);
    free_resources(d);
    Py_RETURN_NONE;
}

static PyMethodDef Decoder_methods[] = {
    {"readinto", (PyCFunction)Decoder_readinto, METH_O,
     "readinto(buffer) -> int: decoded bytes copied into buffer; 0 at the end of the stream.\n"
     "Raises Corrupt (corrupt or truncated stream) or OSError (reading the input)."},
    {"close", (PyCFunction)Decoder_close, METH_NOARGS,
     "Stop and join the worker (the descriptor stays the caller's)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "graphdriver._fastzstd.Decoder",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Decoder(fd, head): a zstd stream read from fd (after head), decoded ahead by a "
              "native thread.",
    .tp_new = Decoder_new,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_methods = Decoder_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastzstd",
    "zstd layers decoded by a native thread into a ring ahead of the tar reader.", -1, NULL,
};

static int
load_libzstd(void)
{
    void *lib = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        PyErr_SetString(PyExc_ImportError, "libzstd.so.1 not found");
        return -1;
    }
    version_fn version = (version_fn)dlsym(lib, "ZSTD_versionNumber");
    create_dctx = (create_dctx_fn)dlsym(lib, "ZSTD_createDCtx");
    free_dctx = (free_dctx_fn)dlsym(lib, "ZSTD_freeDCtx");
    decompress_stream = (decompress_stream_fn)dlsym(lib, "ZSTD_decompressStream");
    is_error = (is_error_fn)dlsym(lib, "ZSTD_isError");
    error_name = (error_name_fn)dlsym(lib, "ZSTD_getErrorName");
    if (!version || !create_dctx || !free_dctx || !decompress_stream || !is_error ||
        !error_name || version() < 10400) {
        PyErr_SetString(PyExc_ImportError, "libzstd.so.1 lacks the v1.4 streaming API");
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__fastzstd(void)
{
    if (load_libzstd() < 0)
        return NULL;
    if (PyType_Ready(&DecoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Corrupt = PyErr_NewExceptionWithDoc("graphdriver._fastzstd.Corrupt",
                                        "corrupt or truncated zstd data", PyExc_ValueError, NULL);
    if (!Corrupt || PyModule_AddObject(m, "Corrupt", Corrupt) < 0) {
        Py_XDECREF(Corrupt);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
