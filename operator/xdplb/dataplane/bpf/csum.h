/* One's-complement checksum helpers (RFC 1624 incremental updates). Values are
 * taken as they lie in memory: the sum is byte-order independent as long as
 * the checksum field is read the same way. */
#ifndef XDPLB_CSUM_H
#define XDPLB_CSUM_H

static __always_inline __u16 csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* HC' = ~(~HC + ~m + m') for a 16-bit field m -> m'. */
static __always_inline void csum_replace2(__u16 *sum, __u16 from, __u16 to)
{
	__u32 s = (__u16)~*sum;
	s += (__u16)~from;
	s += to;
	*sum = ~csum_fold(s);
}

static __always_inline void csum_replace4(__u16 *sum, __u32 from, __u32 to)
{
	__u32 s = (__u16)~*sum;
	s += (__u16)~(from & 0xffff);
	s += (__u16)~(from >> 16);
	s += to & 0xffff;
	s += to >> 16;
	*sum = ~csum_fold(s);
}

/* The same for a 16-byte address (the four words of struct addr). */
static __always_inline void csum_replace16(__u16 *sum, const __be32 *from, const __be32 *to)
{
	__u32 s = (__u16)~*sum;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		s += (__u16)~(from[i] & 0xffff);
		s += (__u16)~(from[i] >> 16);
		s += to[i] & 0xffff;
		s += to[i] >> 16;
	}
	*sum = ~csum_fold(s);
}

/* The sum of a pseudo-header (RFC 793, RFC 8200 8.1) as it lies in memory, not yet
 * folded: the addresses' 16-bit words, the protocol and the L4 length. An IPv4
 * address sums its own four bytes only (w[3] of the mapped form). */
static __always_inline __u32 pseudo_sum(const struct addr *src, const struct addr *dst,
					int v4, __u8 proto, __u32 len)
{
	__u32 s = bpf_htons(proto) + bpf_htons(len & 0xffff) + bpf_htons(len >> 16);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (v4 && i < 3)
			continue;
		s += (src->w[i] & 0xffff) + (src->w[i] >> 16) + (dst->w[i] & 0xffff) +
		     (dst->w[i] >> 16);
	}
	return s;
}

/* UDP: a zero checksum means "none" and stays zero; a computed zero is sent
 * as 0xffff (RFC 768). */
static __always_inline void udp_csum_replace4(__u16 *sum, __u32 from, __u32 to)
{
	if (*sum == 0)
		return;
	csum_replace4(sum, from, to);
	if (*sum == 0)
		*sum = 0xffff;
}

static __always_inline void udp_csum_replace2(__u16 *sum, __u16 from, __u16 to)
{
	if (*sum == 0)
		return;
	csum_replace2(sum, from, to);
	if (*sum == 0)
		*sum = 0xffff;
}

static __always_inline void udp_csum_replace16(__u16 *sum, const __be32 *from,
					       const __be32 *to)
{
	if (*sum == 0)
		return;
	csum_replace16(sum, from, to);
	if (*sum == 0)
		*sum = 0xffff;
}

#endif
