/*
 * The packer: lines into upstream payloads of at most max_size bytes, as the
 * Python batcher packs them, and pack_chunk for a chunk the rules already judged.
 *
 * Part of the _fastio extension: compiled only as part of ../_fastio.c, which
 * includes every part into one translation unit (see there why).
 */

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
