/*
 * Series keys: a 63-bit key of a line's name, type and tags (any tag order).
 *
 * Part of the _fastio extension: compiled only as part of ../_fastio.c, which
 * includes every part into one translation unit (see there why).
 */

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
