/* The counting upstream: receives UDP, counts datagrams, lines and lines that
 * should have been blocked, and the one-way delay of every timestamped line.
 *
 *     sink IDLE_MS [START_WAIT_MS]   (prints "port N" once listening on 127.0.0.1)
 *
 * Exits once IDLE_MS pass without a datagram after the first one (or
 * START_WAIT_MS, default 60000, pass before any arrives, or on SIGTERM), then
 * prints one line of key=value figures: datagrams, lines, blocked_seen, bytes,
 * first_ns, last_ns (CLOCK_MONOTONIC of the first and last read) and, from each
 * line's "#t:<ns>" tag, latency_n and p50_us/p99_us/p999_us/max_us.
 */
#include "common.h"
#include <poll.h>
#include <signal.h>

#define BATCH 64
#define IN_SIZE 65536
#define MAX_SAMPLES (8u << 20)

static char buf[BATCH][IN_SIZE];
static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(const uint64_t *v, size_t n, double q) {
    if (!n) return 0;
    size_t i = (size_t)(q * (double)(n - 1));
    return (double)v[i] / 1000.0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: sink IDLE_MS [START_WAIT_MS]\n");
        return 2;
    }
    int idle_ms = atoi(argv[1]);
    int start_ms = argc > 2 ? atoi(argv[2]) : 60000;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int port = 0;
    int fd = udp_socket(0, 16 << 20, &port);
    printf("port %d\n", port);
    fflush(stdout);

    uint64_t *lat = malloc(MAX_SAMPLES * sizeof *lat);
    if (!lat) die("malloc");
    size_t nlat = 0;
    uint64_t datagrams = 0, lines = 0, blocked = 0, bytes = 0, first = 0, last = 0;
    static struct mmsghdr msg[BATCH];
    static struct iovec iov[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buf[i];
        iov[i].iov_len = IN_SIZE;
        msg[i].msg_hdr.msg_iov = &iov[i];
        msg[i].msg_hdr.msg_iovlen = 1;
    }
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    while (!stop) {
        int r = poll(&pfd, 1, datagrams ? idle_ms : start_ms);
        if (r == 0) break;
        if (r < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        int n = recvmmsg(fd, msg, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) continue;
        uint64_t t = now_ns();
        if (!first) first = t;
        last = t;
        for (int i = 0; i < n; i++) {
            const char *p = buf[i];
            const char *end = p + msg[i].msg_len;
            datagrams++;
            bytes += msg[i].msg_len;
            while (p < end) {
                const char *nl = memchr(p, '\n', (size_t)(end - p));
                const char *e = nl ? nl : end;
                if (e > p) {
                    lines++;
                    if (e - p >= BLOCKED_LEN && memcmp(p, BLOCKED_PREFIX, BLOCKED_LEN) == 0)
                        blocked++;
                    const char *tag = memmem(p, (size_t)(e - p), "#t:", 3);
                    if (tag && nlat < MAX_SAMPLES) {
                        uint64_t sent = strtoull(tag + 3, NULL, 10);
                        if (sent && sent <= t) lat[nlat++] = t - sent;
                    }
                }
                p = e + 1;
            }
            iov[i].iov_len = IN_SIZE;
        }
    }
    qsort(lat, nlat, sizeof *lat, cmp_u64);
    printf("datagrams=%llu lines=%llu blocked_seen=%llu bytes=%llu first_ns=%llu last_ns=%llu "
           "latency_n=%zu p50_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f\n",
           (unsigned long long)datagrams, (unsigned long long)lines, (unsigned long long)blocked,
           (unsigned long long)bytes, (unsigned long long)first, (unsigned long long)last, nlat,
           pct(lat, nlat, 0.5), pct(lat, nlat, 0.99), pct(lat, nlat, 0.999),
           nlat ? (double)lat[nlat - 1] / 1000.0 : 0.0);
    return 0;
}
