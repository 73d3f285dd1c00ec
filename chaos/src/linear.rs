//! A linearizability checker for histories of a key-value store of registers (put, get,
//! compare-and-swap), in the Wing–Gong–Lowe style that Porcupine and Knossos use.
//!
//! A history is a set of operations, each with the time it was invoked and, if the client
//! learnt the outcome, the time it completed and its result. An operation whose outcome is
//! unknown (a timeout, a crashed server, an error that does not say the write was refused)
//! may have taken effect at any point after its invocation, or never: it completes "at
//! infinity" and its result is unconstrained. The history is linearizable when some order of
//! the operations, consistent with real time (an operation that completed before another was
//! invoked comes first) and with the register model, produces every known result.
//!
//! Keys are independent registers, so the history is checked one key at a time
//! (P-compositionality), which keeps the search small. The search is Lowe's: walk the
//! history in time order, linearize an invoked operation when the model accepts it, backtrack
//! when a completion is reached whose operation was not linearized, and memoize
//! (linearized set, state) pairs already explored. The worst case is exponential (the
//! problem is NP-complete); `max_steps` bounds the work and an exhausted budget is reported as
//! such, never as a pass.

use std::collections::{BTreeMap, HashMap, HashSet};

/// An operation on one key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Call {
    Put(Vec<u8>),
    Get,
    /// Set to `new` if the value is `expect` (`None`: the key is absent).
    Cas {
        expect: Option<Vec<u8>>,
        new: Vec<u8>,
    },
}

/// What the client learnt.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Ret {
    Put,
    Get(Option<Vec<u8>>),
    Cas(bool),
    /// The outcome is unknown (see the module doc).
    Unknown,
}

/// One operation of a history. Times are in any monotonic unit.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Op {
    pub key: Vec<u8>,
    pub call: Call,
    pub invoke: u64,
    /// `None` when the outcome is unknown.
    pub complete: Option<u64>,
    pub ret: Ret,
}

/// The checker's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order explains the results of this key's operations.
    Violation {
        key: Vec<u8>,
        ops: usize,
    },
    /// The search budget ran out before an answer (neither a pass nor a failure).
    Unknown {
        key: Vec<u8>,
    },
}

/// Checks a whole history, key by key.
pub fn check(history: &[Op], max_steps: u64) -> Verdict {
    let mut by_key: BTreeMap<&[u8], Vec<&Op>> = BTreeMap::new();
    for op in history {
        // A read whose answer was lost constrains nothing.
        if op.call == Call::Get && op.ret == Ret::Unknown {
            continue;
        }
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        match check_key(&ops, max_steps) {
            Some(true) => {}
            Some(false) => {
                return Verdict::Violation {
                    key: key.to_vec(),
                    ops: ops.len(),
                }
            }
            None => return Verdict::Unknown { key: key.to_vec() },
        }
    }
    Verdict::Linearizable
}

/// Register state: an interned value, or absent.
type State = Option<u32>;

struct Interner(HashMap<Vec<u8>, u32>);

impl Interner {
    fn id(&mut self, v: &[u8]) -> u32 {
        let n = self.0.len() as u32;
        *self.0.entry(v.to_vec()).or_insert(n)
    }
}

#[derive(Clone, Copy)]
enum ICall {
    Put(u32),
    Get,
    Cas { expect: State, new: u32 },
}

#[derive(Clone, Copy)]
enum IRet {
    Get(State),
    Cas(bool),
    Any,
}

/// Applies `call` to `state`; `None` when the model cannot produce `ret`.
fn step(state: State, call: ICall, ret: IRet) -> Option<State> {
    match (call, ret) {
        (ICall::Put(v), _) => Some(Some(v)),
        (ICall::Get, IRet::Get(seen)) => (seen == state).then_some(state),
        (ICall::Get, _) => Some(state),
        (ICall::Cas { expect, new }, r) => {
            let swapped = state == expect;
            match r {
                IRet::Cas(claimed) if claimed != swapped => None,
                _ => Some(if swapped { Some(new) } else { state }),
            }
        }
    }
}

/// One entry of the time-ordered event list: the call or the return of operation `op`.
#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    call: bool,
}

/// `Some(linearizable)`, or `None` when `max_steps` ran out.
fn check_key(ops: &[&Op], max_steps: u64) -> Option<bool> {
    let mut values = Interner(HashMap::new());
    let calls: Vec<(ICall, IRet)> = ops
        .iter()
        .map(|op| {
            let call = match &op.call {
                Call::Put(v) => ICall::Put(values.id(v)),
                Call::Get => ICall::Get,
                Call::Cas { expect, new } => ICall::Cas {
                    expect: expect.as_deref().map(|e| values.id(e)),
                    new: values.id(new),
                },
            };
            let ret = match (&op.ret, op.complete) {
                (_, None) | (Ret::Unknown, _) => IRet::Any,
                (Ret::Get(v), _) => IRet::Get(v.as_deref().map(|v| values.id(v))),
                (Ret::Cas(b), _) => IRet::Cas(*b),
                (Ret::Put, _) => IRet::Any,
            };
            (call, ret)
        })
        .collect();
    // Events in time order; at equal times calls go first (the permissive reading: two
    // operations are ordered only when one completed strictly before the other began).
    let mut events: Vec<(u64, u8, Entry)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoke, 0, Entry { op: i, call: true }));
        let done = match op.ret {
            Ret::Unknown => u64::MAX,
            _ => op.complete.unwrap_or(u64::MAX),
        };
        events.push((done, 1, Entry { op: i, call: false }));
    }
    events.sort_by_key(|(t, order, e)| (*t, *order, e.op));
    let n = events.len();
    // A doubly linked list over the events, with a head sentinel at index n.
    let head = n;
    let mut next: Vec<usize> = (1..=n).collect();
    next.push(0);
    let mut prev: Vec<usize> = (0..=n).map(|i| if i == 0 { head } else { i - 1 }).collect();
    next[head] = if n == 0 { usize::MAX } else { 0 };
    if n > 0 {
        next[n - 1] = usize::MAX;
    }
    prev[head] = usize::MAX;
    let mut call_at = vec![0usize; ops.len()];
    let mut ret_at = vec![0usize; ops.len()];
    for (i, (_, _, e)) in events.iter().enumerate() {
        if e.call {
            call_at[e.op] = i;
        } else {
            ret_at[e.op] = i;
        }
    }
    let unlink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != usize::MAX {
            prev[nx] = p;
        }
    };
    let relink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != usize::MAX {
            prev[nx] = i;
        }
    };
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut cur = next[head];
    let mut steps = 0u64;
    while next[head] != usize::MAX {
        steps += 1;
        if steps > max_steps {
            return None;
        }
        if cur == usize::MAX {
            // Cannot happen: the list always ends in a return entry. Treat as a dead end.
            return Some(false);
        }
        let e = events[cur].2;
        if e.call {
            let (call, ret) = calls[e.op];
            let after = step(state, call, ret);
            let mut advanced = false;
            if let Some(s) = after {
                let mut lin = linearized.clone();
                lin[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((lin.clone(), s)) {
                    stack.push((e.op, state));
                    state = s;
                    linearized = lin;
                    // Lift the operation out of the list (its return first, then its call).
                    unlink(ret_at[e.op], &mut next, &mut prev);
                    unlink(call_at[e.op], &mut next, &mut prev);
                    cur = next[head];
                    advanced = true;
                }
            }
            if !advanced {
                cur = next[cur];
            }
        } else {
            // The first pending return: its operation must already be linearized. Backtrack.
            let Some((op, before)) = stack.pop() else {
                return Some(false);
            };
            state = before;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(call_at[op], &mut next, &mut prev);
            relink(ret_at[op], &mut next, &mut prev);
            cur = next[call_at[op]];
        }
    }
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: Call, invoke: u64, complete: Option<u64>, ret: Ret) -> Op {
        Op {
            key: b"k".to_vec(),
            call,
            invoke,
            complete,
            ret,
        }
    }

    fn v(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    const BUDGET: u64 = 1_000_000;

    #[test]
    fn sequential_history_passes_and_a_stale_read_fails() {
        let ok = vec![
            op(Call::Put(v("a")), 0, Some(1), Ret::Put),
            op(Call::Get, 2, Some(3), Ret::Get(Some(v("a")))),
            op(Call::Put(v("b")), 4, Some(5), Ret::Put),
            op(Call::Get, 6, Some(7), Ret::Get(Some(v("b")))),
        ];
        assert_eq!(check(&ok, BUDGET), Verdict::Linearizable);
        let mut stale = ok.clone();
        stale[3].ret = Ret::Get(Some(v("a")));
        assert!(matches!(check(&stale, BUDGET), Verdict::Violation { .. }));
    }

    #[test]
    fn concurrent_operations_may_take_either_order() {
        // The put overlaps both reads: old then new is fine...
        let h = vec![
            op(Call::Put(v("a")), 0, Some(1), Ret::Put),
            op(Call::Put(v("b")), 2, Some(10), Ret::Put),
            op(Call::Get, 3, Some(4), Ret::Get(Some(v("a")))),
            op(Call::Get, 5, Some(6), Ret::Get(Some(v("b")))),
        ];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // ...but new then old is not (the second read began after the first saw "b").
        let h = vec![
            op(Call::Put(v("a")), 0, Some(1), Ret::Put),
            op(Call::Put(v("b")), 2, Some(10), Ret::Put),
            op(Call::Get, 3, Some(4), Ret::Get(Some(v("b")))),
            op(Call::Get, 5, Some(6), Ret::Get(Some(v("a")))),
        ];
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
    }

    #[test]
    fn unknown_writes_may_apply_late_or_never() {
        let h = vec![
            op(Call::Put(v("a")), 0, Some(1), Ret::Put),
            op(Call::Put(v("b")), 2, None, Ret::Unknown),
            op(Call::Get, 3, Some(4), Ret::Get(Some(v("a")))),
            op(Call::Get, 50, Some(51), Ret::Get(Some(v("b")))),
        ];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        let never = vec![
            op(Call::Put(v("a")), 0, Some(1), Ret::Put),
            op(Call::Put(v("b")), 2, None, Ret::Unknown),
            op(Call::Get, 50, Some(51), Ret::Get(Some(v("a")))),
        ];
        assert_eq!(check(&never, BUDGET), Verdict::Linearizable);
        // A value nobody wrote is never explained.
        let h = vec![op(Call::Get, 0, Some(1), Ret::Get(Some(v("z"))))];
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
    }

    #[test]
    fn compare_and_swap_results_are_checked() {
        let h = vec![
            op(Call::Put(v("a")), 0, Some(1), Ret::Put),
            op(
                Call::Cas {
                    expect: Some(v("a")),
                    new: v("b"),
                },
                2,
                Some(3),
                Ret::Cas(true),
            ),
            op(
                Call::Cas {
                    expect: Some(v("a")),
                    new: v("c"),
                },
                4,
                Some(5),
                Ret::Cas(false),
            ),
            op(Call::Get, 6, Some(7), Ret::Get(Some(v("b")))),
        ];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // Two successful swaps from the same expected value cannot both happen.
        let mut bad = h.clone();
        bad[2].ret = Ret::Cas(true);
        assert!(matches!(check(&bad, BUDGET), Verdict::Violation { .. }));
        // A swap on an absent key.
        let h = vec![
            op(
                Call::Cas {
                    expect: None,
                    new: v("x"),
                },
                0,
                Some(1),
                Ret::Cas(true),
            ),
            op(Call::Get, 2, Some(3), Ret::Get(Some(v("x")))),
        ];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn the_budget_is_reported_not_passed() {
        // Many concurrent puts and reads in a pattern with no valid order: a tiny budget
        // must say "unknown", never "linearizable".
        let mut h = Vec::new();
        for i in 0..12 {
            h.push(op(Call::Put(v(&format!("{i}"))), 0, Some(100), Ret::Put));
        }
        h.push(op(Call::Get, 200, Some(201), Ret::Get(Some(v("nope")))));
        assert!(matches!(check(&h, 5), Verdict::Unknown { .. }));
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
    }

    proptest::proptest! {
        /// Histories produced by a real sequential register (each op strictly after the last,
        /// some outcomes hidden) are always linearizable.
        #[test]
        fn sequential_executions_are_linearizable(ops in proptest::collection::vec((0u8..3, 0u8..4, proptest::bool::ANY), 0..40)) {
            let mut state: Option<Vec<u8>> = None;
            let mut h = Vec::new();
            for (t, (kind, val, hide)) in ops.into_iter().enumerate() {
                let t = t as u64 * 10;
                let value = vec![val];
                let (call, ret) = match kind {
                    0 => { state = Some(value.clone()); (Call::Put(value), Ret::Put) }
                    1 => (Call::Get, Ret::Get(state.clone())),
                    _ => {
                        let expect = if val % 2 == 0 { state.clone() } else { Some(vec![val / 2]) };
                        let ok = expect == state;
                        if ok { state = Some(value.clone()); }
                        (Call::Cas { expect, new: value }, Ret::Cas(ok))
                    }
                };
                let (complete, ret) = if hide { (None, Ret::Unknown) } else { (Some(t + 5), ret) };
                h.push(op(call, t, complete, ret));
            }
            proptest::prop_assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        }
    }
}
