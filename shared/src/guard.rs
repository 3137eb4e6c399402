//! Server-side request forgery guard: webhook destinations and fetched inputs must resolve to
//! public addresses unless configuration allows private ones. Link-local and cloud metadata
//! addresses are refused even then: allowing private destinations is for receivers on this
//! machine or network (development), never for the instance's credentials.

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
    #[error(
        "destination {host} resolves to {addr}, a link-local or cloud metadata address, \
         which is never allowed"
    )]
    LinkLocal { host: String, addr: IpAddr },
    #[error("destination {0} is a cloud metadata service, which is never allowed")]
    MetadataHost(String),
}

/// Names of metadata services, refused before any lookup (where they do not
/// resolve, a later lookup might).
const METADATA_HOSTS: &[&str] = &["metadata.google.internal", "metadata.goog"];

/// Link-local and cloud metadata addresses: refused in every configuration.
pub fn is_never_allowed(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => is_never_allowed_v4(v4),
        IpAddr::V6(v6) => {
            let [first, second, ..] = v6.segments();
            // IPv4-mapped, IPv4-compatible and NAT64 forms reach the IPv4 address.
            let embedded = if first == 0x64 && second == 0xff9b {
                let [.., a, b, c, d] = v6.octets();
                Some(Ipv4Addr::new(a, b, c, d))
            } else {
                v6.to_ipv4()
            };
            (first & 0xffc0) == 0xfe80 // link local
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) // AWS metadata
                || embedded.is_some_and(is_never_allowed_v4)
        }
    }
}

fn is_never_allowed_v4(addr: Ipv4Addr) -> bool {
    addr.is_link_local() // 169.254.0.0/16, with 169.254.169.254 (AWS, GCP, Azure, …)
        || addr == Ipv4Addr::new(100, 100, 100, 200) // Alibaba Cloud metadata
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
    if METADATA_HOSTS.contains(&host.to_ascii_lowercase().trim_end_matches('.')) {
        return Err(Refusal::MetadataHost(host));
    }
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
    if let Some(bad) = addrs.iter().find(|a| is_never_allowed(a.ip())) {
        return Err(Refusal::LinkLocal {
            host,
            addr: bad.ip(),
        });
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

    #[test]
    fn link_local_and_metadata_forms_are_never_allowed() {
        for addr in [
            "169.254.169.254",
            "169.254.0.1",
            "100.100.100.200",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            let ip: IpAddr = addr.parse().expect("valid address");
            assert!(is_never_allowed(ip), "{addr} allowed");
        }
        for addr in ["127.0.0.1", "::1", "10.0.0.1", "fd00::1", "8.8.8.8"] {
            let ip: IpAddr = addr.parse().expect("valid address");
            assert!(!is_never_allowed(ip), "{addr} never allowed");
        }
    }

    #[tokio::test]
    async fn metadata_is_refused_even_where_private_is_allowed() {
        for (url, metadata_host) in [
            ("http://169.254.169.254/latest/meta-data/", false),
            ("http://[fd00:ec2::254]/latest/meta-data/", false),
            ("http://[fe80::1]:8080/hook", false),
            ("http://metadata.google.internal/computeMetadata/v1/", true),
            ("http://METADATA.google.internal./computeMetadata/v1/", true),
        ] {
            let url = url::Url::parse(url).expect("valid url");
            let refusal = check_destination(&url, true).await.expect_err(url.as_str());
            match refusal {
                Refusal::MetadataHost(_) => assert!(metadata_host, "{url}: {refusal}"),
                Refusal::LinkLocal { .. } => assert!(!metadata_host, "{url}: {refusal}"),
                other => panic!("{url}: {other}"),
            }
        }
        let loopback = url::Url::parse("http://127.0.0.1:9/hook").expect("valid url");
        assert!(check_destination(&loopback, true).await.is_ok());
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
