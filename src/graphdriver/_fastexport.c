/* Optional native helpers of graphdriver's tar writer (archive/export.py, write_tree).
 *
 * list_dir(dir_fd) -> list[bytes]
 *     The names in the directory (without "." and ".."), sorted by byte value: the order
 *     write_tree writes a directory's entries in.
 *
 * emit(buf, pos, out_fd, dir_fd, names, start, prefix, skipped_xattr_prefix, opaque_xattr,
 *      small_file)
 *     -> (pos, index, written, descend)
 *     Writes the entries names[start:] of the directory dir_fd (their tar names are prefix + name)
 *     into the bytearray buf from offset pos on, writing buf out to out_fd whenever it is full, as
 *     long as each entry is of the plain kind: a regular file with one link, a symlink, a fifo,
 *     a device or a directory (not opaque), whose header is one ustar block
 *     (ASCII names of at most 100 bytes, numbers that fit octal), with no exportable xattr.
 *     Sockets and names that vanished since the listing are skipped.  It stops at the first
 *     other entry (a hard link, an xattr to write, a long or non-ASCII name, a file that may have
 *     holes (SPARSE_MIN_HOLES), a whiteout device or
 *     an opaque directory when opaque_xattr is not None, ...) and returns its index, for the Python
 *     writer to handle; index == len(names) when all were written.  It also returns right after
 *     writing a directory's header, with descend true and index just past the directory: its
 *     contents are to be written next.  pos is the new fill level of buf, written the number of
 *     bytes written to out_fd meanwhile.  The bytes are exactly those the Python writer
 *     produces for the same entries.  Files of more than small_file bytes go out with sendfile
 *     (or read/write where it cannot be used); smaller ones are read into buf (small_file + 511
 *     must fit buf).  The GIL is released while it works (the output may be a pipe read by
 *     another Python thread).  Identity id mapping only: the caller checks that.
 *     skipped_xattr_prefix and opaque_xattr come from the store's WhiteoutFormat (whiteout.py):
 *     overlay's own xattrs ("trusted.overlay." or "user.overlay.") and its opaque marker (None
 *     in the naive format, where 0/0 devices are plain devices).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BLOCK 512
#define NAME_MAX_USTAR 100
#define XATTR_LIST 65536
#define MAX7 (1ULL << 21)  /* 8**7 */
#define MAX11 (1ULL << 33) /* 8**11 */

/* ------------------------------------------------------------------------------------------ */
/* list_dir */

static int
cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static PyObject *
list_dir(PyObject *self, PyObject *args)
{
    int dir_fd;
    if (!PyArg_ParseTuple(args, "i:list_dir", &dir_fd))
        return NULL;
    char **names = NULL;
    size_t count = 0, cap = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    int fd = fcntl(dir_fd, F_DUPFD_CLOEXEC, 0);
    DIR *dir = fd < 0 ? NULL : fdopendir(fd);
    if (dir == NULL) {
        err = errno;
        if (fd >= 0)
            close(fd);
    }
    else {
        rewinddir(dir);
        for (;;) {
            errno = 0;
            struct dirent *de = readdir(dir);
            if (de == NULL) {
                err = errno;
                break;
            }
            const char *n = de->d_name;
            if (n[0] == '.' && (n[1] == 0 || (n[1] == '.' && n[2] == 0)))
                continue;
            if (count == cap) {
                size_t ncap = cap ? cap * 2 : 64;
                char **grown = realloc(names, ncap * sizeof(char *));
                if (grown == NULL) {
                    err = ENOMEM;
                    break;
                }
                names = grown;
                cap = ncap;
            }
            names[count] = strdup(n);
            if (names[count] == NULL) {
                err = ENOMEM;
                break;
            }
            count++;
        }
        rewinddir(dir); /* the descriptor is shared with dir_fd: leave its offset at the start */
        closedir(dir);
        if (!err && count > 1)
            qsort(names, count, sizeof(char *), cmp_names);
    }
    Py_END_ALLOW_THREADS
    PyObject *list = NULL;
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    else if ((list = PyList_New((Py_ssize_t)count)) != NULL) {
        for (size_t i = 0; i < count; i++) {
            PyObject *b = PyBytes_FromString(names[i]);
            if (b == NULL) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)i, b);
        }
    }
    for (size_t i = 0; i < count; i++)
        free(names[i]);
    free(names);
    return list;
}

/* ------------------------------------------------------------------------------------------ */
/* emit */

typedef struct {
    char *buf;
    size_t cap;
    size_t pos;
    int fd;
    size_t small_file;
    long long written;
    PyThreadState *ts; /* the saved thread state while the GIL is released */
    int pyerr;         /* a signal handler raised: the exception is pending */
    int out_err;       /* the failure was writing the output (not about an entry) */
} Out;

/* EINTR: run the signal handlers (PEP 475); 0 to retry, -1 if one raised. */
static int
interrupted(Out *o)
{
    PyEval_RestoreThread(o->ts);
    int r = PyErr_CheckSignals();
    o->ts = PyEval_SaveThread();
    if (r < 0) {
        o->pyerr = 1;
        return -1;
    }
    return 0;
}

static int
write_all(Out *o, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(o->fd, p, n);
        if (w < 0) {
            if (errno == EINTR && interrupted(o) == 0)
                continue;
            o->out_err = 1;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        o->written += w;
    }
    return 0;
}

static int
flush(Out *o)
{
    if (o->pos) {
        if (write_all(o, o->buf, o->pos) < 0)
            return -1;
        o->pos = 0;
    }
    return 0;
}

/* Room for n more bytes in the buffer (n <= cap). */
static int
room(Out *o, size_t n)
{
    return o->pos + n > o->cap ? flush(o) : 0;
}

static int
zeros(Out *o, size_t n)
{
    while (n) {
        size_t k = n < o->cap ? n : o->cap;
        if (room(o, k) < 0)
            return -1;
        memset(o->buf + o->pos, 0, k);
        o->pos += k;
        n -= k;
    }
    return 0;
}

static void
octal(char *field, int width, unsigned long long value)
{
    /* width - 1 zero-padded digits and a NUL, as "%0*o\0" */
    field[width - 1] = 0;
    for (int i = width - 2; i >= 0; i--) {
        field[i] = (char)('0' + (value & 7));
        value >>= 3;
    }
}

static void
ustar(char *b, const char *prefix, size_t plen, const char *name, size_t nlen, int slash,
      char typeflag,
      unsigned mode, unsigned long long uid, unsigned long long gid, unsigned long long size,
      unsigned long long mtime, const char *link, size_t llen, unsigned long long major,
      unsigned long long minor)
{
    memset(b, 0, BLOCK);
    memcpy(b, prefix, plen);
    memcpy(b + plen, name, nlen);
    if (slash)
        b[plen + nlen] = '/';
    octal(b + 100, 8, mode & 07777);
    octal(b + 108, 8, uid);
    octal(b + 116, 8, gid);
    octal(b + 124, 12, size);
    octal(b + 136, 12, mtime);
    memset(b + 148, ' ', 8);
    b[156] = typeflag;
    memcpy(b + 157, link, llen);
    memcpy(b + 257, "ustar\0" "00", 8);
    octal(b + 329, 8, major);
    octal(b + 337, 8, minor);
    unsigned sum = 0;
    for (int i = 0; i < BLOCK; i++)
        sum += (unsigned char)b[i];
    snprintf(b + 148, 8, "%06o", sum); /* six digits and a NUL; the space after stays */
}

static int
is_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            return 0;
    return 1;
}

/* export.py's _SPARSE_MIN_HOLES: a file allocated at least this much below its size may be
 * written as a PAX sparse entry, which is Python's to decide. */
#define SPARSE_MIN_HOLES (1ULL << 20)

/* What the whiteout format says (see emit). */
typedef struct {
    const char *skip; /* overlay's own xattr prefix */
    size_t skip_len;
    const char *opaque; /* the opaque marker's xattr name, or NULL: whiteouts are not kept */
} Whiteouts;

/* 1 if every name in the xattr list is one write_tree leaves out, 0 if not.  With
 * opaque_matters (a directory, whiteouts kept), the opaque marker is not left out. */
static int
xattrs_all_skipped(const char *list, ssize_t len, const Whiteouts *w, int opaque_matters)
{
    const char *p = list, *end = list + len;
    while (p < end) {
        size_t n = strnlen(p, (size_t)(end - p));
        if (opaque_matters && w->opaque && strlen(w->opaque) == n && memcmp(p, w->opaque, n) == 0)
            return 0;
        if (!(strncmp(p, w->skip, w->skip_len) == 0 || strncmp(p, "security.selinux", 16) == 0 ||
              strncmp(p, "system.", 7) == 0))
            return 0;
        p += n + 1;
    }
    return 1;
}

/* Copy size bytes of in_fd (then padding) to the output; zeros for what the file lacks. */
static int
file_data(Out *o, int in_fd, unsigned long long size)
{
    size_t pad = (size_t)((BLOCK - size % BLOCK) % BLOCK);
    unsigned long long done = 0;
    if (size <= o->small_file) {
        if (room(o, (size_t)size + pad) < 0)
            return -1;
        while (done < size) {
            ssize_t n = read(in_fd, o->buf + o->pos + done, (size_t)(size - done));
            if (n < 0) {
                if (errno == EINTR && interrupted(o) == 0)
                    continue;
                return -1;
            }
            if (n == 0)
                break;
            done += (unsigned long long)n;
        }
        o->pos += (size_t)done;
        return zeros(o, (size_t)(size - done) + pad);
    }
    if (flush(o) < 0)
        return -1;
    int use_sendfile = 1;
    while (use_sendfile && done < size) {
        off_t off = (off_t)done;
        size_t want = size - done > 0x7ffff000ULL ? 0x7ffff000 : (size_t)(size - done);
        ssize_t n = sendfile(o->fd, in_fd, &off, want);
        if (n < 0) {
            if (errno == EINTR && interrupted(o) == 0)
                continue;
            if (done == 0 && (errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP)) {
                use_sendfile = 0;
                break;
            }
            return -1;
        }
        if (n == 0)
            break;
        done += (unsigned long long)n;
        o->written += n;
    }
    if (!use_sendfile) {
        while (done < size) {
            size_t want = size - done > o->cap ? o->cap : (size_t)(size - done);
            ssize_t n = pread(in_fd, o->buf, want, (off_t)done);
            if (n < 0) {
                if (errno == EINTR && interrupted(o) == 0)
                    continue;
                return -1;
            }
            if (n == 0)
                break;
            if (write_all(o, o->buf, (size_t)n) < 0)
                return -1;
            done += (unsigned long long)n;
        }
    }
    return zeros(o, (size_t)(size - done) + pad);
}

enum { DONE_ENTRY = 0, STOP = 1, DESCEND = 2, FAIL = -1 };

/* One entry: DONE_ENTRY (written or skipped), DESCEND (a directory's header written: its
 * contents come next), STOP (Python's turn) or FAIL (errno). */
static int
one_entry(Out *o, int dir_fd, const char *prefix, size_t plen, const char *name,
          const Whiteouts *w, char *xlist, char *link)
{
    size_t nlen = strlen(name);
    if (plen + nlen > NAME_MAX_USTAR || !is_ascii(name, nlen))
        return STOP;
    struct stat st;
    if (fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return errno == ENOENT ? DONE_ENTRY : FAIL;
    mode_t fmt = st.st_mode & S_IFMT;
    char typeflag;
    switch (fmt) {
    case S_IFSOCK:
        return DONE_ENTRY;
    case S_IFREG:
        typeflag = '0';
        break;
    case S_IFLNK:
        typeflag = '2';
        break;
    case S_IFCHR:
        if (w->opaque && st.st_rdev == 0)
            return STOP; /* a whiteout */
        typeflag = '3';
        break;
    case S_IFBLK:
        typeflag = '4';
        break;
    case S_IFIFO:
        typeflag = '6';
        break;
    case S_IFDIR:
        if (plen + nlen + 1 > NAME_MAX_USTAR)
            return STOP;
        typeflag = '5';
        break;
    default:
        return DONE_ENTRY;
    }
    if (st.st_nlink > 1 && fmt != S_IFDIR)
        return STOP;
    if (st.st_mtim.tv_sec < 0 || (unsigned long long)st.st_mtim.tv_sec >= MAX11 ||
        (unsigned long long)st.st_uid >= MAX7 || (unsigned long long)st.st_gid >= MAX7)
        return STOP;
    unsigned long long size = fmt == S_IFREG ? (unsigned long long)st.st_size : 0;
    if (size >= MAX11)
        return STOP;
    if (size && (unsigned long long)st.st_blocks * 512 + SPARSE_MIN_HOLES <= size)
        return STOP; /* it may have holes enough for a sparse entry: Python looks */
    unsigned long long major = 0, minor = 0;
    if (fmt == S_IFCHR || fmt == S_IFBLK) {
        major = major(st.st_rdev);
        minor = minor(st.st_rdev);
        if (major >= MAX7 || minor >= MAX7)
            return STOP;
    }
    size_t llen = 0;
    if (fmt == S_IFLNK) {
        ssize_t n = readlinkat(dir_fd, name, link, NAME_MAX_USTAR + 1);
        if (n < 0)
            return FAIL;
        if (n > NAME_MAX_USTAR || !is_ascii(link, (size_t)n))
            return STOP;
        llen = (size_t)n;
    }

    int in_fd = -1;
    ssize_t xlen;
    if (size) {
        in_fd = openat(dir_fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (in_fd < 0)
            return FAIL;
        xlen = flistxattr(in_fd, xlist, XATTR_LIST);
    }
    else {
        char path[64 + NAME_MAX_USTAR];
        snprintf(path, sizeof path, "/proc/self/fd/%d/%s", dir_fd, name);
        xlen = llistxattr(path, xlist, XATTR_LIST);
    }
    if (xlen < 0) {
        if (errno == ERANGE)
            goto python; /* a long list: Python reads it */
        if (errno != ENOTSUP && errno != EOPNOTSUPP && errno != ENOENT)
            goto fail;
        xlen = 0;
    }
    if (xlen > 0 && !xattrs_all_skipped(xlist, xlen, w, fmt == S_IFDIR))
        goto python;

    if (room(o, BLOCK) < 0)
        goto fail;
    ustar(o->buf + o->pos, prefix, plen, name, nlen, fmt == S_IFDIR, typeflag, st.st_mode, st.st_uid, st.st_gid,
          size, (unsigned long long)st.st_mtim.tv_sec, link, llen, major, minor);
    o->pos += BLOCK;
    if (in_fd >= 0) {
        if (file_data(o, in_fd, size) < 0)
            goto fail;
        close(in_fd);
    }
    return fmt == S_IFDIR ? DESCEND : DONE_ENTRY;

python:
    if (in_fd >= 0)
        close(in_fd);
    return STOP;
fail:
    if (in_fd >= 0) {
        int e = errno;
        close(in_fd);
        errno = e;
    }
    return FAIL;
}

static PyObject *
emit(PyObject *self, PyObject *args)
{
    Py_buffer buf, prefix;
    Py_ssize_t pos, start, small_file, skip_len;
    int out_fd, dir_fd;
    PyObject *names;
    Whiteouts w;
    if (!PyArg_ParseTuple(args, "w*niiO!ny*s#zn:emit", &buf, &pos, &out_fd, &dir_fd, &PyList_Type,
                          &names, &start, &prefix, &w.skip, &skip_len, &w.opaque, &small_file))
        return NULL;
    w.skip_len = (size_t)skip_len;
    PyObject *result = NULL;
    Py_ssize_t n = PyList_GET_SIZE(names);
    const char **cnames = NULL;
    char *xlist = NULL;
    if (pos < 0 || pos > buf.len || buf.len < BLOCK || start < 0 || small_file < 0 ||
        small_file > buf.len - BLOCK) {
        PyErr_SetString(PyExc_ValueError, "emit: bad buffer position, start index or size");
        goto done;
    }
    if (start > n)
        start = n;
    if (!is_ascii(prefix.buf, (size_t)prefix.len)) {
        /* a non-ASCII directory name: its whole contents needs PAX, Python's part */
        result = Py_BuildValue("nnLi", pos, start, 0LL, 0);
        goto done;
    }
    cnames = PyMem_Malloc(sizeof(char *) * (size_t)(n - start + 1));
    xlist = PyMem_Malloc(XATTR_LIST);
    if (cnames == NULL || xlist == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = start; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(names, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "emit: names must be bytes");
            goto done;
        }
        cnames[i - start] = PyBytes_AS_STRING(item);
    }
    /* The list keeps the bytes alive; they are immutable, so their pointers hold without the GIL. */
    Py_INCREF(names);
    Out o = {buf.buf, (size_t)buf.len, (size_t)pos, out_fd, (size_t)small_file, 0, NULL, 0, 0};
    char link[NAME_MAX_USTAR + 2];
    Py_ssize_t i = start;
    int rc = DONE_ENTRY, err = 0;
    o.ts = PyEval_SaveThread();
    for (; i < n; i++) {
        rc = one_entry(&o, dir_fd, prefix.buf, (size_t)prefix.len, cnames[i - start], &w,
                       xlist, link);
        if (rc == DESCEND) {
            i++;
            break;
        }
        if (rc != DONE_ENTRY) {
            err = errno;
            break;
        }
    }
    PyEval_RestoreThread(o.ts);
    if (rc == FAIL) {
        if (!o.pyerr) {
            errno = err;
            if (o.out_err)
                PyErr_SetFromErrno(PyExc_OSError);
            else
                PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, PyList_GET_ITEM(names, i));
        }
    }
    else {
        result = Py_BuildValue("nnLi", (Py_ssize_t)o.pos, i, o.written, rc == DESCEND);
    }
    Py_DECREF(names);
done:
    PyMem_Free(cnames);
    PyMem_Free(xlist);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&prefix);
    return result;
}

static PyMethodDef methods[] = {
    {"list_dir", list_dir, METH_VARARGS, "Sorted names of a directory given by descriptor."},
    {"emit", emit, METH_VARARGS, "Write a run of plain entries of one directory as tar."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "graphdriver._fastexport", "Native helpers of the tar writer.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__fastexport(void)
{
    return PyModule_Create(&module);
}
