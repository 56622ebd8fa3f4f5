/* Flow hashes for backend selection. Mirrored bit for bit by
 * xdplb/plan/flowhash.py so `xdplb explain` predicts the data path. */
#ifndef XDPLB_HASH_H
#define XDPLB_HASH_H

#define HASH_SEED 0x9e3779b9u

/* murmur3's 32-bit finaliser: cheap, and every input bit flips about half
 * of the output bits. */
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

/* An address into the hash: an IPv4 one (mapped) as its one word, an IPv6 one word by
 * word, each in host order. */
static __always_inline __u32 mix_addr(__u32 h, const struct addr *a)
{
	if (a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(V4_MAPPED_W2))
		return mix32(h ^ bpf_ntohl(a->w[3]));
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = mix32(h ^ bpf_ntohl(a->w[i]));
	return h;
}

/* Ports in host order. */
static __always_inline __u32 flow_hash(const struct addr *saddr, const struct addr *daddr,
				       __u16 sport, __u16 dport, __u8 proto)
{
	__u32 h = mix32(HASH_SEED ^ proto);
	h = mix32(h ^ (((__u32)sport << 16) | dport));
	h = mix_addr(h, daddr);
	return mix_addr(h, saddr);
}

static __always_inline __u32 client_hash(const struct addr *saddr)
{
	return mix_addr(mix32(HASH_SEED), saddr);
}

#endif
