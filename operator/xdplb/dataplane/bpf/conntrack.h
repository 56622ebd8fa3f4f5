/* Conntrack states and timeouts, enforced by the data path: an entry idle for longer
 * than its state allows is treated as absent, whatever the sweeper does. Mirrored by
 * xdplb/dataplane/conntrack.py, which sweeps by the same rules. */
#ifndef XDPLB_CONNTRACK_H
#define XDPLB_CONNTRACK_H

#define SEC_NS 1000000000ull

/* A RST ends a flow only when its sequence number lies this close to where its
 * sender's data ended (or, from a side that never sent, when it acknowledges the
 * other's): a forged RST must guess within 2 MiB of 4 GiB. */
#define RST_WINDOW (1 << 20)

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
	/* A handshake the client has not completed (a forged SYN's, say) holds its
	 * entry, and a source-NAT port, for the short timeout only. */
	if (!(v->flags & CT_ESTABLISHED))
		return CT_TCP_SYN_TIMEOUT * SEC_NS;
	return CT_TCP_EST_TIMEOUT * SEC_NS;
}

/* The longest a flow of proto may stay idle: what a reply entry whose forward entry is
 * gone (evicted) keeps its port for. */
static __always_inline __u64 ct_max_timeout_ns(__u8 proto)
{
	return (proto == IPPROTO_UDP ? CT_UDP_TIMEOUT : CT_TCP_EST_TIMEOUT) * SEC_NS;
}

static __always_inline int ct_idle_past(__u64 last, __u64 timeout, __u64 now)
{
	/* Another CPU may have stamped the entry after this one read the clock:
	 * a last_ns ahead of now must not wrap around into "expired". */
	return now > last && now - last > timeout;
}

static __always_inline int ct_expired(const struct ct_val *v, __u8 proto, __u64 now)
{
	return ct_idle_past(v->last_ns, ct_timeout_ns(v, proto), now);
}

/* Whether a RST of direction dir lies within its sender's window (see RST_WINDOW). */
static __always_inline int rst_in_window(const struct ct_val *v, int dir, const struct pkt *p)
{
	if (v->packets[dir])
		return (__s32)(p->seq - v->seq_end[dir]) >= -RST_WINDOW &&
		       (__s32)(p->seq - v->seq_end[dir]) <= RST_WINDOW;
	/* This side never sent: a refusal of the other side's SYN acknowledges it. */
	return !v->packets[!dir] || ((p->tcp_flags & TCPF_ACK) && p->ack == v->seq_end[!dir]);
}

/* The CT_* state bits a packet of direction dir sets on flow v. */
static __always_inline __u32 ct_flags_of(const struct ct_val *v, int dir, const struct pkt *p)
{
	__u8 f = p->tcp_flags;
	__u32 set = dir ? CT_REPLIED : 0;
	if (!dir && (f & (TCPF_ACK | TCPF_SYN)) == TCPF_ACK && (v->flags & CT_REPLIED))
		set |= CT_ESTABLISHED;
	if (f & TCPF_FIN)
		set |= dir ? CT_FIN_REV : CT_FIN_FWD;
	if (f & TCPF_RST)
		set |= CT_RST;
	return set;
}

/* Record a packet on the flow's forward entry: state, sequence, idle clock, counters.
 * Returns 0, or -1 for a RST taken for no end of the flow (outside its window). */
static __always_inline int ct_track(struct ct_val *v, int dir, const struct pkt *p, __u64 now,
				    __u64 bytes)
{
	int ret = 0;
	__u32 set = ct_flags_of(v, dir, p);
	if ((set & CT_RST) && !rst_in_window(v, dir, p)) {
		set &= ~CT_RST;
		ret = -1;
	}
	/* A plain store: a bit lost to a race is set again by the next packet. */
	if (set && (v->flags & set) != set)
		v->flags |= set;
	if (p->proto == IPPROTO_TCP &&
	    (!v->packets[dir] || (__s32)(p->seq_end - v->seq_end[dir]) > 0))
		v->seq_end[dir] = p->seq_end;
	v->last_ns = now;
	/* Plain adds: each direction of a flow is handled by one CPU at a time
	 * (receive steering hashes the flow), so a locked add buys nothing. */
	v->packets[dir] += 1;
	v->bytes[dir] += bytes;
	return ret;
}

/* The forward key of the flow a reply entry (key rk, value rv) belongs to. */
static __always_inline void ct_forward_key(struct ct_key *k, const struct ct_reply_val *rv,
					   __u8 proto)
{
	k->src = rv->client;
	k->dst = rv->vip;
	k->sport = rv->cport;
	k->dport = rv->vport;
	k->proto = proto;
	k->pad[0] = k->pad[1] = k->pad[2] = 0;
}

/* Whether forward entry f is the flow of reply entry (rk, rv): it goes to the
 * backend that answers there, with the same translation. */
static __always_inline int ct_pairs(const struct ct_val *f, const struct ct_key *rk,
				    const struct ct_reply_val *rv)
{
	if (!addr_eq(&f->nat_addr, &rk->src) || f->nat_port != rk->sport)
		return 0;
	if (rv->flags & CT_SNAT)
		return (f->flags & CT_SNAT) && addr_eq(&f->snat_addr, &rk->dst) &&
		       f->snat_port == rk->dport;
	return (f->flags & CT_PAIRED) != 0;
}

#endif
