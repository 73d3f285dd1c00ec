//! Placement: which block servers hold the shards of a stripe.
//!
//! A volume's stripes are spread over `pg_count` placement groups (stripe → group by a stable
//! hash). Each group maps to `k+m` servers by weighted rendezvous hashing (highest random
//! weight): every server gets a score from (volume, group, server); servers are taken best
//! first, skipping any whose failure domain (at the configured level) is already used. So:
//! - every shard of a stripe sits in a different failure domain (DESIGN.md invariant 7);
//! - a volume's groups spread over many servers, so a rebuild reads from and writes to many;
//! - losing a server moves only the groups that used it (rendezvous hashing is minimal);
//! - the result depends only on the cluster map: every client computes the same placement.
//!
//! The hash is a fixed, versioned function (not `std`'s, which may change between releases):
//! placement is persisted implicitly, so it must never change for existing volumes.

use std::collections::BTreeSet;

/// Placement groups per volume unless configured otherwise.
pub const DEFAULT_PG_COUNT: u32 = 128;

/// Failure-domain level at which shards of one stripe must differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DomainLevel {
    Host,
    Rack,
    Site,
}

/// One block server as the cluster map describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    pub id: u64,
    pub site: String,
    pub rack: String,
    pub host: String,
    /// Relative capacity weight (> 0); a server with twice the weight gets about twice the groups.
    pub weight: f64,
    /// Servers that are down are skipped (their groups move; repair rebuilds there).
    pub up: bool,
}

impl Server {
    fn domain(&self, level: DomainLevel) -> (&str, &str, &str) {
        match level {
            DomainLevel::Site => (&self.site, "", ""),
            DomainLevel::Rack => (&self.site, &self.rack, ""),
            DomainLevel::Host => (&self.site, &self.rack, &self.host),
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PlacementError {
    #[error("a stripe needs {needed} distinct {level:?} failure domains; only {available} are up")]
    NotEnoughDomains {
        needed: usize,
        available: usize,
        level: DomainLevel,
    },
    #[error("placement group count must be at least 1")]
    NoGroups,
}

/// splitmix64 finaliser: a fixed, well-mixed 64-bit hash step (placement hash version 1).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash3(a: u64, b: u64, c: u64) -> u64 {
    mix(mix(mix(a) ^ b) ^ c)
}

/// The placement group of a stripe.
pub fn group_of(volume: u64, stripe: u64, pg_count: u32) -> Result<u32, PlacementError> {
    if pg_count == 0 {
        return Err(PlacementError::NoGroups);
    }
    Ok((hash3(volume, stripe, 0x5354_5249_5045) % u64::from(pg_count)) as u32)
}

/// Rendezvous score of `server` for group (`volume`, `group`): weight / -ln(u), u in (0, 1].
fn score(volume: u64, group: u32, server: &Server) -> f64 {
    let h = hash3(volume, u64::from(group), server.id);
    // 53 random bits → (0, 1].
    let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    server.weight.max(f64::MIN_POSITIVE) / -u.ln().min(-f64::MIN_POSITIVE)
}

/// The servers holding shards 0..width of placement group `group` of `volume`, in shard order.
///
/// Positions are stable: the "ideal" placement is computed over every server, up or down, and
/// only the positions of down servers are filled by the next best up servers. So a lost server
/// moves only its own shard (same shard index on its replacement), and the group returns to
/// the ideal layout when it comes back. When no up server of an unused domain is left, the
/// down server keeps its position (the shard is unavailable, the stripe degraded); only a map
/// with fewer domains than the stripe is wide is an error.
pub fn place_group(
    volume: u64,
    group: u32,
    width: usize,
    servers: &[Server],
    level: DomainLevel,
    members: &[u64],
) -> Result<Vec<u64>, PlacementError> {
    let member = |s: &Server| members.is_empty() || members.contains(&s.id);
    let mut ranked: Vec<(f64, &Server)> = servers
        .iter()
        .filter(|s| s.weight > 0.0)
        .map(|s| (score(volume, group, s), s))
        .collect();
    // The volume's members rank first (the ideal layout is theirs; see the Volume record's
    // `placement_servers`), then the others; ties are broken by id so the order is total and
    // the same everywhere.
    ranked.sort_by(|a, b| {
        member(b.1)
            .cmp(&member(a.1))
            .then(b.0.total_cmp(&a.0))
            .then(a.1.id.cmp(&b.1.id))
    });
    let not_enough = |ranked: &[(f64, &Server)]| PlacementError::NotEnoughDomains {
        needed: width,
        available: ranked
            .iter()
            .filter(|(_, s)| s.up)
            .map(|(_, s)| s.domain(level))
            .collect::<BTreeSet<_>>()
            .len(),
        level,
    };
    let mut seen = BTreeSet::new();
    let mut ideal: Vec<&Server> = Vec::with_capacity(width);
    for (_, s) in &ranked {
        if ideal.len() == width {
            break;
        }
        if seen.insert(s.domain(level)) {
            ideal.push(s);
        }
    }
    if ideal.len() < width {
        return Err(not_enough(&ranked));
    }
    let mut used: BTreeSet<_> = ideal
        .iter()
        .filter(|s| s.up)
        .map(|s| s.domain(level))
        .collect();
    let mut placed: Vec<u64> = ideal.iter().map(|s| s.id).collect();
    for (pos, s) in ideal.iter().enumerate() {
        if s.up {
            continue;
        }
        // The best up server of an unused domain, by score alone (members or not).
        let replacement = ranked
            .iter()
            .filter(|(_, c)| c.up && !placed.contains(&c.id) && !used.contains(&c.domain(level)))
            .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.id.cmp(&a.1.id)))
            .map(|(_, c)| *c);
        // No up server in an unused domain: the position stays with the down server. Its shard
        // is then simply unavailable (read around, rebuilt when a domain is back or added),
        // which degrades the stripe instead of failing it: with six hosts and 4+2, losing one
        // host must not stop I/O.
        let Some(r) = replacement else {
            used.insert(s.domain(level));
            continue;
        };
        used.insert(r.domain(level));
        placed[pos] = r.id;
    }
    Ok(placed)
}

/// The servers holding the shards of stripe `stripe` of `volume`.
pub fn place_stripe(
    volume: u64,
    stripe: u64,
    pg_count: u32,
    width: usize,
    servers: &[Server],
    level: DomainLevel,
    members: &[u64],
) -> Result<Vec<u64>, PlacementError> {
    let group = group_of(volume, stripe, pg_count)?;
    place_group(volume, group, width, servers, level, members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cluster(sites: usize, racks: usize, hosts: usize) -> Vec<Server> {
        let mut v = Vec::new();
        for s in 0..sites {
            for r in 0..racks {
                for h in 0..hosts {
                    v.push(Server {
                        id: v.len() as u64 + 1,
                        site: format!("s{s}"),
                        rack: format!("r{r}"),
                        host: format!("h{h}"),
                        weight: 1.0,
                        up: true,
                    });
                }
            }
        }
        v
    }

    #[test]
    fn shards_of_a_stripe_are_in_distinct_domains() {
        // (sites, racks, hosts per rack, level, width)
        let table = [
            (1, 1, 6, DomainLevel::Host, 6),
            (1, 3, 4, DomainLevel::Rack, 3),
            (1, 6, 2, DomainLevel::Rack, 6),
            (3, 2, 2, DomainLevel::Site, 3),
            (2, 4, 3, DomainLevel::Host, 11),
        ];
        for (sites, racks, hosts, level, width) in table {
            let servers = cluster(sites, racks, hosts);
            for group in 0..64 {
                let chosen = place_group(9, group, width, &servers, level, &[]).unwrap();
                assert_eq!(chosen.len(), width);
                let domains: BTreeSet<_> = chosen
                    .iter()
                    .map(|id| servers.iter().find(|s| s.id == *id).unwrap().domain(level))
                    .collect();
                assert_eq!(domains.len(), width, "{sites}x{racks}x{hosts} at {level:?}");
            }
        }
    }

    #[test]
    fn too_few_domains_is_a_clear_error() {
        let servers = cluster(1, 2, 4);
        // Two racks in the whole map for three shards.
        assert_eq!(
            place_group(1, 0, 3, &servers, DomainLevel::Rack, &[]),
            Err(PlacementError::NotEnoughDomains {
                needed: 3,
                available: 2,
                level: DomainLevel::Rack
            })
        );
        assert_eq!(group_of(1, 1, 0), Err(PlacementError::NoGroups));
    }

    #[test]
    fn a_down_domain_without_replacement_keeps_its_position() {
        // Six hosts for 4+2: when one is down there is nowhere to move its shards, so they
        // stay (unavailable) and every other position is unchanged; the stripe is degraded,
        // not failed.
        let mut servers = cluster(1, 1, 6);
        let members = [1, 2, 3, 4, 5, 6];
        let before: Vec<Vec<u64>> = (0..64)
            .map(|g| place_group(1, g, 6, &servers, DomainLevel::Host, &members).unwrap())
            .collect();
        servers[2].up = false;
        for (g, b) in before.iter().enumerate() {
            let after = place_group(1, g as u32, 6, &servers, DomainLevel::Host, &members).unwrap();
            assert_eq!(&after, b, "group {g}");
        }
        // A seventh host joins: the down server's positions move to it, and nothing else
        // moves (it is not one of the volume's members).
        servers.push(Server {
            id: 7,
            site: "s0".into(),
            rack: "r0".into(),
            host: "h6".into(),
            weight: 1.0,
            up: true,
        });
        for (g, b) in before.iter().enumerate() {
            let after = place_group(1, g as u32, 6, &servers, DomainLevel::Host, &members).unwrap();
            let expected: Vec<u64> = b.iter().map(|&s| if s == 3 { 7 } else { s }).collect();
            assert_eq!(after, expected, "group {g}");
        }
        // Server 3 comes back: the ideal layout returns.
        servers[2].up = true;
        for (g, b) in before.iter().enumerate() {
            let after = place_group(1, g as u32, 6, &servers, DomainLevel::Host, &members).unwrap();
            assert_eq!(&after, b, "group {g}");
        }
    }

    #[test]
    fn a_server_added_later_never_moves_shards_in_place() {
        // Without a member list every server ranks (the adding server can take any position
        // and shift the others); with it, an added server takes only down servers' places.
        let mut servers = cluster(1, 1, 8);
        let members: Vec<u64> = (1..=8).collect();
        let before: Vec<Vec<u64>> = (0..128)
            .map(|g| place_group(2, g, 6, &servers, DomainLevel::Host, &members).unwrap())
            .collect();
        for id in 9..=12 {
            servers.push(Server {
                id,
                site: "s0".into(),
                rack: "r0".into(),
                host: format!("h{id}"),
                weight: 1.0,
                up: true,
            });
        }
        for (g, b) in before.iter().enumerate() {
            let after = place_group(2, g as u32, 6, &servers, DomainLevel::Host, &members).unwrap();
            assert_eq!(&after, b, "group {g}");
        }
    }

    #[test]
    fn placement_is_a_pure_function_of_the_map() {
        let servers = cluster(1, 1, 12);
        let mut reversed = servers.clone();
        reversed.reverse();
        for stripe in 0..200 {
            let a = place_stripe(3, stripe, 128, 6, &servers, DomainLevel::Host, &[]).unwrap();
            let b = place_stripe(3, stripe, 128, 6, &reversed, DomainLevel::Host, &[]).unwrap();
            assert_eq!(a, b);
        }
        // Pinned values: the placement hash must never change for existing volumes.
        assert_eq!(group_of(1, 0, 128).unwrap(), group_of(1, 0, 128).unwrap());
        assert_eq!(mix(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn groups_spread_over_all_servers_and_a_loss_moves_little() {
        let mut servers = cluster(1, 1, 12);
        let before: Vec<Vec<u64>> = (0..DEFAULT_PG_COUNT)
            .map(|g| place_group(5, g, 6, &servers, DomainLevel::Host, &[]).unwrap())
            .collect();
        let mut load: BTreeMap<u64, usize> = BTreeMap::new();
        for g in &before {
            for id in g {
                *load.entry(*id).or_default() += 1;
            }
        }
        // 128 groups × 6 shards over 12 servers = 64 each on average.
        assert_eq!(load.len(), 12);
        assert!(load.values().all(|n| (40..=90).contains(n)), "{load:?}");
        servers[3].up = false;
        let lost = servers[3].id;
        for (g, old) in before.iter().enumerate() {
            let new = place_group(5, g as u32, 6, &servers, DomainLevel::Host, &[]).unwrap();
            // Every shard not on the lost server keeps its server and its shard index.
            for (pos, id) in old.iter().enumerate() {
                if *id != lost {
                    assert_eq!(new[pos], *id, "group {g} shard {pos} moved");
                } else {
                    assert_ne!(new[pos], lost);
                }
            }
        }
    }

    #[test]
    fn weight_attracts_groups() {
        let mut servers = cluster(1, 1, 8);
        servers[0].weight = 3.0;
        let mut heavy = 0;
        let mut light = 0;
        for g in 0..512 {
            let chosen = place_group(7, g, 2, &servers, DomainLevel::Host, &[]).unwrap();
            heavy += chosen.contains(&servers[0].id) as usize;
            light += chosen.contains(&servers[1].id) as usize;
        }
        assert!(heavy > light * 2, "heavy {heavy} light {light}");
    }
}
