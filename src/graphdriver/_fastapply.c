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
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_nativethread.h"
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
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

/* The next "<len> <key>=<value>\n" record of a PAX header's data at *d (advanced past it).
 * 0 with key/value set; -1 when the record is malformed (the Python parser says how). */
static int pax_record(const unsigned char **d, const unsigned char *dend,
                      const unsigned char **key, Py_ssize_t *keyn,
                      const unsigned char **val, Py_ssize_t *valn)
{
    const unsigned char *p = *d, *sp = p, *rec_end, *eq;
    Py_ssize_t len = 0;
    if (*p == 0)
        return -1;
    while (sp < dend && sp - p < 18 && *sp >= '0' && *sp <= '9') {
        len = len * 10 + (*sp - '0');
        sp++;
    }
    if (sp == p || sp >= dend || *sp != ' ' || len <= sp - p + 1)
        return -1;
    rec_end = p + len;
    if (rec_end > dend || rec_end[-1] != '\n')
        return -1;
    *key = sp + 1;
    eq = memchr(*key, '=', (size_t)(rec_end - 1 - *key));
    if (eq == NULL || eq == *key)
        return -1;
    *keyn = eq - *key;
    *val = eq + 1;
    *valn = rec_end - 1 - *val;
    *d = rec_end;
    return 0;
}

/* The fields of a ustar / GNU / v7 header block that both parsers read. */
struct plain_header {
    unsigned long long size, mode, uid, gid, mtime, devmajor, devminor;
    int gnu, ustar;
    const unsigned char *name; /* the name field, or *joined* with the ustar prefix */
    Py_ssize_t name_n;
};

/* 0, or -1 for what only the Python parser handles (base-256 or bad numbers, GNU atime/ctime,
 * STAR headers).  Every number field of the block is checked, as Go's reader checks them: the
 * device numbers of a ustar / GNU header whatever its type. */
static int plain_fields(const unsigned char *b, unsigned char joined[256], struct plain_header *h)
{
    int i;
    if (octal(b + 124, 12, &h->size) < 0 || h->size > MAX_SIZE || octal(b + 100, 8, &h->mode) < 0 ||
        octal(b + 108, 8, &h->uid) < 0 || octal(b + 116, 8, &h->gid) < 0 ||
        octal(b + 136, 12, &h->mtime) < 0 || h->mtime > 9000000000ULL)
        return -1;
    h->gnu = memcmp(b + 257, "ustar  \0", 8) == 0;
    h->ustar = memcmp(b + 257, "ustar\0", 6) == 0;
    if (h->ustar && memcmp(b + 508, "tar\0", 4) == 0)
        return -1; /* STAR: another prefix, and times */
    h->devmajor = h->devminor = 0;
    if ((h->gnu || h->ustar) &&
        (octal(b + 329, 8, &h->devmajor) < 0 || octal(b + 337, 8, &h->devminor) < 0))
        return -1;
    if (h->gnu)
        for (i = 345; i < 369; i++)
            if (b[i])
                return -1;
    h->name = b;
    h->name_n = (Py_ssize_t)strnlen((const char *)b, 100);
    if (h->ustar && b[345]) {
        Py_ssize_t pn = (Py_ssize_t)strnlen((const char *)b + 345, 155);
        memcpy(joined, b + 345, (size_t)pn);
        joined[pn] = '/';
        memcpy(joined + pn + 1, b, (size_t)h->name_n);
        h->name = joined;
        h->name_n = pn + 1 + h->name_n;
    }
    return 0;
}

/* A local PAX header's own block: a valid checksum, numbers that parse (Go reads them all) and a
 * data size within MAX_META.  1 when it is so, with its size in *psize. */
static int pax_block_ok(const unsigned char *b, unsigned long long *psize)
{
    unsigned char joined[256];
    struct plain_header ph;
    if (!checksum_ok(b) || plain_fields(b, joined, &ph) < 0 || ph.size > MAX_META)
        return 0;
    *psize = ph.size;
    return 1;
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
    struct plain_header ph;

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
        if (!pax_block_ok(b, &psize))
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
            const unsigned char *key, *val;
            Py_ssize_t keyn, valn;
            PyObject *k, *vv;
            int rc;
            if (pax_record(&d, dend, &key, &keyn, &val, &valn) < 0)
                FAIL_NONE;
#define KEY(lit) (keyn == (Py_ssize_t)sizeof(lit) - 1 && memcmp(key, lit, sizeof(lit) - 1) == 0)
            /* NULs: Go refuses them in keys and in the values of the ustar string fields */
            if (memchr(key, 0, (size_t)keyn) != NULL ||
                ((KEY("path") || KEY("linkpath") || KEY("uname") || KEY("gname")) &&
                 memchr(val, 0, (size_t)valn) != NULL))
                FAIL_NONE;
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
            } else if (KEY("path")) { /* an empty value keeps the header's (Go's mergePAX) */
                pax_path = valn ? val : NULL;
                pax_path_n = valn;
            } else if (KEY("linkpath")) {
                pax_link = valn ? val : NULL;
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
    if (plain_fields(b, joined, &ph) < 0)
        FAIL_NONE;
    size = ph.size;
    mode = ph.mode;
    uid = ph.uid;
    gid = ph.gid;
    mtime = ph.mtime;
    gnu = ph.gnu;
    ustar = ph.ustar;
    devmajor = ph.devmajor;
    devminor = ph.devminor;
    nm = ph.name;
    nm_n = ph.name_n;
    if (pax_path != NULL) {
        nm = pax_path;
        nm_n = pax_path_n;
    }
    if (typ == 0) /* the old regular type: a directory if its final name ends in '/' */
        typ = (nm_n > 0 && nm[nm_n - 1] == '/') ? '5' : '0';
    if (have_pax_size)
        size = pax_size;
    data_size = size;
    if (typ != '0' && typ != '7') /* types whose size carries no data (Go's header-only) */
        data_size = size = 0;
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
            "(ny#KKKKKLNNNNNNNKKNN)", consumed, &tb, (Py_ssize_t)1, size, data_size, mode & 0177777,
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

/* A time in ns since the epoch as a timespec (negative times: tv_nsec stays in [0, 1e9)). */
static void ns_timespec(long long ns, struct timespec *ts)
{
    ts->tv_sec = (time_t)(ns / 1000000000LL);
    ts->tv_nsec = (long)(ns % 1000000000LL);
    if (ts->tv_nsec < 0) {
        ts->tv_sec -= 1;
        ts->tv_nsec += 1000000000L;
    }
}

/* The rest of a regular file after its openat: all of data, fchown (when do_chown), fchmod (when
 * chmod_mode >= 0), futimens, close; fd is closed in every case.  Needs no GIL.  NULL when all
 * went well, else the name of the step that failed, with its errno in *err. */
static const char *finish_file(int fd, const unsigned char *p, size_t left, int do_chown,
                               unsigned long long uid, unsigned long long gid,
                               long long chmod_mode, long long atime_ns, long long mtime_ns,
                               int *err)
{
    const char *step = NULL;
    struct timespec ts[2];
    while (left > 0) {
        ssize_t n = write(fd, p, left > (1U << 30) ? (1U << 30) : left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            step = "write";
            break;
        }
        p += n;
        left -= (size_t)n;
    }
    if (!step && do_chown && fchown(fd, (uid_t)uid, (gid_t)gid) < 0) {
        *err = errno;
        step = "chown";
    }
    if (!step && chmod_mode >= 0 && fchmod(fd, (mode_t)chmod_mode) < 0) {
        *err = errno;
        step = "chmod";
    }
    if (!step) {
        ns_timespec(atime_ns, &ts[0]);
        ns_timespec(mtime_ns, &ts[1]);
        if (futimens(fd, ts) < 0) {
            *err = errno;
            step = "utime";
        }
    }
    if (close(fd) < 0 && !step && errno != EINTR) {
        *err = errno;
        step = "close";
    }
    return step;
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
    Py_BEGIN_ALLOW_THREADS
    step = finish_file(fd, (const unsigned char *)data.buf, (size_t)data.len, do_chown,
                       (unsigned long long)uid, (unsigned long long)gid, chmod_mode, atime_ns,
                       mtime_ns, &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (step)
        return Py_BuildValue("(is)", err, step);
    Py_RETURN_NONE;
}

/* ---- a run of plain entries --------------------------------------------------------------------
 *
 * files(buf, pos, end, dirs, dir_times, links, euid, egid, umask, cache_limit, seg, crc
 *       [, frames, at])
 *
 * Applies, as root onto a target that was empty, the run of entries starting at buf[pos] that are
 * of the plainest kind: one ustar / GNU / v7 header (octal numbers, valid checksum), optionally
 * after a local PAX header of simple records (simple_pax: times, path, linkpath, size, ids,
 * names; no xattrs, no sparse map), with a name that needs no normalization beyond one leading
 * "./" and a directory's trailing '/' (plain_entry_name: no "." / ".." / empty component, a
 * first component not starting with '.' -- AUFS metadata, the apply's scratch directory --, a
 * last one not starting with ".wh." -- whiteouts), in a directory that *dirs* (the applier's
 * cache: logical path -> (fd, real path, setgid)) holds, and of one of these kinds:
 *
 * - a regular file whose data is all buffered: what create_file makes;
 * - a new directory: mkdir, then what _Applier._directory / _dir_meta do for one it created
 *   (fchown when the owner differs or the parent is setgid, fchmod for set-id bits, bits the
 *   umask took or a setgid parent); its fd and real path enter *dirs* as _dir puts them (the
 *   setgid bit its mode says), and its times go (re-inserted last) into *dir_times* for finish;
 *   not while *dirs* holds more than cache_limit entries (the caller evicts, then calls again);
 * - a symlink: symlinkat, lchown as above, utimensat; its real path goes into *links* (the
 *   applier's archive_links);
 * - a hard link whose target is a plain name in a cached directory: linkat (no metadata).
 *
 * The first entry that is not of this kind, or whose create finds something in the way (EEXIST:
 * a directory that exists, a replaced file) or fails at all, stops the run untouched: the Python
 * code takes it from there.  So the loop only ever creates, never removes, renames, truncates or
 * writes through a path that was there: apply.py's _Applier.vouched (the proof that the
 * recorded files need no check after the apply) relies on it, and leaves the flag as it is
 * across a run.  Whatever this loop learns to do over an existing path must end the run there.
 *
 * seg is None (no recorder), or the bytes the recorder still has to get before this run's first
 * header: the tar-split frames of the PipeRecorder (archive/recframes.py) are then built here, in
 * a bytearray, in the order the Python reader makes them (segment, file, and the data's CRC-64
 * when crc is not None and the entry has data).  crc is the reader's crc(data, previous)
 * function, or a bytearray: the header bytes of the segment frames and the CRCs are then left
 * blank, and the jobs that fill them are appended to it, three u64 each -- the offset in buf,
 * the length (bit 63 set: a copy, else the CRC of the range), the offset in the frames -- for
 * _fastdigest's fill_frames (the digest thread copies and checksums what it has just hashed, off
 * the reader's thread).  With frames (a bytearray the caller lends, reused from run to run), the
 * frames are written into it from offset at on, and it is never resized: the run stops before
 * an entry whose frames would not fit (need is then -1: the caller hands the frames on and calls
 * again with room), and the frames element of the result is the offset where they end.
 *
 * Returns (pos, count, size, frames, pad, error, need): pos is just after the last applied
 * entry's data, its padding (pad bytes) not consumed; count the entries applied, size the bytes
 * of the regular files among them; frames is bytes or None; error is None or (errno, step, real
 * path) for the last entry, created but not finished.  need is 0, or -- when the run stopped only
 * because the next entry (its headers and data) is not all buffered -- how many bytes from pos it
 * takes: the caller may buffer them and call again.  (What a run created is not listed: on an
 * empty target everything there is the apply's own.) */

/* The records of a local PAX header that the native loop can apply: times, path, linkpath, size,
 * ids and names (numeric ids are what an apply uses).  -1 for anything else (xattrs, sparse maps,
 * an empty or NUL-holding path or link). */
struct simple_pax {
    const unsigned char *path, *link;
    Py_ssize_t path_n, link_n;
    int have_mtime, have_atime, have_size, have_uid, have_gid;
    long long mtime_ns, atime_ns;
    unsigned long long size, uid, gid;
};

static int simple_pax(const unsigned char *d, const unsigned char *dend, struct simple_pax *px)
{
    memset(px, 0, sizeof(*px));
    while (d < dend) {
        const unsigned char *key, *val;
        Py_ssize_t keyn, valn;
        long long ignored;
        if (pax_record(&d, dend, &key, &keyn, &val, &valn) < 0)
            return -1;
#define KEY(lit) (keyn == (Py_ssize_t)sizeof(lit) - 1 && memcmp(key, lit, sizeof(lit) - 1) == 0)
        if (KEY("mtime")) {
            if (pax_time(val, valn, &px->mtime_ns) < 0)
                return -1;
            px->have_mtime = 1;
        } else if (KEY("atime")) {
            if (pax_time(val, valn, &px->atime_ns) < 0)
                return -1;
            px->have_atime = 1;
        } else if (KEY("ctime")) {
            if (pax_time(val, valn, &ignored) < 0)
                return -1;
        } else if (KEY("path")) {
            if (valn == 0 || memchr(val, 0, (size_t)valn) != NULL)
                return -1;
            px->path = val;
            px->path_n = valn;
        } else if (KEY("linkpath")) {
            if (valn == 0 || memchr(val, 0, (size_t)valn) != NULL)
                return -1;
            px->link = val;
            px->link_n = valn;
        } else if (KEY("size")) {
            if (decimal(val, valn, &px->size) < 0)
                return -1;
            px->have_size = 1;
        } else if (KEY("uid")) {
            if (decimal(val, valn, &px->uid) < 0 || px->uid > MAX_ID)
                return -1;
            px->have_uid = 1;
        } else if (KEY("gid")) {
            if (decimal(val, valn, &px->gid) < 0 || px->gid > MAX_ID)
                return -1;
            px->have_gid = 1;
        } else if (!KEY("uname") && !KEY("gname")) {
            return -1;
        } else if (memchr(val, 0, (size_t)valn) != NULL) {
            return -1; /* a NUL in a user or group name: Go refuses it */
        }
#undef KEY
    }
    return 0;
}

/* A name as the native loop takes it (see files()): on success 0, with *s / *n the clean name
 * (what clean_name gives), *base_at the offset of its last component in it. */
static int plain_entry_name(const unsigned char *nm, Py_ssize_t nm_n, int is_dir,
                            const unsigned char **s, Py_ssize_t *n, Py_ssize_t *base_at)
{
    const unsigned char *p = nm;
    Py_ssize_t len = nm_n, i, comp = 0;
    if (len >= 2 && p[0] == '.' && p[1] == '/') {
        p += 2;
        len -= 2;
    }
    if (is_dir && len > 0 && p[len - 1] == '/')
        len--;
    if (len == 0 || p[0] == '.' || memchr(p, 0, (size_t)len) != NULL)
        return -1;
    for (i = 0; i <= len; i++) {
        if (i < len && p[i] != '/')
            continue;
        if (i == comp || (i - comp == 1 && p[comp] == '.') ||
            (i - comp == 2 && p[comp] == '.' && p[comp + 1] == '.'))
            return -1;
        if (i < len)
            comp = i + 1;
    }
    if (len - comp >= 4 && memcmp(p + comp, ".wh.", 4) == 0)
        return -1;
    *s = p;
    *n = len;
    *base_at = comp;
    return 0;
}

#define FRAME_S 'S'
#define FRAME_F 'F'
#define FRAME_C 'C'

/* the frames files() writes: a bytearray of its own, grown as needed, or one the caller lends,
 * written from an offset on and never resized (files() checks the room before an entry) */
struct frames_out {
    PyObject *ba;
    Py_ssize_t used;
    int lent;
};

/* n more bytes at the end of the frames: data's, or left as they are when data is NULL (a job
 * fills them) */
static int put(struct frames_out *f, const void *data, Py_ssize_t n)
{
    Py_ssize_t have = PyByteArray_GET_SIZE(f->ba);
    if (f->used + n > have) {
        Py_ssize_t want = have * 2;
        if (f->lent) { /* not reached: the room was checked */
            PyErr_SetString(PyExc_BufferError, "files: the lent frames buffer is full");
            return -1;
        }
        if (want < f->used + n)
            want = f->used + n;
        if (PyByteArray_Resize(f->ba, want) < 0)
            return -1;
    }
    if (data != NULL)
        memcpy(PyByteArray_AS_STRING(f->ba) + f->used, data, (size_t)n);
    f->used += n;
    return 0;
}

/* a job's length with this bit: a copy of the range (else: its CRC-64); _fastdigest.c's too */
#define COPY_JOB (1ULL << 63)

/* one job for _fastdigest's fill_frames: (offset in buf, length, offset in the frames) */
static int add_job(PyObject *jobs, Py_ssize_t *n, Py_ssize_t off, uint64_t len, Py_ssize_t at)
{
    uint64_t job[3] = {(uint64_t)off, len, (uint64_t)at};
    if (PyByteArray_Resize(jobs, *n + 24) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(jobs) + *n, job, 24);
    *n += 24;
    return 0;
}

static int put_u32(struct frames_out *f, uint32_t v)
{
    return put(f, &v, 4); /* little-endian hosts: the "<I" of struct */
}

static int put_u64(struct frames_out *f, uint64_t v)
{
    return put(f, &v, 8);
}

/* A cached directory of *dirs*: 1 with its fd, real path (borrowed: *dirs* holds it) and setgid
 * bit; 0 when it is not cached (or the entry is not of the cache's shape); -1 on error. */
static int cached_dir(PyObject *dirs, const unsigned char *s, Py_ssize_t n, PyObject **tuple,
                      int *fd, int *sgid)
{
    PyObject *key = decode(s, n), *hit;
    long v;
    if (key == NULL)
        return -1;
    hit = PyDict_GetItemWithError(dirs, key);
    Py_DECREF(key);
    if (hit == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != 3 || !PyLong_Check(PyTuple_GET_ITEM(hit, 0)) ||
        !PyUnicode_Check(PyTuple_GET_ITEM(hit, 1)))
        return 0;
    v = PyLong_AsLong(PyTuple_GET_ITEM(hit, 0));
    if (v == -1 && PyErr_Occurred())
        return -1;
    *sgid = PyObject_IsTrue(PyTuple_GET_ITEM(hit, 2));
    if (*sgid < 0)
        return -1;
    *fd = (int)v;
    *tuple = hit;
    return 1;
}

/* "<parent real>/<base>" (or base alone under the root). */
static PyObject *real_path(PyObject *parent_real, const unsigned char *base, Py_ssize_t base_n)
{
    PyObject *b = decode(base, base_n), *r;
    if (b == NULL || PyUnicode_GET_LENGTH(parent_real) == 0)
        return b;
    r = PyUnicode_FromFormat("%U/%U", parent_real, b);
    Py_DECREF(b);
    return r;
}

/* A new directory's place in the applier's state: *dirs*[real] = (fd, real, setgid) and
 * *dir_times*[real] = (atime, mtime, None), re-inserted last.  -1 on error. */
static int note_directory(PyObject *dirs, PyObject *dir_times, PyObject *real, int fd, int sgid,
                          long long atime_ns, long long mtime_ns)
{
    PyObject *entry, *times;
    int rc;
    entry = Py_BuildValue("(iOO)", fd, real, sgid ? Py_True : Py_False);
    if (entry == NULL)
        return -1;
    rc = PyDict_SetItem(dirs, real, entry);
    Py_DECREF(entry);
    if (rc < 0)
        return -1;
    rc = PyDict_Contains(dir_times, real);
    if (rc < 0 || (rc && PyDict_DelItem(dir_times, real) < 0))
        return -1;
    times = Py_BuildValue("(LLO)", atime_ns, mtime_ns, Py_None);
    if (times == NULL)
        return -1;
    rc = PyDict_SetItem(dir_times, real, times);
    Py_DECREF(times);
    return rc;
}

/* ---- the file writer -----------------------------------------------------------------------
 *
 * Writer() -> a native thread that finishes the regular files of files()' runs (apply_files in
 * archive/tarstream.py: the reader keeps the part of its buffer a file's data is in unchanged
 * until the writer is past that file, wait_for(handed() after the run); a map stays whole until
 * it goes).  The run still creates each file itself (openat, on the caller's thread: the tree's
 * names, order and errors stay the caller's; but see create_files() below), then hands the rest
 * to the writer -- the data (a range of the run's buffer), fchown, fchmod, futimens, close:
 * finish_file, as the run does it without a writer.  Writing is most of an apply's system time
 * (the filesystem's page allocation and the copy; futimens and close), and a layer of many
 * small files leaves a second core mostly idle (the diffID's thread hashes few bytes per file):
 * there the writing then runs beside the parsing and the creation of the next files.  Where
 * that core is busy (big files: the sha256 is the slower half), the writer falls behind, and
 * the run finishes the files itself whenever the writer has WR_SLOTS files or WR_BYTES of data
 * pending: no side waits for the other.
 *
 * The hand-over is a ring of WR_SLOTS jobs and two counters, as in _fastdigest.c: published (the
 * caller's) and done (the writer's).  The caller wakes a sleeping writer once WR_WAKE_BYTES or
 * WR_WAKE_JOBS wait for it, and at the end of each run; it sleeps (without the GIL) only in
 * wait().  A job keeps a reference to its parent directory's real path (for the error's
 * message), dropped by the caller (it holds the GIL) once the writer is past the job.  The first
 * failure stops the writing: the writer then only closes the files of the jobs after it;
 * check() returns (errno, step, real path) of the failed one (files() made it already: the
 * caller's rollback removes it with the rest), as files() returns its own.  wait() returns once
 * every job is done (and check()'s answer); close() stops the writer (the pending jobs' files
 * closed unwritten) and joins it; a dropped Writer is closed.  The pending files hold WR_SLOTS
 * descriptors at most; a run whose openat finds no descriptor left waits for them and tries
 * again.
 *
 * After create_files(), the runs hand the writer whole files too: the writer then creates the
 * file (openat O_CREAT|O_EXCL|O_NOFOLLOW beneath the run's cached directory, whose fd the caller
 * keeps open until wait() returned) before the rest.  Where a new inode is slow to make (ext4
 * without a journal searches past every inode freed in the last minute, ~0.5 ms a file after a
 * tree was removed) two threads then make them side by side: the run makes the files the writer
 * has no room for.  Only a name nothing of the apply has touched yet goes to the writer: the
 * runs put every name they meet, and the caller (note()) every name it applies itself and
 * their parents, into a Bloom filter; a run that meets a name seen before (or a false positive)
 * first waits until the writer is past its pending files, as it does before a hard link (its
 * target may be one of them), and the caller waits so before each entry it applies itself
 * (wait()).  So everything is made in archive order, and the writer's O_EXCL never meets what
 * the archive put there; what it does meet fails the apply ("create").  The caller turns this on
 * only for an apply onto an empty target, where nothing else is in the way. */
#define WR_SLOTS 128
#define WR_BYTES (2 << 20)
#define WR_WAKE_BYTES (256 << 10)
#define WR_WAKE_JOBS 32
#define WR_NAME 256

struct wr_job {
    const unsigned char *p;
    size_t len;
    unsigned long long uid, gid;
    long long chmod_mode, atime_ns, mtime_ns;
    PyObject *parent_real;
    int fd, do_chown;
    int dir_fd;                  /* fd -1: the writer creates base (NUL-ended) beneath dir_fd */
    mode_t perm;
    Py_ssize_t base_n;
    unsigned char base[WR_NAME];
};

/* The names a writer that creates files has seen (a blocked Bloom filter of the clean paths:
 * 2 MiB, its pages touched as it fills; one word of four bits a name). */
#define WR_SEEN_WORDS (1 << 18)

typedef struct {
    PyObject_HEAD
    struct wr_job jobs[WR_SLOTS];
    uint64_t released;           /* jobs whose references were dropped (caller only) */
    uint64_t bytes_put;          /* data bytes handed over (caller only) */
    uint64_t unwoken_jobs, unwoken_bytes; /* handed over since the writer was last woken */
    PyObject *error;             /* check()'s answer once known (caller only) */
    _Atomic uint64_t published;
    _Atomic uint64_t done;
    _Atomic uint64_t bytes_done;
    _Atomic uint32_t work_word, done_word;
    _Atomic uint32_t worker_sleeping, caller_waiting;
    _Atomic int stop;
    _Atomic int failed;
    int err;                     /* the failure: written by the writer before failed is set */
    const char *step;
    uint64_t failed_at;
    pthread_t thread;
    pid_t owner;
    int started, joined;
    int creates;                 /* create_files() was called: the writer creates files too */
    uint64_t *seen;              /* then: the names seen (WR_SEEN_WORDS words; caller only) */
    uint64_t handed_whole;       /* files handed over to be created too (caller only) */
} Writer;

static uint64_t fnv1a(const unsigned char *s, Py_ssize_t n);

static void *wr_work(void *arg)
{
    Writer *w = (Writer *)arg;
    uint64_t n = atomic_load(&w->done);
#ifdef __GLIBC__
    pthread_setname_np(pthread_self(), "layer-writer");
#endif
    for (;;) {
        uint64_t p = atomic_load_explicit(&w->published, memory_order_acquire);
        if (n < p) {
            struct wr_job *j = &w->jobs[n % WR_SLOTS];
            size_t len = j->len;
            if (atomic_load(&w->stop) || atomic_load_explicit(&w->failed, memory_order_relaxed)) {
                if (j->fd >= 0)
                    close(j->fd);
            } else {
                int err = 0, fd = j->fd;
                const char *step = NULL;
                while (fd < 0) {
                    fd = openat(j->dir_fd, (const char *)j->base,
                                O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, j->perm);
                    if (fd < 0 && errno != EINTR) {
                        err = errno;
                        step = "create";
                        break;
                    }
                }
                if (step == NULL)
                    step = finish_file(fd, j->p, len, j->do_chown, j->uid, j->gid,
                                       j->chmod_mode, j->atime_ns, j->mtime_ns, &err);
                if (step != NULL) {
                    w->err = err;
                    w->step = step;
                    w->failed_at = n;
                    atomic_store_explicit(&w->failed, 1, memory_order_release);
                }
            }
            n++;
            atomic_fetch_add(&w->bytes_done, len);
            /* sequentially consistent, as the caller's flag and its re-check of done in
             * wr_sleep: one of the two sides always sees the other */
            atomic_store(&w->done, n);
            if (atomic_load(&w->caller_waiting))
                futex_wake(&w->done_word);
            continue;
        }
        if (atomic_load(&w->stop))
            break;
        uint32_t seen = atomic_load(&w->work_word);
        atomic_store(&w->worker_sleeping, 1);
        if (atomic_load(&w->published) == n && !atomic_load(&w->stop))
            futex_wait(&w->work_word, seen);
        atomic_store(&w->worker_sleeping, 0);
    }
    return NULL;
}

static void wr_wake(Writer *w)
{
    w->unwoken_jobs = w->unwoken_bytes = 0;
    if (atomic_exchange(&w->worker_sleeping, 0))
        futex_wake(&w->work_word);
}

/* Sleep (the caller, without the GIL) until the writer has done more than *seen_done* jobs or
 * stopped. */
static void wr_sleep(Writer *w, uint64_t seen_done)
{
    uint32_t seen = atomic_load(&w->done_word);
    atomic_store(&w->caller_waiting, 1);
    if (atomic_load(&w->done) == seen_done)
        futex_wait(&w->done_word, seen);
    atomic_store(&w->caller_waiting, 0);
}

/* Drop the references of the jobs the writer is past (with the GIL). */
static void wr_release_done(Writer *w)
{
    uint64_t d = atomic_load_explicit(&w->done, memory_order_acquire);
    if (atomic_load_explicit(&w->failed, memory_order_acquire) && w->error == NULL &&
        w->released <= w->failed_at && w->failed_at < d) {
        struct wr_job *j = &w->jobs[w->failed_at % WR_SLOTS];
        PyObject *real = real_path(j->parent_real, j->base, j->base_n);
        if (real != NULL)
            w->error = Py_BuildValue("(isN)", w->err, w->step, real);
        if (w->error == NULL) { /* no memory for the message: the failure still stands */
            PyErr_Clear();
            w->error = Py_BuildValue("(iss)", w->err, w->step, "?");
        }
    }
    while (w->released < d) {
        Py_CLEAR(w->jobs[w->released % WR_SLOTS].parent_real);
        w->released++;
    }
}

/* Whether the writer takes a file of *len* bytes now (else the run finishes it itself). */
static int wr_has_room(Writer *w, size_t len)
{
    uint64_t pub = atomic_load_explicit(&w->published, memory_order_relaxed);
    uint64_t d = atomic_load_explicit(&w->done, memory_order_acquire);
    if (atomic_load_explicit(&w->failed, memory_order_relaxed) || pub - d >= WR_SLOTS)
        return 0;
    return pub == d || w->bytes_put - atomic_load(&w->bytes_done) + len <= WR_BYTES;
}

/* Hand a created file's rest to the writer (with the GIL; after wr_has_room said yes), or with
 * fd -1 the whole file: the writer then creates base beneath dir_fd with perm first.  -1 with an
 * exception set (its thread could not start): fd is then still the caller's. */
static int wr_put(Writer *w, int fd, int dir_fd, mode_t perm, const unsigned char *p,
                  size_t len, int do_chown, unsigned long long uid, unsigned long long gid,
                  long long chmod_mode, long long atime_ns, long long mtime_ns,
                  PyObject *parent_real, const unsigned char *base, Py_ssize_t base_n)
{
    uint64_t pub = atomic_load_explicit(&w->published, memory_order_relaxed);
    struct wr_job *j;
    if (!w->started) {
        int err = start_signalless_thread(&w->thread, wr_work, w);
        if (err) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        w->owner = getpid();
        w->started = 1;
    }
    wr_release_done(w); /* the slot's previous job is done (wr_has_room): its reference goes */
    j = &w->jobs[pub % WR_SLOTS];
    j->p = p;
    j->len = len;
    j->uid = uid;
    j->gid = gid;
    j->chmod_mode = chmod_mode;
    j->atime_ns = atime_ns;
    j->mtime_ns = mtime_ns;
    j->parent_real = Py_NewRef(parent_real);
    j->fd = fd;
    j->dir_fd = dir_fd;
    j->perm = perm;
    j->do_chown = do_chown;
    j->base_n = base_n;
    memcpy(j->base, base, (size_t)base_n);
    j->base[base_n] = 0;
    if (fd < 0)
        w->handed_whole++;
    w->bytes_put += len;
    atomic_store_explicit(&w->published, pub + 1, memory_order_release);
    w->unwoken_jobs++;
    w->unwoken_bytes += len;
    if (w->unwoken_jobs >= WR_WAKE_JOBS || w->unwoken_bytes >= WR_WAKE_BYTES)
        wr_wake(w);
    return 0;
}

/* Wait (the caller, without the GIL) until the first *seq* jobs handed over are done. */
static void wr_wait_done(Writer *w, uint64_t seq)
{
    if (!w->started || w->joined || w->owner != getpid())
        return;
    wr_wake(w);
    for (;;) {
        uint64_t d = atomic_load_explicit(&w->done, memory_order_acquire);
        if (d >= seq)
            break;
        wr_sleep(w, d);
    }
}

/* Wait (the caller, without the GIL) until every job handed over is done. */
static void wr_drain(Writer *w)
{
    wr_wait_done(w, atomic_load(&w->published));
}

/* Whether *n* bytes at *s* (a clean path) were seen before by a writer that creates files;
 * they are seen from now on.  False positives only (a name taken for seen: the caller then
 * creates the file itself, after the writer's pending files). */
static int wr_seen(Writer *w, const unsigned char *s, Py_ssize_t n)
{
    uint64_t h = fnv1a(s, n), bits, *word;
    /* FNV-1a's high bits mix poorly: fold them (murmur3's finalizer) before taking bits */
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    word = &w->seen[h >> 46]; /* the top 18 bits: WR_SEEN_WORDS */
    bits = (1ULL << (h & 63)) | (1ULL << ((h >> 6) & 63)) | (1ULL << ((h >> 12) & 63)) |
           (1ULL << ((h >> 18) & 63));
    if ((*word & bits) == bits)
        return 1;
    *word |= bits;
    return 0;
}

/* Wait (with the GIL, which it lets go) until the writer is past every job handed over. */
static void wr_settle(Writer *w)
{
    if (atomic_load(&w->published) == atomic_load(&w->done))
        return;
    Py_BEGIN_ALLOW_THREADS
    wr_drain(w);
    Py_END_ALLOW_THREADS
}

static void wr_stop(Writer *w)
{
    if (!w->started || w->joined)
        return;
    if (w->owner != getpid()) { /* a fork's child: the thread is not here */
        w->joined = 1;
        return;
    }
    atomic_store(&w->stop, 1);
    wr_wake(w);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(w->thread, NULL);
    Py_END_ALLOW_THREADS
    w->joined = 1;
}

static PyObject *Writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Writer() takes no arguments");
        return NULL;
    }
    return type->tp_alloc(type, 0);
}

static void Writer_dealloc(Writer *w)
{
    wr_stop(w);
    while (w->released < atomic_load(&w->published)) {
        Py_CLEAR(w->jobs[w->released % WR_SLOTS].parent_real);
        w->released++;
    }
    Py_CLEAR(w->error);
    free(w->seen);
    w->seen = NULL;
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *Writer_check(Writer *w, PyObject *Py_UNUSED(ignored))
{
    wr_release_done(w);
    return Py_NewRef(w->error != NULL ? w->error : Py_None);
}

static PyObject *Writer_wait(Writer *w, PyObject *Py_UNUSED(ignored))
{
    wr_settle(w);
    return Writer_check(w, NULL);
}

static PyObject *Writer_wait_for(Writer *w, PyObject *arg)
{
    unsigned long long seq = PyLong_AsUnsignedLongLong(arg);
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (seq > atomic_load(&w->published)) {
        PyErr_SetString(PyExc_ValueError, "no file has that number yet");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    wr_wait_done(w, seq);
    Py_END_ALLOW_THREADS
    wr_release_done(w);
    Py_RETURN_NONE;
}

static PyObject *Writer_close(Writer *w, PyObject *Py_UNUSED(ignored))
{
    wr_stop(w);
    wr_release_done(w);
    Py_RETURN_NONE;
}

static PyObject *Writer_pending(Writer *w, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(atomic_load(&w->published) - atomic_load(&w->done));
}

static PyObject *Writer_handed(Writer *w, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(atomic_load(&w->published));
}

static PyObject *Writer_handed_whole(Writer *w, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(w->handed_whole);
}

static PyObject *Writer_create_files(Writer *w, PyObject *Py_UNUSED(ignored))
{
    if (!w->creates) {
        w->seen = calloc(WR_SEEN_WORDS, sizeof(uint64_t));
        if (w->seen == NULL)
            return PyErr_NoMemory();
        w->creates = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *Writer_note(Writer *w, PyObject *arg)
{
    const unsigned char *s;
    Py_ssize_t n, i;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "note: the path must be bytes");
        return NULL;
    }
    if (!w->creates)
        Py_RETURN_NONE;
    s = (const unsigned char *)PyBytes_AS_STRING(arg);
    n = PyBytes_GET_SIZE(arg);
    for (i = 1; i <= n; i++)
        if (i == n || s[i] == '/')
            wr_seen(w, s, i);
    Py_RETURN_NONE;
}

static PyMethodDef Writer_methods[] = {
    {"check", (PyCFunction)Writer_check, METH_NOARGS,
     "(errno, step, real path) of the first file that failed, else None."},
    {"wait", (PyCFunction)Writer_wait, METH_NOARGS,
     "Return once every file handed over is finished (check()'s answer)."},
    {"close", (PyCFunction)Writer_close, METH_NOARGS,
     "Stop the thread: files still pending are closed unwritten."},
    {"pending", (PyCFunction)Writer_pending, METH_NOARGS, "Files handed over, not done yet."},
    {"handed", (PyCFunction)Writer_handed, METH_NOARGS, "Files handed over so far."},
    {"wait_for", (PyCFunction)Writer_wait_for, METH_O,
     "Return once the first n files handed over (n: a number handed() gave) are finished."},
    {"create_files", (PyCFunction)Writer_create_files, METH_NOARGS,
     "From now on the runs hand the writer new files to create as well."},
    {"handed_whole", (PyCFunction)Writer_handed_whole, METH_NOARGS,
     "Files handed over so far for the writer to create as well."},
    {"note", (PyCFunction)Writer_note, METH_O,
     "A clean path (bytes) and its parents were made or touched outside the runs."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "graphdriver._fastapply.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A native thread that finishes the regular files of files()' runs.",
    .tp_new = Writer_new,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_methods = Writer_methods,
};

static PyObject *files(PyObject *self, PyObject *args)
{
    Py_buffer view, seg;
    Py_ssize_t pos, end, start, cache_limit;
    PyObject *dirs, *dir_times, *links, *seg_obj, *lent = Py_None, *error = NULL, *result;
    PyObject *writer_obj = Py_None;
    Writer *wr = NULL;
    struct frames_out fo = {NULL, 0, 0};
    PyObject *cur_parent = NULL; /* bytes of the cached parent */
    int cur_fd = -1, cur_sgid = 0, euid, egid, umask_bits;
    PyObject *crcf, *fill_jobs = NULL;
    Py_ssize_t jobs_n = 0;
    PyObject *cur_real = NULL;   /* borrowed from the dirs tuple, kept alive by cur_tuple */
    PyObject *cur_tuple = NULL;
    Py_ssize_t count = 0, last_pad = 0, prev_data_end, need_end = 0, lent_at = 0;
    unsigned long long total = 0;
    const unsigned char *buf;
    int have_seg = 0, full = 0;

    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnO!O!O!iiinOO|OnO", &view, &pos, &end, &PyDict_Type, &dirs,
                          &PyDict_Type, &dir_times, &PySet_Type, &links, &euid, &egid,
                          &umask_bits, &cache_limit, &seg_obj, &crcf, &lent, &lent_at,
                          &writer_obj))
        return NULL;
    if (writer_obj != Py_None) {
        if (!PyObject_TypeCheck(writer_obj, &WriterType)) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_TypeError, "files: writer must be a Writer or None");
            return NULL;
        }
        wr = (Writer *)writer_obj;
    }
    if (pos < 0 || end > view.len || pos > end ||
        (lent != Py_None && (!PyByteArray_Check(lent) || lent_at < 0 ||
                             lent_at > PyByteArray_GET_SIZE(lent)))) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "files: bad buffer bounds");
        return NULL;
    }
    if (PyByteArray_Check(crcf)) {
        fill_jobs = crcf;
        jobs_n = PyByteArray_GET_SIZE(fill_jobs);
    }
    if (seg_obj != Py_None) {
        if (PyObject_GetBuffer(seg_obj, &seg, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        have_seg = 1;
        if (lent != Py_None) {
            fo.ba = Py_NewRef(lent);
            fo.used = lent_at;
            fo.lent = 1;
        } else {
            /* room for the run's headers and padding (what lies between its data) and the
             * frames' own bytes, so that it seldom grows: growing copies it */
            fo.ba = PyByteArray_FromStringAndSize(NULL, (end - pos) / 2 + seg.len + (64 << 10));
            if (fo.ba == NULL)
                goto fail;
        }
    }
    buf = (const unsigned char *)view.buf;
    start = pos;
    prev_data_end = pos;
    for (;;) {
        const unsigned char *b, *nm, *s, *base, *lk;
        unsigned char joined[256], cname[4097], ctarget[4097];
        unsigned long long size, mode, uid, gid, mtime, padded;
        long long mtime_ns, atime_ns, chmod_mode;
        Py_ssize_t nm_n, n, base_n, base_at, lk_n, data_at, hdr_at;
        struct simple_pax px;
        struct plain_header ph;
        int have_pax, is_dir, fd, rc, err = 0, do_chown, tfd = -1, tsgid, seen;
        const char *step = NULL;
        unsigned char typ;
        PyObject *real = NULL, *ttuple = NULL;

        if (end - pos < BLOCK) {
            need_end = pos + BLOCK;
            break;
        }
        b = buf + pos;
        hdr_at = pos;
        have_pax = 0;
        if (b[156] == 'x') {
            /* a local PAX header of the simple kind, then the entry's own header */
            unsigned long long psize, ppadded;
            if (!pax_block_ok(b, &psize))
                break;
            ppadded = (psize + BLOCK - 1) & ~(unsigned long long)(BLOCK - 1);
            if ((unsigned long long)(end - pos) < BLOCK + ppadded + BLOCK) {
                need_end = pos + BLOCK + (Py_ssize_t)ppadded + BLOCK;
                break;
            }
            if (simple_pax(b + BLOCK, b + BLOCK + psize, &px) < 0)
                break;
            have_pax = 1;
            hdr_at = pos + BLOCK + (Py_ssize_t)ppadded;
            b = buf + hdr_at;
        }
        typ = b[156];
        if (typ != '0' && typ != '7' && typ != 0 && typ != '5' && typ != '2' && typ != '1')
            break;
        if (!checksum_ok(b))
            break;
        if (plain_fields(b, joined, &ph) < 0)
            break;
        size = ph.size;
        mode = ph.mode;
        uid = ph.uid;
        gid = ph.gid;
        mtime = ph.mtime;
        mtime_ns = (long long)mtime * 1000000000LL;
        atime_ns = mtime_ns;
        nm = ph.name;
        nm_n = ph.name_n;
        lk = b + 157;
        lk_n = (Py_ssize_t)strnlen((const char *)lk, 100);
        if (have_pax) {
            if (px.have_size)
                size = px.size;
            if (px.have_uid)
                uid = px.uid;
            if (px.have_gid)
                gid = px.gid;
            if (px.have_mtime)
                mtime_ns = px.mtime_ns;
            atime_ns = px.have_atime && px.atime_ns >= mtime_ns ? px.atime_ns : mtime_ns;
            if (px.path != NULL) {
                nm = px.path;
                nm_n = px.path_n;
            }
            if (px.link != NULL) {
                lk = px.link;
                lk_n = px.link_n;
            }
        }
        if (typ == 0) /* the old regular type: a directory if its final name ends in '/' */
            typ = (nm_n > 0 && nm[nm_n - 1] == '/') ? '5' : '0';
        is_dir = typ == '5';
        if (typ != '0' && typ != '7')
            size = 0; /* the types whose size carries no data (Go's header-only) */
        if (uid > MAX_ID || gid > MAX_ID || size > MAX_SIZE)
            break;
        padded = (size + BLOCK - 1) & ~(unsigned long long)(BLOCK - 1);
        if ((unsigned long long)(end - hdr_at - BLOCK) < size) {
            need_end = hdr_at + BLOCK + (Py_ssize_t)size; /* the data is not all buffered */
            break;
        }
        if (plain_entry_name(nm, nm_n, is_dir, &s, &n, &base_at) < 0)
            break;
        base = s + base_at;
        base_n = n - base_at;
        if (base_n >= (Py_ssize_t)sizeof(cname))
            break;
        /* the parent directory, from the cache */
        {
            Py_ssize_t parent_n = base_at ? base_at - 1 : 0;
            if (cur_parent == NULL || PyBytes_GET_SIZE(cur_parent) != parent_n ||
                memcmp(PyBytes_AS_STRING(cur_parent), s, (size_t)parent_n) != 0) {
                PyObject *hit = NULL;
                Py_CLEAR(cur_parent);
                Py_CLEAR(cur_tuple);
                rc = cached_dir(dirs, s, parent_n, &hit, &cur_fd, &cur_sgid);
                if (rc < 0)
                    goto fail;
                if (rc == 0)
                    break;
                cur_real = PyTuple_GET_ITEM(hit, 1);
                cur_tuple = Py_NewRef(hit);
                cur_parent = PyBytes_FromStringAndSize((const char *)s, parent_n);
                if (cur_parent == NULL)
                    goto fail;
            }
        }
        data_at = hdr_at + BLOCK;
        /* a lent frames buffer without room for this entry's frames (segment, file, CRC): the
         * run stops before it is made */
        if (fo.lent && PyByteArray_GET_SIZE(fo.ba) - fo.used <
                           5 + (count == 0 ? seg.len : 0) + (data_at - prev_data_end) + 21 + nm_n + 9) {
            full = 1;
            break;
        }
        memcpy(cname, base, (size_t)base_n);
        cname[base_n] = 0;
        do_chown = uid != (unsigned long long)euid || gid != (unsigned long long)egid || cur_sgid;
        /* a writer that creates files: a name seen before may be one of its pending files,
         * so whatever is done to it waits for them (see the writer's comment) */
        seen = wr != NULL && wr->creates && wr_seen(wr, s, n);
        if (typ == '1') {
            /* a hard link: to a plain name (not the link's own) in a cached directory */
            const unsigned char *ts_;
            Py_ssize_t tn, tbase_at;
            if (plain_entry_name(lk, lk_n, 0, &ts_, &tn, &tbase_at) < 0 ||
                (tn == n && memcmp(ts_, s, (size_t)n) == 0) ||
                tn - tbase_at >= (Py_ssize_t)sizeof(ctarget))
                break;
            rc = cached_dir(dirs, ts_, tbase_at ? tbase_at - 1 : 0, &ttuple, &tfd, &tsgid);
            if (rc < 0)
                goto fail;
            if (rc == 0)
                break;
            memcpy(ctarget, ts_ + tbase_at, (size_t)(tn - tbase_at));
            ctarget[tn - tbase_at] = 0;
            if (wr != NULL && wr->creates)
                wr_settle(wr); /* the target may be a file the writer has yet to create */
            Py_BEGIN_ALLOW_THREADS
            rc = linkat(tfd, (const char *)ctarget, cur_fd, (const char *)cname, 0);
            Py_END_ALLOW_THREADS
            if (rc < 0)
                break; /* in the way, no target, ...: Python redoes it and says why */
        } else if (typ == '2') {
            struct timespec tms[2];
            if (lk_n == 0 || lk_n >= (Py_ssize_t)sizeof(ctarget))
                break;
            memcpy(ctarget, lk, (size_t)lk_n);
            ctarget[lk_n] = 0;
            if (seen)
                wr_settle(wr);
            ns_timespec(atime_ns, &tms[0]);
            ns_timespec(mtime_ns, &tms[1]);
            Py_BEGIN_ALLOW_THREADS
            rc = symlinkat((const char *)ctarget, cur_fd, (const char *)cname);
            if (rc == 0) {
                if (do_chown && fchownat(cur_fd, (const char *)cname, (uid_t)uid, (gid_t)gid,
                                         AT_SYMLINK_NOFOLLOW) < 0) {
                    err = errno;
                    step = "chown";
                } else if (utimensat(cur_fd, (const char *)cname, tms, AT_SYMLINK_NOFOLLOW) < 0) {
                    err = errno;
                    step = "utime";
                }
            }
            Py_END_ALLOW_THREADS
            if (rc < 0)
                break;
            real = real_path(cur_real, base, base_n);
            if (real == NULL || PySet_Add(links, real) < 0)
                goto fail_entry;
        } else if (is_dir) {
            int dfd = -1;
            if (PyDict_GET_SIZE(dirs) > cache_limit)
                break; /* the caller evicts the older half first, as _dir does */
            chmod_mode = (mode & 07000) || (mode & (unsigned long long)umask_bits) || cur_sgid
                             ? (long long)(mode & 07777) : -1;
            if (seen)
                wr_settle(wr);
            Py_BEGIN_ALLOW_THREADS
            rc = mkdirat(cur_fd, (const char *)cname, (mode_t)(mode & 0777));
            if (rc == 0) {
                dfd = openat(cur_fd, (const char *)cname,
                             O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                if (dfd < 0) {
                    err = errno;
                    step = "open";
                } else if (do_chown && fchown(dfd, (uid_t)uid, (gid_t)gid) < 0) {
                    err = errno;
                    step = "chown";
                } else if (chmod_mode >= 0 && fchmod(dfd, (mode_t)chmod_mode) < 0) {
                    err = errno;
                    step = "chmod";
                }
            }
            Py_END_ALLOW_THREADS
            if (rc < 0)
                break; /* EEXIST: a directory to merge into, or something to replace */
            real = real_path(cur_real, base, base_n);
            if (real == NULL || (!step && note_directory(dirs, dir_times, real, dfd,
                                                        (int)(mode & 02000), atime_ns,
                                                        mtime_ns) < 0)) {
                if (dfd >= 0)
                    close(dfd);
                goto fail_entry;
            }
            if (step && dfd >= 0)
                close(dfd);
        } else {
            chmod_mode = (mode & 07000) || (mode & (unsigned long long)umask_bits)
                             ? (long long)(mode & 07777) : -1;
            /* with a writer (that has not failed), the rest of the file is its job; the whole
             * file, for a writer that creates files, when the name is new */
            int to_writer;
            if (seen)
                wr_settle(wr);
            to_writer = wr != NULL && base_n < WR_NAME && wr_has_room(wr, (size_t)size);
            if (to_writer && wr->creates && !seen) {
                if (wr_put(wr, -1, cur_fd, (mode_t)(mode & 0777), buf + data_at, (size_t)size,
                           do_chown, uid, gid, chmod_mode, atime_ns, mtime_ns, cur_real, base,
                           base_n) < 0)
                    goto fail;
            } else {
                Py_BEGIN_ALLOW_THREADS
                for (;;) {
                    fd = openat(cur_fd, (const char *)cname,
                                O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                                (mode_t)(mode & 0777));
                    if (fd >= 0 || errno != EINTR) {
                        /* out of descriptors while the writer holds some: once they are closed */
                        if (fd >= 0 || (errno != EMFILE && errno != ENFILE) || wr == NULL ||
                            atomic_load(&wr->published) == atomic_load(&wr->done))
                            break;
                        wr_drain(wr);
                    }
                }
                if (fd >= 0 && !to_writer)
                    step = finish_file(fd, buf + data_at, (size_t)size, do_chown, uid, gid,
                                       chmod_mode, atime_ns, mtime_ns, &err);
                Py_END_ALLOW_THREADS
                if (fd < 0)
                    break; /* EEXIST (something in the way) or another error: Python redoes it */
                if (to_writer && wr_put(wr, fd, -1, 0, buf + data_at, (size_t)size, do_chown, uid,
                                        gid, chmod_mode, atime_ns, mtime_ns, cur_real, base,
                                        base_n) < 0) {
                    close(fd);
                    goto fail;
                }
            }
        }
        if (step) { /* created but not finished: its real path goes back with the error */
            if (real == NULL && (real = real_path(cur_real, base, base_n)) == NULL)
                goto fail;
            error = Py_BuildValue("(isN)", err, step, real);
            real = NULL;
            if (error == NULL)
                goto fail;
        }
        Py_CLEAR(real);
        if (have_seg) {
            /* segment: what the recorder had pending (the first time) or the previous entry's
             * padding, then this header; the entry; its data's CRC */
            const unsigned char *sfrom = buf + prev_data_end;
            Py_ssize_t sn = data_at - prev_data_end;
            Py_ssize_t pre = count == 0 ? seg.len : 0;
            unsigned char tag = FRAME_S;
            if (put(&fo, &tag, 1) < 0 || put_u32(&fo, (uint32_t)(pre + sn)) < 0)
                goto fail;
            if (pre && put(&fo, seg.buf, pre) < 0)
                goto fail;
            if (fill_jobs != NULL) {
                /* left blank: the digest thread copies the header bytes in (a job) */
                if (add_job(fill_jobs, &jobs_n, prev_data_end, (uint64_t)sn | COPY_JOB, fo.used) < 0 ||
                    put(&fo, NULL, sn) < 0)
                    goto fail;
            } else if (put(&fo, sfrom, sn) < 0) {
                goto fail;
            }
            tag = FRAME_F;
            if (put(&fo, &tag, 1) < 0 || put_u32(&fo, (uint32_t)nm_n) < 0 ||
                put_u64(&fo, (uint64_t)size) < 0 ||
                put_u64(&fo, (uint64_t)-1) < 0 || put(&fo, nm, nm_n) < 0)
                goto fail;
            if (fill_jobs != NULL && size) {
                /* a blank CRC frame, and the job that fills it */
                tag = FRAME_C;
                if (put(&fo, &tag, 1) < 0 ||
                    add_job(fill_jobs, &jobs_n, data_at, size, fo.used) < 0 ||
                    put(&fo, NULL, 8) < 0)
                    goto fail;
            } else if (crcf != Py_None && size) {
                uint64_t c;
                PyObject *mv, *r;
                mv = PyMemoryView_FromMemory((char *)buf + data_at, (Py_ssize_t)size, PyBUF_READ);
                if (mv == NULL)
                    goto fail;
                r = PyObject_CallFunction(crcf, "Oi", mv, 0);
                Py_DECREF(mv);
                if (r == NULL)
                    goto fail;
                c = (uint64_t)PyLong_AsUnsignedLongLong(r);
                Py_DECREF(r);
                if (c == (uint64_t)-1 && PyErr_Occurred())
                    goto fail;
                tag = FRAME_C;
                if (put(&fo, &tag, 1) < 0 || put_u64(&fo, c) < 0)
                    goto fail;
            }
        }
        count++;
        total += size;
        prev_data_end = data_at + (Py_ssize_t)size;
        last_pad = (Py_ssize_t)(padded - size);
        pos = prev_data_end;
        if (error != NULL)
            break;
        /* the next header comes after this entry's padding */
        if (end - pos < last_pad + BLOCK) {
            need_end = pos + last_pad + BLOCK;
            break;
        }
        pos += last_pad;
        continue;
    fail_entry:
        Py_XDECREF(real);
        goto fail;
    }
    if (wr != NULL && (wr->unwoken_jobs || wr->unwoken_bytes))
        wr_wake(wr); /* what is pending goes on while the caller reads the next entry */
    if (count)
        pos = prev_data_end;
    else
        pos = start;
    if (have_seg && !fo.lent && PyByteArray_Resize(fo.ba, fo.used) < 0)
        goto fail;
    result = Py_BuildValue("(nnKNnNn)", pos, count, total,
                           !have_seg ? Py_NewRef(Py_None)
                           : fo.lent ? PyLong_FromSsize_t(fo.used) : Py_NewRef(fo.ba),
                           count ? last_pad : 0, error ? error : Py_NewRef(Py_None),
                           error != NULL ? (Py_ssize_t)0
                           : full ? (Py_ssize_t)-1
                           : need_end > pos ? need_end - pos : (Py_ssize_t)0);
    Py_XDECREF(fo.ba);
    Py_XDECREF(cur_parent);
    Py_XDECREF(cur_tuple);
    if (have_seg)
        PyBuffer_Release(&seg);
    PyBuffer_Release(&view);
    return result;
fail:
    if (wr != NULL && (wr->unwoken_jobs || wr->unwoken_bytes))
        wr_wake(wr);
    Py_XDECREF(fo.ba);
    Py_XDECREF(error);
    Py_XDECREF(cur_parent);
    Py_XDECREF(cur_tuple);
    if (have_seg)
        PyBuffer_Release(&seg);
    PyBuffer_Release(&view);
    return NULL;
}

/* ---- the check of a recorded layer -------------------------------------------------------------
 *
 * verify_files(root_fd, records, linked) -> int
 *
 * records: the regular files with data that tar-split recorded, as TarSplitPacker.file_records
 * holds them (u64 size, u32 name length, the name; native byte order), one after the other.
 * Each must be, beneath root_fd, a regular file of that size reached without any symlink on the
 * way (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS for its directory, then fstatat without
 * following), and no two of them may be the same inode.  Only inodes with more than one link are
 * remembered, in *linked* (a set of dev << 64 | ino, kept by the caller across calls over the
 * records' chunks): two records meet at an inode with one link only through the same path, which
 * the packer's duplicate-path rule refuses before any check.  Returns -1 when all of them are, else the
 * index of the first that is not or whose name needs Python's handling (".", "..", empty base):
 * tarsplit._verify_files then decides (and says why) the slow way.  -2: openat2 is missing.
 *
 * The check runs after the last entry, on the apply's critical path, when the other cores are
 * idle: the records are cut into VF_SHARES runs per CPU it may use (at most VF_THREADS CPUs, at
 * least VF_MIN_RUN records a run), which that many threads take one after the other without the
 * GIL (so that none waits long for another at the end; one openat2 per directory change, one
 * fstatat per file; no Python call), each run's inodes with more than one link kept aside in
 * order; then, holding the GIL again, those are put into *linked* in record order, so the answer
 * is the one a single pass gives. */
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
struct gd_open_how {
    uint64_t flags, mode, resolve;
};

#define VF_THREADS 4
#define VF_SHARES 4
#define VF_MIN_RUN 256

/* an inode with more than one link met at record *index* */
struct vf_inode {
    uint64_t dev, ino;
    Py_ssize_t index;
};

/* one run of records and what its check found */
struct vf_run {
    int root_fd;
    const char *buf;
    Py_ssize_t len;
    Py_ssize_t first;  /* the index of its first record among the call's */
    Py_ssize_t bad;    /* -1: all good; -2: no openat2; else the index of the first not good */
    struct vf_inode *linked;
    size_t n_linked, cap_linked;
    int nomem;
};

/* Checks one run (no Python API: runs without the GIL, in any thread). */
static void vf_check(struct vf_run *r)
{
    int dir_fd = -1, rc;
    Py_ssize_t i, off;
    char cur[4097], path[4097];
    Py_ssize_t cur_n = -1;
    r->bad = -1;
    for (i = r->first, off = 0; off < r->len; i++) {
        const char *name, *base;
        Py_ssize_t name_n, parent_n, base_n;
        uint64_t sz;
        uint32_t len;
        struct stat st;
        if (r->len - off < 12) {
            r->bad = i;
            break;
        }
        memcpy(&sz, r->buf + off, 8);
        memcpy(&len, r->buf + off + 8, 4);
        if ((Py_ssize_t)len > r->len - off - 12) {
            r->bad = i;
            break;
        }
        name = r->buf + off + 12;
        name_n = (Py_ssize_t)len;
        off += 12 + (Py_ssize_t)len;
        while (name_n && *name == '/') {
            name++;
            name_n--;
        }
        if (name_n >= (Py_ssize_t)sizeof(path) || memchr(name, 0, (size_t)name_n) != NULL) {
            r->bad = i;
            break;
        }
        base = memrchr(name, '/', (size_t)name_n);
        base = base ? base + 1 : name;
        base_n = name_n - (base - name);
        parent_n = base == name ? 0 : (base - name) - 1;
        if (base_n == 0 || (base_n == 1 && base[0] == '.') ||
            (base_n == 2 && base[0] == '.' && base[1] == '.')) {
            r->bad = i;
            break;
        }
        if (parent_n != cur_n || memcmp(cur, name, (size_t)parent_n) != 0) {
            struct gd_open_how how;
            if (dir_fd >= 0)
                close(dir_fd);
            dir_fd = -1;
            cur_n = -1;
            memcpy(path, name, (size_t)parent_n);
            path[parent_n] = 0;
            memset(&how, 0, sizeof(how));
            how.flags = O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
            how.resolve = 0x08 | 0x04 | 0x02; /* BENEATH | NO_SYMLINKS | NO_MAGICLINKS */
            do {
                rc = (int)syscall(SYS_openat2, r->root_fd, parent_n ? path : ".", &how,
                                  sizeof(how));
            } while (rc < 0 && (errno == EINTR || errno == EAGAIN));
            if (rc < 0) {
                r->bad = errno == ENOSYS || errno == EPERM ? -2 : i;
                break;
            }
            dir_fd = rc;
            memcpy(cur, name, (size_t)parent_n);
            cur_n = parent_n;
        }
        memcpy(path, base, (size_t)base_n);
        path[base_n] = 0;
        rc = fstatat(dir_fd, path, &st, AT_SYMLINK_NOFOLLOW);
        if (rc < 0 || !S_ISREG(st.st_mode) || (unsigned long long)st.st_size != sz) {
            r->bad = i;
            break;
        }
        if (st.st_nlink < 2)
            continue;
        if (r->n_linked == r->cap_linked) {
            size_t cap = r->cap_linked ? 2 * r->cap_linked : 64;
            struct vf_inode *grown = realloc(r->linked, cap * sizeof(*grown));
            if (grown == NULL) {
                r->nomem = 1;
                break;
            }
            r->linked = grown;
            r->cap_linked = cap;
        }
        r->linked[r->n_linked].dev = (uint64_t)st.st_dev;
        r->linked[r->n_linked].ino = (uint64_t)st.st_ino;
        r->linked[r->n_linked].index = i;
        r->n_linked++;
    }
    if (dir_fd >= 0)
        close(dir_fd);
}

/* the runs of one call, taken by its threads one after the other */
struct vf_pool {
    struct vf_run *runs;
    int n;
    int next;  /* the next run to take (atomic) */
};

static void *vf_work(void *arg)
{
    struct vf_pool *pool = arg;
    int k;
    while ((k = __atomic_fetch_add(&pool->next, 1, __ATOMIC_RELAXED)) < pool->n)
        vf_check(&pool->runs[k]);
    return NULL;
}

/* Whether (dev, ino) was in *linked* already (1), else adds it (0); -1 on error. */
static int linked_insert(PyObject *linked, uint64_t dev, uint64_t ino)
{
    PyObject *hi, *lo, *shift, *key, *sixtyfour;
    int rc;
    hi = PyLong_FromUnsignedLongLong(dev);
    lo = PyLong_FromUnsignedLongLong(ino);
    sixtyfour = PyLong_FromLong(64);
    shift = hi && sixtyfour ? PyNumber_Lshift(hi, sixtyfour) : NULL;
    key = shift && lo ? PyNumber_Or(shift, lo) : NULL;
    Py_XDECREF(hi);
    Py_XDECREF(lo);
    Py_XDECREF(sixtyfour);
    Py_XDECREF(shift);
    if (key == NULL)
        return -1;
    rc = PySet_Contains(linked, key);
    if (rc == 0 && PySet_Add(linked, key) < 0)
        rc = -1;
    Py_DECREF(key);
    return rc;
}

/* Cuts records[0:len] into at most *want* runs of about the same size, at record boundaries
 * (a malformed tail stays in the last run, which reports it); returns how many. */
static int vf_cut(const char *buf, Py_ssize_t len, int want, int root_fd, struct vf_run *runs)
{
    Py_ssize_t off = 0, i = 0, start = 0, first = 0;
    int n = 0;
    while (n < want - 1 && off < len) {
        uint32_t name_len;
        Py_ssize_t goal = len / want * (n + 1);
        while (off < goal && len - off >= 12) {
            memcpy(&name_len, buf + off + 8, 4);
            if ((Py_ssize_t)name_len > len - off - 12)
                break;
            off += 12 + (Py_ssize_t)name_len;
            i++;
        }
        if (off < goal || off >= len)
            break;  /* malformed, or the rest is too short to share */
        runs[n].root_fd = root_fd;
        runs[n].buf = buf + start;
        runs[n].len = off - start;
        runs[n].first = first;
        n++;
        start = off;
        first = i;
    }
    runs[n].root_fd = root_fd;
    runs[n].buf = buf + start;
    runs[n].len = len - start;
    runs[n].first = first;
    return n + 1;
}

static PyObject *verify_files(PyObject *self, PyObject *args)
{
    int root_fd, threads, want, n, k;
    long cpus;
    Py_buffer recs;
    Py_ssize_t bad = -1, approx;
    struct vf_run runs[VF_THREADS * VF_SHARES];
    pthread_t helper[VF_THREADS];
    int started[VF_THREADS];
    struct vf_pool pool;
    PyObject *linked;
    cpu_set_t cpuset;
    (void)self;
    if (!PyArg_ParseTuple(args, "iy*O!", &root_fd, &recs, &PySet_Type, &linked))
        return NULL;
    memset(runs, 0, sizeof(runs));
    /* the CPUs this process may run on (a system call: the confined child has no /sys) */
    cpus = sched_getaffinity(0, sizeof(cpuset), &cpuset) == 0 ? CPU_COUNT(&cpuset) : 1;
    threads = cpus < 1 ? 1 : cpus > VF_THREADS ? VF_THREADS : (int)cpus;
    approx = recs.len / 64; /* records are >= 13 bytes; a typical name is ~50 */
    want = threads * VF_SHARES;
    if (approx / VF_MIN_RUN < want)
        want = approx / VF_MIN_RUN < 1 ? 1 : (int)(approx / VF_MIN_RUN);
    n = vf_cut((const char *)recs.buf, recs.len, want, root_fd, runs);
    if (threads > n)
        threads = n;
    pool.runs = runs;
    pool.n = n;
    pool.next = 0;
    Py_BEGIN_ALLOW_THREADS
    for (k = 1; k < threads; k++)
        started[k] = start_signalless_thread(&helper[k], vf_work, &pool) == 0;
    vf_work(&pool);  /* when it returns every run is taken; the helpers finish theirs */
    for (k = 1; k < threads; k++)
        if (started[k])
            pthread_join(helper[k], NULL);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&recs);
    for (k = 0; k < n; k++) {
        if (runs[k].nomem) {
            for (k = 0; k < n; k++)
                free(runs[k].linked);
            return PyErr_NoMemory();
        }
    }
    /* the first run that stopped decides (runs are in record order; -2 is openat2 missing) */
    for (k = 0; k < n && bad == -1; k++)
        bad = runs[k].bad;
    /* the inodes with more than one link, in record order, up to the first bad record */
    for (k = 0; k < n && bad != -2; k++) {
        size_t j;
        for (j = 0; j < runs[k].n_linked; j++) {
            struct vf_inode *e = &runs[k].linked[j];
            int rc;
            if (bad >= 0 && e->index >= bad)
                break;
            rc = linked_insert(linked, e->dev, e->ino);
            if (rc < 0) {
                for (k = 0; k < n; k++)
                    free(runs[k].linked);
                return NULL;
            }
            if (rc) {
                bad = e->index;
                break;
            }
        }
        if (bad >= 0 && (k + 1 >= n || runs[k + 1].first >= bad))
            break;
    }
    for (k = 0; k < n; k++)
        free(runs[k].linked);
    return PyLong_FromSsize_t(bad);
}

/* ---- tar-split lines from the apply child's recorder frames -------------------------------------
 *
 * pack_frames(buf, start, end, position, seen, files) -> (consumed, lines, position, described,
 *                                                          missing)
 *
 * lines is a read-only memoryview of this thread's buffer: valid until the thread's next call.
 *
 * The frames (archive/isolate.py: S segment, F file, C crc) between start and end, turned into
 * tar-split JSON lines exactly as TarSplitPacker's segment/file/file_done calls write them, for
 * the common case only: a file name that is printable ASCII without '"', '\\', '<', '>', '&',
 * already clean after a leading "./" (relative, no empty, "." or ".." component, no trailing
 * '/') (the hash of its clean form is appended to *seen*, see first_duplicate; *records* gets
 * a record -- size, name length, name -- of each file with data).  It stops before the first frame it does not handle this way -- and before a file whose
 * CRC frame is not buffered yet -- and the Python packer takes that frame.  Call it only when the
 * packer has no file waiting for its CRC. */
static const char b64chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
/* the two characters of every 12-bit value (filled once, at the module's import): base64 of
 * the tar-split payloads, two lookups per 3 bytes */
static char b64pairs[4096][2];

/* ---- the duplicate-path rule ------------------------------------------------------------------
 *
 * The packer keeps the 64-bit FNV-1a hash of every clean path, in archive order, in a bytearray
 * (8 bytes a path, grown in place: no table, no second copy while it grows); when the recording
 * ends, first_duplicate sorts them and looks for two alike.  A collision (~1e-8 for a million
 * paths) only costs a false "appears twice", i.e. a layer diffed without its tar-split metadata. */
static uint64_t fnv1a(const unsigned char *s, Py_ssize_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* path_hash(key) -> int: the hash the duplicate-path rule keeps of a clean path. */
static PyObject *path_hash(PyObject *self, PyObject *args)
{
    Py_buffer key;
    uint64_t h;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*", &key))
        return NULL;
    h = fnv1a((const unsigned char *)key.buf, key.len);
    PyBuffer_Release(&key);
    return PyLong_FromUnsignedLongLong(h);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x, y;
    memcpy(&x, a, 8);
    memcpy(&y, b, 8);
    return x < y ? -1 : x > y;
}

/* Sorts v[0:n] in place: a radix sort, a byte at a time from the lowest (the hashes are spread
 * evenly: ~1 ms for 100k where qsort took ~10, at the end of an apply), through a scratch copy;
 * qsort when there is no memory for that copy.  A byte all the values share is skipped. */
static void sort_u64(uint64_t *v, size_t n)
{
    size_t (*count)[256], i;
    uint64_t *tmp, *src = v, *dst;
    int b;
    if (n < 256) {
        qsort(v, n, 8, cmp_u64);
        return;
    }
    tmp = malloc(n * 8);
    count = calloc(8, sizeof(*count));
    if (tmp == NULL || count == NULL) {
        free(tmp);
        free(count);
        qsort(v, n, 8, cmp_u64);
        return;
    }
    dst = tmp;
    for (i = 0; i < n; i++)
        for (b = 0; b < 8; b++)
            count[b][(v[i] >> (8 * b)) & 0xFF]++;
    for (b = 0; b < 8; b++) {
        size_t pos = 0, c, k;
        uint64_t *swap;
        if (count[b][(v[0] >> (8 * b)) & 0xFF] == n)
            continue;  /* every value has this byte: already in order by it */
        for (k = 0; k < 256; k++) {
            c = count[b][k];
            count[b][k] = pos;
            pos += c;
        }
        for (i = 0; i < n; i++)
            dst[count[b][(src[i] >> (8 * b)) & 0xFF]++] = src[i];
        swap = src;
        src = dst;
        dst = swap;
    }
    if (src != v)
        memcpy(v, src, n * 8);
    free(tmp);
    free(count);
}

/* first_duplicate(hashes) -> int | None: sorts the hashes (in place) and returns one that occurs
 * twice, or None. */
static PyObject *first_duplicate(PyObject *self, PyObject *args)
{
    PyObject *hashes;
    size_t n, i;
    uint64_t *v;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!", &PyByteArray_Type, &hashes))
        return NULL;
    n = (size_t)PyByteArray_GET_SIZE(hashes) / 8;
    v = (uint64_t *)(void *)PyByteArray_AS_STRING(hashes);
    Py_BEGIN_ALLOW_THREADS
    sort_u64(v, n);
    Py_END_ALLOW_THREADS
    for (i = 1; i < n; i++)
        if (v[i] == v[i - 1])
            return PyLong_FromUnsignedLongLong(v[i]);
    Py_RETURN_NONE;
}

/* first_duplicate_runs(fd, sizes, hashes) -> int | None: one u64 that occurs twice among the
 * sorted runs spilled one after the other to *fd* (their sizes in bytes, in order) and the
 * hashes still in memory (a bytearray, sorted here in place), or None.  The runs are merged
 * through a heap, RUN_READ bytes of each read at a time, without the GIL: memory is the runs'
 * buffers, not the hashes.  EOFError: the file is shorter than *sizes* says. */
#define RUN_READ (64 << 10)
struct hrun {
    uint64_t *buf;
    size_t have, at;   /* values in buf, the next one's index */
    off_t off, end;    /* the part of the file still to read */
};

/* The next value of run *r* into *out* (1), 0 at its end, -1 on a read error (errno set) or a
 * short file (errno 0). */
static int hrun_next(int fd, struct hrun *r, uint64_t *out)
{
    if (r->at == r->have) {
        size_t want = (size_t)(r->end - r->off);
        ssize_t got;
        if (want == 0)
            return 0;
        if (want > RUN_READ)
            want = RUN_READ;
        do {
            got = pread(fd, r->buf, want, r->off);
        } while (got < 0 && errno == EINTR);
        if (got <= 0 || got % 8) {
            if (got >= 0)
                errno = 0;
            return -1;
        }
        r->off += got;
        r->have = (size_t)got / 8;
        r->at = 0;
    }
    *out = r->buf[r->at++];
    return 1;
}

static PyObject *first_duplicate_runs(PyObject *self, PyObject *args)
{
    int fd, failed = 0, found = 0;
    PyObject *sizes, *hashes, *seq;
    Py_buffer tail;
    Py_ssize_t k, nruns;
    struct hrun *runs;
    uint64_t *head;  /* heap of (value, run) pairs, by value */
    size_t *who, n = 0;
    uint64_t dup = 0, prev = 0;
    int have_prev = 0;
    off_t off = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "iOO!", &fd, &sizes, &PyByteArray_Type, &hashes))
        return NULL;
    seq = PySequence_Fast(sizes, "sizes must be a sequence");
    if (seq == NULL)
        return NULL;
    nruns = PySequence_Fast_GET_SIZE(seq);
    runs = PyMem_Calloc((size_t)nruns + 1, sizeof(*runs));
    head = PyMem_Calloc((size_t)nruns + 1, sizeof(*head));
    who = PyMem_Calloc((size_t)nruns + 1, sizeof(*who));
    if (runs == NULL || head == NULL || who == NULL) {
        Py_DECREF(seq);
        PyMem_Free(runs);
        PyMem_Free(head);
        PyMem_Free(who);
        return PyErr_NoMemory();
    }
    for (k = 0; k < nruns; k++) {
        long long size = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, k));
        if (size < 0 || size % 8) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a run's size is not a whole number of u64s");
            failed = 1;
            break;
        }
        runs[k].off = off;
        runs[k].end = off + (off_t)size;
        off += (off_t)size;
        runs[k].buf = PyMem_Malloc(RUN_READ);
        if (runs[k].buf == NULL) {
            PyErr_NoMemory();
            failed = 1;
            break;
        }
    }
    Py_DECREF(seq);
    if (!failed && PyObject_GetBuffer(hashes, &tail, PyBUF_WRITABLE) < 0)
        failed = 1;
    if (failed) {
        for (k = 0; k < nruns; k++)
            PyMem_Free(runs[k].buf);
        PyMem_Free(runs);
        PyMem_Free(head);
        PyMem_Free(who);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    /* the hashes in memory: one more run, sorted in place, "read" from memory */
    sort_u64((uint64_t *)tail.buf, (size_t)tail.len / 8);
    runs[nruns].buf = (uint64_t *)tail.buf;
    runs[nruns].have = (size_t)tail.len / 8;
    /* fill the heap with each run's first value, then pop the least, push its run's next */
    for (k = 0; k <= nruns && !failed; k++) {
        uint64_t v;
        int rc = hrun_next(fd, &runs[k], &v);
        if (rc < 0)
            failed = errno ? errno : -1;
        else if (rc) {
            size_t at = n++;
            while (at && head[(at - 1) / 2] > v) {
                head[at] = head[(at - 1) / 2];
                who[at] = who[(at - 1) / 2];
                at = (at - 1) / 2;
            }
            head[at] = v;
            who[at] = (size_t)k;
        }
    }
    while (n && !failed) {
        uint64_t v = head[0], next;
        size_t r = who[0], at = 0;
        int rc;
        if (have_prev && v == prev) {
            dup = v;
            found = 1;
            break;
        }
        prev = v;
        have_prev = 1;
        rc = hrun_next(fd, &runs[r], &next);
        if (rc < 0) {
            failed = errno ? errno : -1;
            break;
        }
        if (!rc) {  /* the run is done: the heap's last pair sifts down from the top */
            n--;
            next = head[n];
            r = who[n];
        }
        for (;;) {
            size_t child = 2 * at + 1;
            if (child >= n)
                break;
            if (child + 1 < n && head[child + 1] < head[child])
                child++;
            if (head[child] >= next)
                break;
            head[at] = head[child];
            who[at] = who[child];
            at = child;
        }
        if (n) {
            head[at] = next;
            who[at] = r;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&tail);
    for (k = 0; k < nruns; k++)
        PyMem_Free(runs[k].buf);
    PyMem_Free(runs);
    PyMem_Free(head);
    PyMem_Free(who);
    if (failed == -1) {
        PyErr_SetString(PyExc_EOFError, "a spilled run is short");
        return NULL;
    }
    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (found)
        return PyLong_FromUnsignedLongLong(dup);
    Py_RETURN_NONE;
}

/* Printable ASCII that Go's JSON encoder writes as it is, and already what filepath.Clean gives:
 * relative, no empty, "." or ".." component, no trailing '/'. */
static int plain_clean_name(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i, comp = 0;
    if (n == 0 || s[0] == '/' || s[n - 1] == '/')
        return 0;
    for (i = 0; i <= n; i++) {
        unsigned char c = i < n ? s[i] : '/';
        if (c == '/') {
            Py_ssize_t len = i - comp;
            if (len == 0 || (len == 1 && s[comp] == '.') ||
                (len == 2 && s[comp] == '.' && s[comp + 1] == '.'))
                return 0;
            comp = i + 1;
            continue;
        }
        if (c < 0x20 || c > 0x7E || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&')
            return 0;
    }
    return 1;
}

/* A growing C buffer: pack_frames fills these without the GIL. */
struct cbuf {
    char *p;
    size_t used, cap;
};

/* Room for *n* more bytes; -1 when memory is short. */
static int cb_reserve(struct cbuf *b, size_t n)
{
    size_t want = b->cap ? b->cap * 2 : 4096;
    char *q;
    if (b->used + n <= b->cap)
        return 0;
    while (want < b->used + n)
        want *= 2;
    q = realloc(b->p, want);
    if (q == NULL)
        return -1;
    b->p = q;
    b->cap = want;
    return 0;
}

static int cb_put(struct cbuf *b, const void *data, size_t n)
{
    if (cb_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->used, data, n);
    b->used += n;
    return 0;
}

static int cb_str(struct cbuf *b, const char *s)
{
    return cb_put(b, s, strlen(s));
}

static int cb_num(struct cbuf *b, unsigned long long v)
{
    char tmp[24], *d = tmp + sizeof(tmp);
    do { /* (snprintf cost a tenth of the packer's thread: a number on every line) */
        *--d = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return cb_put(b, d, (size_t)(tmp + sizeof(tmp) - d));
}

static int cb_b64(struct cbuf *b, const unsigned char *p, size_t n)
{
    size_t need = (n + 2) / 3 * 4, i;
    char *d;
    if (cb_reserve(b, need) < 0)
        return -1;
    d = b->p + b->used;
    /* 6 bytes at a time from one 8-byte load (its top 48 bits, big-endian): 4 pairs */
    for (i = 0; i + 8 <= n; i += 6) {
        uint64_t v;
        memcpy(&v, p + i, 8);
        v = __builtin_bswap64(v);
        memcpy(d, b64pairs[v >> 52], 2);
        memcpy(d + 2, b64pairs[(v >> 40) & 0xFFF], 2);
        memcpy(d + 4, b64pairs[(v >> 28) & 0xFFF], 2);
        memcpy(d + 6, b64pairs[(v >> 16) & 0xFFF], 2);
        d += 8;
    }
    for (; i + 3 <= n; i += 3) {
        unsigned v = ((unsigned)p[i] << 16) | ((unsigned)p[i + 1] << 8) | p[i + 2];
        memcpy(d, b64pairs[v >> 12], 2);
        memcpy(d + 2, b64pairs[v & 0xFFF], 2);
        d += 4;
    }
    if (n - i == 1) {
        unsigned v = (unsigned)p[i] << 16;
        *d++ = b64chars[v >> 18];
        *d++ = b64chars[(v >> 12) & 63];
        *d++ = '=';
        *d++ = '=';
    } else if (n - i == 2) {
        unsigned v = ((unsigned)p[i] << 16) | ((unsigned)p[i + 1] << 8);
        *d++ = b64chars[v >> 18];
        *d++ = b64chars[(v >> 12) & 63];
        *d++ = b64chars[(v >> 6) & 63];
        *d++ = '=';
    }
    b->used += need;
    return 0;
}

static int append_bytearray(PyObject *ba, const struct cbuf *b)
{
    Py_ssize_t at = PyByteArray_GET_SIZE(ba);
    if (!b->used)
        return 0;
    if (PyByteArray_Resize(ba, at + (Py_ssize_t)b->used) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(ba) + at, b->p, b->used);
    return 0;
}

/* The loop of pack_frames, on C buffers only: runs without the GIL.  Returns where it stopped;
 * *oom is set when an allocation failed. */
static Py_ssize_t pack_loop(const unsigned char *buf, Py_ssize_t start, Py_ssize_t end,
                            unsigned long long *position, unsigned long long *described,
                            unsigned long long *missing, struct cbuf *lines,
                            struct cbuf *hashes, struct cbuf *records, int *oom)
{
    Py_ssize_t p = start;
    while (p < end) {
        unsigned char kind = buf[p];
        if (kind == 'S') {
            uint32_t n;
            if (end - p < 5)
                break;
            memcpy(&n, buf + p + 1, 4);
            if ((Py_ssize_t)n > end - p - 5)
                break;
            if (n) {
                if (cb_str(lines, "{\"type\":2,\"payload\":\"") < 0 ||
                    cb_b64(lines, buf + p + 5, n) < 0 ||
                    cb_str(lines, "\",\"position\":") < 0 || cb_num(lines, *position) < 0 ||
                    cb_str(lines, "}\n") < 0)
                    goto oom;
                (*position)++;
                *described += n;
            }
            p += 5 + (Py_ssize_t)n;
        } else if (kind == 'F') {
            uint32_t name_n, key_off;
            uint64_t size, crc_value = 0, h;
            int64_t crc;
            Py_ssize_t total, after, key_n;
            const unsigned char *name;
            int have_crc = 0;
            if (end - p < 21)
                break;
            memcpy(&name_n, buf + p + 1, 4);
            memcpy(&size, buf + p + 5, 8);
            memcpy(&crc, buf + p + 13, 8);
            total = 21 + (Py_ssize_t)name_n;
            if (total > end - p)
                break;
            name = buf + p + 21;
            /* the duplicate key is Go's filepath.Clean of the name: a leading "./" goes */
            key_off = name_n > 2 && name[0] == '.' && name[1] == '/' ? 2 : 0;
            key_n = (Py_ssize_t)name_n - key_off;
            if (key_n > 1 && name[name_n - 1] == '/') /* a directory's trailing '/' goes too */
                key_n--;
            if (!plain_clean_name(name + key_off, key_n) || size > MAX_SIZE)
                break;
            after = p + total;
            if (crc >= 0) {
                have_crc = 1;
                crc_value = (uint64_t)crc;
            } else if (size > 0) {
                /* the CRC comes in the next frame: it must be here already */
                if (end - after < 9)
                    break;
                if (buf[after] == 'C') {
                    memcpy(&crc_value, buf + after + 1, 8);
                    have_crc = 1;
                    after += 9;
                }
            }
            h = fnv1a(name + key_off, key_n);
            if (cb_put(hashes, &h, 8) < 0)
                goto oom;
            if (size > 0) { /* a record for the check after the apply: size, name length, name */
                if (cb_put(records, &size, 8) < 0 || cb_put(records, &name_n, 4) < 0 ||
                    cb_put(records, name, name_n) < 0)
                    goto oom;
            }
            *described += size;
            if (cb_str(lines, "{\"type\":1,\"name\":\"") < 0 || cb_put(lines, name, name_n) < 0 ||
                cb_str(lines, "\"") < 0)
                goto oom;
            if (size && (cb_str(lines, ",\"size\":") < 0 || cb_num(lines, size) < 0))
                goto oom;
            if (have_crc && size > 0) { /* an empty file's payload is null, CRC or not */
                unsigned char be[8];
                int k;
                for (k = 0; k < 8; k++)
                    be[k] = (unsigned char)(crc_value >> (56 - 8 * k));
                if (cb_str(lines, ",\"payload\":\"") < 0 || cb_b64(lines, be, 8) < 0 ||
                    cb_str(lines, "\"") < 0)
                    goto oom;
            } else {
                if (cb_str(lines, ",\"payload\":null") < 0)
                    goto oom;
                if (size > 0)
                    (*missing)++;
            }
            if (cb_str(lines, ",\"position\":") < 0 || cb_num(lines, *position) < 0 ||
                cb_str(lines, "}\n") < 0)
                goto oom;
            (*position)++;
            p = after;
        } else if (kind == 'C') {
            /* a CRC with no file waiting for it: the packer ignores it */
            if (end - p < 9)
                break;
            p += 9;
        } else {
            break; /* corrupt: the Python side reports it */
        }
    }
    return p;
oom:
    *oom = 1;
    return p;
}

/* pack_frames' lines, one buffer per thread (the packer's), never freed */
static _Thread_local struct cbuf lines_scratch;

static PyObject *pack_frames(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, end, p;
    unsigned long long position, described = 0, missing = 0;
    PyObject *seen, *records, *result = NULL;
    struct cbuf lines, hashes = {NULL, 0, 0}, recs = {NULL, 0, 0};
    int oom = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnKO!O!", &view, &start, &end, &position, &PyByteArray_Type,
                          &seen, &PyByteArray_Type, &records))
        return NULL;
    if (start < 0 || end > view.len || start > end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pack_frames: bad buffer bounds");
        return NULL;
    }
    /* the lines go into this thread's buffer, kept from call to call (a fresh one every time
     * cost its page faults: ~0.2 s of the packer's thread on the npm tree); base64 makes 4 of
     * 3, a line adds < 100 bytes to each ~1 KiB of frames */
    lines = lines_scratch;
    lines.used = 0;
    if (cb_reserve(&lines, (size_t)((end - start) / 3 * 4 + (end - start) / 8 + 4096)) < 0) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    p = pack_loop((const unsigned char *)view.buf, start, end, &position, &described, &missing,
                  &lines, &hashes, &recs, &oom);
    Py_END_ALLOW_THREADS
    lines_scratch = lines; /* (grown, maybe) */
    if (oom)
        PyErr_NoMemory();
    else if (append_bytearray(seen, &hashes) == 0 && append_bytearray(records, &recs) == 0)
        result = Py_BuildValue("(nNKKK)", p - start,
                               PyMemoryView_FromMemory(lines.p, (Py_ssize_t)lines.used,
                                                       PyBUF_READ),
                               position, described, missing);
    free(hashes.p);
    free(recs.p);
    PyBuffer_Release(&view);
    return result;
}

/* ---- directory times at the end of an apply ---------------------------------------------------
 *
 * set_dir_times(root_fd, items) -> list[int]
 *
 * items: (real path, atime_ns, mtime_ns) of directories beneath root_fd (_Applier.finish's
 * dir_times, those with no mode to set).  Each is opened beneath root_fd without crossing a
 * symlink (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, O_DIRECTORY | O_NOFOLLOW) and gets its
 * times (futimens), without the GIL; a path that is gone (ENOENT) is skipped, as
 * _Applier._set_dir_time skips it.  Returns the indices of the items it could not do so (a
 * symlink or a non-directory on the way, openat2 missing, a failed futimens): the caller does
 * them its own way. */
static PyObject *set_dir_times(PyObject *self, PyObject *args)
{
    int root_fd;
    PyObject *items, *seq = NULL, *paths = NULL, *rest = NULL;
    Py_ssize_t i, n;
    struct timespec *tms = NULL;
    int *failed = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "iO", &root_fd, &items))
        return NULL;
    seq = PySequence_Fast(items, "set_dir_times: items must be a sequence");
    if (seq == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    paths = PyList_New(n);
    tms = PyMem_Calloc((size_t)n * 2 + 1, sizeof(*tms));
    failed = PyMem_Calloc((size_t)n + 1, sizeof(*failed));
    if (paths == NULL || tms == NULL || failed == NULL)
        goto error;
    for (i = 0; i < n; i++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i), *path;
        long long at, mt;
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 3) {
            PyErr_SetString(PyExc_TypeError, "set_dir_times: (path, atime_ns, mtime_ns) items");
            goto error;
        }
        at = PyLong_AsLongLong(PyTuple_GET_ITEM(it, 1));
        mt = PyLong_AsLongLong(PyTuple_GET_ITEM(it, 2));
        if (PyErr_Occurred() || !PyUnicode_FSConverter(PyTuple_GET_ITEM(it, 0), &path))
            goto error;
        PyList_SET_ITEM(paths, i, path);
        ns_timespec(at, &tms[2 * i]);
        ns_timespec(mt, &tms[2 * i + 1]);
    }
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        const char *p = PyBytes_AS_STRING(PyList_GET_ITEM(paths, i));
        struct gd_open_how how;
        int fd;
        memset(&how, 0, sizeof(how));
        how.flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
        how.resolve = 0x08 | 0x04 | 0x02; /* BENEATH | NO_SYMLINKS | NO_MAGICLINKS */
        do {
            fd = (int)syscall(SYS_openat2, root_fd, *p ? p : ".", &how, sizeof(how));
        } while (fd < 0 && (errno == EINTR || errno == EAGAIN));
        if (fd < 0) {
            failed[i] = errno != ENOENT;
            continue;
        }
        failed[i] = futimens(fd, &tms[2 * i]) < 0;
        close(fd);
    }
    Py_END_ALLOW_THREADS
    rest = PyList_New(0);
    if (rest == NULL)
        goto error;
    for (i = 0; i < n; i++) {
        PyObject *k;
        if (!failed[i])
            continue;
        k = PyLong_FromSsize_t(i);
        if (k == NULL || PyList_Append(rest, k) < 0) {
            Py_XDECREF(k);
            Py_CLEAR(rest);
            goto error;
        }
        Py_DECREF(k);
    }
error:
    Py_XDECREF(seq);
    Py_XDECREF(paths);
    PyMem_Free(tms);
    PyMem_Free(failed);
    return rest;
}

/* ---- system calls the confined child makes before its job runs --------------------------------
 *
 * openat2(dir_fd, path, flags, mode, resolve) -> fd: the openat2 system call (O_CLOEXEC added),
 * OSError as os.open raises it (ENOSYS where the kernel lacks it); archive/pathres.py's, without
 * ctypes (its import is a few ms of every confined child's start).
 * set_parent_death_signal(signum): prctl(PR_SET_PDEATHSIG), archive/confine.py's, likewise. */
static PyObject *openat2_call(PyObject *self, PyObject *args)
{
    int dir_fd, flags, fd;
    unsigned long long mode, resolve;
    PyObject *name, *path;
    struct gd_open_how how;
    (void)self;
    if (!PyArg_ParseTuple(args, "iOiKK", &dir_fd, &name, &flags, &mode, &resolve) ||
        !PyUnicode_FSConverter(name, &path))
        return NULL;
    memset(&how, 0, sizeof(how));
    how.flags = (uint64_t)(unsigned int)(flags | O_CLOEXEC);
    how.mode = mode;
    how.resolve = resolve;
    Py_BEGIN_ALLOW_THREADS
    do {
        fd = (int)syscall(SYS_openat2, dir_fd, PyBytes_AS_STRING(path), &how, sizeof(how));
    } while (fd < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        int err = errno;
        Py_DECREF(path);
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        return NULL;
    }
    Py_DECREF(path);
    return PyLong_FromLong(fd);
}

static PyObject *set_parent_death_signal(PyObject *self, PyObject *args)
{
    int signum;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &signum))
        return NULL;
    if (prctl(PR_SET_PDEATHSIG, (unsigned long)signum, 0UL, 0UL, 0UL) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* fs_type(fd) -> the f_type of fstatfs(fd): which filesystem a file is on (TMPFS_MAGIC, ...). */
static PyObject *fs_type(PyObject *self, PyObject *args)
{
    int fd;
    struct statfs st;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    if (fstatfs(fd, &st) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromUnsignedLong((unsigned long)st.f_type);
}

static PyMethodDef methods[] = {
    {"header", header, METH_VARARGS, "Parse the next common-case tar header sequence, or None."},
    {"create_file", create_file, METH_VARARGS, "Create, fill and finish one regular file."},
    {"files", files, METH_VARARGS, "Apply a run of plain entries (see the comment)."},
    {"pack_frames", pack_frames, METH_VARARGS, "Recorder frames to tar-split lines (common case)."},
    {"path_hash", path_hash, METH_VARARGS, "The duplicate-path rule's hash of a clean path."},
    {"first_duplicate", first_duplicate, METH_VARARGS, "Sort path hashes; one seen twice, or None."},
    {"first_duplicate_runs", first_duplicate_runs, METH_VARARGS,
     "Merge spilled sorted runs of path hashes and the rest; one seen twice, or None."},
    {"set_dir_times", set_dir_times, METH_VARARGS, "Directory times at the end of an apply."},
    {"verify_files", verify_files, METH_VARARGS, "Check recorded files after an apply (-1: all good)."},
    {"openat2", openat2_call, METH_VARARGS, "The openat2 system call (O_CLOEXEC added)."},
    {"set_parent_death_signal", set_parent_death_signal, METH_VARARGS,
     "prctl(PR_SET_PDEATHSIG, signum)."},
    {"fs_type", fs_type, METH_VARARGS, "fstatfs(fd).f_type: the filesystem's magic number."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "graphdriver._fastapply", "Native helpers of the tar engine.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastapply(void)
{
    int i;
    PyObject *m;
    for (i = 0; i < 4096; i++) {
        b64pairs[i][0] = b64chars[i >> 6];
        b64pairs[i][1] = b64chars[i & 63];
    }
    if (PyType_Ready(&WriterType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Writer", (PyObject *)&WriterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
