//! Benchmark of bind-mount sync: `offload proxy` mirroring a local tree to the copy
//! that `offload agent` keeps (`src/proxy/mounts.rs`, `src/agent/sync.rs`), next to
//! `rsync -a` over ssh doing the same job, all on this machine.
//!
//! A seeded generator writes a node_modules-like tree (10,000 files, ~40 MiB by
//! default). Each figure is measured in the same run as its baseline, on loopback
//! ("@0ms") and through the tests' delay relay (`tests/support/delay.rs`, "@20ms"),
//! which sits between proxy and agent, and between ssh and a private sshd:
//!
//! * initial sync: a `POST /containers/create` with the bind through the proxy, minus
//!   the same create without it, vs `rsync -a` to a fresh directory;
//! * re-sync of one changed file: edit, then a barrier (`POST /containers/{id}/exec`
//!   flushes pending edits first), vs an `rsync -a` re-run;
//! * change propagation: edit → the new content is in the agent's copy, which is the
//!   directory the container has at `/w`, vs the round trip;
//! * idle: bytes over the link and CPU of both halves while nothing changes;
//! * memory: RSS of both halves after syncing trees of different entry counts and
//!   different content sizes.
//!
//! See benches/README.md ("Sync benchmark"). Run with `cargo bench --bench sync`.
//! Without `--bench` (when `cargo test --all-targets` runs this target) it only prints
//! how to run it.

#[allow(dead_code)] // the relay can also cut and freeze links; the bench only delays
#[path = "../tests/support/delay.rs"]
mod delay;

#[path = "common/relay.rs"]
mod relay;

mod common;

#[path = "common/rig.rs"]
mod rig;

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use delay::DelayRelay;
use hyper::{Method, StatusCode};
use inotify::{Inotify, WatchDescriptor, WatchMask};
use serde_json::json;
use tokio::io::unix::AsyncFd;

use common::engine::{api_expect, ensure_image, sweep_leftovers, ApiClient, Container};
use common::procfs::{load_average, process_tree, stat_fields};
use common::report::{Columns, Paired, Report, Row, Style, Target};
use common::stats::{median, Percentiles, WyRand};
use common::DOCKER_CLI;
use common::{
    env_or, guarded_command, is_running, run_bounded, sections, within, Context, Result, DEFAULT_IMAGE,
};
use relay::{measure_rtt, start_relay, RttFigures};
use rig::{Daemon, Sshd};

/// Label on every container the bench creates; its value is the bench's pid.
const LABEL: &str = "offload-sync-bench.pid";
/// Temporary directories are `$TMPDIR/offload-sync-bench-<pid>-*`.
const TEMP_PREFIX: &str = "offload-sync-bench-";
const SSH_LO: &str = "offload-bench-lo";
const SSH_WAN: &str = "offload-bench-wan";
/// The fastest kex and cipher of OpenSSH here (the anchors' rsync figures use them):
/// the rsync baselines are as fast as ssh gets on this box.
const SSH_TUNING: &str = "  Ciphers aes128-gcm@openssh.com\n  KexAlgorithms curve25519-sha256\n";
/// Where the bench containers see the synced tree.
const MOUNT_TARGET: &str = "/w";
/// A create that syncs the whole tree may take a while on a slow link.
const API_LIMIT: Duration = Duration::from_secs(180);
/// How long an edit may take to show up before the bench gives up.
const EDIT_LIMIT: Duration = Duration::from_secs(10);
/// The tree: files per leaf directory, leaf directories per package directory.
const FILES_PER_DIR: usize = 10;
const DIRS_PER_PACKAGE: usize = 10;
/// File sizes are lognormal with this sigma: median ≈ 0.45 × mean, like the
/// anchors' tree (median ~1.8 KB at a 4 KiB mean).
const SIZE_SIGMA: f64 = 1.28;
/// Edits go to files at least this large, so that every edit changes the content.
const MIN_EDITED_SIZE: u64 = 32;
/// An h2 PING frame (9-byte header + 8 bytes of payload).
const PING_FRAME: u64 = 17;
/// The proxy's default `--keepalive` and the agent's ping interval.
const KEEPALIVE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    Memory,
    Initial,
    Resync,
    Propagation,
    Idle,
}

impl Section {
    const ALL: [Section; 5] =
        [Section::Memory, Section::Initial, Section::Resync, Section::Propagation, Section::Idle];

    fn parse(name: &str) -> Result<Section> {
        match name {
            "memory" => Ok(Section::Memory),
            "initial" => Ok(Section::Initial),
            "resync" => Ok(Section::Resync),
            "propagation" => Ok(Section::Propagation),
            "idle" => Ok(Section::Idle),
            other => Err(format!(
                "unknown section {other:?}; the sections are memory, initial, resync, propagation, idle"
            )
            .into()),
        }
    }
}

struct Config {
    binary: PathBuf,
    /// Where the trees, the copies and everything else go (a fresh subdirectory).
    dir: PathBuf,
    engine: PathBuf,
    image: String,
    sections: Vec<Section>,
    /// Round trip the delay relays add.
    rtt: Duration,
    /// The generated tree.
    files: usize,
    mib: u64,
    seed: u64,
    /// Initial sync: measured and discarded rounds (one run of each variant per round).
    rounds: usize,
    warmup_rounds: usize,
    /// Re-sync: measured rounds (plus one discarded).
    resync_rounds: usize,
    /// Propagation: measured edits per link (plus five discarded).
    edits: usize,
    /// Idle: the window.
    idle: Duration,
    timeout: Duration,
    strict: bool,
}

impl Config {
    fn from_env(args: &[String]) -> Result<Config> {
        let binary = match std::env::var("OFFLOAD_SYNC_BENCH_BINARY") {
            Ok(path) if !path.is_empty() => PathBuf::from(path),
            _ => PathBuf::from(env!("CARGO_BIN_EXE_offload")),
        };
        let dir = match std::env::var("OFFLOAD_SYNC_BENCH_DIR") {
            Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
            // tmpfs: both sides then pay the same small cost per file created, instead
            // of a shared disk's (slow, and noisy) one. OFFLOAD_SYNC_BENCH_DIR=/tmp
            // measures with the disk.
            _ if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            _ => std::env::temp_dir(),
        };
        let config = Config {
            binary,
            dir,
            engine: PathBuf::from(env_or("OFFLOAD_SYNC_BENCH_ENGINE", "/var/run/docker.sock".to_string())?),
            image: env_or("OFFLOAD_SYNC_BENCH_IMAGE", DEFAULT_IMAGE.to_string())?,
            sections: sections(args, "OFFLOAD_SYNC_BENCH_ONLY", &Section::ALL, Section::parse)?,
            rtt: Duration::from_millis(env_or("OFFLOAD_SYNC_BENCH_RTT_MS", 20)?),
            files: env_or("OFFLOAD_SYNC_BENCH_FILES", 10_000)?,
            mib: env_or("OFFLOAD_SYNC_BENCH_MIB", 40)?,
            seed: env_or("OFFLOAD_SYNC_BENCH_SEED", 0x05ee_d0ff_10ad)?,
            rounds: env_or("OFFLOAD_SYNC_BENCH_ROUNDS", 5)?,
            warmup_rounds: env_or("OFFLOAD_SYNC_BENCH_WARMUP_ROUNDS", 1)?,
            resync_rounds: env_or("OFFLOAD_SYNC_BENCH_RESYNC_ROUNDS", 6)?,
            edits: env_or("OFFLOAD_SYNC_BENCH_EDITS", 100)?,
            idle: Duration::from_secs(env_or("OFFLOAD_SYNC_BENCH_IDLE_S", 10)?),
            timeout: Duration::from_secs(env_or("OFFLOAD_SYNC_BENCH_TIMEOUT_S", 600)?),
            strict: env_or("OFFLOAD_SYNC_BENCH_STRICT", 0u8)? != 0,
        };
        let positive = [
            ("OFFLOAD_SYNC_BENCH_RTT_MS", config.rtt.as_millis() as u64),
            ("OFFLOAD_SYNC_BENCH_FILES", config.files as u64 / 100),
            ("OFFLOAD_SYNC_BENCH_MIB", config.mib),
            ("OFFLOAD_SYNC_BENCH_ROUNDS", config.rounds as u64),
            ("OFFLOAD_SYNC_BENCH_RESYNC_ROUNDS", config.resync_rounds as u64),
            ("OFFLOAD_SYNC_BENCH_EDITS", config.edits as u64),
            ("OFFLOAD_SYNC_BENCH_IDLE_S", config.idle.as_secs()),
        ];
        for (name, value) in positive {
            if value == 0 {
                let least = if name == "OFFLOAD_SYNC_BENCH_FILES" { "100" } else { "1" };
                return Err(format!("{name} must be at least {least}").into());
            }
        }
        Ok(config)
    }

    fn runs(&self, section: Section) -> bool {
        self.sections.contains(&section)
    }

    /// "@0ms" or "@20ms".
    fn at(&self, link: Link) -> String {
        match link {
            Link::Lo => "@0ms".to_string(),
            Link::Wan => format!("@{}ms", self.rtt.as_millis()),
        }
    }

    fn tree_bytes(&self) -> u64 {
        self.mib << 20
    }
}

/// The two links every comparison runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Proxy straight to the agent; ssh straight to sshd.
    Lo,
    /// Through a delay relay (RTT from the configuration).
    Wan,
}

impl Link {
    const BOTH: [Link; 2] = [Link::Lo, Link::Wan];

    fn ssh_host(self) -> &'static str {
        match self {
            Link::Lo => SSH_LO,
            Link::Wan => SSH_WAN,
        }
    }

    /// Alternates which link goes first from round to round.
    fn in_order(round: usize) -> [Link; 2] {
        if round % 2 == 0 {
            [Link::Lo, Link::Wan]
        } else {
            [Link::Wan, Link::Lo]
        }
    }

    fn index(self) -> usize {
        match self {
            Link::Lo => 0,
            Link::Wan => 1,
        }
    }
}

// ---------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|arg| arg == "--bench") {
        println!("sync bench: skipped; run it with `cargo bench --bench sync`");
        return ExitCode::SUCCESS;
    }
    let config = match Config::from_env(&args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("sync bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Child processes are spawned from the main thread only (block_on runs there), so
    // their parent-death signal fires only when the bench exits.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sync bench: building a tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut report = Report::new(REPORT_STYLE);
    let outcome = runtime.block_on(run_bounded(
        config.timeout,
        "OFFLOAD_SYNC_BENCH_TIMEOUT_S",
        run(&config, &mut report),
    ));
    report.print(&format!("offload sync bench ({})", config.binary.display()));
    runtime.shutdown_timeout(Duration::from_secs(1));
    report.exit_code(outcome, config.strict, "sync bench")
}

async fn run(config: &Config, report: &mut Report) -> Result<()> {
    report.note(format!("offload binary: {}", config.binary.display()));
    report.note(format!("load average at the start: {}", load_average()));
    describe_engine(&config.engine, report).await?;
    ensure_image(&config.engine, &config.image).await?;
    sweep_leftovers(&config.engine, LABEL, "sync bench").await?;
    sweep_temp_dirs(&config.dir);

    let dir = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .tempdir_in(&config.dir)
        .context(format!("creating a temporary directory in {}", config.dir.display()))?;
    let root = dir.path().to_path_buf();
    report.note(format!("files: under {} ({})", root.display(), filesystem_of(&root)));
    let mut stops = Stops::default();

    let started = Instant::now();
    let tree = generate_tree(&root.join("tree-a"), config.files, config.tree_bytes(), config.seed)?;
    report.note(format!(
        "tree: {} files in {} directories, {:.1} MiB (lognormal sizes, median {} B, largest {} KiB; \
         text from a 512-word seeded vocabulary, seed {:#x}), written in {:.2} s",
        tree.files.len(),
        tree.dirs,
        tree.bytes as f64 / 1048576.0,
        tree.median_size(),
        tree.largest() >> 10,
        config.seed,
        started.elapsed().as_secs_f64()
    ));
    let walk = stat_walk_cost(&tree.root)?;
    report.note(format!(
        "one full stat walk of the tree (readdir + lstat of {} entries, warm cache, this bench): {:.1} ms",
        tree.entries(),
        walk.as_secs_f64() * 1e3
    ));
    let rtt = measure_rtt(config.rtt).await?;
    report.rtt_row(config, &rtt);
    let rtts = [rtt.direct.p50 / 1e6, rtt.relay.p50 / 1e6];

    let mut outcome = Ok(());
    if config.runs(Section::Memory) {
        outcome = memory_phase(config, &root, &tree, report, &mut stops).await;
    }
    let needs_ssh = config.runs(Section::Initial) || config.runs(Section::Resync);
    let ssh = match (&outcome, needs_ssh) {
        (Ok(()), true) => Some(SshRig::start(config, &root).await?),
        _ => None,
    };
    if let (Ok(()), true, Some(ssh)) = (&outcome, config.runs(Section::Initial), &ssh) {
        outcome = initial_phase(config, &root, &tree, ssh, report, &mut stops).await;
    }
    let needs_live = [Section::Resync, Section::Propagation, Section::Idle].iter().any(|s| config.runs(*s));
    if let (Ok(()), true) = (&outcome, needs_live) {
        outcome = live_phases(config, &root, tree, ssh.as_ref(), rtts, walk, report, &mut stops).await;
    }
    drop(ssh);
    outcome?;
    report.single(
        "proxies and agents stop on SIGTERM",
        format!("{} of {} exit 0 within 5 s", stops.clean, stops.clean + stops.failures.len()),
        "all",
        Some(stops.failures.is_empty()),
    );
    for failure in &stops.failures {
        report.note(format!("stop: {failure}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The tree
// ---------------------------------------------------------------------------------

struct TreeInfo {
    root: PathBuf,
    /// Relative paths and sizes of the files, in creation order.
    files: Vec<(String, u64)>,
    dirs: usize,
    bytes: u64,
}

impl TreeInfo {
    /// Manifest entries: files and directories (the root is not one).
    fn entries(&self) -> usize {
        self.files.len() + self.dirs
    }

    fn median_size(&self) -> u64 {
        let mut sizes: Vec<u64> = self.files.iter().map(|(_, size)| *size).collect();
        sizes.sort_unstable();
        sizes.get(sizes.len() / 2).copied().unwrap_or(0)
    }

    fn largest(&self) -> u64 {
        self.files.iter().map(|(_, size)| *size).max().unwrap_or(0)
    }

    /// A random file big enough that an edit always changes its content.
    fn pick(&self, rng: &mut WyRand) -> (String, u64) {
        loop {
            let (path, size) = &self.files[rng.below(self.files.len())];
            if *size >= MIN_EDITED_SIZE {
                return (path.clone(), *size);
            }
        }
    }
}

/// Writes a node_modules-like tree: `pkg-NNN/lib-N/fN.js`, ten files per leaf
/// directory, ten leaves per package; lognormal sizes scaled to `bytes` in total;
/// word text that compresses about as well as source code. The same seed always
/// gives the same names, sizes and bytes.
fn generate_tree(root: &Path, files: usize, bytes: u64, seed: u64) -> Result<TreeInfo> {
    let mut rng = WyRand(seed);
    let words = vocabulary(&mut rng);
    let raw: Vec<f64> = (0..files).map(|_| (SIZE_SIGMA * normal(&mut rng).clamp(-4.0, 4.0)).exp()).collect();
    let scale = bytes as f64 / raw.iter().sum::<f64>();
    std::fs::create_dir_all(root).context(format!("creating {}", root.display()))?;
    let mut tree = TreeInfo { root: root.to_path_buf(), files: Vec::with_capacity(files), dirs: 0, bytes: 0 };
    let mut buffer = Vec::new();
    for (index, weight) in raw.iter().enumerate() {
        let leaf = index / FILES_PER_DIR;
        let (package, lib) = (leaf / DIRS_PER_PACKAGE, leaf % DIRS_PER_PACKAGE);
        let dir = format!("pkg-{package:03}/lib-{lib}");
        if index % FILES_PER_DIR == 0 {
            if lib == 0 {
                tree.dirs += 1;
            }
            tree.dirs += 1;
            std::fs::create_dir_all(root.join(&dir)).context(format!("creating {dir}"))?;
        }
        let size = ((weight * scale).round() as u64).max(1);
        fill_text(&mut rng, &words, size as usize, &mut buffer);
        let path = format!("{dir}/f{}.js", index % FILES_PER_DIR);
        std::fs::write(root.join(&path), &buffer).context(format!("writing {path}"))?;
        tree.files.push((path, size));
        tree.bytes += size;
    }
    Ok(tree)
}

fn vocabulary(rng: &mut WyRand) -> Vec<String> {
    (0..512)
        .map(|_| {
            let len = 2 + rng.below(8);
            (0..len).map(|_| char::from(b'a' + rng.below(26) as u8)).collect()
        })
        .collect()
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut WyRand) -> f64 {
    let u1 = 1.0 - rng.unit();
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// `size` bytes of words, twelve to a line.
fn fill_text(rng: &mut WyRand, words: &[String], size: usize, out: &mut Vec<u8>) {
    out.clear();
    let mut on_line = 0;
    while out.len() < size {
        out.extend_from_slice(words[rng.below(words.len())].as_bytes());
        on_line += 1;
        if on_line == 12 {
            out.push(b'\n');
            on_line = 0;
        } else {
            out.push(b' ');
        }
    }
    out.truncate(size);
}

/// New content for an edited file: the same size, a unique first line.
fn edited_content(rng: &mut WyRand, size: u64, stamp: usize) -> Vec<u8> {
    let words: Vec<String> = (0..64).map(|i| format!("w{i}x{}", rng.below(1000))).collect();
    let mut content = Vec::new();
    fill_text(rng, &words, size as usize, &mut content);
    let head = format!("// edit {stamp}\n");
    let len = head.len().min(content.len());
    content[..len].copy_from_slice(&head.as_bytes()[..len]);
    content
}

/// Entries and file bytes under `root`, by a walk that follows no symlinks.
fn tree_summary(root: &Path) -> io::Result<(usize, u64)> {
    let (mut entries, mut bytes) = (0usize, 0u64);
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for item in std::fs::read_dir(&dir)? {
            let item = item?;
            let meta = item.path().symlink_metadata()?;
            entries += 1;
            if meta.is_dir() {
                pending.push(item.path());
            } else {
                bytes += meta.len();
            }
        }
    }
    Ok((entries, bytes))
}

/// The median of three timed walks: what one full rescan costs at the least.
fn stat_walk_cost(root: &Path) -> Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        tree_summary(root).context("walking the tree")?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(Duration::from_secs_f64(median(times)))
}

/// Checks that `copy` holds exactly the tree: every entry (and nothing else), and,
/// with `content`, every byte.
fn verify_copy(tree: &TreeInfo, copy: &Path, content: bool, what: &str) -> Result<()> {
    let (entries, bytes) = tree_summary(copy).context(format!("{what}: walking {}", copy.display()))?;
    if entries != tree.entries() || bytes != tree.bytes {
        return Err(format!(
            "{what}: the copy has {entries} entries and {bytes} bytes, the tree {} and {}",
            tree.entries(),
            tree.bytes
        )
        .into());
    }
    if content {
        for (path, _) in &tree.files {
            let here = std::fs::read(tree.root.join(path)).context(format!("reading {path}"))?;
            let there =
                std::fs::read(copy.join(path)).context(format!("{what}: reading the copy of {path}"))?;
            if here != there {
                return Err(format!("{what}: the copy of {path} differs").into());
            }
        }
    }
    Ok(())
}

/// The filesystem type of the mount that holds `path`, from /proc/self/mounts.
fn filesystem_of(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point).then(|| (point.len(), kind.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "?".to_string(), |(_, kind)| kind)
}

fn remove_tree(path: &Path) {
    if let Err(err) = std::fs::remove_dir_all(path) {
        if err.kind() != io::ErrorKind::NotFound {
            eprintln!("warning: could not remove {}: {err}", path.display());
        }
    }
}

// ---------------------------------------------------------------------------------
// Processes: an agent and its proxy; the ssh side
// ---------------------------------------------------------------------------------

/// Exit statuses of every proxy and agent the bench stopped.
#[derive(Default)]
struct Stops {
    clean: usize,
    failures: Vec<String>,
}

impl Stops {
    fn stop(&mut self, daemon: &mut Daemon) {
        match daemon.stop() {
            Ok((_, status)) if status.success() => self.clean += 1,
            Ok((took, status)) => {
                self.failures.push(format!("{} exited {status} after {took:?}", daemon.name))
            }
            Err(err) => self.failures.push(format!("{}: {err}", daemon.name)),
        }
    }
}

/// An agent (plain tcp on loopback, its own state directory) and a proxy to it,
/// straight or through a delay relay. Fields drop in declaration order: the proxy
/// stops before the relay and the agent.
struct Pair {
    proxy: Daemon,
    relay: Option<DelayRelay>,
    agent: Daemon,
    socket: PathBuf,
    state_dir: PathBuf,
    agent_port: u16,
}

impl Pair {
    async fn start(config: &Config, root: &Path, name: &str, link: Link) -> Result<Pair> {
        let state_dir = root.join(format!("state-{name}"));
        let mut command = guarded_command(&config.binary);
        command
            .arg("agent")
            .arg("--listen=tcp://127.0.0.1:0")
            .arg("--insecure")
            .arg(format!("--docker=unix://{}", config.engine.display()))
            .arg("--state-dir")
            .arg(&state_dir)
            .env("RUST_LOG", "info");
        let mut agent = Daemon::spawn(&format!("{name}-agent"), command, root)?;
        let line = agent.wait_for_line("offload agent ready").await?;
        let url = line.split("listen=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
        let agent_addr: SocketAddr =
            url.trim_start_matches("tcp://").parse().context(format!("agent address in {line:?}"))?;
        let relay = match link {
            Link::Lo => None,
            Link::Wan => Some(start_relay(agent_addr, config.rtt)?),
        };
        let remote = relay.as_ref().map_or(agent_addr, |relay| relay.addr);
        let socket = root.join(format!("{name}.sock"));
        let mut command = guarded_command(&config.binary);
        command
            .arg("proxy")
            .arg(format!("--listen=unix://{}", socket.display()))
            .arg(format!("--remote=tcp://{remote}"))
            .arg("--insecure")
            .env("RUST_LOG", "info");
        let mut proxy = Daemon::spawn(&format!("{name}-proxy"), command, root)?;
        wait_for_ping(&mut proxy, &socket).await?;
        Ok(Pair { proxy, relay, agent, socket, state_dir, agent_port: agent_addr.port() })
    }

    /// Stops both halves (recording how they went) and removes the agent's state.
    fn finish(mut self, stops: &mut Stops) {
        stops.stop(&mut self.proxy);
        self.relay = None;
        stops.stop(&mut self.agent);
        remove_tree(&self.state_dir);
    }

    /// CPU seconds of both halves so far.
    fn cpu(&self) -> f64 {
        cpu_secs(self.proxy.pid) + cpu_secs(self.agent.pid)
    }

    /// The last `took_ms=` of the proxy's `bind mount synced` lines.
    fn logged_sync_ms(&self) -> Option<f64> {
        let text = self.proxy.log_text();
        let line = text.lines().rev().find(|line| line.contains("bind mount synced"))?;
        line.split("took_ms=").nth(1)?.split_whitespace().next()?.parse().ok()
    }

    /// The tails of both logs, for an error message.
    fn logs(&self) -> String {
        format!(
            "\n{}:\n{}\n{}:\n{}",
            self.proxy.name,
            self.proxy.log_tail(),
            self.agent.name,
            self.agent.log_tail()
        )
    }
}

/// Waits until `/_ping` answers through the proxy: the first request opens the link.
async fn wait_for_ping(proxy: &mut Daemon, socket: &Path) -> Result<()> {
    let deadline = Instant::now() + rig::START_TIMEOUT;
    loop {
        if let Some(status) = proxy.exited()? {
            return Err(format!(
                "{} exited ({status}) before it was ready:\n{}",
                proxy.name,
                proxy.log_tail()
            )
            .into());
        }
        if socket.exists() {
            if let Ok(mut client) = ApiClient::connect(socket).await {
                if client.get("/_ping").await.is_ok() {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not answer /_ping:\n{}", proxy.name, proxy.log_tail()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The private sshd, a delay relay in front of it, and one ControlMaster per link.
/// Fields drop in declaration order: the masters go first.
struct SshRig {
    masters: Vec<Daemon>,
    /// Held: dropping it stops the relay.
    _relay: DelayRelay,
    sshd: Sshd,
    /// ControlPath of each link's master (lo, wan).
    control: [PathBuf; 2],
}

impl SshRig {
    async fn start(config: &Config, root: &Path) -> Result<SshRig> {
        let sshd = Sshd::start(root).await?;
        let relay = start_relay(sshd.addr, config.rtt)?;
        sshd.write_client_config(&[(SSH_LO, sshd.addr.port()), (SSH_WAN, relay.addr.port())], SSH_TUNING)?;
        let control = [sshd.dir.join("cm-lo.sock"), sshd.dir.join("cm-wan.sock")];
        let mut rig = SshRig { masters: Vec::new(), _relay: relay, sshd, control };
        for link in Link::BOTH {
            let path = rig.control[link.index()].clone();
            let mut command = guarded_command(Path::new("/usr/bin/ssh"));
            command
                .arg("-F")
                .arg(&rig.sshd.client_config)
                .args(["-o", "ControlMaster=yes", "-o"])
                .arg(format!("ControlPath={}", path.display()))
                .arg("-N")
                .arg(link.ssh_host());
            let name = format!("ssh-master-{}", link.ssh_host());
            let mut master = Daemon::spawn(&name, command, &rig.sshd.dir)?;
            let deadline = Instant::now() + rig::START_TIMEOUT;
            while !path.exists() {
                if let Some(status) = master.exited()? {
                    return Err(format!("{name} exited ({status}):\n{}", master.log_tail()).into());
                }
                if Instant::now() > deadline {
                    return Err(
                        format!("{name} did not open {}:\n{}", path.display(), master.log_tail()).into()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            rig.masters.push(master);
        }
        Ok(rig)
    }

    /// CPU seconds so far of everything an rsync over ssh runs: the local rsync and
    /// ssh (children of the bench, counted once reaped), sshd with its session
    /// processes and the remote rsync, and the ControlMasters.
    fn cpu(&self) -> f64 {
        let masters: f64 = self.masters.iter().map(|master| tree_cpu_secs(master.pid)).sum();
        reaped_children_cpu() + tree_cpu_secs(self.sshd.daemon.pid) + masters
    }

    /// `rsync -a SRC/ HOST:DEST/` over a fresh ssh, or over the link's ControlMaster.
    async fn rsync(&self, link: Link, master: bool, source: &Path, dest: &Path) -> Result<Duration> {
        let mut ssh = format!("ssh -F {}", self.sshd.client_config.display());
        if master {
            ssh.push_str(&format!(
                " -o ControlMaster=no -o ControlPath={}",
                self.control[link.index()].display()
            ));
        }
        let mut from = OsString::from(source);
        from.push("/");
        let mut to = OsString::from(format!("{}:", link.ssh_host()));
        to.push(dest);
        to.push("/");
        let started = Instant::now();
        let output = tokio::process::Command::new("rsync")
            .arg("-a")
            .arg("-e")
            .arg(&ssh)
            .arg(&from)
            .arg(&to)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("running rsync (install rsync)")?;
        let elapsed = started.elapsed();
        if !output.status.success() {
            return Err(format!(
                "rsync to {} failed ({}): {}\nsshd: {}",
                link.ssh_host(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                self.sshd.log_tail()
            )
            .into());
        }
        Ok(elapsed)
    }
}

// ---------------------------------------------------------------------------------
// Containers through a proxy
// ---------------------------------------------------------------------------------

/// Creates a container through `socket` (a proxy), optionally binding `bind` at
/// `/w`; returns its guard (which removes it on the engine itself) and how long the
/// create took.
async fn create_via(
    config: &Config,
    socket: &Path,
    cmd: &[&str],
    bind: Option<&Path>,
) -> Result<(Container, Duration)> {
    let mut spec = json!({
        "Image": config.image,
        "Cmd": cmd,
        "Labels": { LABEL: std::process::id().to_string() },
    });
    if let Some(bind) = bind {
        spec["HostConfig"] = json!({ "Binds": [format!("{}:{MOUNT_TARGET}", bind.display())] });
    }
    let started = Instant::now();
    let created = within(
        API_LIMIT,
        "container create",
        api_expect(socket, Method::POST, "/containers/create", Some(spec), StatusCode::CREATED),
    )
    .await?;
    let elapsed = started.elapsed();
    let id = created["Id"].as_str().ok_or("container create: no Id in the answer")?;
    Ok((Container { engine: config.engine.clone(), id: id.to_string() }, elapsed))
}

/// The directory the engine binds at `/w`: the agent's copy.
async fn bound_source(config: &Config, id: &str) -> Result<PathBuf> {
    let path = format!("/containers/{id}/json");
    let inspect = api_expect(&config.engine, Method::GET, &path, None, StatusCode::OK).await?;
    inspect["Mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|mount| mount["Destination"] == MOUNT_TARGET)
        .and_then(|mount| mount["Source"].as_str())
        .map(PathBuf::from)
        .ok_or_else(|| format!("container {id} has no bind at {MOUNT_TARGET}").into())
}

/// `POST /containers/{id}/exec` through the proxy (not started): the proxy flushes
/// pending local edits to the agent before it forwards the request.
async fn exec_barrier(socket: &Path, id: &str) -> Result<Duration> {
    let path = format!("/containers/{id}/exec");
    let started = Instant::now();
    within(
        API_LIMIT,
        "exec create",
        api_expect(socket, Method::POST, &path, Some(json!({ "Cmd": ["true"] })), StatusCode::CREATED),
    )
    .await?;
    Ok(started.elapsed())
}

async fn flush_dirty_pages() -> Result<()> {
    let status = tokio::process::Command::new("sync").status().await.context("running sync")?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("sync failed: {status}").into())
    }
}

// ---------------------------------------------------------------------------------
// Phase: memory
// ---------------------------------------------------------------------------------

/// RSS of both halves after syncing three trees: the main one, one with a tenth of
/// the entries (and bytes), and one with all the entries but a tenth of the bytes.
async fn memory_phase(
    config: &Config,
    root: &Path,
    tree: &TreeInfo,
    report: &mut Report,
    stops: &mut Stops,
) -> Result<()> {
    println!("memory: syncing trees of {} and {} entries", tree.entries() / 10, tree.entries());
    let small =
        generate_tree(&root.join("tree-small"), config.files / 10, config.tree_bytes() / 10, config.seed)?;
    let thin = generate_tree(&root.join("tree-thin"), config.files, config.tree_bytes() / 10, config.seed)?;
    let mut grown = Vec::new();
    for (name, measured) in [("small", &small), ("thin", &thin), ("main", tree)] {
        let pair = Pair::start(config, root, &format!("memory-{name}"), Link::Lo).await?;
        let result = memory_of(config, &pair, measured).await;
        let logs = pair.logs();
        pair.finish(stops);
        let growth = result.map_err(|err| format!("memory ({name} tree): {err}{logs}"))?;
        println!(
            "    {name} tree ({} entries, {:.1} MiB): proxy +{:.0} KiB (peak +{:.0}), agent +{:.0} KiB (peak +{:.0})",
            measured.entries(),
            measured.bytes as f64 / 1048576.0,
            growth.rss[0],
            growth.peak[0],
            growth.rss[1],
            growth.peak[1]
        );
        grown.push(growth);
    }
    remove_tree(&small.root);
    remove_tree(&thin.root);
    let [small_growth, thin_growth, main_growth] = [&grown[0], &grown[1], &grown[2]];
    // Per entry: the thin and the small tree hold the same bytes.
    let extra_entries = (thin.entries() - small.entries()) as f64;
    for (side, index) in [("proxy", 0), ("agent", 1)] {
        let per_entry = (thin_growth.rss[index] - small_growth.rss[index]) * 1024.0 / extra_entries;
        report.row(Row {
            metric: format!(
                "memory: {side} RSS per manifest entry ({} vs {} entries, same {:.0} MiB)",
                thin.entries(),
                small.entries(),
                thin.bytes as f64 / 1048576.0
            ),
            figure: format!("{per_entry:.0} B"),
            baseline: format!(
                "+{:.1} / +{:.1} MiB",
                thin_growth.rss[index] / 1024.0,
                small_growth.rss[index] / 1024.0
            ),
            ratio: "-".to_string(),
            target: "<= 1024 B".to_string(),
            ok: Some(per_entry <= 1024.0),
        });
    }
    // Same entries, ten times the bytes: memory bounded by the manifest (and by
    // fixed buffers) grows alike; holding the tree, or even its compressed stream,
    // would not.
    let allowance_kib = (tree.bytes - thin.bytes) as f64 / 1024.0 * 0.2;
    for (side, index) in [("proxy", 0), ("agent", 1)] {
        for (what, figure, baseline) in [
            ("RSS", main_growth.rss[index], thin_growth.rss[index]),
            ("peak RSS (VmHWM)", main_growth.peak[index], thin_growth.peak[index]),
        ] {
            let difference = figure - baseline;
            report.row(Row {
                metric: format!(
                    "memory: {side} {what} growth, {:.0} MiB vs {:.0} MiB of content ({} entries each)",
                    tree.bytes as f64 / 1048576.0,
                    thin.bytes as f64 / 1048576.0,
                    tree.entries()
                ),
                figure: format!("+{:.1} MiB", figure / 1024.0),
                baseline: format!("+{:.1} MiB", baseline / 1024.0),
                ratio: format!("{:+.1} MiB", difference / 1024.0),
                target: format!("<= {:+.1} MiB (20% of the extra bytes)", allowance_kib / 1024.0),
                ok: Some(difference <= allowance_kib),
            });
        }
    }
    Ok(())
}

/// KiB each side grew by: [proxy, agent].
struct Growth {
    rss: [f64; 2],
    peak: [f64; 2],
}

async fn memory_of(config: &Config, pair: &Pair, tree: &TreeInfo) -> Result<Growth> {
    // Open the session and the engine path first, so that only the mount counts.
    let (_plain, _) = create_via(config, &pair.socket, &["true"], None).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids = [pair.proxy.pid, pair.agent.pid];
    let before = pids.map(|pid| status_kib(pid, "VmRSS"));
    let peak_before = pids.map(|pid| status_kib(pid, "VmHWM"));
    let (bound, _) = create_via(config, &pair.socket, &["true"], Some(&tree.root)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let copy = bound_source(config, &bound.id).await?;
    verify_copy(tree, &copy, false, "memory")?;
    let after = pids.map(|pid| status_kib(pid, "VmRSS"));
    let peak_after = pids.map(|pid| status_kib(pid, "VmHWM"));
    Ok(Growth {
        rss: [after[0] - before[0], after[1] - before[1]],
        peak: [peak_after[0] - peak_before[0], peak_after[1] - peak_before[1]],
    })
}

/// A `kB` field of /proc/PID/status.
fn status_kib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with(field) && line[field.len()..].starts_with(':'))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------
// Phase: initial sync
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum InitialVariant {
    Offload(Link),
    Rsync(Link),
    RsyncMaster(Link),
    /// `tar c | tar x` on this machine: the floor for writing the tree.
    TarPipe,
}

impl InitialVariant {
    const ALL: [InitialVariant; 7] = [
        InitialVariant::Offload(Link::Lo),
        InitialVariant::Rsync(Link::Lo),
        InitialVariant::RsyncMaster(Link::Lo),
        InitialVariant::TarPipe,
        InitialVariant::Offload(Link::Wan),
        InitialVariant::Rsync(Link::Wan),
        InitialVariant::RsyncMaster(Link::Wan),
    ];

    fn name(self, config: &Config) -> String {
        match self {
            InitialVariant::Offload(link) => format!("offload{}", config.at(link)),
            InitialVariant::Rsync(link) => format!("rsync{}", config.at(link)),
            InitialVariant::RsyncMaster(link) => format!("rsync+cm{}", config.at(link)),
            InitialVariant::TarPipe => "tar-pipe".to_string(),
        }
    }

    /// Where its figures go in a round's results.
    fn slot(self) -> usize {
        match self {
            InitialVariant::Offload(link) => link.index(),
            InitialVariant::Rsync(link) => 2 + link.index(),
            InitialVariant::RsyncMaster(link) => 4 + link.index(),
            InitialVariant::TarPipe => 6,
        }
    }
}

/// Seconds and CPU seconds of one run.
#[derive(Clone, Copy, Default)]
struct Run {
    secs: f64,
    cpu: f64,
}

async fn initial_phase(
    config: &Config,
    root: &Path,
    tree: &TreeInfo,
    ssh: &SshRig,
    report: &mut Report,
    stops: &mut Stops,
) -> Result<()> {
    println!(
        "initial sync: {} rounds (+{} warm-up) of {} variants, each to a fresh directory",
        config.rounds,
        config.warmup_rounds,
        InitialVariant::ALL.len()
    );
    let [mut vs_rsync, mut vs_master, mut cpu_vs_rsync] =
        [(); 3].map(|()| [Paired::default(), Paired::default()]);
    let mut vs_floor = Paired::default();
    let mut logged = [Vec::new(), Vec::new()];
    let total = config.warmup_rounds + config.rounds;
    for round in 0..total {
        let warmup = round < config.warmup_rounds;
        let mut runs = [Run::default(); 7];
        let mut shown = Vec::new();
        for step in 0..InitialVariant::ALL.len() {
            let variant = InitialVariant::ALL[(step + round) % InitialVariant::ALL.len()];
            let name = variant.name(config);
            flush_dirty_pages().await?;
            let dir_name = format!("initial-{round}-{}", name.replace('@', "-"));
            let run = match variant {
                InitialVariant::Offload(link) => {
                    let pair = Pair::start(config, root, &dir_name, link).await?;
                    let result = offload_initial(config, &pair, tree, warmup).await;
                    let logs = pair.logs();
                    if let (Some(ms), false) = (pair.logged_sync_ms(), warmup) {
                        logged[link.index()].push(ms);
                    }
                    pair.finish(stops);
                    result.map_err(|err| format!("{name}: {err}{logs}"))?
                }
                InitialVariant::Rsync(link) | InitialVariant::RsyncMaster(link) => {
                    let master = matches!(variant, InitialVariant::RsyncMaster(_));
                    let dest = root.join(&dir_name);
                    let cpu = ssh.cpu();
                    let took = ssh.rsync(link, master, &tree.root, &dest).await?;
                    let run = Run { secs: took.as_secs_f64(), cpu: ssh.cpu() - cpu };
                    verify_copy(tree, &dest, warmup, &name)?;
                    remove_tree(&dest);
                    run
                }
                InitialVariant::TarPipe => {
                    let dest = root.join(&dir_name);
                    let run = tar_pipe(&tree.root, &dest).await?;
                    verify_copy(tree, &dest, warmup, &name)?;
                    remove_tree(&dest);
                    run
                }
            };
            runs[variant.slot()] = run;
            shown.push(format!("{name} {:.3}", run.secs));
        }
        let tag = if warmup { " (warm-up)" } else { "" };
        println!("    initial round {round}{tag} (s): {}", shown.join(", "));
        if !warmup {
            for link in Link::BOTH {
                let i = link.index();
                vs_rsync[i].push(runs[2 + i].secs, runs[i].secs);
                vs_master[i].push(runs[4 + i].secs, runs[i].secs);
                cpu_vs_rsync[i].push(runs[2 + i].cpu, runs[i].cpu);
            }
            vs_floor.push(runs[6].secs, runs[0].secs);
        }
    }
    let secs = |s: f64| format!("{s:.3} s");
    for link in Link::BOTH {
        report.paired(
            &format!(
                "initial sync {}: offload (create with bind - without) vs rsync -a over ssh",
                config.at(link)
            ),
            &vs_rsync[link.index()],
            secs,
            Target::AtMost(0.5),
        );
    }
    for link in Link::BOTH {
        report.paired(
            &format!("initial sync {}: offload vs rsync -a over an open ssh ControlMaster", config.at(link)),
            &vs_master[link.index()],
            secs,
            Target::Info("info (G10: <= 0.80)"),
        );
    }
    report.paired(
        "initial sync @0ms: offload vs the local floor, tar c | tar x (no network)",
        &vs_floor,
        secs,
        Target::Info("info"),
    );
    for link in Link::BOTH {
        report.paired(
            &format!(
                "initial sync {} CPU: offload (proxy + agent) vs rsync (both ends, ssh, sshd)",
                config.at(link)
            ),
            &cpu_vs_rsync[link.index()],
            |s| format!("{s:.2} CPU-s"),
            Target::Info("info"),
        );
    }
    report.single(
        "initial sync: the proxy's own `bind mount synced took_ms`, @0ms / @RTT",
        format!("{:.0} / {:.0} ms", median(logged[0].clone()), median(logged[1].clone())),
        "info",
        None,
    );
    Ok(())
}

/// `tar c` piped into `tar x` into a fresh directory: seconds and CPU.
async fn tar_pipe(source: &Path, dest: &Path) -> Result<Run> {
    std::fs::create_dir_all(dest).context(format!("creating {}", dest.display()))?;
    let cpu = reaped_children_cpu();
    let started = Instant::now();
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("tar cf - -C \"$1\" . | tar xf - -C \"$2\"")
        .arg("tar-pipe")
        .arg(source)
        .arg(dest)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .context("running tar")?;
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("tar c | tar x failed: {status}").into());
    }
    Ok(Run { secs, cpu: reaped_children_cpu() - cpu })
}

/// One initial sync through a fresh pair: the create with the bind minus the same
/// create without it (which also opened the session). The copy must be complete
/// when the create answers.
async fn offload_initial(config: &Config, pair: &Pair, tree: &TreeInfo, full_check: bool) -> Result<Run> {
    let (_plain, plain) = create_via(config, &pair.socket, &["true"], None).await?;
    let cpu = pair.cpu();
    let (bound, with_bind) = create_via(config, &pair.socket, &["true"], Some(&tree.root)).await?;
    let cpu = pair.cpu() - cpu;
    let copy = bound_source(config, &bound.id).await?;
    verify_copy(tree, &copy, full_check, "offload's copy right after the create")?;
    Ok(Run { secs: with_bind.saturating_sub(plain).as_secs_f64(), cpu })
}

// ---------------------------------------------------------------------------------
// The live rig: a long-lived pair per link with a running container
// ---------------------------------------------------------------------------------

/// A pair whose container runs with the tree bound, the copy's path, and (for the
/// re-sync baseline) an rsync destination. Fields drop in declaration order: the
/// container is removed before its pair stops.
struct Live {
    container: Container,
    pair: Pair,
    tree: TreeInfo,
    copy: PathBuf,
    rsync_dest: PathBuf,
}

impl Live {
    async fn start(config: &Config, root: &Path, tree: TreeInfo, link: Link) -> Result<Live> {
        let pair =
            Pair::start(config, root, &format!("live-{}", config.at(link).trim_start_matches('@')), link)
                .await?;
        let (container, _) = create_via(config, &pair.socket, &["sleep", "3600"], Some(&tree.root)).await?;
        let start = format!("/containers/{}/start", container.id);
        within(
            API_LIMIT,
            "container start",
            api_expect(&pair.socket, Method::POST, &start, None, StatusCode::NO_CONTENT),
        )
        .await?;
        let copy = bound_source(config, &container.id).await?;
        verify_copy(&tree, &copy, false, "the live copy")?;
        let rsync_dest = root.join(format!("rsync-live-{}", link.index()));
        Ok(Live { container, pair, tree, copy, rsync_dest })
    }
}

#[allow(clippy::too_many_arguments)]
async fn live_phases(
    config: &Config,
    root: &Path,
    tree: TreeInfo,
    ssh: Option<&SshRig>,
    rtts: [f64; 2],
    walk: Duration,
    report: &mut Report,
    stops: &mut Stops,
) -> Result<()> {
    // Each link gets its own tree, so one link's edits never wake the other's sync.
    let second = generate_tree(&root.join("tree-b"), config.files, config.tree_bytes(), config.seed)?;
    let mut lives = Vec::new();
    for (link, tree) in Link::BOTH.into_iter().zip([tree, second]) {
        lives.push(Live::start(config, root, tree, link).await?);
    }
    let mut rng = WyRand(config.seed ^ 0xed17);
    let mut outcome = Ok(());
    if config.runs(Section::Resync) {
        if let Some(ssh) = ssh {
            outcome = resync_phase(config, &lives, ssh, &mut rng, report).await;
        }
    }
    if let (Ok(()), true) = (&outcome, config.runs(Section::Propagation)) {
        outcome = propagation_phase(config, &lives, rtts, walk, &mut rng, report).await;
    }
    if let (Ok(()), true) = (&outcome, config.runs(Section::Idle)) {
        outcome = idle_phase(config, &lives, walk, report).await;
    }
    if let Err(err) = outcome {
        let logs: String = lives.iter().map(|live| live.pair.logs()).collect();
        return Err(format!("{err}{logs}").into());
    }
    for live in lives {
        let Live { container, pair, rsync_dest, .. } = live;
        drop(container);
        pair.finish(stops);
        remove_tree(&rsync_dest);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Phase: re-sync of one changed file
// ---------------------------------------------------------------------------------

async fn resync_phase(
    config: &Config,
    lives: &[Live],
    ssh: &SshRig,
    rng: &mut WyRand,
    report: &mut Report,
) -> Result<()> {
    println!("re-sync: {} rounds (+1 warm-up) of one changed file", config.resync_rounds);
    for (live, link) in lives.iter().zip(Link::BOTH) {
        ssh.rsync(link, false, &live.tree.root, &live.rsync_dest).await?;
    }
    let mut vs_rsync = [Paired::default(), Paired::default()];
    let mut vs_master = [Paired::default(), Paired::default()];
    let mut unchanged = [Vec::new(), Vec::new()];
    let mut stamp = 0;
    for round in 0..=config.resync_rounds {
        let mut shown = Vec::new();
        for link in Link::in_order(round) {
            let live = &lives[link.index()];
            let at = config.at(link);
            // Offload: the edit, then the barrier a `docker exec` starts with.
            let (path, size) = live.tree.pick(rng);
            stamp += 1;
            let content = edited_content(rng, size, stamp);
            let started = Instant::now();
            std::fs::write(live.tree.root.join(&path), &content).context(format!("editing {path}"))?;
            exec_barrier(&live.pair.socket, &live.container.id).await?;
            let offload = started.elapsed().as_secs_f64();
            let copied = std::fs::read(live.copy.join(&path)).unwrap_or_default();
            if copied != content {
                return Err(format!(
                    "re-sync {at}: the exec barrier answered before the edit of {path} was in the agent's copy"
                )
                .into());
            }
            let idle_barrier = exec_barrier(&live.pair.socket, &live.container.id).await?.as_secs_f64();
            // rsync re-runs: the same edit over a fresh ssh, then one more over the master.
            let rsync = ssh.rsync(link, false, &live.tree.root, &live.rsync_dest).await?.as_secs_f64();
            let (path, size) = live.tree.pick(rng);
            stamp += 1;
            let content = edited_content(rng, size, stamp);
            std::fs::write(live.tree.root.join(&path), &content).context(format!("editing {path}"))?;
            // Offload syncs that edit by itself meanwhile; let it finish first.
            tokio::time::sleep(Duration::from_millis(150)).await;
            let master = ssh.rsync(link, true, &live.tree.root, &live.rsync_dest).await?.as_secs_f64();
            let synced = std::fs::read(live.rsync_dest.join(&path)).unwrap_or_default();
            if synced != content {
                return Err(format!("re-sync {at}: rsync did not bring the edit of {path}").into());
            }
            shown.push(format!(
                "offload{at} {:.1} ms (no change {:.1}), rsync{at} {:.0} ms, rsync+cm{at} {:.0} ms",
                offload * 1e3,
                idle_barrier * 1e3,
                rsync * 1e3,
                master * 1e3
            ));
            if round > 0 {
                vs_rsync[link.index()].push(rsync, offload);
                vs_master[link.index()].push(master, offload);
                unchanged[link.index()].push(idle_barrier);
            }
        }
        let tag = if round == 0 { " (warm-up)" } else { "" };
        println!("    re-sync round {round}{tag}: {}", shown.join("; "));
    }
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    for link in Link::BOTH {
        report.paired(
            &format!(
                "re-sync of 1 changed file {}: offload (edit -> exec create answered) vs rsync -a re-run",
                config.at(link)
            ),
            &vs_rsync[link.index()],
            ms,
            Target::AtMost(0.1),
        );
    }
    for link in Link::BOTH {
        report.paired(
            &format!(
                "re-sync of 1 changed file {}: offload vs rsync re-run over a ControlMaster",
                config.at(link)
            ),
            &vs_master[link.index()],
            ms,
            Target::Info("info"),
        );
    }
    report.single(
        "re-sync: the same exec create with nothing changed, @0ms / @RTT",
        format!("{:.1} / {:.1} ms", median(unchanged[0].clone()) * 1e3, median(unchanged[1].clone()) * 1e3),
        "info",
        None,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// Phase: change propagation
// ---------------------------------------------------------------------------------

/// Watches one directory of an agent's copy at a time (inotify), so that an edit's
/// arrival is seen the moment the agent writes it, without polling.
struct CopyWatch {
    fd: AsyncFd<Inotify>,
    buffer: Vec<u8>,
}

impl CopyWatch {
    fn new() -> Result<CopyWatch> {
        let inotify = Inotify::init().context("inotify_init")?;
        // As in src/sync/watch.rs: the `Inotify` owns its fd, and AsyncFd deregisters
        // it before dropping it.
        #[allow(deprecated)]
        let fd = AsyncFd::new(inotify).context("registering the inotify fd")?;
        Ok(CopyWatch { fd, buffer: vec![0; 64 << 10] })
    }

    fn watch(&mut self, dir: &Path) -> Result<WatchDescriptor> {
        let mask = WatchMask::MODIFY
            | WatchMask::CLOSE_WRITE
            | WatchMask::ATTRIB
            | WatchMask::CREATE
            | WatchMask::MOVED_TO;
        self.fd.get_mut().watches().add(dir, mask).context(format!("watching {}", dir.display()))
    }

    fn unwatch(&mut self, wd: WatchDescriptor) {
        let _ = self.fd.get_mut().watches().remove(wd);
    }

    /// Discards whatever is queued (late events of the previous edit).
    fn discard(&mut self) {
        while let Ok(events) = self.fd.get_mut().read_events(&mut self.buffer) {
            if events.count() == 0 {
                break;
            }
        }
    }

    /// Waits until at least one event arrives.
    async fn next(&mut self) -> Result<()> {
        loop {
            let buffer = &mut self.buffer;
            let mut guard = self.fd.readable_mut().await.context("waiting for inotify")?;
            match guard.try_io(|fd| fd.get_mut().read_events(buffer).map(|events| events.count())) {
                Ok(Ok(count)) if count > 0 => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(err)) if err.kind() == io::ErrorKind::WouldBlock => {}
                Ok(Err(err)) => return Err(format!("reading inotify events: {err}").into()),
                Err(_would_block) => {}
            }
        }
    }
}

/// Writes one edit locally and returns how long until the agent's copy holds it.
async fn propagate_one(watch: &mut CopyWatch, live: &Live, path: &str, content: &[u8]) -> Result<Duration> {
    let copy = live.copy.join(path);
    let dir = copy.parent().ok_or("an edited file has no parent")?.to_path_buf();
    let wd = watch.watch(&dir)?;
    watch.discard();
    let started = Instant::now();
    std::fs::write(live.tree.root.join(path), content).context(format!("editing {path}"))?;
    let deadline = started + EDIT_LIMIT;
    let outcome = loop {
        if std::fs::read(&copy).is_ok_and(|there| there == content) {
            break Ok(started.elapsed());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.next()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => break Err(err),
            Err(_) => {
                break Err(
                    format!("the edit of {path} did not reach the agent's copy within {EDIT_LIMIT:?}").into()
                )
            }
        }
    };
    watch.unwatch(wd);
    outcome
}

async fn propagation_phase(
    config: &Config,
    lives: &[Live],
    rtts: [f64; 2],
    walk: Duration,
    rng: &mut WyRand,
    report: &mut Report,
) -> Result<()> {
    const WARMUP_EDITS: usize = 5;
    println!("propagation: {} edits (+{WARMUP_EDITS} warm-up) per link, 20-60 ms apart", config.edits);
    let mut watches = [CopyWatch::new()?, CopyWatch::new()?];
    let mut samples: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut edited_bytes = [0u64; 2];
    let mut before = [Counters::default(), Counters::default()];
    let mut last = [(String::new(), Vec::new()), (String::new(), Vec::new())];
    for index in 0..WARMUP_EDITS + config.edits {
        if index == WARMUP_EDITS {
            // Settle, then count only the measured edits.
            tokio::time::sleep(Duration::from_millis(200)).await;
            for link in Link::BOTH {
                before[link.index()] = Counters::read(&lives[link.index()].pair);
            }
        }
        for link in Link::in_order(index) {
            let live = &lives[link.index()];
            let (path, size) = live.tree.pick(rng);
            let content = edited_content(rng, size, 1_000_000 + index);
            let took = propagate_one(&mut watches[link.index()], live, &path, &content)
                .await
                .map_err(|err| format!("propagation {}: {err}", config.at(link)))?;
            if index >= WARMUP_EDITS {
                samples[link.index()].push(took.as_nanos() as u64);
                edited_bytes[link.index()] += size;
            }
            last[link.index()] = (path, content);
            let gap = 20 + rng.below(41) as u64;
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
    }
    // Let the last pushes' echoes settle before the counters are read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = [Counters::read(&lives[0].pair), Counters::read(&lives[1].pair)];
    // The container itself, asked on the engine directly (no proxy barrier), sees
    // the last edit: the copy is what it has at /w.
    for link in Link::BOTH {
        let live = &lives[link.index()];
        let (path, content) = &last[link.index()];
        let seen = engine_exec_cat(config, &live.container.id, &format!("{MOUNT_TARGET}/{path}")).await?;
        if seen != *content {
            return Err(format!(
                "propagation {}: the container does not see the last edit of {path}",
                config.at(link)
            )
            .into());
        }
    }
    let edits = config.edits as f64;
    for link in Link::BOTH {
        let i = link.index();
        let at = config.at(link);
        let figures = Percentiles::of(samples[i].clone());
        let rtt = rtts[i];
        let p50 = figures.p50 / 1e6;
        report.row(Row {
            metric: format!("change propagation {at}: edit -> new content in the container's /w, p50 vs RTT"),
            figure: format!("{p50:.1} ms"),
            baseline: format!("RTT {rtt:.2} ms"),
            ratio: format!("RTT {:+.1} ms", p50 - rtt),
            target: format!("<= RTT + 30 ms ({:.1})", rtt + 30.0),
            ok: Some(p50 <= rtt + 30.0),
        });
        report.row(Row {
            metric: format!("change propagation {at}: p95 / p99 / max"),
            figure: format!(
                "{:.1} / {:.1} / {:.1} ms",
                figures.p95 / 1e6,
                figures.p99 / 1e6,
                figures.max / 1e6
            ),
            baseline: format!("RTT {rtt:.2} ms"),
            ratio: format!("p99 RTT {:+.1} ms", figures.p99 / 1e6 - rtt),
            target: "info (G11: p99 <= RTT + 100 ms)".to_string(),
            ok: None,
        });
    }
    for link in Link::BOTH {
        let i = link.index();
        let delta = after[i].since(&before[i]);
        let link_bytes = (delta.to_agent + delta.from_agent) as f64 / edits;
        report.row(Row {
            metric: format!(
                "propagation {}: bytes over the link per edit vs the edited file's size",
                config.at(link)
            ),
            figure: format!(
                "{link_bytes:.0} B ({:.0} to the agent, {:.0} back)",
                delta.to_agent as f64 / edits,
                delta.from_agent as f64 / edits
            ),
            baseline: format!("{:.0} B", edited_bytes[i] as f64 / edits),
            ratio: format!("{:.2}", link_bytes / (edited_bytes[i] as f64 / edits)),
            target: "info".to_string(),
            ok: None,
        });
        let walk_ms = walk.as_secs_f64() * 1e3;
        let per_edit = [delta.proxy_cpu * 1e3 / edits, delta.agent_cpu * 1e3 / edits];
        let worst = per_edit[0].max(per_edit[1]) / walk_ms;
        report.row(Row {
            metric: format!(
                "propagation {}: CPU per edit, proxy / agent, vs one stat walk of the tree (a rescan costs more)",
                config.at(link)
            ),
            figure: format!("{:.2} / {:.2} ms", per_edit[0], per_edit[1]),
            baseline: format!("{walk_ms:.1} ms"),
            ratio: format!("{:.3} / {:.3}", per_edit[0] / walk_ms, per_edit[1] / walk_ms),
            target: "<= 0.50 each".to_string(),
            ok: Some(worst <= 0.5),
        });
    }
    Ok(())
}

/// `docker exec ID cat PATH` on the engine itself (not through the proxy).
async fn engine_exec_cat(config: &Config, id: &str, path: &str) -> Result<Vec<u8>> {
    let output = tokio::process::Command::new(DOCKER_CLI)
        .arg("-H")
        .arg(format!("unix://{}", config.engine.display()))
        .args(["exec", id, "cat", path])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context(format!("running {DOCKER_CLI} exec"))?;
    if !output.status.success() {
        return Err(
            format!("docker exec cat {path}: {}", String::from_utf8_lossy(&output.stderr).trim()).into()
        );
    }
    Ok(output.stdout)
}

// ---------------------------------------------------------------------------------
// Phase: idle
// ---------------------------------------------------------------------------------

/// What a pair did so far: bytes over its link (at the agent's sockets) and CPU
/// and context switches of both halves.
#[derive(Default, Clone, Copy)]
struct Counters {
    to_agent: u64,
    from_agent: u64,
    proxy_cpu: f64,
    agent_cpu: f64,
    switches: u64,
}

impl Counters {
    fn read(pair: &Pair) -> Counters {
        let (to_agent, from_agent) = link_bytes(pair.agent_port);
        Counters {
            to_agent,
            from_agent,
            proxy_cpu: cpu_secs(pair.proxy.pid),
            agent_cpu: cpu_secs(pair.agent.pid),
            switches: context_switches(pair.proxy.pid) + context_switches(pair.agent.pid),
        }
    }

    fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            to_agent: self.to_agent.saturating_sub(earlier.to_agent),
            from_agent: self.from_agent.saturating_sub(earlier.from_agent),
            proxy_cpu: self.proxy_cpu - earlier.proxy_cpu,
            agent_cpu: self.agent_cpu - earlier.agent_cpu,
            switches: self.switches.saturating_sub(earlier.switches),
        }
    }
}

async fn idle_phase(config: &Config, lives: &[Live], walk: Duration, report: &mut Report) -> Result<()> {
    println!("idle: {} s with nothing changing", config.idle.as_secs());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = [Counters::read(&lives[0].pair), Counters::read(&lives[1].pair)];
    let started = Instant::now();
    tokio::time::sleep(config.idle).await;
    let window = started.elapsed();
    let after = [Counters::read(&lives[0].pair), Counters::read(&lives[1].pair)];
    // Keepalive PINGs and their ACKs, from either side, once per interval at most.
    let intervals = (window.as_secs_f64() / KEEPALIVE.as_secs_f64()).ceil() as u64;
    let allowance = 2 * 2 * PING_FRAME * intervals;
    let walk_ms = walk.as_secs_f64() * 1e3;
    for link in Link::BOTH {
        let i = link.index();
        let delta = after[i].since(&before[i]);
        let secs = window.as_secs_f64();
        report.row(Row {
            metric: format!("idle {secs:.0} s {}: bytes over the link, to / from the agent", config.at(link)),
            figure: format!("{} / {} B", delta.to_agent, delta.from_agent),
            baseline: "-".to_string(),
            ratio: "-".to_string(),
            target: format!("<= {allowance} B each (keepalive PINGs only)"),
            ok: Some(delta.to_agent <= allowance && delta.from_agent <= allowance),
        });
        let cpu = [delta.proxy_cpu * 1e3, delta.agent_cpu * 1e3];
        report.row(Row {
            metric: format!(
                "idle {secs:.0} s {}: CPU of proxy / agent vs one stat walk of the tree (no rescans)",
                config.at(link)
            ),
            figure: format!("{:.0} / {:.0} ms ({} context switches)", cpu[0], cpu[1], delta.switches),
            baseline: format!("{walk_ms:.1} ms"),
            ratio: format!("{:.2} / {:.2}", cpu[0] / walk_ms, cpu[1] / walk_ms),
            target: "<= 1.00 each".to_string(),
            ok: Some(cpu[0] <= walk_ms && cpu[1] <= walk_ms),
        });
    }
    Ok(())
}

/// Payload bytes (proxy → agent, agent → proxy) of the agent's established TCP
/// connections on `port`, from the kernel's TCP_INFO as `ss -ti` shows it.
fn link_bytes(port: u16) -> (u64, u64) {
    let output = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .stdin(Stdio::null())
        .output();
    let text = output.map(|out| String::from_utf8_lossy(&out.stdout).into_owned()).unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.split_whitespace()
            .filter_map(|token| token.strip_prefix(name))
            .filter_map(|value| value.parse::<u64>().ok())
            .sum()
    };
    (field("bytes_received:"), field("bytes_sent:"))
}

/// User + system CPU seconds of one process (all its threads, live or exited).
fn cpu_secs(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15, that is 11 and 12 here.
    stat_ticks(pid, 11..13)
}

/// CPU seconds of a process, of its children it reaped, and of its live
/// descendants (each counted once: a reaped process is in its parent's cutime).
fn tree_cpu_secs(root: u32) -> f64 {
    // utime, stime, cutime, cstime: fields 14 to 17.
    process_tree(root).into_iter().map(|pid| stat_ticks(pid, 11..15)).sum()
}

/// CPU seconds of the bench's own reaped children (rsync, ssh, tar).
fn reaped_children_cpu() -> f64 {
    stat_ticks(std::process::id(), 13..15)
}

/// The sum of some clock-tick fields of /proc/PID/stat, in seconds.
fn stat_ticks(pid: u32, fields: std::ops::Range<usize>) -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    let ticks_per_sec = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    let ticks: u64 = stat_fields(pid)
        .map(|values| {
            values.get(fields).unwrap_or_default().iter().filter_map(|f| f.parse::<u64>().ok()).sum()
        })
        .unwrap_or(0);
    ticks as f64 / ticks_per_sec
}

/// Voluntary + involuntary context switches over the live threads of a process.
fn context_switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    tasks
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

// ---------------------------------------------------------------------------------
// The engine: description, image, leftovers
// ---------------------------------------------------------------------------------

async fn describe_engine(engine: &Path, report: &mut Report) -> Result<()> {
    let version = api_expect(engine, Method::GET, "/version", None, StatusCode::OK)
        .await
        .map_err(|err| format!("is the engine running at {}? {err}", engine.display()))?;
    report.note(format!(
        "engine: Docker {} (API {}) at {}",
        version["Version"].as_str().unwrap_or("?"),
        version["ApiVersion"].as_str().unwrap_or("?"),
        engine.display()
    ));
    let rsync = Command::new("rsync").arg("--version").stdin(Stdio::null()).output();
    let rsync =
        rsync.map(|out| String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string());
    let ssh = Command::new("ssh").arg("-V").stdin(Stdio::null()).output();
    let ssh = ssh.map(|out| String::from_utf8_lossy(&out.stderr).trim().to_string());
    report.note(format!(
        "baseline: {} over {} (curve25519, aes128-gcm) to a private sshd on loopback",
        rsync.unwrap_or_else(|_| "rsync: not found (install rsync)".to_string()),
        ssh.unwrap_or_else(|_| "ssh: not found".to_string())
    ));
    Ok(())
}

/// Removes temporary directories of killed bench runs (their processes died with
/// them: every child runs under `setpriv --pdeathsig`).
fn sweep_temp_dirs(dir: &Path) {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or_default();
        if !is_running(owner) {
            remove_tree(&entry.path());
        }
    }
}

// ---------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------

const REPORT_STYLE: Style = Style {
    columns: Columns::FigureBaseline,
    marks: ["PASS", "MISS"],
    ratio_digits: 3,
    footnote: "ratios are figure/baseline: the median of per-round ratios, with a bootstrap 95% interval; \
               figure and baseline columns are medians over rounds",
};

impl Report {
    fn rtt_row(&mut self, config: &Config, rtt: &RttFigures) {
        let measured = self.relay_rtt(config.rtt, &rtt.relay, &rtt.direct);
        self.notes.push(format!(
            "RTT = {measured:.2} ms @{}ms and {:.3} ms @0ms (measured p50s) in every RTT-based target below",
            config.rtt.as_millis(),
            rtt.direct.p50 / 1e6
        ));
    }
}
