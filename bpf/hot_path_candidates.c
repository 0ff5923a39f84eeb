// Candidate data-path hot paths for tcpacct's send/recv counting, measured side by side by
// the bench (bench/design.py) with the kernel's own run-time count. Not part of the agent:
// they show what each way of finding a socket's counters costs on the running kernel, so a
// design change is chosen from numbers. One candidate per build, chosen by cflag:
//
//   -DCANDIDATE_EMPTY         raw tracepoint, does nothing (the count's own clock reads)
//   -DCANDIDATE_EMPTY_TP_BTF  BTF-typed tracepoint (tp_btf), does nothing
//   -DCANDIDATE_HASH          raw tracepoint, hash map keyed by the struct sock address
//                             (tcpacct's socket table today), atomic add
//   -DCANDIDATE_ARRAY         raw tracepoint, open addressing over an array keyed by the
//                             struct sock address (at most PROBES slots, claimed with
//                             compare-and-swap; array lookups are inlined by the verifier)
//   -DCANDIDATE_SK_STORAGE    tp_btf, socket local storage (bpf_sk_storage_get)
//
// Required cflag: CAPACITY (sockets; the array has twice as many slots, a power of two).
// tp_btf candidates take `u64 *ctx` (the tracepoint's arguments); raw ones
// `struct bpf_raw_tracepoint_args *ctx`. Arguments: (struct sock *sk, int ret, int flags).
// Every candidate counts a socket's bytes exactly; the test (tests/privileged/
// test_hot_path_candidates.py) checks that before any figure is believed.

struct counters {
    u64 sk;       // owner (array candidate); 0 elsewhere
    u64 sent;
    u64 received;
};

#if defined(CANDIDATE_EMPTY)
int on_send(struct bpf_raw_tracepoint_args *ctx) { return 0; }
int on_recv(struct bpf_raw_tracepoint_args *ctx) { return 0; }
#endif

#if defined(CANDIDATE_EMPTY_TP_BTF)
int on_send(u64 *ctx) { return 0; }
int on_recv(u64 *ctx) { return 0; }
#endif

#if defined(CANDIDATE_HASH) || defined(CANDIDATE_ARRAY) || defined(CANDIDATE_SK_STORAGE)
static __always_inline void add(struct counters *c, int ret, int sent)
{
    if (sent)
        __sync_fetch_and_add(&c->sent, ret);
    else
        __sync_fetch_and_add(&c->received, ret);
}
#endif

#if defined(CANDIDATE_HASH)
BPF_HASH(table, u64, struct counters, CAPACITY);

static __always_inline void count(u64 sk, int ret, int sent)
{
    struct counters *c = table.lookup(&sk);
    if (!c) {
        struct counters zero = {};
        table.insert(&sk, &zero);
        c = table.lookup(&sk);
        if (!c)
            return;
    }
    add(c, ret, sent);
}
#endif

#if defined(CANDIDATE_ARRAY)
#define SLOTS (2 * CAPACITY)
#define PROBES 8
BPF_ARRAY(table, struct counters, SLOTS);

// Fibonacci hashing of the address without its low (allocation-aligned) bits.
static __always_inline void count(u64 sk, int ret, int sent)
{
    u32 first = (u32)((sk >> 6) * 11400714819323198485ull >> 32);
#pragma unroll
    for (int i = 0; i < PROBES; i++) {
        u32 slot = (first + i) & (SLOTS - 1);
        struct counters *c = table.lookup(&slot);
        if (!c)
            return;
        if (c->sk == sk) {
            add(c, ret, sent);
            return;
        }
        if (c->sk == 0 && __sync_val_compare_and_swap(&c->sk, 0, sk) == 0) {
            add(c, ret, sent);
            return;
        }
    }
}
#endif

#if defined(CANDIDATE_HASH) || defined(CANDIDATE_ARRAY)
int on_send(struct bpf_raw_tracepoint_args *ctx)
{
    int ret = (int)ctx->args[1];
    if (ret > 0)
        count(ctx->args[0], ret, 1);
    return 0;
}

int on_recv(struct bpf_raw_tracepoint_args *ctx)
{
    int ret = (int)ctx->args[1];
    if (ret > 0)
        count(ctx->args[0], ret, 0);
    return 0;
}
#endif

#if defined(CANDIDATE_SK_STORAGE)
BPF_SK_STORAGE(table, struct counters);

static __always_inline void count(u64 *ctx, int sent)
{
    int ret = (int)ctx[1];
    if (ret <= 0)
        return;
    struct counters *c = table.sk_storage_get((void *)ctx[0], 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (c)
        add(c, ret, sent);
}

int on_send(u64 *ctx)
{
    count(ctx, 1);
    return 0;
}

int on_recv(u64 *ctx)
{
    count(ctx, 0);
    return 0;
}
#endif
