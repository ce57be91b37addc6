// SPDX-License-Identifier: GPL-2.0
/* grebe's kernel fast path: one tc (clsact ingress, direct-action) program.
 *
 * Attached to the ingress of every interface of the endpoint's namespace except lo and the
 * TUN (bridge/ebpf/attach.py). Per packet it does one of three things:
 *  - decap: UDP to our listen address and port from a configured peer whose GRE/IPIP
 *    header, inner packet and sequence number pass the same checks as the Python path
 *    (bridge/pipeline.py, inbound 1-4) -> outer headers popped, inner TTL/hop limit
 *    decremented (the forwarding the kernel does from the TUN to the LAN), redirected to the
 *    egress the FIB gives for the inner destination. Bad input is dropped and counted by the
 *    Python path's reason numbers (gb_drops, same indices as bridge/counters.py).
 *  - encap: a packet the kernel's FIB would forward into the TUN (bpf_fib_lookup from this
 *    ingress) whose destination is in a peer's prefixes -> TTL/hop limit - 2 (the kernel's
 *    forwarding into the TUN, then grebe's own decrement, RFC 2003 §3.1), outer
 *    IP + UDP (+ GRE) pushed with bpf_skb_adjust_room(ENCAP flags, so GSO packets stay
 *    GSO), RFC 8086 §3.2.1 flow-hash source port, redirected to the WAN egress the FIB
 *    gives for the peer's address.
 *  - pass (TC_ACT_UNSPEC: the next filter or the normal path; packet untouched): everything else, and everything the fast path
 *    does not do: fragments, IPv4 options, TTL/hop limit that needs an ICMP error, too big
 *    for the tunnel, TCP SYNs when MSS clamping is on, TCP of [[inspect]] ports (both
 *    directions), keepalives, GRE checksums, peers with the reorder policy, GSO packets that
 *    need GRE sequence numbers or an IPv6 outer checksum, UDP datagrams with a checksum we do
 *    not verify here. The kernel then takes them to grebe's TUN or UDP socket: the Python
 *    path handles them exactly as without this program. Every decision is checked before
 *    the packet is changed, so a pass is always the original packet.
 * Liveness: the program only acts while gb_global.live_until_ns is in the future; the
 * owning `grebe up` pushes it forward every second. After a SIGKILL the attached program
 * (which keeps its maps alive) passes everything within LIVE_S, and the next start removes
 * it (bridge/ebpf/attach.py).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MAX_PEERS 64
#define AF_INET 2
#define AF_INET6 10

/* constants of newer kernels than the distribution's uapi header may know */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

/* one read of a context field into a register (clang must not keep a pointer into ctx) */
#define READ_CTX(x) ({ __u32 __v = (x); asm volatile("" : "+r"(__v)); __v; })

/* drop reasons: the indices of bridge/counters.py DROP_REASONS (checked by a unit test) */
enum {
	R_MALFORMED = 0,
	R_BAD_VERSION = 1,
	R_BAD_FLAGS = 2,
	R_BAD_PROTO = 3,
	R_UNKNOWN_PEER = 4,
	R_WRONG_KEY = 5,
	R_SPOOFED_SOURCE = 6,
	R_SEQUENCE = 7,
	R_CHECKSUM = 8,
	R_TTL = 9,
	R_TOO_BIG = 10,
	R_NO_ROUTE = 11,
	R_LOOP = 12,
	N_REASONS = 16,
};

/* what the program did (gb_stats; names in bridge/ebpf/maps.py STATS, same order) */
enum {
	S_ENCAP = 0,
	S_DECAP,
	S_PASS_FRAGMENT,
	S_PASS_OPTIONS,
	S_PASS_TTL,
	S_PASS_TOO_BIG,
	S_PASS_SYN,
	S_PASS_INSPECT,
	S_PASS_KEEPALIVE,
	S_PASS_CHECKSUM,
	S_PASS_GSO,
	S_PASS_PEER,
	S_PASS_ROUTE,
	S_PASS_HELPER,
	S_PASS_UNDERLAY,
	S_PASS_WAY_BACK,
	S_CSUM_FILLED,
	S_PASS_SEQ_START,
	S_PASS_SEQ_ORDER,
	S_PASS_SUSPENDED,
	S_PASS_SEQ_JUMP,
	N_STATS = 24,
};

/* gb_peer.flags */
#define PF_TX 0x001        /* encapsulate toward this peer */
#define PF_RX 0x002        /* decapsulate from this peer */
#define PF_GRE 0x004
#define PF_KEY_OUT 0x008
#define PF_KEY_IN 0x010
#define PF_SEQ_TX 0x020    /* send sequence numbers */
#define PF_DROP_LATE 0x040 /* receive policy drop-late (policy off: flag clear) */
#define PF_FLOW_HASH 0x080
#define PF_OUTER_V6 0x100
#define PF_CSUM 0x200      /* GRE checksum configured: the Python path does all of it */

/* gb_global.flags */
#define GF_MSS_CLAMP 0x01
#define GF_INSPECT_ALL_TCP 0x02
#define GF_LISTEN_V4 0x04
#define GF_LISTEN_V6 0x08
#define GF_LISTEN_ANY4 0x10
#define GF_LISTEN_ANY6 0x20
#define GF_INSPECT 0x40 /* [[inspect]] rules exist: ICMP errors go to the Python path */
#define GF_SUSPENDED 0x80 /* netfilter chains: pass all, only fill partial checksums */

struct gb_global {
	__u64 live_until_ns;
	__u32 tun_ifindex;
	__u16 listen_port;
	__u16 flags;
	__u8 listen4[4];
	__u8 listen6[16];
	__u32 pad;
};

struct gb_peer {
	__u32 flags;
	__u32 key_out;
	__u32 key_in;
	__u16 mtu;
	__u16 sport;
	__u16 dport;
	__u16 pad;
	__u8 local[16];
	__u8 remote[16];
};

struct gb_rxseq {
	__u32 expected;
	__u32 started;
	__u32 late_run;
	__u32 pad; /* seq_accept: when the current run of late packets began (ms) */
	__u32 ahead_run;  /* packets in the current run out of the window ahead */
	__u32 ahead_next; /* the number after that run's last */
};

struct gb_peerstat {
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tx_packets;
	__u64 tx_bytes;
};

struct lpm4 {
	__u32 plen;
	__u8 addr[4];
};

struct lpm6 {
	__u32 plen;
	__u8 addr[16];
};

struct rxkey {
	__u8 addr[16]; /* IPv4 as ::ffff:a.b.c.d */
	__u32 key;
	__u32 has_key;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gb_global);
} gb_global SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PEERS);
	__type(key, __u32);
	__type(value, struct gb_peer);
} gb_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm4);
	__type(value, __u32);
} gb_pfx4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm6);
	__type(value, __u32);
} gb_pfx6 SEC(".maps");

/* tunnel endpoint addresses (loop guard, RFC 2003 §4), IPv4 as ::ffff:a.b.c.d */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u8[16]);
	__type(value, __u32);
} gb_endpoints SEC(".maps");

/* peer endpoint host -> the first peer on it (bridge/peers.py by_host) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PEERS);
	__type(key, __u8[16]);
	__type(value, __u32);
} gb_hosts SEC(".maps");

/* (host, GRE key) -> peer, for several peers behind one host (RFC 2890 §2.1) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PEERS);
	__type(key, struct rxkey);
	__type(value, __u32);
} gb_rxkeys SEC(".maps");

/* TCP ports of [[inspect]] rules: such packets go to the Python path, both directions */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u32);
} gb_inspect_ports SEC(".maps");

/* the next GRE sequence number to send, per peer: shared with the Python path, which takes
 * numbers with grebe_seq_reserve (BPF_PROG_TEST_RUN) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PEERS);
	__type(key, __u32);
	__type(value, __u32);
} gb_txseq SEC(".maps");

/* when the Python path last took sequence numbers for a peer (bpf_ktime_get_ns), 0 once it
 * has sent them: until then its datagrams may still be on their way out, and a number the
 * program sends must not overtake them (a drop-late receiver would count theirs late). The
 * release matters: without it every packet passed for order renewed the hold when Python
 * sent it, and a flow that once touched the Python path stayed there */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PEERS);
	__type(key, __u32);
	__type(value, __u64);
} gb_pytx SEC(".maps");
#define SEQ_HOLD_NS 5000000ULL /* 5 ms */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PEERS);
	__type(key, __u32);
	__type(value, struct gb_rxseq);
} gb_rxseq SEC(".maps");

/* when the fast path last decapsulated from each peer (bpf_ktime_get_ns, CLOCK_MONOTONIC) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PEERS);
	__type(key, __u32);
	__type(value, __u64);
} gb_heard SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_PEERS);
	__type(key, __u32);
	__type(value, struct gb_peerstat);
} gb_peerstats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, N_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} gb_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, N_STATS);
	__type(key, __u32);
	__type(value, __u64);
} gb_stats SEC(".maps");

/* a 256-byte buffer per CPU for the IPv6 UDP checksum (the BPF stack has 512 bytes) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u8[256]);
} gb_scratch SEC(".maps");

static __always_inline void bump(void *map, __u32 i)
{
	__u64 *v = bpf_map_lookup_elem(map, &i);
	if (v)
		*v += 1;
}

/* "not for us": the next tc filter, if any, then the kernel's normal path (TC_ACT_UNSPEC
 * continues the filter chain; TC_ACT_OK would end it) */
#define PASS TC_ACT_UNSPEC

static __always_inline int pass(__u32 why)
{
	bump(&gb_stats, why);
	return PASS;
}

static __always_inline int drop(__u32 reason)
{
	bump(&gb_drops, reason);
	return TC_ACT_SHOT;
}

static __always_inline __u16 csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

static __always_inline __u16 ipv4_csum(void *hdr)
{
	__u16 *w = hdr;
	__u32 s = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	return csum_fold(s);
}

static __always_inline void map4(__u8 *out, __u32 addr)
{
	__builtin_memset(out, 0, 16);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &addr, 4);
}

/* Add the 16-bit words of the `len` bytes at `off` to *s (ones' complement, unfolded).
 * -1 if they cannot be read or `len` is over SUM_MAX. */
#define SUM_MAX 10240
/* global (not static): the verifier checks it once, not at every call site with its loop */
__attribute__((noinline)) int sum_bytes(struct __sk_buff *skb, __u32 off, __u32 len, __u32 *s)
{
	__u32 n = len;
	__u32 zero = 0;
	if (!skb || !s)
		return -1;
	__u8 *buf = bpf_map_lookup_elem(&gb_scratch, &zero);
	if (!buf || len > SUM_MAX)
		return -1;
	for (int i = 0; i < SUM_MAX / 256; i++) {
		if (n == 0)
			break;
		__u32 chunk = n > 256 ? 256 : n;
		__u32 whole = chunk & ~3u;
		if (whole > 0 && whole <= 256) {
			if (bpf_skb_load_bytes(skb, off, buf, whole))
				return -1;
			*s = bpf_csum_diff(0, 0, (__be32 *)buf, whole, *s);
		}
		if (chunk != whole) { /* a tail of 1-3 bytes, zero padded */
			__u32 t = 0;
			__u32 rem = chunk - whole;
			int e;
			if (rem == 1)
				e = bpf_skb_load_bytes(skb, off + whole, &t, 1);
			else if (rem == 2)
				e = bpf_skb_load_bytes(skb, off + whole, &t, 2);
			else
				e = bpf_skb_load_bytes(skb, off + whole, &t, 3);
			if (e)
				return -1;
			*s = bpf_csum_diff(0, 0, (__be32 *)&t, 4, *s);
		}
		off += chunk;
		n -= chunk;
	}
	return n ? -1 : 0;
}

/* The IPv6 UDP checksum (RFC 8200 §8.1) of the `len` bytes at `off` (UDP header with its
 * checksum field as it is, and payload): 0xffff for a zero result (RFC 768), 0 if they
 * cannot be summed. With `verify`: 0xffff if the field holds the right checksum. */
static __always_inline __u16 udp6_sum(struct __sk_buff *skb, __u32 off, __u32 len,
				      const __u8 *src, const __u8 *dst, int verify)
{
	__u32 s = 0;
	const __u16 *a = (const __u16 *)src, *b = (const __u16 *)dst;
#pragma unroll
	for (int i = 0; i < 8; i++)
		s += a[i] + b[i];
	s += bpf_htons((__u16)len) + bpf_htons(IPPROTO_UDP);
	if (sum_bytes(skb, off, len, &s))
		return 0;
	__u16 c = csum_fold(s);
	if (verify)
		return c == 0 ? 0xffff : 1;
	return c == 0 ? 0xffff : c;
}

static __always_inline __u16 udp6_csum(struct __sk_buff *skb, __u32 off, __u32 len,
				       const __u8 *src, const __u8 *dst)
{
	return udp6_sum(skb, off, len, src, dst, 0);
}

/* The inner TCP/UDP checksum of the IP packet at `ip` (header `hlen`, length `tot`):
 * CS_OK (right, or none to check), CS_PARTIAL (the field holds only the pseudo-header sum: a
 * sender on this host left it to "hardware", CHECKSUM_PARTIAL, and a veth never fills it in),
 * CS_BAD (wrong), CS_UNKNOWN (not summed). With CS_PARTIAL, *fixed is the right value. */
enum { CS_OK = 0, CS_PARTIAL, CS_BAD, CS_UNKNOWN };
struct l4pkt {
	__u32 ip;   /* offset of the IP header */
	__u32 hlen; /* its length */
	__u32 tot;  /* the IP packet's length */
	__u8 proto;
	__u8 v6;
	__u16 fixed; /* out: the right checksum (CS_PARTIAL) */
};

static __noinline int l4_csum_state(struct __sk_buff *skb, struct l4pkt *k)
{
	__u32 ip = k->ip, hlen = k->hlen, tot = k->tot;
	__u8 proto = k->proto;
	int v6 = k->v6;
	__u32 coff;
	if (proto == IPPROTO_TCP)
		coff = 16;
	else if (proto == IPPROTO_UDP)
		coff = 6;
	else
		return CS_OK;
	__u32 l4len = tot - hlen;
	if (tot < hlen + coff + 2)
		return CS_UNKNOWN;
	__u16 field;
	if (bpf_skb_load_bytes(skb, ip + hlen + coff, &field, 2))
		return CS_UNKNOWN;
	if (proto == IPPROTO_UDP && field == 0 && !v6)
		return CS_OK; /* no checksum (IPv4) */
	__u32 ps = bpf_htons((__u16)l4len) + bpf_htons(proto);
	if (sum_bytes(skb, v6 ? ip + 8 : ip + 12, v6 ? 32 : 8, &ps)) /* the two addresses */
		return CS_UNKNOWN;
	__u32 s = 0;
	if (sum_bytes(skb, ip + hlen, l4len, &s))
		return CS_UNKNOWN;
	if (csum_fold(ps + s) == 0)
		return CS_OK;
	if (field == (__u16)~csum_fold(ps)) {
		__u16 c = csum_fold(s); /* the field holds the pseudo-header sum already */
		k->fixed = (proto == IPPROTO_UDP && c == 0) ? 0xffff : c;
		return CS_PARTIAL;
	}
	return CS_BAD;
}

static __always_inline int eq4(const void *a, const void *b)
{
	return *(const __u32 *)a == *(const __u32 *)b;
}

static __always_inline int eq16(const void *a, const void *b)
{
	const __u32 *x = a, *y = b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* TCP ports and flags at `off`: pass to the Python path if SYN with clamping, or inspected */
static __always_inline int tcp_needs_python(struct __sk_buff *skb, struct gb_global *g,
					    __u32 off, __u32 *why)
{
	__u8 t[14];
	if (bpf_skb_load_bytes(skb, off, t, sizeof(t)))
		return 0;
	if ((g->flags & GF_MSS_CLAMP) && (t[13] & 0x02)) {
		*why = S_PASS_SYN;
		return 1;
	}
	if (g->flags & GF_INSPECT_ALL_TCP) {
		*why = S_PASS_INSPECT;
		return 1;
	}
	__u16 sport = ((__u16)t[0] << 8) | t[1], dport = ((__u16)t[2] << 8) | t[3];
	if (bpf_map_lookup_elem(&gb_inspect_ports, &sport) ||
	    bpf_map_lookup_elem(&gb_inspect_ports, &dport)) {
		*why = S_PASS_INSPECT;
		return 1;
	}
	return 0;
}

/* An ICMP or ICMPv6 error (it may be about an [[inspect]] flow, whose other leg lives in the
 * Python path: bridge/terminate.py takes such errors back) */
static __always_inline int icmp_error(struct __sk_buff *skb, __u32 off, __u8 proto)
{
	__u8 type;
	if (bpf_skb_load_bytes(skb, off, &type, 1))
		return 0;
	if (proto == IPPROTO_ICMP)
		return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
	return type < 128; /* ICMPv6 errors, RFC 4443 §2.1 */
}

/* ------------------------------------------------------------------ encapsulation */

struct outer {
	union {
		struct iphdr ip4;
		struct ipv6hdr ip6;
	};
	struct udphdr udp;
	__u8 gre[16];
};

static __noinline int encap(struct __sk_buff *skb, struct gb_global *g, int v6)
{
	struct bpf_fib_lookup fib = {};
	__u32 iif = READ_CTX(skb->ingress_ifindex);
	__u32 hlen, tot, l4off, idx, *pidx;
	__u8 ttl, proto;
	__u32 why = 0;

	if (!v6) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return PASS;
		if (ip.version != 4)
			return PASS;
		struct lpm4 k = {.plen = 32};
		__builtin_memcpy(k.addr, &ip.daddr, 4);
		pidx = bpf_map_lookup_elem(&gb_pfx4, &k);
		if (!pidx)
			return PASS; /* not for a peer: not ours */
		if (ip.ihl != 5)
			return pass(S_PASS_OPTIONS);
		if (ip.frag_off & bpf_htons(0x3fff))
			return pass(S_PASS_FRAGMENT);
		hlen = 20;
		tot = bpf_ntohs(ip.tot_len);
		ttl = ip.ttl;
		proto = ip.protocol;
		fib.family = AF_INET;
		fib.tos = ip.tos;
		fib.ipv4_src = ip.saddr;
		fib.ipv4_dst = ip.daddr;
		__u8 ep[16];
		map4(ep, ip.daddr);
		if (bpf_map_lookup_elem(&gb_endpoints, ep))
			return pass(S_PASS_ROUTE); /* loop: the Python path counts it */
	} else {
		struct ipv6hdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return PASS;
		if (ip.version != 6)
			return PASS;
		struct lpm6 k = {.plen = 128};
		__builtin_memcpy(k.addr, &ip.daddr, 16);
		pidx = bpf_map_lookup_elem(&gb_pfx6, &k);
		if (!pidx)
			return PASS;
		proto = ip.nexthdr;
		if (proto == 44)
			return pass(S_PASS_FRAGMENT);
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMPV6)
			return pass(S_PASS_OPTIONS); /* extension headers: MSS clamp walks them */
		hlen = 40;
		tot = 40 + bpf_ntohs(ip.payload_len);
		ttl = ip.hop_limit;
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, &ip.saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip.daddr, 16);
		if (bpf_map_lookup_elem(&gb_endpoints, &ip.daddr))
			return pass(S_PASS_ROUTE);
	}
	idx = *pidx;
	l4off = ETH_HLEN + hlen;
	if (tot < hlen || tot > skb->len - ETH_HLEN)
		return PASS; /* malformed: the kernel drops it */
	if (ttl <= 2)
		return pass(S_PASS_TTL); /* the kernel or grebe sends Time Exceeded */
	if (proto == IPPROTO_TCP && tcp_needs_python(skb, g, l4off, &why))
		return pass(why);
	if ((g->flags & GF_INSPECT) && (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) &&
	    icmp_error(skb, l4off, proto))
		return pass(S_PASS_INSPECT);

	/* the kernel would forward this into the TUN (also: forwarding on, TUN MTU) */
	fib.l4_protocol = proto;
	fib.ifindex = iif;
	fib.tot_len = skb->gso_segs > 1 ? 0 : tot;
	int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return pass(S_PASS_TOO_BIG);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || fib.ifindex != g->tun_ifindex)
		return pass(S_PASS_ROUTE);

	if (idx >= MAX_PEERS)
		return PASS;
	struct gb_peer *p = bpf_map_lookup_elem(&gb_peers, &idx);
	if (!p || !(p->flags & PF_TX))
		return pass(S_PASS_PEER);
	if (p->flags & PF_SEQ_TX) {
		/* one order for both senders: while the Python path's numbered datagrams may be
		 * in flight, this one queues behind them on the Python path */
		__u64 *pt = bpf_map_lookup_elem(&gb_pytx, &idx);
		if (pt && *pt && bpf_ktime_get_ns() - *pt < SEQ_HOLD_NS)
			return pass(S_PASS_SEQ_ORDER);
	}
	int gso = skb->gso_segs > 1 || skb->gso_size;
	if (gso) {
		if ((p->flags & (PF_SEQ_TX | PF_OUTER_V6)) || proto != IPPROTO_TCP)
			return pass(S_PASS_GSO);
		__u8 doff;
		if (bpf_skb_load_bytes(skb, l4off + 12, &doff, 1))
			return PASS;
		if (hlen + (doff >> 4) * 4 + skb->gso_size > p->mtu)
			return pass(S_PASS_TOO_BIG);
	} else if (tot > p->mtu) {
		return pass(S_PASS_TOO_BIG);
	}

	/* IPv6 outside: the outer UDP checksum covers the inner packet, so an inner checksum
	 * still to be filled in (CHECKSUM_PARTIAL) would make it wrong: the Python path */
	struct l4pkt k4 = {.ip = ETH_HLEN, .hlen = hlen, .tot = tot, .proto = proto, .v6 = v6};
	if ((p->flags & PF_OUTER_V6) && l4_csum_state(skb, &k4) != CS_OK)
		return pass(S_PASS_CHECKSUM);

	/* the outer route: WAN egress and its neighbour */
	struct bpf_fib_lookup of = {};
	int ov6 = p->flags & PF_OUTER_V6;
	of.ifindex = iif;
	if (ov6) {
		of.family = AF_INET6;
		__builtin_memcpy(of.ipv6_src, p->local, 16);
		__builtin_memcpy(of.ipv6_dst, p->remote, 16);
	} else {
		of.family = AF_INET;
		__builtin_memcpy(&of.ipv4_src, p->local, 4);
		__builtin_memcpy(&of.ipv4_dst, p->remote, 4);
	}
	of.l4_protocol = IPPROTO_UDP;
	int orc = bpf_fib_lookup(skb, &of, sizeof(of), 0);
	if (orc != BPF_FIB_LKUP_RET_SUCCESS && orc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return pass(S_PASS_UNDERLAY);

	/* build the outer headers */
	__u32 grelen = 0;
	__u32 iplen = ov6 ? 40 : 20;
	struct outer o = {};
	if (p->flags & PF_GRE) {
		__u16 fl = 0;
		grelen = 4;
		if (p->flags & PF_KEY_OUT) {
			fl |= 0x2000;
			__u32 key = bpf_htonl(p->key_out);
			__builtin_memcpy(o.gre + grelen, &key, 4);
			grelen += 4;
		}
		if (p->flags & PF_SEQ_TX) {
			fl |= 0x1000;
			__u32 *sq = bpf_map_lookup_elem(&gb_txseq, &idx);
			if (!sq)
				return PASS;
			__u32 seq = bpf_htonl(__sync_fetch_and_add(sq, 1));
			if (grelen == 4)
				__builtin_memcpy(o.gre + 4, &seq, 4);
			else
				__builtin_memcpy(o.gre + 8, &seq, 4);
			grelen += 4;
		}
		__u16 flb = bpf_htons(fl);
		__u16 pr = bpf_htons(v6 ? ETH_P_IPV6 : ETH_P_IP);
		__builtin_memcpy(o.gre, &flb, 2);
		__builtin_memcpy(o.gre + 2, &pr, 2);
	}
	__u32 olen = iplen + 8 + grelen;
	__u32 inner_len = skb->len - ETH_HLEN;
	if (!gso && tot < inner_len) {
		if (bpf_skb_change_tail(skb, ETH_HLEN + tot, 0))
			return pass(S_PASS_HELPER);
		inner_len = tot;
	}
	if (inner_len + olen > 0xffff)
		return pass(S_PASS_GSO);
	__u64 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
	__u16 sport = p->sport;
	if (p->flags & PF_FLOW_HASH)
		sport = 49152 | (bpf_get_hash_recalc(skb) & 0x3fff);

	/* TTL / hop limit - 2 (the kernel's forwarding into the TUN, then grebe's) */
	if (!v6) {
		__u16 oldw, neww;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 8, &oldw, 2))
			return PASS;
		__u8 nt = ttl - 2;
		neww = oldw;
		__builtin_memcpy(&neww, &nt, 1);
		if (bpf_l3_csum_replace(skb, ETH_HLEN + 10, oldw, neww, 2) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + 8, &nt, 1, 0))
			return pass(S_PASS_HELPER);
	} else {
		__u8 nt = ttl - 2;
		if (bpf_skb_store_bytes(skb, ETH_HLEN + 7, &nt, 1, 0))
			return pass(S_PASS_HELPER);
	}

	__u64 fl = BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		   (ov6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) |
		   BPF_F_ADJ_ROOM_ENCAP_L2(grelen) | BPF_F_ADJ_ROOM_FIXED_GSO;
	if (bpf_skb_adjust_room(skb, olen, BPF_ADJ_ROOM_MAC, fl))
		return drop(R_MALFORMED); /* TTL already changed: cannot pass it on */

	__u16 ulen = inner_len + 8 + grelen;
	o.udp.source = bpf_htons(sport);
	o.udp.dest = bpf_htons(p->dport);
	o.udp.len = bpf_htons(ulen);
	o.udp.check = 0; /* IPv4: RFC 8086 §3.2.2 allows zero; IPv6: computed below */
	if (!ov6) {
		o.ip4.version = 4;
		o.ip4.ihl = 5;
		o.ip4.tot_len = bpf_htons(ulen + 20);
		o.ip4.frag_off = bpf_htons(0x4000); /* DF, as the Python path's socket sends */
		o.ip4.ttl = 64;
		o.ip4.protocol = IPPROTO_UDP;
		__builtin_memcpy(&o.ip4.saddr, p->local, 4);
		__builtin_memcpy(&o.ip4.daddr, p->remote, 4);
		o.ip4.check = ipv4_csum(&o.ip4);
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &o.ip4, 20, 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + 20, &o.udp, 8, 0))
			return drop(R_MALFORMED);
	} else {
		o.ip6.version = 6;
		o.ip6.payload_len = bpf_htons(ulen);
		o.ip6.nexthdr = IPPROTO_UDP;
		o.ip6.hop_limit = 64;
		__builtin_memcpy(&o.ip6.saddr, p->local, 16);
		__builtin_memcpy(&o.ip6.daddr, p->remote, 16);
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &o.ip6, 40, 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + 40, &o.udp, 8, 0))
			return drop(R_MALFORMED);
	}
	if (grelen) {
		if (grelen == 4) {
			if (bpf_skb_store_bytes(skb, ETH_HLEN + iplen + 8, o.gre, 4, 0))
				return drop(R_MALFORMED);
		} else if (grelen == 8) {
			if (bpf_skb_store_bytes(skb, ETH_HLEN + iplen + 8, o.gre, 8, 0))
				return drop(R_MALFORMED);
		} else {
			if (bpf_skb_store_bytes(skb, ETH_HLEN + iplen + 8, o.gre, 12, 0))
				return drop(R_MALFORMED);
		}
	}
	if (ov6) {
		/* RFC 8086 §3.2.2 / RFC 8200 §8.1: a real UDP checksum over IPv6 (never GSO here) */
		__u16 c = udp6_csum(skb, ETH_HLEN + 40, ulen, p->local, p->remote);
		if (c == 0)
			return drop(R_TOO_BIG); /* longer than udp6_csum sums: cannot happen (mtu) */
		if (bpf_skb_store_bytes(skb, ETH_HLEN + 46, &c, 2, 0))
			return drop(R_MALFORMED);
	}
	__u16 eproto = bpf_htons(ov6 ? ETH_P_IPV6 : ETH_P_IP);
	bpf_skb_store_bytes(skb, 12, &eproto, 2, 0);

	struct gb_peerstat *st = bpf_map_lookup_elem(&gb_peerstats, &idx);
	if (st) {
		st->tx_packets += segs;
		st->tx_bytes += ulen - 8 + (segs - 1) * grelen;
	}
	bump(&gb_stats, S_ENCAP);
	if (orc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, of.dmac, 6, 0) ||
		    bpf_skb_store_bytes(skb, 6, of.smac, 6, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(of.ifindex, 0);
	}
	return bpf_redirect_neigh(of.ifindex, NULL, 0, 0);
}

/* ------------------------------------------------------------------ decapsulation */

/* Pass a decapsulation candidate to the Python path; first fill in an inner checksum the
 * sending host left partial (l4_csum_state), which nothing on the way to grebe's UDP socket
 * would: the Python path writes the inner packet to the TUN as it got it. */
static __always_inline int pass_inner(struct __sk_buff *skb, __u32 why, __u32 ip, __u32 hlen,
				      __u8 proto, __u32 tot, int v6, int gso)
{
	struct l4pkt k = {.ip = ip, .hlen = hlen, .tot = tot, .proto = proto, .v6 = v6};
	if (!gso && l4_csum_state(skb, &k) == CS_PARTIAL) {
		__u32 coff = proto == IPPROTO_TCP ? 16 : 6;
		__u16 fixed = k.fixed;
		if (!bpf_skb_store_bytes(skb, ip + hlen + coff, &fixed, 2, 0))
			bump(&gb_stats, S_CSUM_FILLED);
	}
	return pass(why);
}

#define RESYNC_MS 1000 /* bridge/seqpolicy.py RESYNC_TIME */
#define SEQ_JUMP_MAX 16 /* bridge/seqpolicy.py JUMP_MAX */
#define SEQ_CONFIRM 3   /* bridge/seqpolicy.py CONFIRM */
#define SEQ_PASS 2

/* 1: take it; 0: drop it (late); SEQ_PASS: the Python path judges it (far ahead) */
static __always_inline int seq_accept(__u32 idx, __u32 seq)
{
	/* Linux iseq (drop-late) with grebe's window and resynchronisation
	 * (bridge/seqpolicy.py); the window was started by the Python path (seq_started).
	 * A number JUMP_MAX or more ahead is out of the window and moves nothing by itself
	 * (a forged far-ahead packet would otherwise make every real one late): it goes to
	 * the Python path, whose own window (its stream shares the peer's numbers, so it is
	 * often near them) delivers it or drops it; a run of CONFIRM such packets, each
	 * within JUMP_MAX of the one before, moves this window (a loss, or numbers the
	 * Python path's stream took meanwhile), as bridge/seqpolicy.py resynchronises. */
	struct gb_rxseq *r = bpf_map_lookup_elem(&gb_rxseq, &idx);
	if (!r)
		return 0;
	__s32 d = (__s32)(seq - r->expected);
	if (d >= SEQ_JUMP_MAX) {
		r->late_run = 0;
		if (r->ahead_run == 0 || (__u32)(seq - r->ahead_next) >= SEQ_JUMP_MAX)
			r->ahead_run = 0; /* not a continuation: a new run */
		r->ahead_run++;
		r->ahead_next = seq + 1;
		if (r->ahead_run < SEQ_CONFIRM)
			return SEQ_PASS;
	} else if (d < 0) {
		r->ahead_run = 0;
		/* late: dropped, unless late packets alone have kept coming for RESYNC_MS with
		 * nothing in order between them: the peer restarted and counts from 0 again
		 * (bridge/seqpolicy.py RESYNC_TIME). `pad` holds when this late run began (ms). */
		__u32 now_ms = (__u32)(bpf_ktime_get_ns() / 1000000);
		if (r->late_run++ == 0)
			r->pad = now_ms;
		if ((__u32)(now_ms - r->pad) < RESYNC_MS)
			return 0;
	}
	r->started = 1;
	r->late_run = 0;
	r->ahead_run = 0;
	r->expected = seq + 1;
	return 1;
}

struct outer_in {
	__u8 src[16]; /* IPv4 as ::ffff:a.b.c.d */
	__u8 dst[16];
	__u32 iplen;
	__u16 v6;
	__u16 suspended; /* GF_SUSPENDED: judge nothing, drop nothing, fill checksums, pass */
};

static __always_inline int decap_drop(struct outer_in *o, __u32 reason)
{
	return o->suspended ? PASS : drop(reason);
}

static __noinline int decap(struct __sk_buff *skb, struct gb_global *g, struct outer_in *o)
{
	int ov6 = o->v6;
	__u32 iplen = o->iplen;
	__u8 *src16 = o->src, *dst16 = o->dst;
	struct udphdr udp;
	__u32 iif = READ_CTX(skb->ingress_ifindex);
	__u32 uoff = ETH_HLEN + iplen;
	if (bpf_skb_load_bytes(skb, uoff, &udp, sizeof(udp)))
		return PASS;
	__u32 ulen = bpf_ntohs(udp.len);
	if (ulen < 8 || ulen > skb->len - uoff)
		return PASS; /* the kernel drops it */
	if (ov6) {
		/* RFC 8200 §8.1: zero is invalid (the kernel drops it), a wrong one too; a
		 * checksum the sender's NIC is still to fill (a local sender on a veth) looks
		 * wrong here: the kernel and the Python path take all of these */
		if (udp.check == 0 || ulen > 10240 ||
		    udp6_sum(skb, uoff, ulen, src16, dst16, 1) != 0xffff)
			return pass(S_PASS_CHECKSUM);
	} else if (udp.check != 0) {
		return pass(S_PASS_CHECKSUM); /* the kernel verifies it, then the Python path */
	}

	__u32 *hidx = bpf_map_lookup_elem(&gb_hosts, src16);
	if (!hidx)
		return decap_drop(o, R_UNKNOWN_PEER);
	__u32 idx = *hidx;
	__u32 poff = uoff + 8;
	__u32 plen = ulen - 8;
	if (idx >= MAX_PEERS)
		return PASS;
	struct gb_peer *p = bpf_map_lookup_elem(&gb_peers, &idx);
	if (!p)
		return PASS;
	__u32 off = 0; /* of the inner packet in the payload */
	__u32 seq = 0;
	int has_seq = 0;
	__u8 want = 0; /* inner version from the GRE protocol type */
	if (p->flags & PF_GRE) {
		__u8 h[16];
		if (plen < 4)
			return decap_drop(o, R_MALFORMED);
		if (bpf_skb_load_bytes(skb, poff, h, 4))
			return PASS;
		__u16 fl = ((__u16)h[0] << 8) | h[1];
		__u16 pr = ((__u16)h[2] << 8) | h[3];
		if (fl & 0x0007)
			return decap_drop(o, R_BAD_VERSION);
		if (fl & 0x4c00)
			return decap_drop(o, R_BAD_FLAGS);
		if ((fl & 0x8000) || (p->flags & PF_CSUM))
			return pass(S_PASS_CHECKSUM);
		off = 4;
		if (fl & 0x2000) {
			__u32 key;
			if (plen < off + 4)
				return decap_drop(o, R_MALFORMED);
			if (bpf_skb_load_bytes(skb, poff + 4, &key, 4))
				return PASS;
			key = bpf_ntohl(key);
			struct rxkey rk = {.key = key, .has_key = 1};
			__builtin_memcpy(rk.addr, src16, 16);
			__u32 *kidx = bpf_map_lookup_elem(&gb_rxkeys, &rk);
			if (kidx && *kidx != idx && *kidx < MAX_PEERS) {
				idx = *kidx;
				p = bpf_map_lookup_elem(&gb_peers, &idx);
				if (!p)
					return PASS;
			}
			if (!(p->flags & PF_KEY_IN) || key != p->key_in)
				return decap_drop(o, R_WRONG_KEY);
			off = 8;
		} else if (p->flags & PF_KEY_IN) {
			return decap_drop(o, R_WRONG_KEY);
		}
		if (fl & 0x1000) {
			if (plen < off + 4)
				return decap_drop(o, R_MALFORMED);
			if (bpf_skb_load_bytes(skb, poff + off, &seq, 4))
				return PASS;
			seq = bpf_ntohl(seq);
			has_seq = 1;
			off += 4;
		}
		if (pr == 0 && plen == off)
			return pass(S_PASS_KEEPALIVE);
		if (pr == ETH_P_IP)
			want = 4;
		else if (pr == ETH_P_IPV6)
			want = 6;
		else
			return decap_drop(o, R_BAD_PROTO);
	} else if (plen == 0) {
		return pass(S_PASS_KEEPALIVE);
	}
	if (!(p->flags & PF_RX))
		return pass(S_PASS_PEER);

	__u32 ioff = poff + off;
	__u32 room = plen - off;
	__u8 first;
	if (room < 20 || bpf_skb_load_bytes(skb, ioff, &first, 1))
		return decap_drop(o, R_MALFORMED);
	__u8 ver = first >> 4;
	if ((want && ver != want) || (ver != 4 && ver != 6))
		return decap_drop(o, R_MALFORMED);
	__u32 tot, hlen, *sidx;
	__u8 ttl, proto;
	int iv6 = ver == 6;
	if (!iv6) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ioff, &ip, sizeof(ip)))
			return decap_drop(o, R_MALFORMED);
		tot = bpf_ntohs(ip.tot_len);
		if (ip.ihl < 5 || tot < ip.ihl * 4u || tot > room)
			return decap_drop(o, R_MALFORMED);
		struct lpm4 k = {.plen = 32};
		__builtin_memcpy(k.addr, &ip.saddr, 4);
		sidx = bpf_map_lookup_elem(&gb_pfx4, &k);
		if (!sidx || *sidx != idx)
			return decap_drop(o, R_SPOOFED_SOURCE);
		if (ip.ttl == 0)
			return decap_drop(o, R_TTL);
		__u8 ep[16];
		map4(ep, ip.daddr);
		if (bpf_map_lookup_elem(&gb_endpoints, ep))
			return decap_drop(o, R_LOOP);
		if (ip.ihl != 5)
			return pass(S_PASS_OPTIONS);
		if (ip.frag_off & bpf_htons(0x3fff))
			return pass(S_PASS_FRAGMENT);
		hlen = 20;
		ttl = ip.ttl;
		proto = ip.protocol;
	} else {
		struct ipv6hdr ip;
		if (room < 40 || bpf_skb_load_bytes(skb, ioff, &ip, sizeof(ip)))
			return decap_drop(o, R_MALFORMED);
		tot = 40 + bpf_ntohs(ip.payload_len);
		if (tot > room)
			return decap_drop(o, R_MALFORMED);
		struct lpm6 k = {.plen = 128};
		__builtin_memcpy(k.addr, &ip.saddr, 16);
		sidx = bpf_map_lookup_elem(&gb_pfx6, &k);
		if (!sidx || *sidx != idx)
			return decap_drop(o, R_SPOOFED_SOURCE);
		if (ip.hop_limit == 0)
			return decap_drop(o, R_TTL);
		if (bpf_map_lookup_elem(&gb_endpoints, &ip.daddr))
			return decap_drop(o, R_LOOP);
		proto = ip.nexthdr;
		if (proto == 44)
			return pass(S_PASS_FRAGMENT);
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMPV6)
			return pass(S_PASS_OPTIONS);
		hlen = 40;
		ttl = ip.hop_limit;
	}
	int gso = skb->gso_segs > 1 || skb->gso_size;
	if (ttl == 1) /* the kernel answers Time Exceeded from the TUN side */
		return pass_inner(skb, S_PASS_TTL, ioff, hlen, proto, tot, iv6, gso);
	__u32 why = 0;
	if (proto == IPPROTO_TCP && tcp_needs_python(skb, g, ioff + hlen, &why))
		return pass_inner(skb, why, ioff, hlen, proto, tot, iv6, gso);
	if ((g->flags & GF_INSPECT) && (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) &&
	    icmp_error(skb, ioff + hlen, proto))
		return pass_inner(skb, S_PASS_INSPECT, ioff, hlen, proto, tot, iv6, gso);
	if ((p->flags & PF_DROP_LATE) && !has_seq)
		return decap_drop(o, R_SEQUENCE);
	if (o->suspended) /* netfilter must see it: the Python path, checksum filled in */
		return pass_inner(skb, S_PASS_SUSPENDED, ioff, hlen, proto, tot, iv6, gso);
	if (p->flags & PF_DROP_LATE) {
		/* the window starts on the Python path (the first packet is accepted whatever
		 * its number, Linux iseq), which then starts ours where its own is
		 * (bridge/ebpf/datapath.py SeededSeqReceiver): one start for both paths */
		struct gb_rxseq *r = bpf_map_lookup_elem(&gb_rxseq, &idx);
		if (!r || !r->started)
			return pass_inner(skb, S_PASS_SEQ_START, ioff, hlen, proto, tot, iv6, gso);
	}

	/* the inner route: the kernel's forwarding decision for it */
	struct bpf_fib_lookup fib = {};
	if (!iv6) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ioff, &ip, sizeof(ip)))
			return PASS;
		fib.family = AF_INET;
		fib.tos = ip.tos;
		fib.ipv4_src = ip.saddr;
		fib.ipv4_dst = ip.daddr;
	} else {
		struct ipv6hdr ip;
		if (bpf_skb_load_bytes(skb, ioff, &ip, sizeof(ip)))
			return PASS;
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, &ip.saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip.daddr, 16);
	}
	/* the way back: the inner source must route into our TUN, as for a packet the Python
	 * path writes to it (and when the TUN is gone with its owner, nothing is forwarded) */
	struct bpf_fib_lookup rp = {};
	rp.family = fib.family;
	rp.ifindex = iif;
	rp.tot_len = 20; /* route only: with 0 the kernel checks this (outer) skb's length
			  * against the TUN's MTU and answers FRAG_NEEDED */
	if (!iv6) {
		rp.ipv4_src = fib.ipv4_dst;
		rp.ipv4_dst = fib.ipv4_src;
	} else {
		__builtin_memcpy(rp.ipv6_src, fib.ipv6_dst, 16);
		__builtin_memcpy(rp.ipv6_dst, fib.ipv6_src, 16);
	}
	if (bpf_fib_lookup(skb, &rp, sizeof(rp), BPF_FIB_LOOKUP_SKIP_NEIGH) !=
		    BPF_FIB_LKUP_RET_SUCCESS ||
	    rp.ifindex != g->tun_ifindex)
		return pass_inner(skb, S_PASS_WAY_BACK, ioff, hlen, proto, tot, iv6, gso);
	fib.l4_protocol = proto;
	fib.ifindex = iif;
	fib.tot_len = gso ? 0 : tot;
	int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return pass_inner(skb, S_PASS_TOO_BIG, ioff, hlen, proto, tot, iv6, gso);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    fib.ifindex == g->tun_ifindex)
		return pass_inner(skb, S_PASS_ROUTE, ioff, hlen, proto, tot, iv6, gso);
	if (p->flags & PF_DROP_LATE) {
		int sa = seq_accept(idx, seq);
		if (sa == SEQ_PASS)
			return pass_inner(skb, S_PASS_SEQ_JUMP, ioff, hlen, proto, tot, iv6, gso);
		if (!sa)
			return decap_drop(o, R_SEQUENCE);
	}

	__u64 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
	/* inner TTL / hop limit - 1: the forwarding the kernel does from the TUN */
	if (!iv6) {
		__u16 oldw, neww;
		if (bpf_skb_load_bytes(skb, ioff + 8, &oldw, 2))
			return TC_ACT_SHOT;
		__u8 nt = ttl - 1;
		neww = oldw;
		__builtin_memcpy(&neww, &nt, 1);
		if (bpf_l3_csum_replace(skb, ioff + 10, oldw, neww, 2) ||
		    bpf_skb_store_bytes(skb, ioff + 8, &nt, 1, 0))
			return TC_ACT_SHOT;
	} else {
		__u8 nt = ttl - 1;
		if (bpf_skb_store_bytes(skb, ioff + 7, &nt, 1, 0))
			return TC_ACT_SHOT;
	}
	__u32 olen = iplen + 8 + off;
	__u64 fl = BPF_F_ADJ_ROOM_FIXED_GSO;
	if (iv6 != ov6)
		fl |= iv6 ? BPF_F_ADJ_ROOM_DECAP_L3_IPV6 : BPF_F_ADJ_ROOM_DECAP_L3_IPV4;
	if (bpf_skb_adjust_room(skb, -(__s32)olen, BPF_ADJ_ROOM_MAC, fl))
		return decap_drop(o, R_MALFORMED);
	if (!gso && skb->len > ETH_HLEN + tot)
		bpf_skb_change_tail(skb, ETH_HLEN + tot, 0);
	__u16 eproto = bpf_htons(iv6 ? ETH_P_IPV6 : ETH_P_IP);
	bpf_skb_store_bytes(skb, 12, &eproto, 2, 0);

	struct gb_peerstat *st = bpf_map_lookup_elem(&gb_peerstats, &idx);
	if (st) {
		st->rx_packets += segs;
		st->rx_bytes += plen + (segs - 1) * off;
	}
	__u64 *h = bpf_map_lookup_elem(&gb_heard, &idx);
	if (h) {
		__u64 now = bpf_ktime_get_ns();
		if (now - *h > 50000000ULL) /* one write per 50 ms: no cache-line ping-pong */
			*h = now;
	}
	bump(&gb_stats, S_DECAP);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) ||
		    bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(fib.ifindex, 0);
	}
	return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
}

/* ------------------------------------------------------------------ entry points */

SEC("tc")
int grebe_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct gb_global *g = bpf_map_lookup_elem(&gb_global, &zero);
	if (!g || bpf_ktime_get_ns() > g->live_until_ns)
		return PASS; /* no live owner: the normal path */
	if (skb->pkt_type != 0 /* PACKET_HOST */)
		return PASS;
	__u16 eproto;
	if (bpf_skb_load_bytes(skb, 12, &eproto, 2))
		return PASS;
	if (eproto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return PASS;
		if (ip.protocol == IPPROTO_UDP && ip.version == 4 && ip.ihl == 5 &&
		    (g->flags & GF_LISTEN_V4)) {
			__u16 dport;
			if (bpf_skb_load_bytes(skb, ETH_HLEN + 22, &dport, 2))
				return PASS;
			if (bpf_ntohs(dport) == g->listen_port &&
			    ((g->flags & GF_LISTEN_ANY4) ||
			     eq4(&ip.daddr, g->listen4))) {
				if (ip.frag_off & bpf_htons(0x3fff))
					return pass(S_PASS_FRAGMENT);
				struct outer_in o = {.iplen = 20, .v6 = 0,
						     .suspended = !!(g->flags & GF_SUSPENDED)};
				map4(o.src, ip.saddr);
				map4(o.dst, ip.daddr);
				return decap(skb, g, &o);
			}
		}
		if (g->flags & GF_SUSPENDED)
			return PASS;
		return encap(skb, g, 0);
	}
	if (eproto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return PASS;
		if (ip.nexthdr == IPPROTO_UDP && (g->flags & GF_LISTEN_V6)) {
			__u16 dport;
			if (bpf_skb_load_bytes(skb, ETH_HLEN + 42, &dport, 2))
				return PASS;
			if (bpf_ntohs(dport) == g->listen_port &&
			    ((g->flags & GF_LISTEN_ANY6) ||
			     eq16(&ip.daddr, g->listen6))) {
				struct outer_in o = {.iplen = 40, .v6 = 1,
						     .suspended = !!(g->flags & GF_SUSPENDED)};
				__builtin_memcpy(o.src, &ip.saddr, 16);
				__builtin_memcpy(o.dst, &ip.daddr, 16);
				return decap(skb, g, &o);
			}
		}
		if (g->flags & GF_SUSPENDED)
			return PASS;
		return encap(skb, g, 1);
	}
	return PASS;
}

/* The Python path takes GRE sequence numbers from the shared counter: BPF_PROG_TEST_RUN with
 * a 14+ byte "packet" whose first 12 bytes are (peer index, count, op), host order. Op 0:
 * the return value is the first of `count` numbers reserved atomically (count 0: the next
 * one, nothing taken). Op 1: the Python path has sent what it took, the hold ends. */
SEC("tc")
int grebe_seq_reserve(struct __sk_buff *skb)
{
	__u32 req[3];
	if (bpf_skb_load_bytes(skb, 0, req, sizeof(req)))
		return 0;
	__u32 idx = req[0];
	__u32 *sq = bpf_map_lookup_elem(&gb_txseq, &idx);
	if (!sq)
		return 0;
	__u64 *pt = bpf_map_lookup_elem(&gb_pytx, &idx);
	if (req[2] == 1) {
		if (pt)
			*pt = 0;
		return 0;
	}
	if (req[1] && pt)
		*pt = bpf_ktime_get_ns();
	return __sync_fetch_and_add(sq, req[1]);
}

char LICENSE[] SEC("license") = "GPL";
