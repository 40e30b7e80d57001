/*
 * The hash ring: which upstream a line's name belongs to, as proxy.js decides.
 *
 * Part of the _fastio extension: compiled only as part of ../_fastio.c, which
 * includes every part into one translation unit (see there why).
 */

/* ------------------------------------------------------------------ hash ring */

/* Sharding as Etsy StatsD's proxy.js places names (upstream/hashring.py holds
 * the reference and its derivation): a line's key is its text before the first
 * ':', its point the first four bytes of md5(key) read little-endian, and its
 * upstream the owner of the first ring point at or after it (wrapping). The
 * ring itself is built in Python; only the lookup runs here. Keys with bytes
 * >= 0x80 are left to Python, which decodes them as JavaScript does. */

static const uint32_t MD5_K[64] = {
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee,
    0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be,
    0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa,
    0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed,
    0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c,
    0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05,
    0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039,
    0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1,
    0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391
};
static const uint8_t MD5_S[64] = {7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
                                  5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20,
                                  4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
                                  6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21};

static void
md5_block(uint32_t h[4], const uint8_t *block)
{
    uint32_t m[16];
    for (int i = 0; i < 16; i++)
        m[i] = (uint32_t)block[i * 4] | (uint32_t)block[i * 4 + 1] << 8 |
               (uint32_t)block[i * 4 + 2] << 16 | (uint32_t)block[i * 4 + 3] << 24;
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
    for (int i = 0; i < 64; i++) {
        uint32_t f;
        int g;
        if (i < 16) {
            f = (b & c) | (~b & d);
            g = i;
        } else if (i < 32) {
            f = (d & b) | (~d & c);
            g = (5 * i + 1) % 16;
        } else if (i < 48) {
            f = b ^ c ^ d;
            g = (3 * i + 5) % 16;
        } else {
            f = c ^ (b | ~d);
            g = (7 * i) % 16;
        }
        f = f + a + MD5_K[i] + m[g];
        a = d;
        d = c;
        c = b;
        b = b + ((f << MD5_S[i]) | (f >> (32 - MD5_S[i])));
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
}

/* The first four bytes of md5(data), read as a little-endian uint32. */
static uint32_t
md5_point(const uint8_t *data, size_t len)
{
    uint32_t h[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
    size_t full = len / 64;
    for (size_t i = 0; i < full; i++)
        md5_block(h, data + i * 64);
    uint8_t tail[128];
    size_t rest = len - full * 64;
    memcpy(tail, data + full * 64, rest);
    tail[rest] = 0x80;
    size_t padded = rest + 1 + 8 <= 64 ? 64 : 128;
    memset(tail + rest + 1, 0, padded - rest - 1);
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        tail[padded - 8 + i] = (uint8_t)(bits >> (8 * i));
    md5_block(h, tail);
    if (padded == 128)
        md5_block(h, tail + 64);
    return h[0];
}

typedef struct {
    Py_ssize_t n_points;
    uint32_t *values;  /* sorted */
    int32_t *owners;   /* n_points + 1: the last repeats the first (wrap-around) */
    int32_t n_targets;
} Ring;

#define RING_CAPSULE "statsd_filter._fastio.Ring"

static void
ring_free(PyObject *capsule)
{
    Ring *r = PyCapsule_GetPointer(capsule, RING_CAPSULE);
    if (r == NULL)
        return;
    PyMem_RawFree(r->values);
    PyMem_RawFree(r->owners);
    PyMem_RawFree(r);
}

static PyObject *
ring_new(PyObject *self, PyObject *args)
{
    Py_buffer values, owners;
    int n_targets;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*i:ring_new", &values, &owners, &n_targets))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = values.len / 4;
    Ring *r = NULL;
    if (n < 1 || values.len != n * 4 || owners.len != (n + 1) * 4 || n_targets < 1 ||
        n_targets > 1024) {
        PyErr_SetString(PyExc_ValueError, "ring arrays are inconsistent");
        goto done;
    }
    r = PyMem_RawCalloc(1, sizeof(Ring));
    if (r == NULL || (r->values = PyMem_RawMalloc((size_t)values.len)) == NULL ||
        (r->owners = PyMem_RawMalloc((size_t)owners.len)) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    memcpy(r->values, values.buf, (size_t)values.len);
    memcpy(r->owners, owners.buf, (size_t)owners.len);
    r->n_points = n;
    r->n_targets = n_targets;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (r->owners[i] < 0 || r->owners[i] >= n_targets) {
            PyErr_SetString(PyExc_ValueError, "ring owner out of range");
            goto fail;
        }
    }
    result = PyCapsule_New(r, RING_CAPSULE, ring_free);
    if (result != NULL)
        goto done;
fail:
    if (r != NULL) {
        PyMem_RawFree(r->values);
        PyMem_RawFree(r->owners);
        PyMem_RawFree(r);
    }
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&owners);
    return result;
}

static int32_t
ring_owner(const Ring *r, uint32_t point)
{
    Py_ssize_t lo = 0, hi = r->n_points; /* bisect_left */
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (r->values[mid] < point)
            lo = mid + 1;
        else
            hi = mid;
    }
    return r->owners[lo];
}

/* The upstream of an ASCII key, or -1 (a byte >= 0x80: Python decides). */
static int32_t
ring_route(const Ring *r, const char *line, Py_ssize_t len)
{
    const char *colon = memchr(line, ':', (size_t)len);
    Py_ssize_t key_len = colon ? (Py_ssize_t)(colon - line) : len;
    for (Py_ssize_t i = 0; i < key_len; i++) {
        if ((uint8_t)line[i] >= 0x80)
            return -1;
    }
    return ring_owner(r, md5_point((const uint8_t *)line, (size_t)key_len));
}

static PyObject *
ring_lookup(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    Py_buffer line;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oy*:ring_lookup", &capsule, &line))
        return NULL;
    Ring *r = PyCapsule_GetPointer(capsule, RING_CAPSULE);
    PyObject *result = r == NULL ? NULL : PyLong_FromLong(ring_route(r, line.buf, line.len));
    PyBuffer_Release(&line);
    return result;
}
