//! The stand-alone configuration file, in wg-quick's format (so an operator's existing
//! WireGuard configs work):
//!
//! ```text
//! [Interface]
//! PrivateKey = <base64>
//! ListenPort = 51820
//! Address = 10.77.0.1/24
//! MTU = 1420
//!
//! [Peer]
//! PublicKey = <base64>
//! PresharedKey = <base64>        # optional
//! Endpoint = 192.0.2.7:51820     # optional (a peer behind NAT finds us)
//! AllowedIPs = 10.77.0.2/32, 10.78.0.0/16
//! PersistentKeepalive = 25       # optional, seconds
//! ```
//!
//! Errors name the line and what was expected. Keys wg-quick knows but this overlay does not
//! use (DNS, Table, PostUp, ...) are refused rather than silently ignored.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use ipnet::IpNet;

use crate::device::{PeerConfig, DEFAULT_MTU};
use crate::keys;

#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    pub private_key: [u8; 32],
    pub listen_port: Option<u16>,
    pub addresses: Vec<IpNet>,
    pub mtu: usize,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub interface: InterfaceConfig,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ConfigError {
    pub line: usize,
    pub message: String,
}

fn err(line: usize, message: impl Into<String>) -> ConfigError {
    ConfigError {
        line,
        message: message.into(),
    }
}

enum Section {
    None,
    Interface,
    Peer,
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut section = Section::None;
        let mut private_key = None;
        let mut listen_port = None;
        let mut addresses = Vec::new();
        let mut mtu = DEFAULT_MTU;
        let mut interface_seen = false;
        let mut peers: Vec<(usize, PeerDraft)> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            if content.starts_with('[') {
                section = match content.to_ascii_lowercase().as_str() {
                    "[interface]" if interface_seen => {
                        return Err(err(line, "a second [Interface] section"))
                    }
                    "[interface]" => {
                        interface_seen = true;
                        Section::Interface
                    }
                    "[peer]" => {
                        peers.push((line, PeerDraft::default()));
                        Section::Peer
                    }
                    other => {
                        return Err(err(
                            line,
                            format!("unknown section {other}; expected [Interface] or [Peer]"),
                        ))
                    }
                };
                continue;
            }
            let Some((key, value)) = content.split_once('=') else {
                return Err(err(line, "expected `Key = value`"));
            };
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
            match section {
                Section::None => {
                    return Err(err(line, "settings must follow [Interface] or [Peer]"))
                }
                Section::Interface => match key.as_str() {
                    "privatekey" => {
                        private_key =
                            Some(keys::decode(value).map_err(|e| err(line, e.to_string()))?)
                    }
                    "listenport" => {
                        listen_port = Some(value.parse().map_err(|_| {
                            err(
                                line,
                                format!("ListenPort must be a port number, got {value:?}"),
                            )
                        })?)
                    }
                    "address" => addresses.extend(parse_nets(line, value)?),
                    "mtu" => {
                        mtu = value.parse().map_err(|_| {
                            err(line, format!("MTU must be a number, got {value:?}"))
                        })?;
                        if !(576..=9000).contains(&mtu) {
                            return Err(err(line, format!("MTU {mtu} is outside 576..=9000")));
                        }
                    }
                    other => return Err(err(line, format!("unknown [Interface] key {other:?}"))),
                },
                Section::Peer => {
                    let p = &mut peers.last_mut().expect("in a [Peer] section").1;
                    match key.as_str() {
                        "publickey" => {
                            p.public_key =
                                Some(keys::decode(value).map_err(|e| err(line, e.to_string()))?)
                        }
                        "presharedkey" => {
                            p.preshared_key =
                                Some(keys::decode(value).map_err(|e| err(line, e.to_string()))?)
                        }
                        "endpoint" => p.endpoint = Some(parse_endpoint(line, value)?),
                        "allowedips" => p.allowed_ips.extend(parse_nets(line, value)?),
                        "persistentkeepalive" => {
                            let secs: u64 = value.parse().map_err(|_| {
                                err(
                                    line,
                                    format!("PersistentKeepalive must be seconds, got {value:?}"),
                                )
                            })?;
                            p.persistent_keepalive = (secs > 0).then(|| Duration::from_secs(secs));
                        }
                        other => return Err(err(line, format!("unknown [Peer] key {other:?}"))),
                    }
                }
            }
        }
        if !interface_seen {
            return Err(err(0, "no [Interface] section"));
        }
        let private_key = private_key.ok_or_else(|| err(0, "[Interface] has no PrivateKey"))?;
        let mut out = Vec::new();
        for (line, p) in peers {
            let public_key = p
                .public_key
                .ok_or_else(|| err(line, "[Peer] has no PublicKey"))?;
            if out.iter().any(|q: &PeerConfig| q.public_key == public_key) {
                return Err(err(
                    line,
                    "the same PublicKey appears in two [Peer] sections",
                ));
            }
            out.push(PeerConfig {
                public_key,
                preshared_key: p.preshared_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips,
                persistent_keepalive: p.persistent_keepalive,
            });
        }
        Ok(Config {
            interface: InterfaceConfig {
                private_key,
                listen_port,
                addresses,
                mtu,
            },
            peers: out,
        })
    }
}

#[derive(Default)]
struct PeerDraft {
    public_key: Option<[u8; 32]>,
    preshared_key: Option<[u8; 32]>,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<Duration>,
}

fn parse_nets(line: usize, value: &str) -> Result<Vec<IpNet>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    err(
                        line,
                        format!("{s:?} is not an address or prefix (like 10.0.0.2/32)"),
                    )
                })
        })
        .collect()
}

fn parse_endpoint(line: usize, value: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = value.parse() {
        return Ok(a);
    }
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| err(line, format!("Endpoint {value:?} is not host:port")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "YEocP0e2o1WT5GlvBvQzVF7EeR6z9aCk9ANZgELKDsA=";
    const B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    #[test]
    fn a_wg_quick_file_parses() {
        let text = format!(
            "# site a\n[Interface]\nPrivateKey = {A}\nListenPort = 51820\nAddress = 10.77.0.1/24\n\n[Peer]\nPublicKey = {B}\nEndpoint = 192.0.2.7:51820\nAllowedIPs = 10.77.0.2/32, 10.78.0.0/16\nPersistentKeepalive = 25\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.interface.mtu, DEFAULT_MTU);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].allowed_ips.len(), 2);
        assert_eq!(
            c.peers[0].persistent_keepalive,
            Some(Duration::from_secs(25))
        );
        assert_eq!(
            c.peers[0].endpoint,
            Some("192.0.2.7:51820".parse().unwrap())
        );
    }

    #[test]
    fn mistakes_name_their_line() {
        let cases = [
            ("[Interface]\nPrivateKey = nope\n", 2, "base64"),
            (&format!("[Interface]\nPrivateKey = {A}\nDNS = 1.1.1.1\n") as &str, 3, "unknown [Interface] key"),
            (&format!("[Interface]\nPrivateKey = {A}\n[Peer]\nAllowedIPs = 10.0.0.1/32\n"), 3, "no PublicKey"),
            (&format!("[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = {B}\nAllowedIPs = 10.0.0.300/32\n"), 5, "not an address"),
            ("ListenPort = 1\n", 1, "must follow"),
            (&format!("[Interface]\nPrivateKey = {A}\nMTU = 70000\n"), 3, "MTU"),
        ];
        for (text, line, what) in cases {
            let e = Config::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.message.contains(what), "{text}: {e}");
        }
    }
}
