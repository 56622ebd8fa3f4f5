/* The conntrack maps' own cost: OPS operations on a new key every run
 * (see bench/ct_cost.py). Keys and values are the data path's (layout.h). */
#include <uapi/linux/bpf.h>
#include "layout.h"

BPF_TABLE("lru_hash", struct ct_key, struct ct_val, ct, CAPACITY);
BPF_TABLE("hash", struct ct_key, struct ct_reply_val, ct_reply, CAPACITY);
BPF_PERCPU_ARRAY(next, u64, 1);
BPF_PERCPU_ARRAY(done, u64, 1);

int ct_ops(struct xdp_md *ctx)
{
	u32 zero = 0;
	u64 *n = next.lookup(&zero);
	u64 *d = done.lookup(&zero);
	if (!n || !d)
		return XDP_ABORTED;
	struct ct_key key = { .src = (u32)*n, .dst = 0x0a000001, .sport = (u16)(*n >> 32),
			      .dport = 80, .proto = 6 };
	*n += 1;
#if OPS >= 1
	if (ct.lookup(&key))
		return XDP_ABORTED;
#endif
#if OPS >= 2
	struct ct_val v = { .nat_addr = 0x0a000002, .nat_port = 8080, .last_ns = *n };
	if (ct.update(&key, &v))
		return XDP_ABORTED;
#endif
#if OPS >= 3
	/* The reply entry (a map that never evicts): steady at half full, as the
	 * sweeper keeps it, by deleting the entry made CAPACITY / 2 flows ago. */
	struct ct_key rk = { .src = 0x0a000002, .dst = key.src, .sport = 8080,
			     .dport = key.sport, .proto = 6 };
	struct ct_reply_val rv = { .client = key.src, .vip = key.dst, .last_ns = *n };
	if (ct_reply.update(&rk, &rv))
		return XDP_ABORTED;
	if (*n > CAPACITY / 2) {
		u64 old = *n - 1 - CAPACITY / 2;
		rk.dst = (u32)old;
		rk.dport = (u16)(old >> 32);
		ct_reply.delete(&rk);
	}
#endif
	*d += 1;
	return XDP_PASS;
}
