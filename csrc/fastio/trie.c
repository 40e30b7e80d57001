/*
 * The prefix trie: the blocklist's prefixes, matched byte by byte against a line.
 *
 * Part of the _fastio extension: compiled only as part of ../_fastio.c, which
 * includes every part into one translation unit (see there why).
 */

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
