/* Header parsing shared by XDP and TC: Ethernet with at most one 802.1Q/802.1ad
 * tag; IPv4 honouring IHL, or IPv6 through at most MAX_EXT_HDRS extension headers;
 * then TCP, UDP, ICMP or ICMPv6. */
#ifndef XDPLB_PARSE_H
#define XDPLB_PARSE_H

enum parse_result {
	P_OK,         /* TCP or UDP with its ports (a first fragment too: see p->frag) */
	P_L4,         /* parse_l3: TCP, UDP or ICMP at p->l4_off, for parse_l4 */
	P_OTHER,      /* neither IP family (p->l3 unset), or another protocol (p->l3 set) */
	P_MALFORMED,
	P_FRAGMENT,   /* a later fragment: the IP header only (p->l3 set) */
	P_ICMP,       /* ICMP, or ICMPv6 */
	P_UNPARSED,   /* IPv6 whose headers run past the bound below (p->l3 set) */
};

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

/* The IPv6 extension headers walked to reach TCP or UDP (hop-by-hop, routing,
 * destination options, fragment), and how far into the frame they may reach. */
#define MAX_EXT_HDRS  4
#define MAX_L4_OFF    512

struct ipv6_ext {
	__u8 nexthdr;
	__u8 len;      /* in 8-byte units, not counting the first 8 (RFC 8200) */
};

struct ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;  /* offset in 8-byte units << 3, then 2 reserved bits, then M */
	__be32 id;
};

#define IP6_MF     0x0001
#define IP6_OFFSET 0xfff8

struct pkt {
	void *l3;          /* struct iphdr (family 4) or struct ipv6hdr (family 6) */
	void *l4;
	__u16 *l4_csum;
	struct addr src;   /* IPv4 mapped */
	struct addr dst;
	__be16 sport;
	__be16 dport;
	__u32 l3_off;      /* from the start of the frame */
	__u32 l4_off;
	__u32 l4_len;      /* what the L4 checksum covers beyond the pseudo-header */
	__u32 seq;         /* TCP: the segment's sequence number, and where its data ends */
	__u32 seq_end;
	__u32 ack;
	__be32 frag_id;    /* a fragment's datagram id (IPv4: the 16-bit one, widened) */
	__u8 family;       /* 4 or 6 */
	__u8 proto;        /* the upper-layer protocol (a fragment's too) */
	__u8 tcp_flags;    /* the TCP flags byte: CWR ECE URG ACK PSH RST SYN FIN */
	__u8 frag;         /* a first fragment: more of the datagram follows */
};

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* Offsets inside the L4 header. The two bytes after ack_seq (data offset, then the
 * flags) are read and written whole: struct tcphdr's bitfields there are declared
 * in an endian-dependent order. Ports lie at the same offsets in a UDP header. */
#define TCP_DOFF_OFF  (offsetof(struct tcphdr, ack_seq) + 4)
#define TCP_FLAGS_OFF (offsetof(struct tcphdr, ack_seq) + 5)
#define TCP_CSUM_OFF  offsetof(struct tcphdr, check)
#define UDP_CSUM_OFF  offsetof(struct udphdr, check)
#define L4_SPORT_OFF  offsetof(struct tcphdr, source)
#define L4_DPORT_OFF  offsetof(struct tcphdr, dest)
_Static_assert(offsetof(struct udphdr, source) == L4_SPORT_OFF &&
	       offsetof(struct udphdr, dest) == L4_DPORT_OFF, "TCP and UDP ports differ");

/* IPv4 frag_off bits (the kernel's net/ip.h, which is not uapi). */
#define IP_MF     0x2000
#define IP_OFFSET 0x1fff

static __always_inline void addr_set_v4(struct addr *a, __be32 v4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(V4_MAPPED_W2);
	a->w[3] = v4;
}

static __always_inline int addr_eq(const struct addr *a, const struct addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] &&
	       a->w[3] == b->w[3];
}

static __always_inline int addr_is_zero(const struct addr *a)
{
	return !(a->w[0] | a->w[1] | a->w[2] | a->w[3]);
}

/* TCP, UDP or ICMP at the frame's offset p->l4_off (parse_l3), p->l4_len bytes of it
 * in the datagram. */
static __always_inline int parse_l4(void *data, void *data_end, struct pkt *p)
{
	__u32 l4_off = p->l4_off;
	if (l4_off > MAX_L4_OFF)
		return P_MALFORMED;
	void *l4 = data + l4_off;
	__u32 l4_len = p->l4_len;
	p->l4 = l4;
	if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6)
		return p->frag ? P_OTHER : P_ICMP;  /* see icmp.h */
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end || tcp->doff < 5)
			return P_MALFORMED;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->l4_csum = &tcp->check;
		p->tcp_flags = *((__u8 *)tcp + TCP_FLAGS_OFF);
		p->seq = bpf_ntohl(tcp->seq);
		p->ack = bpf_ntohl(tcp->ack_seq);
		/* SYN and FIN take a sequence number each. */
		p->seq_end = p->seq + l4_len - tcp->doff * 4 +
			     !!(p->tcp_flags & TCPF_SYN) + !!(p->tcp_flags & TCPF_FIN);
		return P_OK;
	}
	if (p->proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end)
			return P_MALFORMED;
		p->sport = udp->source;
		p->dport = udp->dest;
		p->l4_csum = &udp->check;
		p->tcp_flags = 0;
		return P_OK;
	}
	return P_OTHER;
}

static __always_inline int parse_ipv4(void *data, void *data_end, __u32 off, struct pkt *p)
{
	struct iphdr *ip = data + off;
	if ((void *)(ip + 1) > data_end)
		return P_MALFORMED;
	__u32 ihl = ip->ihl * 4;
	if (ip->version != 4 || ihl < sizeof(*ip))
		return P_MALFORMED;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl)
		return P_MALFORMED;
	p->family = 4;
	p->l3 = ip;
	p->l3_off = off;
	p->proto = ip->protocol;
	addr_set_v4(&p->src, ip->saddr);
	addr_set_v4(&p->dst, ip->daddr);
	p->frag_id = ip->id;
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return P_FRAGMENT;
	p->frag = !!(ip->frag_off & bpf_htons(IP_MF));
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP &&
	    ip->protocol != IPPROTO_ICMP)
		return P_OTHER;
	if ((void *)ip + ihl > data_end)
		return P_MALFORMED;
	p->l4_off = off + ihl;
	p->l4_len = tot_len - ihl;
	return P_L4;
}

static __always_inline int parse_ipv6(void *data, void *data_end, __u32 off, struct pkt *p)
{
	struct ipv6hdr *ip6 = data + off;
	if ((void *)(ip6 + 1) > data_end)
		return P_MALFORMED;
	if (ip6->version != 6)
		return P_MALFORMED;
	p->family = 6;
	p->l3 = ip6;
	p->l3_off = off;
	__builtin_memcpy(&p->src, &ip6->saddr, sizeof(p->src));
	__builtin_memcpy(&p->dst, &ip6->daddr, sizeof(p->dst));
	__u32 payload = bpf_ntohs(ip6->payload_len);
	__u8 next = ip6->nexthdr;
	__u32 l4_off = off + sizeof(*ip6);
#pragma unroll
	for (int i = 0; i < MAX_EXT_HDRS; i++) {
		if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS) {
			struct ipv6_ext *h = data + l4_off;
			if ((void *)(h + 1) > data_end)
				return P_MALFORMED;
			next = h->nexthdr;
			l4_off += (h->len + 1) * 8;
		} else if (next == IPPROTO_FRAGMENT) {
			struct ipv6_frag *f = data + l4_off;
			if ((void *)(f + 1) > data_end)
				return P_MALFORMED;
			p->proto = f->nexthdr;
			p->frag_id = f->id;
			if (f->frag_off & bpf_htons(IP6_OFFSET))
				return P_FRAGMENT;
			p->frag = !!(f->frag_off & bpf_htons(IP6_MF));
			next = f->nexthdr;
			l4_off += sizeof(*f);
		} else {
			break;
		}
		if (l4_off > MAX_L4_OFF)
			return P_UNPARSED;
	}
	p->proto = next;
	if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	    next == IPPROTO_FRAGMENT)
		return P_UNPARSED;
	if (next != IPPROTO_TCP && next != IPPROTO_UDP && next != IPPROTO_ICMPV6)
		return P_OTHER;
	__u32 ext = l4_off - off - sizeof(*ip6);
	if (payload < ext || l4_off > MAX_L4_OFF)
		return P_MALFORMED;
	p->l4_off = l4_off;
	p->l4_len = payload - ext;
	return P_L4;
}

/* Up to the L3 header's end: P_L4 when parse_l4 is to go on (see parse() in
 * xdplb.c, which joins the two), else the result. */
static __always_inline int parse_l3(void *data, void *data_end, struct pkt *p)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return P_MALFORMED;
	__be16 h_proto = eth->h_proto;
	__u32 off = sizeof(*eth);
	if (h_proto == bpf_htons(ETH_P_8021Q) || h_proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_hdr *vh = data + off;
		if ((void *)(vh + 1) > data_end)
			return P_MALFORMED;
		h_proto = vh->proto;
		off += sizeof(*vh);
	}
	if (h_proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(data, data_end, off, p);
	if (h_proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(data, data_end, off, p);
	return P_OTHER;
}

#endif
