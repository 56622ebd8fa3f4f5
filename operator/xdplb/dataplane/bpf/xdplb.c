/* xdplb data path.
 *   ingress (XDP): parse (IPv4, IPv6) -> conntrack hit? DNAT : listener -> source route |
 *                  SNI path | default group -> Maglev slot -> conntrack -> DNAT
 *   egress  (TC):  a backend's reply -> restore the listener address as source
 *   ingress (TC):  what XDP left to it (a partial checksum), and source-NAT replies
 *                  on interfaces without XDP
 * Rewritten packets are passed on (XDP_PASS) so the kernel routes them. A reply is
 * rewritten only on proof that its flow is the load balancer's: an entry made from a
 * packet to a listener. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
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

/* --- parsing ----------------------------------------------------------------------- */

/* parse.h's two steps. Between them an IPv6 packet's L4 offset (and what its
 * extension-header walk found) goes through the per-CPU scratch map: the verifier
 * then sees one range for every path the walk can take, instead of verifying the rest
 * of the program once per path. */
static __always_inline int parse(void *data, void *data_end, struct pkt *p)
{
	int r = parse_l3(data, data_end, p);
	if (r != P_L4)
		return r;
	if (p->family == 6) {
		__u32 zero = 0;
		struct scratch *sc = scratch.lookup(&zero);
		if (!sc)
			return P_MALFORMED;
		sc->l4_off = p->l4_off;
		sc->l4_len = p->l4_len;
		sc->frag_id = p->frag_id;
		sc->frag = p->frag;
		barrier();
		p->l4_off = sc->l4_off;
		p->l4_len = sc->l4_len;
		p->frag_id = sc->frag_id;
		p->frag = sc->frag;
	}
	return parse_l4(data, data_end, p);
}

/* p's pointers again, from its offsets, after a helper that changed no offset of the
 * frame (bpf_xdp_adjust_meta) invalidated them. 0, or -1 when they do not fit. */
static __always_inline int repoint(void *data, void *data_end, struct pkt *p)
{
	__u32 l3_off = p->l3_off, l4_off = p->l4_off;
	if (l3_off > sizeof(struct ethhdr) + sizeof(struct vlan_hdr) || l4_off > MAX_L4_OFF)
		return -1;
	void *l3 = data + l3_off;
	void *l4 = data + l4_off;
	if (l3 + (p->family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr)) > data_end ||
	    l4 + sizeof(struct udphdr) > data_end)
		return -1;
	p->l3 = l3;
	p->l4 = l4;
	if (p->proto == IPPROTO_TCP) {
		if (l4 + sizeof(struct tcphdr) > data_end)
			return -1;
		p->l4_csum = l4 + TCP_CSUM_OFF;
	} else {
		p->l4_csum = l4 + UDP_CSUM_OFF;
	}
	return 0;
}

/* --- counters (here, not in a header: bcc rewrites map calls only in the main
 * source file) ------------------------------------------------------------------ */

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

/* Record a packet on a flow's forward entry (ct_track), counting a RST it ignored. */
static __always_inline void track(struct ct_val *v, int dir, const struct pkt *p, __u64 now,
				  __u64 bytes)
{
	if (ct_track(v, dir, p, now, bytes))
		count(ST_RST_IGNORED);
}

/* --- rewriting in XDP (complete checksums) ------------------------------------------ */

/* A packet's address only (a later fragment has no ports; its datagram's L4 checksum
 * is in the first), and the IPv4 header checksum. */
static __always_inline void l3_rewrite(struct pkt *p, int src, const struct addr *a)
{
	if (p->family == 4) {
		struct iphdr *ip = p->l3;
		__be32 *f = src ? &ip->saddr : &ip->daddr;
		csum_replace4(&ip->check, *f, a->w[3]);
		*f = a->w[3];
	} else {
		struct ipv6hdr *ip6 = p->l3;
		__builtin_memcpy(src ? &ip6->saddr : &ip6->daddr, a, sizeof(*a));
	}
	*(src ? &p->src : &p->dst) = *a;
}

/* One end of p's flow (src: its source, else its destination) := a:port, fixing the
 * IPv4 header checksum and the L4 one (a UDP checksum of 0, "none" over IPv4, stays
 * so). p's copy of the address follows. */
static __always_inline void rewrite(struct pkt *p, int src, const struct addr *a, __be16 port)
{
	__be16 *pt = p->l4 + (src ? L4_SPORT_OFF : L4_DPORT_OFF);
	const struct addr *old = src ? &p->src : &p->dst;
	int udp = p->proto == IPPROTO_UDP;
	if (p->family == 4) {
		if (udp)
			udp_csum_replace4(p->l4_csum, old->w[3], a->w[3]);
		else
			csum_replace4(p->l4_csum, old->w[3], a->w[3]);
	} else if (udp) {
		udp_csum_replace16(p->l4_csum, old->w, a->w);
	} else {
		csum_replace16(p->l4_csum, old->w, a->w);
	}
	l3_rewrite(p, src, a);
	if (udp)
		udp_csum_replace2(p->l4_csum, *pt, port);
	else
		csum_replace2(p->l4_csum, *pt, port);
	*pt = port;
}

/* The outer packet of an ICMP error: its source (src = 1) or destination := a. An
 * ICMPv6 checksum covers it (its pseudo-header). */
static __always_inline void icmp_outer_rewrite(struct pkt *p, struct icmp_err *e, int src,
					       const struct addr *a)
{
	if (p->family == 6)
		csum_replace16(e->icmp_csum, (src ? &p->src : &p->dst)->w, a->w);
	l3_rewrite(p, src, a);
}

static __always_inline void dnat(struct pkt *p, const struct addr *a, __be16 port)
{
	rewrite(p, 0, a, port);
}

static __always_inline void snat(struct pkt *p, const struct addr *a, __be16 port)
{
	rewrite(p, 1, a, port);
}

/* Whether p's L4 checksum holds only the pseudo-header sum (CHECKSUM_PARTIAL: a local
 * sender or a veth left the rest to the NIC), which an update for a complete checksum
 * would corrupt. XDP cannot see the skb's state: a checksum equal to the folded
 * pseudo-header sum is taken for partial, and its rewrite left to TC ingress, which
 * knows (a complete checksum matches one time in 65,536; TC gets it right too). A
 * fragment's checksum is always complete. */
static __always_inline int csum_maybe_partial(const struct pkt *p)
{
	if (p->frag || (p->proto == IPPROTO_UDP && *p->l4_csum == 0))
		return 0;
	__u32 sum = pseudo_sum(&p->src, &p->dst, p->family == 4, p->proto, p->l4_len);
	return *p->l4_csum == csum_fold(sum);
}

/* Ask TC ingress, in the frame's metadata, to do what kind says. 0 when asked; else
 * the driver keeps no metadata. Either way p's pointers are no longer valid. */
static __always_inline int ask_tc(struct xdp_md *ctx, __u32 kind)
{
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct defer_meta)))
		return -1;
	struct defer_meta *m = (void *)(long)ctx->data_meta;
	if ((void *)(m + 1) > (void *)(long)ctx->data)
		return -1;
	m->magic = DEFER_MAGIC;
	m->kind = kind;
	return 0;
}

/* When p's checksum may be partial, leave its rewrite to TC ingress (xdplb_tc_in): 1.
 * Else 0, with p parsed again where the driver keeps no metadata, for the caller to
 * rewrite itself. */
static __always_inline int defer_to_tc(struct xdp_md *ctx, struct pkt *p, __u32 kind)
{
	if (!csum_maybe_partial(p))
		return 0;
	if (!ask_tc(ctx, kind)) {
		count(ST_CSUM_DEFERRED);
		return 1;
	}
	return repoint((void *)(long)ctx->data, (void *)(long)ctx->data_end, p);
}

/* --- fragments ----------------------------------------------------------------------- */

/* A first fragment was translated (k: its addresses before): the others follow. */
static __always_inline void frag_record(const struct pkt *p, struct frag_key *k)
{
	k->id = p->frag_id;
	k->proto = p->proto;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
	struct frag_val v = { .src = p->src, .dst = p->dst };
	frags.update(k, &v);
}

static __always_inline struct frag_val *frag_of(const struct pkt *p)
{
	struct frag_key k = { .src = p->src, .dst = p->dst, .id = p->frag_id, .proto = p->proto };
	return frags.lookup(&k);
}

/* --- VIPs ------------------------------------------------------------------------------ */

static __always_inline int is_vip(const struct addr *a)
{
	__u32 fold = bpf_ntohl(a->w[0] ^ a->w[1] ^ a->w[2] ^ a->w[3]);
	__u32 bit = VIP_BIT(fold);
	__u32 word = bit / 32;
	__u32 *w = vip_bits.lookup(&word);
	if (!w || !(*w & (1u << (bit & 31))))
		return 0;
	struct addr key = *a;
	return vips.lookup(&key) != NULL;
}

/* A packet for no listener: dropped when it is to a VIP (a port no listener serves:
 * the node must not answer, nor route it back), else passed untouched. */
static __always_inline int not_ours(const struct pkt *p)
{
	if (p->l3 && is_vip(&p->dst)) {
		count(ST_VIP_CLOSED);
		return XDP_DROP;
	}
	count(ST_NOMATCH);
	return XDP_PASS;
}

static __always_inline void swap_macs(struct ethhdr *eth)
{
	unsigned char mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
}

/* A packet turned back to its sender: MACs and addresses swapped (which leaves the
 * checksums as they are), TTL (hop limit) 64, not fragmented. */
static __always_inline void turn_back(struct ethhdr *eth, struct pkt *p)
{
	swap_macs(eth);
	if (p->family == 4) {
		struct iphdr *ip = p->l3;
		__be32 a = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = a;
		__u16 old_ttl = *(__u16 *)&ip->ttl;
		ip->ttl = 64;
		csum_replace2(&ip->check, old_ttl, *(__u16 *)&ip->ttl);
		csum_replace2(&ip->check, ip->frag_off, 0);
		ip->frag_off = 0;
	} else {
		struct ipv6hdr *ip6 = p->l3;
		__builtin_memcpy(&ip6->saddr, &p->dst, sizeof(p->dst));
		__builtin_memcpy(&ip6->daddr, &p->src, sizeof(p->src));
		ip6->hop_limit = 64;
	}
	struct addr a = p->src;
	p->src = p->dst;
	p->dst = a;
}

/* An answer made in place of the packet it answers goes back out of the interface
 * it came in by: through TC ingress, or with XDP_TX where the driver keeps
 * no metadata (a NIC's, where XDP_TX works; into a veth, XDP_TX is lost unless the
 * peer runs XDP). via_tc: whether ask_tc took the request, before the answer was made. */
static __always_inline int send_back(int via_tc)
{
	return via_tc ? XDP_PASS : XDP_TX;
}

/* An echo request to a VIP gets its reply here: a VIP need not be an address of the
 * node. -1 for anything else. */
static __always_inline int vip_ping(struct xdp_md *ctx, struct pkt *p)
{
	__u8 *icmp = p->l4;
	if ((void *)(icmp + ICMP_HDR_LEN) > (void *)(long)ctx->data_end)
		return -1;
	__u8 request = p->family == 4 ? ICMP_ECHO : ICMP6_ECHO_REQUEST;
	if (icmp[ICMP_TYPE_OFF] != request || icmp[1] != 0)
		return -1;
	int via_tc = !ask_tc(ctx, DEFER_ANSWER);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if (repoint(data, data_end, p))
		return XDP_DROP;
	icmp = p->l4;
	if ((void *)(eth + 1) > data_end || (void *)(icmp + ICMP_HDR_LEN) > data_end)
		return XDP_DROP;
	turn_back(eth, p);  /* an ICMPv6 checksum covers both addresses: swapped, the same */
	__u16 *csum = (__u16 *)(icmp + ICMP_CSUM_OFF);
	__u16 old = *(__u16 *)icmp;
	icmp[ICMP_TYPE_OFF] = p->family == 4 ? ICMP_ECHOREPLY : ICMP6_ECHO_REPLY;
	csum_replace2(csum, old, *(__u16 *)icmp);
	count(ST_VIP_PING);
	return send_back(via_tc);
}

/* Answer a TCP segment with a RST from the listener (RFC 793: the sequence number
 * its ACK expects, or an ACK of what it carried). Its checksum is complete, or partial
 * (the pseudo-header sum) when the segment's was and the skb goes on: the skb keeps
 * the state that asks the kernel to complete it. */
static __always_inline int send_rst(struct xdp_md *ctx, struct pkt *p)
{
	/* An IPv6 segment behind extension headers is not answered: the answer would
	 * have to move its TCP header. */
	if (p->family == 6 && p->l4_off != p->l3_off + sizeof(struct ipv6hdr))
		return XDP_DROP;
	int partial = csum_maybe_partial(p);
	__u8 flags = p->tcp_flags;
	__u32 seq_end = p->seq_end;
	int via_tc = !ask_tc(ctx, DEFER_ANSWER);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (repoint(data, data_end, p))
		return XDP_DROP;
	struct ethhdr *eth = data;
	struct tcphdr *tcp = p->l4;
	if ((void *)(eth + 1) > data_end || (void *)(tcp + 1) > data_end)
		return XDP_DROP;

	turn_back(eth, p);
	if (p->family == 4) {
		struct iphdr *ip = p->l3;
		if ((void *)(ip + 1) > data_end)
			return XDP_DROP;
		__u16 new_len = bpf_htons(p->l4_off - p->l3_off + sizeof(*tcp));
		csum_replace2(&ip->check, ip->tot_len, new_len);
		ip->tot_len = new_len;
	} else {
		struct ipv6hdr *ip6 = p->l3;
		if ((void *)(ip6 + 1) > data_end)
			return XDP_DROP;
		ip6->payload_len = bpf_htons(sizeof(*tcp));
	}

	__be16 port = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = port;
	if (flags & TCPF_ACK) {
		tcp->seq = tcp->ack_seq;
		tcp->ack_seq = 0;
		*((__u8 *)tcp + TCP_FLAGS_OFF) = TCPF_RST;
	} else {
		tcp->ack_seq = bpf_htonl(seq_end);
		tcp->seq = 0;
		*((__u8 *)tcp + TCP_FLAGS_OFF) = TCPF_RST | TCPF_ACK;
	}
	*((__u8 *)tcp + TCP_DOFF_OFF) = (sizeof(*tcp) / 4) << 4;  /* no options */
	tcp->window = 0;
	tcp->urg_ptr = 0;
	tcp->check = 0;
	__u32 s = pseudo_sum(&p->src, &p->dst, p->family == 4, IPPROTO_TCP, sizeof(*tcp));
	if (partial && via_tc) {
		tcp->check = csum_fold(s);
	} else {
		__u16 *w = (__u16 *)tcp;
#pragma unroll
		for (int i = 0; i < sizeof(*tcp) / 2; i++)
			s += w[i];
		tcp->check = ~csum_fold(s);
	}

	int excess = (int)(data_end - data) - (int)(p->l4_off + sizeof(*tcp));
	if (excess > 0 && bpf_xdp_adjust_tail(ctx, -excess))
		return XDP_DROP;
	return send_back(via_tc);
}

/* A TCP segment that has no flow to follow and may start none: a RST answers it
 * (never a RST: that is dropped). */
static __always_inline int refuse(struct xdp_md *ctx, struct pkt *p, __u32 st)
{
	count(st);
	return p->tcp_flags & TCPF_RST ? XDP_DROP : send_rst(ctx, p);
}

/* --- flows ----------------------------------------------------------------------------- */

/* The reply entry a forward entry of the client's packet p pairs with. */
static __always_inline void reply_key_of(struct ct_key *rk, const struct ct_val *e,
					 const struct pkt *p)
{
	rk->src = e->nat_addr;
	rk->sport = e->nat_port;
	if (e->flags & CT_SNAT) {
		rk->dst = e->snat_addr;
		rk->dport = e->snat_port;
	} else {
		rk->dst = p->src;
		rk->dport = p->sport;
	}
	rk->proto = p->proto;
	rk->pad[0] = rk->pad[1] = rk->pad[2] = 0;
}

/* Whether reply entry rv names the flow of the client's packet p. */
static __always_inline int reply_names(const struct ct_reply_val *rv, const struct pkt *p)
{
	return addr_eq(&rv->client, &p->src) && rv->cport == p->sport &&
	       addr_eq(&rv->vip, &p->dst) && rv->vport == p->dport;
}

/* May a new source-NAT flow (rv) take the port whose reply entry `held` names another
 * flow? Only the same client's, from the same port, to the same listener, once that
 * flow has closed: the backend still has that connection in TIME_WAIT and takes a
 * new SYN on it only when the timestamps go on rising, which they do for one client
 * port, not across ports. Other ports free up when the sweeper removes the entries of
 * flows that are gone: a port never changes hands between clients here, so two CPUs
 * can never give one port to two flows. */
static __always_inline int snat_port_reusable(const struct ct_key *rk,
					      const struct ct_reply_val *held,
					      const struct ct_reply_val *rv, __u64 now)
{
	if (rk->proto != IPPROTO_TCP || !addr_eq(&held->client, &rv->client) ||
	    held->cport != rv->cport || !addr_eq(&held->vip, &rv->vip) || held->vport != rv->vport)
		return 0;
	struct ct_key fkey;
	ct_forward_key(&fkey, held, rk->proto);
	struct ct_val *f = ct.lookup(&fkey);
	return !f || !ct_pairs(f, rk, held) || ct_closing(f) || ct_expired(f, rk->proto, now);
}

static __always_inline int snat_claim(struct ct_key *rk, struct ct_reply_val *rv, __u64 now)
{
	if (!ct_reply.insert(rk, rv))
		return 0;
	struct ct_reply_val *held = ct_reply.lookup(rk);
	return held && snat_port_reusable(rk, held, rv, now) && !ct_reply.update(rk, rv) ? 0 : -1;
}

#define SNAT_TRIES 32

/* Claim a source-NAT port for rk (the reply key: backend -> node address): the
 * client's own port first, as MASQUERADE does, then random ones. -1 when every try
 * found the port held. */
static __always_inline int snat_reserve(struct ct_key *rk, struct ct_reply_val *rv, __u64 now)
{
	__u32 cport = bpf_ntohs(rv->cport);
	if (cport >= SNAT_PORT_MIN && cport <= SNAT_PORT_MAX) {
		rk->dport = rv->cport;
		if (!snat_claim(rk, rv, now))
			return 0;
	}
	for (int i = 0; i < SNAT_TRIES; i++) {
		rk->dport = bpf_htons(SNAT_PORT_MIN +
				      bpf_get_prandom_u32() % (SNAT_PORT_MAX - SNAT_PORT_MIN + 1));
		if (!ct_reply.insert(rk, rv))
			return 0;
	}
	return -1;
}

/* Where a source-NAT flow's reply goes back to: the client, from the listener. */
struct snat_back {
	struct addr client;
	struct addr vip;
	__be16 cport;
	__be16 vport;
	int found;  /* a source-NAT reply entry matched */
};

/* A backend's reply to a source-NAT flow, arriving on the backend side at the node's
 * address (p: backend -> node): its flow's forward entry and where the reply goes.
 * NULL, with t->found 0, when p is no such reply; NULL with t filled when its flow is
 * gone. */
static __always_inline struct ct_val *snat_reply_of(const struct pkt *p, __u64 now,
						    struct snat_back *t,
						    struct ct_reply_val **rvp)
{
	struct ct_key rk = {
		.src = p->src, .dst = p->dst, .sport = p->sport, .dport = p->dport,
		.proto = p->proto,
	};
	t->found = 0;
	struct ct_reply_val *rv = ct_reply.lookup(&rk);
	if (!rv || !(rv->flags & CT_SNAT))
		return NULL;
	t->found = 1;
	t->client = rv->client;
	t->vip = rv->vip;
	t->cport = rv->cport;
	t->vport = rv->vport;
	*rvp = rv;
	struct ct_key fkey;
	ct_forward_key(&fkey, rv, p->proto);
	struct ct_val *f = ct.lookup(&fkey);
	if (!f || !ct_pairs(f, &rk, rv) || ct_expired(f, p->proto, now))
		return NULL;
	return f;
}

/* Track and count a source-NAT reply; 0 to translate it (t filled), 1 when its flow is
 * gone (counted: pass untouched), -1 when it is no such reply. */
static __always_inline int snat_reply_flow(const struct pkt *p, __u64 now, __u64 bytes,
					   struct snat_back *t)
{
	struct ct_reply_val *rv;
	struct ct_val *f = snat_reply_of(p, now, t, &rv);
	if (!f) {
		if (!t->found)
			return -1;
		count(ST_REPLY_EXPIRED);
		return 1;
	}
	rv->last_ns = now;
	track(f, 1, p, now, bytes);
	count_flow(f->listener, f->backend, bytes, 0);
	count(ST_SNAT_REPLY);
	return 0;
}

static __always_inline int snat_reply(struct xdp_md *ctx, struct pkt *p, __u64 now,
				      __u64 bytes)
{
	struct snat_back t;
	int r = snat_reply_flow(p, now, bytes, &t);
	if (r)
		return r < 0 ? -1 : XDP_PASS;
	if (defer_to_tc(ctx, p, DEFER_REPLY))
		return XDP_PASS;
	struct frag_key k;
	if (p->frag) {
		k.src = p->src;
		k.dst = p->dst;
	}
	dnat(p, &t.client, t.cport);
	snat(p, &t.vip, t.vport);
	if (p->frag)
		frag_record(p, &k);
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
	if (addr_eq(&r->vip, &p->dst) && r->vport == p->dport)
		return 1;
	struct ct_key old = {
		.src = p->src, .dst = r->vip, .sport = p->sport, .dport = r->vport,
		.proto = p->proto,
	};
	struct ct_val *o = ct.lookup(&old);
	if (o && addr_eq(&o->nat_addr, &b->addr) && o->nat_port == b->port &&
	    !(o->flags & (CT_SNAT | CT_PAIRED)))
		ct.delete(&old);
	return 0;
}

/* The client's packet of a tracked flow: DNAT (and source NAT), or left to TC when
 * its checksum is partial. */
static __always_inline int forward(struct xdp_md *ctx, struct pkt *p, const struct ct_val *e)
{
	if (defer_to_tc(ctx, p, DEFER_FORWARD))
		return XDP_PASS;
	struct frag_key k;
	if (p->frag) {
		k.src = p->src;
		k.dst = p->dst;
	}
	if (e->flags & CT_SNAT)
		snat(p, &e->snat_addr, e->snat_port);
	dnat(p, &e->nat_addr, e->nat_port);
	if (p->frag)
		frag_record(p, &k);
	return XDP_PASS;
}

/* A packet on a live forward entry e. -1: the flow cannot go on as it is (its UDP
 * backend is gone, or its source-NAT port is another flow's): treat it as new. */
static __always_inline int established(struct xdp_md *ctx, struct pkt *p, struct ct_key *fkey,
				       struct ct_val *e, __u64 now, __u64 bytes)
{
	if (e->flags & (CT_SNAT | CT_PAIRED)) {
		/* The two entries of a flow live and die together: the reply entry must be
		 * there and name this flow, or the backend's answers would go elsewhere. */
		struct ct_key rk;
		reply_key_of(&rk, e, p);
		struct ct_reply_val *rv = ct_reply.lookup(&rk);
		if (rv && reply_names(rv, p)) {
			rv->last_ns = now;
		} else {
			/* Gone: made again, unless its port (or, without source NAT, the
			 * backend's end) is another flow's now, or the map is full: then this
			 * flow cannot go on from it. */
			__u32 zero = 0;
			struct scratch *sc = scratch.lookup(&zero);
			if (!sc)
				return -1;
			struct ct_reply_val *mine = &sc->reply;
			__builtin_memset(mine, 0, sizeof(*mine));
			mine->client = p->src;
			mine->vip = p->dst;
			mine->cport = p->sport;
			mine->vport = p->dport;
			mine->flags = e->flags & CT_SNAT;
			mine->created_s = now / SEC_NS;
			mine->last_ns = now;
			if (rv || ct_reply.insert(&rk, mine)) {
				ct.delete(fkey);
				count(ST_SNAT_PORT_LOST);
				return -1;
			}
		}
	}
	if (p->proto == IPPROTO_UDP) {
		/* A UDP flow whose backend left the plan or failed its checks moves to a live
		 * one (TCP flows drain where they are). */
		__u32 bid = e->backend;
		struct backend *b = backends.lookup(&bid);
		if (!b || !(b->flags & BF_LIVE) || !addr_eq(&b->addr, &e->nat_addr) ||
		    b->port != e->nat_port) {
			ct.delete(fkey);
			count(ST_UDP_MOVED);
			return -1;
		}
	}
	track(e, 0, p, now, bytes);
	count_flow(e->listener, e->backend, bytes, 0);
	count(ST_ESTABLISHED);
	return forward(ctx, p, e);
}

static __always_inline __u32 net_of(const struct addr *a)
{
	struct net_key k = { .prefixlen = 128, .addr = *a };
	__u32 *net = backend_nets.lookup(&k);
	return net ? *net : 0;
}

/* A packet that starts a flow, or (TCP without SYN) one whose entry is gone. */
static __always_inline int new_flow(struct xdp_md *ctx, struct pkt *p, struct ct_key *fkey,
				    __u64 now, __u64 bytes)
{
	struct listener_key lk = {
		.ifindex = ctx->ingress_ifindex, .addr = p->dst, .port = p->dport,
		.proto = p->proto,
	};
	struct listener_val *l = listeners.lookup(&lk);
	if (!l)
		return not_ours(p);
	/* A segment of a flow whose entry is gone (LRU eviction, a restart with a new
	 * layout, a flow rehashed here by upstream ECMP): the same table on every node
	 * picks the same backend again, so the flow lands where it was. */
	int syn = (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
	int lost = p->proto == IPPROTO_TCP && !syn;
	__u32 lid = l->id, gid = l->group, flags = l->flags, path = ST_NEW_DEFAULT;
	/* On an SNI listener only a SYN may take a route: a later segment without an
	 * entry is the acceptor's. */
	if ((flags & LF_SRC_ROUTES) && !(lost && (flags & LF_SNI))) {
		struct lpm_key rk = { .prefixlen = 32 + 128, .listener = bpf_htonl(lid),
				      .addr = p->src };
		__u32 *g = src_routes.lookup(&rk);
		if (g) {
			gid = *g;
			path = ST_NEW_SRC_ROUTE;
		}
	}
	if (path == ST_NEW_DEFAULT && (flags & LF_SNI)) {
		count(ST_SNI_PASS);
		return XDP_PASS;
	}

	struct group_val *g = groups.lookup(&gid);
	struct backend *b = NULL;
	__u32 bid = 0;
	if (g && g->size) {
		__u32 h = (flags & LF_CLIENT_IP)
			? client_hash(&p->src)
			: flow_hash(&p->src, &p->dst, bpf_ntohs(p->sport), bpf_ntohs(p->dport),
				    p->proto);
		__u32 slot = g->offset + h % g->size;
		__u32 elem = slot / POOL_IDS;
		struct pool_ids *ids = pool.lookup(&elem);
		if (ids) {
			bid = ids->id[slot & (POOL_IDS - 1)];
			b = backends.lookup(&bid);
		}
	}
	if (!b) {
		if (p->proto == IPPROTO_TCP && !lost) {
			count(ST_NO_BACKEND_RST);
			return send_rst(ctx, p);
		}
		count(ST_NO_BACKEND_DROP);
		return XDP_DROP;
	}

	/* The new entries are built in the per-CPU scratch: with both address families,
	 * they do not fit beside the rest on the 512-byte stack. */
	__u32 zero = 0;
	struct scratch *sc = scratch.lookup(&zero);
	if (!sc)
		return XDP_PASS;
	struct ct_val *v = &sc->fwd;
	__builtin_memset(v, 0, sizeof(*v));
	v->nat_addr = b->addr;
	v->nat_port = b->port;
	v->backend = bid;
	v->listener = lid;
	v->seq_end[0] = p->seq_end;
	v->created_s = now / SEC_NS;
	v->last_ns = now;
	v->packets[0] = 1;
	v->bytes[0] = bytes;
	if (lost)
		v->flags = ct_flags_of(v, 0, p);
	struct ct_key *rk = &sc->reply_key;
	__builtin_memset(rk, 0, sizeof(*rk));
	rk->src = b->addr;
	rk->dst = p->src;
	rk->sport = b->port;
	rk->dport = p->sport;
	rk->proto = p->proto;
	struct ct_reply_val *rv = &sc->reply;
	__builtin_memset(rv, 0, sizeof(*rv));
	rv->client = p->src;
	rv->vip = p->dst;
	rv->cport = p->sport;
	rv->vport = p->dport;
	rv->created_s = now / SEC_NS;
	rv->last_ns = now;
	/* Source NAT when the listener asks, and when the backend would answer the client
	 * directly: the client is the backend itself (hairpin), or on its network. */
	if ((flags & LF_SNAT) || addr_eq(&b->addr, &p->src) ||
	    ((flags & LF_HAIRPIN) && b->net && net_of(&p->src) == b->net)) {
		/* A source-NAT flow is created by its first packet only: a lost one gets a
		 * new port the backend does not know, so it is refused at once. */
		if (lost)
			return refuse(ctx, p, ST_SNAT_NO_FLOW);
		if (addr_is_zero(&b->snat_src)) {
			count(ST_SNAT_NO_SOURCE);
			return XDP_DROP;
		}
		rk->dst = b->snat_src;
		rv->flags = CT_SNAT;
		if (snat_reserve(rk, rv, now)) {
			count(ST_SNAT_EXHAUSTED);
			return XDP_DROP;
		}
		v->flags |= CT_SNAT;
		v->snat_addr = rk->dst;
		v->snat_port = rk->dport;
	} else if (!rev_nat_covers(b, p)) {
		if (ct_reply.update(rk, rv)) {
			count(ST_CT_FULL);
			return XDP_DROP;
		}
		v->flags |= CT_PAIRED;
	}
	if (ct.update(fkey, v)) {
		if (v->flags & (CT_SNAT | CT_PAIRED))
			ct_reply.delete(rk);
		count(ST_CT_FULL);
		return XDP_DROP;
	}
	count_flow(lid, bid, bytes, !lost);
	count(lost ? ST_RESELECTED : path);
	return forward(ctx, p, v);
}

/* --- ICMP ------------------------------------------------------------------------------ */

/* The forward key of the flow an ICMP error is about, when the quoted packet is one the
 * LB sent toward a client (listener -> client): its ends swapped. */
static __always_inline void quoted_forward(struct ct_key *k, const struct icmp_err *e)
{
	k->src = e->in_dst;
	k->dst = e->in_src;
	k->sport = e->in_ports[1];
	k->dport = e->in_ports[0];
	k->proto = e->in_proto;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
}

/* The reply key of the flow an ICMP error is about, when the quoted packet is one the
 * LB sent toward a backend (client or node -> backend): its ends swapped. */
static __always_inline void quoted_reply(struct ct_key *k, const struct icmp_err *e)
{
	quoted_forward(k, e);
}

/* An error about a packet a source-NAT flow sent to its backend (the quote runs node
 * address -> backend), arriving at the node: make it about the client's packet to the
 * listener, and send it to the client. 0: translated; -1: not about such a flow. */
static __always_inline int icmp_snat_forward(struct pkt *p, struct icmp_err *e)
{
	struct ct_key rk;
	quoted_reply(&rk, e);
	struct ct_reply_val *rv = ct_reply.lookup(&rk);
	if (!rv || !(rv->flags & CT_SNAT))
		return -1;
	struct ct_key fkey;
	ct_forward_key(&fkey, rv, e->in_proto);
	struct ct_val *v = ct.lookup(&fkey);
	if (!v || !ct_pairs(v, &rk, rv) || ct_expired(v, e->in_proto, bpf_ktime_get_coarse_ns()))
		return -1;
	icmp_rewrite_quote(e, 0, &rv->client, rv->cport);
	icmp_rewrite_quote(e, 1, &rv->vip, rv->vport);
	if (addr_eq(&p->dst, &rk.dst))  /* to the node's address */
		icmp_outer_rewrite(p, e, 0, &rv->client);
	return 0;
}

/* An error about a reply the LB sent for a flow (the quote runs listener -> client):
 * make it about the backend's packet, and send it to the backend. 0: translated. */
static __always_inline int icmp_translate_in(struct pkt *p, void *data_end)
{
	struct icmp_err e;
	if (parse_icmp_error(data_end, p, &e))
		return -1;
	struct ct_key key;
	quoted_forward(&key, &e);
	struct ct_val *v = ct.lookup(&key);
	if (!v)
		return icmp_snat_forward(p, &e);
	if (ct_expired(v, e.in_proto, bpf_ktime_get_coarse_ns()))
		return -1;
	/* v is a map value: no packet helper runs here to invalidate it. */
	icmp_rewrite_quote(&e, 0, &v->nat_addr, v->nat_port);
	if (v->flags & CT_SNAT)  /* the backend's packet went to the node's address */
		icmp_rewrite_quote(&e, 1, &v->snat_addr, v->snat_port);
	if (addr_eq(&p->dst, &key.dst))
		icmp_outer_rewrite(p, &e, 0, &v->nat_addr);
	return 0;
}

static __always_inline int icmp_ingress(struct xdp_md *ctx, struct pkt *p, void *data_end)
{
	if (!icmp_translate_in(p, data_end)) {
		count(ST_ICMP_IN);
		return XDP_PASS;
	}
	__u8 *icmp = p->l4;
	if ((void *)(icmp + ICMP_HDR_LEN) > data_end) {
		count(ST_MALFORMED);
		return XDP_PASS;
	}
	/* Neighbour discovery is never touched, whatever its address. */
	if (p->family == 6 && icmp[ICMP_TYPE_OFF] >= ICMP6_ND_FIRST &&
	    icmp[ICMP_TYPE_OFF] <= ICMP6_ND_LAST) {
		count(ST_NOMATCH);
		return XDP_PASS;
	}
	if (is_vip(&p->dst)) {
		int r = vip_ping(ctx, p);
		if (r >= 0)
			return r;
		count(ST_VIP_CLOSED);
		return XDP_DROP;
	}
	count(ST_NOMATCH);
	return XDP_PASS;
}

/* A later fragment (no ports): translated as its first fragment was, if it was. One to
 * a VIP whose first fragment was not seen (reordered, or lost) has nowhere to go. */
static __always_inline int later_fragment(struct pkt *p)
{
	struct frag_val *f = frag_of(p);
	if (!f) {
		if (is_vip(&p->dst)) {
			count(ST_FRAG_MISSED);
			return XDP_DROP;
		}
		count(ST_NOMATCH);
		return XDP_PASS;
	}
	struct addr src = f->src, dst = f->dst;
	if (!addr_eq(&p->src, &src))
		l3_rewrite(p, 1, &src);
	if (!addr_eq(&p->dst, &dst))
		l3_rewrite(p, 0, &dst);
	count(ST_FRAGMENT);
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
		return later_fragment(&p);
	case P_ICMP:
		return icmp_ingress(ctx, &p, data_end);
	case P_UNPARSED:
		count(ST_UNPARSED);
		return XDP_PASS;
	default:
		return not_ours(&p);
	}

	__u32 dport = bpf_ntohs(p.dport);
	__u32 *mask = port_filter.lookup(&dport);
	if (!mask || !(*mask & (PF_LISTENER(p.proto) | PF_SNAT(p.proto))))
		return not_ours(&p);

	/* Idle timeouts are seconds: the tick-resolution clock is enough and cheaper. */
	__u64 now = bpf_ktime_get_coarse_ns();
	__u64 bytes = bpf_xdp_get_buff_len(ctx);  /* all buffers of a multi-buffer frame */
	if (*mask & PF_SNAT(p.proto)) {
		int r = snat_reply(ctx, &p, now, bytes);
		if (r >= 0)
			return r;
		if (!(*mask & PF_LISTENER(p.proto)))
			return not_ours(&p);
	}
	int syn = (p.tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
	struct ct_key fkey = {
		.src = p.src, .dst = p.dst, .sport = p.sport, .dport = p.dport, .proto = p.proto,
	};
	struct ct_val *e = ct.lookup(&fkey);
	/* A SYN on a closed flow's entry starts a new flow (port reuse). */
	if (e && !ct_expired(e, p.proto, now) && !(syn && ct_closing(e))) {
		int r = established(ctx, &p, &fkey, e, now, bytes);
		if (r >= 0)
			return r;
	}
	return new_flow(ctx, &p, &fkey, now, bytes);
}

/* --- TC: the skb path --------------------------------------------------------------- */

/* An skb's headers, pulled into the linear part when they are not all there
 * (GSO, paged skbs). An ICMP error's quote is pulled too: it is read and edited in
 * place. After P_ICMP, skb->data_end bounds p. */
static __always_inline int parse_skb(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int r = parse(data, data_end, p);
	if (r == P_MALFORMED && skb->len > data_end - data) {
		/* Enough for the usual headers; IPv6 extension headers may need more. */
		__u32 want = skb->len < 128 ? skb->len : 128;
		if (bpf_skb_pull_data(skb, want))
			return P_MALFORMED;
		r = parse((void *)(long)skb->data, (void *)(long)skb->data_end, p);
		if (r == P_MALFORMED && skb->len > want) {
			want = skb->len < MAX_L4_OFF + 64 ? skb->len : MAX_L4_OFF + 64;
			if (bpf_skb_pull_data(skb, want))
				return P_MALFORMED;
			r = parse((void *)(long)skb->data, (void *)(long)skb->data_end, p);
		}
	}
	if (r == P_ICMP) {
		if (bpf_skb_pull_data(skb, skb->len < 192 ? skb->len : 192))
			return P_MALFORMED;
		r = parse((void *)(long)skb->data, (void *)(long)skb->data_end, p);
	}
	return r;
}

static __always_inline __u32 l4_csum_off(const struct pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
}

/* The frame offset of an skb's source (src = 1) or destination address. */
static __always_inline __u32 skb_addr_off(const struct pkt *p, int src)
{
	if (p->family == 4)
		return p->l3_off + (src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	return p->l3_off + (src ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));
}

/* An skb's address only (src = 1: its source) := a, and the IPv4 header checksum. */
static __always_inline void skb_l3_rewrite(struct __sk_buff *skb, const struct pkt *p, int src,
					   const struct addr *a)
{
	struct addr new = *a;
	if (p->family == 4) {
		__be32 old = src ? p->src.w[3] : p->dst.w[3];
		bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), old, new.w[3],
				    sizeof(__be32));
		bpf_skb_store_bytes(skb, skb_addr_off(p, src), &new.w[3], sizeof(__be32), 0);
	} else {
		bpf_skb_store_bytes(skb, skb_addr_off(p, src), &new, sizeof(new), 0);
	}
}

/* An skb's source (src = 1) or destination := a:port, checksums kept valid whether
 * the L4 one is complete or offloaded. The helpers invalidate packet pointers: p's
 * copies of the addresses and ports are what it reads. */
static __always_inline void skb_nat(struct __sk_buff *skb, const struct pkt *p, int src,
				    const struct addr *a, __be16 port)
{
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u32 csum_off = l4_csum_off(p);
	__be16 old_port = src ? p->sport : p->dport;
	struct addr new = *a;
	if (p->family == 4) {
		__be32 old = src ? p->src.w[3] : p->dst.w[3];
		bpf_l4_csum_replace(skb, csum_off, old, new.w[3],
				    BPF_F_PSEUDO_HDR | mangled | sizeof(__be32));
	} else {
		struct addr old = src ? p->src : p->dst;
		__s64 diff = bpf_csum_diff(old.w, sizeof(old), new.w, sizeof(new), 0);
		bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled);
	}
	skb_l3_rewrite(skb, p, src, &new);
	bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | sizeof(port));
	bpf_skb_store_bytes(skb, p->l4_off + (src ? L4_SPORT_OFF : L4_DPORT_OFF), &port,
			    sizeof(port), 0);
}

/* A later fragment's addresses := what its first fragment's became. */
static __always_inline void skb_later_fragment(struct __sk_buff *skb, const struct pkt *p)
{
	struct frag_val *f = frag_of(p);
	if (!f)
		return;
	struct addr src = f->src, dst = f->dst;
	if (!addr_eq(&p->src, &src))
		skb_l3_rewrite(skb, p, 1, &src);
	if (!addr_eq(&p->dst, &dst))
		skb_l3_rewrite(skb, p, 0, &dst);
	count(ST_FRAGMENT);
}

/* The live forward entry of the flow client:cport -> vip:vport, if it goes to
 * backend:bport without source NAT. */
static __always_inline struct ct_val *forward_of(const struct addr *client, __be16 cport,
						 const struct addr *vip, __be16 vport,
						 const struct addr *backend, __be16 bport,
						 __u8 proto, __u64 now)
{
	struct ct_key fkey = {
		.src = *client, .dst = *vip, .sport = cport, .dport = vport, .proto = proto,
	};
	struct ct_val *e = ct.lookup(&fkey);
	if (!e || !addr_eq(&e->nat_addr, backend) || e->nat_port != bport ||
	    (e->flags & CT_SNAT) || ct_expired(e, proto, now))
		return NULL;
	return e;
}

enum reply_found { RF_FLOW, RF_NONE, RF_GONE };

/* A backend's reply (rk: backend -> client) and the flow it belongs to. */
struct reply {
	struct ct_val *e;          /* RF_FLOW: the flow's forward entry */
	struct ct_reply_val *rv;   /* its reply entry (NULL: found through rev_nat) */
	struct addr vip;           /* RF_FLOW: the listener address the client knows */
	__be16 vport;
};

/* Through rev_nat (the backend's one listener address), else through the flow's reply
 * entry. RF_FLOW: a live flow; RF_NONE: no flow of the load balancer's (a connection
 * made to the backend itself, say: never touched); RF_GONE: a reply entry whose flow
 * is gone. */
static __always_inline int reply_lookup(struct ct_key *rk, __u64 now, struct reply *r)
{
	struct rev_nat_key bk = { .addr = rk->src, .port = rk->sport, .proto = rk->proto };
	struct rev_nat_val *rn = rev_nat.lookup(&bk);
	r->rv = NULL;
	if (rn) {
		r->vip = rn->vip;
		r->vport = rn->vport;
		r->e = forward_of(&rk->dst, rk->dport, &rn->vip, rn->vport, &rk->src, rk->sport,
				  rk->proto, now);
		if (r->e && !(r->e->flags & CT_PAIRED))
			return RF_FLOW;
	}
	struct ct_reply_val *rv = ct_reply.lookup(rk);
	if (!rv || (rv->flags & CT_SNAT))
		return RF_NONE;
	r->rv = rv;
	r->vip = rv->vip;
	r->vport = rv->vport;
	r->e = forward_of(&rv->client, rv->cport, &rv->vip, rv->vport, &rk->src, rk->sport,
			  rk->proto, now);
	return r->e && (r->e->flags & CT_PAIRED) ? RF_FLOW : RF_GONE;
}

/* An error about a packet the LB forwarded to a backend (the quote runs client
 * -> backend): make it about the packet the client sent, from the listener. */
static __always_inline int icmp_egress(struct pkt *p, void *data_end)
{
	struct icmp_err e;
	if (parse_icmp_error(data_end, p, &e))
		return TC_ACT_OK;
	struct ct_key rk;
	quoted_reply(&rk, &e);
	struct reply rp;
	if (reply_lookup(&rk, bpf_ktime_get_coarse_ns(), &rp) != RF_FLOW)
		return TC_ACT_OK;
	struct addr vip = rp.vip;
	icmp_rewrite_quote(&e, 1, &vip, rp.vport);
	if (addr_eq(&p->src, &rk.src))  /* the backend itself reports it */
		icmp_outer_rewrite(p, &e, 1, &vip);
	count(ST_ICMP_OUT);
	return TC_ACT_OK;
}

int xdplb_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int r = parse_skb(skb, &p);
	if (r == P_ICMP)
		return icmp_egress(&p, (void *)(long)skb->data_end);
	if (r == P_FRAGMENT)
		skb_later_fragment(skb, &p);
	if (r != P_OK)
		return TC_ACT_OK;

	__u64 now = bpf_ktime_get_coarse_ns();
	struct ct_key rk = {
		.src = p.src, .dst = p.dst, .sport = p.sport, .dport = p.dport, .proto = p.proto,
	};
	struct reply rp;
	switch (reply_lookup(&rk, now, &rp)) {
	case RF_NONE:
		return TC_ACT_OK;
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
			.src = rk.dst, .dst = rp.vip, .sport = p.dport, .dport = rp.vport,
			.proto = p.proto,
		};
		ct.delete(&fkey);
		return TC_ACT_OK;
	}
	if (rp.rv)
		rp.rv->last_ns = now;
	track(e, 1, &p, now, skb->len);
	count_flow(e->listener, e->backend, skb->len, 0);
	count(ST_REPLY_NAT);
	struct addr vip = rp.vip;
	skb_nat(skb, &p, 1, &vip, rp.vport);
	if (p.frag) {
		struct frag_key k = { .src = p.src, .dst = p.dst, .id = p.frag_id, .proto = p.proto };
		struct frag_val v = { .src = vip, .dst = p.dst };
		frags.update(&k, &v);
	}
	return TC_ACT_OK;
}

/* The translation of a source-NAT reply, on the skb. */
static __always_inline void skb_snat_reply(struct __sk_buff *skb, struct pkt *p,
					   const struct snat_back *t)
{
	/* skb_nat reads p's copies only (the helpers invalidate packet pointers). */
	skb_nat(skb, p, 0, &t->client, t->cport);
	skb_nat(skb, p, 1, &t->vip, t->vport);
	if (p->frag) {
		struct frag_key k = { .src = p->src, .dst = p->dst, .id = p->frag_id,
				      .proto = p->proto };
		struct frag_val v = { .src = t->vip, .dst = t->client };
		frags.update(&k, &v);
	}
}

/* TC ingress on every interface the agent attaches to: the rewrites XDP left to it (a
 * partial checksum, which only the skb path can update right), and, on interfaces
 * toward backends that run no XDP, the replies of source-NAT flows (there the backends
 * keep their segmentation and checksum offloads, which XDP on a veth turns off, and
 * no frame is copied for XDP). */
int xdplb_tc_in(struct __sk_buff *skb)
{
	struct defer_meta *m = (void *)(long)skb->data_meta;
	__u32 deferred = 0;
	if ((void *)(m + 1) <= (void *)(long)skb->data && m->magic == DEFER_MAGIC)
		deferred = m->kind;
	if (deferred == DEFER_ANSWER)  /* made by XDP (send_back) */
		return bpf_redirect(skb->ifindex, 0);
	struct pkt p = {};
	int r = parse_skb(skb, &p);
	__u64 now = bpf_ktime_get_coarse_ns();
	if (r == P_ICMP) {
		if (!icmp_translate_in(&p, (void *)(long)skb->data_end))
			count(ST_ICMP_IN);
		return TC_ACT_OK;
	}
	if (r == P_FRAGMENT)
		skb_later_fragment(skb, &p);
	if (r != P_OK)
		return TC_ACT_OK;
	struct snat_back t;
	if (deferred == DEFER_FORWARD) {
		struct ct_key fkey = {
			.src = p.src, .dst = p.dst, .sport = p.sport, .dport = p.dport,
			.proto = p.proto,
		};
		struct ct_val *e = ct.lookup(&fkey);
		if (!e)
			return TC_ACT_OK;
		struct addr nat_addr = e->nat_addr, snat_addr = e->snat_addr;
		__be16 nat_port = e->nat_port, snat_port = e->snat_port;
		int snatted = e->flags & CT_SNAT;
		skb_nat(skb, &p, 0, &nat_addr, nat_port);
		if (snatted)
			skb_nat(skb, &p, 1, &snat_addr, snat_port);
		return TC_ACT_OK;
	}
	if (deferred == DEFER_REPLY) {
		struct ct_reply_val *rv;
		if (snat_reply_of(&p, now, &t, &rv))
			skb_snat_reply(skb, &p, &t);
		return TC_ACT_OK;
	}
	__u32 dport = bpf_ntohs(p.dport);
	__u32 *mask = port_filter.lookup(&dport);
	if (!mask || !(*mask & PF_SNAT(p.proto)))
		return TC_ACT_OK;
	if (!snat_reply_flow(&p, now, skb->len, &t))
		skb_snat_reply(skb, &p, &t);
	return TC_ACT_OK;
}
