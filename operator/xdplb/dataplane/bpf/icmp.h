/* ICMP errors about a translated flow (destination unreachable, including
 * fragmentation needed, and time exceeded) quote the packet that caused them.
 * Translating the quote like the flow itself lets path MTU discovery and
 * errors reach the right socket on either side of the LB.
 * Checksums: every edit is compensated in the checksum that covers it, so the
 * sum over the whole packet never changes (an skb's CHECKSUM_COMPLETE stays
 * valid). */
#ifndef XDPLB_ICMP_H
#define XDPLB_ICMP_H

#define ICMP_TYPE_OFF offsetof(struct icmphdr, type)
#define ICMP_CSUM_OFF offsetof(struct icmphdr, checksum)
/* RFC 792: an error quotes at least 8 bytes past the quoted IP header, which hold
 * both ports (and a UDP checksum). */
#define QUOTE_L4_MIN  8

struct icmp_err {
	__u16 *icmp_csum;
	struct iphdr *in_ip;   /* the quoted header */
	__be16 *in_ports;      /* [0] source, [1] destination */
	__u16 *in_l4_csum;     /* NULL when the quote is too short to hold it */
	__u8 in_proto;
};

/* 0 when p (P_ICMP) is an error quoting a TCP or UDP header with its ports. */
static __always_inline int parse_icmp_error(void *data_end, struct pkt *p, struct icmp_err *e)
{
	__u8 *icmp = p->l4;
	if ((void *)(icmp + sizeof(struct icmphdr)) > data_end)
		return -1;
	if (icmp[ICMP_TYPE_OFF] != ICMP_DEST_UNREACH && icmp[ICMP_TYPE_OFF] != ICMP_TIME_EXCEEDED)
		return -1;
	struct iphdr *in = (void *)(icmp + sizeof(struct icmphdr));
	if ((void *)(in + 1) > data_end)
		return -1;
	__u32 ihl = in->ihl * 4;
	if (in->version != 4 || ihl < sizeof(*in))
		return -1;
	if (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP)
		return -1;
	if (in->frag_off & bpf_htons(IP_OFFSET))  /* a later fragment quotes no ports */
		return -1;
	__u8 *l4 = (void *)in + (ihl & 0x3c);
	if ((void *)(l4 + QUOTE_L4_MIN) > data_end)
		return -1;
	e->icmp_csum = (__u16 *)(icmp + ICMP_CSUM_OFF);
	e->in_ip = in;
	e->in_ports = (__be16 *)l4;
	e->in_proto = in->protocol;
	e->in_l4_csum = NULL;
	if (in->protocol == IPPROTO_UDP)
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
 * 1 destination), fixing the quoted IP and L4 checksums and the ICMP one. */
static __always_inline void icmp_rewrite_quote(struct icmp_err *e, int which, __be32 addr,
					       __be16 port)
{
	__be32 *a = which ? &e->in_ip->daddr : &e->in_ip->saddr;
	__be16 *pt = &e->in_ports[which ? 1 : 0];
	__be32 old_addr = *a;
	__be16 old_port = *pt;
	__u16 ip_check = e->in_ip->check;
	csum_replace4(&ip_check, old_addr, addr);
	icmp_replace2(e->icmp_csum, &e->in_ip->check, ip_check);
	if (e->in_l4_csum) {
		__u16 l4 = *e->in_l4_csum;
		if (e->in_proto == IPPROTO_TCP) {
			csum_replace4(&l4, old_addr, addr);
			csum_replace2(&l4, old_port, port);
		} else {
			udp_csum_replace4(&l4, old_addr, addr);
			udp_csum_replace2(&l4, old_port, port);
		}
		icmp_replace2(e->icmp_csum, e->in_l4_csum, l4);
	}
	icmp_replace4(e->icmp_csum, a, addr);
	icmp_replace2(e->icmp_csum, pt, port);
}

#endif
