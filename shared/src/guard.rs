//! Server-side request forgery guard: webhook destinations and fetched inputs must resolve to
//! public addresses unless configuration allows private ones.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a destination was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("destination URL is invalid: {0}")]
    InvalidUrl(String),
    #[error("destination {host} resolves to a non-public address {addr}")]
    NonPublic { host: String, addr: IpAddr },
    #[error("destination {0} does not resolve")]
    Unresolvable(String),
}

pub fn is_public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(addr: Ipv4Addr) -> bool {
    let [a, b, ..] = addr.octets();
    !(addr.is_loopback()
        || addr.is_private()
        || addr.is_link_local() // includes 169.254.169.254, the cloud metadata address
        || addr.is_unspecified()
        || addr.is_broadcast()
        || addr.is_documentation()
        || addr.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 192 && b == 0 && addr.octets()[2] == 0)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240)
}

fn is_public_v6(addr: Ipv6Addr) -> bool {
    let first = addr.segments()[0];
    !(addr.is_loopback()
        || addr.is_unspecified()
        || addr.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link local
        || first == 0x2001 && addr.segments()[1] == 0xdb8 // documentation
        || first == 0x64 && addr.segments()[1] == 0xff9b) // NAT64 can reach private v4
}

/// Resolves the URL's host and checks every address; returns them so the
/// request connects to exactly what was checked (no second lookup).
pub async fn check_destination(
    url: &url::Url,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, Refusal> {
    let host = url
        .host_str()
        .ok_or_else(|| Refusal::InvalidUrl(url.to_string()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| Refusal::InvalidUrl(url.to_string()))?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|_| Refusal::Unresolvable(host.clone()))?
        .collect();
    if addrs.is_empty() {
        return Err(Refusal::Unresolvable(host));
    }
    if !allow_private && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(Refusal::NonPublic {
            host,
            addr: bad.ip(),
        });
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_forms_are_refused() {
        for addr in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            let ip: IpAddr = addr.parse().expect("valid address");
            assert!(!is_public(ip), "{addr} judged public");
        }
        for addr in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"] {
            let ip: IpAddr = addr.parse().expect("valid address");
            assert!(is_public(ip), "{addr} judged private");
        }
    }

    #[tokio::test]
    async fn names_are_resolved_before_judging() {
        let url = url::Url::parse("http://localhost:9/hook").expect("valid url");
        assert!(matches!(
            check_destination(&url, false).await,
            Err(Refusal::NonPublic { .. })
        ));
        assert!(check_destination(&url, true).await.is_ok());
    }
}
