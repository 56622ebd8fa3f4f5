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

/* Addresses and ports in host order. */
static __always_inline __u32 flow_hash(__u32 saddr, __u32 daddr, __u16 sport, __u16 dport,
				       __u8 proto)
{
	__u32 h = mix32(HASH_SEED ^ proto);
	h = mix32(h ^ (((__u32)sport << 16) | dport));
	h = mix32(h ^ daddr);
	return mix32(h ^ saddr);
}

static __always_inline __u32 client_hash(__u32 saddr)
{
	return mix32(mix32(HASH_SEED) ^ saddr);
}

#endif
