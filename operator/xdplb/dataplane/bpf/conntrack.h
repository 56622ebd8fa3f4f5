/* Conntrack timeouts are enforced by the data path: an entry idle for longer
 * than its state allows is treated as absent, whatever the sweeper does. */
#ifndef XDPLB_CONNTRACK_H
#define XDPLB_CONNTRACK_H

#define SEC_NS 1000000000ull

static __always_inline int ct_closing(const struct ct_val *v)
{
	return (v->flags & CT_RST) ||
	       (v->flags & (CT_FIN_FWD | CT_FIN_REV)) == (CT_FIN_FWD | CT_FIN_REV);
}

static __always_inline __u64 ct_timeout_ns(const struct ct_val *v, __u8 proto)
{
	if (proto == IPPROTO_UDP)
		return CT_UDP_TIMEOUT * SEC_NS;
	if (ct_closing(v))
		return CT_TCP_CLOSE_TIMEOUT * SEC_NS;
	if (!(v->flags & CT_REPLIED))
		return CT_TCP_SYN_TIMEOUT * SEC_NS;
	return CT_TCP_EST_TIMEOUT * SEC_NS;
}

static __always_inline int ct_expired(const struct ct_val *v, __u8 proto, __u64 now)
{
	/* Another CPU may have stamped the entry after this one read the clock:
	 * a last_ns ahead of now must not wrap around into "expired". */
	__u64 last = v->last_ns;
	return now > last && now - last > ct_timeout_ns(v, proto);
}

/* The CT_* state bits a packet of direction dir sets. */
static __always_inline __u32 ct_flags_of(int dir, __u8 tcp_flags)
{
	__u32 set = dir ? CT_REPLIED : 0;
	if (tcp_flags & TCPF_FIN)
		set |= dir ? CT_FIN_REV : CT_FIN_FWD;
	if (tcp_flags & TCPF_RST)
		set |= CT_RST;
	return set;
}

/* Record a packet on the flow's dir-0 entry: state, idle clock, counters. */
static __always_inline void ct_track(struct ct_val *v, int dir, __u8 tcp_flags, __u64 now,
				     __u64 bytes)
{
	__u32 set = ct_flags_of(dir, tcp_flags);
	/* A plain store: a bit lost to a race is set again by the next packet. */
	if (set && (v->flags & set) != set)
		v->flags |= set;
	v->last_ns = now;
	/* Plain adds: each direction of a flow is handled by one CPU at a time
	 * (receive steering hashes the flow), so a locked add buys nothing. */
	v->packets[dir] += 1;
	v->bytes[dir] += bytes;
}

#endif
