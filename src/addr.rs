//! Client addresses (SPEC §4 `allow_ips`, `trusted_proxies`; §8, §11): CIDR
//! lists and who the client is behind a reverse proxy. Pure: values in,
//! values out.

use std::net::IpAddr;

/// An address block such as `192.168.1.0/24`, `10.0.0.7` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr` or `addr/prefix`. Host bits set below the prefix are an
    /// error: `192.168.1.5/24` is more likely a typo than a network.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| format!("invalid address in {s:?}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("invalid prefix length in {s:?}")),
            },
        };
        let cidr = Cidr { net, prefix };
        if cidr.masked(net) != bits(net) {
            return Err(format!("{s:?} has host bits set (did you mean {}?)", cidr.network()));
        }
        Ok(cidr)
    }

    /// Whether `ip` is inside the block. An IPv4-mapped IPv6 address
    /// (`::ffff:10.0.0.1`) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if ip.is_ipv4() != self.net.is_ipv4() {
            return false;
        }
        self.masked(ip) == bits(self.net)
    }

    fn masked(&self, ip: IpAddr) -> u128 {
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let host_bits = width - u32::from(self.prefix);
        let mask = if host_bits >= 128 { 0 } else { !0u128 << host_bits };
        bits(ip) & mask
    }

    fn network(&self) -> String {
        let masked = self.masked(self.net);
        let ip = match self.net {
            IpAddr::V4(_) => IpAddr::from((masked as u32).to_be_bytes()),
            IpAddr::V6(_) => IpAddr::from(masked.to_be_bytes()),
        };
        format!("{ip}/{}", self.prefix)
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so one `allow_ips` entry covers a
/// client whether it arrives on a v4 or a dual-stack socket.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn any_contains(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

/// Who the client is, and the `X-Forwarded-For` to send upstream (SPEC §8,
/// §11): from a trusted proxy, the right-most address of its
/// `X-Forwarded-For` chain that is not itself a trusted proxy, and the
/// incoming chain plus the peer; from anyone else, the peer alone (their
/// header is not believed, and not passed on).
pub fn client_ip(peer: IpAddr, xff: &[&str], trusted: &[Cidr]) -> (IpAddr, String) {
    let peer = canonical(peer);
    if !any_contains(trusted, peer) {
        return (peer, peer.to_string());
    }
    let chain: Vec<&str> =
        xff.iter().flat_map(|h| h.split(',')).map(str::trim).filter(|s| !s.is_empty()).collect();
    let mut client = peer;
    for hop in chain.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !any_contains(trusted, client) {
                    break;
                }
            }
            // A hop that is not an address cannot be trusted further.
            Err(_) => break,
        }
    }
    let mut forwarded = chain.join(", ");
    if !forwarded.is_empty() {
        forwarded.push_str(", ");
    }
    forwarded.push_str(&peer.to_string());
    (client, forwarded)
}

/// The `X-Forwarded-Proto` to send upstream (SPEC §8): from a trusted proxy,
/// the first value of the first such header if it is `http` or `https` (so
/// Ollama behind Caddy's TLS learns the request was `https`); otherwise, and
/// from anyone else, butler's own scheme (`own`).
pub fn forwarded_proto(
    peer: IpAddr,
    values: &[&str],
    trusted: &[Cidr],
    own: &'static str,
) -> &'static str {
    if !any_contains(trusted, canonical(peer)) {
        return own;
    }
    let first = values.first().and_then(|v| v.split(',').next()).map(str::trim);
    match first {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        Some(p) if p.eq_ignore_ascii_case("http") => "http",
        _ => own,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs() {
        let lan = Cidr::parse("192.168.1.0/24").unwrap();
        assert!(lan.contains(ip("192.168.1.77")));
        assert!(!lan.contains(ip("192.168.2.1")));
        assert!(lan.contains(ip("::ffff:192.168.1.9")));
        assert!(!lan.contains(ip("fd00::1")));
        let one = Cidr::parse("10.0.0.7").unwrap();
        assert!(one.contains(ip("10.0.0.7")) && !one.contains(ip("10.0.0.8")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fdab::1")));
        for bad in ["", "10.0.0.0/33", "10.0.0.1/24", "x/8", "10.0.0.0/", "10.0.0.0/+8", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert!(Cidr::parse("10.0.0.1/24").unwrap_err().contains("10.0.0.0/24"));
    }

    #[test]
    fn forwarded_for() {
        let trusted = [Cidr::parse("127.0.0.1/32").unwrap(), Cidr::parse("10.0.0.0/8").unwrap()];
        // Untrusted peer: its header is ignored.
        assert_eq!(
            client_ip(ip("203.0.113.5"), &["1.2.3.4"], &trusted),
            (ip("203.0.113.5"), "203.0.113.5".into())
        );
        // Trusted peer: the right-most untrusted hop.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &["6.6.6.6, 198.51.100.7, 10.1.2.3"], &trusted),
            (ip("198.51.100.7"), "6.6.6.6, 198.51.100.7, 10.1.2.3, 127.0.0.1".into())
        );
        // Several headers are one list; garbage stops the walk.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &["198.51.100.7", "junk"], &trusted).0,
            ip("127.0.0.1")
        );
        // A trusted peer without the header is the client.
        assert_eq!(client_ip(ip("10.0.0.2"), &[], &trusted), (ip("10.0.0.2"), "10.0.0.2".into()));
        // Every hop trusted: the left-most one.
        assert_eq!(client_ip(ip("127.0.0.1"), &["10.9.9.9"], &trusted).0, ip("10.9.9.9"));
    }

    #[test]
    fn forwarded_proto_is_believed_only_from_trusted_proxies() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let caddy = ip("10.0.0.2");
        assert_eq!(forwarded_proto(caddy, &["https"], &trusted, "http"), "https");
        assert_eq!(forwarded_proto(caddy, &["HTTPS"], &trusted, "http"), "https");
        assert_eq!(forwarded_proto(caddy, &["http"], &trusted, "https"), "http");
        assert_eq!(forwarded_proto(ip("::ffff:10.0.0.2"), &["https"], &trusted, "http"), "https");
        // The first value only, and only if it is a scheme butler knows.
        assert_eq!(forwarded_proto(caddy, &[" https , http"], &trusted, "http"), "https");
        assert_eq!(forwarded_proto(caddy, &["http", "https"], &trusted, "https"), "http");
        assert_eq!(forwarded_proto(caddy, &["ws, https"], &trusted, "http"), "http");
        assert_eq!(forwarded_proto(caddy, &[""], &trusted, "https"), "https");
        assert_eq!(forwarded_proto(caddy, &[], &trusted, "http"), "http");
        // An untrusted peer's claim is ignored.
        assert_eq!(forwarded_proto(ip("192.0.2.1"), &["https"], &trusted, "http"), "http");
        assert_eq!(forwarded_proto(ip("192.0.2.1"), &["http"], &[], "https"), "https");
    }
}
