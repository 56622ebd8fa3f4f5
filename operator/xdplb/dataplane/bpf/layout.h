/* Map key/value layouts shared by the XDP and TC programs.
 * Mirrored once in Python (xdplb/dataplane/layout.py); a test checks that
 * sizes, offsets and every constant agree. Changing anything here changes the
 * pin directory (its name carries a hash of this file), so old pins are never
 * misread. */
#ifndef XDPLB_LAYOUT_H
#define XDPLB_LAYOUT_H

/* An address of either family, in 16 bytes as on the wire: IPv6 as it is, IPv4
 * mapped (::ffff:a.b.c.d, RFC 4291), so one key layout serves both families and an
 * IPv4 address never equals an IPv6 one. */
struct addr {
	__be32 w[4];
};

#define V4_MAPPED_W2 0x0000ffff  /* w[2] of a mapped IPv4 address, in host order */

/* listeners: one entry per (ingress ifindex, destination, port, protocol).
 * Wildcard listeners are expanded by the agent into the interfaces' addresses. */
struct listener_key {
	__u32 ifindex;
	struct addr addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

#define LF_SNI        1   /* new flows no source route claims go to the SNI path */
#define LF_CLIENT_IP  2   /* sessionAffinity: ClientIP */
#define LF_SRC_ROUTES 4   /* the listener has source-CIDR routes */
#define LF_SNAT       8   /* sourceNAT: Node, new flows leave from the node's address */
#define LF_HAIRPIN    16  /* a backend lies on a network of the node: a client on the
			   * same network is source-NATed (the backend would answer it
			   * directly) */

struct listener_val {
	__u32 id;     /* index into listener_stats */
	__u32 group;  /* default group */
	__u32 flags;  /* LF_* */
};

/* src_routes (LPM trie): prefixlen = 32 + the prefix length in the 128-bit address
 * (an IPv4 /n is a mapped /96+n), so the listener id always matches in full and the
 * client address by longest prefix. */
struct lpm_key {
	__u32 prefixlen;
	__be32 listener;
	struct addr addr;
};

#define GF_IN_USE 1

/* groups: the Maglev table of group g is slots offset .. offset + size of the pool,
 * each slot a backend id. An array map's element takes 8 bytes at least, so the pool
 * packs POOL_IDS slots in one (slot s: element s / POOL_IDS, id s % POOL_IDS), and a
 * group's offset is a multiple of POOL_IDS: no two groups share an element. */
#define POOL_IDS 4

struct pool_ids {
	__u16 id[POOL_IDS];
};

struct group_val {
	__u32 offset;
	__u32 size;   /* 0: no eligible backend */
	__u32 flags;  /* GF_* */
};

/* backends: per backend id, where it is and how the node reaches it. */
#define BF_LIVE 1  /* in the plan and passing its health checks: a UDP flow may stay */

struct backend {
	struct addr addr;
	__be16 port;
	__u16 flags;          /* BF_* */
	struct addr snat_src; /* the node's address toward it (zero: no route) */
	__u32 net;            /* the node's network it lies on (backend_nets; 0: none) */
};

/* backend_nets (LPM trie): networks of the node's interfaces that backends lie on, so
 * that a client on a backend's own network is told apart (LF_HAIRPIN). prefixlen as
 * in src_routes, without the listener. */
struct net_key {
	__u32 prefixlen;
	struct addr addr;
};

/* sni_routes: (listener id, FNV-1a 64 of the lower-cased hostname) -> group id.
 * Read by the agent's SNI acceptor, which picks the backend from the group's
 * Maglev table as XDP would; the empty name holds the listener's default group. */
#define MAX_SNI_ROUTES 65536

struct sni_key {
	__u32 listener;
	__u32 pad;
	__u64 name_hash;
};

/* port_filter bits of a destination port: a listener uses it with this protocol;
 * or it is in the source-NAT range, where backends' replies arrive. */
#define PF_LISTENER(proto) (1u << ((proto) & 31))
#define PF_SNAT(proto)     (1u << (((proto) + 8) & 31))

/* vips: the listener addresses that are no address of the node. Traffic to them is
 * the load balancer's: what no listener serves is dropped, not routed (a VIP routed
 * to the node would loop back to the router), and pings are answered. vip_bits, a
 * bitmap by VIP_BIT(the address's words xor-ed, host order), lets every other packet
 * skip the hash lookup. */
#define VIP_BITS 65536
#define VIP_BIT(fold_host) (((fold_host) ^ ((fold_host) >> 16)) & (VIP_BITS - 1))

/* rev_nat: a backend endpoint -> a listener address it serves. A flow to that
 * address needs no reply entry: TC egress finds its forward entry from the
 * backend's reply through this map. The agent keeps an entry on the address it
 * first gave it for as long as flows may rely on it. */
struct rev_nat_key {
	struct addr addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct rev_nat_val {
	struct addr vip;
	__be16 vport;
	__u16 backend;    /* backend id */
	__u16 listener;   /* listener id */
	__u16 pad;
};

/* Conntrack. ct (LRU) holds a flow's forward entry, keyed by the client's packet
 * (client -> listener): its backend, and with source NAT the node's address and port
 * it leaves from. A flow rev_nat does not cover, and every source-NAT flow, also has
 * a reply entry in ct_reply (keyed by the backend's reply: backend -> client, or
 * backend -> node address and port), which is never evicted: it is what holds a
 * source-NAT port, and it goes only when its flow is gone (the sweeper, or a new
 * flow taking over the port of one that ended). */
struct ct_key {
	struct addr src;
	struct addr dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

#define CT_REPLIED     1   /* the backend answered */
#define CT_FIN_FWD     2
#define CT_FIN_REV     4
#define CT_RST         8   /* a RST within the window of its sender */
#define CT_SNAT        16  /* source-NATed: a reply entry holds its port */
#define CT_PAIRED      32  /* not source-NATed, with a reply entry (rev_nat does not cover it) */
#define CT_ESTABLISHED 64  /* the client acknowledged the backend's answer */

struct ct_val {
	struct addr nat_addr;   /* the backend */
	struct addr snat_addr;  /* CT_SNAT: the node's address the flow leaves from */
	__be16 nat_port;
	__be16 snat_port;
	__u16 backend;     /* backend id */
	__u16 listener;    /* listener id */
	__u16 flags;       /* CT_* */
	__u16 pad;
	__u32 seq_end[2];  /* TCP: each way, the sequence number past the data seen */
	__u32 created_s;   /* CLOCK_MONOTONIC seconds when the flow began */
	__u64 last_ns;     /* CLOCK_MONOTONIC (coarse) of the last packet either way */
	__u64 packets[2];  /* [0] client -> backend, [1] backend -> client */
	__u64 bytes[2];
};

struct ct_reply_val {
	struct addr client;  /* the flow's client (with source NAT, not in the key) */
	struct addr vip;     /* the listener address it reached */
	__be16 cport;
	__be16 vport;
	__u16 flags;         /* CT_SNAT */
	__u16 pad;
	__u32 created_s;
	__u64 last_ns;       /* refreshed by the flow's packets either way */
};

/* frags: the address translation of a fragmented datagram, recorded from its first
 * fragment (which alone holds the ports) and applied to the others. id: the IPv4
 * header's 16 bits, or the IPv6 fragment header's 32. */
struct frag_key {
	struct addr src;
	struct addr dst;
	__be32 id;
	__u8 proto;
	__u8 pad[3];
};

struct frag_val {
	struct addr src;
	struct addr dst;
};

/* scratch: per CPU, where a new flow builds its entries before they go into the maps
 * (with 16-byte addresses they do not fit on the 512-byte stack beside the rest), and
 * what the IPv6 header walk found (see parse() in xdplb.c). */
struct scratch {
	struct ct_val fwd;
	struct ct_reply_val reply;
	struct ct_key reply_key;
	__u32 l4_off;
	__u32 l4_len;
	__be32 frag_id;
	__u32 frag;
};

/* What XDP leaves to TC ingress in the frame's metadata: the rewrite of a packet
 * whose L4 checksum is partial (only TC can tell, and fix it right; TC finds the flow
 * again from the packet), or an answer XDP made of it, for TC to send back out of the
 * interface it came in by (XDP_TX into a veth is lost unless its peer runs XDP). */
#define DEFER_MAGIC   0x786c6230u  /* "xlb0" */
#define DEFER_FORWARD 1            /* a client's packet of a tracked flow */
#define DEFER_REPLY   2            /* a backend's reply to a source-NAT flow */
#define DEFER_ANSWER  3            /* a RST or an echo reply, made: send it back */

struct defer_meta {
	__u32 magic;
	__u32 kind;   /* DEFER_* */
};

struct flow_stats {
	__u64 packets;
	__u64 bytes;
	__u64 flows;
};

/* stats: per-CPU counters, one per verdict / path / drop reason. */
enum stat {
	ST_NOMATCH = 0,       /* not for a listener: passed untouched */
	ST_MALFORMED,         /* truncated or invalid headers: passed untouched */
	ST_FRAGMENT,          /* a later fragment, translated like its first */
	ST_ESTABLISHED,       /* followed its conntrack entry */
	ST_NEW_DEFAULT,       /* new flow to the listener's default group */
	ST_NEW_SRC_ROUTE,     /* new flow routed by a source-CIDR route */
	ST_SNI_PASS,          /* flow on an SNI listener left to the SNI path */
	ST_RESELECTED,        /* TCP non-SYN without a live entry: backend selected again */
	ST_NO_BACKEND_RST,    /* SYN to a group with no eligible backend: RST sent */
	ST_NO_BACKEND_DROP,   /* UDP to a group with no eligible backend: dropped */
	ST_CT_FULL,           /* conntrack insert failed: dropped */
	ST_REPLY_NAT,         /* egress: reply source restored */
	ST_REPLY_EXPIRED,     /* a reply of a flow that is gone: untouched */
	ST_ICMP_IN,           /* ICMP error about a flow's reply, sent on to its backend */
	ST_ICMP_OUT,          /* egress: ICMP error about a flow's packet, sent on to its client */
	ST_SNAT_REPLY,        /* a backend's reply to a source-NAT flow, sent on to its client */
	ST_SNAT_EXHAUSTED,    /* no free source-NAT port toward the backend: dropped */
	ST_SNAT_NO_SOURCE,    /* no node address known toward the backend: dropped */
	ST_SNAT_NO_FLOW,      /* TCP non-SYN of a source-NAT listener without a flow: RST sent */
	ST_SNAT_PORT_LOST,    /* a source-NAT flow whose port another flow holds: refused */
	ST_VIP_CLOSED,        /* to a VIP, but no listener's port and protocol: dropped */
	ST_VIP_PING,          /* an echo request to a VIP: answered */
	ST_FRAG_MISSED,       /* a later fragment to a VIP, its first not seen: dropped */
	ST_CSUM_DEFERRED,     /* partial L4 checksum: the rewrite left to TC ingress */
	ST_UDP_MOVED,         /* UDP flow whose backend left or failed: moved to a live one */
	ST_RST_IGNORED,       /* a RST outside its sender's window: not taken as the end */
	ST_UNPARSED,          /* IPv6 headers past the extension-header bound: untouched */
	ST_MAX
};

#endif
