// The per-call data-path loops of the benchmark (bench/workloads.py send_recv and
// unix_send_recv), in C so that the loop itself costs little next to the two system calls
// it times (a Python loop added ~6 us per iteration and as much noise as the agent's cost).
//
// Usage: loops tcp|unix ITERATIONS CPU BLOCKS
//
// Pins itself to CPU (sched_setaffinity; -1: not pinned), makes a connected pair — a loopback TCP connection
// through a listener of its own on 127.0.0.1 port 0, or an AF_UNIX SOCK_STREAM socketpair —
// then runs ITERATIONS of send(client, 1 byte) + recv(server, 1 byte), split into BLOCKS
// equal blocks each timed on its own with clock_gettime(CLOCK_MONOTONIC). Prints one JSON
// line, e.g. for tcp:
//
//   {"kind": "tcp", "cpu": 1, "iterations": 400000, "seconds": 0.61,
//    "block_seconds": [0.12, ...], "client_sent": 400000, "client_received": 0,
//    "server_sent": 0, "server_received": 400000, "server_port": 40001,
//    "client_port": 51234, "tcp_info": {"client_acked": 400001, "client_received": 0,
//    "server_acked": 0, "server_received": 400000}}
//
// tcp_info (tcpi_bytes_acked / tcpi_bytes_received of both ends, as bench/tcpinfo.py reads
// them) is taken once the client's bytes are acknowledged — acked counts the SYN too, so it
// waits for sent + 1 — or after 0.5 s, whatever it is then; the sockets are closed after.
// Exit status 1 (with a message on stderr) if any call fails or moves other than 1 byte.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

_Static_assert(offsetof(struct tcp_info, tcpi_bytes_acked) == 120, "as bench/tcpinfo.py");
_Static_assert(offsetof(struct tcp_info, tcpi_bytes_received) == 128, "as bench/tcpinfo.py");

#define MAX_BLOCKS 64
#define ACK_TIMEOUT 0.5

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int fail(const char *what) {
    fprintf(stderr, "loops: %s: %s\n", what, strerror(errno));
    return 1;
}

static int failed_call(const char *what, ssize_t n) {
    if (n < 0) return fail(what);
    fprintf(stderr, "loops: %s moved %zd bytes, not 1\n", what, n);
    return 1;
}

static int tcp_bytes(int fd, unsigned long long *acked, unsigned long long *received) {
    struct tcp_info info;
    socklen_t len = sizeof(info);
    memset(&info, 0, sizeof(info));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len)) return -1;
    *acked = info.tcpi_bytes_acked;
    *received = info.tcpi_bytes_received;
    return 0;
}

static int port_of(int fd, int peer) {
    struct sockaddr_in addr;
    socklen_t len = sizeof(addr);
    if ((peer ? getpeername : getsockname)(fd, (void *)&addr, &len)) return -1;
    return ntohs(addr.sin_port);
}

// A connected loopback TCP pair through a listener of our own on 127.0.0.1 port 0.
static int tcp_pair(int *listener, int *client, int *server) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    *listener = socket(AF_INET, SOCK_STREAM, 0);
    if (*listener < 0 || bind(*listener, (void *)&addr, len) || listen(*listener, 1) ||
        getsockname(*listener, (void *)&addr, &len))
        return -1;
    *client = socket(AF_INET, SOCK_STREAM, 0);
    if (*client < 0 || connect(*client, (void *)&addr, len)) return -1;
    *server = accept(*listener, NULL, NULL);
    return *server < 0 ? -1 : 0;
}

int main(int argc, char **argv) {
    if (argc != 5 || (strcmp(argv[1], "tcp") && strcmp(argv[1], "unix"))) {
        fprintf(stderr, "usage: loops tcp|unix ITERATIONS CPU BLOCKS\n");
        return 2;
    }
    int tcp = !strcmp(argv[1], "tcp");
    long iterations = atol(argv[2]), blocks = atol(argv[4]);
    int cpu = atoi(argv[3]);
    if (iterations <= 0 || blocks <= 0 || blocks > MAX_BLOCKS || iterations % blocks) {
        fprintf(stderr, "loops: ITERATIONS must be a positive multiple of BLOCKS (1..%d)\n",
                MAX_BLOCKS);
        return 2;
    }
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof(set), &set)) return fail("sched_setaffinity");
    }

    int listener = -1, client, server;
    if (tcp) {
        if (tcp_pair(&listener, &client, &server)) return fail("loopback TCP pair");
    } else {
        int pair[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair)) return fail("socketpair");
        client = pair[0];
        server = pair[1];
    }

    char out = 'x', in;
    long per_block = iterations / blocks, sent = 0, received = 0;
    double block_seconds[MAX_BLOCKS], total = 0;
    for (long b = 0; b < blocks; b++) {
        double start = now();
        for (long i = 0; i < per_block; i++) {
            ssize_t n = send(client, &out, 1, 0);
            if (n != 1) return failed_call("send", n);
            n = recv(server, &in, 1, 0);
            if (n != 1) return failed_call("recv", n);
        }
        block_seconds[b] = now() - start;
        total += block_seconds[b];
        sent += per_block;
        received += per_block;
    }

    printf("{\"kind\": \"%s\", \"cpu\": %d, \"iterations\": %ld, \"seconds\": %.9f, "
           "\"block_seconds\": [", argv[1], cpu, iterations, total);
    for (long b = 0; b < blocks; b++) printf("%s%.9f", b ? ", " : "", block_seconds[b]);
    printf("], \"client_sent\": %ld, \"client_received\": 0, \"server_sent\": 0, "
           "\"server_received\": %ld", sent, received);
    if (tcp) {
        unsigned long long client_acked, client_received, server_acked, server_received;
        double deadline = now() + ACK_TIMEOUT;
        for (;;) {
            if (tcp_bytes(client, &client_acked, &client_received)) return fail("TCP_INFO");
            if (client_acked >= (unsigned long long)sent + 1 || now() >= deadline) break;
            usleep(5000);
        }
        if (tcp_bytes(server, &server_acked, &server_received)) return fail("TCP_INFO");
        printf(", \"server_port\": %d, \"client_port\": %d, \"tcp_info\": {"
               "\"client_acked\": %llu, \"client_received\": %llu, "
               "\"server_acked\": %llu, \"server_received\": %llu}",
               port_of(client, 1), port_of(client, 0), client_acked, client_received,
               server_acked, server_received);
    }
    printf("}\n");
    fflush(stdout);
    close(client);
    close(server);
    if (listener >= 0) close(listener);
    return 0;
}
