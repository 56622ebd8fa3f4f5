/* xdplb data path.
 *   ingress (XDP): parse -> conntrack hit? DNAT : listener -> source route |
 *                  SNI path | default group -> Maglev slot -> conntrack -> DNAT
 *   egress  (TC):  a backend's reply -> restore the listener address as source
 * Rewritten packets are passed on (XDP_PASS) so the kernel routes them. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#include "layout.h"
#include "maps.h"
#include "csum.h"
#include "hash.h"
#include "parse.h"
#include "conntrack.h"
#include "icmp.h"

/* Counters live here, not in a header: bcc rewrites map calls only in the
 * main source file. */
static __always_inline void count(__u32 st)
{
	u64 *c = stats.lookup(&st);
	if (c)
		*c += 1;
}

static __always_inline void add_flow_stats(struct flow_stats *s, __u64 bytes, int new_flow)
{
	if (s) {
		s->packets += 1;
		s->bytes += bytes;
		s->flows += new_flow;
	}
}

/* A packet of a flow, on its listener's and its backend's counters. */
static __always_inline void count_flow(__u32 listener, __u32 backend, __u64 bytes, int new_flow)
{
	struct flow_stats *s = listener_stats.lookup(&listener);
	add_flow_stats(s, bytes, new_flow);
	s = backend_stats.lookup(&backend);
	add_flow_stats(s, bytes, new_flow);
}

/* Rewrite one address and one port, fixing the IPv4 and L4 checksums. */
static __always_inline void rewrite(struct pkt *p, __be32 *addr, __be16 *port, __be32 new_addr,
				    __be16 new_port)
{
	__be32 old_addr = *addr;
	__be16 old_port = *port;
	*addr = new_addr;
	*port = new_port;
	csum_replace4(&p->ip->check, old_addr, new_addr);
	if (p->proto == IPPROTO_TCP) {
		csum_replace4(p->l4_csum, old_addr, new_addr);
		csum_replace2(p->l4_csum, old_port, new_port);
	} else {
		udp_csum_replace4(p->l4_csum, old_addr, new_addr);
		udp_csum_replace2(p->l4_csum, old_port, new_port);
	}
}

static __always_inline void dnat(struct pkt *p, __be32 addr, __be16 port)
{
	rewrite(p, &p->ip->daddr, p->l4 + L4_DPORT_OFF, addr, port);
}

static __always_inline void snat(struct pkt *p, __be32 addr, __be16 port)
{
	rewrite(p, &p->ip->saddr, p->l4 + L4_SPORT_OFF, addr, port);
}

#define SNAT_TRIES 32

/* The dir-0 key of the flow a source-NAT reply entry (rv) belongs to: the
 * client's packet to the listener. Filled in place, field by field (ct_key has
 * no implicit padding). */
static __always_inline void snat_forward_key(struct ct_key *k, const struct ct_val *rv,
					     __u8 proto)
{
	k->src = rv->snat_addr;
	k->dst = rv->nat_addr;
	k->sport = rv->snat_port;
	k->dport = rv->nat_port;
	k->proto = proto;
	k->dir = 0;
	k->pad = 0;
}

/* May a new flow (its reply entry: rv) take the source-NAT port that `held` (the
 * reply entry there) claims? Yes if held's flow is gone or idle past its timeout,
 * or, for TCP, if it has closed and was the same client's flow from the same port:
 * the backend still has that connection in TIME_WAIT and takes a new SYN on it only
 * when the timestamps go on rising, which they do for one client port, not across
 * ports. A live flow's port never changes hands. */
static __always_inline int snat_port_free(struct ct_val *held, struct ct_val *rv, __be16 port,
					  __u8 proto, __u64 now)
{
	if (!(held->flags & CT_SNAT))
		return 0;  /* a direct connection's marker or a reply entry: not ours */
	struct ct_key fkey;
	snat_forward_key(&fkey, held, proto);
	struct ct_val *f = ct.lookup(&fkey);
	if (!f || f->snat_port != port || ct_expired(f, proto, now))
		return 1;
	return proto == IPPROTO_TCP && ct_closing(f) && held->snat_addr == rv->snat_addr &&
	       held->snat_port == rv->snat_port && held->nat_addr == rv->nat_addr &&
	       held->nat_port == rv->nat_port;
}

static __always_inline int snat_claim(struct ct_key *rkey, struct ct_val *rv, __u64 now)
{
	if (!ct.insert(rkey, rv))
		return 0;
	struct ct_val *held = ct.lookup(rkey);
	return held && snat_port_free(held, rv, rkey->dport, rkey->proto, now) &&
	       !ct.update(rkey, rv) ? 0 : -1;
}

#define SNAT_TAKEOVER_TRIES 4

/* Claim a source-NAT port for rkey (the reply key: backend -> node address;
 * rv->snat_port is the client's port). The client's own port first, as
 * MASQUERADE does; then probes from a random start, the first
 * SNAT_TAKEOVER_TRIES of which may take a finished flow's port (each is a branch
 * for the verifier). -1 when every probe found a live flow. */
static __always_inline int snat_reserve(struct ct_key *rkey, struct ct_val *rv, __u64 now)
{
	__u32 cport = bpf_ntohs(rv->snat_port);
	if (cport >= SNAT_PORT_MIN && cport <= SNAT_PORT_MAX) {
		rkey->dport = rv->snat_port;
		if (!snat_claim(rkey, rv, now))
			return 0;
	}
	__u32 span = SNAT_PORT_MAX - SNAT_PORT_MIN + 1;
	__u32 port = bpf_get_prandom_u32() % span;
	for (int i = 0; i < SNAT_TRIES; i++) {
		rkey->dport = bpf_htons(SNAT_PORT_MIN + port);
		if (i < SNAT_TAKEOVER_TRIES ? !snat_claim(rkey, rv, now) : !ct.insert(rkey, rv))
			return 0;
		port = port + 1 == span ? 0 : port + 1;
	}
	return -1;
}

/* Where a source-NAT flow's reply goes back to: the client, from the listener. */
struct snat_back {
	__be32 client;
	__be32 vip;
	__be16 cport;
	__be16 vport;
};

/* A backend's reply to a source-NAT flow, arriving on the backend side at the
 * node's address: its flow, tracked and counted. 0: found (t filled); -1: p is
 * no such reply; 1: the flow is gone (counted, to pass untouched). */
static __always_inline int snat_reply_flow(struct pkt *p, __u64 now, __u64 bytes,
					   struct snat_back *t)
{
	struct ct_key rkey = {
		.src = p->ip->saddr, .dst = p->ip->daddr, .sport = p->sport, .dport = p->dport,
		.proto = p->proto, .dir = 1,
	};
	struct ct_val *rv = ct.lookup(&rkey);
	if (!rv || !(rv->flags & CT_SNAT))
		return -1;
	struct ct_key fkey;
	snat_forward_key(&fkey, rv, p->proto);
	t->client = rv->snat_addr;
	t->vip = rv->nat_addr;
	t->cport = rv->snat_port;
	t->vport = rv->nat_port;
	struct ct_val *e = ct.lookup(&fkey);
	if (!e || e->nat_addr != p->ip->saddr || e->nat_port != p->sport ||
	    e->snat_port != p->dport || ct_expired(e, p->proto, now)) {
		count(ST_REPLY_EXPIRED);
		return 1;
	}
	ct_track(e, 1, p->tcp_flags, now, bytes);
	count_flow(e->listener, e->backend, bytes, 0);
	count(ST_SNAT_REPLY);
	return 0;
}

static __always_inline int snat_reply(struct pkt *p, __u64 now, __u64 bytes)
{
	struct snat_back t;
	int r = snat_reply_flow(p, now, bytes, &t);
	if (r < 0)
		return -1;
	if (r == 0) {
		dnat(p, t.client, t.cport);
		snat(p, t.vip, t.vport);
	}
	return XDP_PASS;
}

/* Replies of a flow to the address rev_nat holds for its backend find the flow
 * through rev_nat: such a flow needs no reply entry (returns 1). Otherwise the
 * flow gets one, and a flow from the same client port to the address rev_nat
 * holds, on the same backend, is over: to the backend both are one connection,
 * and TC egress, which tries rev_nat first, would take the new flow's replies
 * for the old one's. */
static __always_inline int rev_nat_covers(const struct backend *b, const struct pkt *p)
{
	struct rev_nat_key bk = { .addr = b->addr, .port = b->port, .proto = p->proto };
	struct rev_nat_val *r = rev_nat.lookup(&bk);
	if (!r)
		return 0;
	if (r->vip == p->ip->daddr && r->vport == p->dport)
		return 1;
	struct ct_key old = {
		.src = p->ip->saddr, .dst = r->vip, .sport = p->sport, .dport = r->vport,
		.proto = p->proto, .dir = 0,
	};
	struct ct_val *o = ct.lookup(&old);
	if (o && o->nat_addr == b->addr && o->nat_port == b->port && !(o->flags & CT_SNAT))
		ct.delete(&old);
	return 0;
}

/* The live forward entry of the flow client:cport -> vip:vport, if it goes to
 * backend:bport without source NAT. */
static __always_inline struct ct_val *forward_of(__be32 client, __be16 cport, __be32 vip,
						 __be16 vport, __be32 backend, __be16 bport,
						 __u8 proto, __u64 now)
{
	struct ct_key fkey = {
		.src = client, .dst = vip, .sport = cport, .dport = vport, .proto = proto, .dir = 0,
	};
	struct ct_val *e = ct.lookup(&fkey);
	if (!e || e->nat_addr != backend || e->nat_port != bport || (e->flags & CT_SNAT) ||
	    ct_expired(e, proto, now))
		return NULL;
	return e;
}

enum reply_found { RF_FLOW, RF_DIRECT, RF_UNTRACKED, RF_GONE };

struct reply {
	struct rev_nat_val *rn;  /* the backend endpoint's rev_nat entry, if any */
	struct ct_val *e;        /* RF_FLOW: the flow's forward entry; RF_DIRECT: the marker */
	__be32 vip;              /* RF_FLOW: the listener address the client knows */
	__be16 vport;
};

/* What a backend's packet (rkey: its dir-1 key, backend -> client) belongs to.
 * Most flows are found through rev_nat; the others through their reply entry.
 * RF_FLOW: a live flow. RF_DIRECT: a live CT_DIRECT marker, a connection made to
 * the backend itself. RF_UNTRACKED: no reply entry, or an expired marker.
 * RF_GONE: a reply entry whose flow is gone. */
static __always_inline int reply_lookup(struct ct_key *rkey, __u64 now, struct reply *r)
{
	__be32 backend = rkey->src, client = rkey->dst;
	__be16 bport = rkey->sport, cport = rkey->dport;
	struct rev_nat_key bk = { .addr = backend, .port = bport, .proto = rkey->proto };
	r->rn = rev_nat.lookup(&bk);
	if (r->rn) {
		r->vip = r->rn->vip;
		r->vport = r->rn->vport;
		r->e = forward_of(client, cport, r->vip, r->vport, backend, bport, rkey->proto, now);
		if (r->e)
			return RF_FLOW;
	}
	struct ct_val *rv = ct.lookup(rkey);
	if (!rv)
		return RF_UNTRACKED;
	if (rv->flags & CT_DIRECT) {
		r->e = rv;
		return ct_expired(rv, rkey->proto, now) ? RF_UNTRACKED : RF_DIRECT;
	}
	r->vip = rv->nat_addr;
	r->vport = rv->nat_port;
	r->e = forward_of(client, cport, r->vip, r->vport, backend, bport, rkey->proto, now);
	return r->e ? RF_FLOW : RF_GONE;
}

/* Answer a SYN with RST|ACK from the listener: the group has no backend. */
static __always_inline int send_rst(struct xdp_md *ctx, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = p->ip;
	struct tcphdr *tcp = p->l4;
	if ((void *)(eth + 1) > data_end || (void *)(ip + 1) > data_end ||
	    (void *)(tcp + 1) > data_end)
		return XDP_DROP;

	unsigned char mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

	/* Swapping the addresses leaves the IP checksum as it is. */
	__be32 a = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = a;
	__u16 new_len = bpf_htons(p->l4_off - p->ip_off + sizeof(*tcp));
	csum_replace2(&ip->check, ip->tot_len, new_len);
	ip->tot_len = new_len;
	__u16 old_ttl = *(__u16 *)&ip->ttl;
	ip->ttl = 64;
	csum_replace2(&ip->check, old_ttl, *(__u16 *)&ip->ttl);
	csum_replace2(&ip->check, ip->frag_off, 0);
	ip->frag_off = 0;

	__be16 port = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = port;
	tcp->ack_seq = bpf_htonl(bpf_ntohl(tcp->seq) + 1);
	tcp->seq = 0;
	*((__u8 *)tcp + TCP_DOFF_OFF) = (sizeof(*tcp) / 4) << 4;  /* no options */
	*((__u8 *)tcp + TCP_FLAGS_OFF) = TCPF_RST | TCPF_ACK;
	tcp->window = 0;
	tcp->urg_ptr = 0;
	tcp->check = 0;
	__u32 s = (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) +
		  (ip->daddr >> 16) + bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(*tcp));
	__u16 *w = (__u16 *)tcp;
#pragma unroll
	for (int i = 0; i < sizeof(*tcp) / 2; i++)
		s += w[i];
	tcp->check = ~csum_fold(s);

	int excess = (int)(data_end - data) - (int)(p->l4_off + sizeof(*tcp));
	if (excess > 0 && bpf_xdp_adjust_tail(ctx, -excess))
		return XDP_DROP;
	return XDP_TX;
}

/* The conntrack key, direction ``dir``, of the flow an ICMP error is about: the
 * quoted packet travelled the other way, so its ends are swapped. (ct_key has no
 * implicit padding to clear.) */
static __always_inline struct ct_key quoted_flow(const struct icmp_err *e, __u8 dir)
{
	struct ct_key k = {
		.src = e->in_ip->daddr, .dst = e->in_ip->saddr, .sport = e->in_ports[1],
		.dport = e->in_ports[0], .proto = e->in_proto, .dir = dir,
	};
	return k;
}

/* An error about a packet a source-NAT flow sent to its backend (the quote runs
 * node address -> backend), arriving at the node: make it about the client's
 * packet to the listener, and send it to the client. */
static __always_inline int icmp_snat_forward(struct pkt *p, struct icmp_err *e)
{
	struct ct_key rkey = quoted_flow(e, 1);
	struct ct_val *rv = ct.lookup(&rkey);
	if (!rv || !(rv->flags & CT_SNAT)) {
		count(ST_NOMATCH);
		return XDP_PASS;
	}
	struct ct_key fkey;
	snat_forward_key(&fkey, rv, e->in_proto);
	__be32 client = rv->snat_addr, vip = rv->nat_addr, node = rkey.dst;
	__be16 client_port = rv->snat_port, vport = rv->nat_port;
	struct ct_val *v = ct.lookup(&fkey);
	if (!v || v->snat_port != rkey.dport ||
	    ct_expired(v, e->in_proto, bpf_ktime_get_coarse_ns())) {
		count(ST_NOMATCH);
		return XDP_PASS;
	}
	icmp_rewrite_quote(e, 0, client, client_port);
	icmp_rewrite_quote(e, 1, vip, vport);
	if (p->ip->daddr == node) {
		csum_replace4(&p->ip->check, node, client);
		p->ip->daddr = client;
	}
	count(ST_ICMP_IN);
	return XDP_PASS;
}

/* An error about a reply the LB sent for a flow (the quote runs listener ->
 * client): make it about the backend's packet, and send it to the backend. */
static __always_inline int icmp_ingress(struct pkt *p, void *data_end)
{
	struct icmp_err e;
	if (parse_icmp_error(data_end, p, &e)) {
		count(ST_NOMATCH);
		return XDP_PASS;
	}
	struct ct_key key = quoted_flow(&e, 0);
	struct ct_val *v = ct.lookup(&key);
	if (!v)
		return icmp_snat_forward(p, &e);
	if (ct_expired(v, e.in_proto, bpf_ktime_get_coarse_ns())) {
		count(ST_NOMATCH);
		return XDP_PASS;
	}
	__be32 vip = key.dst, backend = v->nat_addr;
	icmp_rewrite_quote(&e, 0, backend, v->nat_port);
	if (v->flags & CT_SNAT)  /* the backend's packet went to the node's address */
		icmp_rewrite_quote(&e, 1, v->snat_addr, v->snat_port);
	if (p->ip->daddr == vip) {
		csum_replace4(&p->ip->check, vip, backend);
		p->ip->daddr = backend;
	}
	count(ST_ICMP_IN);
	return XDP_PASS;
}

int xdplb_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct pkt p = {};

	switch (parse(data, data_end, &p)) {
	case P_OK:
		break;
	case P_MALFORMED:
		count(ST_MALFORMED);
		return XDP_PASS;
	case P_FRAGMENT:
		count(ST_FRAGMENT);
		return XDP_PASS;
	case P_ICMP:
		return icmp_ingress(&p, data_end);
	default:
		count(ST_NOMATCH);
		return XDP_PASS;
	}

	__u32 dport = bpf_ntohs(p.dport);
	__u32 *mask = port_filter.lookup(&dport);
	if (!mask || !(*mask & (PF_LISTENER(p.proto) | PF_SNAT(p.proto)))) {
		count(ST_NOMATCH);
		return XDP_PASS;
	}

	/* Idle timeouts are seconds: the tick-resolution clock is enough and cheaper. */
	__u64 now = bpf_ktime_get_coarse_ns();
	__u64 bytes = bpf_xdp_get_buff_len(ctx);  /* all buffers of a multi-buffer frame */
	if (*mask & PF_SNAT(p.proto)) {
		int r = snat_reply(&p, now, bytes);
		if (r >= 0)
			return r;
		if (!(*mask & PF_LISTENER(p.proto))) {
			count(ST_NOMATCH);
			return XDP_PASS;
		}
	}
	int syn = (p.tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
	struct ct_key key = {
		.src = p.ip->saddr, .dst = p.ip->daddr, .sport = p.sport, .dport = p.dport,
		.proto = p.proto, .dir = 0,
	};
	struct ct_val *e = ct.lookup(&key);
	/* A SYN on a closed flow's entry starts a new flow (port reuse). */
	if (e && !ct_expired(e, p.proto, now) && !(syn && ct_closing(e))) {
		ct_track(e, 0, p.tcp_flags, now, bytes);
		count_flow(e->listener, e->backend, bytes, 0);
		count(ST_ESTABLISHED);
		if (e->flags & CT_SNAT)
			snat(&p, e->snat_addr, e->snat_port);
		dnat(&p, e->nat_addr, e->nat_port);
		return XDP_PASS;
	}

	struct listener_key lk = {
		.ifindex = ctx->ingress_ifindex, .addr = p.ip->daddr, .port = p.dport,
		.proto = p.proto,
	};
	struct listener_val *l = listeners.lookup(&lk);
	if (!l) {
		count(ST_NOMATCH);
		return XDP_PASS;
	}
	/* A segment of a flow whose entry is gone (LRU eviction, a restart with a new
	 * layout, a flow rehashed here by upstream ECMP): the same table on every
	 * node picks the same backend again, so the flow lands where it was. */
	int lost = p.proto == IPPROTO_TCP && !syn;

	__u32 lid = l->id, gid = l->group, flags = l->flags, path = ST_NEW_DEFAULT;
	if (flags & LF_SRC_ROUTES) {
		struct lpm_key rk = { .prefixlen = 64, .listener = bpf_htonl(lid),
				      .addr = p.ip->saddr };
		__u32 *g = src_routes.lookup(&rk);
		if (g) {
			gid = *g;
			path = ST_NEW_SRC_ROUTE;
		}
	}
	if (path == ST_NEW_DEFAULT && (flags & LF_SNI)) {
		/* New and ongoing flows of the acceptor alike: its sockets own them. */
		count(ST_SNI_PASS);
		return XDP_PASS;
	}

	struct group_val *g = groups.lookup(&gid);
	struct backend *b = NULL;
	if (g && g->size) {
		__u32 h = (flags & LF_CLIENT_IP)
			? client_hash(bpf_ntohl(p.ip->saddr))
			: flow_hash(bpf_ntohl(p.ip->saddr), bpf_ntohl(p.ip->daddr),
				    bpf_ntohs(p.sport), dport, p.proto);
		__u32 slot = g->offset + h % g->size;
		b = pool.lookup(&slot);
	}
	if (!b) {
		if (p.proto == IPPROTO_TCP && !lost) {
			count(ST_NO_BACKEND_RST);
			return send_rst(ctx, &p);
		}
		count(ST_NO_BACKEND_DROP);
		return XDP_DROP;
	}

	struct ct_val v = {
		.nat_addr = b->addr, .nat_port = b->port, .backend = b->id, .listener = lid,
		.flags = lost ? ct_flags_of(0, p.tcp_flags) : 0,
		.created_s = now / SEC_NS, .last_ns = now, .packets = {1, 0}, .bytes = {bytes, 0},
	};
	struct ct_key rkey = {
		.src = b->addr, .dst = p.ip->saddr, .sport = b->port, .dport = p.sport,
		.proto = p.proto, .dir = 1,
	};
	struct ct_val rv = {
		.nat_addr = p.ip->daddr, .nat_port = p.dport, .backend = b->id, .listener = lid,
		.created_s = now / SEC_NS, .last_ns = now,
	};
	/* The reply entry first: with source NAT it is what claims the port. A backend
	 * that reaches itself through its listener (hairpin) would answer itself
	 * directly, so its flow is source-NATed whatever the listener says. Without
	 * source NAT, most flows need none (rev_nat_covers): one LRU insert, not two. */
	int replied = 1;
	if ((flags & LF_SNAT) || b->addr == p.ip->saddr) {
		__u32 bid = b->id;
		__be32 *src = snat_src.lookup(&bid);
		if (!src || !*src) {
			count(ST_SNAT_NO_SOURCE);
			return XDP_DROP;
		}
		rkey.dst = *src;
		rv.flags = CT_SNAT;
		rv.snat_addr = p.ip->saddr;
		rv.snat_port = p.sport;
		if (snat_reserve(&rkey, &rv, now)) {
			count(ST_SNAT_EXHAUSTED);
			return XDP_DROP;
		}
		v.flags |= CT_SNAT;
		v.snat_addr = rkey.dst;
		v.snat_port = rkey.dport;
	} else if (rev_nat_covers(b, &p)) {
		replied = 0;
	} else if (ct.update(&rkey, &rv)) {
		count(ST_CT_FULL);
		return XDP_DROP;
	}
	if (ct.update(&key, &v)) {
		if (replied)
			ct.delete(&rkey);
		count(ST_CT_FULL);
		return XDP_DROP;
	}
	count_flow(lid, b->id, bytes, !lost);
	count(lost ? ST_RESELECTED : path);
	if (v.flags & CT_SNAT)
		snat(&p, v.snat_addr, v.snat_port);
	dnat(&p, v.nat_addr, v.nat_port);
	return XDP_PASS;
}

/* An error about a packet the LB forwarded to a backend (the quote runs client
 * -> backend): make it about the packet the client sent, from the listener. */
static __always_inline int icmp_egress(struct pkt *p, void *data_end)
{
	struct icmp_err e;
	if (parse_icmp_error(data_end, p, &e))
		return TC_ACT_OK;
	struct ct_key rkey = quoted_flow(&e, 1);
	struct reply rp;
	if (reply_lookup(&rkey, bpf_ktime_get_coarse_ns(), &rp) != RF_FLOW)
		return TC_ACT_OK;
	__be32 backend = rkey.src;
	icmp_rewrite_quote(&e, 1, rp.vip, rp.vport);
	if (p->ip->saddr == backend) {  /* the backend itself reports it */
		csum_replace4(&p->ip->check, backend, rp.vip);
		p->ip->saddr = rp.vip;
	}
	count(ST_ICMP_OUT);
	return TC_ACT_OK;
}

/* An skb's headers, pulled into the linear part when they are not all there
 * (GSO, paged skbs). An ICMP error's quote is pulled too: it is read and edited in
 * place. After P_ICMP, skb->data_end bounds p. */
static __always_inline int parse_skb(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int r = parse(data, data_end, p);
	if (r == P_MALFORMED && skb->len > data_end - data) {
		if (bpf_skb_pull_data(skb, skb->len < 128 ? skb->len : 128))
			return P_MALFORMED;
		r = parse((void *)(long)skb->data, (void *)(long)skb->data_end, p);
	}
	if (r == P_ICMP) {
		if (bpf_skb_pull_data(skb, skb->len < 192 ? skb->len : 192))
			return P_MALFORMED;
		r = parse((void *)(long)skb->data, (void *)(long)skb->data_end, p);
	}
	return r;
}

/* One end of an skb's flow (addr_off, port_off) := new_addr:new_port, checksums
 * kept valid whether the L4 one is complete or offloaded. Takes the old values:
 * the helpers invalidate packet pointers. */
static __always_inline void skb_rewrite_end(struct __sk_buff *skb, __u32 csum_off, __u64 mangled,
					    __u32 ip_check_off, __u32 addr_off, __u32 port_off,
					    __be32 old_addr, __be32 new_addr, __be16 old_port,
					    __be16 new_port)
{
	bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
			    BPF_F_PSEUDO_HDR | mangled | sizeof(new_addr));
	bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(new_port));
	bpf_l3_csum_replace(skb, ip_check_off, old_addr, new_addr, sizeof(new_addr));
	bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0);
	bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0);
}

static __always_inline __u32 l4_csum_off(const struct pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
}

/* Source := listener address on a reply leaving for its client. */
static __always_inline int reply_rewrite(struct __sk_buff *skb, struct pkt *p, __be32 new_addr,
					 __be16 new_port)
{
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	skb_rewrite_end(skb, l4_csum_off(p), mangled, p->ip_off + offsetof(struct iphdr, check),
			p->ip_off + offsetof(struct iphdr, saddr), p->l4_off + L4_SPORT_OFF,
			p->ip->saddr, new_addr, p->sport, new_port);
	return TC_ACT_OK;
}

/* A TCP segment from a backend endpoint (r: its rev_nat entry) that no flow
 * answers. A SYN|ACK: the backend accepts a connection made to it directly (not
 * through a listener); mark it so that its later segments pass untouched.
 * Anything else: a listener flow whose entry was lost (flushed, evicted, a new
 * layout); if the backend serves one listener address only, the client knows the
 * flow as coming from there: restore that and track the flow again. Otherwise
 * the client would answer the backend's own address with a RST. */
static __always_inline int egress_untracked(struct __sk_buff *skb, struct pkt *p,
					    struct ct_key *rkey, struct rev_nat_val *r, __u64 now)
{
	if (p->proto != IPPROTO_TCP || !r)
		return TC_ACT_OK;
	if (p->tcp_flags & TCPF_SYN) {
		struct ct_val d = {
			.nat_addr = p->ip->saddr, .nat_port = p->sport,
			.flags = CT_DIRECT | CT_REPLIED, .created_s = now / SEC_NS, .last_ns = now,
		};
		ct.update(rkey, &d);
		return TC_ACT_OK;
	}
	if (!(r->flags & RN_ONLY))
		return TC_ACT_OK;
	__be32 vip = r->vip;
	__be16 vport = r->vport;
	__u32 lid = r->listener, bid = r->backend;
	struct ct_key fkey = {
		.src = p->ip->daddr, .dst = vip, .sport = p->dport, .dport = vport,
		.proto = p->proto, .dir = 0,
	};
	struct ct_val v = {
		.nat_addr = p->ip->saddr, .nat_port = p->sport, .backend = bid, .listener = lid,
		.flags = ct_flags_of(1, p->tcp_flags), .created_s = now / SEC_NS, .last_ns = now,
		.packets = {0, 1}, .bytes = {0, skb->len},
	};
	if (ct.update(&fkey, &v)) {  /* rev_nat covers it: no reply entry */
		count(ST_CT_FULL);
		return TC_ACT_OK;
	}
	count_flow(lid, bid, skb->len, 0);
	count(ST_REPLY_RESTORED);
	return reply_rewrite(skb, p, vip, vport);
}

int xdplb_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int r = parse_skb(skb, &p);
	if (r == P_ICMP)
		return icmp_egress(&p, (void *)(long)skb->data_end);
	if (r != P_OK)
		return TC_ACT_OK;

	__u64 now = bpf_ktime_get_coarse_ns();
	struct ct_key rkey = {
		.src = p.ip->saddr, .dst = p.ip->daddr, .sport = p.sport, .dport = p.dport,
		.proto = p.proto, .dir = 1,
	};
	struct reply rp;
	switch (reply_lookup(&rkey, now, &rp)) {
	case RF_DIRECT:  /* a connection to the backend itself: untouched, kept alive */
		rp.e->last_ns = now;
		return TC_ACT_OK;
	case RF_UNTRACKED:
		return egress_untracked(skb, &p, &rkey, rp.rn, now);
	case RF_GONE:
		count(ST_REPLY_EXPIRED);
		return TC_ACT_OK;
	}
	struct ct_val *e = rp.e;
	/* A SYN|ACK is no reply of a flow that has closed: the client reused the port
	 * for a connection to the backend itself. The old flow's entry goes, so that
	 * the new connection's segments are not taken for its replies. */
	if ((p.tcp_flags & TCPF_SYN) && ct_closing(e)) {
		struct ct_key fkey = {
			.src = rkey.dst, .dst = rp.vip, .sport = p.dport, .dport = rp.vport,
			.proto = p.proto, .dir = 0,
		};
		ct.delete(&fkey);
		return egress_untracked(skb, &p, &rkey, rp.rn, now);
	}
	ct_track(e, 1, p.tcp_flags, now, skb->len);
	count_flow(e->listener, e->backend, skb->len, 0);
	count(ST_REPLY_NAT);
	return reply_rewrite(skb, &p, rp.vip, rp.vport);
}

/* TC ingress on an interface toward backends that no listener uses: the replies
 * of source-NAT flows (XDP takes them where it is attached). On the skb path the
 * backends keep their segmentation and checksum offloads, which XDP on a veth
 * turns off, and no frame is copied for XDP. */
int xdplb_backend_in(struct __sk_buff *skb)
{
	struct pkt p = {};
	int r = parse_skb(skb, &p);
	if (r == P_ICMP) {
		icmp_ingress(&p, (void *)(long)skb->data_end);
		return TC_ACT_OK;
	}
	if (r != P_OK)
		return TC_ACT_OK;
	__u32 dport = bpf_ntohs(p.dport);
	__u32 *mask = port_filter.lookup(&dport);
	if (!mask || !(*mask & PF_SNAT(p.proto)))
		return TC_ACT_OK;
	struct snat_back t;
	if (snat_reply_flow(&p, bpf_ktime_get_coarse_ns(), skb->len, &t))
		return TC_ACT_OK;
	__be32 old_dst = p.ip->daddr, old_src = p.ip->saddr;
	__be16 old_dport = p.dport, old_sport = p.sport;
	__u32 csum_off = l4_csum_off(&p), check_off = p.ip_off + offsetof(struct iphdr, check);
	__u64 mangled = p.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	skb_rewrite_end(skb, csum_off, mangled, check_off,
			p.ip_off + offsetof(struct iphdr, daddr), p.l4_off + L4_DPORT_OFF, old_dst,
			t.client, old_dport, t.cport);
	skb_rewrite_end(skb, csum_off, mangled, check_off,
			p.ip_off + offsetof(struct iphdr, saddr), p.l4_off + L4_SPORT_OFF, old_src,
			t.vip, old_sport, t.vport);
	return TC_ACT_OK;
}
