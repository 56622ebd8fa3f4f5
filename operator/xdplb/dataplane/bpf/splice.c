/* The SNI splice. Once the agent has read a connection's ClientHello and
 * connected to the chosen backend, it puts both sockets in `socks` (keyed by
 * socket cookie) and records each as the other's peer: from then on every
 * byte a socket receives is moved to its peer's send queue inside the kernel.
 * Bytes queued before a socket joined (the peeked ClientHello) go the same way. */
#include <uapi/linux/bpf.h>

#ifndef MAX_SPLICED
#define MAX_SPLICED 65536
#endif

BPF_SOCKHASH(socks, u64, MAX_SPLICED);
BPF_HASH(peers, u64, u64, MAX_SPLICED);   /* socket cookie -> peer's cookie */

/* Each skb is one message: the verdict sees everything that arrived. */
int splice_parser(struct __sk_buff *skb)
{
	return skb->len;
}

int splice_verdict(struct __sk_buff *skb)
{
	u64 cookie = bpf_get_socket_cookie(skb);
	u64 *peer = peers.lookup(&cookie);
	if (!peer)
		return SK_DROP;
	u64 key = *peer;
	return socks.sk_redirect_hash(skb, &key, 0);
}
