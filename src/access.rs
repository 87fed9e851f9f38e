//! Who may post webhooks, by network address: `http.allow_from` (CIDRs), with the client's
//! address taken from a forwarding header only when the connection comes from one of
//! `http.trusted_proxies` (the load balancer). From anyone else the header is ignored: a
//! client cannot talk its way in by writing it.
//!
//! Only the one header named by `http.forwarded_header` is read (`X-Forwarded-For` by
//! default). Proxies append to the header they maintain but pass others through as the client
//! wrote them, so reading a second header would let a client forge its address.

use std::net::IpAddr;

use hyper::HeaderMap;
use ipnet::IpNet;

/// The network rules of the webhook path.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    allow_from: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
    header: ForwardedHeader,
}

/// Which header the trusted proxies maintain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, ...` (nginx, Caddy, HAProxy, most ingresses).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

impl AccessPolicy {
    pub fn new(
        allow_from: Vec<IpNet>,
        trusted_proxies: Vec<IpNet>,
        header: ForwardedHeader,
    ) -> AccessPolicy {
        AccessPolicy {
            allow_from,
            trusted_proxies,
            header,
        }
    }

    /// The address of the client behind any trusted proxies.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusted(peer) {
            return peer;
        }
        // Each proxy appends the address it saw; walk back from the nearest hop and stop at
        // the first one that is not ours.
        let hops = forwarded_for(headers, self.header);
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = hop else {
                break;
            };
            client = *ip;
            if !self.trusted(client) {
                break;
            }
        }
        client
    }

    pub fn allows(&self, client: IpAddr) -> bool {
        self.allow_from.is_empty() || self.allow_from.iter().any(|net| net.contains(&client))
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// The hops listed in `header`, nearest last; `None` for a hop that is not an address
/// (`unknown`, an obfuscated id, garbage).
fn forwarded_for(headers: &HeaderMap, header: ForwardedHeader) -> Vec<Option<IpAddr>> {
    if header == ForwardedHeader::Forwarded {
        return headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.trim().split_once('='))
                    .find(|(name, _)| name.eq_ignore_ascii_case("for"))
                    .and_then(|(_, value)| parse_node(value))
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(parse_node)
        .collect()
}

/// `1.2.3.4`, `1.2.3.4:80`, `"[2001:db8::1]:4711"`, `2001:db8::1`.
fn parse_node(value: &str) -> Option<IpAddr> {
    let value = value.trim().trim_matches('"');
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split_once(']')?.0.parse::<IpAddr>().ok();
    }
    let (host, _port) = value.rsplit_once(':')?;
    host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let policy = AccessPolicy::new(vec![], nets(&["10.0.0.0/8"]), ForwardedHeader::default());
        let xff = headers(&[("x-forwarded-for", "203.0.113.9")]);
        // Straight from the internet: the header is the client's own claim, ignored.
        assert_eq!(
            policy.client_ip(ip("198.51.100.1"), &xff),
            ip("198.51.100.1")
        );
        // Through the load balancer: believed.
        assert_eq!(policy.client_ip(ip("10.1.2.3"), &xff), ip("203.0.113.9"));
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        let policy = AccessPolicy::new(vec![], nets(&["10.0.0.0/8"]), ForwardedHeader::default());
        // The client forged the first entry; the proxies appended the rest.
        let xff = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.5")]);
        assert_eq!(policy.client_ip(ip("10.0.0.1"), &xff), ip("203.0.113.9"));
        // A Forwarded header the proxy passed through from the client changes nothing.
        let both = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=198.51.100.66"),
        ]);
        assert_eq!(policy.client_ip(ip("10.0.0.1"), &both), ip("203.0.113.9"));
        let policy = AccessPolicy::new(vec![], nets(&["10.0.0.0/8"]), ForwardedHeader::Forwarded);
        let forwarded = headers(&[(
            "forwarded",
            "for=1.1.1.1, for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.5",
        )]);
        assert_eq!(
            policy.client_ip(ip("10.0.0.1"), &forwarded),
            ip("2001:db8::1")
        );
        let unknown = headers(&[("forwarded", "for=unknown, for=10.0.0.5")]);
        assert_eq!(policy.client_ip(ip("10.0.0.1"), &unknown), ip("10.0.0.5"));
    }

    #[test]
    fn allow_from_is_everyone_when_empty_and_a_list_otherwise() {
        assert!(AccessPolicy::default().allows(ip("8.8.8.8")));
        let policy = AccessPolicy::new(
            nets(&["203.0.113.0/24", "2001:db8::/32"]),
            vec![],
            ForwardedHeader::default(),
        );
        assert!(policy.allows(ip("203.0.113.200")));
        assert!(policy.allows(ip("2001:db8::7")));
        assert!(!policy.allows(ip("203.0.114.1")));
        // An IPv4 peer seen through an IPv6 socket is still IPv4.
        assert_eq!(
            policy.client_ip(ip("::ffff:203.0.113.5"), &HeaderMap::new()),
            ip("203.0.113.5")
        );
    }
}
