//! `continuum agent`: one per hypervisor host.
//!
//! Every [`TICK`] the agent reads the VM specs from meta and makes this host match them: it
//! starts QEMU for the VMs placed here that should run (and whose generation it does not run
//! yet), stops those that should not, restarts a QEMU that crashed, and writes each VM's
//! status. It also fails over VMs of dead hosts of its own site ([`crate::scheduler::failover`])
//! after fencing their volumes' writer leases.
//!
//! Invariants:
//! - Edge autonomy (DESIGN.md 9): nothing here stops or restarts a VM because meta is
//!   unreachable; without fresh specs the agent leaves its VMs as they are.
//! - One QEMU per VM per host: a VM's runtime directory holds QEMU's pid file, and an agent that
//!   restarts adopts the QEMU it finds running instead of starting a second one.
//! - A VM moves to another host only after its dead host's gateway leases are revoked, so the
//!   new gateway's epoch fences the old one on every block server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use continuum_meta_client::MetaClient;
use continuum_proto::records_pb::{Host, HostAlive, Vm, VmState, VmStatus};

use crate::network::Tap;
use crate::qemu::{self, Accel, HostSide, Qmp, VmPaths};
use crate::records::{self, OrchError, AGENT_LEASE_TTL_SECONDS};
use crate::scheduler;

/// How often the agent reconciles.
pub const TICK: Duration = Duration::from_secs(1);
/// A QEMU that exits sooner than this after its start failed to start: the VM goes to ERROR
/// (no restart loop) until it is started again.
const START_GRACE: Duration = Duration::from_secs(5);
/// Crash restarts with no successful minute between them before the VM goes to ERROR.
const MAX_QUICK_RESTARTS: u32 = 5;
/// Bytes per second a live migration may use.
const MIGRATION_BANDWIDTH: u64 = 1 << 30;
/// Failed starts in a row before the VM goes to ERROR (a first failure may be a race, e.g. a
/// gateway letting a volume go a moment late).
const MAX_FAILED_STARTS: u32 = 3;
/// How long a migration target's QEMU may take to answer QMP and listen before the migration
/// is called off.
const INCOMING_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    pub site: String,
    pub data_dir: PathBuf,
    pub gateway_socket: PathBuf,
    pub gateway_id: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// None: probe KVM, fall back to TCG.
    pub accel: Option<Accel>,
    /// The kernel the KVM probe boots (default: the newest /boot/vmlinuz-*).
    pub kvm_probe_kernel: Option<PathBuf>,
    /// A host whose agent lease has been gone this long is dead (its VMs fail over).
    pub dead_after: Duration,
    /// How long a stop waits for the guest to power off after the ACPI request.
    pub stop_timeout: Duration,
    pub qemu: String,
    /// The address this host's QEMUs listen on for incoming live migrations.
    pub migration_address: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One VM's QEMU on this host.
struct Runner {
    generation: u64,
    child: Option<tokio::process::Child>,
    /// QEMU's pid (also for an adopted QEMU, which is not our child).
    pid: Option<u32>,
    started: Instant,
    state: VmState,
    reason: String,
    restarts: u32,
    quick_restarts: u32,
    /// Starts in a row that failed within [`START_GRACE`].
    failed_starts: u32,
    /// Not started yet: waiting for its volumes (PENDING with the reason); retried every pass.
    waiting: bool,
    /// A live-migration target (QEMU started with `-incoming`) until the VM is placed here.
    incoming: bool,
    /// Where an incoming migration is to listen, until QEMU listens and it is published.
    incoming_addr: Option<String>,
    /// A live-migration source: `migrate` was sent.
    migrating: bool,
    paths: VmPaths,
}

impl Runner {
    fn new(generation: u64, paths: VmPaths, state: VmState, reason: String) -> Runner {
        Runner {
            generation,
            child: None,
            pid: None,
            started: Instant::now(),
            state,
            reason,
            restarts: 0,
            quick_restarts: 0,
            failed_starts: 0,
            waiting: false,
            incoming: false,
            incoming_addr: None,
            migrating: false,
            paths,
        }
    }

    fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => self.pid.is_some_and(pid_alive),
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// The last lines of a log file (why QEMU failed).
fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

pub struct Agent {
    meta: MetaClient,
    cfg: AgentConfig,
    accel: Accel,
    runners: HashMap<String, Runner>,
    lease: Option<u64>,
    keep_alive: Option<tokio::task::JoinHandle<()>>,
    /// When each host of the site was first seen without its lease.
    missing_since: BTreeMap<String, Instant>,
    written: HashMap<String, VmStatus>,
    /// This host's statuses of VMs it does not run were deleted (once, at the first pass).
    statuses_cleaned: bool,
}

impl Agent {
    pub async fn new(meta: MetaClient, cfg: AgentConfig) -> Agent {
        let accel = match (
            cfg.accel,
            qemu::probe_kernel(cfg.kvm_probe_kernel.as_deref()),
        ) {
            (Some(a), _) => a,
            (None, Some(k)) if qemu::probe_kvm(&k, Duration::from_secs(20)).await => Accel::Kvm,
            (None, Some(k)) => {
                tracing::info!(kernel = %k.display(), "a Linux guest does not boot under KVM here: VMs run under TCG");
                Accel::Tcg
            }
            (None, None) => {
                tracing::info!("no kernel to probe KVM with (/boot is empty; --kvm-probe-kernel): VMs run under TCG, --accel kvm forces KVM");
                Accel::Tcg
            }
        };
        tracing::info!(host = cfg.name, accel = accel.as_str(), "agent starting");
        let mut a = Agent {
            meta,
            cfg,
            accel,
            runners: HashMap::new(),
            lease: None,
            keep_alive: None,
            missing_since: BTreeMap::new(),
            written: HashMap::new(),
            statuses_cleaned: false,
        };
        a.adopt();
        a
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// QEMUs left running by a previous agent on this host (pid file, live process).
    fn adopt(&mut self) {
        let Ok(dir) = std::fs::read_dir(self.cfg.data_dir.join("vms")) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let paths = VmPaths::new(&self.cfg.data_dir, &name);
            let pid = std::fs::read_to_string(paths.pid())
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            let Some(pid) = pid.filter(|p| pid_alive(*p)) else {
                continue;
            };
            let generation = std::fs::read_to_string(paths.dir.join("generation"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            tracing::info!(vm = name, pid, "adopting a running QEMU");
            let mut r = Runner::new(
                generation,
                paths,
                VmState::Running,
                "adopted after an agent restart".into(),
            );
            r.pid = Some(pid);
            self.runners.insert(name, r);
        }
    }

    fn host_record(&self) -> Host {
        Host {
            name: self.cfg.name.clone(),
            site: self.cfg.site.clone(),
            cpus: self.cfg.cpus,
            memory_bytes: self.cfg.memory_bytes,
            kvm: self.accel == Accel::Kvm,
            gateway_socket: self.cfg.gateway_socket.display().to_string(),
            gateway_id: self.cfg.gateway_id.clone(),
            started_unix: unix_now(),
            ..Default::default()
        }
    }

    /// Registers the host if its lease is gone (first start, or meta lost us for a while).
    async fn ensure_registered(&mut self) -> Result<(), OrchError> {
        if let Some(lease) = self.lease {
            let alive = self.meta.record::<HostAlive>(&self.cfg.name).await?;
            if alive.is_some_and(|a| a.record.lease_id == lease) {
                return Ok(());
            }
        }
        let lease = records::register_host(&self.meta, &self.host_record()).await?;
        if let Some(k) = self.keep_alive.take() {
            k.abort();
        }
        self.keep_alive = Some(self.meta.spawn_keep_alive(lease, AGENT_LEASE_TTL_SECONDS));
        self.lease = Some(lease);
        tracing::info!(host = self.cfg.name, lease, "host registered");
        Ok(())
    }

    /// Runs until `shutdown` completes. VMs keep running after the agent stops.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.step().await {
                        // Meta unreachable or a conflict: VMs stay as they are (autonomy).
                        tracing::warn!(error = %e, "agent pass failed; VMs left as they are");
                    }
                }
                _ = &mut shutdown => break,
            }
        }
        if let Some(k) = self.keep_alive.take() {
            k.abort();
        }
        if let Some(lease) = self.lease {
            let _ = self.meta.lease_revoke(lease).await;
        }
    }

    /// One reconciliation pass.
    pub async fn step(&mut self) -> Result<(), OrchError> {
        self.ensure_registered().await?;
        let specs = records::vms(&self.meta).await?;
        let by_name: BTreeMap<String, (Vm, u64)> = specs
            .into_iter()
            .map(|v| (v.record.name.clone(), (v.record, v.mod_revision)))
            .collect();
        self.reap(&by_name).await;
        for (vm, _) in by_name.values() {
            if vm.host == self.cfg.name {
                self.converge(vm).await;
            } else if vm.migrate_to == self.cfg.name && vm.running {
                self.converge_incoming(vm).await;
            }
        }
        // QEMUs of VMs deleted or placed elsewhere: the spec no longer wants them here.
        let me = self.cfg.name.clone();
        let strays: Vec<String> = self
            .runners
            .keys()
            .filter(|n| {
                by_name
                    .get(*n)
                    .is_none_or(|(v, _)| v.host != me && v.migrate_to != me)
            })
            .cloned()
            .collect();
        for name in strays {
            tracing::info!(vm = name, "VM no longer placed here: stopping its QEMU");
            if let Some(mut r) = self.runners.remove(&name) {
                stop_qemu(&mut r, Duration::ZERO).await;
            }
            self.forget(&name).await;
        }
        if !self.statuses_cleaned {
            self.forget_stale_statuses().await?;
            self.statuses_cleaned = true;
        }
        self.remove_unused_taps();
        self.write_statuses().await?;
        self.failover(&by_name).await?;
        Ok(())
    }

    /// Notices QEMUs that exited.
    async fn reap(&mut self, specs: &BTreeMap<String, (Vm, u64)>) {
        let names: Vec<String> = self.runners.keys().cloned().collect();
        for name in names {
            let r = self.runners.get_mut(&name).expect("listed");
            if r.waiting || (r.state != VmState::Running && r.state != VmState::Pending) {
                continue;
            }
            if r.alive() {
                if r.state == VmState::Pending {
                    if let Ok(mut q) = Qmp::connect(&r.paths.qmp()).await {
                        if q.status().await.is_ok_and(|s| s == "running") {
                            r.state = VmState::Running;
                            r.reason.clear();
                        }
                    }
                }
                if r.started.elapsed() > Duration::from_secs(60) {
                    r.quick_restarts = 0;
                }
                continue;
            }
            let exit = match &mut r.child {
                Some(c) => c.try_wait().ok().flatten(),
                None => None,
            };
            r.pid = None;
            if r.incoming {
                // The migration target failed: the migration is off, the source runs on.
                let reason = format!(
                    "migration to {} failed: the target QEMU exited ({}): {}",
                    self.cfg.name,
                    exit.map(|s| s.to_string()).unwrap_or_else(|| "gone".into()),
                    tail(&r.paths.qemu_log(), 3)
                );
                tracing::warn!(vm = name, reason, "incoming migration failed");
                self.runners.remove(&name);
                self.forget(&name).await;
                let me = self.cfg.name.clone();
                let _ = records::update_vm(&self.meta, &name, |v| {
                    if v.migrate_to == me {
                        v.migrate_to.clear();
                        v.migrate_incoming.clear();
                        v.placement_reason = reason.clone();
                    }
                    Ok(())
                })
                .await;
                continue;
            }
            let clean = exit.is_some_and(|s| s.success());
            let log = tail(&r.paths.qemu_log(), 3);
            if clean {
                // The guest powered itself off: the VM is stopped until started again.
                r.state = VmState::Stopped;
                r.reason = "the guest powered off".into();
                let generation = r.generation;
                let me = self.cfg.name.clone();
                let _ = records::update_vm(&self.meta, &name, |v| {
                    if v.host == me && v.generation == generation {
                        v.running = false;
                    }
                    Ok(())
                })
                .await;
            } else if r.started.elapsed() < START_GRACE {
                let reason = format!(
                    "QEMU failed to start ({}): {log}",
                    exit.map(|s| s.to_string()).unwrap_or_else(|| "gone".into())
                );
                tracing::warn!(vm = name, reason, "VM failed to start");
                let failed = r.failed_starts + 1;
                if failed >= MAX_FAILED_STARTS {
                    r.state = VmState::Error;
                    r.reason = reason;
                } else if let Some((vm, _)) = specs.get(&name) {
                    // Try again next pass (same generation).
                    self.start(vm).await;
                    if let Some(r) = self.runners.get_mut(&name) {
                        r.failed_starts = failed;
                        r.reason = format!("retrying after: {reason}");
                    }
                }
            } else if r.quick_restarts >= MAX_QUICK_RESTARTS {
                r.state = VmState::Error;
                r.reason = format!("QEMU crashed {} times in a row: {log}", r.quick_restarts);
            } else {
                // A crash: start it again at the same generation.
                tracing::warn!(vm = name, ?exit, "QEMU exited; restarting the VM");
                r.state = VmState::Stopped;
                r.reason = format!(
                    "QEMU exited ({}); restarting",
                    exit.map(|s| s.to_string()).unwrap_or_else(|| "gone".into())
                );
                let (restarts, quick) = (r.restarts + 1, r.quick_restarts + 1);
                if let Some((vm, _)) = specs.get(&name) {
                    if vm.running && vm.host == self.cfg.name {
                        self.start(vm).await;
                        if let Some(r) = self.runners.get_mut(&name) {
                            r.restarts = restarts;
                            r.quick_restarts = quick;
                        }
                    }
                }
            }
        }
    }

    /// Makes this host's QEMU for `vm` match its spec.
    async fn converge(&mut self, vm: &Vm) {
        if let Some(r) = self.runners.get_mut(&vm.name) {
            // A finished incoming migration: the VM is placed here now, and this is its QEMU.
            r.incoming = false;
        }
        if vm.running && !vm.migrate_to.is_empty() {
            self.migrate_out(vm).await;
            return;
        }
        let current = self.runners.get_mut(&vm.name);
        if vm.running {
            match current {
                Some(r) if r.waiting => self.start(vm).await,
                Some(r) if r.generation >= vm.generation => {} // running it (or its error stands)
                Some(r) => {
                    // A newer generation: reboot or start again (cold).
                    if r.alive() {
                        stop_qemu(r, Duration::ZERO).await;
                    }
                    self.start(vm).await;
                }
                None => self.start(vm).await,
            }
        } else if let Some(r) = current {
            if r.alive() {
                tracing::info!(vm = vm.name, "stopping");
                stop_qemu(r, self.cfg.stop_timeout).await;
                r.state = VmState::Stopped;
                r.reason = "stopped".into();
            } else if r.state == VmState::Running || r.state == VmState::Pending {
                r.state = VmState::Stopped;
            }
            r.generation = vm.generation;
        }
    }

    /// A volume of `vm` whose writer lease another gateway holds (it must let go first: a
    /// planned move lets go within the gateway's linger; a dead host's is fenced).
    async fn held_elsewhere(&self, vm: &Vm) -> Result<Option<String>, OrchError> {
        let mine = format!(
            "{}{}",
            continuum_blockstore::cluster::GATEWAY_HOLDER_PREFIX,
            self.cfg.gateway_id
        );
        for vol in &vm.volumes {
            if let Some(h) = records::writer_of(&self.meta, vol).await? {
                if h.starts_with(continuum_blockstore::cluster::GATEWAY_HOLDER_PREFIX) && h != mine
                {
                    return Ok(Some(format!("waiting for {h} to let volume {vol} go")));
                }
            }
        }
        Ok(None)
    }

    /// The target side of a live migration: QEMU waiting for the state on `-incoming`, its
    /// disks opened in standby on this host's gateway until the source lets the volumes go.
    async fn converge_incoming(&mut self, vm: &Vm) {
        if let Some(r) = self.runners.get_mut(&vm.name).filter(|r| r.incoming) {
            // QEMU runs with `-incoming defer`: once its QMP answers, it listens, and only then
            // is the address published (the source connects at once).
            let Some(addr) = r.incoming_addr.clone() else {
                return;
            };
            let listening = match Qmp::connect(&r.paths.qmp()).await {
                Ok(mut q) => q
                    .execute("migrate-incoming", serde_json::json!({ "uri": addr }))
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("migrate-incoming: {e}")),
                Err(e) => Err(format!("QMP: {e}")),
            };
            if let Err(e) = listening {
                if r.started.elapsed() < INCOMING_READY_TIMEOUT {
                    tracing::debug!(vm = vm.name, error = e, "target QEMU not ready yet");
                    return;
                }
                // A target QEMU that never gets ready must not hold the migration forever.
                let reason = format!(
                    "the target QEMU on {} was not ready within {} s ({e})",
                    self.cfg.name,
                    INCOMING_READY_TIMEOUT.as_secs()
                );
                if let Some(mut r) = self.runners.remove(&vm.name) {
                    stop_qemu(&mut r, Duration::ZERO).await;
                }
                self.forget(&vm.name).await;
                self.abort_migration(vm, reason).await;
                return;
            }
            r.incoming_addr = None;
            let me = self.cfg.name.clone();
            let published = records::update_vm(&self.meta, &vm.name, |v| {
                if v.migrate_to == me {
                    v.migrate_incoming = addr.clone();
                }
                Ok(())
            })
            .await;
            if let Err(e) = published {
                tracing::warn!(vm = vm.name, error = %e, "cannot publish the incoming address");
            }
            return;
        }
        let port = match std::net::TcpListener::bind((self.cfg.migration_address.as_str(), 0))
            .and_then(|l| l.local_addr())
        {
            Ok(a) => a.port(),
            Err(e) => {
                tracing::warn!(vm = vm.name, error = %e, "no port for an incoming migration");
                return;
            }
        };
        let addr = format!("tcp:{}:{port}", self.cfg.migration_address);
        self.spawn_runner(vm, Some("defer".into()));
        if let Some(r) = self.runners.get_mut(&vm.name) {
            r.incoming = true;
            r.incoming_addr = Some(addr.clone());
            r.reason = format!("incoming migration on {addr}");
        }
    }

    /// The source side of a live migration: sends `migrate` once the target listens, follows
    /// it, and at completion hands the volumes over (revokes this gateway's writer leases, so
    /// the target's gateway attaches with a new epoch that fences this one) and moves the
    /// VM's placement to the target.
    async fn migrate_out(&mut self, vm: &Vm) {
        let Some(r) = self.runners.get_mut(&vm.name) else {
            // Nothing runs here to migrate (not started yet, or gone): the migration is off.
            self.abort_migration(vm, format!("the VM does not run on {}", self.cfg.name))
                .await;
            return;
        };
        if !r.alive() && !r.waiting {
            let reason = format!("its QEMU on {} is not running", self.cfg.name);
            self.abort_migration(vm, reason).await;
            return;
        }
        if vm.migrate_incoming.is_empty() || r.state != VmState::Running {
            return;
        }
        let Ok(mut q) = Qmp::connect(&r.paths.qmp()).await else {
            return;
        };
        if !r.migrating {
            // Hosts of a site share a LAN: QEMU's default bandwidth cap would stretch a busy
            // guest's migration over minutes.
            let _ = q
                .execute(
                    "migrate-set-parameters",
                    serde_json::json!({ "max-bandwidth": MIGRATION_BANDWIDTH }),
                )
                .await;
            let sent = q
                .execute("migrate", serde_json::json!({ "uri": vm.migrate_incoming }))
                .await;
            match sent {
                Ok(_) => {
                    r.migrating = true;
                    tracing::info!(
                        vm = vm.name,
                        to = vm.migrate_to,
                        uri = vm.migrate_incoming,
                        "live migration started"
                    );
                }
                Err(e) => self.abort_migration(vm, format!("migrate: {e}")).await,
            }
            return;
        }
        let (status, error) = match q.execute("query-migrate", serde_json::json!({})).await {
            Ok(s) => (
                s["status"].as_str().unwrap_or("").to_string(),
                s["error-desc"].as_str().unwrap_or("").to_string(),
            ),
            Err(e) => {
                tracing::warn!(vm = vm.name, error = %e, "query-migrate");
                return;
            }
        };
        match status.as_str() {
            "completed" => {
                let fenced = records::fence_volumes(&self.meta, vm, &self.cfg.gateway_id).await;
                let (from, to) = (self.cfg.name.clone(), vm.migrate_to.clone());
                let moved = records::update_vm(&self.meta, &vm.name, |v| {
                    if v.migrate_to == to {
                        v.host = to.clone();
                        v.migrate_to.clear();
                        v.migrate_incoming.clear();
                        v.placement_reason = format!("live-migrated from {from}");
                    }
                    Ok(())
                })
                .await;
                tracing::info!(
                    vm = vm.name,
                    to,
                    ?fenced,
                    ok = moved.is_ok(),
                    "live migration completed; writer leases handed over"
                );
                if let Some(mut r) = self.runners.remove(&vm.name) {
                    stop_qemu(&mut r, Duration::ZERO).await;
                }
                self.forget(&vm.name).await;
            }
            "failed" | "cancelled" => {
                r.migrating = false;
                self.abort_migration(vm, format!("migration {status}: {error}"))
                    .await;
            }
            _ => {}
        }
    }

    async fn abort_migration(&mut self, vm: &Vm, reason: String) {
        tracing::warn!(
            vm = vm.name,
            reason,
            "live migration failed; the VM stays here"
        );
        let to = vm.migrate_to.clone();
        let _ = records::update_vm(&self.meta, &vm.name, |v| {
            if v.migrate_to == to {
                v.migrate_to.clear();
                v.migrate_incoming.clear();
                v.placement_reason = format!("migration to {to} failed: {reason}");
            }
            Ok(())
        })
        .await;
    }

    async fn start(&mut self, vm: &Vm) {
        match self.held_elsewhere(vm).await {
            Ok(None) => {}
            Ok(Some(reason)) => {
                self.waiting(vm, reason);
                return;
            }
            Err(e) => {
                self.waiting(vm, format!("cannot check its volumes' writers: {e}"));
                return;
            }
        }
        self.spawn_runner(vm, None);
    }

    /// Starts QEMU for `vm` (with `-incoming` for a migration target) as its runner.
    fn spawn_runner(&mut self, vm: &Vm, incoming: Option<String>) {
        let paths = VmPaths::new(&self.cfg.data_dir, &vm.name);
        let mut runner = Runner::new(
            vm.generation,
            paths.clone(),
            VmState::Pending,
            String::new(),
        );
        match self.spawn(vm, &paths, incoming) {
            Ok(child) => {
                runner.pid = child.id();
                runner.child = Some(child);
                tracing::info!(
                    vm = vm.name,
                    pid = runner.pid,
                    generation = vm.generation,
                    "QEMU started"
                );
            }
            Err(e) => {
                runner.state = VmState::Error;
                runner.reason = format!("cannot run {}: {e}", self.cfg.qemu);
            }
        }
        self.runners.insert(vm.name.clone(), runner);
    }

    /// `vm` waits (PENDING with `reason`); the next pass tries to start it again.
    fn waiting(&mut self, vm: &Vm, reason: String) {
        let mut r = Runner::new(
            vm.generation,
            VmPaths::new(&self.cfg.data_dir, &vm.name),
            VmState::Pending,
            reason,
        );
        r.waiting = true;
        self.runners.insert(vm.name.clone(), r);
    }

    fn spawn(
        &self,
        vm: &Vm,
        paths: &VmPaths,
        incoming: Option<String>,
    ) -> std::io::Result<tokio::process::Child> {
        std::fs::create_dir_all(&paths.dir)?;
        for stale in [paths.qmp(), paths.console(), paths.pid()] {
            let _ = std::fs::remove_file(stale);
        }
        std::fs::write(paths.dir.join("generation"), vm.generation.to_string())?;
        let tap = if vm.nic {
            let tap = Tap::for_vm(vm).ok_or_else(|| {
                std::io::Error::other(format!("its NIC has no valid address ({:?})", vm.address))
            })?;
            tap.set_up()
                .map_err(|e| std::io::Error::other(format!("its NIC: {e}")))?;
            std::fs::write(paths.tap(), &tap.name)?;
            Some(tap.name)
        } else {
            None
        };
        let host = HostSide {
            accel: self.accel,
            gateway_socket: self.cfg.gateway_socket.clone(),
            tap,
            incoming,
        };
        let log = std::fs::File::create(paths.qemu_log())?;
        tokio::process::Command::new(&self.cfg.qemu)
            .args(qemu::command_line(vm, paths, &host))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // QEMU outlives the agent (an agent restart adopts it).
            .kill_on_drop(false)
            .spawn()
    }

    /// Drops what this agent reported about VM `name` (it no longer runs it here).
    async fn forget(&mut self, name: &str) {
        self.written.remove(name);
        let key = records::status_key(name, &self.cfg.name);
        if let Err(e) = self.meta.delete_record::<VmStatus>(&key).await {
            tracing::warn!(vm = name, error = %e, "cannot delete its status");
        }
    }

    /// Deletes this host's statuses of VMs it does not run (left from before a restart of
    /// the agent or the host).
    async fn forget_stale_statuses(&mut self) -> Result<(), OrchError> {
        for s in records::statuses(&self.meta).await? {
            if s.host == self.cfg.name && !self.runners.contains_key(&s.name) {
                self.forget(&s.name).await;
            }
        }
        Ok(())
    }

    /// Removes the tap devices this agent made for VMs it no longer runs (deleted, moved away).
    fn remove_unused_taps(&self) {
        let Ok(dir) = std::fs::read_dir(self.cfg.data_dir.join("vms")) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if self.runners.contains_key(&name) {
                continue;
            }
            let paths = VmPaths::new(&self.cfg.data_dir, &name);
            let Ok(tap) = std::fs::read_to_string(paths.tap()) else {
                continue;
            };
            match Tap::remove(tap.trim()) {
                Ok(()) => {
                    tracing::info!(vm = name, tap = tap.trim(), "tap device removed");
                    let _ = std::fs::remove_file(paths.tap());
                }
                Err(e) => tracing::warn!(vm = name, error = %e, "cannot remove the tap device"),
            }
        }
    }

    async fn write_statuses(&mut self) -> Result<(), OrchError> {
        let accel = self.accel.as_str().to_string();
        for (name, r) in &self.runners {
            let s = VmStatus {
                name: name.clone(),
                host: self.cfg.name.clone(),
                state: r.state as i32,
                reason: r.reason.clone(),
                generation: r.generation,
                pid: r.pid.unwrap_or(0),
                console_socket: r.paths.console().display().to_string(),
                console_log: r.paths.console_log().display().to_string(),
                since_unix: 0,
                restarts: r.restarts,
                accel: accel.clone(),
                ..Default::default()
            };
            if self.written.get(name) == Some(&s) {
                continue;
            }
            let mut stamped = s.clone();
            stamped.since_unix = unix_now();
            self.meta.put_record(&stamped).await?;
            self.written.insert(name.clone(), s);
        }
        Ok(())
    }

    /// Moves VMs of dead hosts of this site to live ones, after fencing. Only the first live
    /// agent of the site (by name) acts; the CAS on each spec keeps two from moving one VM.
    async fn failover(&mut self, specs: &BTreeMap<String, (Vm, u64)>) -> Result<(), OrchError> {
        let hosts = records::hosts(&self.meta).await?;
        let alive = records::alive_hosts(&self.meta).await?;
        let site: Vec<&Host> = hosts.iter().filter(|h| h.site == self.cfg.site).collect();
        let now = Instant::now();
        let mut dead = BTreeSet::new();
        for h in &site {
            if alive.contains(&h.name) {
                self.missing_since.remove(&h.name);
            } else {
                let since = *self.missing_since.entry(h.name.clone()).or_insert(now);
                if now.duration_since(since) >= self.cfg.dead_after {
                    dead.insert(h.name.clone());
                }
            }
        }
        let leader = site.iter().map(|h| &h.name).find(|n| alive.contains(*n));
        if dead.is_empty() || leader != Some(&self.cfg.name) {
            return Ok(());
        }
        let vms: Vec<Vm> = specs.values().map(|(v, _)| v.clone()).collect();
        for m in scheduler::failover(&hosts, &alive, &dead, &vms) {
            let Some((vm, _)) = specs.get(&m.vm) else {
                continue;
            };
            if !vm.running {
                // A stopped VM needs no restart, only a live host to start on later.
                continue;
            }
            let gw = hosts
                .iter()
                .find(|h| h.name == m.from)
                .map(|h| h.gateway_id.clone())
                .unwrap_or_default();
            let fenced = records::fence_volumes(&self.meta, vm, &gw).await?;
            let from = m.from.clone();
            let to = m.to.clone();
            records::update_vm(&self.meta, &m.vm, |v| {
                if v.host == from {
                    v.host = to.clone();
                    v.generation += 1;
                    v.placement_reason = format!("restarted after host {from} died");
                }
                Ok(())
            })
            .await?;
            tracing::warn!(
                vm = m.vm,
                from = m.from,
                to = m.to,
                fenced,
                "failover: VM moved off a dead host"
            );
        }
        Ok(())
    }
}

/// Stops a QEMU: an ACPI power-down and up to `grace` for the guest to go, then `quit`, then
/// SIGKILL.
async fn stop_qemu(r: &mut Runner, grace: Duration) {
    if !grace.is_zero() {
        if let Ok(mut q) = Qmp::connect(&r.paths.qmp()).await {
            let _ = q.execute("system_powerdown", serde_json::json!({})).await;
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && r.alive() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if r.alive() {
        if let Ok(mut q) = Qmp::connect(&r.paths.qmp()).await {
            let _ = q.execute("quit", serde_json::json!({})).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && r.alive() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if r.alive() {
        if let Some(pid) = r.pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    if let Some(c) = &mut r.child {
        let _ = c.wait().await;
    }
    r.pid = None;
}
