/* The reference forwarder: as little work per line as a filtering UDP proxy can do.
 *
 *     fwd TARGET_PORT            (prints "port N" once listening on 127.0.0.1)
 *
 * One process, one socket with a 4 MiB receive buffer. recvmmsg takes whatever
 * datagrams are waiting (blocking for the first), every line starting with
 * "blocked" is dropped, the rest are packed into datagrams of at most 8192 bytes
 * and sent with one sendmmsg. It never waits to fill a datagram: what one read
 * returned is sent before the next read. Runs until killed.
 */
#include "common.h"

#define BATCH 64
#define IN_SIZE 65536
#define OUT_MAX 8192

static char inbuf[BATCH][IN_SIZE];
/* Each input datagram yields at most ceil(IN_SIZE / OUT_MAX) + 1 outputs. */
#define OUT_SLOTS (BATCH * (IN_SIZE / OUT_MAX + 1))
static char outbuf[OUT_SLOTS][OUT_MAX];

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: fwd TARGET_PORT\n");
        return 2;
    }
    int port = 0;
    int in = udp_socket(0, 4 << 20, &port);
    int out = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in target = loopback(atoi(argv[1]));
    if (connect(out, (struct sockaddr *)&target, sizeof target) < 0) die("connect");
    printf("port %d\n", port);
    fflush(stdout);

    static struct mmsghdr rmsg[BATCH];
    static struct iovec riov[BATCH];
    for (int i = 0; i < BATCH; i++) {
        riov[i].iov_base = inbuf[i];
        riov[i].iov_len = IN_SIZE;
        rmsg[i].msg_hdr.msg_iov = &riov[i];
        rmsg[i].msg_hdr.msg_iovlen = 1;
    }
    static struct mmsghdr smsg[OUT_SLOTS];
    static struct iovec siov[OUT_SLOTS];
    for (;;) {
        int n = recvmmsg(in, rmsg, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("recvmmsg");
        }
        int slot = 0;
        size_t used = 0;
        for (int i = 0; i < n; i++) {
            const char *p = inbuf[i];
            const char *end = p + rmsg[i].msg_len;
            while (p < end) {
                const char *nl = memchr(p, '\n', (size_t)(end - p));
                const char *stop = nl ? nl : end;
                size_t len = (size_t)(stop - p);
                if (len && !(len >= BLOCKED_LEN && memcmp(p, BLOCKED_PREFIX, BLOCKED_LEN) == 0)) {
                    if (used + len + 1 > OUT_MAX && used) {
                        siov[slot].iov_base = outbuf[slot];
                        siov[slot].iov_len = used;
                        slot++;
                        used = 0;
                    }
                    if (len + 1 <= OUT_MAX) {
                        memcpy(outbuf[slot] + used, p, len);
                        used += len;
                        outbuf[slot][used++] = '\n';
                    }
                }
                p = stop + 1;
            }
            riov[i].iov_len = IN_SIZE;
        }
        if (used) {
            siov[slot].iov_base = outbuf[slot];
            siov[slot].iov_len = used;
            slot++;
        }
        for (int i = 0; i < slot; i++) {
            memset(&smsg[i].msg_hdr, 0, sizeof smsg[i].msg_hdr);
            smsg[i].msg_hdr.msg_iov = &siov[i];
            smsg[i].msg_hdr.msg_iovlen = 1;
        }
        int sent = 0;
        while (sent < slot) {
            int k = sendmmsg(out, smsg + sent, (unsigned)(slot - sent), 0);
            if (k < 0) {
                if (errno == EINTR) continue;
                break; /* upstream gone (ECONNREFUSED): drop this batch, as a UDP proxy would */
            }
            sent += k;
        }
    }
}
