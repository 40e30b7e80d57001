/*
 * The worker's local cache of limit decisions, in a writable buffer.
 *
 * Part of the _fastio extension: compiled only as part of ../_fastio.c, which
 * includes every part into one translation unit (see there why).
 */

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
