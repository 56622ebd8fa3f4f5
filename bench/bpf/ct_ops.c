/* The conntrack map's own cost: OPS operations on a new key every run
 * (see bench/ct_cost.py). Key and value are the data path's (layout.h). */
#include <uapi/linux/bpf.h>
#include "layout.h"

BPF_TABLE("lru_hash", struct ct_key, struct ct_val, ct, CAPACITY);
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
	key.dir = 1;
	if (ct.update(&key, &v))
		return XDP_ABORTED;
#endif
	*d += 1;
	return XDP_PASS;
}
