//! Which addresses a handler's `fetch()` may connect to.
//!
//! An edge node sits inside an operator's network: without a guard, a
//! tenant could reach the node's admin listener, other services on its
//! private network or the cloud metadata service. Every address a fetch
//! would connect to (an IP literal in the URL, or each address a name
//! resolves to, on every redirect hop) is classified here first.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why an address is off limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16) and RFC 4193 (fc00::/7).
    Private,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// RFC 6598 carrier-grade NAT, 100.64/10.
    SharedAddressSpace,
    /// 224/4, ff00::/8.
    Multicast,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
    /// 169.254.169.254, fd00:ec2::254 and friends.
    CloudMetadata,
    /// Other special-purpose ranges (240/4, benchmarking, documentation,
    /// IETF protocol assignments, site-local IPv6) that no public service uses.
    Reserved,
}

impl Blocked {
    /// How the refusal reads in an error message.
    pub fn describe(self) -> &'static str {
        match self {
            Blocked::Loopback => "a loopback address",
            Blocked::Private => "a private-network address",
            Blocked::LinkLocal => "a link-local address",
            Blocked::SharedAddressSpace => "a carrier-grade NAT address",
            Blocked::Multicast => "a multicast address",
            Blocked::Unspecified => "an unspecified address",
            Blocked::Broadcast => "the broadcast address",
            Blocked::CloudMetadata => "a cloud metadata address",
            Blocked::Reserved => "a reserved address",
        }
    }
}

/// Classifies `ip`: `None` for an ordinary public address.
pub fn classify(ip: IpAddr) -> Option<Blocked> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Blocked> {
    let [a, b, c, _] = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(169, 254, 170, 2) {
        return Some(Blocked::CloudMetadata);
    }
    if ip.is_loopback() {
        return Some(Blocked::Loopback);
    }
    if ip.is_private() {
        return Some(Blocked::Private);
    }
    if ip.is_link_local() {
        return Some(Blocked::LinkLocal);
    }
    if a == 100 && (64..128).contains(&b) {
        return Some(Blocked::SharedAddressSpace);
    }
    if ip.is_multicast() {
        return Some(Blocked::Multicast);
    }
    if ip.is_broadcast() {
        return Some(Blocked::Broadcast);
    }
    if a == 0 {
        return Some(Blocked::Unspecified);
    }
    let reserved = a >= 240 // 240/4 (future use)
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24 IETF assignments
        || (a == 192 && b == 0 && c == 2) // TEST-NET-1
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || (a == 198 && b == 51 && c == 100) // TEST-NET-2
        || (a == 203 && b == 0 && c == 113); // TEST-NET-3
    reserved.then_some(Blocked::Reserved)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Blocked> {
    // IPv4 inside IPv6 reaches the IPv4 address: classify that.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let seg = ip.segments();
    // NAT64 (64:ff9b::/96) translates to the embedded IPv4 address.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        return classify_v4(embedded_v4(seg[6], seg[7]));
    }
    // 6to4 (2002::/16) tunnels to the IPv4 address in bits 16..48.
    if seg[0] == 0x2002
        && let Some(blocked) = classify_v4(embedded_v4(seg[1], seg[2]))
    {
        return Some(blocked);
    }
    if ip == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254) {
        return Some(Blocked::CloudMetadata);
    }
    if ip.is_loopback() {
        return Some(Blocked::Loopback);
    }
    if ip.is_unspecified() {
        return Some(Blocked::Unspecified);
    }
    if ip.is_multicast() {
        return Some(Blocked::Multicast);
    }
    if seg[0] & 0xfe00 == 0xfc00 {
        return Some(Blocked::Private);
    }
    if seg[0] & 0xffc0 == 0xfe80 {
        return Some(Blocked::LinkLocal);
    }
    // Deprecated site-local, IPv4-compatible (::a.b.c.d), discard-only,
    // documentation.
    if seg[0] & 0xffc0 == 0xfec0
        || (seg[0..6] == [0, 0, 0, 0, 0, 0])
        || (seg[0] == 0x100 && seg[1..4] == [0, 0, 0])
        || (seg[0] == 0x2001 && seg[1] == 0xdb8)
    {
        return Some(Blocked::Reserved);
    }
    None
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// An allowance entry that is not a name, an address or a network.
#[derive(Debug, thiserror::Error)]
#[error("{entry:?} is not a host name, an IP address or a network like 10.0.0.0/8")]
pub struct BadAllowance {
    /// Position of the entry in the list.
    pub index: usize,
    /// The entry.
    pub entry: String,
}

/// Exceptions an operator grants for development: hosts and networks
/// handlers may reach even though they are private.
#[derive(Debug, Clone, Default)]
pub struct Allowance {
    hosts: Vec<String>,
    nets: Vec<IpNet>,
}

impl Allowance {
    /// Parses `entries`: each a host name (`api.internal`), an address
    /// (`127.0.0.1`) or a network (`10.1.0.0/16`).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Allowance, BadAllowance> {
        let mut out = Allowance::default();
        for (index, e) in entries.iter().enumerate() {
            let e = e.as_ref().trim();
            if let Ok(net) = e.parse::<IpNet>() {
                out.nets.push(net);
            } else if let Ok(ip) = e.trim_matches(['[', ']']).parse::<IpAddr>() {
                out.nets.push(IpNet::from(ip));
            } else if !e.is_empty()
                && e.is_ascii()
                && !e.contains(['/', ':', ' ', '*'])
                && !e.ends_with('.')
            {
                out.hosts.push(e.to_ascii_lowercase());
            } else {
                return Err(BadAllowance {
                    index,
                    entry: e.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Whether nothing is allowed beyond the default.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.nets.is_empty()
    }

    /// Whether a connection to `ip`, reached through the name `host` (the
    /// URL's host, if it is a name), may go ahead.
    pub fn check(&self, host: Option<&str>, ip: IpAddr) -> Result<(), Blocked> {
        let Some(blocked) = classify(ip) else {
            return Ok(());
        };
        let by_host = host.is_some_and(|h| {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            self.hosts.contains(&h)
        });
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if by_host || self.nets.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        Err(blocked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<Blocked> {
        classify(s.parse().expect("ip"))
    }

    #[test]
    fn private_and_special_ranges_are_blocked() {
        use Blocked::*;
        let cases = [
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.9", Some(Loopback)),
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("169.254.1.1", Some(LinkLocal)),
            ("169.254.169.254", Some(CloudMetadata)),
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("224.0.0.1", Some(Multicast)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("255.255.255.255", Some(Broadcast)),
            ("240.0.0.1", Some(Reserved)),
            ("198.18.0.1", Some(Reserved)),
            ("::1", Some(Loopback)),
            ("::", Some(Unspecified)),
            ("fc00::1", Some(Private)),
            ("fd12:3456::1", Some(Private)),
            ("fe80::1", Some(LinkLocal)),
            ("ff02::1", Some(Multicast)),
            ("fd00:ec2::254", Some(CloudMetadata)),
            // IPv4 smuggled inside IPv6.
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(CloudMetadata)),
            ("64:ff9b::10.0.0.1", Some(Private)),
            ("2002:7f00:1::", Some(Loopback)),
            ("::127.0.0.1", Some(Reserved)),
            ("2001:db8::1", Some(Reserved)),
        ];
        for (ip, want) in cases {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "100.63.255.255",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "64:ff9b::1.1.1.1",
            "2002:0808:0808::1",
        ] {
            assert_eq!(class(ip), None, "{ip}");
        }
    }

    #[test]
    fn allowances_open_only_what_they_name() {
        let a = Allowance::parse(&["127.0.0.1", "10.1.0.0/16", "API.internal"]).expect("parse");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(a.check(None, ip("127.0.0.1")), Ok(()));
        assert_eq!(a.check(None, ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(a.check(None, ip("127.0.0.2")), Err(Blocked::Loopback));
        assert_eq!(a.check(None, ip("10.1.200.3")), Ok(()));
        assert_eq!(a.check(None, ip("10.2.0.1")), Err(Blocked::Private));
        assert_eq!(a.check(Some("api.internal."), ip("10.9.9.9")), Ok(()));
        assert_eq!(
            a.check(Some("other.internal"), ip("169.254.169.254")),
            Err(Blocked::CloudMetadata)
        );
        assert_eq!(a.check(Some("example.com"), ip("93.184.216.34")), Ok(()));
        let bad = Allowance::parse(&["10.0.0.1", "*.internal"]).expect_err("wildcard");
        assert_eq!((bad.index, bad.entry.as_str()), (1, "*.internal"));
        assert!(Allowance::parse(&["http://x"]).is_err());
        assert!(Allowance::default().is_empty());
    }
}
