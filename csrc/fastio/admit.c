/*
 * Deciding a series under a limit table's lock, and peeking without it.
 *
 * Part of the _fastio extension: compiled only as part of ../_fastio.c, which
 * includes every part into one translation unit (see there why).
 */

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
