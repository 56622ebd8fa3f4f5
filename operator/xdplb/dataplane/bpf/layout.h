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

/* pool: Maglev table slots of every group, back to back. */
struct backend {
	__be32 addr;
	__be16 port;
	__u16 id;     /* index into backend_stats */
};

/* conntrack: dir 0 is keyed by the client's packet (client -> listener) and
 * holds the backend; dir 1 is keyed by the backend's reply
 * (backend -> client) and holds the listener address to restore. */
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

struct ct_val {
	__be32 nat_addr;
	__be16 nat_port;
	__u16 backend;     /* backend id */
	__u32 listener;    /* listener id */
	__u32 flags;       /* CT_* (kept on the dir 0 entry) */
	__u64 created_ns;
	__u64 last_ns;     /* bpf_ktime_get_ns of the last packet either way */
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
	ST_UNTRACKED,         /* TCP non-SYN without conntrack entry: passed */
	ST_NO_BACKEND_RST,    /* SYN to a group with no eligible backend: RST sent */
	ST_NO_BACKEND_DROP,   /* UDP to a group with no eligible backend: dropped */
	ST_CT_FULL,           /* conntrack insert failed: dropped */
	ST_REPLY_NAT,         /* egress: reply source restored */
	ST_REPLY_EXPIRED,     /* egress: reply of an expired flow, untouched */
	ST_MAX
};

#endif
