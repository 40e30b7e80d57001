/*
 * recv_many and send_many: batches of datagrams per system call (recvmmsg/sendmmsg),
 * never blocking, errors raised as the socket module raises them.
 *
 * Part of the _fastio extension: compiled only as part of ../_fastio.c, which
 * includes every part into one translation unit (see there why).
 */

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
