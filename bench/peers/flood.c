/* The flood: as many datagrams as sendmmsg will take, over several source sockets.
 *
 *     flood PORT LINES SOCKETS LINES_PER_DATAGRAM BLOCKED_SHARE [BATCH]
 *
 * The datagrams are built once (names vary, whole datagrams are "blocked" in the
 * given share, as in pacer.c; no timestamps), then sent in batches of BATCH
 * (default 32) with sendmmsg, the sockets taking turns, until LINES lines are
 * out. Prints datagrams=, lines=, blocked_lines=, seconds= when done.
 */
#include "common.h"

#define DISTINCT 1024

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: flood PORT LINES SOCKETS LINES_PER_DATAGRAM BLOCKED_SHARE [BATCH]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    uint64_t want = strtoull(argv[2], NULL, 10);
    int nsock = atoi(argv[3]);
    int per = atoi(argv[4]);
    double share = atof(argv[5]);
    int batch = argc > 6 ? atoi(argv[6]) : 32;
    if (nsock < 1 || per < 1 || batch < 1 || batch > 1024) return 2;
    int *fds = calloc((size_t)nsock, sizeof *fds);
    struct sockaddr_in to = loopback(port);
    for (int i = 0; i < nsock; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
        if (connect(fds[i], (struct sockaddr *)&to, sizeof to) < 0) die("connect");
    }
    static char data[DISTINCT][4096];
    static size_t len[DISTINCT];
    static int blocked_dg[DISTINCT];
    double owed = 0;
    for (int d = 0; d < DISTINCT; d++) {
        owed += share;
        blocked_dg[d] = owed >= 1.0 - 1e-9;
        if (blocked_dg[d]) owed -= 1.0;
        size_t used = 0;
        for (int i = 0; i < per && used < 3900; i++)
            used += (size_t)snprintf(data[d] + used, sizeof data[d] - used,
                                     "%s.flood.metric%d:1|c|#env:bench\n",
                                     blocked_dg[d] ? BLOCKED_PREFIX : "app", (d * per + i) % 977);
        len[d] = used;
    }
    struct mmsghdr *msg = calloc((size_t)batch, sizeof *msg);
    struct iovec *iov = calloc((size_t)batch, sizeof *iov);
    uint64_t lines = 0, blocked = 0, datagrams = 0;
    uint64_t t0 = now_ns();
    int s = 0;
    while (lines < want) {
        int n = 0;
        uint64_t planned = lines;
        for (; n < batch && planned < want; n++) {
            int d = (int)((datagrams + (uint64_t)n) % DISTINCT);
            iov[n].iov_base = data[d];
            iov[n].iov_len = len[d];
            memset(&msg[n].msg_hdr, 0, sizeof msg[n].msg_hdr);
            msg[n].msg_hdr.msg_iov = &iov[n];
            msg[n].msg_hdr.msg_iovlen = 1;
            planned += (uint64_t)per;
        }
        int k = sendmmsg(fds[s], msg, (unsigned)n, 0);
        s = (s + 1) % nsock;
        if (k < 0) {
            if (errno == EINTR || errno == ENOBUFS || errno == EAGAIN || errno == ECONNREFUSED)
                continue;
            die("sendmmsg");
        }
        for (int i = 0; i < k; i++) {
            int d = (int)(datagrams % DISTINCT);
            lines += (uint64_t)per;
            if (blocked_dg[d]) blocked += (uint64_t)per;
            datagrams++;
        }
    }
    printf("datagrams=%llu lines=%llu blocked_lines=%llu seconds=%.3f\n",
           (unsigned long long)datagrams, (unsigned long long)lines, (unsigned long long)blocked,
           (double)(now_ns() - t0) / 1e9);
    return 0;
}
