#if defined(BACKEND_KPROBE)
#include <uapi/linux/ptrace.h>
#endif
#if defined(BACKEND_TRACEPOINT)
#define CHECK_PROTOCOL 1
#endif

// tcpacct — one BPF program, three backends chosen by cflag (-DBACKEND_TRACEPOINT,
// -DBACKEND_FENTRY or -DBACKEND_KPROBE). It is one file because bcc rewrites map calls only
// in the main file. Shared: the maps, reading a socket's identity, the per-socket counters,
// and the lifecycle (raw tracepoints sock:inet_sock_set_state, tcp:tcp_destroy_sock).
//
// The kernel counts; user space names things. Values hold raw addresses, ports in network
// byte order, ids and counters. Struct offsets come from the running kernel's BTF and
// arrive as -D cflags (agent/ebpf/offsets.py); no kernel struct layout is taken from headers.
//
// Required cflags: MAX_SOCKETS, MAX_CLOSED, MAX_LISTENERS, OFF_SKC_DADDR, OFF_SKC_RCV_SADDR,
// OFF_SKC_DPORT, OFF_SKC_FAMILY, OFF_SKC_NET, OFF_SKC_V6_DADDR, OFF_SKC_V6_RCV_SADDR,
// OFF_SK_PROTOCOL, OFF_INET_SPORT, OFF_NET_NS_INUM. Optional: SLOTS (below; Linux >= 5.12).
//
// Invariant: no byte counted here is lost or counted twice. A socket's entry lives in
// `socks` (keyed by its struct sock address) from first sight until tcp_destroy_sock, when
// it is removed and its final counts move to the closed records for user space to drain:
// the `closed_ring` array where there are slots (below), the `closed` hash map (keyed by
// the socket's unique id) where there are not. If they are full, the final counts go to
// the SPILLED counters; if `socks` is full, bytes go to the UNTRACKED counters. Nothing is
// dropped silently.
//
// The hot path (every send and receive) does not look `socks` up: a tracked socket also
// gets a slot in the `slots` array, found from its address by open addressing (at most
// SLOT_PROBES slots from its home, lookups the verifier inlines; a hash-map lookup costs
// ~10x more here, bench figure design.hot_path_ns). The bytes it moves are added to its
// slot, and nothing is marked: user space memory-maps the array and finds the slots that
// moved by reading it. Its entry in `socks` keeps identity, version and any bytes counted
// before it had a slot. A socket's counts are entry + slot: user space adds them while the
// slot still names the entry (slot.sk and slot.id), and retire() adds them into the final
// record before the slot is freed. A socket that finds no free slot counts in its entry as
// before, and so does every socket when SLOTS is not defined (kernels without
// compare-and-swap on map values, before 5.12).

#define TCPACCT_AF_INET 2
#define TCPACCT_AF_INET6 10
#define TCPACCT_IPPROTO_TCP 6
#define TCPACCT_MSG_PEEK 0x2
#define TCPACCT_MSG_ERRQUEUE 0x2000

#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_ 2
#define TCP_SYN_RECV_ 3
#define TCP_CLOSE_ 7
#define TCP_LISTEN_ 10

// Shared with agent/model.py (Role, SocketFlag).
#define ROLE_UNKNOWN 0
#define ROLE_CLIENT 1
#define ROLE_SERVER 2
#define F_OPENED 1
#define F_CLOSED 2
#define F_PREEXISTING 4
#define F_DESTROYED 8

// Indices of `counters`, shared with agent/ebpf/decoding.py.
#define C_UNTRACKED_SENT 0
#define C_UNTRACKED_RECEIVED 1
#define C_UNTRACKED_SOCKETS 2
#define C_SPILLED_SENT 3
#define C_SPILLED_RECEIVED 4
#define C_SPILLED_SOCKETS 5
#define C_CHANGES_LOST 6   // `changed` was full: user space reads the whole socket map
#define C_LIFECYCLE_NESTED 7 // lifecycle events a nested twin handled (run_nested)
#define C_COUNT 8

#define DIR_SENT 0
#define DIR_RECEIVED 1

struct sock_info {
    u64 id;            // unique for the agent's lifetime; struct sock addresses are reused
    u64 sent;          // bytes the local application wrote (return values)
    u64 received;      // bytes the local application read (not MSG_PEEK)
    u8 local_addr[16]; // IPv4 in the first 4 bytes when family == AF_INET
    u8 remote_addr[16];
    u16 local_port;    // network byte order
    u16 remote_port;   // network byte order
    u16 family;
    u8 role;
    u8 flags;
    u32 netns;         // network namespace inode number
    u32 tgid;          // process that connected/listened/moved bytes, 0 until known
    char comm[16];
    u32 changed_in;    // the poll round in which the entry last went into `changed`
    u32 version;       // bumped after every change of the fields above but the counters
    u32 slot;          // index + 1 of the socket's slot in `slots`; 0: none
    u32 spare;
};

// A tracked socket's counters while it has a slot (shared with agent/ebpf/decoding.py).
struct slot {
    u64 sk;            // the owner's struct sock address; 0: free
    u64 id;            // the owner's sock_info.id; 0 while being handed out or freed
    u64 sent;
    u64 received;
    u32 needs_process; // the owner's entry has no process yet: take the slow path
    u32 spare;
};

struct listener_key {
    u32 netns;
    u16 port;          // network byte order
    u16 pad;
};

struct process_info {
    u32 tgid;
    char comm[16];
};

BPF_HASH(socks, u64, struct sock_info, MAX_SOCKETS);
#ifndef SLOTS
BPF_HASH(closed, u64, struct sock_info, MAX_CLOSED);
#endif
BPF_HASH(listeners, struct listener_key, struct process_info, MAX_LISTENERS);
BPF_PERCPU_ARRAY(counters, u64, C_COUNT);
BPF_ARRAY(next_id, u64, 1);
// Incremental reads: the first change of an entry in a poll round puts its key into
// `changed`. User space bumps `poll_round`, then drains `changed` and reads only those
// entries, so an idle socket costs a poll nothing. A change after the bump marks the entry
// again for the next round; counts are added before the mark is checked, so a read that
// follows the bump sees every byte whose mark it skipped.
BPF_ARRAY(poll_round, u32, 1);
BPF_HASH(changed, u64, u8, MAX_SOCKETS);
#ifdef SLOTS
// SLOTS: a power of two, at least twice MAX_SOCKETS (the tracer chooses it). Memory-mapped
// by user space, which reads the counters without a system call.
#define TCPACCT_F_MMAPABLE (1U << 10)
#ifndef SLOT_PROBES
#define SLOT_PROBES 8
#endif
BPF_F_TABLE("array", u32, struct slot, slots, SLOTS, TCPACCT_F_MMAPABLE);

// Closed records where compare-and-swap exists: a ring of MAX_CLOSED records in an array.
// A hash-map insert per finished socket (and user space's delete of it) cost the churn
// about 2 points of its rate here; a record written by index costs a copy. Record number
// n (counting from 0) lives at index n % MAX_CLOSED. The kernel owns the head (records
// reserved), user space the tail (records read): a writer reserves number `head` with
// compare-and-swap while fewer than MAX_CLOSED records are unread, copies the record in,
// then commits it by setting its `number` to n + 1. User space reads from the tail up to
// the first record not committed yet (agent/ebpf/tracing.py _ClosedRing), and a record's
// index is not written again before the tail has passed it.
struct closed_record {
    struct sock_info info;
    u64 number;        // n + 1 once record n is whole here; before that, an older one's
};

#define CLOSED_HEAD 0
#define CLOSED_TAIL 1
#define CLOSED_ATTEMPTS 8 // reservations lost to other CPUs (or a nested twin) before a spill
BPF_ARRAY(closed_ring, struct closed_record, MAX_CLOSED);
BPF_ARRAY(closed_ends, u64, 2);
#endif

static __always_inline void count(u32 index, u64 value)
{
    u64 *counter = counters.lookup(&index);
    if (counter)
        __sync_fetch_and_add(counter, value); // a softirq may interrupt us on this CPU
}

static __always_inline void mark_changed(u64 key, struct sock_info *entry)
{
    int zero = 0;
    u32 *round = poll_round.lookup(&zero);
    if (!round || entry->changed_in == *round)
        return;
    entry->changed_in = *round;
    u8 one = 1;
    if (changed.update(&key, &one) != 0)
        count(C_CHANGES_LOST, 1);
}

#ifdef SLOTS
// Fibonacci hashing of the address without its low bits (sockets are at least 64-byte
// aligned): the first of the SLOT_PROBES slots a socket's slot may be in.
static __always_inline u32 slot_home(u64 key)
{
    return (u32)((key >> 6) * 11400714819323198485ull >> 32);
}

// The i-th of the slots a socket homed at `home` may have (its index into *index).
static __always_inline struct slot *probe_slot(u32 home, int i, u32 *index)
{
    *index = (home + i) & (SLOTS - 1);
    return slots.lookup(index);
}

// The slot whose owner is the socket at `key`, or NULL.
static __always_inline struct slot *find_slot(u64 key)
{
    u32 home = slot_home(key), index;
#pragma unroll
    for (int i = 0; i < SLOT_PROBES; i++) {
        struct slot *slot = probe_slot(home, i, &index);
        if (!slot)
            return NULL;
        if (slot->sk == key)
            return slot;
    }
    return NULL;
}

// The entry's own slot: NULL when it has none or the slot no longer names it.
static __always_inline struct slot *slot_of(u64 key, struct sock_info *entry)
{
    if (!entry->slot)
        return NULL;
    u32 index = entry->slot - 1;
    struct slot *slot = slots.lookup(&index);
    if (!slot || slot->sk != key || slot->id != entry->id)
        return NULL;
    return slot;
}

// Counting into a slot marks nothing: user space finds moved slots by reading the array
// (agent/ebpf/tracing.py _SlotTable.scan), so the hot path writes one counter and no map.
static __always_inline void add_to_slot(struct slot *slot, u64 bytes, int direction)
{
    if (direction == DIR_SENT)
        __sync_fetch_and_add(&slot->sent, bytes);
    else
        __sync_fetch_and_add(&slot->received, bytes);
}

// Hand a new entry a slot: a free one near its home, claimed with compare-and-swap. A slot
// still naming this address belongs to an entry that is gone (or raced with this one): it
// is taken over, and what it counted moves into the entry, so no byte is lost. No slot:
// the entry counts by itself. A free slot's counters are already zero (free_slot).
static __always_inline void give_slot(u64 key, struct sock_info *entry)
{
    u32 home = slot_home(key), index;
#pragma unroll
    for (int i = 0; i < SLOT_PROBES; i++) {
        struct slot *slot = probe_slot(home, i, &index);
        if (!slot)
            return;
        if (slot->sk == key) {
            __sync_fetch_and_add(&entry->sent, __sync_lock_test_and_set(&slot->sent, 0));
            __sync_fetch_and_add(&entry->received,
                                 __sync_lock_test_and_set(&slot->received, 0));
        } else if (slot->sk != 0 || __sync_val_compare_and_swap(&slot->sk, 0, key) != 0) {
            continue;
        }
        slot->needs_process = 1;
        __sync_lock_test_and_set(&slot->id, entry->id); // visible before entry->slot is
        entry->slot = index + 1;
        return;
    }
}

// Free a slot whose counts were taken. The owner's id goes first, the counters after it,
// the address last (give_slot sets the other fields when it hands the slot out again).
// User space reads a slot's id before and after its counters (agent/ebpf/decoding.py
// fold_slot, agent/ebpf/tracing.py _SlotTable.scan): ids are never reused, so the same id
// both times means the counters between were that owner's.
static __always_inline void free_slot(struct slot *slot)
{
    __sync_lock_test_and_set(&slot->id, 0);
    __sync_lock_test_and_set(&slot->sent, 0);
    __sync_lock_test_and_set(&slot->received, 0);
    __sync_lock_test_and_set(&slot->sk, 0);
}

// Append a finished socket's final record to `closed_ring`: 0, or -1 when the ring is full
// (or lost every reservation race), and the caller spills.
static __always_inline int record_closed(struct sock_info *final)
{
    int head_index = CLOSED_HEAD, tail_index = CLOSED_TAIL;
    u64 *head = closed_ends.lookup(&head_index);
    u64 *tail = closed_ends.lookup(&tail_index);
    if (!head || !tail)
        return -1;
#pragma unroll
    for (int attempt = 0; attempt < CLOSED_ATTEMPTS; attempt++) {
        u64 number = *(volatile u64 *)head;
        if (number - *(volatile u64 *)tail >= MAX_CLOSED)
            return -1;
        if (__sync_val_compare_and_swap(head, number, number + 1) != number)
            continue;
        u32 index = number % MAX_CLOSED;
        struct closed_record *record = closed_ring.lookup(&index);
        if (!record)
            return -1; // never: index < MAX_CLOSED (the verifier asks)
        __builtin_memcpy(&record->info, final, sizeof(*final));
        __sync_lock_test_and_set(&record->number, number + 1); // after the copy
        return 0;
    }
    return -1;
}
#else
static __always_inline struct slot *find_slot(u64 key) { return NULL; }
static __always_inline struct slot *slot_of(u64 key, struct sock_info *entry) { return NULL; }
static __always_inline void add_to_slot(struct slot *slot, u64 bytes, int direction) {}
static __always_inline void give_slot(u64 key, struct sock_info *entry) {}
static __always_inline void free_slot(struct slot *slot) {}

static __always_inline int record_closed(struct sock_info *final)
{
    return closed.insert(&final->id, final);
}
#endif

// The entry's process is recorded (and marked for user space): its sends and receives take
// the hot path from the first one on (count_bytes' slow path would only clear the flag).
static __always_inline void process_known(u64 key, struct sock_info *entry)
{
    struct slot *slot = slot_of(key, entry);
    if (slot)
        slot->needs_process = 0;
}

// Every change of an entry's identity, role, flags or process ends here: while the version
// stays, user space updates only the counters of a sample it has already compared whole
// (agent/ebpf/decoding.py SampleDecoder.refresh).
static __always_inline void bump_version(struct sock_info *entry)
{
    __sync_fetch_and_add(&entry->version, 1);
}

static __always_inline u16 sock_protocol(void *sk)
{
    u16 protocol = 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), sk + OFF_SK_PROTOCOL);
    return protocol;
}

static __always_inline u32 sock_netns(void *sk)
{
    void *net = NULL;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), sk + OFF_SKC_NET);
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), net + OFF_NET_NS_INUM);
    return inum;
}

static __always_inline u16 sock_local_port(void *sk)
{
    // inet_sport, not skc_num: the kernel zeroes skc_num once the socket is in TCP_CLOSE.
    u16 port = 0;
    bpf_probe_read_kernel(&port, sizeof(port), sk + OFF_INET_SPORT);
    return port;
}

// The sock_common fields tcpacct reads lie within 88 bytes on the kernels so far: where they
// fit in SKC_SPAN_MAX they are read with one bpf_probe_read_kernel, not one each (a read
// costs ~35 ns in the churn on an AMD host, and a connection took some thirty of them).
#define TCPACCT_MIN(a, b) ((a) < (b) ? (a) : (b))
#define TCPACCT_MAX(a, b) ((a) > (b) ? (a) : (b))
#define SKC_FIRST                                                                           \
    TCPACCT_MIN(TCPACCT_MIN(TCPACCT_MIN(OFF_SKC_DADDR, OFF_SKC_RCV_SADDR),                  \
                            TCPACCT_MIN(OFF_SKC_DPORT, OFF_SKC_FAMILY)),                    \
                TCPACCT_MIN(OFF_SKC_NET, TCPACCT_MIN(OFF_SKC_V6_DADDR, OFF_SKC_V6_RCV_SADDR)))
#define SKC_END                                                                             \
    TCPACCT_MAX(TCPACCT_MAX(TCPACCT_MAX(OFF_SKC_DADDR + 4, OFF_SKC_RCV_SADDR + 4),          \
                            TCPACCT_MAX(OFF_SKC_DPORT + 2, OFF_SKC_FAMILY + 2)),            \
                TCPACCT_MAX(OFF_SKC_NET + 8,                                                \
                            TCPACCT_MAX(OFF_SKC_V6_DADDR + 16, OFF_SKC_V6_RCV_SADDR + 16)))
#define SKC_SPAN (SKC_END - SKC_FIRST)
#ifndef SKC_SPAN_MAX // -DSKC_SPAN_MAX=0 takes the field-by-field reads (a test does)
#define SKC_SPAN_MAX 128
#endif

// The addresses, the remote port and the family into *info; the socket's struct net
// pointer is returned (the netns inode is behind it). The local port is in inet_sock,
// read apart.
static __always_inline void *read_common(void *sk, struct sock_info *info)
{
    void *net = NULL;
    u16 family = 0;
#if SKC_SPAN <= SKC_SPAN_MAX
    u8 common[SKC_SPAN];
    bpf_probe_read_kernel(common, sizeof(common), sk + SKC_FIRST); // zeroed if it fails
    __builtin_memcpy(&family, common + (OFF_SKC_FAMILY - SKC_FIRST), sizeof(family));
    __builtin_memcpy(&info->remote_port, common + (OFF_SKC_DPORT - SKC_FIRST), sizeof(u16));
    __builtin_memcpy(&net, common + (OFF_SKC_NET - SKC_FIRST), sizeof(net));
    if (family == TCPACCT_AF_INET6) {
        __builtin_memcpy(info->local_addr, common + (OFF_SKC_V6_RCV_SADDR - SKC_FIRST), 16);
        __builtin_memcpy(info->remote_addr, common + (OFF_SKC_V6_DADDR - SKC_FIRST), 16);
    } else {
        __builtin_memcpy(info->local_addr, common + (OFF_SKC_RCV_SADDR - SKC_FIRST), 4);
        __builtin_memcpy(info->remote_addr, common + (OFF_SKC_DADDR - SKC_FIRST), 4);
    }
#else
    bpf_probe_read_kernel(&family, sizeof(family), sk + OFF_SKC_FAMILY);
    bpf_probe_read_kernel(&info->remote_port, sizeof(u16), sk + OFF_SKC_DPORT);
    bpf_probe_read_kernel(&net, sizeof(net), sk + OFF_SKC_NET);
    if (family == TCPACCT_AF_INET6) {
        bpf_probe_read_kernel(info->local_addr, 16, sk + OFF_SKC_V6_RCV_SADDR);
        bpf_probe_read_kernel(info->remote_addr, 16, sk + OFF_SKC_V6_DADDR);
    } else {
        bpf_probe_read_kernel(info->local_addr, 4, sk + OFF_SKC_RCV_SADDR);
        bpf_probe_read_kernel(info->remote_addr, 4, sk + OFF_SKC_DADDR);
    }
#endif
    info->family = family;
    return net;
}

// A new entry's identity: sock_common's fields, the local port and the netns inode.
static __always_inline void read_identity(void *sk, struct sock_info *info)
{
    void *net = read_common(sk, info);
    info->local_port = sock_local_port(sk);
    u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), net + OFF_NET_NS_INUM);
    info->netns = inum;
}

// What a socket's identity gains after connect()'s SYN_SENT: the local port (chosen after
// it), and the local address of an IPv6 socket connecting to a v4-mapped address (set
// after it). Its network namespace does not change.
static __always_inline void reread_endpoints(void *sk, struct sock_info *info)
{
    read_common(sk, info);
    info->local_port = sock_local_port(sk);
}

static __always_inline void set_current_process(struct sock_info *info)
{
    info->tgid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(info->comm, sizeof(info->comm));
}

// The process listening on a port in a network namespace, if one is known.
static __always_inline struct process_info *listener_at(u32 netns, u16 port)
{
    struct listener_key key = {};
    key.netns = netns;
    key.port = port;
    return listeners.lookup(&key);
}

static __always_inline struct process_info *listener_of(void *sk)
{
    return listener_at(sock_netns(sk), sock_local_port(sk));
}

// A socket's key in `socks` and `slots`: its address as a number. fentry arguments are
// typed pointers, on which the verifier allows no shifts, comparisons or stores into maps,
// so there the address is read as plain bytes.
static __always_inline u64 sock_key(void *sk)
{
#ifdef BACKEND_FENTRY
    u64 key = 0;
    bpf_probe_read_kernel(&key, sizeof(key), &sk);
    return key;
#else
    return (u64)sk;
#endif
}

// Start tracking a socket. Returns its entry, or NULL when the map is full.
static __always_inline struct sock_info *track(void *sk, u8 role, u8 flags)
{
    int zero = 0;
    u64 *last_id = next_id.lookup(&zero);
    if (!last_id)
        return NULL;
    struct sock_info info = {};
    info.id = __sync_fetch_and_add(last_id, 1) + 1;
    info.role = role;
    info.flags = flags;
    read_identity(sk, &info);
    u64 key = sock_key(sk);
    if (socks.insert(&key, &info) != 0) {
        struct sock_info *raced = socks.lookup(&key); // created on another CPU meanwhile
        if (!raced)
            count(C_UNTRACKED_SOCKETS, 1);
        return raced;
    }
    struct sock_info *entry = socks.lookup(&key);
    if (entry) {
        give_slot(key, entry);
        mark_changed(key, entry);
    }
    return entry;
}

// The socket is finished: its entry leaves `socks` first, then its final counts enter the
// closed records. In that order user space can never see the same id live after draining it.
static __always_inline void retire(u64 key, struct sock_info *entry)
{
    struct sock_info final = {};
    __builtin_memcpy(&final, entry, sizeof(final));
    final.flags |= F_CLOSED | F_DESTROYED;
    struct slot *slot = slot_of(key, entry);
    if (slot) {
        final.sent += slot->sent;
        final.received += slot->received;
    }
    final.slot = 0;
    socks.delete(&key);
    if (slot) // after the delete: a reader that saw the entry finds the slot still its own
        free_slot(slot);
    if (record_closed(&final) != 0) {
        count(C_SPILLED_SENT, final.sent);
        count(C_SPILLED_RECEIVED, final.received);
        count(C_SPILLED_SOCKETS, 1);
    }
}

// The hot path: a few inlined array lookups when the socket has a slot.
static __always_inline void count_bytes(void *sk, u64 bytes, int direction)
{
    u64 key = sock_key(sk);
    struct slot *slot = find_slot(key);
    if (slot && !slot->needs_process) {
        add_to_slot(slot, bytes, direction);
        return;
    }
#ifdef CHECK_PROTOCOL
    // Socket tracepoints fire for every family (Unix, UDP, ...): a socket without a slot is
    // read before `socks` is looked up, which costs more than the read.
    if (!slot) {
        if (sock_protocol(sk) != TCPACCT_IPPROTO_TCP)
            return;
        u16 family = 0;
        bpf_probe_read_kernel(&family, sizeof(family), sk + OFF_SKC_FAMILY);
        if (family != TCPACCT_AF_INET && family != TCPACCT_AF_INET6)
            return;
    }
#endif
    struct sock_info *entry = socks.lookup(&key);
    if (!entry) {
        // Older than the agent (or bytes before ESTABLISHED, as with TCP Fast Open):
        // a local listener on its port makes it the server end.
        u8 role = listener_of(sk) ? ROLE_SERVER : ROLE_CLIENT;
        entry = track(sk, role, F_PREEXISTING);
        if (!entry) {
            count(direction == DIR_SENT ? C_UNTRACKED_SENT : C_UNTRACKED_RECEIVED, bytes);
            return;
        }
    }
    if (!entry->tgid) {
        set_current_process(entry);
        bump_version(entry);
        mark_changed(key, entry); // user space reads the process
    }
    slot = slot_of(key, entry);
    if (slot) {
        slot->needs_process = 0; // the entry has its process: the hot path from now on
        add_to_slot(slot, bytes, direction);
        return;
    }
    if (direction == DIR_SENT)
        __sync_fetch_and_add(&entry->sent, bytes);
    else
        __sync_fetch_and_add(&entry->received, bytes);
    mark_changed(key, entry);
}

// raw tracepoint sock:inet_sock_set_state(const struct sock *sk, int oldstate, int newstate).
// bcc makes programs only of functions in the main file: each backend defines
// on_set_state/on_destroy as one-line calls of these.
static __always_inline int handle_set_state(struct bpf_raw_tracepoint_args *ctx)
{
    void *sk = (void *)ctx->args[0];
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    // FIN_WAIT*, CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT, SYN_RECV change nothing here:
    // nothing is read for the six or so of them every connection goes through.
    if (newstate != TCP_SYN_SENT_ && newstate != TCP_ESTABLISHED_ && newstate != TCP_CLOSE_ &&
        newstate != TCP_LISTEN_ && oldstate != TCP_LISTEN_)
        return 0;
    u64 key = (u64)sk;
    // sock_protocol() is read where an entry is to be made or a listener is involved: the
    // tracepoint fires for other protocols too (SCTP), and an entry is made only for TCP.
    // (An entry found at the address of another protocol's socket would be a TCP socket's
    // whose destroy no program saw, which tcpacct_lifecycle_events_missed_total counts.)
    if ((newstate == TCP_LISTEN_ || oldstate == TCP_LISTEN_) &&
        sock_protocol(sk) != TCPACCT_IPPROTO_TCP)
        return 0;

    if (newstate == TCP_LISTEN_) { // listen(): process context
        struct listener_key lkey = {};
        lkey.netns = sock_netns(sk);
        lkey.port = sock_local_port(sk);
        struct process_info owner = {};
        owner.tgid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(owner.comm, sizeof(owner.comm));
        listeners.update(&lkey, &owner);
        return 0;
    }
    if (oldstate == TCP_LISTEN_) {
        // LISTEN -> SYN_RECV is a new child (a copy of the listener), not the listener.
        if (newstate == TCP_CLOSE_) {
            struct listener_key lkey = {};
            lkey.netns = sock_netns(sk);
            lkey.port = sock_local_port(sk);
            listeners.delete(&lkey);
        }
        return 0;
    }

    struct sock_info *entry = socks.lookup(&key);
    if (newstate == TCP_SYN_SENT_) { // connect(): process context
        if (entry && (entry->flags & (F_OPENED | F_PREEXISTING))) {
            retire(key, entry); // reconnect after a disconnect: a new connection
            entry = NULL;
        }
        if (!entry) {
            if (sock_protocol(sk) != TCPACCT_IPPROTO_TCP)
                return 0;
            entry = track(sk, ROLE_CLIENT, 0);
        }
        if (entry) {
            entry->flags &= ~F_CLOSED; // a failed attempt before this one
            if (!entry->tgid)
                set_current_process(entry);
            bump_version(entry);
            mark_changed(key, entry);
            process_known(key, entry);
        }
        return 0;
    }
    if (newstate == TCP_ESTABLISHED_) {
        u8 role = oldstate == TCP_SYN_SENT_ ? ROLE_CLIENT : ROLE_SERVER;
        if (entry && (entry->flags & F_OPENED)) {
            // A socket opens once: this entry is an earlier socket's at the same address
            // whose destroy no program saw (see on_set_state_nested). It ends now, with
            // its counts, rather than lend its id to the new connection.
            retire(key, entry);
            entry = NULL;
        }
        if (!entry) {
            if (sock_protocol(sk) != TCPACCT_IPPROTO_TCP)
                return 0;
            entry = track(sk, role, F_OPENED);
        } else {
            reread_endpoints(sk, entry); // the local port was not chosen yet at SYN_SENT
            if (entry->role == ROLE_UNKNOWN)
                entry->role = role;
            entry->flags |= F_OPENED;
        }
        if (entry && !entry->tgid && role == ROLE_SERVER) {
            struct process_info *owner = listener_at(entry->netns, entry->local_port);
            if (owner) {
                entry->tgid = owner->tgid;
                __builtin_memcpy(entry->comm, owner->comm, sizeof(entry->comm));
            }
        }
        if (entry) {
            bump_version(entry);
            mark_changed(key, entry);
            if (entry->tgid)
                process_known(key, entry);
        }
        return 0;
    }
    if (newstate == TCP_CLOSE_ && entry) {
        entry->flags |= F_CLOSED;
        bump_version(entry);
        mark_changed(key, entry);
    }
    return 0;
}

// raw tracepoint tcp:tcp_destroy_sock(struct sock *sk): nothing can move after this.
static __always_inline int handle_destroy(struct bpf_raw_tracepoint_args *ctx)
{
    u64 key = ctx->args[0];
    struct sock_info *entry = socks.lookup(&key);
    if (entry)
        retire(key, entry);
    return 0;
}

// A program is never re-entered on one CPU: when a lifecycle event fires while the same
// program is already running there (a softirq's state change or destroy interrupting one in
// process context, e.g. close() or connect()), the kernel skips it and counts a recursion
// miss. So each lifecycle handler is attached twice: the primary program marks itself busy
// on this CPU while it runs; the second one acts only then, i.e. for the events the primary
// was skipped for. Softirqs do not nest, so two levels are all there can be. The mark
// cannot cover the few instructions the kernel runs around the primary (its recursion
// count is raised before the program's first instruction and lowered after its last): an
// event that lands there is skipped by both. The twins count what they handle
// (C_LIFECYCLE_NESTED); user space reports the primaries' recursion misses beyond that
// count as missed events (tcpacct_lifecycle_events_missed_total), and a missed destroy
// heals when the address opens again (SYN_SENT and ESTABLISHED retire an opened entry).
#define BUSY_SET_STATE 0
#define BUSY_DESTROY 1
BPF_PERCPU_ARRAY(lifecycle_busy, u32, 2);

// This CPU's busy flag of a primary (NULL only if the array lookup failed).
static __always_inline u32 *busy_flag(u32 which)
{
    return lifecycle_busy.lookup(&which);
}

// A primary: marked busy on this CPU while it handles its event.
static __always_inline int run_primary(u32 which, struct bpf_raw_tracepoint_args *ctx)
{
    u32 *busy = busy_flag(which);
    if (busy)
        *busy = 1;
    if (which == BUSY_SET_STATE)
        handle_set_state(ctx);
    else
        handle_destroy(ctx);
    if (busy)
        *busy = 0;
    return 0;
}

// A nested twin: acts (and counts) only while its primary is marked busy on this CPU,
// i.e. for an event the kernel skipped the primary for.
static __always_inline int run_nested(u32 which, struct bpf_raw_tracepoint_args *ctx)
{
    u32 *busy = busy_flag(which);
    if (!busy || !*busy)
        return 0; // the primary ran (or runs) for this event
    count(C_LIFECYCLE_NESTED, 1);
    return which == BUSY_SET_STATE ? handle_set_state(ctx) : handle_destroy(ctx);
}

int on_set_state(struct bpf_raw_tracepoint_args *ctx)
{
    return run_primary(BUSY_SET_STATE, ctx);
}

int on_set_state_nested(struct bpf_raw_tracepoint_args *ctx)
{
    return run_nested(BUSY_SET_STATE, ctx);
}

int on_destroy(struct bpf_raw_tracepoint_args *ctx)
{
    return run_primary(BUSY_DESTROY, ctx);
}

int on_destroy_nested(struct bpf_raw_tracepoint_args *ctx)
{
    return run_nested(BUSY_DESTROY, ctx);
}

#if defined(BACKEND_TRACEPOINT)
// tcpacct backend "tracepoint": raw tracepoints sock:sock_send_length and
// sock:sock_recv_length (Linux >= 6.3). They fire in sock_sendmsg/sock_recvmsg after the
// protocol returned, with the return value: bytes the application actually moved. They
// fire for every socket family, so a miss in `socks` checks the protocol (CHECK_PROTOCOL).

// sock_send_length(struct sock *sk, int ret, int flags)
int on_send(struct bpf_raw_tracepoint_args *ctx)
{
    int ret = (int)ctx->args[1];
    if (ret <= 0)
        return 0;
    count_bytes((void *)ctx->args[0], ret, DIR_SENT);
    return 0;
}

// sock_recv_length(struct sock *sk, int ret, int flags)
int on_receive(struct bpf_raw_tracepoint_args *ctx)
{
    int ret = (int)ctx->args[1];
    int flags = (int)ctx->args[2];
    if (ret <= 0 || (flags & (TCPACCT_MSG_PEEK | TCPACCT_MSG_ERRQUEUE)))
        return 0;
    count_bytes((void *)ctx->args[0], ret, DIR_RECEIVED);
    return 0;
}
#endif

#if defined(BACKEND_FENTRY)
// tcpacct backend "fentry": fexit programs on tcp_sendmsg and tcp_recvmsg (BTF, Linux >= 5.5
// with BPF trampolines). Counted by return value — never by the size argument — so partial
// and failed writes count what really moved. tcp_recvmsg is used rather than
// tcp_cleanup_rbuf, whose copied argument is a running total within one receive call.
// Extra cflags: TCP_RECVMSG_ARITY (4, 5 or 6: the signature changed in 5.19 and 6.x),
// HOOK_TCP_SENDPAGE (kernels < 6.5, where sendfile/splice go through tcp_sendpage).

struct sock;
struct msghdr;
struct page;

KRETFUNC_PROBE(tcp_sendmsg, struct sock *sk, struct msghdr *msg, size_t size, int ret)
{
    if (ret > 0)
        count_bytes((void *)sk, ret, DIR_SENT);
    return 0;
}

#if TCP_RECVMSG_ARITY == 6
KRETFUNC_PROBE(tcp_recvmsg, struct sock *sk, struct msghdr *msg, size_t len, int nonblock,
               int flags, int *addr_len, int ret)
#elif TCP_RECVMSG_ARITY == 5
KRETFUNC_PROBE(tcp_recvmsg, struct sock *sk, struct msghdr *msg, size_t len, int flags,
               int *addr_len, int ret)
#else
KRETFUNC_PROBE(tcp_recvmsg, struct sock *sk, struct msghdr *msg, size_t len, int flags,
               int ret)
#endif
{
    if (ret > 0 && !(flags & (TCPACCT_MSG_PEEK | TCPACCT_MSG_ERRQUEUE)))
        count_bytes((void *)sk, ret, DIR_RECEIVED);
    return 0;
}

#ifdef HOOK_TCP_SENDPAGE
KRETFUNC_PROBE(tcp_sendpage, struct sock *sk, struct page *page, int offset, size_t size,
               int flags, int ret)
{
    if (ret > 0)
        count_bytes((void *)sk, ret, DIR_SENT);
    return 0;
}
#endif
#endif

#if defined(BACKEND_KPROBE)
// tcpacct backend "kprobe": kprobe + kretprobe pairs on tcp_sendmsg, tcp_recvmsg (and
// tcp_sendpage before 6.5), for kernels with kprobes but no BPF trampolines. The entry
// probe remembers the socket (and receive flags) per thread; the return probe counts the
// return value. Extra cflags as fentry.c.

struct pending_call {
    u64 sk;
    int flags;
    int pad;
};

BPF_HASH(pending_send, u64, struct pending_call, 16384);
BPF_HASH(pending_receive, u64, struct pending_call, 16384);

// One pair of helpers per map: bcc rewrites map calls in functions of the main file, not in
// macros, and maps cannot be passed by pointer.
static __always_inline void remember_send(u64 sk)
{
    u64 thread = bpf_get_current_pid_tgid();
    struct pending_call call = {};
    call.sk = sk;
    pending_send.update(&thread, &call);
}

static __always_inline void remember_receive(u64 sk, int flags)
{
    u64 thread = bpf_get_current_pid_tgid();
    struct pending_call call = {};
    call.sk = sk;
    call.flags = flags;
    pending_receive.update(&thread, &call);
}

static __always_inline int finish_send(struct pt_regs *ctx)
{
    u64 thread = bpf_get_current_pid_tgid();
    struct pending_call *call = pending_send.lookup(&thread);
    if (!call)
        return 0;
    u64 sk = call->sk;
    pending_send.delete(&thread);
    int ret = PT_REGS_RC(ctx);
    if (ret > 0)
        count_bytes((void *)sk, ret, DIR_SENT);
    return 0;
}

static __always_inline int finish_receive(struct pt_regs *ctx)
{
    u64 thread = bpf_get_current_pid_tgid();
    struct pending_call *call = pending_receive.lookup(&thread);
    if (!call)
        return 0;
    u64 sk = call->sk;
    int flags = call->flags;
    pending_receive.delete(&thread);
    int ret = PT_REGS_RC(ctx);
    if (ret > 0 && !(flags & (TCPACCT_MSG_PEEK | TCPACCT_MSG_ERRQUEUE)))
        count_bytes((void *)sk, ret, DIR_RECEIVED);
    return 0;
}

int enter_tcp_sendmsg(struct pt_regs *ctx)
{
    remember_send(PT_REGS_PARM1(ctx));
    return 0;
}

int exit_tcp_sendmsg(struct pt_regs *ctx)
{
    return finish_send(ctx);
}

int enter_tcp_recvmsg(struct pt_regs *ctx)
{
#if TCP_RECVMSG_ARITY == 6
    int flags = PT_REGS_PARM5(ctx);
#else
    int flags = PT_REGS_PARM4(ctx);
#endif
    remember_receive(PT_REGS_PARM1(ctx), flags);
    return 0;
}

int exit_tcp_recvmsg(struct pt_regs *ctx)
{
    return finish_receive(ctx);
}

#ifdef HOOK_TCP_SENDPAGE
int enter_tcp_sendpage(struct pt_regs *ctx)
{
    remember_send(PT_REGS_PARM1(ctx));
    return 0;
}

int exit_tcp_sendpage(struct pt_regs *ctx)
{
    return finish_send(ctx);
}
#endif
#endif
