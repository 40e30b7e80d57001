/*
 * recv_filter_pack: a whole UDP wake-up (read, split, drop, sample, pack) in one call.
 *
 * Part of the _fastio extension: compiled only as part of ../_fastio.c, which
 * includes every part into one translation unit (see there why).
 */

typedef struct {
    int on;
    long long next;      /* the next point, from the start of this read */
    long long step;      /* mean gap */
    long long pending;   /* the mean of the gap now running (what its point stands for) */
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
        /* A point stands for the mean of the gap that led to it, the step that gap
           was drawn with (Horvitz-Thompson), which the caller passes for the gap
           running when the read starts. So a widening comes before the next gap
           is drawn, never between a gap and the point it leads to. */
        weight += s->pending;
        s->hits++;
        if (--s->hits_left <= 0) {
            /* Far more points than the caller allows: space the rest 4 times as
               far, so a flood meeting a small step costs a bounded number of lines. */
            s->step *= 4;
            s->hits_left = s->allowance;
        }
        s->next += sample_gap(s);
        s->pending = s->step;
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
    Sampling smp = {0, 0, 1, 0, 1, 1, 1, 0, NULL};
    (void)self;

    if (!PyArg_ParseTuple(args, "inOnn|OO:recv_filter_pack", &fd, &max_datagrams, &trie_obj,
                          &max_line, &max_size, &ring_obj, &sample_obj))
        return NULL;
    if (sample_obj != Py_None) {
        smp.pending = 0;
        if (!PyArg_ParseTuple(sample_obj, "LLKL|L:sample", &smp.next, &smp.step, &smp.rng,
                              &smp.hits_left, &smp.pending))
            return NULL;
        if (smp.pending < 1)
            smp.pending = smp.step; /* not given: the gap was drawn with this step */
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
