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
 * per line: only one per outgoing payload.
 *
 * Optional: if this module is not built, statsd_filter.fastio falls back to
 * plain socket calls and the worker to the Python filter.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define MAX_BATCH 64
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

/* ------------------------------------------------------------------ recv, filter, pack */

typedef struct {
    PyObject *payloads;
    PyObject *lines;
    char *cur;
    Py_ssize_t cur_len;
    long cur_lines;
    Py_ssize_t max_size;
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

static PyObject *
recv_filter_pack(PyObject *self, PyObject *args)
{
    int fd;
    Py_ssize_t max_datagrams, max_line, max_size;
    PyObject *trie_obj;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iovs[MAX_BATCH];
    (void)self;

    if (!PyArg_ParseTuple(args, "inOnn:recv_filter_pack", &fd, &max_datagrams, &trie_obj,
                          &max_line, &max_size))
        return NULL;
    if (max_size < 1 || max_line < 1) {
        PyErr_SetString(PyExc_ValueError, "max_line and max_size must be positive");
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
    if (pack_area_size < max_size) {
        char *area = PyMem_RawRealloc(pack_area, (size_t)max_size);
        if (area == NULL)
            return PyErr_NoMemory();
        pack_area = area;
        pack_area_size = max_size;
    }
    Packer p = {PyList_New(0), PyList_New(0), pack_area, 0, 0, max_size};
    if (p.payloads == NULL || p.lines == NULL)
        goto fail;

    long long datagrams = 0, bytes_in = 0, received = 0, blocked = 0, oversize = 0;
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
                    } else if (packer_add(&p, line, n) < 0) {
                        goto fail;
                    }
                }
                if (nl == NULL)
                    break;
                start = end + 1;
            }
        }
        if (got < want)
            break; /* the socket is empty */
    }
    if (packer_seal(&p) < 0)
        goto fail;

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
    return Py_BuildValue("(NNLLLLLNi)", p.payloads, p.lines, datagrams, bytes_in, received,
                         blocked, oversize, hits, error);
fail:
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
    {"recv_filter_pack", recv_filter_pack, METH_VARARGS,
     "recv_filter_pack(fd, max_datagrams, trie, max_line, max_size) -> (payloads, lines, "
     "datagrams, bytes_in, received, blocked, oversize, hits, errno)."},
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
