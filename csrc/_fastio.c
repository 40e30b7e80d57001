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
 *
 * statsd_filter._fastio is built from here (setup.py). The code lives in
 * fastio/, one file per concern: io.c (recv_many, send_many), trie.c
 * (prefixes), ring.c (sharding), pack.c (payloads), recv.c
 * (recv_filter_pack), keys.c (series keys), cache.c, admit.c and scan.c
 * (limit rules). This file includes them all and compiles them as one
 * translation unit, on purpose: the per-line helpers (trie_match, ring_route,
 * packer_add, metric_key, cache lookups) are static and inlined into the
 * loops of recv_filter_pack and limit_scan, which separate objects would
 * only allow with link-time optimisation, and the extension keeps a single
 * symbol (PyInit__fastio) exported. Only the method table and the module's
 * start are here.
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

#include "fastio/io.c"
#include "fastio/trie.c"
#include "fastio/ring.c"
#include "fastio/pack.c"
#include "fastio/recv.c"
#include "fastio/keys.c"
#include "fastio/cache.c"
#include "fastio/admit.c"
#include "fastio/scan.c"

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
