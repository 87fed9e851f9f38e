//! Who may post webhooks, by network address: `http.allow_from` (CIDRs), with the client's
//! address taken from a forwarding header only when the connection comes from one of
//! `http.trusted_proxies` (the load balancer). From anyone else the header is ignored: a
//! client cannot talk its way in by writing it.
//!
//! Only the one header named by `http.forwarded_header` is read (`X-Forwarded-For` by
//! default). Proxies append to the header they maintain but pass others through as the client
//! wrote them, so reading a second header would let a client forge its address.
//!
//! Also here, by the same address: the budget of failed key checks each [`Source`] gets
//! before its wrong keys are answered 429 ([`KeyFailureBudget`]).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper::HeaderMap;
use ipnet::IpNet;

/// Who a budget, a connection cap or a log summary is kept for: an IPv4 address, or an IPv6
/// /64, since one subscriber's network is at least that big and a client in it can use any
/// of its 2^64 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let network = u128::from(v6) & !((1u128 << 64) - 1);
                Source(IpAddr::V6(Ipv6Addr::from(network)))
            }
            v4 => Source(v4),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Most sources whose key failures are remembered at once. Each costs well under 100 bytes;
/// when a flood from more sources than this fills the table, wrong keys from sources not yet
/// in it are answered 429 until the next sweep frees room (valid keys never are).
pub const MAX_KEY_FAILURE_SOURCES: usize = 65_536;

/// How many failed key checks each [`Source`] may make: `http.key_failure_burst` at once,
/// refilled at `http.key_failures_per_minute` (GCRA, from `governor`). Only failures spend
/// it: a valid key is never refused for it, so senders that share a load balancer's address
/// with a guesser are not locked out.
pub struct KeyFailureBudget {
    /// `None` when `http.key_failures_per_minute` is 0 (off).
    limiter: Option<(DefaultKeyedRateLimiter<Source>, Quota)>,
}

impl KeyFailureBudget {
    pub fn new(per_minute: u32, burst: u32) -> KeyFailureBudget {
        let limiter = NonZeroU32::new(per_minute).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            let quota = Quota::per_minute(rate).allow_burst(burst);
            (RateLimiter::keyed(quota), quota)
        });
        KeyFailureBudget { limiter }
    }

    /// Spends one failure from `source`'s budget; when none is left, how long until one is.
    pub fn spend(&self, source: Source) -> Result<(), Duration> {
        let Some((limiter, quota)) = &self.limiter else {
            return Ok(());
        };
        if limiter.len() >= MAX_KEY_FAILURE_SOURCES {
            // Full: no new source is taken in (bounding this memory is the point), and every
            // wrong key is refused until a sweep makes room.
            return Err(quota.replenish_interval());
        }
        limiter
            .check_key(&source)
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Forgets sources whose budget has refilled; run every few seconds, so the table holds
    /// only sources that failed recently.
    pub fn forget_refilled(&self) {
        if let Some((limiter, _)) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

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
    fn wrong_keys_spend_a_budget_per_source_and_v6_networks_share_one() {
        let budget = KeyFailureBudget::new(1, 3);
        let a = Source::of(ip("203.0.113.9"));
        for _ in 0..3 {
            assert!(budget.spend(a).is_ok());
        }
        let wait = budget.spend(a).unwrap_err();
        assert!(
            wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        // Another address has its own budget.
        assert!(budget.spend(Source::of(ip("203.0.113.10"))).is_ok());
        // An IPv6 /64 is one source, whatever address in it is used.
        let v6 = |s| Source::of(ip(s));
        for s in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::"] {
            assert!(budget.spend(v6(s)).is_ok());
        }
        assert!(budget.spend(v6("2001:db8:1:2::9")).is_err());
        assert_eq!(v6("2001:db8:1:2::9").to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            v6("::ffff:203.0.113.9"),
            a,
            "IPv4 seen through IPv6 is IPv4"
        );
        // Off: no budget at all.
        let off = KeyFailureBudget::new(0, 3);
        for _ in 0..100 {
            assert!(off.spend(a).is_ok());
        }
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
