/* xdplb data path.
 *   ingress (XDP): parse -> conntrack hit? DNAT : listener -> source route |
 *                  SNI path | default group -> Maglev slot -> conntrack -> DNAT
 *   egress  (TC):  a backend's reply -> restore the listener address as source
 * Rewritten packets are passed on (XDP_PASS) so the kernel routes them. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
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

static __always_inline void count_listener(__u32 id, __u64 bytes, int new_flow)
{
	struct flow_stats *s = listener_stats.lookup(&id);
	add_flow_stats(s, bytes, new_flow);
}

static __always_inline void count_backend(__u32 id, __u64 bytes, int new_flow)
{
	struct flow_stats *s = backend_stats.lookup(&id);
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
	__be16 *ports = p->l4;
	rewrite(p, &p->ip->daddr, &ports[1], addr, port);
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
	((__u8 *)tcp)[12] = 5 << 4;            /* data offset 5, no options */
	((__u8 *)tcp)[13] = TCPF_RST | TCPF_ACK;
	tcp->window = 0;
	tcp->urg_ptr = 0;
	tcp->check = 0;
	__u32 s = (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) +
		  (ip->daddr >> 16) + bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(*tcp));
	__u16 *w = (__u16 *)tcp;
#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	tcp->check = ~csum_fold(s);

	int excess = (int)(data_end - data) - (int)(p->l4_off + sizeof(*tcp));
	if (excess > 0 && bpf_xdp_adjust_tail(ctx, -excess))
		return XDP_DROP;
	return XDP_TX;
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
	default:
		count(ST_NOMATCH);
		return XDP_PASS;
	}

	__u32 dport = bpf_ntohs(p.dport);
	__u32 *mask = port_filter.lookup(&dport);
	if (!mask || !(*mask & (1u << (p.proto & 31)))) {
		count(ST_NOMATCH);
		return XDP_PASS;
	}

	__u64 now = bpf_ktime_get_ns();
	__u64 bytes = data_end - data;
	int syn = (p.tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
	struct ct_key key = {
		.src = p.ip->saddr, .dst = p.ip->daddr, .sport = p.sport, .dport = p.dport,
		.proto = p.proto, .dir = 0,
	};
	struct ct_val *e = ct.lookup(&key);
	/* A SYN on a closed flow's entry starts a new flow (port reuse). */
	if (e && !ct_expired(e, p.proto, now) && !(syn && ct_closing(e))) {
		ct_track(e, 0, p.tcp_flags, now, bytes);
		count_listener(e->listener, bytes, 0);
		count_backend(e->backend, bytes, 0);
		count(ST_ESTABLISHED);
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
	if (p.proto == IPPROTO_TCP && !syn) {
		count(ST_UNTRACKED);
		return XDP_PASS;
	}

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
		if (p.proto == IPPROTO_TCP) {
			count(ST_NO_BACKEND_RST);
			return send_rst(ctx, &p);
		}
		count(ST_NO_BACKEND_DROP);
		return XDP_DROP;
	}

	struct ct_val v = {
		.nat_addr = b->addr, .nat_port = b->port, .backend = b->id, .listener = lid,
		.created_ns = now, .last_ns = now, .packets = {1, 0}, .bytes = {bytes, 0},
	};
	struct ct_key rkey = {
		.src = b->addr, .dst = p.ip->saddr, .sport = b->port, .dport = p.sport,
		.proto = p.proto, .dir = 1,
	};
	struct ct_val rv = {
		.nat_addr = p.ip->daddr, .nat_port = p.dport, .backend = b->id, .listener = lid,
		.created_ns = now, .last_ns = now,
	};
	if (ct.update(&key, &v)) {
		count(ST_CT_FULL);
		return XDP_DROP;
	}
	if (ct.update(&rkey, &rv)) {
		ct.delete(&key);
		count(ST_CT_FULL);
		return XDP_DROP;
	}
	count_listener(lid, bytes, 1);
	count_backend(b->id, bytes, 1);
	count(path);
	dnat(&p, v.nat_addr, v.nat_port);
	return XDP_PASS;
}

int xdplb_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct pkt p = {};
	int r = parse(data, data_end, &p);
	if (r == P_MALFORMED && skb->len > data_end - data) {
		/* Headers not in the linear part (GSO, paged skbs): pull and retry. */
		if (bpf_skb_pull_data(skb, skb->len < 128 ? skb->len : 128))
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		r = parse(data, data_end, &p);
	}
	if (r != P_OK)
		return TC_ACT_OK;

	struct ct_key rkey = {
		.src = p.ip->saddr, .dst = p.ip->daddr, .sport = p.sport, .dport = p.dport,
		.proto = p.proto, .dir = 1,
	};
	struct ct_val *rv = ct.lookup(&rkey);
	if (!rv)
		return TC_ACT_OK;
	struct ct_key fkey = {
		.src = p.ip->daddr, .dst = rv->nat_addr, .sport = p.dport, .dport = rv->nat_port,
		.proto = p.proto, .dir = 0,
	};
	__be32 new_addr = rv->nat_addr;
	__be16 new_port = rv->nat_port;
	struct ct_val *e = ct.lookup(&fkey);
	__u64 now = bpf_ktime_get_ns();
	if (!e || e->nat_addr != p.ip->saddr || e->nat_port != p.sport ||
	    ct_expired(e, p.proto, now)) {
		count(ST_REPLY_EXPIRED);
		return TC_ACT_OK;
	}
	ct_track(e, 1, p.tcp_flags, now, skb->len);
	count_listener(e->listener, skb->len, 0);
	count_backend(e->backend, skb->len, 0);

	__be32 old_addr = p.ip->saddr;
	__be16 old_port = p.sport;
	__u32 csum_off = p.l4_off + (p.proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							   : offsetof(struct udphdr, check));
	__u64 mangled = p.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
			    BPF_F_PSEUDO_HDR | mangled | sizeof(new_addr));
	bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(new_port));
	bpf_l3_csum_replace(skb, p.ip_off + offsetof(struct iphdr, check), old_addr, new_addr,
			    sizeof(new_addr));
	bpf_skb_store_bytes(skb, p.ip_off + offsetof(struct iphdr, saddr), &new_addr,
			    sizeof(new_addr), 0);
	bpf_skb_store_bytes(skb, p.l4_off, &new_port, sizeof(new_port), 0);
	count(ST_REPLY_NAT);
	return TC_ACT_OK;
}
