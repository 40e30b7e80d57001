/* The evenly spaced sender: one datagram of N lines at fixed absolute deadlines.
 *
 *     pacer PORT DATAGRAMS_PER_S SECONDS LINES_PER_DATAGRAM BLOCKED_SHARE
 *
 * Datagram k is sent at start + k / rate (clock_nanosleep on absolute
 * CLOCK_MONOTONIC deadlines, so a late wake-up does not shift the rest). Whole
 * datagrams are "blocked" ones, spread evenly so that BLOCKED_SHARE of the lines
 * are blocked: a per-datagram filter and a per-line filter then forward the same
 * lines. Every line carries its send time ("#t:<ns>"). Prints
 * datagrams=, lines=, blocked_lines=, late_us_max= when done.
 */
#include "common.h"

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: pacer PORT DATAGRAMS_PER_S SECONDS LINES BLOCKED_SHARE\n");
        return 2;
    }
    int port = atoi(argv[1]);
    double rate = atof(argv[2]);
    double seconds = atof(argv[3]);
    int per = atoi(argv[4]);
    double share = atof(argv[5]);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in to = loopback(port);
    if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0) die("connect");
    uint64_t total = (uint64_t)(rate * seconds);
    uint64_t step = (uint64_t)(1e9 / rate);
    uint64_t start = now_ns() + 1000000;
    uint64_t lines = 0, blocked = 0, late_max = 0;
    double owed = 0;
    char buf[65536];
    for (uint64_t k = 0; k < total; k++) {
        uint64_t due = start + k * step;
        struct timespec ts = {.tv_sec = (time_t)(due / 1000000000ull),
                              .tv_nsec = (long)(due % 1000000000ull)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
        }
        owed += share;
        int is_blocked = owed >= 1.0 - 1e-9;
        if (is_blocked) owed -= 1.0;
        uint64_t t = now_ns();
        if (t > due && t - due > late_max) late_max = t - due;
        size_t used = 0;
        for (int i = 0; i < per; i++) {
            used += (size_t)snprintf(buf + used, sizeof buf - used,
                                     "%s.peers.metric%d:1|c|#t:%llu\n",
                                     is_blocked ? BLOCKED_PREFIX : "app", (int)(k % 50) * per + i,
                                     (unsigned long long)t);
        }
        send(fd, buf, used, 0);
        lines += (uint64_t)per;
        if (is_blocked) blocked += (uint64_t)per;
    }
    printf("datagrams=%llu lines=%llu blocked_lines=%llu late_us_max=%.1f\n",
           (unsigned long long)total, (unsigned long long)lines, (unsigned long long)blocked,
           (double)late_max / 1000.0);
    return 0;
}
