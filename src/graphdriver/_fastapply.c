/* Optional native helpers of graphdriver's tar engine (archive/tarstream.py, archive/apply.py).
 *
 * header(buf, pos, end) parses the header sequence of the next entry of an uncompressed tar when
 * it is of the common kind: at most one local PAX header ("x") whose records are plain (times,
 * path, linkpath, size, uid, gid, uname, gname, SCHILY.xattr.*, any other key kept as text), then
 * one ustar / GNU / v7 header with octal numbers and a valid checksum.  It returns None for
 * anything else (global PAX headers, GNU long names, sparse files, base-256 numbers, an end
 * marker, a bad checksum, too few bytes buffered, ...): the Python parser then reads the same
 * bytes and produces the entry or the precise error.  Nothing is consumed by this function; the
 * caller advances its position by the first element of the returned tuple.
 *
 * The tuple: (consumed, type, size, data_size, mode, uid, gid, mtime_ns, atime_ns|None,
 *             ctime_ns|None, raw_name, name|None, raw_link, linkname, raw_owner, devmajor,
 *             devminor, pax|None, xattrs|None)
 * name is None when the raw name needs the full normalization (clean_name in Python).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 512
#define MAX_META (1 << 20)
#define MAX_ID 0xFFFFFFFFULL
#define MAX_SIZE 0x7FFFFFFFFFFFFFFFULL

/* Octal field: optional leading spaces, digits, then NUL/space to the end. 0 on success. */
static int octal(const unsigned char *f, int n, unsigned long long *out)
{
    int i = 0;
    unsigned long long v = 0;
    int digits = 0;
    while (i < n && f[i] == ' ')
        i++;
    for (; i < n; i++) {
        unsigned char c = f[i];
        if (c >= '0' && c <= '7') {
            if (v >> 60)
                return -1;
            v = (v << 3) | (unsigned long long)(c - '0');
            digits++;
        } else {
            break;
        }
    }
    for (; i < n; i++)
        if (f[i] != 0 && f[i] != ' ')
            return -1;
    (void)digits;
    *out = v;
    return 0;
}

static int checksum_ok(const unsigned char *b)
{
    unsigned long long stored;
    unsigned int sum = 0, field = 0;
    int i, high = 0;
    if (octal(b + 148, 8, &stored) < 0)
        return 0;
    for (i = 0; i < BLOCK; i++) /* vectorizes */
        sum += b[i];
    for (i = 148; i < 156; i++)
        field += b[i];
    sum = sum - field + 8 * ' ';
    if (sum == stored)
        return 1;
    /* the signed sum some old tars wrote: each byte >= 0x80 counts 256 less */
    for (i = 0; i < BLOCK; i++)
        high += (i < 148 || i >= 156) && (b[i] & 0x80);
    return (long long)sum - 256LL * high == (long long)stored;
}

static int is_zero_block(const unsigned char *b)
{
    int i;
    for (i = 0; i < BLOCK; i++)
        if (b[i])
            return 0;
    return 1;
}

/* Plain decimal, at most 30 digits; 0 on success.  Values above 2^63 refuse (Python decides). */
static int decimal(const unsigned char *s, Py_ssize_t n, unsigned long long *out)
{
    unsigned long long v = 0;
    Py_ssize_t i;
    if (n <= 0 || n > 18)
        return -1;
    for (i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (unsigned long long)(s[i] - '0');
    }
    *out = v;
    return 0;
}

/* "<sec>" or "<sec>.<1 to 9 digits>" -> ns; anything else refuses. */
static int pax_time(const unsigned char *s, Py_ssize_t n, long long *out)
{
    const unsigned char *dot = memchr(s, '.', (size_t)n);
    unsigned long long sec, frac = 0;
    if (dot == NULL) {
        if (decimal(s, n, &sec) < 0 || sec > 9000000000ULL)
            return -1;
    } else {
        Py_ssize_t w = dot - s, k = n - w - 1;
        if (k < 1 || k > 9 || decimal(s, w, &sec) < 0 || sec > 9000000000ULL)
            return -1;
        if (decimal(dot + 1, k, &frac) < 0)
            return -1;
        for (; k < 9; k++)
            frac *= 10; /* GNU tar drops trailing zeros of the fraction */
    }
    *out = (long long)(sec * 1000000000ULL + frac);
    return 0;
}

static PyObject *decode(const unsigned char *s, Py_ssize_t n)
{
    return PyUnicode_DecodeUTF8((const char *)s, n, "surrogateescape");
}

/* The fast form of clean_name(): strip one "./" and one trailing "/", when nothing else needs
 * normalizing.  NULL with no error set: the caller returns None for the name. */
static PyObject *fast_name(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i;
    if (n >= 2 && s[0] == '.' && s[1] == '/') {
        s += 2;
        n -= 2;
        if (n == 0)
            return PyUnicode_FromStringAndSize("", 0);
    }
    if (n == 0 || s[0] == '.' || s[0] == '/')
        return NULL;
    for (i = 0; i + 1 < n; i++)
        if (s[i] == '/' && (s[i + 1] == '.' || s[i + 1] == '/'))
            return NULL;
    if (s[n - 1] == '/')
        n--;
    return decode(s, n);
}

#define FAIL_NONE                                                                                  \
    do {                                                                                           \
        goto none;                                                                                 \
    } while (0)

static PyObject *header(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, end;
    const unsigned char *buf, *b;
    unsigned long long size, mode, uid, gid, mtime, devmajor = 0, devminor = 0;
    long long mtime_ns, atime_ns = 0, ctime_ns = 0;
    int have_atime = 0, have_ctime = 0, gnu, ustar;
    Py_ssize_t consumed = 0;
    const unsigned char *pax_path = NULL, *pax_link = NULL;
    Py_ssize_t pax_path_n = 0, pax_link_n = 0;
    int have_pax_size = 0, have_pax_uid = 0, have_pax_gid = 0;
    unsigned long long pax_size = 0, pax_uid = 0, pax_gid = 0;
    PyObject *pax = NULL, *xattrs = NULL, *result = NULL;
    PyObject *raw_name = NULL, *name = NULL, *raw_link = NULL, *link = NULL, *owner = NULL;
    unsigned char typ;
    unsigned long long data_size;
    const unsigned char *nm;
    Py_ssize_t nm_n;
    unsigned char joined[256];

    (void)self;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &pos, &end))
        return NULL;
    if (pos < 0 || end > view.len || pos > end)
        FAIL_NONE;
    buf = (const unsigned char *)view.buf;
    if (end - pos < BLOCK)
        FAIL_NONE;
    b = buf + pos;
    if (!checksum_ok(b))
        FAIL_NONE;
    if (b[156] == 'x') {
        unsigned long long psize, padded;
        const unsigned char *d, *dend;
        if (octal(b + 124, 12, &psize) < 0 || psize > MAX_META)
            FAIL_NONE;
        padded = (psize + BLOCK - 1) & ~(unsigned long long)(BLOCK - 1);
        if ((unsigned long long)(end - pos) < BLOCK + padded + BLOCK)
            FAIL_NONE;
        d = b + BLOCK;
        dend = d + psize;
        pax = PyDict_New();
        if (pax == NULL)
            goto error;
        while (d < dend) {
            const unsigned char *sp, *rec_end, *eq, *key, *val;
            Py_ssize_t len = 0, keyn, valn;
            PyObject *k, *vv;
            int rc;
            if (*d == 0)
                FAIL_NONE;
            sp = d;
            while (sp < dend && sp - d < 18 && *sp >= '0' && *sp <= '9') {
                len = len * 10 + (*sp - '0');
                sp++;
            }
            if (sp == d || sp >= dend || *sp != ' ' || len <= sp - d + 1)
                FAIL_NONE;
            rec_end = d + len;
            if (rec_end > dend || rec_end[-1] != '\n')
                FAIL_NONE;
            key = sp + 1;
            eq = memchr(key, '=', (size_t)(rec_end - 1 - key));
            if (eq == NULL || eq == key)
                FAIL_NONE;
            keyn = eq - key;
            val = eq + 1;
            valn = rec_end - 1 - val;
            d = rec_end;
#define KEY(lit) (keyn == (Py_ssize_t)sizeof(lit) - 1 && memcmp(key, lit, sizeof(lit) - 1) == 0)
            if (KEY("mtime")) {
                long long t;
                if (pax_time(val, valn, &t) < 0)
                    FAIL_NONE;
                /* the value stays in pax too (entry.pax shows every record) */
                (void)t;
            } else if (KEY("atime")) {
                if (pax_time(val, valn, &atime_ns) < 0)
                    FAIL_NONE;
                have_atime = 1;
            } else if (KEY("ctime")) {
                if (pax_time(val, valn, &ctime_ns) < 0)
                    FAIL_NONE;
                have_ctime = 1;
            } else if (KEY("path")) {
                pax_path = val;
                pax_path_n = valn;
            } else if (KEY("linkpath")) {
                pax_link = val;
                pax_link_n = valn;
            } else if (KEY("size")) {
                if (decimal(val, valn, &pax_size) < 0)
                    FAIL_NONE;
                have_pax_size = 1;
            } else if (KEY("uid")) {
                if (decimal(val, valn, &pax_uid) < 0 || pax_uid > MAX_ID)
                    FAIL_NONE;
                have_pax_uid = 1;
            } else if (KEY("gid")) {
                if (decimal(val, valn, &pax_gid) < 0 || pax_gid > MAX_ID)
                    FAIL_NONE;
                have_pax_gid = 1;
            } else if (keyn >= 10 && memcmp(key, "GNU.sparse", 10) == 0) {
                FAIL_NONE;
            } else if (keyn > 13 && memcmp(key, "SCHILY.xattr.", 13) == 0) {
                if (xattrs == NULL && (xattrs = PyDict_New()) == NULL)
                    goto error;
                k = decode(key + 13, keyn - 13);
                vv = PyBytes_FromStringAndSize((const char *)val, valn);
                rc = (k && vv) ? PyDict_SetItem(xattrs, k, vv) : -1;
                Py_XDECREF(k);
                Py_XDECREF(vv);
                if (rc < 0)
                    goto error;
            }
#undef KEY
            k = decode(key, keyn);
            vv = PyBytes_FromStringAndSize((const char *)val, valn);
            rc = (k && vv) ? PyDict_SetItem(pax, k, vv) : -1;
            Py_XDECREF(k);
            Py_XDECREF(vv);
            if (rc < 0)
                goto error;
        }
        consumed = BLOCK + (Py_ssize_t)padded;
        b = buf + pos + consumed;
        if (!checksum_ok(b))
            FAIL_NONE;
    }
    if (is_zero_block(b))
        FAIL_NONE;
    typ = b[156];
    switch (typ) {
    case '0': case '1': case '2': case '3': case '4': case '5': case '6': case '7': case 0:
        break;
    default:
        FAIL_NONE;
    }
    if (octal(b + 124, 12, &size) < 0 || size > MAX_SIZE || octal(b + 100, 8, &mode) < 0 ||
        octal(b + 108, 8, &uid) < 0 || octal(b + 116, 8, &gid) < 0 ||
        octal(b + 136, 12, &mtime) < 0 || mtime > 9000000000ULL)
        FAIL_NONE;
    gnu = memcmp(b + 257, "ustar  \0", 8) == 0;
    ustar = !gnu && memcmp(b + 257, "ustar", 5) == 0;
    if (gnu) {
        int i;
        for (i = 345; i < 369; i++)
            if (b[i])
                FAIL_NONE; /* GNU atime/ctime fields: the Python parser handles them */
    }
    nm = b;
    nm_n = (Py_ssize_t)strnlen((const char *)b, 100);
    if (ustar && b[345]) {
        Py_ssize_t pn = (Py_ssize_t)strnlen((const char *)b + 345, 155);
        memcpy(joined, b + 345, (size_t)pn);
        joined[pn] = '/';
        memcpy(joined + pn + 1, b, (size_t)nm_n);
        nm = joined;
        nm_n = pn + 1 + nm_n;
    }
    if (typ == 0)
        typ = (nm_n > 0 && nm[nm_n - 1] == '/') ? '5' : '0';
    if ((ustar || gnu) && (typ == '3' || typ == '4')) {
        if (octal(b + 329, 8, &devmajor) < 0 || octal(b + 337, 8, &devminor) < 0)
            FAIL_NONE;
    }
    data_size = size;
    if (typ == '1' || typ == '2' || typ == '3' || typ == '4' || typ == '5' || typ == '6') {
        data_size = typ == '5' ? size : 0;
        size = 0;
    }
    if (have_pax_size) {
        if (typ == '1' || typ == '2' || typ == '3' || typ == '4' || typ == '6')
            size = 0;
        else
            data_size = size = pax_size;
    }
    if (have_pax_uid)
        uid = pax_uid;
    if (have_pax_gid)
        gid = pax_gid;
    if (uid > MAX_ID || gid > MAX_ID)
        FAIL_NONE;
    mtime_ns = (long long)mtime * 1000000000LL;
    if (pax != NULL) {
        PyObject *m = PyDict_GetItemString(pax, "mtime");
        if (m != NULL)
            pax_time((const unsigned char *)PyBytes_AS_STRING(m), PyBytes_GET_SIZE(m), &mtime_ns);
    }
    if (pax_path != NULL) {
        nm = pax_path;
        nm_n = pax_path_n;
    }
    raw_name = PyBytes_FromStringAndSize((const char *)nm, nm_n);
    if (raw_name == NULL)
        goto error;
    name = fast_name(nm, nm_n);
    if (name == NULL) {
        if (PyErr_Occurred())
            goto error;
        name = Py_NewRef(Py_None);
    }
    if (pax_link != NULL)
        raw_link = PyBytes_FromStringAndSize((const char *)pax_link, pax_link_n);
    else
        raw_link = PyBytes_FromStringAndSize((const char *)b + 157, (Py_ssize_t)strnlen((const char *)b + 157, 100));
    if (raw_link == NULL)
        goto error;
    link = decode((const unsigned char *)PyBytes_AS_STRING(raw_link), PyBytes_GET_SIZE(raw_link));
    if (link == NULL)
        goto error;
    owner = PyBytes_FromStringAndSize((const char *)b + 265, (ustar || gnu) ? 64 : 0);
    if (owner == NULL)
        goto error;
    consumed += BLOCK;
    {
        char tb = (char)typ;
        result = Py_BuildValue(
            "(ny#KKKKKLNNNNNNNKKNN)", consumed, &tb, (Py_ssize_t)1, size, data_size, mode & 07777,
            uid, gid, mtime_ns, have_atime ? PyLong_FromLongLong(atime_ns) : Py_NewRef(Py_None),
            have_ctime ? PyLong_FromLongLong(ctime_ns) : Py_NewRef(Py_None), raw_name, name,
            raw_link, link, owner, devmajor, devminor, pax ? pax : Py_NewRef(Py_None),
            xattrs ? xattrs : Py_NewRef(Py_None));
    }
    PyBuffer_Release(&view);
    return result;
none:
    Py_XDECREF(pax);
    Py_XDECREF(xattrs);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
error:
    Py_XDECREF(pax);
    Py_XDECREF(xattrs);
    Py_XDECREF(raw_name);
    Py_XDECREF(name);
    Py_XDECREF(raw_link);
    Py_XDECREF(link);
    Py_XDECREF(owner);
    PyBuffer_Release(&view);
    return NULL;
}

/* create_file(dir_fd, name, perm, data, chown, uid, gid, chmod_mode, atime_ns, mtime_ns)
 *
 * One regular file of an apply, as root: openat(O_CREAT|O_EXCL|O_NOFOLLOW), write all of data,
 * fchown (when chown is true), fchmod (when chmod_mode >= 0), futimens, close.  An error of the
 * openat raises OSError (nothing was created); an error after it closes the file and returns
 * (errno, step) so that the caller first records the file as created, then reports.  None when
 * all went well. */
static PyObject *create_file(PyObject *self, PyObject *args)
{
    int dir_fd, do_chown, fd, err = 0;
    unsigned int perm;
    long long uid, gid, chmod_mode, atime_ns, mtime_ns;
    PyObject *name_obj, *name_bytes = NULL;
    Py_buffer data;
    const char *step = NULL;
    const char *p;
    Py_ssize_t left;
    struct timespec ts[2];

    (void)self;
    if (!PyArg_ParseTuple(args, "iOIy*pLLLLL", &dir_fd, &name_obj, &perm, &data, &do_chown, &uid,
                          &gid, &chmod_mode, &atime_ns, &mtime_ns))
        return NULL;
    if (!PyUnicode_FSConverter(name_obj, &name_bytes)) {
        PyBuffer_Release(&data);
        return NULL;
    }
    do {
        fd = openat(dir_fd, PyBytes_AS_STRING(name_bytes),
                    O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, perm & 0777);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name_obj);
        Py_DECREF(name_bytes);
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_DECREF(name_bytes);
    p = (const char *)data.buf;
    left = data.len;
    while (left > 0) {
        ssize_t n = write(fd, p, (size_t)left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            step = "write";
            break;
        }
        p += n;
        left -= n;
    }
    PyBuffer_Release(&data);
    if (!step && do_chown && fchown(fd, (uid_t)uid, (gid_t)gid) < 0) {
        err = errno;
        step = "chown";
    }
    if (!step && chmod_mode >= 0 && fchmod(fd, (mode_t)chmod_mode) < 0) {
        err = errno;
        step = "chmod";
    }
    if (!step) {
        ts[0].tv_sec = (time_t)(atime_ns / 1000000000LL);
        ts[0].tv_nsec = (long)(atime_ns % 1000000000LL);
        if (ts[0].tv_nsec < 0) {
            ts[0].tv_sec -= 1;
            ts[0].tv_nsec += 1000000000L;
        }
        ts[1].tv_sec = (time_t)(mtime_ns / 1000000000LL);
        ts[1].tv_nsec = (long)(mtime_ns % 1000000000LL);
        if (ts[1].tv_nsec < 0) {
            ts[1].tv_sec -= 1;
            ts[1].tv_nsec += 1000000000L;
        }
        if (futimens(fd, ts) < 0) {
            err = errno;
            step = "utime";
        }
    }
    if (close(fd) < 0 && !step && errno != EINTR) {
        err = errno;
        step = "close";
    }
    if (step)
        return Py_BuildValue("(is)", err, step);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"header", header, METH_VARARGS, "Parse the next common-case tar header sequence, or None."},
    {"create_file", create_file, METH_VARARGS, "Create, fill and finish one regular file."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "graphdriver._fastapply", "Native helpers of the tar engine.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastapply(void)
{
    return PyModule_Create(&module);
}
