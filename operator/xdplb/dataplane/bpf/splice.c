/* The SNI splice through a sockmap (`--sni-forward sockmap`). Once the acceptor
 * has read a connection's ClientHello and connected to the chosen backend, it
 * puts each socket in `socks` under its peer's socket cookie: the verdict looks
 * up the cookie of the socket that received a message and so finds the socket
 * to send it out of. A join is two map updates; closing a socket takes it out.
 * Bytes queued before a socket joined (the peeked ClientHello) go the same way.
 *
 * Attached as BPF_SK_SKB_VERDICT, without a stream parser: every skb is one
 * message (a parser would only return skb->len, and costs its own set-up and
 * teardown on every socket). */
#include <uapi/linux/bpf.h>

#ifndef MAX_SPLICED
#define MAX_SPLICED 65536
#endif

BPF_SOCKHASH(socks, u64, MAX_SPLICED);   /* peer's socket cookie -> socket */

int splice_verdict(struct __sk_buff *skb)
{
	/* A FIN comes as an skb without data: sent on, it fails the peer socket with
	 * EPIPE. It stays here, where the acceptor sees the end (EPOLLRDHUP). */
	if (!skb->len)
		return SK_PASS;
	u64 key = bpf_get_socket_cookie(skb);
	return socks.sk_redirect_hash(skb, &key, 0);
}
