//! Arbitrary URLs and addresses through the HTTP action's SSRF guard: no
//! IP-literal host escapes `literal_ip`, the default filter blocks exactly
//! the non-public ranges, and an IPv6 address carrying a blocked IPv4
//! address is blocked too.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use url::{Host, Url};
use zapflow_actions::ssrf::{AddressFilter, embedded_ipv4, literal_ip, non_public_range};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    url: &'a str,
    address: [u8; 16],
    ipv4: bool,
}

fn assert_filter_agrees(filter: &AddressFilter, ip: IpAddr) {
    assert_eq!(
        filter.check(ip).is_err(),
        non_public_range(ip).is_some(),
        "{ip}"
    );
}

fuzz_target!(|input: Input<'_>| {
    let filter = AddressFilter::default();

    if let Ok(url) = Url::parse(input.url) {
        let literal = literal_ip(&url);
        match url.host() {
            Some(Host::Ipv4(ip)) => assert_eq!(literal, Some(IpAddr::V4(ip)), "{url}"),
            Some(Host::Ipv6(ip)) => assert_eq!(literal, Some(IpAddr::V6(ip)), "{url}"),
            Some(Host::Domain(_)) | None => {}
        }
        if let Some(ip) = literal {
            assert_filter_agrees(&filter, ip);
        }
    }

    let ip = if input.ipv4 {
        let [a, b, c, d, ..] = input.address;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        IpAddr::V6(Ipv6Addr::from(input.address))
    };
    assert_filter_agrees(&filter, ip);
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = embedded_ipv4(v6)
        && non_public_range(IpAddr::V4(v4)).is_some()
    {
        assert!(non_public_range(ip).is_some(), "{v6} carries {v4}");
    }
});
