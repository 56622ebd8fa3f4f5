/* Every map, defined once. The agent creates maps of these shapes itself, sized
 * by its capacity flags, pins them under a directory named after this layout,
 * and points the programs at them (loader.py): a restarted agent reopens the
 * pins and established flows survive, with no need to reopen maps by id
 * (CAP_SYS_ADMIN). The sizes here are what `xdplb verify` compiles with. */
#ifndef XDPLB_MAPS_H
#define XDPLB_MAPS_H

BPF_TABLE("hash", struct listener_key, struct listener_val, listeners, MAX_LISTENER_KEYS);
/* Per destination port: PF_* bits (layout.h). Lets traffic to other ports leave
 * after one inlined array lookup. */
BPF_TABLE("array", u32, u32, port_filter, 65536);
BPF_F_TABLE("hash", struct addr, u32, vips, MAX_LISTENER_KEYS, BPF_F_NO_PREALLOC);
BPF_TABLE("array", u32, u32, vip_bits, VIP_BITS / 32);
BPF_F_TABLE("lpm_trie", struct lpm_key, u32, src_routes, MAX_SOURCE_ROUTES, BPF_F_NO_PREALLOC);
BPF_TABLE("array", u32, struct group_val, groups, MAX_GROUPS);
BPF_TABLE("array", u32, struct pool_ids, pool, POOL_ELEMS);  /* POOL_IDS slots each */
BPF_TABLE("array", u32, struct backend, backends, MAX_BACKENDS);
BPF_F_TABLE("lpm_trie", struct net_key, u32, backend_nets, MAX_BACKEND_NETS, BPF_F_NO_PREALLOC);
/* Read by the agent's SNI acceptor only: no need to preallocate. */
BPF_F_TABLE("hash", struct sni_key, u32, sni_routes, MAX_SNI_ROUTES, BPF_F_NO_PREALLOC);
BPF_TABLE("hash", struct rev_nat_key, struct rev_nat_val, rev_nat, MAX_REV_NAT);
BPF_TABLE("lru_hash", struct ct_key, struct ct_val, ct, CT_ENTRIES);
BPF_TABLE("hash", struct ct_key, struct ct_reply_val, ct_reply, CT_ENTRIES);
BPF_TABLE("lru_hash", struct frag_key, struct frag_val, frags, MAX_FRAGMENTED);
BPF_TABLE("percpu_array", u32, u64, stats, ST_MAX);
BPF_TABLE("percpu_array", u32, struct scratch, scratch, 1);
BPF_TABLE("percpu_array", u32, struct flow_stats, listener_stats, MAX_LISTENERS);
BPF_TABLE("percpu_array", u32, struct flow_stats, backend_stats, MAX_BACKENDS);

#endif
