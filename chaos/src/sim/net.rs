//! The simulated network between volume clients and block servers: in-process pipes with a
//! seeded one-way delay, links that can be *held* (a partition: bytes wait, as TCP would keep
//! retransmitting them, and arrive when it heals) and servers that are *down* (connections
//! reset, new ones refused). Virtual time is tokio's paused clock.
//!
//! Every connection is two pipes joined by a pump per direction; the pump reads what one side
//! wrote, waits the link's delay, waits while the link is held, then delivers, so the order of
//! bytes in a direction is kept. A server going down bumps its generation: pumps of the older
//! generation stop, which both ends see as a reset.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuum_blockstore::client::{Dialer, Dialing, Stream};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

/// Bytes a pipe buffers per direction.
const PIPE_BYTES: usize = 1 << 20;
/// Largest chunk a pump moves at once.
const CHUNK_BYTES: usize = 1 << 20;
/// How often a held link looks again whether it was released.
const HOLD_POLL: Duration = Duration::from_millis(5);

/// A server as the network sees it.
struct Endpoint {
    /// New connections are handed to the server's accept loop here.
    accept: Option<mpsc::UnboundedSender<DuplexStream>>,
    generation: u64,
}

struct State {
    endpoints: Vec<Endpoint>,
    /// (client, server) pairs whose links are held.
    held: BTreeSet<(u64, usize)>,
    rng: StdRng,
    max_delay_us: u64,
}

/// The network (cheap to clone; all clones are one network).
#[derive(Clone)]
pub struct SimNet {
    state: Arc<Mutex<State>>,
}

impl SimNet {
    pub fn new(servers: usize, seed: u64, max_delay_us: u64) -> Self {
        let endpoints = (0..servers)
            .map(|_| Endpoint {
                accept: None,
                generation: 0,
            })
            .collect();
        Self {
            state: Arc::new(Mutex::new(State {
                endpoints,
                held: BTreeSet::new(),
                rng: StdRng::seed_from_u64(seed ^ 0x6e65_7477_6f72_6b00),
                max_delay_us: max_delay_us.max(1),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("one thread")
    }

    /// The address a client dials for server `i`.
    pub fn addr(i: usize) -> String {
        format!("sim-{i}")
    }

    /// Server `i` is up and takes connections from `accept`.
    pub fn attach(&self, i: usize, accept: mpsc::UnboundedSender<DuplexStream>) {
        let mut s = self.lock();
        s.endpoints[i].accept = Some(accept);
        s.endpoints[i].generation += 1;
    }

    /// Server `i` is down: its connections reset, new ones are refused.
    pub fn detach(&self, i: usize) {
        let mut s = self.lock();
        s.endpoints[i].accept = None;
        s.endpoints[i].generation += 1;
    }

    /// Holds (or releases) every link between client `client` and server `i`.
    pub fn hold(&self, client: u64, i: usize, held: bool) {
        let mut s = self.lock();
        if held {
            s.held.insert((client, i));
        } else {
            s.held.remove(&(client, i));
        }
    }

    pub fn release_all(&self) {
        self.lock().held.clear();
    }

    fn is_held(&self, client: u64, i: usize) -> bool {
        self.lock().held.contains(&(client, i))
    }

    fn generation(&self, i: usize) -> u64 {
        self.lock().endpoints[i].generation
    }

    fn delay(&self) -> Duration {
        let mut s = self.lock();
        let max = s.max_delay_us;
        Duration::from_micros(s.rng.gen_range(1..=max))
    }

    /// A dialer for client `client` (each volume handle is its own client, so links can be
    /// held per writer).
    pub fn dialer(&self, client: u64) -> Arc<dyn Dialer> {
        Arc::new(SimDialer {
            net: self.clone(),
            client,
        })
    }
}

struct SimDialer {
    net: SimNet,
    client: u64,
}

impl Dialer for SimDialer {
    fn dial(&self, addr: &str) -> Dialing {
        let net = self.net.clone();
        let client = self.client;
        let server: Option<usize> = addr.strip_prefix("sim-").and_then(|s| s.parse().ok());
        Box::pin(async move {
            let Some(i) = server.filter(|i| *i < net.lock().endpoints.len()) else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a simulated address",
                ));
            };
            tokio::time::sleep(net.delay()).await;
            // A held link never answers the handshake: the client's connect deadline fires.
            while net.is_held(client, i) {
                tokio::time::sleep(HOLD_POLL).await;
            }
            let (accept, generation) = {
                let s = net.lock();
                (s.endpoints[i].accept.clone(), s.endpoints[i].generation)
            };
            let Some(accept) = accept else {
                return Err(std::io::ErrorKind::ConnectionRefused.into());
            };
            let (client_end, pump_client) = tokio::io::duplex(PIPE_BYTES);
            let (pump_server, server_end) = tokio::io::duplex(PIPE_BYTES);
            if accept.send(server_end).is_err() {
                return Err(std::io::ErrorKind::ConnectionRefused.into());
            }
            let (cr, cw) = tokio::io::split(pump_client);
            let (sr, sw) = tokio::io::split(pump_server);
            let link = Link {
                net: net.clone(),
                client,
                server: i,
                generation,
            };
            tokio::spawn(link.clone().pump(cr, sw));
            tokio::spawn(link.pump(sr, cw));
            Ok(Box::new(client_end) as Box<dyn Stream>)
        })
    }
}

#[derive(Clone)]
struct Link {
    net: SimNet,
    client: u64,
    server: usize,
    generation: u64,
}

impl Link {
    fn alive(&self) -> bool {
        self.net.generation(self.server) == self.generation
    }

    /// Moves bytes from `from` to `to` until either side closes or the server's generation
    /// changes (a crash resets its connections).
    async fn pump(
        self,
        mut from: tokio::io::ReadHalf<DuplexStream>,
        mut to: tokio::io::WriteHalf<DuplexStream>,
    ) {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            tokio::time::sleep(self.net.delay()).await;
            while self.net.is_held(self.client, self.server) && self.alive() {
                tokio::time::sleep(HOLD_POLL).await;
            }
            if !self.alive() || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }
}
