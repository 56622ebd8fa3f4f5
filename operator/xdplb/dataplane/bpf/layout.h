/* Map key/value layouts shared by the XDP and TC programs.
 * Mirrored once in Python (xdplb/dataplane/layout.py); a test checks that
 * sizes and offsets agree. Changing anything here changes the pin directory
 * (its name carries a hash of this file), so old pins are never misread. */
#ifndef XDPLB_LAYOUT_H
#define XDPLB_LAYOUT_H

/* listeners: one entry per (ingress ifindex, destination, port, protocol).
 * Wildcard listeners are expanded by the agent into the interfaces' addresses. */
struct listener_key {
	__u32 ifindex;
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

#define LF_SNI        1   /* new flows no source route claims go to the SNI path */
#define LF_CLIENT_IP  2   /* sessionAffinity: ClientIP */
#define LF_SRC_ROUTES 4   /* the listener has source-CIDR routes */
#define LF_SNAT       8   /* sourceNAT: Node, new flows leave from the node's address */

struct listener_val {
	__u32 id;     /* index into listener_stats */
	__u32 group;  /* default group */
	__u32 flags;  /* LF_* */
};

/* src_routes (LPM trie): prefixlen = 32 + CIDR length, so the listener id
 * always matches in full and the client address by longest prefix. */
struct lpm_key {
	__u32 prefixlen;
	__be32 listener;
	__be32 addr;
};

#define GF_IN_USE 1

/* groups: the Maglev table of group g is pool[offset .. offset + size). */
struct group_val {
	__u32 offset;
	__u32 size;   /* 0: no eligible backend */
	__u32 flags;  /* GF_* */
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

/* snat_src: per backend id, the node's address toward that backend (0: none). */

/* rev_nat: a backend endpoint -> a listener address it serves. A flow to that
 * address needs no reply entry in conntrack: TC egress finds its forward entry
 * from the backend's reply through this map. The agent keeps an entry on the
 * address it first gave it for as long as flows may rely on it. With RN_ONLY
 * (the backend serves this address only), TC egress also restores a reply of a
 * flow whose conntrack entry was lost. */
#define RN_ONLY 1

struct rev_nat_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct rev_nat_val {
	__be32 vip;
	__be16 vport;
	__u16 backend;    /* backend id */
	__u16 listener;   /* listener id */
	__u16 flags;      /* RN_* */
};

/* pool: Maglev table slots of every group, back to back. */
struct backend {
	__be32 addr;
	__be16 port;
	__u16 id;     /* index into backend_stats */
};

/* conntrack: dir 0 is keyed by the client's packet (client -> listener) and
 * holds the backend; dir 1, only for a flow rev_nat does not cover, is keyed by
 * the backend's reply (backend -> client) and holds the listener address to
 * restore. With source NAT (CT_SNAT on both, always two entries): dir 0 also
 * holds the node's address and port the flow leaves from; dir 1 is keyed by the
 * reply to that address and port (backend -> node) and holds the client in
 * snat_addr/snat_port. */
struct ct_key {
	__be32 src;
	__be32 dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

#define CT_REPLIED 1
#define CT_FIN_FWD 2
#define CT_FIN_REV 4
#define CT_RST     8
#define CT_SNAT    16
#define CT_DIRECT  32  /* dir 1 only: a connection made to a backend itself, not via a
			* listener; its replies pass untouched */

/* 64 bytes, one cache line: a new flow writes one of these, or two. */
struct ct_val {
	__be32 nat_addr;
	__be16 nat_port;
	__u16 backend;     /* backend id */
	__u16 listener;    /* listener id */
	__u16 flags;       /* CT_* (kept on the dir 0 entry) */
	__be32 snat_addr;  /* CT_SNAT: see above */
	__be16 snat_port;
	__u16 pad;
	__u32 created_s;   /* CLOCK_MONOTONIC seconds when the flow began */
	__u64 last_ns;     /* CLOCK_MONOTONIC (coarse) of the last packet either way */
	__u64 packets[2];  /* [0] client -> backend, [1] backend -> client */
	__u64 bytes[2];
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
	ST_FRAGMENT,          /* IPv4 fragment: passed untouched */
	ST_ESTABLISHED,       /* followed its conntrack entry */
	ST_NEW_DEFAULT,       /* new flow to the listener's default group */
	ST_NEW_SRC_ROUTE,     /* new flow routed by a source-CIDR route */
	ST_SNI_PASS,          /* new flow on an SNI listener left to the SNI path */
	ST_RESELECTED,        /* TCP non-SYN without a live entry: backend selected again */
	ST_NO_BACKEND_RST,    /* SYN to a group with no eligible backend: RST sent */
	ST_NO_BACKEND_DROP,   /* UDP to a group with no eligible backend: dropped */
	ST_CT_FULL,           /* conntrack insert failed: dropped */
	ST_REPLY_NAT,         /* egress: reply source restored */
	ST_REPLY_EXPIRED,     /* egress: reply of an expired flow, untouched */
	ST_ICMP_IN,           /* ICMP error about a flow's reply, sent on to its backend */
	ST_ICMP_OUT,          /* egress: ICMP error about a flow's packet, sent on to its client */
	ST_SNAT_REPLY,        /* a backend's reply to a source-NAT flow, sent on to its client */
	ST_SNAT_EXHAUSTED,    /* no free source-NAT port toward the backend: dropped */
	ST_SNAT_NO_SOURCE,    /* no node address known toward the backend: dropped */
	ST_REPLY_RESTORED,    /* egress: reply of a flow with lost entries, restored and tracked */
	ST_MAX
};

#endif
