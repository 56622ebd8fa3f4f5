/* Benchmark wrapper for BPF_PROG_TEST_RUN with repeat > 1.
 *
 * The test run hands the same buffer to every repetition, so a program that
 * rewrites the packet (DNAT) would see its own output from the second run on.
 * `restore` copies the original frame (kept in the `frame` map) back over the
 * packet (and drops the metadata the last run put in front), optionally gives it
 * a fresh source address/port (VARY: IPv4, VARY6: IPv6) (VARY: each run is a
 * new flow; checksums fixed incrementally), then tail-calls progs[0]: the
 * program under test or the parse-only `parse_floor`.
 *
 * Compiled with bcc; -I operator/xdplb/dataplane/bpf for parse.h and csum.h.
 * FRAME_LEN: the frame size in bytes. Frames carry no IP options. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "layout.h"
#include "csum.h"
#include "parse.h"

struct frame {
	__u8 bytes[FRAME_LEN];
};

BPF_ARRAY(frame, struct frame, 1);
BPF_ARRAY(counter, u64, 1);
BPF_PROG_ARRAY(progs, 1);

int restore(struct xdp_md *ctx)
{
	/* Metadata the previous run left (an answer, or a rewrite left to TC) goes too. */
	int meta = (int)((long)ctx->data - (long)ctx->data_meta);
	if (meta > 0 && bpf_xdp_adjust_meta(ctx, meta))
		return XDP_ABORTED;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	if (data + FRAME_LEN > data_end)
		return XDP_ABORTED;
	struct frame *f = frame.lookup(&zero);
	if (!f)
		return XDP_ABORTED;
	__builtin_memcpy(data, f->bytes, FRAME_LEN);
#ifdef VARY
	/* Source port := n mod 65536, source address += n / 65536. */
	u64 *c = counter.lookup(&zero);
	if (!c)
		return XDP_ABORTED;
	__u32 n = *c;
	*c = n + 1;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return XDP_ABORTED;
	__be32 old_addr = ip->saddr;
	__be32 new_addr = bpf_htonl(bpf_ntohl(old_addr) + (n >> 16));
	__be16 old_port = tcp->source;
	__be16 new_port = bpf_htons(n & 0xffff);
	ip->saddr = new_addr;
	tcp->source = new_port;
	csum_replace4(&ip->check, old_addr, new_addr);
	csum_replace4(&tcp->check, old_addr, new_addr);
	csum_replace2(&tcp->check, old_port, new_port);
#endif
#ifdef VARY6
	/* IPv6: source port := n mod 65536, the source address's last word += n / 65536. */
	u64 *c = counter.lookup(&zero);
	if (!c)
		return XDP_ABORTED;
	__u32 n = *c;
	*c = n + 1;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct tcphdr *tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > data_end)
		return XDP_ABORTED;
	__be32 old_word = ip6->saddr.in6_u.u6_addr32[3];
	__be32 new_word = bpf_htonl(bpf_ntohl(old_word) + (n >> 16));
	__be16 old_port = tcp->source;
	__be16 new_port = bpf_htons(n & 0xffff);
	ip6->saddr.in6_u.u6_addr32[3] = new_word;
	tcp->source = new_port;
	csum_replace4(&tcp->check, old_word, new_word);
	csum_replace2(&tcp->check, old_port, new_port);
#endif
	progs.call(ctx, 0);
	return XDP_ABORTED;  /* the tail call failed */
}

/* The floor: the product's parser and nothing else. */
int parse_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct pkt p = {};
	if (parse_l3(data, data_end, &p) != P_L4 || parse_l4(data, data_end, &p) != P_OK)
		return XDP_PASS;
	/* Use what was parsed so the compiler keeps the parse. */
	return (p.sport ^ p.dport ^ p.proto ^ p.tcp_flags) == 0xffff ? XDP_DROP : XDP_PASS;
}
