//! Pure decisions about one stripe from what its shards report (sans-IO; table-tested).
//!
//! - [`assess`]: which version each shard position should hold and which positions are stale
//!   (missed a write, lost, or replaced), from the shards' current versions and the parity
//!   shards' record of each data shard's version.
//! - [`reconcile`]: what a new writer does with unstable versions left by a previous one
//!   (DESIGN.md invariant 2): the writer serialises writes per stripe, so only the stripe's
//!   highest version can be unacknowledged; every lower unstable version is committed. The
//!   highest one is rolled forward when at least k shards hold the stripe state it created (the
//!   shards it wrote plus the untouched, current data shards), rolled back when even the
//!   unreachable shards could not make up k with them (so it was never acknowledged), and left
//!   undecided otherwise.

use crate::ec::Profile;
use crate::store::{ObjectInfo, Version};

/// The state of one stripe as the writer tracks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripeView {
    /// Per position (data shards, then parity): the version it should hold.
    pub expected: Vec<Version>,
    /// Positions whose content is not current (missing, unreachable, behind or corrupt).
    pub stale: u64,
}

impl StripeView {
    pub fn is_stale(&self, pos: usize) -> bool {
        self.stale & (1 << pos) != 0
    }
    pub fn set_stale(&mut self, pos: usize, stale: bool) {
        if stale {
            self.stale |= 1 << pos;
        } else {
            self.stale &= !(1 << pos);
        }
    }
    pub fn current(&self) -> usize {
        self.expected.len() - self.stale.count_ones() as usize
    }
}

/// Assesses a stripe from its shards' infos (`None`: unreachable).
///
/// A stale position never takes a write (every shard write is a compare-and-swap on the
/// version the writer expects, and writers skip positions they know are stale), so a stale
/// shard's version is always older than its true one, and the truth is the newest any shard
/// says: for data shard i the newer of its own version and every parity's record of it; for
/// parity (which every stripe write touches) the newest version in the stripe. Unstable
/// leftovers of failed writes must be reconciled first ([`reconcile`]), or they would count.
///
/// Only the parity shards at the newest parity version vouch for data versions: a parity
/// behind them missed writes, and may hold the leftover of a write that failed (its records
/// name data versions no data shard has; trusted, they made current data shards look behind
/// and left a stripe below k current shards for good — found by the live chaos run).
pub fn assess(profile: Profile, infos: &[Option<ObjectInfo>]) -> StripeView {
    let k = profile.data;
    let width = profile.width();
    assert_eq!(infos.len(), width, "one info per shard position");
    let newest = infos
        .iter()
        .flatten()
        .map(|i| i.version)
        .max()
        .unwrap_or_default();
    let parity_newest = infos[k..]
        .iter()
        .flatten()
        .map(|i| i.version)
        .max()
        .unwrap_or_default();
    let mut expected = vec![Version::NONE; width];
    let mut stale = 0u64;
    for pos in 0..width {
        let observed = infos[pos].as_ref().map(|i| i.version);
        let want = if pos < k {
            infos[k..]
                .iter()
                .flatten()
                .filter(|p| p.version == parity_newest)
                .flat_map(|p| p.data_versions.iter())
                .filter(|(s, _)| *s as usize == pos)
                .map(|(_, v)| *v)
                .chain(observed)
                .max()
                .unwrap_or_default()
        } else {
            newest
        };
        expected[pos] = want;
        if observed != Some(want) {
            stale |= 1 << pos;
        }
    }
    StripeView { expected, stale }
}

/// What to do with a stripe's unstable versions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// (position, version): stabilize up to the version.
    pub stabilize: Vec<(usize, Version)>,
    /// (position, version): undo the version and everything above it.
    pub rollback: Vec<(usize, Version)>,
    /// The highest version is rolled forward: these positions of its write set lack it and
    /// must be rebuilt (from the shards that have it) at this version.
    pub roll_forward: Option<(Version, Vec<usize>)>,
    /// The top version cannot be decided from the shards that answered (see [`reconcile`]).
    pub undecided: bool,
}

/// Decides a stripe's reconciliation (see the module doc). `infos[pos]` is `None` when the
/// position is unreachable. Unstable versions of epochs below `foreign_below` are leftovers
/// that an earlier writer served I/O without (it could not see them): they are rolled back,
/// never forward, so a block never changes from old to new without a write.
pub fn reconcile(profile: Profile, infos: &[Option<ObjectInfo>], foreign_below: u64) -> Decision {
    let mut unknown = Vec::new();
    let mut d = decide(profile, infos, foreign_below, &mut unknown);
    // A version left unknown below and not decided with the top keeps the stripe undecided.
    if unknown
        .iter()
        .any(|u| !d.stabilize.contains(u) && !d.rollback.contains(u))
    {
        d.undecided = true;
    }
    d
}

/// [`reconcile`], with the data shards' versions below the top that could not be judged in
/// `unknown`.
fn decide(
    profile: Profile,
    infos: &[Option<ObjectInfo>],
    foreign_below: u64,
    unknown: &mut Vec<(usize, Version)>,
) -> Decision {
    let k = profile.data;
    let mut d = Decision::default();
    let mut infos: Vec<Option<ObjectInfo>> = infos.to_vec();
    let top = infos
        .iter()
        .flatten()
        .map(|i| i.version)
        .max()
        .unwrap_or_default();
    // The record of a data shard's version in the parity that holds the stripe's top version
    // (a parity behind the top missed writes and cannot tell a leftover from a write it missed).
    let record = |infos: &[Option<ObjectInfo>], pos: usize| -> Option<Version> {
        infos[k..]
            .iter()
            .flatten()
            .filter(|p| p.version == top)
            .flat_map(|p| p.data_versions.iter())
            .filter(|(s, _)| *s as usize == pos)
            .map(|(_, v)| *v)
            .max()
    };
    for pos in 0..infos.len() {
        let Some(info) = infos[pos].clone() else {
            continue;
        };
        // Unstable versions below a shard's own current one are committed: the writer based a
        // later compare-and-swap write on them.
        if let Some(below) = info
            .unstable
            .iter()
            .map(|u| u.version)
            .filter(|v| *v < info.version)
            .max()
        {
            d.stabilize.push((pos, below));
        }
        // A data shard whose current version is unstable and below the stripe's top: committed
        // if the parity recorded exactly it, a leftover of a write that failed elsewhere if
        // the parity recorded an older one. A newer record only says the shard missed a later
        // write — which may be the very top this decision rolls back (a write redone without
        // the shard after its first attempt timed out, the attempt landing late): decided
        // in the next round, once the top is settled (chaos seed 15769).
        // Without a parity at the top in reach, it cannot be told either way: the stripe is
        // undecided, and stays judged against the previous writer's epoch (this writer serves
        // I/O with the version as it is; taken later for an older epoch's leftover, it was
        // rolled back under the parity that had it — chaos seed 12857).
        let own = info.unstable.iter().find(|u| u.version == info.version);
        if let (Some(u), true, true) = (own, info.version < top, pos < k) {
            let ours = info.version.epoch >= foreign_below;
            match record(&infos, pos) {
                Some(r) if r == info.version && ours => d.stabilize.push((pos, info.version)),
                Some(r) if r > info.version && ours => unknown.push((pos, info.version)),
                Some(_) => {
                    d.rollback.push((pos, info.version));
                    let i = infos[pos].as_mut().expect("present");
                    i.version = u.previous;
                    i.unstable.retain(|x| x.version < u.version);
                }
                None if ours => unknown.push((pos, info.version)),
                None => {}
            }
        }
    }
    // The top version, if it is unstable somewhere: its write set is the union over its
    // holders (a repair's install of that version carries an empty set).
    let top_set: Option<u32> = infos
        .iter()
        .flatten()
        .flat_map(|i| i.unstable.iter())
        .filter(|u| u.version == top)
        .map(|u| u.write_set)
        .reduce(|a, b| a | b);
    let Some(write_set) = top_set else {
        return d;
    };
    let holders: Vec<usize> = (0..infos.len())
        .filter(|&p| infos[p].as_ref().is_some_and(|i| i.version == top))
        .collect();
    let stable_somewhere = infos
        .iter()
        .flatten()
        .any(|i| i.version == top && !i.unstable.iter().any(|u| u.version == top));
    if stable_somewhere {
        d.stabilize.extend(holders.iter().map(|&p| (p, top)));
        return d;
    }
    if top.epoch < foreign_below {
        d.rollback.extend(holders.iter().map(|&p| (p, top)));
        return d;
    }
    // Untouched data shards are current unless a parity records a newer version of them.
    let view = assess(profile, &infos);
    let in_set = |p: usize| write_set & (1 << p) != 0;
    let available = (0..infos.len())
        .filter(|&p| match &infos[p] {
            None => false,
            Some(i) if in_set(p) => i.version == top,
            Some(_) => p < k && !view.is_stale(p),
        })
        .count();
    if available >= k {
        let missing: Vec<usize> = (0..infos.len())
            .filter(|&p| in_set(p) && infos[p].as_ref().is_some_and(|i| i.version != top))
            .collect();
        d.stabilize.extend(holders.iter().map(|&p| (p, top)));
        // The state rolled forward includes the untouched data shards as they are: an
        // unstable version among them is committed with it. Left unstable, a later writer
        // would roll it back as an older epoch's leftover while the parity keeps it.
        for p in (0..k).filter(|&p| !in_set(p) && !view.is_stale(p)) {
            if let Some(i) = &infos[p] {
                if i.unstable.iter().any(|u| u.version == i.version) {
                    d.stabilize.push((p, i.version));
                }
            }
        }
        d.roll_forward = Some((top, missing));
    } else if available + infos.iter().filter(|i| i.is_none()).count() >= k {
        // The shards out of reach may be the ones that made the write acknowledged (it needs
        // k positions holding its state): rolling it back could drop an acknowledged write,
        // rolling it forward cannot be done from what is visible. Undecided until more shards
        // answer; the stripe serves no I/O meanwhile (found by the live chaos run: a WAN cut
        // hid both parity shards of a stripe whose last, acknowledged write was unstable).
        d.undecided = true;
    } else {
        d.rollback.extend(holders.iter().map(|&p| (p, top)));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ObjectKey, UndoInfo};

    const P: Profile = Profile::DEFAULT; // 4+2: positions 0..4 data, 4, 5 parity

    fn v(s: u64) -> Version {
        Version::new(1, s)
    }

    /// A shard at version `ver`, unstable versions `unstable` (with `set`), and for parity the
    /// recorded data versions.
    fn info(ver: u64, unstable: &[(u64, u32)], dv: &[(u32, u64)]) -> Option<ObjectInfo> {
        Some(ObjectInfo {
            object: ObjectKey {
                volume: 1,
                stripe: 0,
                shard: 0,
            },
            version: if ver == 0 { Version::NONE } else { v(ver) },
            unstable: unstable
                .iter()
                .map(|&(s, set)| UndoInfo {
                    version: v(s),
                    previous: Version::NONE,
                    write_set: set,
                })
                .collect(),
            data_versions: dv.iter().map(|&(s, x)| (s, v(x))).collect(),
            length: 4096,
        })
    }

    #[test]
    fn assess_finds_shards_that_missed_writes() {
        // Data 1 was written at 5 while its server was away: parity says 5, it holds 2.
        let infos = vec![
            info(1, &[], &[]),
            info(2, &[], &[]),
            info(3, &[], &[]),
            None,
            info(5, &[], &[(0, 1), (1, 5), (2, 3)]),
            info(5, &[], &[(0, 1), (1, 5), (2, 3)]),
        ];
        let view = assess(P, &infos);
        assert_eq!(view.expected[1], v(5));
        assert_eq!(view.expected[3], Version::NONE);
        assert_eq!(view.stale, 0b1010, "data 1 is behind, data 3 unreachable");
        assert_eq!(view.current(), 4);
        // A parity behind the other parity is stale too.
        let infos = vec![
            info(1, &[], &[]),
            info(0, &[], &[]),
            info(0, &[], &[]),
            info(0, &[], &[]),
            info(1, &[], &[(0, 1)]),
            info(0, &[], &[]),
        ];
        assert_eq!(assess(P, &infos).stale, 0b100000);
        // Both parity missed the newest write (their servers were away): the data shard holds
        // the truth, the parity is behind.
        let infos = vec![
            info(9, &[], &[]),
            info(2, &[], &[]),
            info(0, &[], &[]),
            info(0, &[], &[]),
            info(5, &[], &[(0, 5), (1, 2)]),
            info(5, &[], &[(0, 5), (1, 2)]),
        ];
        let view = assess(P, &infos);
        assert_eq!(view.expected[0], v(9));
        assert_eq!(view.expected[4], v(9));
        assert_eq!(view.stale, 0b110000);
        // A never-written stripe is all current.
        let empty = vec![info(0, &[], &[]); 6];
        assert_eq!(assess(P, &empty).stale, 0);
    }

    #[test]
    fn a_late_first_attempt_of_a_redone_write_is_not_committed() {
        // Write 28 to data 2 timed out and was redone as 41 without data 2; 41 reached only
        // parity 4 (recording data 2 at 41) before the writer crashed; then 28 landed late.
        let infos = vec![
            info(20, &[], &[]),
            info(20, &[], &[]),
            info(28, &[(28, 0b110100)], &[]),
            info(15, &[], &[]),
            info(41, &[(41, 0b110100)], &[(0, 20), (1, 20), (2, 41), (3, 36)]),
            info(36, &[], &[(0, 20), (1, 20), (2, 20), (3, 36)]),
        ];
        let d = reconcile(P, &infos, 1);
        assert!(d.stabilize.is_empty(), "28 is not committed: {d:?}");
        assert_eq!(d.rollback, vec![(4, v(41))]);
        // Next round, with 41 gone: parity records data 2 at 20, so 28 is a leftover.
        let infos = vec![
            info(20, &[], &[]),
            info(20, &[], &[]),
            info(28, &[(28, 0b110100)], &[]),
            info(15, &[], &[]),
            info(36, &[], &[(0, 20), (1, 20), (2, 20), (3, 36)]),
            info(36, &[], &[(0, 20), (1, 20), (2, 20), (3, 36)]),
        ];
        let d = reconcile(P, &infos, 1);
        assert_eq!(d.rollback, vec![(2, v(28))], "{d:?}");
    }

    #[test]
    fn a_data_version_no_parity_in_reach_can_judge_leaves_the_stripe_undecided() {
        // Chaos seed 12857: write 34 reached data 1-3 (and the parity), write 36 data 0 and the
        // parity; both parity servers are out of reach when the new writer opens.
        let set = 0b111110;
        let open_time = vec![
            info(36, &[], &[]),
            info(34, &[(34, set)], &[]),
            info(34, &[(34, set)], &[]),
            info(34, &[(34, set)], &[]),
            None,
            None,
        ];
        let d = reconcile(P, &open_time, 1);
        assert!(d.undecided, "34 cannot be judged: {d:?}");
        assert!(d.rollback.is_empty(), "{d:?}");
        // Later the parity answers: judged against the previous writer's epoch (1, since the
        // stripe was undecided), 34 is what the parity recorded — committed, not rolled back.
        let later = vec![
            info(36, &[], &[]),
            info(34, &[(34, set)], &[]),
            info(34, &[(34, set)], &[]),
            info(34, &[(34, set)], &[]),
            None,
            info(36, &[], &[(0, 36), (1, 34), (2, 34), (3, 34)]),
        ];
        let d = reconcile(P, &later, 1);
        assert_eq!(
            d.stabilize,
            vec![(1, v(34)), (2, v(34)), (3, v(34))],
            "{d:?}"
        );
        assert!(!d.undecided && d.rollback.is_empty(), "{d:?}");
    }

    #[test]
    fn a_parity_behind_does_not_vouch_for_data_versions() {
        // Parity 5 holds the leftover of a failed write (21, unstable) naming data versions
        // 21 that no data shard has; parity 4 is at the stripe's top and complete.
        let infos = vec![
            info(10, &[], &[]),
            info(12, &[], &[]),
            info(30, &[], &[]),
            info(30, &[], &[]),
            info(30, &[], &[(0, 10), (1, 12), (2, 30), (3, 30)]),
            info(21, &[(21, 0b110011)], &[(0, 21), (1, 21), (2, 15), (3, 14)]),
        ];
        let view = assess(P, &infos);
        assert_eq!(
            view.stale,
            1 << 5,
            "only the parity behind is stale: {view:?}"
        );
        assert_eq!(view.current(), 5);
    }

    #[test]
    fn reconcile_rolls_forward_with_k_and_back_without() {
        // Write 7 touched data 1 + both parity (set 0b110010).
        let set = 0b110010;
        let dv_old = [(0, 1), (1, 2), (2, 3), (3, 4)];
        let dv_new = [(0, 1), (1, 7), (2, 3), (3, 4)];
        let dv_new3 = [(0, 3), (1, 7), (2, 3), (3, 4)];
        // (case, infos, expected decision)
        let cases: Vec<(&str, Vec<Option<ObjectInfo>>, Decision)> = vec![
            (
                "all shards got it: forward, nothing to rebuild",
                vec![
                    info(1, &[], &[]),
                    info(7, &[(7, set)], &[]),
                    info(3, &[], &[]),
                    info(4, &[], &[]),
                    info(7, &[(7, set)], &dv_new),
                    info(7, &[(7, set)], &dv_new),
                ],
                Decision {
                    stabilize: vec![(1, v(7)), (4, v(7)), (5, v(7))],
                    rollback: vec![],
                    roll_forward: Some((v(7), vec![])),
                    undecided: false,
                },
            ),
            (
                "only the data shard got it, every data shard is there: forward, rebuild parity",
                vec![
                    info(1, &[], &[]),
                    info(7, &[(7, set)], &[]),
                    info(3, &[], &[]),
                    info(4, &[], &[]),
                    info(6, &[], &dv_old),
                    info(6, &[], &dv_old),
                ],
                Decision {
                    stabilize: vec![(1, v(7))],
                    rollback: vec![],
                    roll_forward: Some((v(7), vec![4, 5])),
                    undecided: false,
                },
            ),
            (
                "an untouched data shard's unstable version in the rolled-forward state is committed",
                vec![
                    info(1, &[], &[]),
                    info(7, &[(7, set)], &[]),
                    info(3, &[], &[]),
                    info(4, &[(4, 0b111000)], &[]),
                    info(6, &[], &dv_old),
                    info(6, &[], &dv_old),
                ],
                Decision {
                    stabilize: vec![(1, v(7)), (3, v(4))],
                    rollback: vec![],
                    roll_forward: Some((v(7), vec![4, 5])),
                    undecided: false,
                },
            ),
            (
                "only the data shard got it and another data shard is out of reach: undecided \
                 (with that shard current and both parity stale, the write had k and was acked)",
                vec![
                    info(1, &[], &[]),
                    info(7, &[(7, set)], &[]),
                    None,
                    info(4, &[], &[]),
                    info(6, &[], &dv_old),
                    info(6, &[], &dv_old),
                ],
                Decision {
                    undecided: true,
                    ..Decision::default()
                },
            ),
            (
                "two data shards got it, both parity and a data shard out of reach: undecided",
                vec![
                    info(7, &[(7, 0b110011)], &[]),
                    info(7, &[(7, 0b110011)], &[]),
                    info(3, &[], &[]),
                    None,
                    None,
                    None,
                ],
                Decision {
                    undecided: true,
                    ..Decision::default()
                },
            ),
            (
                "only the data shard got it, another is behind, two are out of reach: back",
                vec![
                    info(0, &[], &[]),
                    info(7, &[(7, set)], &[]),
                    None,
                    None,
                    info(6, &[], &dv_old),
                    info(6, &[], &dv_old),
                ],
                Decision {
                    stabilize: vec![],
                    rollback: vec![(1, v(7))],
                    roll_forward: None,
                    undecided: false,
                },
            ),
            (
                "data + one parity got it, one data lost: 0,3 + 1 + p0 = 4, forward",
                vec![
                    info(1, &[], &[]),
                    info(7, &[(7, set)], &[]),
                    None,
                    info(4, &[], &[]),
                    info(7, &[(7, set)], &dv_new),
                    info(6, &[], &dv_old),
                ],
                Decision {
                    stabilize: vec![(1, v(7)), (4, v(7))],
                    rollback: vec![],
                    roll_forward: Some((v(7), vec![5])),
                    undecided: false,
                },
            ),
            (
                "lower unstable versions are committed; the top is stable somewhere",
                vec![
                    info(3, &[(3, 0b110001)], &[]),
                    info(7, &[], &[]),
                    info(3, &[], &[]),
                    info(4, &[], &[]),
                    info(7, &[(3, 0b110001), (7, set)], &dv_new3),
                    info(7, &[(3, 0b110001)], &dv_new3),
                ],
                Decision {
                    stabilize: vec![
                        (0, v(3)),
                        (4, v(3)),
                        (5, v(3)),
                        (1, v(7)),
                        (4, v(7)),
                        (5, v(7)),
                    ],
                    rollback: vec![],
                    roll_forward: None,
                    undecided: false,
                },
            ),
        ];
        for (name, infos, want) in cases {
            assert_eq!(reconcile(P, &infos, 1), want, "{name}");
        }
        // A data shard left holding a write that failed elsewhere (the parity never recorded
        // it) is rolled back even though newer writes happened.
        let leftover = vec![
            info(3, &[(3, 0b110001)], &[]),
            info(7, &[], &[]),
            info(3, &[], &[]),
            info(4, &[], &[]),
            info(7, &[], &dv_new),
            info(7, &[], &dv_new),
        ];
        assert_eq!(
            reconcile(P, &leftover, 1),
            Decision {
                stabilize: vec![],
                rollback: vec![(0, v(3))],
                roll_forward: None,
                undecided: false,
            }
        );
        // A previous writer served I/O without seeing epoch 1's unstable write: back, even
        // with k shards holding it.
        let unseen = vec![
            info(1, &[], &[]),
            info(7, &[(7, set)], &[]),
            info(3, &[], &[]),
            info(4, &[], &[]),
            info(6, &[], &dv_old),
            info(6, &[], &dv_old),
        ];
        assert_eq!(
            reconcile(P, &unseen, 2),
            Decision {
                stabilize: vec![],
                rollback: vec![(1, v(7))],
                roll_forward: None,
                undecided: false,
            }
        );
    }
}
