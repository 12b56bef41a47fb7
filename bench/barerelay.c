/* The floor of any relay, for `make bench`: a TCP (or MPTCP) relay that makes only the
 * system calls relaying needs and nothing else: no log line, no byte counts, no timeouts,
 * no configuration, no Python. bench/bench.py builds it with cc and runs it beside
 * mptcpproxy and HAProxy, so that a target can be judged against what the machine allows a
 * relay at all: what this program reaches, no relay built on the kernel's sockets can beat
 * by much.
 *
 *   barerelay PORT TARGET_HOST TARGET_PORT [--mptcp-listen] [--mptcp-upstream]
 *
 * One epoll thread per CPU, each taking connections from one shared listener
 * (EPOLLEXCLUSIVE, accept4 until EAGAIN), connecting upstream itself (non-blocking,
 * TCP_NODELAY on both legs) and relaying both directions with recv/send through one
 * 512 KiB scratch buffer per thread. What a send leaves behind waits in a copy while the
 * source stays unread; an EOF is passed on with shutdown(SHUT_WR); a pair is closed when
 * both directions ended or on any error. Level-triggered, like mptcpproxy's engine.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#define SCRATCH (512 * 1024)
#define MAX_EVENTS 256

struct conn;
struct end {  /* one socket of a pair: what epoll hands back */
    struct conn *c;
    int side;  /* 0: the client's, 1: the upstream */
};
struct half {  /* bytes read from end[side] and sent to the other end */
    char *pend;
    size_t plen, poff;
    int eof;
};
struct conn {
    int fd[2];
    unsigned interest[2];
    int connecting, dead;
    struct end end[2];
    struct half h[2];
    struct conn *next_dead;
};

static int listener, upstream_proto;
static struct sockaddr_storage target;
static socklen_t target_len;

static void die(const char *what) {
    fprintf(stderr, "barerelay: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void set_interest(int ep, struct conn *c, int side) {
    struct half *in = &c->h[side], *out = &c->h[!side];
    unsigned want = 0;
    /* read this end while what it sent before is gone and its EOF is not yet seen */
    if (!c->connecting && !in->eof && in->plen == 0)
        want |= EPOLLIN;
    /* write this end while the other end's bytes wait, or to learn that connect() ended */
    if (out->plen || (side == 1 && c->connecting))
        want |= EPOLLOUT;
    if (want == c->interest[side])
        return;
    /* epoll reports a hang-up (and an error) whatever the interest: with none, once only,
     * else a socket whose FIN is in while its bytes wait for the other end spins the loop */
    struct epoll_event ev = {.events = want ? want : EPOLLONESHOT, .data.ptr = &c->end[side]};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd[side], &ev) < 0)
        die("epoll_ctl");
    c->interest[side] = want;
}

static void kill_conn(struct conn *c, struct conn **dead) {
    if (c->dead)
        return;
    c->dead = 1;
    close(c->fd[0]);
    close(c->fd[1]);
    c->next_dead = *dead;
    *dead = c;
}

static void finish_if_done(struct conn *c, struct conn **dead) {
    if (c->h[0].eof && c->h[1].eof && !c->h[0].plen && !c->h[1].plen)
        kill_conn(c, dead);
}

/* Send what waits from `from` to the other end. 0: all sent, 1: some left, -1: error. */
static int flush(struct conn *c, int from) {
    struct half *h = &c->h[from];
    while (h->poff < h->plen) {
        ssize_t n = send(c->fd[!from], h->pend + h->poff, h->plen - h->poff, MSG_NOSIGNAL);
        if (n < 0)
            return errno == EAGAIN ? 1 : -1;
        h->poff += n;
    }
    free(h->pend);
    h->pend = NULL;
    h->plen = h->poff = 0;
    return 0;
}

static int relay(struct conn *c, int from, char *buf) {
    ssize_t n = recv(c->fd[from], buf, SCRATCH, 0);
    if (n < 0)
        return errno == EAGAIN ? 0 : -1;
    if (n == 0) {
        c->h[from].eof = 1;
        return shutdown(c->fd[!from], SHUT_WR) < 0 ? -1 : 0;
    }
    ssize_t sent = send(c->fd[!from], buf, n, MSG_NOSIGNAL);
    if (sent < 0 && errno != EAGAIN)
        return -1;
    if (sent < 0)
        sent = 0;
    if (sent < n) {
        struct half *h = &c->h[from];
        h->pend = malloc(n - sent);
        if (!h->pend)
            return -1;
        memcpy(h->pend, buf + sent, n - sent);
        h->plen = n - sent;
    }
    return 0;
}

static void accept_all(int ep) {
    int one = 1;
    for (;;) {
        int cfd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno != EAGAIN && errno != ECONNABORTED && errno != EMFILE)
                die("accept4");
            return;
        }
        int ufd = socket(target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                         upstream_proto);
        struct conn *c = ufd < 0 ? NULL : calloc(1, sizeof *c);
        if (!c) {
            close(cfd);
            if (ufd >= 0)
                close(ufd);
            continue;
        }
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(ufd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd[0] = cfd;
        c->fd[1] = ufd;
        for (int side = 0; side < 2; side++)
            c->end[side] = (struct end){c, side};
        int rc = connect(ufd, (struct sockaddr *)&target, target_len);
        if (rc < 0 && errno != EINPROGRESS) {
            close(cfd);
            close(ufd);
            free(c);
            continue;
        }
        c->connecting = rc < 0;
        for (int side = 0; side < 2; side++) {
            struct epoll_event ev = {.events = EPOLLONESHOT, .data.ptr = &c->end[side]};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd[side], &ev) < 0)
                die("epoll_ctl");
            set_interest(ep, c, side);
        }
    }
}

static void on_event(int ep, struct end *e, unsigned events, char *buf, struct conn **dead) {
    struct conn *c = e->c;
    int side = e->side;
    if (c->dead)
        return;
    if (events & EPOLLERR) {  /* a reset or a refused connect: nothing more to relay */
        kill_conn(c, dead);
        return;
    }
    if (c->connecting) {  /* only the upstream is watched, for EPOLLOUT or an error */
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            kill_conn(c, dead);
            return;
        }
        c->connecting = 0;
        set_interest(ep, c, 0);
        set_interest(ep, c, 1);
        return;
    }
    if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && c->h[!side].plen) {
        int rc = flush(c, !side);
        if (rc < 0) {
            kill_conn(c, dead);
            return;
        }
    }
    if ((events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && (c->interest[side] & EPOLLIN)
            && relay(c, side, buf) < 0) {
        kill_conn(c, dead);
        return;
    }
    finish_if_done(c, dead);
    /* hung up both ways after its EOF was read and with nothing left for it: a reset */
    if ((events & EPOLLHUP) && c->h[side].eof && !c->h[!side].plen)
        kill_conn(c, dead);
    if (!c->dead) {
        set_interest(ep, c, 0);
        set_interest(ep, c, 1);
    }
}

static void *worker(void *arg) {
    (void)arg;
    char *buf = malloc(SCRATCH);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!buf || ep < 0)
        die("worker");
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev) < 0)
        die("epoll_ctl listener");
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("epoll_wait");
        struct conn *dead = NULL;
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL)
                accept_all(ep);
            else
                on_event(ep, events[i].data.ptr, events[i].events, buf, &dead);
        }
        while (dead) {  /* freed after the batch: a later event may name it */
            struct conn *next = dead->next_dead;
            free(dead->h[0].pend);
            free(dead->h[1].pend);
            free(dead);
            dead = next;
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: barerelay PORT TARGET_HOST TARGET_PORT "
                        "[--mptcp-listen] [--mptcp-upstream]\n");
        return 2;
    }
    int listen_proto = 0;
    for (int i = 4; i < argc; i++) {
        if (strcmp(argv[i], "--mptcp-listen") == 0)
            listen_proto = IPPROTO_MPTCP;
        else if (strcmp(argv[i], "--mptcp-upstream") == 0)
            upstream_proto = IPPROTO_MPTCP;
        else {
            fprintf(stderr, "barerelay: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(argv[2], argv[3], &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "barerelay: %s:%s: %s\n", argv[2], argv[3], gai_strerror(rc));
        return 1;
    }
    memcpy(&target, res->ai_addr, res->ai_addrlen);
    target_len = res->ai_addrlen;
    freeaddrinfo(res);

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int one = 1;
    listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, listen_proto);
    if (listener < 0)
        die("socket");
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(listener, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    if (listen(listener, 4096) < 0)
        die("listen");
    signal(SIGPIPE, SIG_IGN);

    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < 1)
        cpus = 1;
    pthread_t tid;
    for (long i = 1; i < cpus; i++)
        if (pthread_create(&tid, NULL, worker, NULL) != 0)
            die("pthread_create");
    worker(NULL);
    return 0;
}
