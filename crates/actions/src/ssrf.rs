//! The guard that keeps the HTTP action from reaching the machine it runs
//! on and the network behind it (server-side request forgery).
//!
//! A zap's URL can come from a webhook payload, so anyone who can post to a
//! webhook chooses where the worker connects. The guard decides on the
//! *addresses* the connection would use, never on the host's spelling:
//! literal IPs are checked before the request is sent, and names are
//! resolved by [`GuardedResolver`], which hands the connector only the
//! addresses that passed. Connecting to exactly what was checked leaves no
//! window for DNS rebinding between the check and the connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

pub use ipnet::IpNet;
use ipnet::{Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// IPv4 ranges that are not the public internet (IANA special-purpose
/// registry). Broadcast comes before 240/4 so it is named as itself.
const BLOCKED_V4: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 8), "\"this network\" 0.0.0.0/8"),
    (v4(10, 0, 0, 0, 8), "private network 10.0.0.0/8"),
    (v4(100, 64, 0, 0, 10), "carrier-grade NAT 100.64.0.0/10"),
    (v4(127, 0, 0, 0, 8), "loopback 127.0.0.0/8"),
    (
        v4(169, 254, 0, 0, 16),
        "link-local 169.254.0.0/16, cloud metadata",
    ),
    (v4(172, 16, 0, 0, 12), "private network 172.16.0.0/12"),
    (
        v4(192, 0, 0, 0, 24),
        "IETF protocol assignments 192.0.0.0/24",
    ),
    (v4(192, 0, 2, 0, 24), "documentation 192.0.2.0/24"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast 192.88.99.0/24"),
    (v4(192, 168, 0, 0, 16), "private network 192.168.0.0/16"),
    (v4(198, 18, 0, 0, 15), "benchmarking 198.18.0.0/15"),
    (v4(198, 51, 100, 0, 24), "documentation 198.51.100.0/24"),
    (v4(203, 0, 113, 0, 24), "documentation 203.0.113.0/24"),
    (v4(224, 0, 0, 0, 4), "multicast 224.0.0.0/4"),
    (v4(255, 255, 255, 255, 32), "broadcast 255.255.255.255"),
    (v4(240, 0, 0, 0, 4), "reserved 240.0.0.0/4"),
];

/// IPv6 ranges that are not the public internet. Ranges that embed an IPv4
/// address are not here: [`embedded_ipv4`] checks them as that address.
const BLOCKED_V6: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified ::"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback ::1"),
    (
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        "local-use NAT64 64:ff9b:1::/48",
    ),
    (
        v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
        "discard-only 100::/64",
    ),
    (
        v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48),
        "benchmarking 2001:2::/48",
    ),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        "documentation 2001:db8::/32",
    ),
    (
        v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
        "documentation 3fff::/20",
    ),
    (
        v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "unique local fc00::/7",
    ),
    (
        v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        "link-local fe80::/10",
    ),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        "site-local fec0::/10",
    ),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast ff00::/8"),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(segments: [u16; 8], prefix: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), prefix)
}

/// The IPv4 address an IPv6 address stands for, where traffic to it ends up
/// at that IPv4 address: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`), IPv4-translated (`::ffff:0:a.b.c.d`), NAT64
/// (`64:ff9b::a.b.c.d`) and 6to4 (`2002:aabb:ccdd::`).
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = ip.to_bits();
    let low = Ipv4Addr::from_bits(bits as u32);
    match ip.segments() {
        // `::` and `::1` are themselves, not 0.0.0.0 and 0.0.0.1.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0 | 0xffff, _, _] => Some(low),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, _, _, _, _, _, _, _] => Some(Ipv4Addr::from_bits((bits >> 80) as u32)),
        _ => None,
    }
}

/// The special-purpose range `ip` falls in, or `None` for a public address.
pub fn non_public_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => BLOCKED_V4
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, name)| *name),
        IpAddr::V6(ip) => match embedded_ipv4(ip) {
            Some(ip) => non_public_range(IpAddr::V4(ip)),
            None => BLOCKED_V6
                .iter()
                .find(|(net, _)| net.contains(&ip))
                .map(|(_, name)| *name),
        },
    }
}

/// An address the guard refused to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The name that resolved to `address`; `None` for a literal IP.
    pub host: Option<String>,
    pub address: IpAddr,
    /// Which special-purpose range `address` is in.
    pub range: &'static str,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            host,
            address,
            range,
        } = self;
        match host {
            Some(host) => write!(
                f,
                "blocked: {host} resolves to {address}, which is not a public address ({range})"
            ),
            None => write!(f, "blocked: {address} is not a public address ({range})"),
        }
    }
}

impl std::error::Error for Blocked {}

/// Decides which addresses the HTTP action may connect to: every public
/// address, plus the ranges an operator allowed.
#[derive(Debug, Clone, Default)]
pub struct AddressFilter {
    allow: Arc<[IpNet]>,
}

impl AddressFilter {
    pub fn new(allow: impl IntoIterator<Item = IpNet>) -> Self {
        Self {
            allow: allow.into_iter().collect(),
        }
    }

    fn is_allowlisted(&self, ip: IpAddr) -> bool {
        let embedded = match ip {
            IpAddr::V6(ip) => embedded_ipv4(ip).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.allow
            .iter()
            .any(|net| net.contains(&ip) || embedded.is_some_and(|ip| net.contains(&ip)))
    }

    /// `Ok` when a connection to `ip` may be made.
    pub fn check(&self, ip: IpAddr) -> Result<(), Blocked> {
        if self.is_allowlisted(ip) {
            return Ok(());
        }
        match non_public_range(ip) {
            Some(range) => Err(Blocked {
                host: None,
                address: ip,
                range,
            }),
            None => Ok(()),
        }
    }
}

/// The address a URL's host names directly, when it is an IP literal.
///
/// The `url` crate reads hosts the WHATWG way, so every spelling of an IPv4
/// address (`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`) is already
/// dotted decimal here; these are exactly the hosts the connector uses
/// without asking the resolver, so they must be checked before sending.
pub fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    let host = host
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

/// Resolves names with the system resolver and passes on only the
/// addresses the filter accepts, so the connector never sees the others.
#[derive(Debug, Clone)]
pub(crate) struct GuardedResolver {
    filter: AddressFilter,
}

impl GuardedResolver {
    pub(crate) fn new(filter: AddressFilter) -> Self {
        Self { filter }
    }
}

/// A name that resolved to no address at all.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves to no address")]
struct NoAddress(String);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let filter = self.filter.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // Port 0: the connector puts in the URL's port.
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_blocked = None;
            let passed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|address| match filter.check(address.ip()) {
                    Ok(()) => true,
                    Err(blocked) => {
                        first_blocked.get_or_insert(blocked);
                        false
                    }
                })
                .collect();
            if passed.is_empty() {
                return Err(match first_blocked {
                    Some(blocked) => Box::new(Blocked {
                        host: Some(host),
                        ..blocked
                    })
                        as Box<dyn std::error::Error + Send + Sync>,
                    None => Box::new(NoAddress(host)),
                });
            }
            Ok(Box::new(passed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    const BLOCKED: &[&str] = &[
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "10.255.255.255",
        "100.64.0.1",
        "100.127.255.254",
        "127.0.0.1",
        "127.255.255.254",
        "169.254.169.254",
        "169.254.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "192.88.99.1",
        "192.168.0.1",
        "192.168.255.255",
        "198.18.0.1",
        "198.19.255.255",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "fc00::1",
        "fd00::1",
        "fd12:3456:789a::1",
        "fe80::1",
        "febf::1",
        "fec0::1",
        "ff02::1",
        "ff05::1:3",
        "2001:db8::1",
        "2001:db8:ffff::1",
        "3fff::1",
        "100::1",
        "2001:2::1",
        "64:ff9b:1::1",
        // IPv4 inside IPv6, checked as the IPv4 address.
        "::ffff:127.0.0.1",
        "::ffff:7f00:1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "::10.1.2.3",
        "::ffff:0:127.0.0.1",
        "64:ff9b::127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::192.168.1.1",
        "2002:7f00:1::",
        "2002:a9fe:a9fe::1",
    ];

    const PUBLIC: &[&str] = &[
        "93.184.216.34",
        "1.1.1.1",
        "8.8.8.8",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "2606:2800:220:1::",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "::ffff:93.184.216.34",
        "64:ff9b::93.184.216.34",
        "2002:5db8:d822::1",
    ];

    #[test]
    fn blocks_every_non_public_address() {
        let filter = AddressFilter::default();
        for address in BLOCKED {
            let error = filter.check(ip(address)).unwrap_err();
            assert_eq!(error.address, ip(address));
            assert!(error.to_string().starts_with("blocked: "), "{error}");
        }
    }

    #[test]
    fn lets_public_addresses_through() {
        let filter = AddressFilter::default();
        for address in PUBLIC {
            assert_eq!(filter.check(ip(address)), Ok(()), "{address}");
        }
    }

    #[test]
    fn names_the_range() {
        let check = |address| AddressFilter::default().check(ip(address)).unwrap_err();
        assert_eq!(
            check("169.254.169.254").to_string(),
            "blocked: 169.254.169.254 is not a public address \
             (link-local 169.254.0.0/16, cloud metadata)"
        );
        assert_eq!(check("255.255.255.255").range, "broadcast 255.255.255.255");
        assert_eq!(check("::ffff:127.0.0.1").range, "loopback 127.0.0.0/8");
        assert_eq!(check("fd00::1").range, "unique local fc00::/7");
        assert_eq!(check("2002:a00:1::").range, "private network 10.0.0.0/8");
    }

    #[test]
    fn the_allowlist_lets_listed_ranges_through_and_nothing_else() {
        let filter = AddressFilter::new([net("127.0.0.0/8"), net("fd00:1::/32")]);
        assert_eq!(filter.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(filter.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(filter.check(ip("fd00:1::5")), Ok(()));
        assert!(filter.check(ip("::1")).is_err());
        assert!(filter.check(ip("10.0.0.1")).is_err());
        assert!(filter.check(ip("fd00:2::5")).is_err());
        assert!(filter.check(ip("169.254.169.254")).is_err());
    }

    /// The `url` crate (which reqwest parses with) reads hosts the WHATWG
    /// way, so every spelling of an IPv4 address arrives as dotted decimal.
    #[test]
    fn unusual_ip_spellings_parse_to_the_address_they_mean() {
        let cases = [
            ("http://2130706433/", "127.0.0.1"),
            ("http://0177.0.0.1/", "127.0.0.1"),
            ("http://0x7f.1/", "127.0.0.1"),
            ("http://127.1/", "127.0.0.1"),
            ("http://127.0.0.1./", "127.0.0.1"),
            ("http://0x7F000001/", "127.0.0.1"),
            ("http://017700000001/", "127.0.0.1"),
            ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254"),
            ("http://0/", "0.0.0.0"),
            ("http://[::ffff:7f00:1]/", "::ffff:127.0.0.1"),
            ("http://[0:0:0:0:0:ffff:127.0.0.1]/", "::ffff:127.0.0.1"),
        ];
        for (url, expected) in cases {
            let parsed = reqwest::Url::parse(url).unwrap();
            let address = literal_ip(&parsed).unwrap_or_else(|| panic!("{url}: {parsed}"));
            assert_eq!(address, ip(expected), "{url}");
            assert!(AddressFilter::default().check(address).is_err(), "{url}");
        }
        let name = reqwest::Url::parse("http://localhost:8080/").unwrap();
        assert_eq!(literal_ip(&name), None);
    }

    #[tokio::test]
    async fn the_resolver_drops_names_that_resolve_to_blocked_addresses() {
        let resolver = GuardedResolver::new(AddressFilter::default());
        let error = match resolver.resolve("localhost".parse().unwrap()).await {
            Ok(addresses) => panic!("resolved to {:?}", addresses.collect::<Vec<_>>()),
            Err(error) => error,
        };
        let blocked = error.downcast_ref::<Blocked>().expect("a Blocked error");
        assert_eq!(blocked.host.as_deref(), Some("localhost"));
        assert!(blocked.address.is_loopback(), "{blocked}");

        let allowing =
            GuardedResolver::new(AddressFilter::new([net("127.0.0.0/8"), net("::1/128")]));
        let addresses: Vec<_> = match allowing.resolve("localhost".parse().unwrap()).await {
            Ok(addresses) => addresses.collect(),
            Err(error) => panic!("{error}"),
        };
        assert!(!addresses.is_empty());
        assert!(addresses.iter().all(|address| address.ip().is_loopback()));
    }

    fn in_v4(net: Ipv4Net) -> impl Strategy<Value = IpAddr> {
        let base = net.network().to_bits();
        let size = net.hostmask().to_bits();
        (0..=size).prop_map(move |offset| IpAddr::V4(Ipv4Addr::from_bits(base | offset)))
    }

    fn in_v6(net: Ipv6Net) -> impl Strategy<Value = IpAddr> {
        let base = net.network().to_bits();
        let size = net.hostmask().to_bits();
        (0..=size).prop_map(move |offset| IpAddr::V6(Ipv6Addr::from_bits(base | offset)))
    }

    fn any_blocked_address() -> impl Strategy<Value = IpAddr> {
        let v4: Vec<_> = BLOCKED_V4
            .iter()
            .map(|(net, _)| in_v4(*net).boxed())
            .collect();
        let v6: Vec<_> = BLOCKED_V6
            .iter()
            .map(|(net, _)| in_v6(*net).boxed())
            .collect();
        prop::strategy::Union::new(v4.into_iter().chain(v6))
    }

    fn any_blocked_v4() -> impl Strategy<Value = Ipv4Addr> {
        let ranges: Vec<_> = BLOCKED_V4
            .iter()
            .map(|(net, _)| in_v4(*net).boxed())
            .collect();
        prop::strategy::Union::new(ranges).prop_map(|ip| match ip {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => unreachable!(),
        })
    }

    proptest! {
        #[test]
        fn every_address_in_a_blocked_range_is_blocked(address in any_blocked_address()) {
            prop_assert!(AddressFilter::default().check(address).is_err());
        }

        #[test]
        fn blocked_ipv4_stays_blocked_inside_ipv6(address in any_blocked_v4(), form in 0..5usize) {
            let octets = address.octets();
            let [a, b] = [u16::from_be_bytes([octets[0], octets[1]]), u16::from_be_bytes([octets[2], octets[3]])];
            let wrapped = match form {
                0 => address.to_ipv6_mapped(),
                1 => Ipv6Addr::new(0, 0, 0, 0, 0, 0, a, b),
                2 => Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, a, b),
                3 => Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, a, b),
                _ => Ipv6Addr::new(0x2002, a, b, 0, 0, 0, 0, 1),
            };
            prop_assert!(AddressFilter::default().check(IpAddr::V6(wrapped)).is_err(), "{wrapped}");
        }

        #[test]
        fn allowlisted_ranges_pass(
            (allowed, address) in any_blocked_address().prop_flat_map(|address| {
                let max: u8 = if address.is_ipv4() { 32 } else { 128 };
                (0..=max).prop_map(move |prefix| {
                    (IpNet::new(address, prefix).unwrap().trunc(), address)
                })
            }),
        ) {
            let filter = AddressFilter::new([allowed]);
            prop_assert_eq!(filter.check(address), Ok(()));
        }

        #[test]
        fn an_allowlist_admits_nothing_outside_itself(
            address in any_blocked_address(),
            other in any_blocked_address(),
        ) {
            let allowed = IpNet::new(other, if other.is_ipv4() { 32 } else { 128 }).unwrap();
            prop_assume!(other != address);
            prop_assume!(match address {
                IpAddr::V6(ip) => embedded_ipv4(ip).map(IpAddr::V4) != Some(other),
                IpAddr::V4(_) => true,
            });
            prop_assert!(AddressFilter::new([allowed]).check(address).is_err());
        }

        #[test]
        fn public_ipv4_addresses_pass(address in any::<u32>().prop_map(Ipv4Addr::from_bits)) {
            let in_table = BLOCKED_V4.iter().any(|(net, _)| net.contains(&address));
            prop_assert_eq!(AddressFilter::default().check(IpAddr::V4(address)).is_ok(), !in_table);
        }
    }
}
