/* ICMP and ICMPv6 errors about a translated flow (destination unreachable, packet too
 * big and fragmentation needed, time exceeded) quote the packet that caused them.
 * Translating the quote like the flow itself lets path MTU discovery and errors reach
 * the right socket on either side of the LB.
 * Checksums: every edit inside the message is compensated in the checksum that covers
 * it, so the sum over the ICMP message never changes; an ICMPv6 checksum also covers
 * the outer addresses (its pseudo-header), so rewriting those updates it too. */
#ifndef XDPLB_ICMP_H
#define XDPLB_ICMP_H

#define ICMP_TYPE_OFF offsetof(struct icmphdr, type)
#define ICMP_CSUM_OFF offsetof(struct icmphdr, checksum)
/* Both ICMP headers are 8 bytes: type, code, checksum, 4 more. */
#define ICMP_HDR_LEN  8
/* RFC 792, RFC 4443: an error quotes at least 8 bytes past the quoted IP header,
 * which hold both ports (and a UDP checksum). */
#define QUOTE_L4_MIN  8

/* ICMPv6 types (RFC 4443, RFC 4861): the errors translated, echo, and neighbour
 * discovery, which is never touched. */
#define ICMP6_DEST_UNREACH 1
#define ICMP6_PKT_TOOBIG   2
#define ICMP6_TIME_EXCEED  3
#define ICMP6_ECHO_REQUEST 128
#define ICMP6_ECHO_REPLY   129
#define ICMP6_ND_FIRST     133  /* router solicitation .. redirect (137) */
#define ICMP6_ND_LAST      137

struct icmp_err {
	__u16 *icmp_csum;
	void *in_l3;          /* the quoted header: struct iphdr or struct ipv6hdr */
	__be16 *in_ports;     /* [0] source, [1] destination */
	__u16 *in_l4_csum;    /* NULL when the quote is too short to hold it */
	struct addr in_src;   /* the quoted addresses */
	struct addr in_dst;
	__u8 in_proto;
	__u8 family;          /* the outer packet's, and the quote's */
};

static __always_inline int icmp_is_error(const struct pkt *p, __u8 type)
{
	if (p->family == 4)
		return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED;
	return type == ICMP6_DEST_UNREACH || type == ICMP6_PKT_TOOBIG || type == ICMP6_TIME_EXCEED;
}

/* 0 when p (P_ICMP) is an error quoting a TCP or UDP header with its ports (an IPv6
 * quote with extension headers is not translated). */
static __always_inline int parse_icmp_error(void *data_end, struct pkt *p, struct icmp_err *e)
{
	__u8 *icmp = p->l4;
	if ((void *)(icmp + ICMP_HDR_LEN) > data_end)
		return -1;
	if (!icmp_is_error(p, icmp[ICMP_TYPE_OFF]))
		return -1;
	__u8 *l4;
	if (p->family == 4) {
		struct iphdr *in = (void *)(icmp + ICMP_HDR_LEN);
		if ((void *)(in + 1) > data_end)
			return -1;
		__u32 ihl = in->ihl * 4;
		if (in->version != 4 || ihl < sizeof(*in))
			return -1;
		if (in->frag_off & bpf_htons(IP_OFFSET))  /* a later fragment quotes no ports */
			return -1;
		e->in_proto = in->protocol;
		addr_set_v4(&e->in_src, in->saddr);
		addr_set_v4(&e->in_dst, in->daddr);
		l4 = (void *)in + (ihl & 0x3c);
	} else {
		struct ipv6hdr *in = (void *)(icmp + ICMP_HDR_LEN);
		if ((void *)(in + 1) > data_end)
			return -1;
		if (in->version != 6)
			return -1;
		e->in_proto = in->nexthdr;
		__builtin_memcpy(&e->in_src, &in->saddr, sizeof(e->in_src));
		__builtin_memcpy(&e->in_dst, &in->daddr, sizeof(e->in_dst));
		l4 = (void *)(in + 1);
	}
	if (e->in_proto != IPPROTO_TCP && e->in_proto != IPPROTO_UDP)
		return -1;
	if ((void *)(l4 + QUOTE_L4_MIN) > data_end)
		return -1;
	e->family = p->family;
	e->icmp_csum = (__u16 *)(icmp + ICMP_CSUM_OFF);
	e->in_l3 = (void *)(icmp + ICMP_HDR_LEN);
	e->in_ports = (__be16 *)l4;
	e->in_l4_csum = NULL;
	if (e->in_proto == IPPROTO_UDP)
		e->in_l4_csum = (__u16 *)(l4 + UDP_CSUM_OFF);
	else if ((void *)(l4 + (TCP_CSUM_OFF + sizeof(__u16))) <= data_end)
		e->in_l4_csum = (__u16 *)(l4 + TCP_CSUM_OFF);
	return 0;
}

/* Replace a 4-byte field inside the ICMP message, and its checksum cover. */
static __always_inline void icmp_replace4(__u16 *icmp_csum, __u32 *field, __u32 to)
{
	csum_replace4(icmp_csum, *field, to);
	*field = to;
}

static __always_inline void icmp_replace2(__u16 *icmp_csum, __u16 *field, __u16 to)
{
	csum_replace2(icmp_csum, *field, to);
	*field = to;
}

/* Rewrite one address and one port of the quoted header (which = 0 source,
 * 1 destination), fixing the quoted IP (IPv4) and L4 checksums and the ICMP one. */
static __always_inline void icmp_rewrite_quote(struct icmp_err *e, int which,
					       const struct addr *a, __be16 port)
{
	__be16 *pt = &e->in_ports[which ? 1 : 0];
	__be16 old_port = *pt;
	struct addr *old = which ? &e->in_dst : &e->in_src;
	if (e->in_l4_csum) {
		__u16 l4 = *e->in_l4_csum;
		int udp = e->in_proto == IPPROTO_UDP;
		if (e->family == 4) {
			if (udp)
				udp_csum_replace4(&l4, old->w[3], a->w[3]);
			else
				csum_replace4(&l4, old->w[3], a->w[3]);
		} else if (udp) {
			udp_csum_replace16(&l4, old->w, a->w);
		} else {
			csum_replace16(&l4, old->w, a->w);
		}
		if (udp)
			udp_csum_replace2(&l4, old_port, port);
		else
			csum_replace2(&l4, old_port, port);
		icmp_replace2(e->icmp_csum, e->in_l4_csum, l4);
	}
	if (e->family == 4) {
		struct iphdr *in = e->in_l3;
		__be32 *f = which ? &in->daddr : &in->saddr;
		__u16 ip_check = in->check;
		csum_replace4(&ip_check, *f, a->w[3]);
		icmp_replace2(e->icmp_csum, &in->check, ip_check);
		icmp_replace4(e->icmp_csum, f, a->w[3]);
	} else {
		struct ipv6hdr *in = e->in_l3;
		__be32 *f = which ? (__be32 *)&in->daddr : (__be32 *)&in->saddr;
#pragma unroll
		for (int i = 0; i < 4; i++)
			icmp_replace4(e->icmp_csum, &f[i], a->w[i]);
	}
	*old = *a;
	icmp_replace2(e->icmp_csum, pt, port);
}

#endif
