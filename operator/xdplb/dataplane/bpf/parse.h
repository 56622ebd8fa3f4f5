/* Header parsing shared by XDP and TC: Ethernet with at most one 802.1Q/802.1ad
 * tag, IPv4 honouring IHL, then TCP, UDP or ICMP. */
#ifndef XDPLB_PARSE_H
#define XDPLB_PARSE_H

enum parse_result {
	P_OK,         /* TCP or UDP with its ports (a first fragment too: see p->frag) */
	P_OTHER,      /* not IPv4 (p->ip unset), or another IPv4 protocol (p->ip set) */
	P_MALFORMED,
	P_FRAGMENT,   /* a later fragment: IPv4 header only (p->ip set) */
	P_ICMP,
};

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

struct pkt {
	struct iphdr *ip;
	void *l4;
	__u16 *l4_csum;
	__be16 sport;
	__be16 dport;
	__u32 ip_off;   /* from the start of the frame */
	__u32 l4_off;
	__u32 seq;      /* TCP: the segment's sequence number, and where its data ends */
	__u32 seq_end;
	__u32 ack;
	__u8 proto;
	__u8 tcp_flags; /* the TCP flags byte: CWR ECE URG ACK PSH RST SYN FIN */
	__u8 frag;      /* a first fragment: more of the datagram follows */
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

static __always_inline int parse(void *data, void *data_end, struct pkt *p)
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
	if (h_proto != bpf_htons(ETH_P_IP))
		return P_OTHER;

	struct iphdr *ip = data + off;
	if ((void *)(ip + 1) > data_end)
		return P_MALFORMED;
	__u32 ihl = ip->ihl * 4;
	if (ip->version != 4 || ihl < sizeof(*ip))
		return P_MALFORMED;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl)
		return P_MALFORMED;
	p->ip = ip;
	p->ip_off = off;
	p->proto = ip->protocol;
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return P_FRAGMENT;
	p->frag = !!(ip->frag_off & bpf_htons(IP_MF));
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP &&
	    ip->protocol != IPPROTO_ICMP)
		return P_OTHER;
	if ((void *)ip + ihl > data_end)
		return P_MALFORMED;

	p->l4_off = off + ihl;
	void *l4 = (void *)ip + ihl;
	p->l4 = l4;
	if (ip->protocol == IPPROTO_ICMP)
		return p->frag ? P_OTHER : P_ICMP;  /* see icmp.h */
	if (ip->protocol == IPPROTO_TCP) {
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
		p->seq_end = p->seq + tot_len - ihl - tcp->doff * 4 +
			     !!(p->tcp_flags & TCPF_SYN) + !!(p->tcp_flags & TCPF_FIN);
	} else {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end)
			return P_MALFORMED;
		p->sport = udp->source;
		p->dport = udp->dest;
		p->l4_csum = &udp->check;
		p->tcp_flags = 0;
	}
	return P_OK;
}

#endif
