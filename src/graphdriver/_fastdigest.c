/* Optional native helper of archive/digest.py: the layer's diffID sha256, hashed by a native
 * thread that never takes the GIL.
 *
 * Digest() takes regions of the tar reader's buffer in order (update) and a POSIX thread hashes
 * them with OpenSSL's SHA-256 (the libcrypto that Python's _hashlib already loaded, found with
 * dl_iterate_phdr and opened with RTLD_NOLOAD: no OpenSSL headers at build time, and the same
 * SHA-NI/AVX code hashlib runs), or with its own SHA-NI code (below: where the CRC is fused; the
 * environment's GRAPHDRIVER_NO_SHA_NI, non-empty at import, keeps OpenSSL's).  _hashlib, and so
 * libcrypto, is imported only where OpenSSL's SHA-256 is the one used.  The hand-over is
 * a ring of slots and two counters:
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
 * ISA-L's (crc64_iso_refl, in the extension of the isal package, which the tar-split packer's
 * gzip loads anyway: ~50 GB/s on 256 KiB with VPCLMULQDQ here, ~4x anycrc's, ~8 ms of CPU less
 * on a Debian rootfs layer), else anycrc's (crc_params/crc_calc of its extension): an extension
 * already loaded, found as libcrypto is, or the file load_crc is given, opened as a plain
 * library; fill_frames and crc64 are refused where neither is loaded.
 *
 * Where the CPU has the SHA extensions and carry-less multiplication (x86-64: SHA-NI, PCLMULQDQ),
 * the sha256 is this file's own (sha_blocks: the SHA-NI rounds), so that a region and a CRC job
 * over it come in one pass: the SHA rounds are one long dependency chain that leaves the vector
 * units mostly idle, and folding the CRC-64 of the same 64 bytes with carry-less multiplications
 * (four 128-bit lanes, each folded 512 bits on per block) fills them: on the 1 GiB layer the
 * CRC then costs the worker nothing (~100 ms otherwise).  The worker fuses a region with the
 * fill_frames slot right after it when that slot is one job adding a range of the region to the
 * running CRC (a big file's piece, published before the worker got to the region: it was
 * behind).  Elsewhere the sha256 is libcrypto's and the CRC the one loaded.
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
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHA_NI_BUILD 1
#endif
#include <link.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
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

/* the CRC-64/GO-ISO used: continues a CRC (0 to start) over n bytes, as Go's crc64.Update;
 * ISA-L's crc64_iso_refl itself, or anycrc_update (NULL: neither is loaded) */
typedef uint64_t (*crc_update_fn)(uint64_t, const unsigned char *, uint64_t);
static crc_update_fn crc_update;

static uint64_t
anycrc_update(uint64_t crc, const unsigned char *p, uint64_t n)
{
    return crc_calc(crc_iso, crc, p, n);
}

/* this file's sha256 (use_sha_ni): the state, the bytes hashed, a block not complete yet */
typedef struct {
    uint32_t h[8];
    uint64_t bytes;
    unsigned char part[64];
    size_t npart;
} sha_state;

/* a sha256 under way: this file's own (use_sha_ni; ctx is then NULL) or libcrypto's */
typedef struct {
    sha_state own;
    void *ctx; /* EVP_MD_CTX */
} sha256_t;

typedef struct {
    PyObject_HEAD
    sha256_t sha;                /* the worker's while it runs, else the caller's */
    int hashing;                 /* 0: Digest(sha256=False): regions are only counted */
    uint64_t fused_next;         /* the worker's: the fill_frames slot it did with the region
                                  * before it (its number + 1; 0: none) */
    uint64_t fused_bytes;        /* the worker's: bytes whose CRC went with their sha256 */
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

/* x^n modulo the polynomial, reflected */
static uint64_t
x_power(uint64_t n)
{
    uint64_t p = 1ULL << 63; /* x^0 */
    int k = 0;
    while (n) {
        if (n & 1)
            p = mul_mod(shift_by[k], p);
        n >>= 1;
        k++;
    }
    return p;
}

static const uint32_t sha_initial[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
/* whether this file's sha256 (and the fused CRC) is used: the CPU has what sha_blocks needs */
static int use_sha_ni;

#ifdef HAVE_SHA_NI_BUILD
/* sha256's round constants (the cube roots of the first 64 primes, their fractions' 32 bits) */
static const uint32_t sha_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};
/* the CRC's fold over 512 bits: x^(512 + 64 - 1) for a lane's first (higher) half, x^(512 - 1)
 * for its second (a carry-less product of reflected values comes one degree short) */
static __m128i crc_fold512;

#define SHA_TARGET __attribute__((target("sha,sse4.1,pclmul")))

/* one 128-bit lane of the CRC carried 512 bits on, plus the 16 bytes it meets there */
#define FOLD(lane, data)                                                                      \
    _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(lane, crc_fold512, 0x00),               \
                                _mm_clmulepi64_si128(lane, crc_fold512, 0x11)), data)

/* *blocks* 64-byte blocks into the state h (A..H); with *lanes*, the CRC folded over the same
 * bytes in the same pass */
SHA_TARGET static void
sha_blocks(uint32_t h[8], const unsigned char *p, size_t blocks, __m128i *lanes)
{
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i cdab = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1);
    __m128i hgfe = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B);
    __m128i abef = _mm_alignr_epi8(cdab, hgfe, 8); /* the instructions' layout of the state */
    __m128i cdgh = _mm_blend_epi16(hgfe, cdab, 0xF0);
    __m128i l0 = _mm_setzero_si128(), l1 = l0, l2 = l0, l3 = l0;
    if (lanes != NULL) {
        l0 = lanes[0];
        l1 = lanes[1];
        l2 = lanes[2];
        l3 = lanes[3];
    }
    while (blocks--) {
        __m128i abef_in = abef, cdgh_in = cdgh, w[4], k;
        __m128i d0 = _mm_loadu_si128((const __m128i *)p);
        __m128i d1 = _mm_loadu_si128((const __m128i *)(p + 16));
        __m128i d2 = _mm_loadu_si128((const __m128i *)(p + 32));
        __m128i d3 = _mm_loadu_si128((const __m128i *)(p + 48));
        if (lanes != NULL) {
            l0 = FOLD(l0, d0);
            l1 = FOLD(l1, d1);
            l2 = FOLD(l2, d2);
            l3 = FOLD(l3, d3);
        }
        w[0] = _mm_shuffle_epi8(d0, swap); /* the message words, big-endian */
        w[1] = _mm_shuffle_epi8(d1, swap);
        w[2] = _mm_shuffle_epi8(d2, swap);
        w[3] = _mm_shuffle_epi8(d3, swap);
        _Pragma("GCC unroll 16") for (int g = 0; g < 16; g++) {
            if (g >= 4) { /* words 4g..4g+3 from words 4g-16.. (w[g & 3] holds those) */
                __m128i m = _mm_sha256msg1_epu32(w[g & 3], w[(g + 1) & 3]);
                m = _mm_add_epi32(m, _mm_alignr_epi8(w[(g + 3) & 3], w[(g + 2) & 3], 4));
                w[g & 3] = _mm_sha256msg2_epu32(m, w[(g + 3) & 3]);
            }
            k = _mm_add_epi32(w[g & 3], _mm_loadu_si128((const __m128i *)&sha_k[4 * g]));
            cdgh = _mm_sha256rnds2_epu32(cdgh, abef, k); /* two rounds: the roles swap */
            abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(k, 0x0E));
        }
        abef = _mm_add_epi32(abef, abef_in);
        cdgh = _mm_add_epi32(cdgh, cdgh_in);
        p += 64;
    }
    if (lanes != NULL) {
        lanes[0] = l0;
        lanes[1] = l1;
        lanes[2] = l2;
        lanes[3] = l3;
    }
    __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
    __m128i hgdc = _mm_shuffle_epi32(cdgh, 0xB1);
    _mm_storeu_si128((__m128i *)&h[0], _mm_blend_epi16(feba, hgdc, 0xF0));
    _mm_storeu_si128((__m128i *)&h[4], _mm_alignr_epi8(hgdc, feba, 8));
}

/* the CRC-64 of *blocks* (>= 1) blocks at p, continuing crc, hashed into s in the same pass
 * (s has no partial block) */
SHA_TARGET static uint64_t
sha_blocks_crc(sha_state *s, const unsigned char *p, size_t blocks, uint64_t crc)
{
    __m128i lanes[4];
    unsigned char folded[64];
    int j;
    /* the lanes start as the first block, the CRC's register (all ones over crc) on its front */
    for (j = 0; j < 4; j++)
        lanes[j] = _mm_loadu_si128((const __m128i *)(p + 16 * j));
    lanes[0] = _mm_xor_si128(lanes[0], _mm_cvtsi64_si128((long long)~crc));
    sha_blocks(s->h, p, 1, NULL);
    sha_blocks(s->h, p + 64, blocks - 1, lanes);
    s->bytes += 64 * blocks;
    /* the lanes are a 64-byte message with the data's remainder: its CRC from a zero register
     * (a CRC of ~0 before it) is the data's */
    memcpy(folded, lanes, sizeof folded);
    return crc_update(UINT64_MAX, folded, sizeof folded);
}

/* whether the CPU has what sha_blocks needs */
static int
cpu_has_sha_ni(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_PCLMUL) ||
        !(c & bit_SSSE3))
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b & bit_SHA) != 0;
}
#endif

static void
sha_update(sha_state *s, const unsigned char *p, size_t n)
{
#ifdef HAVE_SHA_NI_BUILD
    if (s->npart) {
        size_t take = 64 - s->npart < n ? 64 - s->npart : n;
        memcpy(s->part + s->npart, p, take);
        s->npart += take;
        p += take;
        n -= take;
        if (s->npart < 64)
            return;
        sha_blocks(s->h, s->part, 1, NULL);
        s->bytes += 64;
        s->npart = 0;
    }
    if (n >= 64) {
        sha_blocks(s->h, p, n / 64, NULL);
        s->bytes += n & ~(size_t)63;
        p += n & ~(size_t)63;
        n &= 63;
    }
    memcpy(s->part, p, n);
    s->npart = n;
#else
    (void)s, (void)p, (void)n;
#endif
}

static void
sha_final(sha_state *s, unsigned char md[32])
{
    unsigned char pad[72] = {0x80};
    uint64_t bits = (s->bytes + s->npart) * 8;
    size_t n = (s->npart < 56 ? 56 : 120) - s->npart, i;
    for (i = 0; i < 8; i++)
        pad[n + i] = (unsigned char)(bits >> (56 - 8 * i));
    sha_update(s, pad, n + 8);
    for (i = 0; i < 8; i++) {
        md[4 * i] = (unsigned char)(s->h[i] >> 24);
        md[4 * i + 1] = (unsigned char)(s->h[i] >> 16);
        md[4 * i + 2] = (unsigned char)(s->h[i] >> 8);
        md[4 * i + 3] = (unsigned char)s->h[i];
    }
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
                *running = crc_update(*running, src + off, len);
        } else {
            if (kind == END_JOB) {
                c = *running;
                *running = 0;
            } else {
                c = len ? crc_update(0, src + off, len) : 0;
            }
            memcpy(out + at, &c, 8); /* little-endian hosts: the "<Q" of struct */
        }
    }
}

/* a sha256 started (its context made); -1 with a Python error set */
static int
sha256_begin(sha256_t *h)
{
    if (use_sha_ni) {
        memcpy(h->own.h, sha_initial, sizeof sha_initial);
        return 0;
    }
    h->ctx = md_ctx_new();
    if (h->ctx == NULL || digest_init(h->ctx, sha256_md(), NULL) != 1) {
        PyErr_SetString(PyExc_ValueError, "sha256 cannot be set up in libcrypto");
        return -1;
    }
    return 0;
}

/* n more bytes into the sha256; 0 on a failure (libcrypto's) */
static int
sha256_add(sha256_t *h, const unsigned char *p, size_t n)
{
    if (use_sha_ni) {
        sha_update(&h->own, p, n);
        return 1;
    }
    return digest_update(h->ctx, p, n) == 1;
}

/* the sha256's end, in hex; -1 with a Python error set */
static int
sha256_hex(sha256_t *h, char hex[65])
{
    unsigned char md[32];
    unsigned int n = 0;
    int i;
    if (use_sha_ni) {
        sha_final(&h->own, md);
        n = sizeof(md);
    } else if (digest_final(h->ctx, md, &n) != 1 || n != sizeof(md)) {
        PyErr_SetString(PyExc_ValueError, "sha256 final failed in libcrypto");
        return -1;
    }
    for (i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return 0;
}

static void
sha256_free(sha256_t *h)
{
    if (h->ctx != NULL)
        md_ctx_free(h->ctx);
    h->ctx = NULL;
}

/* the worker's sha256 of n bytes (the caller's when nothing is pending); 0 on a failure */
static int
hash_update(Digest *d, const unsigned char *p, size_t n)
{
    return !d->hashing || sha256_add(&d->sha, p, n);
}

/* the region's sha256 and, in the same pass, its range [off, off + len) added to the running
 * CRC-64 (see the top of the file) */
static void
hash_with_crc(Digest *d, const unsigned char *p, size_t n, size_t off, size_t len)
{
    const unsigned char *q = p + off;
    size_t lead, blocks;
    hash_update(d, p, off);
    lead = d->sha.own.npart ? 64 - d->sha.own.npart : 0; /* up to a block's start in the hash's stream */
    if (lead > len)
        lead = len;
    hash_update(d, q, lead);
    d->running_crc = crc_update(d->running_crc, q, lead);
    q += lead;
    len -= lead;
    blocks = len / 64;
#ifdef HAVE_SHA_NI_BUILD
    if (blocks >= 2) {
        d->running_crc = sha_blocks_crc(&d->sha.own, q, blocks, d->running_crc);
        d->fused_bytes += 64 * blocks;
        q += 64 * blocks;
        len -= 64 * blocks;
    }
#endif
    d->running_crc = crc_update(d->running_crc, q, len);
    hash_update(d, q, (size_t)(p + n - q));
}

/* the fill_frames slot *m* (published) as one job adding a range of region *s* to the running
 * CRC: its offset in s and its length (0: not such a slot) */
static size_t
crc_job_inside(Digest *d, uint64_t m, const Py_buffer *s, size_t *off)
{
    const Py_buffer *jobs = &d->jobs[m % NSLOTS], *src = &d->slots[m % NSLOTS];
    const uint64_t *job = (const uint64_t *)jobs->buf;
    const unsigned char *start, *region = (const unsigned char *)s->buf;
    uint64_t len;
    if (d->frames[m % NSLOTS].obj == NULL || jobs->len != 24 || (job[1] & JOB_KINDS) != ADD_JOB)
        return 0;
    start = (const unsigned char *)src->buf + job[0];
    len = job[1] & ~JOB_KINDS;
    if (start < region || start + len > region + s->len)
        return 0;
    *off = (size_t)(start - region);
    return (size_t)len;
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
            size_t off, len;
            if (d->frames[n % NSLOTS].obj != NULL) {
                if (d->fused_next != n + 1) /* else done with the region before it */
                    fill_jobs(s, &d->frames[n % NSLOTS], &d->jobs[n % NSLOTS], &d->running_crc);
            } else if (use_sha_ni && d->hashing && n + 1 < p &&
                       (len = crc_job_inside(d, n + 1, s, &off))) {
                hash_with_crc(d, (const unsigned char *)s->buf, (size_t)s->len, off, len);
                d->fused_next = n + 2;
            } else if (!atomic_load_explicit(&d->failed, memory_order_relaxed) &&
                       !hash_update(d, (const unsigned char *)s->buf, (size_t)s->len)) {
                atomic_store(&d->failed, 1);
            }
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

/* Digest(sha256=True); sha256=False: the regions are taken in order as ever (wait_for, pending)
 * but not hashed -- the diffID is hashed elsewhere (FileHash, in the parent of a confined apply)
 * and the worker only does the fill_frames jobs */
static PyObject *
Digest_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"sha256", NULL};
    Digest *d;
    int hashing = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$p:Digest", kwlist, &hashing))
        return NULL;
    d = (Digest *)type->tp_alloc(type, 0);
    if (d == NULL)
        return NULL;
    atomic_store(&d->wake_at, UINT64_MAX);
    d->hashing = hashing;
    if (hashing && sha256_begin(&d->sha) < 0) {
        Py_DECREF(d);
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
    sha256_free(&d->sha);
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
            int ok = hash_update(d, (const unsigned char *)view.buf, (size_t)view.len);
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
    if (crc_update == NULL) {
        PyErr_SetString(PyExc_ValueError, "fill_frames: no CRC-64 is loaded");
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

/* is_done(n) -> bool: whether the region (or fill_frames slot) of number n (update's, as
 * wait_for takes it) is done, without waiting (a mapped reader lets go of the pages of the
 * regions done) */
static PyObject *
Digest_is_done(Digest *d, PyObject *arg)
{
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(n <= atomic_load_explicit(&d->done, memory_order_acquire));
}

static PyObject *
Digest_fused_bytes(Digest *d, PyObject *Py_UNUSED(ignored))
{
    uint64_t n;
    if (wait_done(d, atomic_load(&d->published)) < 0) /* the worker's counter: once it is idle */
        return NULL;
    n = d->fused_bytes;
    return PyLong_FromUnsignedLongLong(n);
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
    if (!d->hashing) {
        PyErr_SetString(PyExc_ValueError, "hexdigest of a digest made with sha256=False");
        return NULL;
    }
    if (!d->finished) {
        if (d->joined) {
            PyErr_SetString(PyExc_ValueError, "hexdigest of a digest that was closed");
            return NULL;
        }
        if (wait_done(d, atomic_load(&d->published)) < 0)
            return NULL;
        stop_worker(d);
        if (sha256_hex(&d->sha, d->hex) < 0)
            return NULL;
        d->finished = 1;
    }
    return PyUnicode_FromStringAndSize(d->hex, 64);
}

/* resume(state): a Digest(sha256=False) hashes from now on, from *state* (handoff_take's: the
 * sha256 of the stream's first bytes, hashed in the parent); the regions handed over before
 * were not hashed, and are done with (the caller waited); the next ones are the stream's bytes
 * after the state's */
static PyObject *
Digest_resume(Digest *d, PyObject *arg)
{
    Py_buffer state;
    if (d->hashing || d->finished || d->joined || !use_sha_ni) {
        PyErr_SetString(PyExc_ValueError, "resume of a digest that hashes, was closed, or not "
                                          "with the SHA-NI sha256");
        return NULL;
    }
    if (atomic_load(&d->done) != atomic_load(&d->published)) {
        PyErr_SetString(PyExc_ValueError, "resume of a digest with regions pending");
        return NULL;
    }
    if (PyObject_GetBuffer(arg, &state, PyBUF_SIMPLE) < 0)
        return NULL;
    if (state.len != (Py_ssize_t)sizeof(sha_state) ||
        ((const sha_state *)state.buf)->npart >= 64) {
        PyBuffer_Release(&state);
        PyErr_SetString(PyExc_ValueError, "resume: not a sha256 state");
        return NULL;
    }
    memcpy(&d->sha.own, state.buf, sizeof(sha_state));
    PyBuffer_Release(&state);
    d->hashing = 1; /* the worker is idle: it reads this at its next region */
    Py_RETURN_NONE;
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
    {"fused_bytes", (PyCFunction)Digest_fused_bytes, METH_NOARGS,
     "Bytes whose CRC-64 the worker folded in the pass that hashed them (see FUSED)."},
    {"pending", (PyCFunction)Digest_pending, METH_NOARGS,
     "The regions and fill_frames slots handed over and not done yet."},
    {"is_done", (PyCFunction)Digest_is_done, METH_O,
     "Whether the region (or fill_frames slot) of a number update returned is done (no wait)."},
    {"wait_for", (PyCFunction)Digest_wait_for, METH_O,
     "Return once the regions up to a number update returned are hashed."},
    {"wait", (PyCFunction)Digest_wait, METH_NOARGS,
     "Return once every region handed over is hashed (they may be reused)."},
    {"hexdigest", (PyCFunction)Digest_hexdigest, METH_NOARGS,
     "The sha256 of everything handed over; stops the worker thread."},
    {"resume", (PyCFunction)Digest_resume, METH_O,
     "Hash from now on (a Digest(sha256=False)), on from a state handoff_take returned."},
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

/* FileHash(fd, offset, page): the sha256 of a file from *offset* to its end, read and
 * hashed by a native thread that starts at once and never takes the GIL: the parent of a
 * confined apply hashes a plain layer file so while its child starts and applies it
 * (archive/inputdigest.py).  The thread reads a duplicate of *fd* with pread (the file's offset
 * stays the caller's, and the child's), FILE_CHUNK at a time into a buffer of its own -- never a
 * map: a file cut shorter meanwhile would kill this process with SIGBUS -- until a read returns
 * nothing.  result() waits for it and returns (hex digest, bytes hashed, handed over).
 *
 * *page* (a writable buffer of HANDOFF_BYTES: a memfd's page, mapped here and in the child) is
 * where the thread says how far it got (after every chunk) and where the child may ask it to
 * stop (handoff_take): the thread then leaves its sha256 state there and ends, and the child
 * hashes the rest itself (Digest.resume), from the map it applies from, in the pass that also
 * does its big files' CRCs.  The child takes over at its reader's first read (this thread hashes
 * while the child starts), unless this thread is done by then.  The state written there is this
 * file's own sha256's (SHA-NI), so FileHash is refused where that is not the sha256 used (FUSED).
 * cancel() stops the thread (as dropping it does). */
#define FILE_CHUNK (256 << 10) /* within L2: the copy out of the page cache stays there */

/* the hand-off page (its first bytes: the rest is padding) */
typedef struct {
    _Atomic uint32_t stop;   /* the child's: stop, leave the state */
    _Atomic uint32_t done;   /* the thread's: the state is there (a futex word, shared) */
    _Atomic uint64_t hashed; /* the thread's: bytes hashed so far */
    sha_state state;         /* the thread's, once done: its sha256 after *hashed* bytes */
    int32_t error;           /* the thread's, once done: a read's errno (-1: other), or 0 */
} handoff_t;
#define HANDOFF_BYTES 4096

typedef struct {
    PyObject_HEAD
    sha256_t sha;
    int fd;             /* the duplicate (-1: closed) */
    uint64_t offset;
    uint64_t bytes;     /* the worker's: hashed so far */
    int error;          /* the worker's: a read's errno, or -1 (libcrypto's sha256 failed) */
    int eof;            /* the worker's: it read to the end */
    int handed;         /* the worker's: it stopped on the child's request */
    _Atomic int stop;
    Py_buffer page;     /* the hand-off page (.obj NULL: none) */
    pthread_t thread;
    pid_t owner;
    int joined;
    char hex[65];
} FileHash;

static void
handoff_publish(handoff_t *page, const sha256_t *sha, int error)
{
    page->state = sha->own;
    page->error = error;
    atomic_store(&page->done, 1);
    /* not FUTEX_PRIVATE: the child waits on its own map of the page */
    syscall(SYS_futex, &page->done, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static void *
file_hash_work(void *arg)
{
    FileHash *h = (FileHash *)arg;
    handoff_t *page = (handoff_t *)h->page.buf;
    unsigned char *buf = NULL;
#ifdef __GLIBC__
    pthread_setname_np(pthread_self(), "input-digest");
#endif
    if (posix_memalign((void **)&buf, 4096, FILE_CHUNK) != 0)
        h->error = ENOMEM;
    while (buf != NULL && !atomic_load_explicit(&h->stop, memory_order_relaxed)) {
        ssize_t n;
        if (atomic_load(&page->stop)) {
            h->handed = 1;
            break;
        }
        n = pread(h->fd, buf, FILE_CHUNK, (off_t)(h->offset + h->bytes));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            h->error = errno;
            break;
        }
        if (n == 0) {
            h->eof = 1;
            break;
        }
        if (!sha256_add(&h->sha, buf, (size_t)n)) {
            h->error = -1;
            break;
        }
        h->bytes += (uint64_t)n;
        atomic_store_explicit(&page->hashed, h->bytes, memory_order_release);
    }
    free(buf);
    handoff_publish(page, &h->sha, h->error);
    return NULL;
}

/* wait for the thread; its fd is then closed and the page let go (its map may be closed):
 * nothing of the file stays open after result() or cancel(), whoever keeps the object */
static void
file_hash_join(FileHash *h)
{
    if (!h->joined) {
        h->joined = 1;
        if (h->owner == getpid()) { /* (a fork's child: the thread is not here) */
            Py_BEGIN_ALLOW_THREADS
            pthread_join(h->thread, NULL);
            Py_END_ALLOW_THREADS
        }
    }
    if (h->fd >= 0) {
        close(h->fd);
        h->fd = -1;
    }
    if (h->page.obj != NULL)
        PyBuffer_Release(&h->page);
}

static PyObject *
FileHash_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "offset", "page", NULL};
    FileHash *h;
    PyObject *page;
    int fd, err;
    long long offset;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iLO:FileHash", kwlist, &fd, &offset, &page))
        return NULL;
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "FileHash: a negative offset");
        return NULL;
    }
    if (!use_sha_ni) {
        PyErr_SetString(PyExc_ValueError, "FileHash: a hand-off page needs the SHA-NI sha256");
        return NULL;
    }
    h = (FileHash *)type->tp_alloc(type, 0);
    if (h == NULL)
        return NULL;
    h->fd = -1;
    h->joined = 1; /* until the thread runs */
    h->offset = (uint64_t)offset;
    if (PyObject_GetBuffer(page, &h->page, PyBUF_WRITABLE) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    if (h->page.len < HANDOFF_BYTES || (uintptr_t)h->page.buf % 64) {
        PyErr_SetString(PyExc_ValueError, "FileHash: the hand-off page is too small");
        Py_DECREF(h);
        return NULL;
    }
    memset(h->page.buf, 0, sizeof(handoff_t));
    if (sha256_begin(&h->sha) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    h->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (h->fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(h);
        return NULL;
    }
    err = start_signalless_thread(&h->thread, file_hash_work, h);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(h);
        return NULL;
    }
    h->owner = getpid();
    h->joined = 0;
    return (PyObject *)h;
}

static void
FileHash_dealloc(FileHash *h)
{
    atomic_store(&h->stop, 1);
    file_hash_join(h);
    sha256_free(&h->sha);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyObject *
FileHash_result(FileHash *h, PyObject *Py_UNUSED(ignored))
{
    file_hash_join(h);
    if (h->error > 0) {
        errno = h->error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (h->error < 0) {
        PyErr_SetString(PyExc_ValueError, "sha256 update failed in libcrypto");
        return NULL;
    }
    if (h->handed)
        return Py_BuildValue("(sKO)", "", (unsigned long long)h->bytes, Py_True);
    if (!h->eof) {
        PyErr_SetString(PyExc_ValueError, "result of a file hash that was cancelled");
        return NULL;
    }
    if (!h->hex[0] && sha256_hex(&h->sha, h->hex) < 0)
        return NULL;
    return Py_BuildValue("(s#KO)", h->hex, (Py_ssize_t)64, (unsigned long long)h->bytes,
                         Py_False);
}

static PyObject *
FileHash_cancel(FileHash *h, PyObject *Py_UNUSED(ignored))
{
    atomic_store(&h->stop, 1);
    file_hash_join(h);
    Py_RETURN_NONE;
}

static PyMethodDef FileHash_methods[] = {
    {"result", (PyCFunction)FileHash_result, METH_NOARGS,
     "Wait for the thread: (the sha256's hex digest, the bytes hashed, whether it handed the "
     "rest to the child: the digest is then ''); OSError of a read."},
    {"cancel", (PyCFunction)FileHash_cancel, METH_NOARGS, "Stop the thread and wait for it."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FileHashType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "graphdriver._fastdigest.FileHash",
    .tp_basicsize = sizeof(FileHash),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "sha256 of a file from an offset to its end, read and hashed by a native thread.",
    .tp_new = FileHash_new,
    .tp_dealloc = (destructor)FileHash_dealloc,
    .tp_methods = FileHash_methods,
};

/* the hand-off page in *obj* (the child's map of it); NULL with an error set */
static handoff_t *
handoff_page(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (view->len < HANDOFF_BYTES || (uintptr_t)view->buf % 64) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "not a hand-off page");
        return NULL;
    }
    return (handoff_t *)view->buf;
}

/* handoff_hashed(page) -> (bytes hashed so far, whether the thread is done) */
static PyObject *
handoff_hashed(PyObject *module, PyObject *obj)
{
    Py_buffer view;
    handoff_t *page = handoff_page(obj, &view);
    uint64_t hashed;
    int done;
    (void)module;
    if (page == NULL)
        return NULL;
    hashed = atomic_load_explicit(&page->hashed, memory_order_acquire);
    done = (int)atomic_load(&page->done);
    PyBuffer_Release(&view);
    return Py_BuildValue("(KO)", (unsigned long long)hashed, done ? Py_True : Py_False);
}

/* handoff_take(page) -> (state, bytes): stop the parent's thread (if it still runs) and wait
 * for its state: Digest.resume's argument, and the bytes it covers; OSError of the parent's
 * failed read, or ESRCH if the parent died meanwhile (its thread with it: nothing would ever
 * answer).  A signal's Python handler runs while it waits (the confined child's SIGTERM, which
 * is also its parent-death signal: this wait must not keep a child whose parent was killed) */
static PyObject *
handoff_take(PyObject *module, PyObject *obj)
{
    Py_buffer view;
    handoff_t *page = handoff_page(obj, &view);
    PyObject *state;
    uint64_t bytes;
    int error;
    pid_t parent = getppid();
    (void)module;
    if (page == NULL)
        return NULL;
    atomic_store(&page->stop, 1);
    while (!atomic_load(&page->done)) {
        /* a tenth of a second at a time: the parent's thread publishes within a chunk's read
         * and hash, and wakes this wait; between two, the signals that came are handled (one
         * that came just before the wait did not interrupt it) */
        struct timespec tick = {0, 100 * 1000 * 1000};
        Py_BEGIN_ALLOW_THREADS
        /* (returns at once if done is no longer 0) */
        syscall(SYS_futex, &page->done, FUTEX_WAIT, 0, &tick, NULL, 0);
        Py_END_ALLOW_THREADS
        if (atomic_load(&page->done))
            break;
        if (PyErr_CheckSignals() < 0 || getppid() != parent) {
            PyBuffer_Release(&view);
            if (!PyErr_Occurred()) {
                errno = ESRCH;
                PyErr_SetFromErrnoWithFilename(PyExc_OSError, "the parent's hash of the input");
            }
            return NULL;
        }
    }
    error = page->error;
    bytes = page->state.bytes + page->state.npart;
    state = PyBytes_FromStringAndSize((const char *)&page->state, sizeof(sha_state));
    PyBuffer_Release(&view);
    if (state == NULL)
        return NULL;
    if (error) {
        Py_DECREF(state);
        errno = error > 0 ? error : EIO;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(NK)", state, (unsigned long long)bytes);
}

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

/* the check value of CRC-64/GO-ISO ("123456789") */
#define ISO_CHECK 0xb90956c775a41001ULL

/* anycrc's CRC-64/GO-ISO from its extension's handle *lib*; whether it is the library expected */
static int
use_anycrc(void *lib)
{
    crc_params_fn params;
    uint8_t error = 0;
    params = (crc_params_fn)dlsym(lib, "crc_params");
    crc_calc = (crc_calc_fn)dlsym(lib, "crc_calc");
    if (params == NULL || crc_calc == NULL)
        return 0;
    crc_iso = PyMem_RawMalloc(sizeof(*crc_iso));
    if (crc_iso == NULL)
        return 0;
    /* Go's ISO table: width 64, poly 0x1b reflected, all ones in and out; its check value */
    *crc_iso = params(64, 0x1b, UINT64_MAX, 1, 1, UINT64_MAX, ISO_CHECK, &error);
    if (error || crc_calc(crc_iso, 0, (const unsigned char *)"123456789", 9) != ISO_CHECK) {
        PyMem_RawFree(crc_iso);
        crc_iso = NULL;
        return 0;
    }
    crc_update = anycrc_update;
    return 1;
}

/* ISA-L's crc64_iso_refl: Go's crc64.Update with the ISO table (its seed and result inverted
 * as Go's are), the code for this CPU picked at its first call */
static crc_update_fn isal_crc;

#if defined(__x86_64__) && defined(__GNUC__)
/* ISA-L's AVX-512 code leaves the upper halves of the vector registers in use; every SSE
 * instruction after it -- the SHA-NI rounds are SSE -- would then wait on them (the rootfs
 * layer's sha256 took ~50% longer): vzeroupper after each call, where the CPU has AVX */
__attribute__((target("avx"))) static uint64_t
isal_update(uint64_t crc, const unsigned char *p, uint64_t n)
{
    crc = isal_crc(crc, p, n);
    _mm256_zeroupper();
    return crc;
}

static int
cpu_has_avx(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_AVX) && (c & bit_OSXSAVE);
}
#endif

/* ISA-L's CRC-64/GO-ISO from the handle *lib* of isal's extension; whether it is there */
static int
use_isal(void *lib)
{
    crc_update_fn f = (crc_update_fn)dlsym(lib, "crc64_iso_refl");
    /* (its first call picks its code: done here, before any worker thread) */
    if (f == NULL || f(0, (const unsigned char *)"123456789", 9) != ISO_CHECK ||
        f(f(0, (const unsigned char *)"1234", 4), (const unsigned char *)"56789", 5) != ISO_CHECK)
        return 0;
    isal_crc = crc_update = f;
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx())
        crc_update = isal_update;
#endif
    return 1;
}

/* load_crc(path) -> bool: the CRC of the extension at *path* (archive/crc64.py finds isal's,
 * else anycrc's) opened as a plain library, its Python module not run (anycrc's import is
 * milliseconds of the confined child's start-up), and its CRC taken (CRC is then 1), unless one
 * was already; whether a CRC is there */
static PyObject *
load_crc(PyObject *module, PyObject *arg)
{
    PyObject *path;
    void *lib;
    if (crc_update == NULL) {
        if (!PyUnicode_FSConverter(arg, &path))
            return NULL;
        lib = dlopen(PyBytes_AS_STRING(path), RTLD_NOW | RTLD_LOCAL);
        Py_DECREF(path);
        if (lib != NULL && !use_isal(lib) && !use_anycrc(lib))
            dlclose(lib);
        if (crc_update != NULL && PyModule_AddIntConstant(module, "CRC", 1) < 0)
            return NULL;
    }
    return PyBool_FromLong(crc_update != NULL);
}

/* crc64(data, crc=0) -> int: CRC-64/GO-ISO continued over *data* (crc 0 starts one, as Go's
 * crc64.Update): the CRC loaded (ISA-L's or anycrc's), for the tar reader's own checksums */
static PyObject *
crc64_update(PyObject *module, PyObject *args)
{
    Py_buffer data;
    unsigned long long crc = 0;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*|K", &data, &crc))
        return NULL;
    if (crc_update == NULL) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "crc64: no CRC-64 is loaded");
        return NULL;
    }
    if (data.len) /* (as anycrc's calc: an empty piece leaves the CRC as it is) */
        crc = crc_update(crc, data.buf, (uint64_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(crc);
}

static PyMethodDef fastdigest_methods[] = {
    {"load_crc", load_crc, METH_O,
     "Take the CRC-64 of isal's or anycrc's extension from its file (see the comment)."},
    {"crc64", crc64_update, METH_VARARGS, "CRC-64/GO-ISO continued over data (0 starts one)."},
    {"handoff_hashed", handoff_hashed, METH_O,
     "A hand-off page's (bytes the parent's FileHash hashed so far, whether it is done)."},
    {"handoff_take", handoff_take, METH_O,
     "Stop the parent's FileHash and wait for its state: (Digest.resume's state, its bytes)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastdigest_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastdigest",
    .m_doc = "The diffID sha256 hashed by a native thread (optional; see archive/digest.py).",
    .m_size = -1,
    .m_methods = fastdigest_methods,
};

PyMODINIT_FUNC
PyInit__fastdigest(void)
{
    PyObject *m;
    void *lib;
    fill_shift_by(); /* before x_power */
#ifdef HAVE_SHA_NI_BUILD
    /* (the fused CRC also takes the loaded one, for what is not a whole number of blocks: it
     * comes only with fill_frames' jobs, which are refused where no CRC is loaded) */
    use_sha_ni = cpu_has_sha_ni() && !getenv("GRAPHDRIVER_NO_SHA_NI");
    crc_fold512 = _mm_set_epi64x((long long)x_power(511), (long long)x_power(575));
#endif
    /* OpenSSL only where its sha256 is the one used: importing _hashlib loads libcrypto, ~2.5 ms
     * of every confined child's start-up */
    if (!use_sha_ni && load_libcrypto() < 0)
        return NULL;
    lib = loaded_library("/isal/isal_zlib."); /* an isal or anycrc imported already */
    if (lib == NULL || !use_isal(lib)) {
        lib = loaded_library("/anycrc/crc.");
        if (lib != NULL)
            use_anycrc(lib);
    }
    if (PyType_Ready(&DigestType) < 0 || PyType_Ready(&FileHashType) < 0)
        return NULL;
    m = PyModule_Create(&fastdigest_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "INLINE_BELOW", INLINE_BELOW) < 0 ||
        PyModule_AddIntConstant(m, "CRC", crc_update != NULL) < 0 ||
        PyModule_AddIntConstant(m, "FUSED", use_sha_ni) < 0 ||
        PyModule_AddIntConstant(m, "HANDOFF_BYTES", HANDOFF_BYTES) < 0 ||
        PyModule_AddType(m, &DigestType) < 0 || PyModule_AddType(m, &FileHashType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
