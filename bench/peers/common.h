/* Shared bits of the peer benchmark's C tools: a loopback UDP socket bound to a
 * free port (reported on stdout so bench/peers.py can find it), a monotonic
 * clock in nanoseconds, and the line format every tool agrees on:
 *
 *     <name>:1|c|#t:<CLOCK_MONOTONIC ns at send>\n
 *
 * Lines whose name starts with "blocked" are the ones a forwarder must drop.
 */
#ifndef PEERS_COMMON_H
#define PEERS_COMMON_H
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BLOCKED_PREFIX "blocked"
#define BLOCKED_LEN 7

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void die(const char *what) {
    perror(what);
    exit(2);
}

static inline struct sockaddr_in loopback(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* A UDP socket on 127.0.0.1:port (0: any free port); returns the fd, sets *bound. */
static inline int udp_socket(int port, int rcvbuf, int *bound) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    if (rcvbuf > 0) {
        /* FORCE lifts the rmem_max cap when we may; plain SO_RCVBUF otherwise. */
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    }
    struct sockaddr_in a = loopback(port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    if (bound) *bound = ntohs(a.sin_port);
    return fd;
}
#endif
