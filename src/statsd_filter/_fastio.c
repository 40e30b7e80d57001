/*
 * _fastio: the UDP hot path in C, with a pure-Python reference beside it.
 *
 * recv_many / send_many move up to MAX_BATCH datagrams per system call
 * (Linux recvmmsg/sendmmsg). They never block (MSG_DONTWAIT) and report
 * errors as Python's OSError subclasses, exactly as socket.recv/send do.
 *
 * recv_filter_pack does a whole wake-up of the common configuration (a
 * prefix blocklist, no other rules) in one call: it reads up to N datagrams,
 * splits them into lines (accepting \r\n, skipping empty lines), drops lines
 * over the length limit and lines starting with a blocked prefix (a trie
 * built by trie_new), and packs the rest into upstream payloads of at most
 * max_size bytes, exactly as the Python filter and batcher do (the tests
 * compare the two on random input). No Python object is made per datagram or
 * per line: only one per outgoing payload. With max_size 0 it packs nothing
 * and returns the kept lines as one chunk in the filter's shape (b"\n" +
 * lines joined by b"\n"), for configurations whose other rules or per-line
 * routing must still see each line in Python.
 *
 * With /top sampling on (worker/sampler.py), recv_filter_pack also finds the
 * lines under the sample points that fall in this read: the read is seen as
 * its datagrams joined by newlines plus a final newline (as the Python path
 * joins them), points are spaced by random gaps of 1 to 2*step-1 bytes
 * (xorshift64*, its state carried by the caller), and each line a point lands
 * on is returned with the bytes its points stand for. One comparison per line
 * otherwise; a read with too many points widens the step as it goes.
 *
 * The limit-rule functions (series_key ... limit_scan, limit_admit) are the C
 * twins of the pure-Python code in statsd_filter/rules/limittable.py, which
 * defines what they compute and holds the layouts they share; the tests run
 * both on the same inputs and compare results and memory byte for byte.
 *
 * Optional: if this module is not built, statsd_filter.fastio falls back to
 * plain socket calls and the worker to the Python filter.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define MAX_BATCH 64
#define MAX_TARGETS 64 /* upstreams a ring may route to (upstream/spec.py's limit) */
#define DATAGRAM_MAX 65536 /* larger than any UDP payload: never truncates */

static char *recv_area = NULL; /* MAX_BATCH * DATAGRAM_MAX, pages touched only as used */

static PyObject *
recv_many(PyObject *self, PyObject *args)
{
    int fd;
    Py_ssize_t count;
    Py_ssize_t size = DATAGRAM_MAX;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iovs[MAX_BATCH];
    (void)self;

    if (!PyArg_ParseTuple(args, "in|n:recv_many", &fd, &count, &size))
        return NULL;
    if (count < 1 || count > MAX_BATCH)
        count = MAX_BATCH;
    /* Larger datagrams (a Unix socket's) share the same area: fewer per call. */
    if (size < 1 || size > (Py_ssize_t)MAX_BATCH * DATAGRAM_MAX) {
        PyErr_SetString(PyExc_ValueError, "recv_many: size out of range");
        return NULL;
    }
    if (count > (Py_ssize_t)MAX_BATCH * DATAGRAM_MAX / size)
        count = (Py_ssize_t)MAX_BATCH * DATAGRAM_MAX / size;
    if (recv_area == NULL) {
        recv_area = PyMem_RawMalloc((size_t)MAX_BATCH * DATAGRAM_MAX);
        if (recv_area == NULL)
            return PyErr_NoMemory();
    }
    memset(msgs, 0, sizeof(msgs));
    for (Py_ssize_t i = 0; i < count; i++) {
        iovs[i].iov_base = recv_area + (size_t)i * (size_t)size;
        iovs[i].iov_len = (size_t)size;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int got = recvmmsg(fd, msgs, (unsigned int)count, MSG_DONTWAIT, NULL);
    if (got < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *list = PyList_New(got);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < got; i++) {
        PyObject *item = PyBytes_FromStringAndSize(iovs[i].iov_base, (Py_ssize_t)msgs[i].msg_len);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyObject *
send_many(PyObject *self, PyObject *args)
{
    int fd;
    PyObject *payloads;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iovs[MAX_BATCH];
    (void)self;

    if (!PyArg_ParseTuple(args, "iO!:send_many", &fd, &PyList_Type, &payloads))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(payloads);
    if (n > MAX_BATCH)
        n = MAX_BATCH;
    memset(msgs, 0, sizeof(msgs));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "send_many needs a list of bytes");
            return NULL;
        }
        iovs[i].iov_base = PyBytes_AS_STRING(item);
        iovs[i].iov_len = (size_t)PyBytes_GET_SIZE(item);
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    if (n == 0)
        return PyLong_FromLong(0);
    /* The list (and so every buffer) stays referenced by the caller for the call. */
    int sent = sendmmsg(fd, msgs, (unsigned int)n, MSG_DONTWAIT);
    if (sent < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(sent);
}

/* ------------------------------------------------------------------ prefix trie */

/* Built in Python (statsd_filter.fastio.compile_trie) as flat arrays, breadth
 * first: node i's children are child_byte/child_node[first[i] .. first[i] +
 * count[i]), sorted by byte. order[i] is the listing position of the prefix
 * ending at node i (-1: none); min_below[i] the smallest order in node i's
 * subtree, so a walk stops as soon as no earlier prefix can follow. */
typedef struct {
    int32_t n_nodes;
    int32_t n_orders;
    int32_t *order;
    int32_t *min_below;
    int32_t *first;
    int32_t *count;
    uint8_t *child_byte;
    int32_t *child_node;
    /* per-call scratch: hits per order, and which orders were hit */
    int64_t *hit_lines;
    int64_t *hit_bytes;
    int32_t *touched;
    int32_t n_touched;
} Trie;

#define TRIE_CAPSULE "statsd_filter._fastio.Trie"

static void
trie_destroy(Trie *t)
{
    PyMem_RawFree(t->order);
    PyMem_RawFree(t->min_below);
    PyMem_RawFree(t->first);
    PyMem_RawFree(t->count);
    PyMem_RawFree(t->child_byte);
    PyMem_RawFree(t->child_node);
    PyMem_RawFree(t->hit_lines);
    PyMem_RawFree(t->hit_bytes);
    PyMem_RawFree(t->touched);
    PyMem_RawFree(t);
}

static void
trie_free(PyObject *capsule)
{
    Trie *t = PyCapsule_GetPointer(capsule, TRIE_CAPSULE);
    if (t != NULL)
        trie_destroy(t);
}

static void *
copy_buffer(Py_buffer *view, Py_ssize_t expected_bytes)
{
    if (view->len != expected_bytes) {
        PyErr_SetString(PyExc_ValueError, "trie arrays have inconsistent sizes");
        return NULL;
    }
    void *out = PyMem_RawMalloc(expected_bytes ? (size_t)expected_bytes : 1);
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(out, view->buf, (size_t)expected_bytes);
    return out;
}

static PyObject *
trie_new(PyObject *self, PyObject *args)
{
    Py_buffer order, min_below, first, count, child_byte, child_node;
    int n_orders;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*i:trie_new", &order, &min_below, &first, &count,
                          &child_byte, &child_node, &n_orders))
        return NULL;
    PyObject *result = NULL;
    Trie *t = PyMem_RawCalloc(1, sizeof(Trie));
    if (t == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    t->n_nodes = (int32_t)(order.len / 4);
    t->n_orders = n_orders;
    Py_ssize_t nodes4 = (Py_ssize_t)t->n_nodes * 4;
    Py_ssize_t children = child_byte.len;
    if (t->n_nodes < 1 || n_orders < 0 ||
        (t->order = copy_buffer(&order, nodes4)) == NULL ||
        (t->min_below = copy_buffer(&min_below, nodes4)) == NULL ||
        (t->first = copy_buffer(&first, nodes4)) == NULL ||
        (t->count = copy_buffer(&count, nodes4)) == NULL ||
        (t->child_byte = copy_buffer(&child_byte, children)) == NULL ||
        (t->child_node = copy_buffer(&child_node, children * 4)) == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "a trie needs a root node");
        goto fail;
    }
    for (int32_t i = 0; i < t->n_nodes; i++) {
        if (t->first[i] < 0 || t->count[i] < 0 || (Py_ssize_t)t->first[i] + t->count[i] > children ||
            t->order[i] >= n_orders) {
            PyErr_SetString(PyExc_ValueError, "trie arrays are inconsistent");
            goto fail;
        }
    }
    for (Py_ssize_t i = 0; i < children; i++) {
        if (t->child_node[i] <= 0 || t->child_node[i] >= t->n_nodes) {
            PyErr_SetString(PyExc_ValueError, "trie child out of range");
            goto fail;
        }
    }
    size_t slots = n_orders ? (size_t)n_orders : 1;
    t->hit_lines = PyMem_RawCalloc(slots, sizeof(int64_t));
    t->hit_bytes = PyMem_RawCalloc(slots, sizeof(int64_t));
    t->touched = PyMem_RawCalloc(slots, sizeof(int32_t));
    if (t->hit_lines == NULL || t->hit_bytes == NULL || t->touched == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    result = PyCapsule_New(t, TRIE_CAPSULE, trie_free);
    if (result == NULL)
        goto fail;
    goto done;
fail:
    if (t != NULL)
        trie_destroy(t);
done:
    PyBuffer_Release(&order);
    PyBuffer_Release(&min_below);
    PyBuffer_Release(&first);
    PyBuffer_Release(&count);
    PyBuffer_Release(&child_byte);
    PyBuffer_Release(&child_node);
    return result;
}

/* The listing position of the earliest-listed prefix `line` starts with, or -1. */
static int32_t
trie_match(const Trie *t, const char *line, Py_ssize_t len)
{
    int32_t node = 0, best = INT32_MAX;
    for (Py_ssize_t i = 0; i < len; i++) {
        if (t->min_below[node] >= best)
            break;
        uint8_t c = (uint8_t)line[i];
        int32_t lo = t->first[node], hi = lo + t->count[node] - 1, next = -1;
        while (lo <= hi) {
            int32_t mid = (lo + hi) >> 1;
            uint8_t b = t->child_byte[mid];
            if (b == c) {
                next = t->child_node[mid];
                break;
            }
            if (b < c)
                lo = mid + 1;
            else
                hi = mid - 1;
        }
        if (next < 0)
            break;
        node = next;
        if (t->order[node] >= 0 && t->order[node] < best)
            best = t->order[node];
    }
    return best == INT32_MAX ? -1 : best;
}

static PyObject *
trie_lookup(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    Py_buffer line;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oy*:trie_lookup", &capsule, &line))
        return NULL;
    Trie *t = PyCapsule_GetPointer(capsule, TRIE_CAPSULE);
    PyObject *result = t == NULL ? NULL : PyLong_FromLong(trie_match(t, line.buf, line.len));
    PyBuffer_Release(&line);
    return result;
}

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

/* ------------------------------------------------------------------ recv, filter, pack */

typedef struct {
    PyObject *payloads;
    PyObject *lines;
    char *cur;
    Py_ssize_t cur_len;
    long cur_lines;
    Py_ssize_t max_size; /* 0: chunk mode, every kept line as \n + line in one buffer */
    Py_ssize_t cur_cap;  /* chunk mode: the buffer's size */
} Packer;

static int
packer_append(Packer *p, const char *data, Py_ssize_t len, long lines)
{
    PyObject *payload = PyBytes_FromStringAndSize(data, len);
    if (payload == NULL)
        return -1;
    PyObject *count = PyLong_FromLong(lines);
    if (count == NULL || PyList_Append(p->payloads, payload) < 0 ||
        PyList_Append(p->lines, count) < 0) {
        Py_DECREF(payload);
        Py_XDECREF(count);
        return -1;
    }
    Py_DECREF(payload);
    Py_DECREF(count);
    return 0;
}

static int
packer_seal(Packer *p)
{
    if (p->cur_len == 0)
        return 0;
    int rc = packer_append(p, p->cur, p->cur_len, p->cur_lines);
    p->cur_len = 0;
    p->cur_lines = 0;
    return rc;
}

/* Lines joined by \n into payloads of at most max_size bytes; a line longer
 * than that goes alone, whole (never cut). */
static int
packer_add(Packer *p, const char *line, Py_ssize_t len)
{
    if (p->max_size == 0) { /* chunk mode */
        if (p->cur_len + 1 + len > p->cur_cap) {
            Py_ssize_t cap = p->cur_cap ? p->cur_cap * 2 : 65536;
            while (cap < p->cur_len + 1 + len)
                cap *= 2;
            char *grown = PyMem_RawRealloc(p->cur, (size_t)cap);
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            p->cur = grown;
            p->cur_cap = cap;
        }
        p->cur[p->cur_len++] = '\n';
        memcpy(p->cur + p->cur_len, line, (size_t)len);
        p->cur_len += len;
        p->cur_lines++;
        return 0;
    }
    if (p->cur_len && p->cur_len + 1 + len > p->max_size && packer_seal(p) < 0)
        return -1;
    if (p->cur_len == 0) {
        if (len > p->max_size)
            return packer_append(p, line, len, 1);
        memcpy(p->cur, line, (size_t)len);
        p->cur_len = len;
    } else {
        p->cur[p->cur_len++] = '\n';
        memcpy(p->cur + p->cur_len, line, (size_t)len);
        p->cur_len += len;
    }
    p->cur_lines++;
    return 0;
}

static char *pack_area = NULL;
static Py_ssize_t pack_area_size = 0;

typedef struct {
    int on;
    long long next;      /* the next point, from the start of this read */
    long long step;      /* mean gap */
    unsigned long long rng;
    long long hits_left; /* points allowed before the step widens */
    long long allowance; /* points allowed after each widening */
    long long hits;
    PyObject *lines;     /* [(line, weight_bytes, raw_len), ...] */
} Sampling;

static long long
sample_gap(Sampling *s)
{
    if (s->step <= 1)
        return 1;
    /* xorshift64*: fast, and good enough to keep the gaps from any pattern. */
    unsigned long long x = s->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->rng = x;
    unsigned long long r = x * 0x2545F4914F6CDD1DULL;
    return 1 + (long long)(r % (unsigned long long)(2 * s->step - 1));
}

/* The points on the line spanning [first, last] of the read: record it if any. */
static int
sample_line(Sampling *s, long long first, long long last, const char *line, Py_ssize_t n)
{
    long long weight = 0;
    while (s->next <= last) {
        weight += s->step;
        s->hits++;
        s->next += sample_gap(s);
        if (--s->hits_left <= 0) {
            /* Far more points than the caller allows: space the rest 4 times as
               far, so a flood meeting a small step costs a bounded number of lines. */
            s->step *= 4;
            s->hits_left = s->allowance;
        }
    }
    if (n <= 0)
        return 0; /* an empty line is not a line */
    PyObject *item = Py_BuildValue("(y#LL)", line, n, weight, last - first + 1);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(s->lines, item);
    Py_DECREF(item);
    return rc;
}

static PyObject *
recv_filter_pack(PyObject *self, PyObject *args)
{
    int fd;
    Py_ssize_t max_datagrams, max_line, max_size;
    PyObject *trie_obj, *ring_obj = Py_None, *sample_obj = Py_None;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iovs[MAX_BATCH];
    Packer routed[MAX_TARGETS];
    int32_t n_routed = 0;
    Sampling smp = {0, 0, 1, 1, 1, 1, 0, NULL};
    (void)self;

    if (!PyArg_ParseTuple(args, "inOnn|OO:recv_filter_pack", &fd, &max_datagrams, &trie_obj,
                          &max_line, &max_size, &ring_obj, &sample_obj))
        return NULL;
    if (sample_obj != Py_None) {
        if (!PyArg_ParseTuple(sample_obj, "LLKL:sample", &smp.next, &smp.step, &smp.rng,
                              &smp.hits_left))
            return NULL;
        if (smp.step < 1 || smp.next < 0) {
            PyErr_SetString(PyExc_ValueError, "sample step must be >= 1 and next >= 0");
            return NULL;
        }
        if (smp.rng == 0)
            smp.rng = 0x9E3779B97F4A7C15ULL; /* xorshift must not start at 0 */
        if (smp.hits_left < 1)
            smp.hits_left = 1;
        smp.allowance = smp.hits_left / 4 > 0 ? smp.hits_left / 4 : 1;
        smp.on = 1;
    }
    Ring *ring = NULL;
    if (ring_obj != Py_None) {
        ring = PyCapsule_GetPointer(ring_obj, RING_CAPSULE);
        if (ring == NULL)
            return NULL;
        if (max_size < 1 || ring->n_targets > MAX_TARGETS) {
            PyErr_SetString(PyExc_ValueError, "routing needs max_size and at most 64 targets");
            return NULL;
        }
    }
    if (max_size < 0 || max_line < 1) {
        PyErr_SetString(PyExc_ValueError, "max_line must be positive, max_size not negative");
        return NULL;
    }
    Trie *trie = NULL;
    if (trie_obj != Py_None) {
        trie = PyCapsule_GetPointer(trie_obj, TRIE_CAPSULE);
        if (trie == NULL)
            return NULL;
    }
    if (recv_area == NULL) {
        recv_area = PyMem_RawMalloc((size_t)MAX_BATCH * DATAGRAM_MAX);
        if (recv_area == NULL)
            return PyErr_NoMemory();
    }
    Py_ssize_t area_needed = max_size * (ring ? ring->n_targets : 1);
    if (max_size > 0 && pack_area_size < area_needed) {
        char *area = PyMem_RawRealloc(pack_area, (size_t)area_needed);
        if (area == NULL)
            return PyErr_NoMemory();
        pack_area = area;
        pack_area_size = area_needed;
    }
    /* With a ring, p collects (as one chunk) the lines Python must route. */
    Packer p = {PyList_New(0), PyList_New(0), ring || !max_size ? NULL : pack_area, 0, 0,
                ring ? 0 : max_size, 0};
    if (p.payloads == NULL || p.lines == NULL)
        goto fail;
    if (smp.on && (smp.lines = PyList_New(0)) == NULL)
        goto fail;
    if (ring != NULL) {
        for (; n_routed < ring->n_targets; n_routed++) {
            Packer *q = &routed[n_routed];
            *q = (Packer){PyList_New(0), PyList_New(0), pack_area + n_routed * max_size, 0, 0,
                          max_size, 0};
            if (q->payloads == NULL || q->lines == NULL) {
                Py_XDECREF(q->payloads);
                Py_XDECREF(q->lines);
                goto fail;
            }
        }
    }

    long long datagrams = 0, bytes_in = 0, received = 0, blocked = 0, oversize = 0;
    long long vpos = 0; /* where the current datagram starts in the joined read */
    int error = 0;
    while (datagrams < max_datagrams) {
        Py_ssize_t want = max_datagrams - datagrams;
        if (want > MAX_BATCH)
            want = MAX_BATCH;
        memset(msgs, 0, sizeof(msgs));
        for (Py_ssize_t i = 0; i < want; i++) {
            iovs[i].iov_base = recv_area + (size_t)i * DATAGRAM_MAX;
            iovs[i].iov_len = DATAGRAM_MAX;
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int got = recvmmsg(fd, msgs, (unsigned int)want, MSG_DONTWAIT, NULL);
        if (got < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                error = errno;
            break;
        }
        for (int k = 0; k < got; k++) {
            const char *data = iovs[k].iov_base;
            Py_ssize_t len = (Py_ssize_t)msgs[k].msg_len;
            datagrams++;
            bytes_in += len;
            Py_ssize_t start = 0;
            while (start <= len) {
                const char *nl = memchr(data + start, '\n', (size_t)(len - start));
                Py_ssize_t end = nl ? (Py_ssize_t)(nl - data) : len;
                const char *line = data + start;
                Py_ssize_t n = end - start;
                if (n > 0 && line[n - 1] == '\r')
                    n--; /* a \r\n ending: the \r is not part of the line */
                if (smp.on && smp.next <= vpos + end &&
                    sample_line(&smp, vpos + start, vpos + end, line, n) < 0)
                    goto fail;
                if (n > 0) {
                    received++;
                    int32_t owner;
                    if (n > max_line) {
                        oversize++;
                    } else if (trie != NULL && (owner = trie_match(trie, line, n)) >= 0) {
                        blocked++;
                        if (trie->hit_lines[owner] == 0)
                            trie->touched[trie->n_touched++] = owner;
                        trie->hit_lines[owner]++;
                        trie->hit_bytes[owner] += n + 1;
                    } else if (ring != NULL) {
                        int32_t target = ring_route(ring, line, n);
                        if (packer_add(target >= 0 ? &routed[target] : &p, line, n) < 0)
                            goto fail;
                    } else if (packer_add(&p, line, n) < 0) {
                        goto fail;
                    }
                }
                if (nl == NULL)
                    break;
                start = end + 1;
            }
            vpos += len + 1;
        }
        if (got < want)
            break; /* the socket is empty */
    }
    if (ring != NULL) {
        /* payloads/lines become one list per target, then the chunk to route in Python. */
        PyObject *all_payloads = PyList_New(0), *all_lines = PyList_New(0);
        if (all_payloads == NULL || all_lines == NULL) {
            Py_XDECREF(all_payloads);
            Py_XDECREF(all_lines);
            goto fail;
        }
        for (int32_t t = 0; t < n_routed; t++) {
            if (packer_seal(&routed[t]) < 0 ||
                PyList_Append(all_payloads, routed[t].payloads) < 0 ||
                PyList_Append(all_lines, routed[t].lines) < 0) {
                Py_DECREF(all_payloads);
                Py_DECREF(all_lines);
                goto fail;
            }
        }
        for (int32_t t = 0; t < n_routed; t++) {
            Py_CLEAR(routed[t].payloads);
            Py_CLEAR(routed[t].lines);
        }
        n_routed = 0;
        PyObject *rest = PyList_New(1), *rest_lines = PyList_New(1);
        PyObject *chunk = PyBytes_FromStringAndSize(p.cur_len ? p.cur : "", p.cur_len);
        PyObject *count = PyLong_FromLong(p.cur_lines);
        PyMem_RawFree(p.cur);
        p.cur = NULL;
        if (rest == NULL || rest_lines == NULL || chunk == NULL || count == NULL) {
            Py_XDECREF(rest);
            Py_XDECREF(rest_lines);
            Py_XDECREF(chunk);
            Py_XDECREF(count);
            Py_DECREF(all_payloads);
            Py_DECREF(all_lines);
            goto fail;
        }
        PyList_SET_ITEM(rest, 0, chunk);       /* steals */
        PyList_SET_ITEM(rest_lines, 0, count); /* steals */
        int appended = PyList_Append(all_payloads, rest) == 0 &&
                       PyList_Append(all_lines, rest_lines) == 0;
        Py_DECREF(rest);
        Py_DECREF(rest_lines);
        if (!appended) {
            Py_DECREF(all_payloads);
            Py_DECREF(all_lines);
            goto fail;
        }
        Py_SETREF(p.payloads, all_payloads);
        Py_SETREF(p.lines, all_lines);
    } else if (max_size == 0) {
        /* Chunk mode: the kept lines as one b"\n"-led chunk, the filter's shape. */
        PyObject *chunk = PyBytes_FromStringAndSize(p.cur_len ? p.cur : "", p.cur_len);
        PyObject *count = chunk == NULL ? NULL : PyLong_FromLong(p.cur_lines);
        PyMem_RawFree(p.cur);
        p.cur = NULL;
        if (count == NULL || PyList_Append(p.payloads, chunk) < 0 ||
            PyList_Append(p.lines, count) < 0) {
            Py_XDECREF(chunk);
            Py_XDECREF(count);
            goto fail;
        }
        Py_DECREF(chunk);
        Py_DECREF(count);
    } else if (packer_seal(&p) < 0) {
        goto fail;
    }

    PyObject *hits = PyList_New(0);
    if (hits == NULL)
        goto fail;
    if (trie != NULL) {
        for (int32_t i = 0; i < trie->n_touched; i++) {
            int32_t o = trie->touched[i];
            PyObject *hit = Py_BuildValue("(iLL)", o, (long long)trie->hit_lines[o],
                                          (long long)trie->hit_bytes[o]);
            trie->hit_lines[o] = 0;
            trie->hit_bytes[o] = 0;
            if (hit == NULL || PyList_Append(hits, hit) < 0) {
                Py_XDECREF(hit);
                for (int32_t j = i + 1; j < trie->n_touched; j++) {
                    trie->hit_lines[trie->touched[j]] = 0;
                    trie->hit_bytes[trie->touched[j]] = 0;
                }
                trie->n_touched = 0;
                Py_DECREF(hits);
                goto fail;
            }
            Py_DECREF(hit);
        }
        trie->n_touched = 0;
    }
    PyObject *sampled = Py_None;
    Py_INCREF(Py_None);
    if (smp.on) {
        Py_DECREF(Py_None);
        sampled = Py_BuildValue("(NLLKL)", smp.lines, smp.next - vpos, smp.step, smp.rng,
                                smp.hits);
        smp.lines = NULL;
        if (sampled == NULL) {
            Py_DECREF(hits);
            goto fail;
        }
    }
    return Py_BuildValue("(NNLLLLLNiN)", p.payloads, p.lines, datagrams, bytes_in, received,
                         blocked, oversize, hits, error, sampled);
fail:
    Py_XDECREF(smp.lines);
    if (max_size == 0 || ring != NULL)
        PyMem_RawFree(p.cur);
    for (int32_t t = 0; t < n_routed; t++) {
        Py_XDECREF(routed[t].payloads);
        Py_XDECREF(routed[t].lines);
    }
    if (trie != NULL) {
        for (int32_t j = 0; j < trie->n_touched; j++) {
            trie->hit_lines[trie->touched[j]] = 0;
            trie->hit_bytes[trie->touched[j]] = 0;
        }
        trie->n_touched = 0;
    }
    Py_XDECREF(p.payloads);
    Py_XDECREF(p.lines);
    return NULL;
}

/* Pack the lines of a chunk (b"\n" + lines joined by b"\n", what the rules leave)
 * into payloads of at most max_size bytes, as the Python batcher does: the
 * rules' configurations keep C packing after their per-chunk pass in Python. */
static PyObject *
pack_chunk(PyObject *self, PyObject *args)
{
    Py_buffer chunk;
    Py_ssize_t max_size;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*n:pack_chunk", &chunk, &max_size))
        return NULL;
    if (max_size < 1) {
        PyBuffer_Release(&chunk);
        PyErr_SetString(PyExc_ValueError, "max_size must be positive");
        return NULL;
    }
    if (pack_area_size < max_size) {
        char *area = PyMem_RawRealloc(pack_area, (size_t)max_size);
        if (area == NULL) {
            PyBuffer_Release(&chunk);
            return PyErr_NoMemory();
        }
        pack_area = area;
        pack_area_size = max_size;
    }
    Packer p = {PyList_New(0), PyList_New(0), pack_area, 0, 0, max_size, 0};
    const char *data = chunk.buf;
    Py_ssize_t len = chunk.len, start = 0;
    if (p.payloads == NULL || p.lines == NULL)
        goto fail;
    while (start < len) {
        const char *nl = memchr(data + start, '\n', (size_t)(len - start));
        Py_ssize_t end = nl ? (Py_ssize_t)(nl - data) : len;
        if (end > start && packer_add(&p, data + start, end - start) < 0)
            goto fail;
        start = end + 1;
    }
    if (packer_seal(&p) < 0)
        goto fail;
    PyBuffer_Release(&chunk);
    return Py_BuildValue("(NN)", p.payloads, p.lines);
fail:
    PyBuffer_Release(&chunk);
    Py_XDECREF(p.payloads);
    Py_XDECREF(p.lines);
    return NULL;
}

/* ------------------------------------------------------------------------
 * Limit rules. Keys are 63-bit (the top bit marks a budget entry; 0 means
 * "empty slot"). Layouts and meanings: statsd_filter/rules/limittable.py.
 */

#define LEN_MULT 0xff51afd7ed558ccdULL
#define KEY_MASK 0x7fffffffffffffffULL
#define GOLDEN 0x9e3779b97f4a7c15ULL

/* Shared table: header words, then offenders, then the two tables. */
#define H_SLOTS 1
#define H_CAP 2
#define H_WINDOW 3
#define H_ADMITTED 4
#define H_USED 5
#define H_REFUSED 6
#define H_UNTRACKED 7
#define H_AT_CAP 8
#define H_BUDGETS 9
#define H_FIRST_WINDOW_FIELD H_ADMITTED
#define H_LAST_WINDOW_FIELD H_BUDGETS
#define HEADER_WORDS 16
#define OFFENDERS 8
#define OFFENDER_WORDS 16
#define OFFENDER_NAME (8 * (OFFENDER_WORDS - 2))
#define TABLE_OFFSET (HEADER_WORDS + OFFENDERS * OFFENDER_WORDS)

#define R_ADMITTED 1
#define R_NEW 2
#define R_AT_CAP 4
#define R_UNTRACKED 8

/* Local cache: two header words (count, mask), then (key, value) pairs; a
 * value is epoch << 32 | slot << 2 | decision. */
#define PASS 1
#define REFUSED 2
#define CACHE_SLOT(v) (((v) >> 2) & 0x3fffffffULL)
#define SCAN_BATCH 16

static inline uint64_t
load_word(const unsigned char *p, Py_ssize_t r, const unsigned char *end)
{
    /* The next min(r, 8) bytes as a little-endian word, zero-padded. A whole
     * 8-byte load (masked) when the buffer goes on that far: a variable-size
     * memcpy would be a library call per word. */
    uint64_t w = 0;
    if (r >= 8 || p + 8 <= end) {
        memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        if (r < 8)
            w &= (1ULL << (8 * r)) - 1;
    } else {
        for (Py_ssize_t k = 0; k < r; k++)
            w |= (uint64_t)p[k] << (8 * k);
    }
    return w;
}

static inline uint64_t
word_hash(const unsigned char *p, Py_ssize_t n, const unsigned char *end)
{
    /* Eight bytes per step; ``end`` is where the readable buffer ends. */
    uint64_t h = (uint64_t)n * LEN_MULT;
    for (Py_ssize_t i = 0; i < n; i += 8) {
        h = (h ^ load_word(p + i, n - i, end)) * GOLDEN;
        h ^= h >> 32;
    }
    return h;
}

static inline uint64_t
mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t
as_key(uint64_t h)
{
    h &= KEY_MASK;
    return h ? h : 1;
}

static inline Py_ssize_t
find_byte(const unsigned char *p, Py_ssize_t from, Py_ssize_t n, unsigned char c)
{
    const unsigned char *hit = from < n ? memchr(p + from, c, (size_t)(n - from)) : NULL;
    return hit ? (Py_ssize_t)(hit - p) : n;
}

static uint64_t
series_key_of(const unsigned char *p, Py_ssize_t n, const unsigned char *limit)
{
    Py_ssize_t colon = find_byte(p, 0, n, ':');
    Py_ssize_t bar = find_byte(p, 0, n, '|');
    uint64_t name = word_hash(p, colon, limit);
    uint64_t type = word_hash(p, 0, limit);
    uint64_t tags = 0;
    if (bar < n) {
        Py_ssize_t end = find_byte(p, bar + 1, n, '|');
        type = word_hash(p + bar + 1, end - bar - 1, limit);
    }
    for (Py_ssize_t pos = bar; pos < n;) {
        Py_ssize_t start = pos + 1;
        Py_ssize_t end = find_byte(p, start, n, '|');
        if (end > start && p[start] == '#') {
            for (Py_ssize_t s = start + 1; s <= end;) {
                Py_ssize_t e = find_byte(p, s, end, ',');
                if (e > s)
                    tags += mix64(word_hash(p + s, e - s, limit));
                s = e + 1;
            }
            break;
        }
        pos = end;
    }
    uint64_t h = mix64(mix64(name) ^ (type * GOLDEN));
    return as_key(mix64(h + tags));
}

static int
rate_ok(const unsigned char *p, Py_ssize_t n)
{
    /* Conservative: digits with at most one '.', 0 < value <= 1. Python's
     * float() reads every such string to the same value. */
    Py_ssize_t dots = 0, digits = 0, dot = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] >= '0' && p[i] <= '9')
            digits++;
        else if (p[i] == '.') {
            dots++;
            dot = i;
        } else
            return 0;
    }
    if (dots > 1 || digits == 0)
        return 0;
    Py_ssize_t i = 0;
    while (i < dot && p[i] == '0')
        i++;
    int frac_nonzero = 0;
    for (Py_ssize_t k = dot + 1; k < n; k++)
        if (p[k] != '0')
            frac_nonzero = 1;
    if (i == dot)
        return frac_nonzero; /* 0.xxx */
    return dot - i == 1 && p[i] == '1' && !frac_nonzero; /* exactly 1 */
}

static uint64_t
metric_key(const unsigned char *p, Py_ssize_t n, const unsigned char *limit)
{
    /* The series key of a line that is surely a well-formed metric (what
     * series_key_of gives), or 0 when Line.kind might say otherwise. One pass:
     * this runs for every line of a chunk the limits scan. */
    if (n >= 3 && p[0] == '_' && ((p[1] == 'e' && p[2] == '{') || (n >= 4 && p[1] == 's' && p[2] == 'c' && p[3] == '|')))
        return 0;
    Py_ssize_t bar = find_byte(p, 0, n, '|');
    if (bar == n)
        return 0;
    Py_ssize_t colon = find_byte(p, 0, bar, ':');
    if (colon == bar || colon == 0 || colon == bar - 1)
        return 0;
    Py_ssize_t tend = find_byte(p, bar + 1, n, '|');
    const unsigned char *t = p + bar + 1;
    Py_ssize_t tlen = tend - bar - 1;
    int is_set = tlen == 1 && t[0] == 's';
    int type_ok = is_set || (tlen == 1 && (t[0] == 'c' || t[0] == 'g' || t[0] == 'h' || t[0] == 'd')) ||
                  (tlen == 2 && t[0] == 'm' && t[1] == 's');
    if (!type_ok)
        return 0;
    if (!is_set) {
        Py_ssize_t run = 0;
        for (Py_ssize_t i = colon + 1; i <= bar; i++) {
            if (i == bar || p[i] == ':') {
                if (run == 0)
                    return 0;
                run = 0;
                continue;
            }
            unsigned char c = p[i];
            if (!((c >= '0' && c <= '9') || c == '+' || c == '-' || c == '.' || c == 'e' || c == 'E'))
                return 0;
            run++;
        }
    }
    uint64_t tags = 0;
    int tagged = 0;
    for (Py_ssize_t pos = tend; pos < n;) {
        Py_ssize_t start = pos + 1;
        Py_ssize_t end = find_byte(p, start, n, '|');
        if (end > start) {
            if (p[start] == '@') {
                if (!rate_ok(p + start + 1, end - start - 1))
                    return 0;
            } else if (p[start] == '#' && !tagged) {
                tagged = 1;
                for (Py_ssize_t s = start + 1; s <= end;) {
                    Py_ssize_t e = find_byte(p, s, end, ',');
                    if (e > s)
                        tags += mix64(word_hash(p + s, e - s, limit));
                    s = e + 1;
                }
            }
        }
        pos = end;
    }
    uint64_t h = mix64(mix64(word_hash(p, colon, limit)) ^ (word_hash(t, tlen, limit) * GOLDEN));
    return as_key(mix64(h + tags));
}

static PyObject *
series_key(PyObject *self, PyObject *args)
{
    Py_buffer raw;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*:series_key", &raw))
        return NULL;
    uint64_t key = series_key_of(raw.buf, raw.len, (const unsigned char *)raw.buf + raw.len);
    PyBuffer_Release(&raw);
    return PyLong_FromUnsignedLongLong(key);
}

static PyObject *
hash_key(PyObject *self, PyObject *args)
{
    Py_buffer raw;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*:hash_key", &raw))
        return NULL;
    uint64_t key = as_key(mix64(word_hash(raw.buf, raw.len, (const unsigned char *)raw.buf + raw.len)));
    PyBuffer_Release(&raw);
    return PyLong_FromUnsignedLongLong(key);
}

static PyObject *
metric_key_py(PyObject *self, PyObject *args)
{
    Py_buffer raw;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*:metric_key", &raw))
        return NULL;
    uint64_t key = metric_key(raw.buf, raw.len, (const unsigned char *)raw.buf + raw.len);
    PyBuffer_Release(&raw);
    return PyLong_FromUnsignedLongLong(key);
}

/* The local cache in a writable buffer; NULL (with an exception) if malformed. */
static uint64_t *
cache_words(Py_buffer *buf, uint64_t *mask)
{
    uint64_t *w = buf->buf;
    if (buf->len < 16 || ((uintptr_t)w & 7)) {
        PyErr_SetString(PyExc_ValueError, "not a cache buffer");
        return NULL;
    }
    *mask = w[1];
    if (((*mask + 1) & *mask) != 0 || (uint64_t)buf->len < 16 + (*mask + 1) * 16) {
        PyErr_SetString(PyExc_ValueError, "cache buffer too small for its mask");
        return NULL;
    }
    return w;
}

static inline int64_t
cache_lookup(const uint64_t *w, uint64_t mask, uint64_t key)
{
    const uint64_t *slots = w + 2;
    for (uint64_t i = key & mask;; i = (i + 1) & mask) {
        uint64_t k = slots[2 * i];
        if (k == key)
            return (int64_t)slots[2 * i + 1];
        if (k == 0)
            return -1;
    }
}

static inline uint64_t *
cache_entry(uint64_t *w, uint64_t mask, uint64_t key)
{
    uint64_t *slots = w + 2;
    for (uint64_t i = key & mask;; i = (i + 1) & mask) {
        uint64_t k = slots[2 * i];
        if (k == key)
            return &slots[2 * i + 1];
        if (k == 0)
            return NULL;
    }
}

static PyObject *
cache_get(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long key;
    uint64_t mask;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*K:cache_get", &buf, &key))
        return NULL;
    uint64_t *w = cache_words(&buf, &mask);
    int64_t value = w ? cache_lookup(w, mask, key) : -1;
    PyBuffer_Release(&buf);
    if (w == NULL)
        return NULL;
    return PyLong_FromLongLong(value);
}

static PyObject *
cache_put(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long key, value, limit;
    uint64_t mask;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*KKK:cache_put", &buf, &key, &value, &limit))
        return NULL;
    uint64_t *w = cache_words(&buf, &mask);
    if (w == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    int stored = 0;
    if (key != 0 && limit <= mask / 2 + 1) {
        uint64_t *slots = w + 2;
        for (uint64_t i = key & mask;; i = (i + 1) & mask) {
            if (slots[2 * i] == key) {
                slots[2 * i + 1] = value;
                stored = 1;
                break;
            }
            if (slots[2 * i] == 0) {
                if (w[0] < limit) {
                    slots[2 * i + 1] = value;
                    slots[2 * i] = key;
                    w[0]++;
                    stored = 1;
                }
                break;
            }
        }
    }
    PyBuffer_Release(&buf);
    return PyBool_FromLong(stored);
}

static PyObject *
cache_copy(PyObject *self, PyObject *args)
{
    /* Every key of one cache into another (a larger one: the cache grows). */
    Py_buffer src, dst;
    uint64_t smask, dmask;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*w*:cache_copy", &src, &dst))
        return NULL;
    uint64_t *s = cache_words(&src, &smask);
    uint64_t *d = s ? cache_words(&dst, &dmask) : NULL;
    if (d != NULL && s[0] > dmask / 2) {
        PyErr_SetString(PyExc_ValueError, "cache_copy: the destination is too small");
        d = NULL;
    }
    if (d != NULL) {
        for (uint64_t i = 0; i <= smask; i++) {
            uint64_t key = s[2 + 2 * i];
            if (key == 0)
                continue;
            uint64_t j = key & dmask;
            while (d[2 + 2 * j] != 0)
                j = (j + 1) & dmask;
            d[2 + 2 * j] = key;
            d[3 + 2 * j] = s[3 + 2 * i];
            d[0]++;
        }
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (d == NULL)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
cache_clear(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    uint64_t mask;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*:cache_clear", &buf))
        return NULL;
    uint64_t *w = cache_words(&buf, &mask);
    if (w != NULL) {
        memset(w + 2, 0, (size_t)(mask + 1) * 16);
        w[0] = 0;
    }
    PyBuffer_Release(&buf);
    if (w == NULL)
        return NULL;
    Py_RETURN_NONE;
}

static void
offender_add(unsigned char *base, const unsigned char *label, Py_ssize_t len)
{
    if (len > OFFENDER_NAME)
        len = OFFENDER_NAME;
    uint64_t *first = (uint64_t *)base + HEADER_WORDS;
    uint64_t *empty = NULL, *least = NULL;
    for (int k = 0; k < OFFENDERS; k++) {
        uint64_t *o = first + k * OFFENDER_WORDS;
        if (o[0] == 0) {
            if (empty == NULL)
                empty = o;
            continue;
        }
        if (o[1] == (uint64_t)len && memcmp(o + 2, label, (size_t)len) == 0) {
            o[0]++;
            return;
        }
        if (least == NULL || o[0] < least[0])
            least = o;
    }
    /* Space-saving: a new name takes an empty slot, or the least counted
     * one's slot and count (so a heavy hitter is never under-counted). */
    uint64_t *o = empty != NULL ? empty : least;
    uint64_t count = empty != NULL ? 1 : least[0] + 1;
    memset(o + 2, 0, OFFENDER_NAME);
    memcpy(o + 2, label, (size_t)len);
    o[1] = (uint64_t)len;
    o[0] = count;
}

/* Decide one series under the table's lock (see limittable.admit); -1 if the
 * buffer is not a table or the key is out of range. */
static int
admit_core(unsigned char *base, Py_ssize_t len, uint64_t key, uint64_t budget, uint64_t limit,
           uint64_t window, const unsigned char *label, Py_ssize_t label_len)
{
    uint64_t *w = (uint64_t *)base;
    uint64_t slots = len >= HEADER_WORDS * 8 ? w[H_SLOTS] : 0;
    if (slots == 0 || (slots & (slots - 1)) != 0 || ((uintptr_t)w & 7) ||
        (uint64_t)len < (TABLE_OFFSET + 3 * slots) * 8 || key == 0 || (key >> 63))
        return -1;
    uint64_t mask = slots - 1, cap = w[H_CAP];
    if (cap > slots / 2) /* the probes end only while half the slots are free */
        return -2;
    uint64_t *adm = w + TABLE_OFFSET, *ref = adm + 2 * slots;
    int result = 0;
    if (window + 1 < w[H_WINDOW])
        window = w[H_WINDOW] - 1; /* a clock a hair behind: the table has moved on */
    if (w[H_WINDOW] != window + 1) {
        /* A new window: forget everything; the window number is written last,
         * so a worker killed half-way leaves a table the next one clears again. */
        memset(adm, 0, (size_t)(3 * slots * 8));
        memset(w + HEADER_WORDS, 0, OFFENDERS * OFFENDER_WORDS * 8);
        for (int f = H_FIRST_WINDOW_FIELD; f <= H_LAST_WINDOW_FIELD; f++)
            w[f] = 0;
        __atomic_store_n(&w[H_WINDOW], window + 1, __ATOMIC_RELEASE);
    }
    uint64_t i = key & mask;
    for (; adm[2 * i] != 0; i = (i + 1) & mask)
        if (adm[2 * i] == key)
            return R_ADMITTED;
    uint64_t j = key & mask;
    for (; ref[j] != 0; j = (j + 1) & mask)
        if (ref[j] == key)
            return 0; /* refused before in this window */
    uint64_t count = w[H_ADMITTED], b = 0;
    int budget_found = 0;
    if (budget != 0) {
        count = 0;
        for (b = budget & mask; adm[2 * b] != 0; b = (b + 1) & mask)
            if (adm[2 * b] == budget) {
                budget_found = 1;
                count = adm[2 * b + 1];
                break;
            }
    }
    if (count < limit) {
        uint64_t need = 1 + (budget != 0 && !budget_found);
        if (w[H_USED] + need <= cap) {
            adm[2 * i + 1] = 1;
            __atomic_store_n(&adm[2 * i], key, __ATOMIC_RELEASE);
            if (budget != 0) {
                if (!budget_found) {
                    /* Probe again: the series may have taken the budget's free slot. */
                    for (b = budget & mask; adm[2 * b] != 0; b = (b + 1) & mask)
                        ;
                    adm[2 * b + 1] = 0;
                    __atomic_store_n(&adm[2 * b], budget, __ATOMIC_RELEASE);
                    w[H_BUDGETS]++;
                }
                adm[2 * b + 1]++;
            }
            w[H_ADMITTED]++;
            w[H_USED] += need;
            return R_ADMITTED | R_NEW;
        }
        result |= R_AT_CAP;
        w[H_AT_CAP]++;
    }
    result |= R_NEW;
    if (w[H_REFUSED] < cap) {
        __atomic_store_n(&ref[j], key, __ATOMIC_RELEASE);
        w[H_REFUSED]++;
    } else {
        result |= R_UNTRACKED;
        w[H_UNTRACKED]++;
    }
    offender_add(base, label, label_len);
    return result;
}

/* 1: admitted in ``window``, 0: refused in it, -1: not known there (ask under
 * the lock). Without the lock: within a window the tables only grow, and a key
 * is published after its value, so a key found is a decision made. */
static int
table_peek(const uint64_t *w, Py_ssize_t len, uint64_t key, uint64_t window)
{
    if (len < HEADER_WORDS * 8)
        return -1;
    uint64_t slots = w[H_SLOTS];
    if (slots == 0 || (slots & (slots - 1)) || (uint64_t)len < (TABLE_OFFSET + 3 * slots) * 8 ||
        w[H_CAP] > slots / 2)
        return -1;
    if (__atomic_load_n(&w[H_WINDOW], __ATOMIC_ACQUIRE) != window + 1)
        return -1;
    uint64_t mask = slots - 1;
    const uint64_t *adm = w + TABLE_OFFSET, *ref = adm + 2 * slots;
    for (uint64_t i = key & mask;; i = (i + 1) & mask) {
        uint64_t k = __atomic_load_n(&adm[2 * i], __ATOMIC_ACQUIRE);
        if (k == key)
            return 1;
        if (k == 0)
            break;
    }
    for (uint64_t j = key & mask;; j = (j + 1) & mask) {
        uint64_t k = __atomic_load_n(&ref[j], __ATOMIC_ACQUIRE);
        if (k == key)
            return 0;
        if (k == 0)
            break;
    }
    return -1;
}

static PyObject *
limit_peek(PyObject *self, PyObject *args)
{
    Py_buffer table;
    unsigned long long key, window;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*KK:limit_peek", &table, &key, &window))
        return NULL;
    int known = ((uintptr_t)table.buf & 7) ? -1 : table_peek(table.buf, table.len, key, window);
    PyBuffer_Release(&table);
    return PyLong_FromLong(known);
}

typedef struct {
    Py_buffer buf;
    int held;
    int drop;
    uint64_t window;
    uint64_t limit;         /* 0: the scan may only read this table */
    const char *per_tag;    /* "key:" of per_tag, or "" */
    Py_ssize_t per_tag_len;
    int lock_fd;            /* -1: no lock (private memory) */
    long long lock_byte;
    int locked;
} ScanTable;

/* counts[slot * COUNT_FIELDS + f]: lines passed, series newly refused, cap hits */
#define COUNT_FIELDS 4
#define C_PASSED 0
#define C_SERIES_LIMITED 1
#define C_TRACKING_FULL 2

static int
set_lock(ScanTable *t, short type)
{
    if (t->lock_fd < 0)
        return 0;
    struct flock fl;
    memset(&fl, 0, sizeof(fl));
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)t->lock_byte;
    fl.l_len = 1;
    for (;;) {
        if (fcntl(t->lock_fd, F_SETLKW, &fl) == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* The budget key and offender label of a line, as limits.Limiter computes them. */
static uint64_t
line_budget(const unsigned char *p, Py_ssize_t n, const unsigned char *limit, const ScanTable *t,
            unsigned char *label, Py_ssize_t *label_len)
{
    Py_ssize_t colon = find_byte(p, 0, n, ':');
    Py_ssize_t len = colon < OFFENDER_NAME ? colon : OFFENDER_NAME;
    memcpy(label, p, (size_t)len);
    *label_len = len;
    if (t->per_tag_len == 0)
        return 0;
    const unsigned char *tag = NULL;
    Py_ssize_t tag_len = 0;
    Py_ssize_t bar = find_byte(p, 0, n, '|');
    for (Py_ssize_t pos = bar; pos < n && tag == NULL;) {
        Py_ssize_t start = pos + 1;
        Py_ssize_t end = find_byte(p, start, n, '|');
        if (end > start && p[start] == '#') {
            for (Py_ssize_t s = start + 1; s <= end;) {
                Py_ssize_t e = find_byte(p, s, end, ',');
                if (e - s >= t->per_tag_len && memcmp(p + s, t->per_tag, (size_t)t->per_tag_len) == 0) {
                    tag = p + s;
                    tag_len = e - s;
                    break;
                }
                s = e + 1;
            }
            break;
        }
        pos = end;
    }
    /* name, a space, then the tag (or "key:(none)") */
    const unsigned char *extra = tag ? tag : (const unsigned char *)t->per_tag;
    Py_ssize_t extra_len = tag ? tag_len : t->per_tag_len;
    const char *none = tag ? "" : "(none)";
    Py_ssize_t none_len = tag ? 0 : 6;
    if (len < OFFENDER_NAME)
        label[len++] = ' ';
    Py_ssize_t take = extra_len < OFFENDER_NAME - len ? extra_len : OFFENDER_NAME - len;
    memcpy(label + len, extra, (size_t)take);
    len += take;
    take = none_len < OFFENDER_NAME - len ? none_len : OFFENDER_NAME - len;
    memcpy(label + len, none, (size_t)take);
    *label_len = len + take;
    if (tag == NULL)
        return 1ULL << 63 | 1;
    return 1ULL << 63 | as_key(mix64(word_hash(tag, tag_len, limit)));
}

static void
unlock_tables(ScanTable *tables, Py_ssize_t count)
{
    for (Py_ssize_t i = 0; i < count; i++)
        if (tables[i].locked) {
            set_lock(&tables[i], F_UNLCK);
            tables[i].locked = 0;
        }
}

static void
release_tables(ScanTable *tables, Py_ssize_t count)
{
    unlock_tables(tables, count);
    for (Py_ssize_t i = 0; i < count; i++)
        if (tables[i].held)
            PyBuffer_Release(&tables[i].buf);
    PyMem_Free(tables);
}

static int
take_tables(PyObject *seq, ScanTable **out, Py_ssize_t *count)
{
    PyObject *fast = PySequence_Fast(seq, "limit_scan needs a sequence of tables");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    ScanTable *tables = PyMem_Calloc((size_t)(n ? n : 1), sizeof(ScanTable));
    if (tables == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (item == Py_None)
            continue;
        PyObject *memory, *window, *drop;
        unsigned long long limit = 0;
        const char *per_tag = "";
        Py_ssize_t per_tag_len = 0;
        int lock_fd = -1;
        long long lock_byte = 0;
        if (!PyArg_ParseTuple(item, "OOO|Ky#iL:limit table", &memory, &window, &drop, &limit,
                              &per_tag, &per_tag_len, &lock_fd, &lock_byte) ||
            PyObject_GetBuffer(memory, &tables[i].buf, limit ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
            release_tables(tables, i);
            Py_DECREF(fast);
            return -1;
        }
        tables[i].held = 1;
        tables[i].window = PyLong_AsUnsignedLongLong(window);
        tables[i].drop = PyObject_IsTrue(drop);
        tables[i].limit = limit;
        tables[i].per_tag = per_tag; /* the tuple keeps the bytes alive for the call */
        tables[i].per_tag_len = per_tag_len;
        tables[i].lock_fd = lock_fd;
        tables[i].lock_byte = lock_byte;
        if (PyErr_Occurred() || ((uintptr_t)tables[i].buf.buf & 7)) {
            release_tables(tables, i + 1);
            Py_DECREF(fast);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a limit table must be 8-byte aligned");
            return -1;
        }
    }
    Py_DECREF(fast);
    *out = tables;
    *count = n;
    return 0;
}

static int
append_code(PyObject *list, Py_ssize_t at, uint64_t slot, int drop)
{
    /* offset << 17 | slot << 1 | drop (slots beyond 16 bits are never dropped here) */
    PyObject *code = PyLong_FromUnsignedLongLong((uint64_t)at << 17 | (drop ? slot << 1 | 1 : 0));
    if (code == NULL)
        return -1;
    int rc = PyList_Append(list, code);
    Py_DECREF(code);
    return rc;
}

static PyObject *
limit_scan(PyObject *self, PyObject *args)
{
    Py_buffer chunk, cache, counts;
    unsigned long long epoch;
    PyObject *table_seq;
    uint64_t mask;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*w*KO:limit_scan", &chunk, &cache, &counts, &epoch, &table_seq))
        return NULL;
    ScanTable *tables = NULL; /* taken when an expired entry first needs them */
    Py_ssize_t ntables = 0;
    int have_tables = 0;
    PyObject *codes = NULL;
    uint64_t *w = cache_words(&cache, &mask);
    if (w == NULL)
        goto done;
    codes = PyList_New(0);
    if (codes == NULL)
        goto done;
    {
        const unsigned char *p = chunk.buf;
        Py_ssize_t n = chunk.len, pos = 0;
        int64_t *count = counts.buf;
        uint64_t ncounts = (uint64_t)counts.len / 8;
        uint64_t *slots = w + 2;
        /* Lines go in batches: hash a batch and prefetch each line's slot, then
         * probe in order. The probes are cache misses in a table of megabytes;
         * issued together they overlap instead of waiting one after another. */
        Py_ssize_t at[SCAN_BATCH];
        uint64_t key[SCAN_BATCH];
        int ok[SCAN_BATCH];
        while (pos < n) {
            int got = 0;
            while (got < SCAN_BATCH && pos < n) {
                Py_ssize_t start = p[pos] == '\n' ? pos + 1 : pos;
                Py_ssize_t end = find_byte(p, start, n, '\n');
                at[got] = pos;
                ok[got] = 2; /* an empty line: nothing to judge */
                if (end > start) {
                    key[got] = metric_key(p + start, end - start, p + n);
                    ok[got] = key[got] != 0;
                    if (ok[got])
                        __builtin_prefetch(slots + 2 * (key[got] & mask), 0, 0);
                }
                got++;
                pos = end;
            }
            for (int k = 0; k < got; k++) {
                if (ok[k] == 2)
                    continue;
                uint64_t *entry = ok[k] ? cache_entry(w, mask, key[k]) : NULL;
                if (entry == NULL) {
                    if (append_code(codes, at[k], 0, 0) < 0)
                        goto fail;
                    continue;
                }
                uint64_t v = *entry, slot = CACHE_SLOT(v), decision = v & 3;
                if (slot * COUNT_FIELDS >= ncounts) {
                    if (append_code(codes, at[k], 0, 0) < 0)
                        goto fail;
                    continue;
                }
                if ((v >> 32) != epoch) {
                    /* Decided in an earlier window: the rule is the same, the
                     * decision is the shared table's for this window, if made. */
                    int known = 1;
                    if (slot != 0) {
                        if (!have_tables) {
                            if (take_tables(table_seq, &tables, &ntables) < 0)
                                goto fail;
                            have_tables = 1;
                        }
                        ScanTable *t = (Py_ssize_t)slot < ntables ? &tables[slot] : NULL;
                        known = t != NULL && t->held ? table_peek(t->buf.buf, t->buf.len, key[k], t->window) : -1;
                        if (known < 0 && t != NULL && t->held && t->limit &&
                            slot * COUNT_FIELDS + C_TRACKING_FULL < ncounts) {
                            /* Not decided in this window yet: decide it here, under the
                             * lock (held to the end of this batch), as Limiter would. */
                            if (!t->locked && set_lock(t, F_WRLCK) == 0)
                                t->locked = 1;
                            if (t->locked) {
                                Py_ssize_t start = p[at[k]] == '\n' ? at[k] + 1 : at[k];
                                Py_ssize_t end = find_byte(p, start, n, '\n');
                                unsigned char label[OFFENDER_NAME];
                                Py_ssize_t label_len;
                                uint64_t budget = line_budget(p + start, end - start, p + n, t, label, &label_len);
                                int r = admit_core(t->buf.buf, t->buf.len, key[k], budget, t->limit,
                                                   t->window, label, label_len);
                                if (r >= 0) {
                                    if ((r & R_NEW) && !(r & R_ADMITTED) && !(r & R_UNTRACKED))
                                        count[slot * COUNT_FIELDS + C_SERIES_LIMITED]++;
                                    if (r & (R_AT_CAP | R_UNTRACKED))
                                        count[slot * COUNT_FIELDS + C_TRACKING_FULL]++;
                                    known = (r & R_ADMITTED) != 0;
                                }
                            }
                        }
                    }
                    if (known < 0) {
                        if (append_code(codes, at[k], 0, 0) < 0)
                            goto fail;
                        continue;
                    }
                    decision = known ? PASS : REFUSED;
                    *entry = (uint64_t)epoch << 32 | slot << 2 | decision;
                }
                if (decision == PASS) {
                    count[slot * COUNT_FIELDS + C_PASSED]++;
                    continue;
                }
                if (!have_tables) {
                    if (take_tables(table_seq, &tables, &ntables) < 0)
                        goto fail;
                    have_tables = 1;
                }
                int drop = slot < 65536 && (Py_ssize_t)slot < ntables && tables[slot].held &&
                           tables[slot].drop;
                if (append_code(codes, at[k], slot, drop) < 0)
                    goto fail;
            }
            if (have_tables)
                unlock_tables(tables, ntables);
        }
    }
    goto done;
fail:
    Py_CLEAR(codes);
done:
    if (tables != NULL)
        release_tables(tables, ntables);
    PyBuffer_Release(&chunk);
    PyBuffer_Release(&cache);
    PyBuffer_Release(&counts);
    return codes;
}

static PyObject *
limit_admit(PyObject *self, PyObject *args)
{
    Py_buffer region, label;
    unsigned long long key, budget, limit, window;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*KKKKy*:limit_admit", &region, &key, &budget, &limit, &window,
                          &label))
        return NULL;
    int result = admit_core(region.buf, region.len, key, budget, limit, window, label.buf, label.len);
    PyBuffer_Release(&region);
    PyBuffer_Release(&label);
    if (result == -1) {
        PyErr_SetString(PyExc_ValueError, "not a limit table, or a bad key");
        return NULL;
    }
    if (result == -2) {
        PyErr_SetString(PyExc_ValueError, "limit table holds more keys than half its slots");
        return NULL;
    }
    return PyLong_FromLong(result);
}

static PyMethodDef methods[] = {
    {"recv_many", recv_many, METH_VARARGS,
     "recv_many(fd, count, size=65536) -> list[bytes]: up to count datagrams (at most 64, "
     "fewer when size > 65536) of at most size bytes each (longer ones are cut), never blocking."},
    {"send_many", send_many, METH_VARARGS,
     "send_many(fd, payloads) -> int: send up to 64 datagrams; returns how many went."},
    {"trie_new", trie_new, METH_VARARGS,
     "trie_new(order, min_below, first, count, child_byte, child_node, n_orders) -> trie."},
    {"trie_lookup", trie_lookup, METH_VARARGS,
     "trie_lookup(trie, line) -> int: earliest-listed prefix of line, or -1."},
    {"ring_new", ring_new, METH_VARARGS,
     "ring_new(values, owners, n_targets) -> ring: sorted uint32 points, n+1 owners."},
    {"ring_lookup", ring_lookup, METH_VARARGS,
     "ring_lookup(ring, line) -> int: the target of the line's key, or -1 (not ASCII)."},
    {"recv_filter_pack", recv_filter_pack, METH_VARARGS,
     "recv_filter_pack(fd, max_datagrams, trie, max_line, max_size[, ring[, (next, step, "
     "rng, hits_left)]]) -> (payloads, lines, datagrams, bytes_in, received, blocked, "
     "oversize, hits, errno, None or (samples, next, step, rng, points)); max_size 0: one "
     "chunk of every kept line, each led by a newline; with a ring: payloads and lines "
     "per target, then one chunk of the lines Python must route."},
    {"pack_chunk", pack_chunk, METH_VARARGS,
     "pack_chunk(chunk, max_size) -> (payloads, lines): a chunk's lines packed as the "
     "batcher packs them."},
    {"series_key", series_key, METH_VARARGS,
     "series_key(line) -> int: the 63-bit key of a line's name, type and tags (any tag order)."},
    {"hash_key", hash_key, METH_VARARGS, "hash_key(data) -> int: a 63-bit key of some bytes."},
    {"metric_key", metric_key_py, METH_VARARGS,
     "metric_key(line) -> int: series_key(line) if surely a well-formed metric line, else 0."},
    {"cache_get", cache_get, METH_VARARGS, "cache_get(cache, key) -> int: the value, or -1."},
    {"cache_put", cache_put, METH_VARARGS,
     "cache_put(cache, key, value, limit) -> bool: stored (False: the cache holds limit keys)."},
    {"cache_clear", cache_clear, METH_VARARGS, "cache_clear(cache): forget every key."},
    {"cache_copy", cache_copy, METH_VARARGS, "cache_copy(src, dst): every key of src into dst."},
    {"limit_scan", limit_scan, METH_VARARGS,
     "limit_scan(chunk, cache, counts, epoch, tables) -> list[int]: lines the cache does not "
     "pass, as offset << 17 | slot << 1 | 1 to drop (refused) or offset << 17 to judge per "
     "line; counts[slot * 4] += 1 for every line passed (see limittable.py)."},
    {"limit_peek", limit_peek, METH_VARARGS,
     "limit_peek(table, key, window) -> int: 1 admitted, 0 refused, -1 not known (no lock)."},
    {"limit_admit", limit_admit, METH_VARARGS,
     "limit_admit(table, key, budget, limit, window, label) -> int: result flags."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastio", "The UDP hot path in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__fastio(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_BATCH", MAX_BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
