//! The node's probe ipsets over netlink (upstream `cni/pkg/ipset/`, which uses
//! `vishvananda/netlink`): `hash:ip` sets with comments, one per family, holding the
//! addresses of the ambient pods of this node, each entry commented with its pod's UID.
//! The host's `ISTIO_POSTRT` rule SNATs kubelet's probes to those addresses
//! ([`super::hostrules`]).
//!
//! The messages are ipset's (`include/uapi/linux/netfilter/ipset/ip_set.h`, subsystem
//! `NFNL_SUBSYS_IPSET`), framed by [`istio_cni::nfnetlink`]. Each call works in the
//! calling thread's netns: the agent's own, which is the node's (`hostNetwork`).

use std::net::IpAddr;

use istio_cni::nfnetlink::{
    attrs, invalid, nfnetlink_socket, push_attr, push_message, receive, NFPROTO_IPV4, NFPROTO_IPV6,
    NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};

/// `NFNL_SUBSYS_IPSET`.
const SUBSYS: u16 = 6;
/// The ipset protocol spoken: 6 is what every kernel since 3.x accepts (`IPSET_PROTOCOL_MIN`).
const PROTOCOL: u8 = 6;
const CMD_CREATE: u16 = 2;
const CMD_DESTROY: u16 = 3;
const CMD_LIST: u16 = 7;
const CMD_ADD: u16 = 9;
const CMD_DEL: u16 = 10;
const ATTR_PROTOCOL: u16 = 1;
const ATTR_SETNAME: u16 = 2;
const ATTR_TYPENAME: u16 = 3;
const ATTR_REVISION: u16 = 4;
const ATTR_FAMILY: u16 = 5;
const ATTR_DATA: u16 = 7;
const ATTR_ADT: u16 = 8;
const ATTR_IP: u16 = 1;
const ATTR_CADT_FLAGS: u16 = 8;
const ATTR_COMMENT: u16 = 26;
const ATTR_IPADDR_IPV4: u16 = 1;
const ATTR_IPADDR_IPV6: u16 = 2;
/// `IPSET_FLAG_WITH_COMMENT`: entries carry a comment.
const FLAG_WITH_COMMENT: u32 = 1 << 4;
/// `hash:ip` revision 2 is the first with comments.
const HASH_IP_REVISION: u8 = 2;
/// `IPSET_ERR_EXIST`.
const ERR_EXIST: i32 = 4103;
/// The longest comment the kernel keeps (`IPSET_MAX_COMMENT_SIZE`).
const MAX_COMMENT: usize = 255;

/// An ipset call failed.
#[derive(Debug, thiserror::Error)]
#[error("ipset {set}: {what}: {reason}")]
pub struct IpsetError {
    /// The set.
    pub set: String,
    /// The operation.
    pub what: &'static str,
    /// The kernel's answer, in words.
    pub reason: String,
}

/// One entry of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The address.
    pub ip: IpAddr,
    /// Its comment (the pod UID, for ours).
    pub comment: Option<String>,
}

/// A `hash:ip` set with comments, by name and family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// Its name (at most 31 bytes).
    pub name: String,
    /// IPv6 (`inet6`) or IPv4 (`inet`).
    pub ipv6: bool,
}

impl Set {
    /// Creates the set unless it exists with the same type and family (`ipset create -exist
    /// NAME hash:ip family inet[6] comment`).
    ///
    /// Errors: [`IpsetError`], e.g. when a set of that name exists with another type, or the
    /// kernel has no ipset.
    pub fn create(&self) -> Result<(), IpsetError> {
        let mut attrs = self.head();
        push_attr(&mut attrs, ATTR_TYPENAME, b"hash:ip\0");
        push_attr(&mut attrs, ATTR_REVISION, &[HASH_IP_REVISION]);
        push_attr(&mut attrs, ATTR_FAMILY, &[self.family()]);
        let mut data = Vec::new();
        push_attr(
            &mut data,
            ATTR_CADT_FLAGS | NLA_F_NET_BYTEORDER,
            &FLAG_WITH_COMMENT.to_be_bytes(),
        );
        push_attr(&mut attrs, ATTR_DATA | NLA_F_NESTED, &data);
        self.call(CMD_CREATE, NLM_F_REQUEST | NLM_F_ACK, &attrs, "create")
    }

    /// Destroys the set; a set that does not exist is not an error.
    ///
    /// Errors: [`IpsetError`], e.g. while a rule still references it.
    pub fn destroy(&self) -> Result<(), IpsetError> {
        match self.call_raw(CMD_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &self.head()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map_err(|e| self.err("destroy", e)),
        }
    }

    /// Adds `ip` with `comment` (truncated to 255 bytes), or updates the comment of an
    /// entry already there (`ipset add -exist`).
    ///
    /// Errors: [`IpsetError`]; an address of the other family is refused here.
    pub fn add(&self, ip: IpAddr, comment: &str) -> Result<(), IpsetError> {
        let mut data = self.ip_attr(ip, "add")?;
        let mut text: Vec<u8> = comment.bytes().take(MAX_COMMENT).collect();
        text.push(0);
        push_attr(&mut data, ATTR_COMMENT, &text);
        let mut attrs = self.head();
        push_attr(&mut attrs, ATTR_DATA | NLA_F_NESTED, &data);
        self.call(CMD_ADD, NLM_F_REQUEST | NLM_F_ACK, &attrs, "add")
    }

    /// Removes `ip`; an address not in the set is not an error.
    ///
    /// Errors: [`IpsetError`].
    pub fn del(&self, ip: IpAddr) -> Result<(), IpsetError> {
        let data = self.ip_attr(ip, "del")?;
        let mut attrs = self.head();
        push_attr(&mut attrs, ATTR_DATA | NLA_F_NESTED, &data);
        match self.call_raw(CMD_DEL, NLM_F_REQUEST | NLM_F_ACK, &attrs) {
            // IPSET_ERR_EXIST answers a deletion of an entry that is not there.
            Err(e) if e.raw_os_error() == Some(ERR_EXIST) => Ok(()),
            other => other.map_err(|e| self.err("del", e)),
        }
    }

    /// The set's entries (`ipset list NAME`).
    ///
    /// Errors: [`IpsetError`], e.g. when the set does not exist.
    pub fn list(&self) -> Result<Vec<Entry>, IpsetError> {
        let sock = nfnetlink_socket().map_err(|e| self.err("list", e))?;
        let mut req = Vec::new();
        push_message(
            &mut req,
            (SUBSYS << 8) | CMD_LIST,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            self.family(),
            0,
            &self.head(),
        );
        sock.send(&req, 0).map_err(|e| self.err("list", e))?;
        let mut entries = Vec::new();
        let mut malformed = None;
        receive(&sock, 1, |msg| {
            // nlmsghdr (16) + nfgenmsg (4), then the set's attributes.
            for (kind, value) in attrs(msg.get(20..).unwrap_or_default()) {
                if kind != ATTR_ADT {
                    continue;
                }
                for (kind, data) in attrs(value) {
                    if kind != ATTR_DATA {
                        continue;
                    }
                    match entry(data) {
                        Some(e) => entries.push(e),
                        None => malformed = Some(invalid("an ipset entry without an address")),
                    }
                }
            }
        })
        .map_err(|e| self.err("list", e))?;
        if let Some(e) = malformed {
            return Err(self.err("list", e));
        }
        Ok(entries)
    }

    fn family(&self) -> u8 {
        if self.ipv6 {
            NFPROTO_IPV6
        } else {
            NFPROTO_IPV4
        }
    }

    /// `PROTOCOL` and `SETNAME`, which every command starts with.
    fn head(&self) -> Vec<u8> {
        let mut attrs = Vec::new();
        push_attr(&mut attrs, ATTR_PROTOCOL, &[PROTOCOL]);
        let mut name = self.name.as_bytes().to_vec();
        name.push(0);
        push_attr(&mut attrs, ATTR_SETNAME, &name);
        attrs
    }

    /// The `IP` attribute (nested, the address in network byte order).
    fn ip_attr(&self, ip: IpAddr, what: &'static str) -> Result<Vec<u8>, IpsetError> {
        let mut addr = Vec::new();
        match (ip, self.ipv6) {
            (IpAddr::V4(v4), false) => push_attr(
                &mut addr,
                ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER,
                &v4.octets(),
            ),
            (IpAddr::V6(v6), true) => push_attr(
                &mut addr,
                ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER,
                &v6.octets(),
            ),
            _ => {
                return Err(IpsetError {
                    set: self.name.clone(),
                    what,
                    reason: format!("{ip} is not of the set's family"),
                })
            }
        }
        let mut data = Vec::new();
        push_attr(&mut data, ATTR_IP | NLA_F_NESTED, &addr);
        Ok(data)
    }

    fn call(
        &self,
        cmd: u16,
        flags: u16,
        attrs: &[u8],
        what: &'static str,
    ) -> Result<(), IpsetError> {
        self.call_raw(cmd, flags, attrs)
            .map_err(|e| self.err(what, e))
    }

    fn call_raw(&self, cmd: u16, flags: u16, attrs: &[u8]) -> std::io::Result<()> {
        let sock = nfnetlink_socket()?;
        let mut req = Vec::new();
        push_message(
            &mut req,
            (SUBSYS << 8) | cmd,
            flags,
            1,
            self.family(),
            0,
            attrs,
        );
        sock.send(&req, 0)?;
        receive(&sock, 1, |_| {})
    }

    fn err(&self, what: &'static str, e: std::io::Error) -> IpsetError {
        IpsetError {
            set: self.name.clone(),
            what,
            reason: describe(&e),
        }
    }
}

/// One `DATA` of a list answer: its address and comment.
fn entry(data: &[u8]) -> Option<Entry> {
    let mut ip = None;
    let mut comment = None;
    for (kind, value) in attrs(data) {
        match kind {
            ATTR_IP => {
                for (k, v) in attrs(value) {
                    ip = match (k, v.len()) {
                        (ATTR_IPADDR_IPV4, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
                        (ATTR_IPADDR_IPV6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
                        _ => ip,
                    };
                }
            }
            ATTR_COMMENT => {
                let text = value.split(|b| *b == 0).next().unwrap_or_default();
                comment = Some(String::from_utf8_lossy(text).into_owned());
            }
            _ => {}
        }
    }
    Some(Entry { ip: ip?, comment })
}

/// The kernel's error in words: ipset's own codes (`enum ipset_errno`, 4096 and up) are
/// not errnos.
fn describe(e: &std::io::Error) -> String {
    let text = match e.raw_os_error() {
        Some(libc::ENOENT) => "the set does not exist",
        Some(libc::EEXIST) => {
            "a set of that name exists with another type or options (destroy it: ipset destroy NAME)"
        }
        Some(libc::EPROTONOSUPPORT) | Some(libc::EAFNOSUPPORT) => {
            "the kernel has no ipset support (module ip_set, ip_set_hash_ip)"
        }
        Some(4097) => "protocol error (this kernel's ipset is too old or too new)",
        Some(4098) => "the kernel has no hash:ip set type with comments (module ip_set_hash_ip)",
        Some(4100) => "the set is in use",
        Some(4102) => "a set of that name exists with another type or family",
        Some(ERR_EXIST) => "the entry is already in the set, or not in it",
        Some(4108) => "the set is referenced by a rule",
        Some(4109) | Some(4110) => "the address is not of the set's family",
        Some(4112) => "the comment was refused",
        _ => return e.to_string(),
    };
    text.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_answers_are_read_and_malformed_ones_skipped() {
        // DATA { IP { IPADDR_IPV4 10.0.0.5 }, COMMENT "uid-1" }
        let mut ip = Vec::new();
        push_attr(
            &mut ip,
            ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER,
            &[10, 0, 0, 5],
        );
        let mut data = Vec::new();
        push_attr(&mut data, ATTR_IP | NLA_F_NESTED, &ip);
        push_attr(&mut data, ATTR_COMMENT, b"uid-1\0");
        assert_eq!(
            entry(&data),
            Some(Entry {
                ip: "10.0.0.5".parse().unwrap(),
                comment: Some("uid-1".into())
            })
        );
        // An address of the wrong length, a truncated attribute: no entry, no panic.
        let mut bad = Vec::new();
        push_attr(&mut bad, ATTR_IPADDR_IPV4, &[10, 0, 0]);
        let mut data = Vec::new();
        push_attr(&mut data, ATTR_IP | NLA_F_NESTED, &bad);
        assert_eq!(entry(&data), None);
        assert!(attrs(&[200, 0, 1, 0]).next().is_none());
        assert!(attrs(&[2, 0]).next().is_none());
    }
}
