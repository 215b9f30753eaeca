/* Optional native helper of archive/compression.py: a zstd layer decoded by a native thread that
 * never takes the GIL, ahead of the tar reader.
 *
 * Decoder(fd, head) reads the compressed stream from fd (after *head*, the bytes the caller
 * already read to detect it) and decodes every frame block by block with libzstd's buffer-less
 * API (ZSTD_decompressContinue) straight into a ring that is at once the frame's window (the
 * history later blocks copy from) and the queue to the reader: readinto() copies from the ring
 * into the reader's buffer.  So the decoded bytes are copied once (libzstd's streaming API
 * decodes into its own window, then copies out; python-zstandard adds a bytes object per chunk
 * and a GIL hand-off).  A block that does not fit before the ring's end goes at its start (the
 * "round buffer" use libzstd documents); the ring is the window plus RING_AHEAD, so the worker
 * never overwrites history a later block may need.  The hand-over is counters:
 *   written  ring bytes the worker has filled (written by the worker)
 *   taken    ring bytes the caller has copied out (written by the caller)
 *   gap      where the worker left the end of a lap unused (the caller skips to the next lap)
 * Either side sleeps (a futex) only when it must: the caller when the ring is empty, the worker
 * when it is full; the caller wakes a sleeping worker once half the ring is free (not for every
 * read), the worker wakes a sleeping caller when it publishes.  Each side announces its sleep in
 * an atomic flag before re-checking the other side's counter (sequentially consistent: one of
 * the two always sees the other), and the other side makes the system call only when that flag
 * is set.
 *
 * Unless fd is a regular file, the worker reads it after a poll() that also watches an eventfd,
 * so close() stops a worker waiting on a pipe that gives nothing more.  Skippable frames are
 * passed over; a frame whose window exceeds 128 MiB is refused (libzstd's default limit).  A
 * stream cut short (the input ends inside a frame) is an error, like corrupt data (the frames'
 * checksums are checked): both raise Corrupt (a ValueError) once the bytes decoded before it
 * are read; a read error raises OSError with its errno.  libzstd is libzstd.so.1, opened at
 * import (before the confined child's chroot) with dlopen: no zstd headers at build time, the
 * declarations below are its ABI.  Import fails (ImportError: compression.py then uses
 * python-zstandard) where it is absent or older than 1.4.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_nativethread.h"

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

/* the ring holds a frame's window (libzstd decodes each block next to the history it refers to,
 * wrapping to the start: its "round buffer" use of ZSTD_decompressContinue) and, beyond it, what
 * the worker decodes ahead of the reader: at least RING_AHEAD */
#define RING_AHEAD (1u << 20)
#define RING_MIN (2u << 20)
/* the largest window a frame may ask for (libzstd's own default limit, ZSTD_WINDOWLOG_LIMIT_DEFAULT:
 * a larger one needs --long decoding, which the zstd command also refuses by default) */
#define WINDOW_MAX (1ull << 27)
/* compressed bytes per read (128 KiB stays in the L2 cache: 256 KiB reads cost 3x in the kernel) */
#define IN_READ (128u << 10)
/* the input buffer: a block (at most 128 KiB + its 3-byte header) must fit with a read behind it */
#define IN_CAP (2 * IN_READ + 64)

/* libzstd's ABI (zstd.h, v1.4+; the buffer-less functions are in its static-linking section, and
 * exported by the shared library) */
typedef struct {
    unsigned long long frameContentSize;
    unsigned long long windowSize;
    unsigned blockSizeMax;
    unsigned frameType; /* 0 a zstd frame, 1 a skippable frame */
    unsigned headerSize;
    unsigned dictID;
    unsigned checksumFlag;
    unsigned reserved[9]; /* room for fields a later libzstd may add */
} zheader_t;
typedef void *(*create_dctx_fn)(void);
typedef size_t (*free_dctx_fn)(void *);
typedef size_t (*get_header_fn)(zheader_t *, const void *, size_t);
typedef size_t (*buffer_size_fn)(unsigned long long, unsigned long long);
typedef size_t (*begin_fn)(void *);
typedef size_t (*next_size_fn)(void *);
typedef size_t (*continue_fn)(void *, void *, size_t, const void *, size_t);
typedef unsigned (*is_error_fn)(size_t);
typedef const char *(*error_name_fn)(size_t);
typedef unsigned (*version_fn)(void);

static create_dctx_fn create_dctx;
static free_dctx_fn free_dctx;
static get_header_fn get_header;
static buffer_size_fn buffer_size_min;
static begin_fn decompress_begin;
static next_size_fn next_src_size;
static continue_fn decompress_continue;
static is_error_fn is_error;
static error_name_fn error_name;

static PyObject *Corrupt;

typedef struct {
    PyObject_HEAD
    int fd;                      /* the caller's: never closed here */
    int pollable;                /* not a regular file: poll it with stop_fd before reading */
    int stop_fd;                 /* eventfd written by close() */
    void *dctx;
    unsigned char *ring;         /* replaced by the worker only when the caller took everything */
    size_t ring_size;
    unsigned char *in;
    size_t in_pos, in_end;       /* the compressed bytes not decoded yet (the worker's) */
    /* positions count the bytes the worker put in the ring, the unused end of a lap included
     * (where a block did not fit before the ring's end): the caller skips it at gap */
    _Atomic uint64_t written;
    _Atomic uint64_t taken;
    _Atomic uint64_t gap;
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
wake_caller(Decoder *d)
{
    if (atomic_load(&d->caller_sleeping) && atomic_exchange(&d->caller_sleeping, 0))
        futex_wake(&d->caller_word);
}

/* the worker: wait until at least *want* bytes of the ring are free; 0 if stopped.  The caller
 * wakes it once half the ring is free, or all of it. */
static int
wait_room(Decoder *d, uint64_t w, uint64_t want)
{
    while (d->ring_size - (w - atomic_load(&d->taken)) < want) {
        if (atomic_load(&d->stop))
            return 0;
        uint32_t seen = atomic_load(&d->worker_word);
        atomic_store(&d->worker_sleeping, 1);
        if (d->ring_size - (w - atomic_load(&d->taken)) < want && !atomic_load(&d->stop))
            futex_wait(&d->worker_word, seen);
        atomic_store(&d->worker_sleeping, 0);
    }
    return !atomic_load(&d->stop);
}

static void
set_corrupt(Decoder *d, const char *msg)
{
    snprintf(d->err_msg, sizeof d->err_msg, "%s", msg);
}

/* the worker: read compressed bytes behind d->in's end; >0 read, 0 end of input, -1 error/stop */
static ssize_t
read_input(Decoder *d)
{
    struct pollfd fds[2] = {{d->fd, POLLIN, 0}, {d->stop_fd, POLLIN, 0}};
    size_t room = IN_CAP - d->in_end;
    if (room > IN_READ)
        room = IN_READ;
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
        ssize_t n = read(d->fd, d->in + d->in_end, room);
        if (n > 0)
            d->in_end += (size_t)n;
        if (n >= 0)
            return n;
        if (errno != EINTR && errno != EAGAIN) {
            d->err_errno = errno;
            return -1;
        }
    }
}

/* the worker: at least *need* compressed bytes at d->in + d->in_pos; 1, 0 if the input ends
 * first, -1 on an error or a stop */
static int
need_input(Decoder *d, size_t need)
{
    if (d->in_end - d->in_pos >= need)
        return 1;
    if (need > IN_CAP - IN_READ) {
        set_corrupt(d, "block larger than the format allows");
        return -1;
    }
    memmove(d->in, d->in + d->in_pos, d->in_end - d->in_pos);
    d->in_end -= d->in_pos;
    d->in_pos = 0;
    while (d->in_end < need) {
        ssize_t n = read_input(d);
        if (n <= 0)
            return (int)n;
    }
    return 1;
}

/* the worker: a ring for a frame whose window is *window* bytes (the caller took everything
 * decoded before: the ring is replaced only then); 0 on an error or a stop */
static int
ring_for(Decoder *d, uint64_t w, const zheader_t *h)
{
    size_t least = buffer_size_min(h->windowSize, h->frameContentSize);
    if (is_error(least)) {
        set_corrupt(d, error_name(least));
        return 0;
    }
    size_t size = least + RING_AHEAD;
    if (size < RING_MIN)
        size = RING_MIN;
    if (d->ring && d->ring_size >= least + (RING_AHEAD >> 2))
        return 1;
    if (d->ring && !wait_room(d, w, d->ring_size))
        return 0;
    unsigned char *ring = malloc(size);
    if (!ring) {
        d->err_errno = ENOMEM;
        return 0;
    }
    free(d->ring);
    d->ring = ring;
    d->ring_size = size;
    return 1;
}

/* the worker: one frame's blocks decoded into the ring; 1 at its end, 0 on an error or a stop */
static int
decode_frame(Decoder *d, uint64_t *wp, const zheader_t *h)
{
    uint64_t w = *wp;
    size_t block_max = h->blockSizeMax;
    size_t r = decompress_begin(d->dctx);
    if (is_error(r)) {
        set_corrupt(d, error_name(r));
        return 0;
    }
    for (;;) {
        size_t need = next_src_size(d->dctx);
        if (need == 0)
            break;
        int got = need_input(d, need);
        if (got <= 0) {
            if (got == 0)
                set_corrupt(d, "truncated frame");
            return 0;
        }
        size_t size = d->ring_size;
        size_t off = (size_t)(w % size);
        size_t skip = size - off < block_max ? size - off : 0;
        if (!wait_room(d, w, skip + block_max))
            return 0;
        if (skip) {
            /* the block would not fit before the ring's end: it goes at its start */
            atomic_store(&d->gap, w);
            w += skip;
            off = 0;
        }
        size_t n = decompress_continue(d->dctx, d->ring + off, block_max, d->in + d->in_pos, need);
        if (is_error(n)) {
            set_corrupt(d, error_name(n));
            return 0;
        }
        d->in_pos += need;
        if (n || skip) {
            w += n;
            atomic_store(&d->written, w);
            wake_caller(d);
        }
    }
    *wp = w;
    return 1;
}

/* the worker: a skippable frame's bytes passed over */
static int
skip_frame(Decoder *d, unsigned long long left)
{
    while (left) {
        if (d->in_pos == d->in_end) {
            d->in_pos = d->in_end = 0;
            ssize_t n = read_input(d);
            if (n <= 0) {
                if (n == 0)
                    set_corrupt(d, "truncated skippable frame");
                return 0;
            }
        }
        size_t take = d->in_end - d->in_pos;
        if (take > left)
            take = (size_t)left;
        d->in_pos += take;
        left -= take;
    }
    return 1;
}

static void *
work(void *arg)
{
    Decoder *d = (Decoder *)arg;
    uint64_t w = 0;
#ifdef __GLIBC__
    /* named by itself: naming another thread goes through /proc, absent after a chroot */
    pthread_setname_np(pthread_self(), "zstd-decode");
#endif
    for (;;) {
        /* a frame's header: the input may end cleanly here (between frames), nowhere else */
        int got = need_input(d, 1);
        if (got <= 0)
            break;
        zheader_t h;
        size_t want;
        memset(&h, 0, sizeof h);
        while ((want = get_header(&h, d->in + d->in_pos, d->in_end - d->in_pos)) != 0) {
            if (is_error(want)) {
                set_corrupt(d, error_name(want));
                goto done;
            }
            if ((got = need_input(d, want)) <= 0) {
                if (got == 0)
                    set_corrupt(d, "truncated frame");
                goto done;
            }
        }
        if (h.frameType == 1) {
            d->in_pos += 8; /* its magic number and size (libzstd leaves headerSize 0 here) */
            if (!skip_frame(d, h.frameContentSize))
                break;
            continue;
        }
        if (h.windowSize > WINDOW_MAX) {
            set_corrupt(d, "frame requires too much memory for decoding");
            break;
        }
        if (!ring_for(d, w, &h) || !decode_frame(d, &w, &h))
            break;
    }
done:
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
    if (d->started || d->in) {
        PyBuffer_Release(&head);
        PyErr_SetString(PyExc_ValueError, "Decoder is initialized once");
        return -1;
    }
    if ((size_t)head.len > IN_READ) {
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
    d->in = malloc(IN_CAP);
    d->dctx = create_dctx();
    d->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (!d->in || !d->dctx || d->stop_fd < 0) {
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
    d->in_end = (size_t)head.len;
    PyBuffer_Release(&head);

    int err = start_signalless_thread(&d->thread, work, d);
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
        atomic_store(&d->gap, UINT64_MAX);
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
    size_t n = 0;
    while (view.len) {
        while ((w = atomic_load(&d->written)) == r && !atomic_load(&d->finished)) {
            if (wait_data(d, r) < 0 && PyErr_CheckSignals() < 0) {
                PyBuffer_Release(&view);
                return NULL;
            }
        }
        w = atomic_load(&d->written);
        if (w == r)
            break; /* finished, and everything decoded was read */
        /* the ring and the gap are the worker's before it publishes *written* */
        unsigned char *ring = d->ring;
        size_t size = d->ring_size;
        uint64_t gap = atomic_load(&d->gap);
        while (n < (size_t)view.len && r < w) {
            size_t off = (size_t)(r % size);
            if (r == gap) {
                r += size - off; /* the unused end of a lap */
                continue;
            }
            uint64_t piece = w - r;
            if (piece > size - off)
                piece = size - off;
            if (gap > r && piece > gap - r)
                piece = gap - r;
            if (piece > (size_t)view.len - n)
                piece = (size_t)view.len - n;
            memcpy((unsigned char *)view.buf + n, ring + off, (size_t)piece);
            n += (size_t)piece;
            r += piece;
        }
        atomic_store(&d->taken, r);
        if (atomic_load(&d->worker_sleeping)) {
            uint64_t free_bytes = size - (w - r);
            if ((free_bytes >= size / 2 || free_bytes == size) &&
                atomic_exchange(&d->worker_sleeping, 0))
                futex_wake(&d->worker_word);
        }
        if (n)
            break;
    }
    PyBuffer_Release(&view);
    if (n == 0 && view.len) {
        /* the end, or the worker's error */
        if (d->err_errno) {
            errno = d->err_errno;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (d->err_msg[0]) {
            PyErr_SetString(Corrupt, d->err_msg);
            return NULL;
        }
    }
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
    get_header = (get_header_fn)dlsym(lib, "ZSTD_getFrameHeader");
    buffer_size_min = (buffer_size_fn)dlsym(lib, "ZSTD_decodingBufferSize_min");
    decompress_begin = (begin_fn)dlsym(lib, "ZSTD_decompressBegin");
    next_src_size = (next_size_fn)dlsym(lib, "ZSTD_nextSrcSizeToDecompress");
    decompress_continue = (continue_fn)dlsym(lib, "ZSTD_decompressContinue");
    is_error = (is_error_fn)dlsym(lib, "ZSTD_isError");
    error_name = (error_name_fn)dlsym(lib, "ZSTD_getErrorName");
    if (!version || !create_dctx || !free_dctx || !get_header || !buffer_size_min ||
        !decompress_begin || !next_src_size || !decompress_continue || !is_error ||
        !error_name || version() < 10400) {
        PyErr_SetString(PyExc_ImportError, "libzstd.so.1 lacks the v1.4 API used here");
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
