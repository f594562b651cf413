//! Netfilter's netlink (`NETLINK_NETFILTER`), the framing that nf_tables and ipset share
//! (`include/uapi/linux/netfilter/nfnetlink.h`): a `nlmsghdr`, a `nfgenmsg` (family,
//! version, resource id), then attributes. Used by [`crate::nft_wire`] (batches, dumps,
//! notifications), [`crate::nft`] (table dumps, waking a dormant table) and by the node
//! agent's ipsets.
//!
//! Every call works in the calling thread's netns.

/// Start of an nf_tables batch (`NFNL_MSG_BATCH_BEGIN`).
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
/// End of an nf_tables batch (`NFNL_MSG_BATCH_END`).
pub const NFNL_MSG_BATCH_END: u16 = 0x11;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`: answer with an acknowledgement.
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_EXCL`: fail when the object exists.
pub const NLM_F_EXCL: u16 = 0x200;
/// `NLM_F_DUMP`.
pub const NLM_F_DUMP: u16 = 0x300;
/// `NLA_F_NESTED`: the attribute holds attributes.
pub const NLA_F_NESTED: u16 = 0x8000;
/// `NLA_F_NET_BYTEORDER`: the attribute's integer is big-endian.
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;
/// `NFNL_SUBSYS_NFTABLES` (`linux/netfilter/nfnetlink.h`): the high byte of every
/// nf_tables message type.
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFPROTO_INET` (`linux/netfilter.h`): the family of our nftables tables.
pub const NFPROTO_INET: u8 = 1;
/// `NFPROTO_IPV4`: the family of iptables-nft's IPv4 tables and of IPv4 ipsets.
pub const NFPROTO_IPV4: u8 = 2;
/// `NFPROTO_IPV6`: the family of iptables-nft's IPv6 tables and of IPv6 ipsets.
pub const NFPROTO_IPV6: u8 = 10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// A netfilter netlink socket in the calling thread's netns, with a 5 s receive timeout.
///
/// Errors: the socket calls'.
pub fn nfnetlink_socket() -> std::io::Result<netlink_sys::Socket> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    nix::sys::socket::setsockopt(
        &std::os::fd::AsFd::as_fd(&sock),
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(5, 0),
    )?;
    Ok(sock)
}

/// Appends one netlink message: `nlmsghdr`, `nfgenmsg` (`family`, version 0, `res_id`
/// big-endian) and the already-encoded `attrs`.
pub fn push_message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
}

/// Appends one netlink attribute, padded to 4 bytes.
pub fn push_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// An `InvalidData` error for a malformed answer.
pub fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// The native-endian `u16` at `i`, if `b` is long enough.
pub fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    b.get(i..i + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]))
}

/// The native-endian `u32` at `i`, if `b` is long enough.
pub fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    b.get(i..i + 4)
        .map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
}

/// The attributes of `b`, a run of netlink attributes: (type without the nested and
/// byte-order flags, value). Stops at the first malformed one; never panics.
pub fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let len = u16_at(b, off)? as usize;
        let kind = u16_at(b, off + 2)? & 0x3fff;
        if len < 4 || off + len > b.len() {
            return None;
        }
        let value = &b[off + 4..off + len];
        off += (len + 3) & !3;
        Some((kind, value))
    })
}

/// Reads answers to request `seq` until the dump ends or the request is acknowledged,
/// handing every other message of `seq` to `each` (its bytes, header included).
///
/// Errors: the socket's error, an error acknowledgement (as the errno), or a malformed
/// message.
pub fn receive(
    sock: &netlink_sys::Socket,
    seq: u32,
    each: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    receive_batch(sock, seq..=seq, seq, each)
}

/// [`receive`] for a batch whose messages carry the sequence numbers `batch`: an error
/// acknowledgement for any of them fails it (the kernel answers a failed commit, or a
/// refused batch header, on the batch's first message), and it is done at the
/// acknowledgement (or end of dump) of `done`.
///
/// Errors: as [`receive`].
pub fn receive_batch(
    sock: &netlink_sys::Socket,
    batch: std::ops::RangeInclusive<u32>,
    done: u32,
    mut each: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    loop {
        let (buf, _) = sock.recv_from_full()?;
        let mut off = 0;
        while off + 16 <= buf.len() {
            let len = u32_at(&buf, off).ok_or_else(|| invalid("short header"))? as usize;
            let kind = u16_at(&buf, off + 4).ok_or_else(|| invalid("short header"))?;
            let msg_seq = u32_at(&buf, off + 8).ok_or_else(|| invalid("short header"))?;
            if len < 16 || off + len > buf.len() {
                return Err(invalid("bad netlink message length"));
            }
            let msg = &buf[off..off + len];
            off += (len + 3) & !3;
            if !batch.contains(&msg_seq) {
                continue;
            }
            match kind {
                NLMSG_DONE if msg_seq == done => return Ok(()),
                NLMSG_ERROR => {
                    let code = u32_at(msg, 16)
                        .map(|c| c as i32)
                        .ok_or_else(|| invalid("short error message"))?;
                    if code != 0 {
                        // The kernel sends `-errno`; anything else is not an errno.
                        let errno = code.checked_neg().filter(|e| *e > 0);
                        return Err(errno.map_or_else(
                            || invalid("error acknowledgement with a bad code"),
                            std::io::Error::from_raw_os_error,
                        ));
                    }
                    if msg_seq == done {
                        return Ok(());
                    }
                }
                NLMSG_DONE => {}
                _ if msg_seq == done => each(msg),
                _ => {}
            }
        }
    }
}
