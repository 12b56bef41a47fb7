/* A tiny load generator and echo server for `make bench` (bench/bench.py builds it with cc).
 *
 *   loadgen echo PORT                              epoll echo server on :: (dual-stack)
 *   loadgen pingpong HOST PORT SECONDS MAX         1-byte request/response on one connection
 *   loadgen connrate HOST PORT SECONDS CONC MAX    connect + 1-byte echo + close, CONC in flight
 *   loadgen burst HOST PORT N TIMEOUT              N connects at once, each a 1-byte echo
 *   loadgen hold HOST PORT N TIMEOUT               open N connections (1-byte echo each), print
 *                                                  a JSON line, wait for a line or EOF on stdin
 *                                                  (TIMEOUT at most), echo once more on each,
 *                                                  close them all
 *
 * Clients print one JSON line: counts, errors, rates and latencies (microseconds). Written in
 * C so that the client is not the bottleneck (a Python client caps ping-pong at ~20k round
 * trips/s on this kind of machine). Every loop is bounded in count and in time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 512

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

static struct sockaddr_storage target;
static socklen_t target_len;

static void resolve(const char *host, const char *port) {
    struct addrinfo hints = {0}, *res;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "loadgen: %s:%s: %s\n", host, port, gai_strerror(rc));
        exit(1);
    }
    memcpy(&target, res->ai_addr, res->ai_addrlen);
    target_len = res->ai_addrlen;
    freeaddrinfo(res);
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* A non-blocking connect in progress; -1 on an immediate failure. */
static int start_connect(void) {
    int fd = socket(target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    nodelay(fd);
    if (connect(fd, (struct sockaddr *)&target, target_len) != 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Percentile (0..100) of n sorted values, in microseconds. */
static double pct_us(const int64_t *v, long n, double p) {
    if (n <= 0)
        return 0.0;
    long i = (long)(p / 100.0 * (double)(n - 1) + 0.5);
    return (double)v[i] / 1000.0;
}

/* The latency fields, and the end of the JSON line. */
static void end_with_latencies(int64_t *lat, long n) {
    qsort(lat, n, sizeof(int64_t), cmp_i64);
    printf("\"p50_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f}\n",
           pct_us(lat, n, 50), pct_us(lat, n, 99), n ? (double)lat[n - 1] / 1000.0 : 0.0);
}

/* ---- echo server ------------------------------------------------------------------- */

static __attribute__((noreturn)) void echo_server(int port) {
    int ls = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (ls < 0)
        die("socket");
    int one = 1, zero = 0;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(ls, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    struct sockaddr_in6 a = {0};
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_any;
    a.sin6_port = htons(port);
    if (bind(ls, (struct sockaddr *)&a, sizeof(a)) != 0)
        die("bind");
    if (listen(ls, 65535) != 0)
        die("listen");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[MAX_EVENTS];
    static char buf[65536];
    for (;;) { /* runs until the bench stops it (SIGTERM) */
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (int k = 0; k < 256; k++) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0)
                        break;
                    nodelay(c);
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev) != 0)
                        close(c);
                }
                continue;
            }
            /* level-triggered: one read per wake-up keeps many connections fair */
            ssize_t r = read(fd, buf, sizeof(buf));
            if (r > 0) {
                ssize_t off = 0;
                int64_t give_up = now_ns() + 2000000000LL;
                while (off < r && now_ns() < give_up) {
                    ssize_t w = write(fd, buf + off, r - off);
                    if (w > 0) {
                        off += w;
                    } else if (w < 0 && errno == EAGAIN) {
                        struct pollfd p = {.fd = fd, .events = POLLOUT};
                        poll(&p, 1, 100);
                    } else {
                        break;
                    }
                }
                if (off < r)
                    close(fd); /* a peer that does not read: give up on it */
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(fd); /* close() also removes it from the epoll set */
            }
        }
    }
}

/* ---- ping-pong ---------------------------------------------------------------------- */

static int pingpong(double seconds, long max) {
    int fd = socket(target.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    nodelay(fd);
    if (connect(fd, (struct sockaddr *)&target, target_len) != 0)
        die("connect");
    int64_t *lat = malloc(max * sizeof(int64_t));
    if (!lat)
        die("malloc");
    char c = 'x';
    long n = 0, errors = 0;
    /* a short warm-up, not counted */
    for (int i = 0; i < 200; i++) {
        if (write(fd, &c, 1) != 1 || read(fd, &c, 1) != 1) {
            errors++;
            break;
        }
    }
    int64_t start = now_ns(), end = start + (int64_t)(seconds * 1e9), t = start;
    while (!errors && n < max && t < end) {
        int64_t t0 = t;
        if (write(fd, &c, 1) != 1 || read(fd, &c, 1) != 1) {
            errors++;
            break;
        }
        t = now_ns();
        lat[n++] = t - t0;
    }
    double elapsed = (double)(t - start) / 1e9;
    close(fd);
    printf("{\"mode\": \"pingpong\", \"count\": %ld, \"errors\": %ld, \"seconds\": %.3f, "
           "\"rate\": %.1f, ", n, errors, elapsed, elapsed > 0 ? n / elapsed : 0.0);
    end_with_latencies(lat, n);
    free(lat);
    return errors ? 1 : 0;
}

/* ---- connection clients (connrate, burst, hold) ------------------------------------ */

enum { S_FREE, S_CONNECTING, S_WAITING, S_HELD, S_VERIFY };

struct conn {
    int fd;
    int state;
    int64_t t0;
};

struct pool {
    int ep;
    struct conn *c;
    long n;
    long inflight;
    long done;
    long errors;
    int64_t *lat;
    long nlat;
    long maxlat;
    int keep; /* hold: keep the connection open after its echo */
};

static void conn_fail(struct pool *p, struct conn *c) {
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = S_FREE;
    p->inflight--;
    p->errors++;
}

static int conn_open(struct pool *p, long i) {
    struct conn *c = &p->c[i];
    c->t0 = now_ns();
    c->fd = start_connect();
    if (c->fd < 0) {
        p->errors++;
        return -1;
    }
    c->state = S_CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)i};
    epoll_ctl(p->ep, EPOLL_CTL_ADD, c->fd, &ev);
    p->inflight++;
    return 0;
}

/* Advance connection i on an event; returns 1 when it completed its echo. */
static int conn_event(struct pool *p, long i, uint32_t events) {
    struct conn *c = &p->c[i];
    char b = 'x';
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP)) || write(c->fd, &b, 1) != 1) {
            conn_fail(p, c);
            return 0;
        }
        c->state = S_WAITING;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = (uint64_t)i};
        epoll_ctl(p->ep, EPOLL_CTL_MOD, c->fd, &ev);
        return 0;
    }
    if (c->state == S_WAITING || c->state == S_VERIFY) {
        ssize_t r = read(c->fd, &b, 1);
        if (r < 0 && errno == EAGAIN)
            return 0;
        if (r != 1) {
            conn_fail(p, c);
            return 0;
        }
        if (c->state == S_WAITING && p->nlat < p->maxlat)
            p->lat[p->nlat++] = now_ns() - c->t0;
        p->inflight--;
        p->done++;
        if (p->keep && c->state == S_WAITING) {
            c->state = S_HELD;
            epoll_ctl(p->ep, EPOLL_CTL_DEL, c->fd, NULL);
        } else {
            close(c->fd);
            c->fd = -1;
            c->state = S_FREE;
        }
        return 1;
    }
    return 0;
}

static void pool_init(struct pool *p, long n, long maxlat, int keep) {
    memset(p, 0, sizeof(*p));
    p->ep = epoll_create1(EPOLL_CLOEXEC);
    p->c = calloc(n, sizeof(struct conn));
    p->lat = malloc((maxlat ? maxlat : 1) * sizeof(int64_t));
    if (p->ep < 0 || !p->c || !p->lat)
        die("pool");
    p->n = n;
    p->maxlat = maxlat;
    p->keep = keep;
    for (long i = 0; i < n; i++)
        p->c[i].fd = -1;
}

/* One epoll_wait round; returns how many events it handled. */
/* Slots that became free are appended to freed[] (when given; nfreed counts them). */
static int pool_poll(struct pool *p, int timeout_ms, long *freed, long *nfreed) {
    struct epoll_event evs[MAX_EVENTS];
    int k = epoll_wait(p->ep, evs, MAX_EVENTS, timeout_ms);
    for (int j = 0; j < k; j++) {
        long i = (long)evs[j].data.u64;
        int before = p->c[i].state;
        conn_event(p, i, evs[j].events);
        if (freed && before != S_FREE && p->c[i].state == S_FREE && *nfreed < p->n)
            freed[(*nfreed)++] = i;
    }
    return k < 0 ? 0 : k;
}

/* Poll until nothing is in flight or the deadline passes. */
static void pool_drain(struct pool *p, int64_t deadline) {
    while (p->inflight > 0 && now_ns() < deadline)
        pool_poll(p, 10, NULL, NULL);
}

static int connrate(double seconds, long conc, long max) {
    struct pool p;
    pool_init(&p, conc, max, 0);
    long *freed = malloc(conc * sizeof(long)), nfreed = 0;
    int64_t start = now_ns(), end = start + (int64_t)(seconds * 1e9);
    for (long i = 0; i < conc; i++)
        if (conn_open(&p, i) < 0)
            freed[nfreed++] = i;
    long started = conc;
    int64_t t = start;
    while (t < end && started < max) {
        pool_poll(&p, 10, freed, &nfreed);
        t = now_ns();
        while (nfreed > 0 && t < end && started < max) {
            long i = freed[--nfreed];
            started++;
            if (conn_open(&p, i) < 0 && nfreed < conc)
                freed[nfreed++] = i;
        }
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    long at_end = p.done;
    /* let the ones in flight finish (not counted in the rate), 2 s at most */
    pool_drain(&p, now_ns() + 2000000000LL);
    long stuck = p.inflight;
    printf("{\"mode\": \"connrate\", \"count\": %ld, \"errors\": %ld, \"stuck\": %ld, "
           "\"concurrency\": %ld, \"seconds\": %.3f, \"rate\": %.1f, ",
           at_end, p.errors, stuck, conc, elapsed, elapsed > 0 ? at_end / elapsed : 0.0);
    end_with_latencies(p.lat, p.nlat);
    return 0;
}

static int burst(long n, double timeout) {
    struct pool p;
    pool_init(&p, n, n, 0);
    int64_t start = now_ns(), end = start + (int64_t)(timeout * 1e9);
    for (long i = 0; i < n; i++)
        conn_open(&p, i);
    double spread = (double)(now_ns() - start) / 1e6;
    pool_drain(&p, end);
    double elapsed = (double)(now_ns() - start) / 1e9;
    printf("{\"mode\": \"burst\", \"n\": %ld, \"served\": %ld, \"errors\": %ld, "
           "\"unanswered\": %ld, \"seconds\": %.3f, \"connect_spread_ms\": %.2f, ",
           n, p.done, p.errors, p.inflight, elapsed, spread);
    end_with_latencies(p.lat, p.nlat);
    return 0;
}

static int hold(long n, double timeout) {
    struct pool p;
    pool_init(&p, n, n, 1);
    const long window = 256; /* connects in flight at once */
    int64_t start = now_ns(), end = start + (int64_t)(timeout * 1e9);
    long next = 0;
    while (now_ns() < end && (next < n || p.inflight > 0)) {
        while (next < n && p.inflight < window)
            conn_open(&p, next++);
        pool_poll(&p, 10, NULL, NULL);
    }
    double opened_s = (double)(now_ns() - start) / 1e9;
    long held = p.done, failed_open = p.errors, pending = p.inflight;
    printf("{\"mode\": \"hold\", \"n\": %ld, \"held\": %ld, \"errors\": %ld, "
           "\"pending\": %ld, \"open_seconds\": %.3f}\n", n, held, failed_open, pending,
           opened_s);
    fflush(stdout);
    /* wait for the bench to read the proxy's memory */
    struct pollfd in = {.fd = 0, .events = POLLIN};
    int64_t left_ms = (end - now_ns()) / 1000000;
    poll(&in, 1, left_ms > 0 ? (int)left_ms : 0);
    /* each held connection echoes once more: it really was kept open end to end */
    p.done = 0;
    p.errors = 0;
    p.inflight = 0;
    char b = 'y';
    for (long i = 0; i < n; i++) {
        struct conn *c = &p.c[i];
        if (c->state != S_HELD)
            continue;
        if (write(c->fd, &b, 1) != 1) {
            close(c->fd);
            c->fd = -1;
            c->state = S_FREE;
            p.errors++;
            continue;
        }
        c->state = S_VERIFY;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = (uint64_t)i};
        epoll_ctl(p.ep, EPOLL_CTL_ADD, c->fd, &ev);
        p.inflight++;
    }
    pool_drain(&p, now_ns() + 10000000000LL);
    printf("{\"mode\": \"hold-verify\", \"verified\": %ld, \"errors\": %ld, "
           "\"unanswered\": %ld}\n", p.done, p.errors, p.inflight);
    for (long i = 0; i < n; i++)
        if (p.c[i].fd >= 0)
            close(p.c[i].fd);
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen echo PORT | pingpong HOST PORT SECONDS MAX | "
                    "connrate HOST PORT SECONDS CONC MAX | burst HOST PORT N TIMEOUT | "
                    "hold HOST PORT N TIMEOUT\n");
    exit(2);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "echo") == 0)
        echo_server(atoi(argv[2]));
    if (argc < 4)
        usage();
    resolve(argv[2], argv[3]);
    if (argc == 6 && strcmp(argv[1], "pingpong") == 0)
        return pingpong(atof(argv[4]), atol(argv[5]));
    if (argc == 7 && strcmp(argv[1], "connrate") == 0)
        return connrate(atof(argv[4]), atol(argv[5]), atol(argv[6]));
    if (argc == 6 && strcmp(argv[1], "burst") == 0)
        return burst(atol(argv[4]), atof(argv[5]));
    if (argc == 6 && strcmp(argv[1], "hold") == 0)
        return hold(atol(argv[4]), atof(argv[5]));
    usage();
    return 2;
}
