// Connection churn for the load tests: connect, write a request, accept, read it, write a
// response, read it, close both — as fast as one thread can, for a fixed time.
// Usage: churn SECONDS REQUEST_BYTES RESPONSE_BYTES [MAX_CONNECTIONS]
// Prints one JSON line: {"port": P, "connections": N, "request_bytes": R, "response_bytes": S}
//
// Or: churn --hold N REQUEST_BYTES RESPONSE_BYTES — opens N connections (over as many
// listeners as the ephemeral port range needs), moves the bytes on each, prints
// {"ports": [...], "connections": N, ...}, keeps them open until stdin closes, then closes all.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int move(int fd, char *buf, long size, int writing) {
    long done = 0;
    while (done < size) {
        long n = writing ? write(fd, buf, size - done) : read(fd, buf, size - done);
        if (n <= 0) return -1;
        done += n;
    }
    return 0;
}

static int hold(long n, long request, long response) {
    struct rlimit limit;
    getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = limit.rlim_max; // the hard limit may not be raised here (no CAP_SYS_RESOURCE)
    if (setrlimit(RLIMIT_NOFILE, &limit) || (long)limit.rlim_cur < 2 * n + 16) {
        fprintf(stderr, "churn: %ld connections need %ld descriptors, limit is %ld\n",
                n, 2 * n + 16, (long)limit.rlim_cur);
        return 1;
    }
    char *buf = calloc(1, request > response ? request + 1 : response + 1);
    int *fds = calloc(2 * n, sizeof(int));
    long per_listener = 20000, listeners = n / per_listener + 1;
    printf("{\"ports\": [");
    int listener = -1;
    struct sockaddr_in addr;
    socklen_t len = sizeof(addr);
    for (long i = 0; i < n; i++) {
        if (i % per_listener == 0) {
            listener = socket(AF_INET, SOCK_STREAM, 0);
            memset(&addr, 0, sizeof(addr));
            addr.sin_family = AF_INET;
            addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            len = sizeof(addr);
            if (bind(listener, (void *)&addr, len) || listen(listener, 4096)) {
                perror("listen"); return 1;
            }
            getsockname(listener, (void *)&addr, &len);
            printf("%s%d", i ? ", " : "", ntohs(addr.sin_port));
        }
        int client = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(client, (void *)&addr, len)) { perror("connect"); return 1; }
        int server = accept(listener, NULL, NULL);
        if (server < 0) { perror("accept"); return 1; }
        if (move(client, buf, request, 1) || move(server, buf, request, 0) ||
            move(server, buf, response, 1) || move(client, buf, response, 0)) {
            perror("transfer"); return 1;
        }
        fds[2 * i] = client;
        fds[2 * i + 1] = server;
    }
    printf("], \"listeners\": %ld, \"connections\": %ld, \"request_bytes\": %ld, "
           "\"response_bytes\": %ld}\n", listeners, n, n * request, n * response);
    fflush(stdout);
    while (read(0, buf, 1) > 0) {
    }
    for (long i = 0; i < 2 * n; i++) close(fds[i]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "--hold"))
        return hold(atol(argv[2]), atol(argv[3]), atol(argv[4]));
    if (argc < 4) { fprintf(stderr, "usage: churn SECONDS REQUEST RESPONSE [MAX]\n"); return 2; }
    double seconds = atof(argv[1]);
    long request = atol(argv[2]), response = atol(argv[3]);
    long max = argc > 4 ? atol(argv[4]) : -1;
    char *buf = calloc(1, request > response ? request + 1 : response + 1);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    if (bind(listener, (void *)&addr, len) || listen(listener, 1024)) { perror("listen"); return 1; }
    getsockname(listener, (void *)&addr, &len);
    printf("{\"port\": %d", ntohs(addr.sin_port));
    fflush(stdout);
    double end = now() + seconds;
    long count = 0;
    while ((max < 0 || count < max) && now() < end) {
        int client = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(client, (void *)&addr, len)) { perror("connect"); return 1; }
        int server = accept(listener, NULL, NULL);
        if (server < 0) { perror("accept"); return 1; }
        if (move(client, buf, request, 1) || move(server, buf, request, 0) ||
            move(server, buf, response, 1) || move(client, buf, response, 0)) {
            perror("transfer"); return 1;
        }
        close(client);
        close(server);
        count++;
    }
    printf(", \"connections\": %ld, \"request_bytes\": %ld, \"response_bytes\": %ld}\n",
           count, count * request, count * response);
    return 0;
}
