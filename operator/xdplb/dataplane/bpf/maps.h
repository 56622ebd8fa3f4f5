/* Every map, defined once and pinned under PIN_DIR so a restarted agent adopts
 * them. Capacities come from agent flags (-D at compile time). */
#ifndef XDPLB_MAPS_H
#define XDPLB_MAPS_H

#define PIN(name) PIN_DIR "/" #name

BPF_TABLE_PINNED("hash", struct listener_key, struct listener_val, listeners,
		 MAX_LISTENER_KEYS, PIN(listeners));
/* Per destination port: bit (1 << proto & 31) set when some listener uses it.
 * Lets traffic to other ports leave after one inlined array lookup. */
BPF_TABLE_PINNED("array", u32, u32, port_filter, 65536, PIN(port_filter));
BPF_TABLE_PINNED("lpm_trie", struct lpm_key, u32, src_routes, MAX_SOURCE_ROUTES,
		 PIN(src_routes), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct group_val, groups, MAX_GROUPS, PIN(groups));
BPF_TABLE_PINNED("array", u32, struct backend, pool, POOL_SIZE, PIN(pool));
BPF_TABLE_PINNED("hash", struct sni_key, u32, sni_routes, MAX_SNI_ROUTES,
		 PIN(sni_routes));
BPF_TABLE_PINNED("array", u32, __be32, snat_src, MAX_BACKENDS, PIN(snat_src));
BPF_TABLE_PINNED("hash", struct rev_nat_key, struct rev_nat_val, rev_nat, MAX_BACKENDS,
		 PIN(rev_nat));
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val, ct, CT_ENTRIES, PIN(ct));
BPF_TABLE_PINNED("percpu_array", u32, u64, stats, ST_MAX, PIN(stats));
BPF_TABLE_PINNED("percpu_array", u32, struct flow_stats, listener_stats, MAX_LISTENERS,
		 PIN(listener_stats));
BPF_TABLE_PINNED("percpu_array", u32, struct flow_stats, backend_stats, MAX_BACKENDS,
		 PIN(backend_stats));

#endif
