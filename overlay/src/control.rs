//! Control through meta: a site's overlay daemon registers itself (name, site, public key,
//! endpoints, the addresses it routes) as an `OverlayPeer` record, follows every other site's
//! record, and keeps the last peer list it saw in a cache file, so it starts and runs while
//! meta is unreachable. Its private key is generated on first start and kept with mode 0600.
//!
//! The pure parts (records ↔ peer configs, the cache format) are separate from
//! [`follow`], the task that talks to meta.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use continuum_meta_client::MetaClient;
use continuum_proto::records_pb::{ObservedEndpoint, OverlayPeer};
use ipnet::IpNet;

use crate::device::PeerConfig;
use crate::keys;

/// Keepalive for peers configured from meta: keeps NAT mappings open and the sessions up.
pub const META_PEER_KEEPALIVE: Duration = Duration::from_secs(25);
/// How often the peer list is read again even without a watch event (and retried after meta
/// failed).
pub const REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the private key at `path`, or creates one there (mode 0600) if there is none. A key
/// file that others can read is refused: the key is the site's identity.
pub fn load_or_create_key(path: &Path) -> Result<[u8; 32], ControlError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ControlError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "the private key is readable by others (mode {mode:o}); `chmod 600` it"
                    ),
                });
            }
            let text = std::fs::read_to_string(path).map_err(io(path))?;
            keys::decode(&text).map_err(|e| ControlError::Invalid {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(path))?;
            writeln!(f, "{}", keys::encode(&key)).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
            Ok(key)
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// What a site announces about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteSpec {
    /// The record's name (one daemon per name).
    pub name: String,
    pub site: String,
    /// Where peers reach its UDP port (`host:port`); empty for a site behind NAT that only
    /// dials out.
    pub endpoints: Vec<String>,
    /// What it routes: its overlay address and the subnets behind it.
    pub allowed_ips: Vec<IpNet>,
    /// It relays for sites that cannot reach each other (see [`crate::peer::Peer::relay`]).
    pub relay: bool,
}

/// A NATed peer's public mapping as this daemon sees it: its key and where its packets come
/// from.
pub type Observed = Vec<([u8; 32], SocketAddr)>;

impl SiteSpec {
    /// The site's record, with the endpoints it observes for peers behind NAT.
    pub fn record(&self, public_key: &[u8; 32], observed: &Observed) -> OverlayPeer {
        OverlayPeer {
            schema_version: continuum_proto::records::SCHEMA_VERSION,
            name: self.name.clone(),
            site: self.site.clone(),
            public_key: public_key.to_vec(),
            endpoints: self.endpoints.clone(),
            allowed_ips: self.allowed_ips.iter().map(ToString::to_string).collect(),
            relay: self.relay,
            observed: observed
                .iter()
                .map(|(k, e)| ObservedEndpoint {
                    public_key: k.to_vec(),
                    endpoint: e.to_string(),
                })
                .collect(),
        }
    }
}

/// A peer as the daemon configures it: its name (for `overlay show`) and its config.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedPeer {
    pub name: String,
    pub site: String,
    pub config: PeerConfig,
    pub relay: bool,
    /// Its record announces no endpoint (it is behind NAT); `config.endpoint` is then where
    /// another site observed it, if any (a candidate for hole punching).
    pub behind_nat: bool,
}

/// The peers to configure from meta's records: every record but `own_name`'s, in name order.
/// A record that cannot be used (bad key, no valid allowed IP) is left out with the reason in
/// the second list; an endpoint that does not parse is skipped (the peer may still reach us).
pub fn peers_from_records(
    own_name: &str,
    records: &[OverlayPeer],
) -> (Vec<NamedPeer>, Vec<String>) {
    let mut peers = Vec::new();
    let mut problems = Vec::new();
    let mut sorted_all: Vec<&OverlayPeer> = records.iter().collect();
    sorted_all.sort_by(|a, b| a.name.cmp(&b.name));
    let sorted: Vec<&OverlayPeer> = sorted_all
        .iter()
        .copied()
        .filter(|r| r.name != own_name)
        .collect();
    for r in sorted {
        let Ok(public_key) = <[u8; 32]>::try_from(r.public_key.as_slice()) else {
            problems.push(format!(
                "peer {}: public key of {} bytes (32 expected)",
                r.name,
                r.public_key.len()
            ));
            continue;
        };
        let mut allowed_ips = Vec::new();
        for a in &r.allowed_ips {
            match a.parse::<IpNet>() {
                Ok(n) => allowed_ips.push(n),
                Err(_) => {
                    problems.push(format!("peer {}: allowed IP {a:?} is not a prefix", r.name))
                }
            }
        }
        if allowed_ips.is_empty() {
            problems.push(format!("peer {}: no allowed IPs", r.name));
            continue;
        }
        let announced = r
            .endpoints
            .iter()
            .find_map(|e| match e.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    problems.push(format!("peer {}: endpoint {e:?} is not ip:port", r.name));
                    None
                }
            });
        let behind_nat = r.endpoints.is_empty();
        let endpoint = if behind_nat {
            observed_endpoint(own_name, &r.public_key, &sorted_all)
        } else {
            announced
        };
        peers.push(NamedPeer {
            name: r.name.clone(),
            site: r.site.clone(),
            config: PeerConfig {
                public_key,
                preshared_key: None,
                endpoint,
                allowed_ips,
                persistent_keepalive: Some(META_PEER_KEEPALIVE),
            },
            relay: r.relay,
            behind_nat,
        });
    }
    (peers, problems)
}

/// Where another site (a relay's view first, then others' in name order; never our own)
/// observes the peer with `key`.
fn observed_endpoint(own_name: &str, key: &[u8], records: &[&OverlayPeer]) -> Option<SocketAddr> {
    let observers = records
        .iter()
        .filter(|r| r.relay)
        .chain(records.iter().filter(|r| !r.relay))
        .filter(|r| r.name != own_name);
    for r in observers {
        for o in &r.observed {
            if o.public_key == key {
                if let Ok(a) = o.endpoint.parse() {
                    return Some(a);
                }
            }
        }
    }
    None
}

/// The cached peer list: the last records read from meta, as JSON (readable, and written
/// atomically: a crash leaves the old file or the new one).
#[derive(Clone, Debug)]
pub struct Cache {
    pub path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedPeer {
    name: String,
    site: String,
    public_key: String,
    endpoints: Vec<String>,
    allowed_ips: Vec<String>,
    #[serde(default)]
    relay: bool,
    /// (public key, endpoint) pairs, as in the record.
    #[serde(default)]
    observed: Vec<(String, String)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile {
    /// meta's revision the list was read at.
    revision: u64,
    peers: Vec<CachedPeer>,
}

impl Cache {
    /// The cached records and the revision they were read at; `None` if there is no cache.
    pub fn load(&self) -> Result<Option<(u64, Vec<OverlayPeer>)>, ControlError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&self.path)(e)),
        };
        let bad = |message: String| ControlError::Invalid {
            path: self.path.clone(),
            message,
        };
        let file: CacheFile =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a peer cache: {e}")))?;
        let mut out = Vec::new();
        for p in file.peers {
            let key = STANDARD
                .decode(p.public_key.trim())
                .map_err(|e| bad(format!("peer {}: public key: {e}", p.name)))?;
            let mut observed = Vec::new();
            for (k, endpoint) in p.observed {
                let public_key = STANDARD
                    .decode(k.trim())
                    .map_err(|e| bad(format!("peer {}: observed key: {e}", p.name)))?;
                observed.push(ObservedEndpoint {
                    public_key,
                    endpoint,
                });
            }
            out.push(OverlayPeer {
                schema_version: continuum_proto::records::SCHEMA_VERSION,
                name: p.name,
                site: p.site,
                public_key: key,
                endpoints: p.endpoints,
                allowed_ips: p.allowed_ips,
                relay: p.relay,
                observed,
            });
        }
        Ok(Some((file.revision, out)))
    }

    pub fn store(&self, revision: u64, records: &[OverlayPeer]) -> Result<(), ControlError> {
        let file = CacheFile {
            revision,
            peers: records
                .iter()
                .map(|r| CachedPeer {
                    name: r.name.clone(),
                    site: r.site.clone(),
                    public_key: STANDARD.encode(&r.public_key),
                    endpoints: r.endpoints.clone(),
                    allowed_ips: r.allowed_ips.clone(),
                    relay: r.relay,
                    observed: r
                        .observed
                        .iter()
                        .map(|o| (STANDARD.encode(&o.public_key), o.endpoint.clone()))
                        .collect(),
                })
                .collect(),
        };
        let text = serde_json::to_string_pretty(&file).expect("serializable");
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(text.as_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))
    }
}

/// Registers `spec` in meta and follows the peer list: every list read (at start, on each
/// watch event, every [`REFRESH`]) is sent on `peers` and written to `cache`. While meta is
/// unreachable it retries and sends nothing (the daemon keeps the peers it has). Runs until
/// the receiver is dropped.
pub async fn follow(
    meta: MetaClient,
    spec: SiteSpec,
    public_key: [u8; 32],
    cache: Cache,
    peers: tokio::sync::watch::Sender<Vec<NamedPeer>>,
    mut observed: tokio::sync::watch::Receiver<Observed>,
) {
    let mut published: Option<OverlayPeer> = None;
    let mut last: Option<Vec<OverlayPeer>> = None;
    let mut reachable = true;
    let prefix = continuum_proto::records::prefix::<OverlayPeer>();
    let mut watch = meta.watch_prefix(prefix.as_bytes(), 0);
    loop {
        if peers.is_closed() {
            return;
        }
        let round: Result<(), continuum_meta_client::Error> = async {
            let own = spec.record(&public_key, &observed.borrow_and_update());
            if published.as_ref() != Some(&own) {
                let stored = meta.record::<OverlayPeer>(&spec.name).await?;
                if stored.as_ref().map(|v| &v.record) != Some(&own) {
                    meta.put_record(&own).await?;
                }
                if published.is_none() {
                    tracing::info!(name = spec.name, site = spec.site, "registered in meta");
                } else {
                    tracing::info!(
                        observed = own.observed.len(),
                        "published observed endpoints"
                    );
                }
                published = Some(own);
            }
            let listed = meta.records::<OverlayPeer>().await?;
            let revision = listed.iter().map(|v| v.mod_revision).max().unwrap_or(0);
            let records: Vec<OverlayPeer> = listed.into_iter().map(|v| v.record).collect();
            if last.as_ref() != Some(&records) {
                let (named, problems) = peers_from_records(&spec.name, &records);
                for p in &problems {
                    tracing::warn!("{p}");
                }
                tracing::info!(peers = named.len(), "peer list from meta");
                if let Err(e) = cache.store(revision, &records) {
                    tracing::warn!(error = %e, "cannot write the peer cache");
                }
                let _ = peers.send(named);
                last = Some(records);
            }
            Ok(())
        }
        .await;
        match round {
            Ok(()) => {
                if !reachable {
                    tracing::info!("meta reachable again");
                    reachable = true;
                }
                // Until something changes under the prefix or in what we observe, or the
                // refresh is due.
                tokio::select! {
                    _ = tokio::time::timeout(REFRESH, watch.next()) => {}
                    r = observed.changed() => {
                        if r.is_err() {
                            // The daemon is gone.
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                if reachable {
                    tracing::warn!(error = %e, "meta unreachable; running on the peers we have");
                    reachable = false;
                }
                watch.disconnect();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The peers of a cache file, for a start without meta.
pub fn cached_peers(cache: &Cache, own_name: &str) -> Result<Vec<NamedPeer>, ControlError> {
    Ok(match cache.load()? {
        Some((_, records)) => {
            let (named, problems) = peers_from_records(own_name, &records);
            for p in &problems {
                tracing::warn!("{p}");
            }
            named
        }
        None => Vec::new(),
    })
}

/// Names of the peers by public key (for status output).
pub fn names(peers: &[NamedPeer]) -> BTreeMap<[u8; 32], String> {
    peers
        .iter()
        .map(|p| (p.config.public_key, p.name.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, key: u8, endpoints: &[&str], allowed: &[&str]) -> OverlayPeer {
        OverlayPeer {
            schema_version: 1,
            name: name.into(),
            site: format!("site-{name}"),
            public_key: vec![key; 32],
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            allowed_ips: allowed.iter().map(|s| s.to_string()).collect(),
            relay: key == 1,
            observed: Vec::new(),
        }
    }

    #[test]
    fn records_become_peers_except_our_own_and_broken_ones() {
        let records = vec![
            rec(
                "c",
                3,
                &["bad", "10.0.0.3:51820"],
                &["10.90.3.1/32", "nope"],
            ),
            rec("a", 1, &["10.0.0.1:51820"], &["10.90.1.1/32"]),
            rec("b", 2, &[], &["10.90.2.1/32", "192.168.2.0/24"]),
            OverlayPeer {
                public_key: vec![9; 31],
                ..rec("d", 4, &[], &["10.90.4.1/32"])
            },
            rec("e", 5, &[], &[]),
        ];
        let (peers, problems) = peers_from_records("a", &records);
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(peers[0].config.endpoint, None, "behind NAT: it dials us");
        assert_eq!(peers[0].config.allowed_ips.len(), 2);
        assert_eq!(
            peers[1].config.endpoint,
            Some("10.0.0.3:51820".parse().unwrap()),
            "the first endpoint that parses"
        );
        assert_eq!(
            peers[1].config.persistent_keepalive,
            Some(META_PEER_KEEPALIVE)
        );
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems
            .iter()
            .any(|p| p.contains("peer d") && p.contains("31 bytes")));
        assert!(problems
            .iter()
            .any(|p| p.contains("peer e") && p.contains("no allowed")));
    }

    #[test]
    fn a_peer_behind_nat_gets_the_endpoint_others_observe_a_relays_first() {
        let observe = |r: &mut OverlayPeer, key: u8, e: &str| {
            r.observed.push(ObservedEndpoint {
                public_key: vec![key; 32],
                endpoint: e.into(),
            })
        };
        let mut a = rec("a", 1, &["10.0.0.1:51820"], &["10.90.1.1/32"]); // the relay
        let mut b = rec("b", 2, &[], &["10.90.2.1/32"]);
        let c = rec("c", 3, &[], &["10.90.3.1/32"]);
        let mut d = rec("d", 4, &["10.0.0.4:51820"], &["10.90.4.1/32"]);
        observe(&mut b, 3, "198.51.100.9:1111");
        observe(&mut a, 3, "198.51.100.3:40000");
        // An observation of a peer with endpoints of its own changes nothing.
        observe(&mut a, 4, "198.51.100.4:2");
        let records = vec![a.clone(), b.clone(), c.clone(), d.clone()];
        let (peers, _) = peers_from_records("b", &records);
        let of = |n: &str| peers.iter().find(|p| p.name == n).unwrap().clone();
        assert_eq!(
            of("c").config.endpoint,
            Some("198.51.100.3:40000".parse().unwrap()),
            "the relay's view wins over b's own"
        );
        assert!(of("c").behind_nat);
        assert_eq!(
            of("d").config.endpoint,
            Some("10.0.0.4:51820".parse().unwrap())
        );
        assert!(!of("d").behind_nat);
        // With only b's (our own) observation, c has no candidate from us.
        d.observed.clear();
        a.observed.clear();
        let (peers, _) = peers_from_records("b", &[a, b, c, d]);
        assert_eq!(
            peers
                .iter()
                .find(|p| p.name == "c")
                .unwrap()
                .config
                .endpoint,
            None
        );
    }

    #[test]
    fn the_cache_round_trips_and_survives_only_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache {
            path: dir.path().join("peers.json"),
        };
        assert!(cache.load().unwrap().is_none());
        let records = vec![
            rec("a", 1, &["10.0.0.1:51820"], &["10.90.1.1/32"]),
            rec("b", 2, &[], &["10.90.2.1/32"]),
        ];
        cache.store(42, &records).unwrap();
        assert_eq!(cache.load().unwrap(), Some((42, records)));
        std::fs::write(&cache.path, "{ not json").unwrap();
        let e = cache.load().unwrap_err();
        assert!(e.to_string().contains("not a peer cache"), "{e}");
    }

    #[test]
    fn a_key_is_created_private_and_refused_when_others_can_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("private.key");
        let k1 = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_key(&path).unwrap(), k1, "kept across starts");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_key(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
