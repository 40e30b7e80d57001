/*
 * limit_scan and limit_admit: a chunk's lines against every limit table at once.
 *
 * Part of the _fastio extension: compiled only as part of ../_fastio.c, which
 * includes every part into one translation unit (see there why).
 */

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
