/* Optional native helper of archive/digest.py: the layer's diffID sha256, hashed by a native
 * thread that never takes the GIL.
 *
 * Digest() takes regions of the tar reader's buffer in order (update) and a POSIX thread hashes
 * them with OpenSSL's SHA-256 (the libcrypto that Python's _hashlib already loaded, found with
 * dl_iterate_phdr and opened with RTLD_NOLOAD: no OpenSSL headers at build time, and the same
 * SHA-NI/AVX code hashlib runs).  The hand-over is a ring of slots and two counters:
 *   published  regions handed to the worker (written by the caller, read by the worker)
 *   done       regions the worker has hashed (written by the worker, read by the caller)
 * Handing over costs no system call while the worker is busy.  The worker sleeps (a futex) only
 * when it has caught up, and is woken once WAKE_AT bytes wait for it or when the caller needs a
 * region hashed (wait_for: a reader about to reuse the front of its buffer) -- not for every
 * region; the caller sleeps only in wait_for.  Either side announces its sleep in an atomic flag
 * before re-checking the other side's counter (sequentially consistent: one of the two always
 * sees the other), and the other side makes the system call only when that flag is set.
 *
 * A slot can also hold the jobs that fill a frames bytearray (fill_frames) -- the recorder frames
 * of a native run of entries, whose header bytes and CRCs the native apply left blank: a copy of
 * a range of the reader's buffer (its headers), or the CRC-64/GO-ISO (tar-split's payload
 * checksum) of one (a file's data), written as 8 bytes, little-endian.  The worker does them in
 * order with the regions, on bytes it has just hashed: a caller that waits for the slot's number
 * knows both the ranges read (the buffer may be reused) and the frames whole (they may be read).
 * A file whose data comes in pieces gets its CRC so too: each piece adds to a running CRC, and a
 * last job writes it.  A piece whose CRC the caller computed itself (a big file's, while the
 * worker was behind: see pending) joins the running CRC by the combination of two CRCs (the
 * running one shifted over the piece's length, in GF(2) modulo the polynomial).  The CRC is
 * anycrc's (crc_params/crc_calc of its loaded extension, found as libcrypto is; fill_frames is
 * refused where it is not loaded).
 *
 * Each slot keeps the region's Py_buffer (a reference to the exporter), released by the caller
 * (it holds the GIL) once the worker is past it.  A region below INLINE_BELOW is hashed in the
 * caller when the worker has nothing pending (waking it would cost more).  A dropped Digest stops
 * and joins its thread.  Import fails (ImportError: archive/digest.py then uses its Python worker)
 * where no libcrypto with the EVP API is loaded.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_nativethread.h"

#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NSLOTS 256
/* below this a region is hashed by the caller when nothing is pending (a wake-up costs more) */
#define INLINE_BELOW 4096
/* a sleeping worker is woken once this much waits for it (the tar reader reads 256 KiB at a time
 * into a 1 MiB buffer: half of it), once half of the slots are taken, or when the caller waits */
#define WAKE_AT (512 << 10)

/* the EVP API of OpenSSL >= 1.1, by address (no headers needed) */
typedef void *(*md_ctx_new_fn)(void);
typedef void (*md_ctx_free_fn)(void *);
typedef const void *(*md_fn)(void);
typedef int (*digest_init_fn)(void *, const void *, void *);
typedef int (*digest_update_fn)(void *, const void *, size_t);
typedef int (*digest_final_fn)(void *, unsigned char *, unsigned int *);

static md_ctx_new_fn md_ctx_new;
static md_ctx_free_fn md_ctx_free;
static md_fn sha256_md;
static digest_init_fn digest_init;
static digest_update_fn digest_update;
static digest_final_fn digest_final;

/* anycrc's CRC (its crc-clmul library, C symbols of its extension): the parameters are an opaque
 * block filled once by crc_params (returned by value: through a hidden pointer, whatever their
 * size) and read by crc_calc, which continues a CRC (0 to start, as Go's crc64.Update) */
typedef struct { _Alignas(64) unsigned char bytes[16384]; } crc_params_t;
typedef crc_params_t (*crc_params_fn)(uint8_t, uint64_t, uint64_t, int, int, uint64_t, uint64_t,
                                      uint8_t *);
typedef uint64_t (*crc_calc_fn)(const crc_params_t *, uint64_t, const unsigned char *, uint64_t);
static crc_calc_fn crc_calc;
static crc_params_t *crc_iso; /* CRC-64/GO-ISO */

typedef struct {
    PyObject_HEAD
    void *ctx;                   /* EVP_MD_CTX: the worker's while it runs, else the caller's */
    Py_buffer slots[NSLOTS];
    Py_buffer frames[NSLOTS];    /* fill_frames slots: the frames written into (else .obj NULL) */
    Py_buffer jobs[NSLOTS];      /* fill_frames slots: (u64 offset, u64 length, u64 at) triples */
    uint64_t running_crc;        /* the worker's: the CRC of a file's pieces so far (ADD_JOB) */
    uint64_t released;           /* slots whose buffers were released (caller only) */
    Py_ssize_t unwoken;          /* bytes handed over since the worker was last seen asleep */
    _Atomic uint64_t published;
    _Atomic uint64_t done;
    _Atomic uint32_t worker_sleeping;
    /* the lowest region number a caller asleep in wait_done needs (UINT64_MAX: none); the
     * reader and the tar-split packer's thread may both wait: each lowers it to its own, the
     * worker wakes them all when it gets there, and whoever needs more sets its number again */
    _Atomic uint64_t wake_at;
    _Atomic uint32_t work_word;  /* futex words: bumped by whoever wakes the other side */
    _Atomic uint32_t done_word;
    _Atomic int stop;
    _Atomic int failed;
    pthread_t thread;
    pid_t owner;                 /* the process the worker runs in (a fork's child has none) */
    int started, joined, finished;
    char hex[65];
} Digest;

static void
wake_worker(Digest *d)
{
    if (atomic_exchange(&d->worker_sleeping, 0))
        futex_wake(&d->work_word);
    d->unwoken = 0;
}

/* a job's length with one of these bits: copy the range; add the range to the running CRC (of a
 * file that comes in pieces); write the running CRC and start a new one (the range is empty);
 * join to the running CRC a piece's CRC computed by the caller (the offset field holds it, the
 * length is the piece's); with none: write the range's CRC */
#define COPY_JOB (1ULL << 63)
#define ADD_JOB (1ULL << 62)
#define END_JOB (1ULL << 61)
#define JOIN_JOB (1ULL << 60)
#define JOB_KINDS (COPY_JOB | ADD_JOB | END_JOB | JOIN_JOB)

/* CRC-64/GO-ISO's polynomial, bit-reflected (bit 63 is x^0, as the CRC's register holds it) */
#define ISO_REFLECTED 0xD800000000000000ULL
/* shift_by[k]: x^(2^k) modulo the polynomial (k up to 3 + 63: a byte count of up to 2^64) */
static uint64_t shift_by[67];

/* a(x) * b(x) modulo the polynomial, both reflected */
static uint64_t
mul_mod(uint64_t a, uint64_t b)
{
    uint64_t product = 0;
    int i;
    for (i = 63; i >= 0; i--) { /* a's bit i is the coefficient of x^(63 - i) */
        if (a >> i & 1)
            product ^= b;
        b = b & 1 ? (b >> 1) ^ ISO_REFLECTED : b >> 1; /* b *= x */
    }
    return product;
}

static void
fill_shift_by(void)
{
    int k;
    shift_by[0] = 1ULL << 62; /* x^1 */
    for (k = 1; k < 67; k++)
        shift_by[k] = mul_mod(shift_by[k - 1], shift_by[k - 1]);
}

/* the CRC of A then B from crc(A), crc(B) and B's length: crc(A) times x^(8 len) modulo the
 * polynomial, plus crc(B) (the all-ones start and end of the CRC cancel out in the sum) */
static uint64_t
crc_join(uint64_t crc_a, uint64_t crc_b, uint64_t len_b)
{
    int k = 3; /* x^(8 len) = product of x^(2^k) over the bits of len, shifted by 3 */
    while (len_b) {
        if (len_b & 1)
            crc_a = mul_mod(shift_by[k], crc_a);
        len_b >>= 1;
        k++;
    }
    return crc_a ^ crc_b;
}

/* the jobs of a fill_frames slot (which checked their bounds) */
static void
fill_jobs(const Py_buffer *source, Py_buffer *frames, const Py_buffer *jobs, uint64_t *running)
{
    const unsigned char *src = (const unsigned char *)source->buf;
    unsigned char *out = (unsigned char *)frames->buf;
    const uint64_t *job = (const uint64_t *)jobs->buf;
    Py_ssize_t i, n = jobs->len / 24;
    for (i = 0; i < n; i++) {
        uint64_t off = job[3 * i], kind = job[3 * i + 1] & JOB_KINDS;
        uint64_t len = job[3 * i + 1] & ~JOB_KINDS, at = job[3 * i + 2], c;
        if (kind == COPY_JOB) {
            memcpy(out + at, src + off, (size_t)len);
        } else if (kind == JOIN_JOB) {
            *running = crc_join(*running, off, len);
        } else if (kind == ADD_JOB) {
            if (len)
                *running = crc_calc(crc_iso, *running, src + off, len);
        } else {
            if (kind == END_JOB) {
                c = *running;
                *running = 0;
            } else {
                c = len ? crc_calc(crc_iso, 0, src + off, len) : 0;
            }
            memcpy(out + at, &c, 8); /* little-endian hosts: the "<Q" of struct */
        }
    }
}

static void *
work(void *arg)
{
    Digest *d = (Digest *)arg;
    uint64_t n = atomic_load(&d->done);
#ifdef __GLIBC__
    /* named by itself: naming another thread goes through /proc, absent after a chroot */
    pthread_setname_np(pthread_self(), "layer-digest");
#endif
    for (;;) {
        if (atomic_load(&d->stop))
            break;
        uint64_t p = atomic_load_explicit(&d->published, memory_order_acquire);
        if (n < p) {
            Py_buffer *s = &d->slots[n % NSLOTS];
            if (d->frames[n % NSLOTS].obj != NULL)
                fill_jobs(s, &d->frames[n % NSLOTS], &d->jobs[n % NSLOTS], &d->running_crc);
            else if (!atomic_load_explicit(&d->failed, memory_order_relaxed) &&
                     digest_update(d->ctx, s->buf, (size_t)s->len) != 1)
                atomic_store(&d->failed, 1);
            n++;
            atomic_store(&d->done, n);
            if (n >= atomic_load(&d->wake_at)) {
                atomic_store(&d->wake_at, UINT64_MAX);
                futex_wake(&d->done_word);
            }
            continue;
        }
        uint32_t seen = atomic_load(&d->work_word);
        atomic_store(&d->worker_sleeping, 1);
        if (atomic_load(&d->published) == n && !atomic_load(&d->stop))
            futex_wait(&d->work_word, seen);
        atomic_store(&d->worker_sleeping, 0);
    }
    return NULL;
}

static int
start_worker(Digest *d)
{
    int err = start_signalless_thread(&d->thread, work, d);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    d->owner = getpid();
    d->started = 1;
    return 0;
}

static void
release_slot(Digest *d, uint64_t n)
{
    PyBuffer_Release(&d->slots[n % NSLOTS]);
    if (d->frames[n % NSLOTS].obj != NULL) {
        PyBuffer_Release(&d->frames[n % NSLOTS]);
        PyBuffer_Release(&d->jobs[n % NSLOTS]);
    }
}

/* release the buffers of the regions the worker is done with (the caller, with the GIL) */
static void
release_done(Digest *d)
{
    uint64_t n = atomic_load_explicit(&d->done, memory_order_acquire);
    while (d->released < n)
        release_slot(d, d->released++);
}

static int
check_failed(Digest *d)
{
    if (atomic_load(&d->failed)) {
        PyErr_SetString(PyExc_ValueError, "sha256 update failed in libcrypto");
        return -1;
    }
    return 0;
}

/* wait (without the GIL) until the worker has hashed the regions up to *seq* */
static int
wait_done(Digest *d, uint64_t seq)
{
    if (atomic_load(&d->done) < seq) {
        if (d->joined) {
            PyErr_SetString(PyExc_ValueError, "wait on a digest that was closed");
            return -1;
        }
        if (d->owner != getpid()) {
            PyErr_SetString(PyExc_ValueError, "wait on a digest whose thread is in another "
                                              "process (a fork)");
            return -1;
        }
        wake_worker(d); /* it may sleep with less than WAKE_AT pending */
        /* the reader and the packer's thread (waiting for its frames) may both wait */
        Py_BEGIN_ALLOW_THREADS
        while (atomic_load(&d->done) < seq && !atomic_load(&d->stop)) {
            uint32_t seen = atomic_load(&d->done_word);
            uint64_t at = atomic_load(&d->wake_at);
            while (seq < at && !atomic_compare_exchange_weak(&d->wake_at, &at, seq))
                ;
            if (atomic_load(&d->done) < seq && !atomic_load(&d->stop))
                futex_wait(&d->done_word, seen);
        }
        Py_END_ALLOW_THREADS
        if (atomic_load(&d->done) < seq) {
            PyErr_SetString(PyExc_ValueError, "wait on a digest that was closed");
            return -1;
        }
    }
    release_done(d);
    return check_failed(d);
}

static void
stop_worker(Digest *d)
{
    if (!d->started || d->joined)
        return;
    if (d->owner != getpid()) { /* a fork's child: the thread is not here, never to be joined */
        d->joined = 1;
        return;
    }
    atomic_store(&d->stop, 1);
    wake_worker(d);
    futex_wake(&d->done_word); /* another thread waiting (the packer's) gives up */
    Py_BEGIN_ALLOW_THREADS
    pthread_join(d->thread, NULL);
    Py_END_ALLOW_THREADS
    d->joined = 1;
}

static PyObject *
Digest_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Digest *d;
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Digest() takes no arguments");
        return NULL;
    }
    d = (Digest *)type->tp_alloc(type, 0);
    if (d == NULL)
        return NULL;
    atomic_store(&d->wake_at, UINT64_MAX);
    d->ctx = md_ctx_new();
    if (d->ctx == NULL || digest_init(d->ctx, sha256_md(), NULL) != 1) {
        Py_DECREF(d);
        PyErr_SetString(PyExc_ValueError, "sha256 cannot be set up in libcrypto");
        return NULL;
    }
    return (PyObject *)d;
}

static void
Digest_dealloc(Digest *d)
{
    uint64_t p = atomic_load(&d->published);
    stop_worker(d);
    while (d->released < p)
        release_slot(d, d->released++);
    if (d->ctx != NULL)
        md_ctx_free(d->ctx);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static int free_slot(Digest *d, uint64_t p);
static PyObject *publish(Digest *d, uint64_t p, Py_ssize_t bytes);

static PyObject *
Digest_update(Digest *d, PyObject *region)
{
    uint64_t p = atomic_load_explicit(&d->published, memory_order_relaxed);
    Py_buffer *slot;
    if (d->finished || d->joined) {
        PyErr_SetString(PyExc_ValueError, "update of a digest that was closed");
        return NULL;
    }
    release_done(d);
    if (d->released == p) { /* nothing pending: the worker does not touch the context */
        Py_buffer view;
        if (PyObject_GetBuffer(region, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        if (view.len < INLINE_BELOW) {
            int ok = digest_update(d->ctx, view.buf, (size_t)view.len) == 1;
            PyBuffer_Release(&view);
            if (!ok) {
                atomic_store(&d->failed, 1);
                check_failed(d);
                return NULL;
            }
            return PyLong_FromUnsignedLongLong(p);
        }
        PyBuffer_Release(&view);
    }
    if (free_slot(d, p) < 0)
        return NULL;
    slot = &d->slots[p % NSLOTS];
    if (PyObject_GetBuffer(region, slot, PyBUF_SIMPLE) < 0)
        return NULL;
    return publish(d, p, slot->len);
}

/* wait until slot p is free (the worker is past its previous use) */
static int
free_slot(Digest *d, uint64_t p)
{
    if (p - d->released >= NSLOTS && wait_done(d, p - NSLOTS + 1) < 0)
        return -1;
    return 0;
}

/* hand slot p (filled) to the worker; its number */
static PyObject *
publish(Digest *d, uint64_t p, Py_ssize_t bytes)
{
    if (!d->started && start_worker(d) < 0) {
        release_slot(d, p);
        return NULL;
    }
    atomic_store(&d->published, p + 1);
    if (!atomic_load(&d->worker_sleeping))
        d->unwoken = 0; /* awake: it sees this region without a wake-up */
    else if ((d->unwoken += bytes) >= WAKE_AT || p + 1 - d->released >= NSLOTS / 2)
        wake_worker(d); /* (small regions, from a pipe: before the slots run out) */
    return PyLong_FromUnsignedLongLong(p + 1);
}

/* fill_frames(source, frames, jobs) -> int: jobs that fill frames from source, done by the worker
 * in order with the regions (see the top of the file); returns their number for wait_for, as
 * update does. */
static PyObject *
Digest_fill_frames(Digest *d, PyObject *args)
{
    PyObject *source, *frames, *jobs;
    uint64_t p = atomic_load_explicit(&d->published, memory_order_relaxed);
    const uint64_t *job;
    Py_ssize_t i, n;
    if (!PyArg_ParseTuple(args, "OOO", &source, &frames, &jobs))
        return NULL;
    if (crc_iso == NULL) {
        PyErr_SetString(PyExc_ValueError, "fill_frames: anycrc's CRC is not loaded");
        return NULL;
    }
    if (d->finished || d->joined) {
        PyErr_SetString(PyExc_ValueError, "fill_frames of a digest that was closed");
        return NULL;
    }
    release_done(d);
    if (free_slot(d, p) < 0)
        return NULL;
    if (PyObject_GetBuffer(source, &d->slots[p % NSLOTS], PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(frames, &d->frames[p % NSLOTS], PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&d->slots[p % NSLOTS]);
        return NULL;
    }
    if (PyObject_GetBuffer(jobs, &d->jobs[p % NSLOTS], PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&d->frames[p % NSLOTS]);
        PyBuffer_Release(&d->slots[p % NSLOTS]);
        return NULL;
    }
    job = (const uint64_t *)d->jobs[p % NSLOTS].buf;
    n = d->jobs[p % NSLOTS].len / 24;
    for (i = 0; i < n; i++) {
        uint64_t off = job[3 * i], len = job[3 * i + 1] & ~JOB_KINDS, at = job[3 * i + 2];
        uint64_t kind = job[3 * i + 1] & JOB_KINDS;
        uint64_t wrote = kind == COPY_JOB ? len : kind == ADD_JOB ? 0 : 8;
        if (kind == JOIN_JOB)
            off = len = wrote = 0; /* a CRC and a length: nothing read or written */
        else if (kind != 0 && kind != COPY_JOB && kind != ADD_JOB && kind != END_JOB)
            wrote = UINT64_MAX; /* two kinds at once: refused */
        if (d->jobs[p % NSLOTS].len % 24 || off > (uint64_t)d->slots[p % NSLOTS].len ||
            len > (uint64_t)d->slots[p % NSLOTS].len - off ||
            (uint64_t)d->frames[p % NSLOTS].len < wrote ||
            at > (uint64_t)d->frames[p % NSLOTS].len - wrote) {
            release_slot(d, p);
            PyErr_SetString(PyExc_ValueError, "fill_frames: a job out of its buffers' bounds");
            return NULL;
        }
    }
    return publish(d, p, 0);
}

static PyObject *
Digest_wait_for(Digest *d, PyObject *arg)
{
    unsigned long long seq = PyLong_AsUnsignedLongLong(arg);
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (seq > atomic_load(&d->published)) {
        PyErr_SetString(PyExc_ValueError, "no region has that sequence number yet");
        return NULL;
    }
    if (wait_done(d, seq) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* pending() -> int: the regions and fill_frames slots handed over and not done yet (a caller
 * that finds the worker behind does some of its work itself) */
static PyObject *
Digest_pending(Digest *d, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(atomic_load(&d->published) - atomic_load(&d->done));
}

static PyObject *
Digest_wait(Digest *d, PyObject *Py_UNUSED(ignored))
{
    if (wait_done(d, atomic_load(&d->published)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Digest_hexdigest(Digest *d, PyObject *Py_UNUSED(ignored))
{
    if (!d->finished) {
        unsigned char md[32];
        unsigned int n = 0;
        int i;
        if (d->joined) {
            PyErr_SetString(PyExc_ValueError, "hexdigest of a digest that was closed");
            return NULL;
        }
        if (wait_done(d, atomic_load(&d->published)) < 0)
            return NULL;
        stop_worker(d);
        if (digest_final(d->ctx, md, &n) != 1 || n != sizeof(md)) {
            PyErr_SetString(PyExc_ValueError, "sha256 final failed in libcrypto");
            return NULL;
        }
        for (i = 0; i < 32; i++)
            snprintf(d->hex + 2 * i, 3, "%02x", md[i]);
        d->finished = 1;
    }
    return PyUnicode_FromStringAndSize(d->hex, 64);
}

static PyObject *
Digest_close(Digest *d, PyObject *Py_UNUSED(ignored))
{
    stop_worker(d);
    Py_RETURN_NONE;
}

static PyMethodDef Digest_methods[] = {
    {"update", (PyCFunction)Digest_update, METH_O,
     "Hash a region later, in order; it stays unchanged until wait_for(the number returned)."},
    {"fill_frames", (PyCFunction)Digest_fill_frames, METH_VARARGS,
     "Jobs (offset, length, at: u64 triples) filling frames from source: bit 63 of length: a "
     "copy; 62: add the range to the running CRC-64; 61: write the running CRC-64 (and reset "
     "it); 60: join to the running CRC-64 the CRC-64 in offset of a piece of that length; none: "
     "write the range's CRC-64. Done in order with the regions."},
    {"pending", (PyCFunction)Digest_pending, METH_NOARGS,
     "The regions and fill_frames slots handed over and not done yet."},
    {"wait_for", (PyCFunction)Digest_wait_for, METH_O,
     "Return once the regions up to a number update returned are hashed."},
    {"wait", (PyCFunction)Digest_wait, METH_NOARGS,
     "Return once every region handed over is hashed (they may be reused)."},
    {"hexdigest", (PyCFunction)Digest_hexdigest, METH_NOARGS,
     "The sha256 of everything handed over; stops the worker thread."},
    {"close", (PyCFunction)Digest_close, METH_NOARGS,
     "Stop the worker thread (regions still pending are not hashed)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DigestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "graphdriver._fastdigest.Digest",
    .tp_basicsize = sizeof(Digest),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "sha256 of the regions passed to update, hashed in order by a native thread.",
    .tp_new = Digest_new,
    .tp_dealloc = (destructor)Digest_dealloc,
    .tp_methods = Digest_methods,
};

/* a loaded library whose path holds a name: what to look for, and the handle found */
struct wanted_lib {
    const char *part;
    void *handle;
};

static int
find_loaded(struct dl_phdr_info *info, size_t size, void *data)
{
    struct wanted_lib *want = data;
    (void)size;
    if (info->dlpi_name != NULL && strstr(info->dlpi_name, want->part) != NULL) {
        want->handle = dlopen(info->dlpi_name, RTLD_NOW | RTLD_NOLOAD);
        return want->handle != NULL;
    }
    return 0;
}

/* the handle of a loaded library whose path holds *part* (NULL: none is loaded) */
static void *
loaded_library(const char *part)
{
    struct wanted_lib want = {part, NULL};
    dl_iterate_phdr(find_loaded, &want);
    return want.handle;
}

/* the EVP functions of the libcrypto _hashlib loaded; -1 with ImportError set if there is none */
static int
load_libcrypto(void)
{
    void *lib;
    PyObject *hashlib = PyImport_ImportModule("_hashlib");
    if (hashlib == NULL) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ImportError, "_hashlib (OpenSSL) is not available");
        return -1;
    }
    Py_DECREF(hashlib);
    lib = loaded_library("/libcrypto.so");
    if (lib == NULL) {
        PyErr_SetString(PyExc_ImportError, "no libcrypto is loaded (a static _hashlib?)");
        return -1;
    }
    md_ctx_new = (md_ctx_new_fn)dlsym(lib, "EVP_MD_CTX_new");
    md_ctx_free = (md_ctx_free_fn)dlsym(lib, "EVP_MD_CTX_free");
    sha256_md = (md_fn)dlsym(lib, "EVP_sha256");
    digest_init = (digest_init_fn)dlsym(lib, "EVP_DigestInit_ex");
    digest_update = (digest_update_fn)dlsym(lib, "EVP_DigestUpdate");
    digest_final = (digest_final_fn)dlsym(lib, "EVP_DigestFinal_ex");
    /* the handle stays open: the functions are used for the life of the process */
    if (!md_ctx_new || !md_ctx_free || !sha256_md || !digest_init || !digest_update ||
        !digest_final) {
        PyErr_SetString(PyExc_ImportError, "the loaded libcrypto lacks the EVP API of OpenSSL 1.1+");
        return -1;
    }
    return 0;
}

/* anycrc's CRC-64/GO-ISO where its extension is loaded (archive/crc64.py loads it before the
 * digest); fill_frames is refused otherwise */
static void
load_anycrc(void)
{
    void *lib = loaded_library("/anycrc/crc.");
    crc_params_fn params;
    uint8_t error = 0;
    if (lib == NULL)
        return;
    params = (crc_params_fn)dlsym(lib, "crc_params");
    crc_calc = (crc_calc_fn)dlsym(lib, "crc_calc");
    if (params == NULL || crc_calc == NULL)
        return;
    crc_iso = PyMem_RawMalloc(sizeof(*crc_iso));
    if (crc_iso == NULL)
        return;
    /* Go's ISO table: width 64, poly 0x1b reflected, all ones in and out; its check value */
    *crc_iso = params(64, 0x1b, UINT64_MAX, 1, 1, UINT64_MAX, 0xb90956c775a41001ULL, &error);
    if (error || crc_calc(crc_iso, 0, (const unsigned char *)"123456789", 9) !=
                     0xb90956c775a41001ULL) {
        PyMem_RawFree(crc_iso);
        crc_iso = NULL;
    }
}

static struct PyModuleDef fastdigest_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastdigest",
    .m_doc = "The diffID sha256 hashed by a native thread (optional; see archive/digest.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastdigest(void)
{
    PyObject *m;
    if (load_libcrypto() < 0)
        return NULL;
    load_anycrc();
    fill_shift_by();
    if (PyType_Ready(&DigestType) < 0)
        return NULL;
    m = PyModule_Create(&fastdigest_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "INLINE_BELOW", INLINE_BELOW) < 0 ||
        PyModule_AddIntConstant(m, "CRC", crc_iso != NULL) < 0 ||
        PyModule_AddType(m, &DigestType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
