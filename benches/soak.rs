//! Soak run of the two halves together: `offload proxy` → a cuttable relay (0 ms) →
//! `offload agent` → the engine, all on this machine.
//!
//! For a bounded time, N concurrent API clients (tokio tasks speaking HTTP/1.1 on the
//! proxy's unix socket) and a few real `docker` CLI loops run a mix of container runs,
//! exec hijacks, logs (plain and followed, then hung up), inspects, lists and volume
//! churn, while the link is cut K times at random moments. Every request has a time
//! limit, so a hang is counted, not waited on. Errors are expected only in ops a cut
//! caught under way, or right after a cut. Then the clients stop, nothing is removed by hand, the session expires (idle
//! timeout + grace), and the engine must hold nothing labelled with the session. File
//! descriptors and RSS of both halves are read at a baseline, at their peak and after.
//! See benches/README.md ("Soak").
//!
//! Run with `cargo bench --bench soak`. Without `--bench` (when `cargo test
//! --all-targets` runs this target) it only prints how to run it.

#[allow(dead_code)] // the soak only cuts; the relay can also delay and freeze
#[path = "../tests/support/delay.rs"]
mod delay;

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;
use std::future::Future;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use delay::DelayRelay;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use common::engine::{ensure_image, expect_status};
use common::procfs::load_average;
use common::stats::WyRand;
use common::{guarded_command, is_running, Context, Result, API_HOST, DEFAULT_IMAGE, DOCKER_CLI};

/// Label on everything the soak creates; its value is the soak's pid, so a later run
/// can tell leftovers of a killed run from the resources of a live one.
const LABEL: &str = "offload-soak.pid";
/// Every name the soak gives starts with this, then the soak's pid and a dash.
const NAME_PREFIX: &str = "offload-soak-";
/// The label the agent puts on what a session creates.
const SESSION_LABEL: &str = "offload.session";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

struct Config {
    binary: PathBuf,
    engine: PathBuf,
    image: String,
    /// Concurrent API clients (tokio tasks).
    clients: usize,
    /// Concurrent `docker run --rm` loops of the real CLI.
    cli_clients: usize,
    /// At most this many container runs and this many execs at once; a client that
    /// finds no free slot does a light op instead. Keeps a 2-core engine from being
    /// the thing that times out.
    run_slots: usize,
    exec_slots: usize,
    /// How long the clients run.
    seconds: u64,
    /// How many times the link is cut.
    kills: usize,
    /// Longer than this without an answer is a hang.
    request_timeout: Duration,
    /// An error this soon after a cut is the cut's doing.
    kill_window: Duration,
    /// The agent's --idle-timeout and --grace.
    idle_timeout: Duration,
    grace: Duration,
    /// How long to wait for the session to end once the clients stopped.
    expire_wait: Duration,
    /// How long to wait for fds/RSS to come back once the session ended.
    settle: Duration,
    /// "Back to baseline" allows this many more fds and this much more RSS.
    fd_margin: usize,
    rss_margin_mib: f64,
    seed: u64,
    timeout: Duration,
    /// Also fail when fds or RSS did not come back.
    strict: bool,
    /// Probe the agent's engine connections after the run.
    probe: bool,
    /// Copy the agent's and proxy's logs here at the end.
    log_dir: Option<PathBuf>,
}

impl Config {
    fn from_env() -> Result<Config> {
        let binary = match std::env::var("OFFLOAD_SOAK_BINARY") {
            Ok(path) if !path.is_empty() => PathBuf::from(path),
            _ => PathBuf::from(env!("CARGO_BIN_EXE_offload")),
        };
        let seconds: u64 = env_or("OFFLOAD_SOAK_SECONDS", 120)?;
        let idle_timeout = Duration::from_secs(env_or("OFFLOAD_SOAK_IDLE_TIMEOUT_S", 3)?);
        let grace = Duration::from_secs(env_or("OFFLOAD_SOAK_GRACE_S", 2)?);
        let default_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let config = Config {
            binary,
            engine: PathBuf::from(env_or("OFFLOAD_SOAK_ENGINE", "/var/run/docker.sock".to_string())?),
            image: env_or("OFFLOAD_SOAK_IMAGE", DEFAULT_IMAGE.to_string())?,
            clients: env_or("OFFLOAD_SOAK_CLIENTS", 200)?,
            cli_clients: env_or("OFFLOAD_SOAK_CLI_CLIENTS", 4)?,
            run_slots: env_or("OFFLOAD_SOAK_RUN_SLOTS", 8)?,
            exec_slots: env_or("OFFLOAD_SOAK_EXEC_SLOTS", 8)?,
            seconds,
            kills: env_or("OFFLOAD_SOAK_KILLS", 4)?,
            request_timeout: Duration::from_secs(env_or("OFFLOAD_SOAK_REQUEST_TIMEOUT_S", 60)?),
            kill_window: Duration::from_millis(env_or("OFFLOAD_SOAK_KILL_WINDOW_MS", 2000)?),
            idle_timeout,
            grace,
            expire_wait: idle_timeout
                + grace
                + Duration::from_secs(env_or("OFFLOAD_SOAK_EXPIRE_SLACK_S", 20)?),
            settle: Duration::from_secs(env_or("OFFLOAD_SOAK_SETTLE_S", 10)?),
            fd_margin: env_or("OFFLOAD_SOAK_FD_MARGIN", 4)?,
            rss_margin_mib: env_or("OFFLOAD_SOAK_RSS_MARGIN_MIB", 8.0)?,
            seed: env_or("OFFLOAD_SOAK_SEED", default_seed)?,
            timeout: Duration::from_secs(env_or("OFFLOAD_SOAK_TIMEOUT_S", seconds + 420)?),
            strict: env_or("OFFLOAD_SOAK_STRICT", 0u8)? != 0,
            probe: env_or("OFFLOAD_SOAK_PROBE", 1u8)? != 0,
            log_dir: std::env::var("OFFLOAD_SOAK_LOG_DIR").ok().filter(|d| !d.is_empty()).map(PathBuf::from),
        };
        if config.clients + config.cli_clients == 0 {
            return Err("OFFLOAD_SOAK_CLIENTS and OFFLOAD_SOAK_CLI_CLIENTS are both 0".into());
        }
        if config.seconds == 0 || config.request_timeout.is_zero() {
            return Err("OFFLOAD_SOAK_SECONDS and OFFLOAD_SOAK_REQUEST_TIMEOUT_S must be at least 1".into());
        }
        Ok(config)
    }
}

fn env_or<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: Display,
{
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value.trim().parse().context(format!("{name}={value:?}")),
        _ => Ok(default),
    }
}

// ---------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------

fn main() -> ExitCode {
    if !std::env::args().skip(1).any(|arg| arg == "--bench") {
        println!("soak: skipped; run it with `cargo bench --bench soak`");
        return ExitCode::SUCCESS;
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("soak: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Whatever ends the run (an error, a panic, Ctrl-C, the time limit), this removes
    // what is left of this run's own resources, directly at the engine.
    let _sweep = OwnSweep { engine: config.engine.clone() };
    // Two workers (this box has two cores). The agent and the proxy are spawned from
    // the main thread (block_on runs the main future there), so their parent-death
    // signal fires only when the soak exits.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime");
    let outcome = runtime.block_on(run_bounded(&config));
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Err(err) => {
            eprintln!("\nsoak FAILED to run: {err}");
            ExitCode::FAILURE
        }
        Ok(report) => {
            report.print(&config);
            if report.failures(&config).is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
    }
}

async fn run_bounded(config: &Config) -> Result<Report> {
    tokio::select! {
        outcome = tokio::time::timeout(config.timeout, run(config)) => {
            outcome.map_err(|_| format!(
                "the run took longer than OFFLOAD_SOAK_TIMEOUT_S={}",
                config.timeout.as_secs()
            ))?
        }
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    }
}

// ---------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------

async fn run(config: &Config) -> Result<Report> {
    let engine = config.engine.clone();
    let version = api_expect(&engine, Method::GET, "/version", None, StatusCode::OK)
        .await
        .map_err(|err| format!("is the engine running at {}? {err}", engine.display()))?;
    ensure_image(&engine, &config.image).await?;
    sweep_leftovers(&engine).await;
    sweep_temp_dirs();

    let mut report = Report {
        engine: format!(
            "Docker {} (API {})",
            version["Version"].as_str().unwrap_or("?"),
            version["ApiVersion"].as_str().unwrap_or("?")
        ),
        load_start: load_average(),
        ..Report::default()
    };

    let mut rig = Rig::start(config).await?;
    let outcome = soak(config, &mut rig, &mut report).await;
    report.load_end = load_average();
    rig.stop_all();
    if let Some(dir) = &config.log_dir {
        rig.keep_logs(dir);
    }
    if let Err(err) = outcome {
        return Err(format!(
            "{err}\n--- agent log (tail) ---\n{}\n--- proxy log (tail) ---\n{}",
            tail(&rig.agent_log, 30),
            tail(&rig.proxy_log, 30)
        )
        .into());
    }
    Ok(report)
}

async fn soak(config: &Config, rig: &mut Rig, report: &mut Report) -> Result<()> {
    let pid = std::process::id();
    let socket = rig.socket.clone();

    // Warm-up: open the link (and the session), create what every client shares, and
    // run each kind of operation once.
    let mut warm = ApiConn::open(&socket).await?;
    warm.expect(Method::GET, "/_ping", None, StatusCode::OK).await?;
    let network = format!("{NAME_PREFIX}{pid}-net");
    warm.expect(
        Method::POST,
        "/networks/create",
        Some(json!({ "Name": network, "Labels": { LABEL: pid.to_string() } })),
        StatusCode::CREATED,
    )
    .await?;
    let volume = format!("{NAME_PREFIX}{pid}-vol");
    warm.expect(
        Method::POST,
        "/volumes/create",
        Some(json!({ "Name": volume, "Labels": { LABEL: pid.to_string() } })),
        StatusCode::CREATED,
    )
    .await?;
    let long_name = format!("{NAME_PREFIX}{pid}-long");
    let created = warm
        .expect(
            Method::POST,
            &format!("/containers/create?name={long_name}"),
            Some(json!({
                "Image": config.image,
                "Cmd": ["sh", "-c", "echo soak-ready; exec sleep 100000"],
                "Labels": { LABEL: pid.to_string() },
                "HostConfig": { "Mounts": [{ "Type": "volume", "Source": volume, "Target": "/data" }] },
                "NetworkingConfig": { "EndpointsConfig": { network.clone(): {} } },
            })),
            StatusCode::CREATED,
        )
        .await?;
    let long_id = json_of(&created)?["Id"].as_str().ok_or("create: no Id")?.to_string();
    warm.expect(Method::POST, &format!("/containers/{long_id}/start"), None, StatusCode::NO_CONTENT).await?;
    drop(warm);

    let stats = Arc::new(Stats::default());
    let shared = Arc::new(Shared {
        socket: socket.clone(),
        image: config.image.clone(),
        long_id: long_id.clone(),
        pid,
        timeout: config.request_timeout,
        stop: AtomicBool::new(false),
        stats: stats.clone(),
        docker_config: rig.dir.path().join("docker-config"),
        run_slots: Arc::new(Semaphore::new(config.run_slots)),
        exec_slots: Arc::new(Semaphore::new(config.exec_slots)),
    });
    {
        let mut warmer = ApiClient::new(usize::MAX, shared.clone(), config.seed);
        for kind in OpKind::ALL {
            warmer.run_op(kind).await;
        }
        if config.cli_clients > 0 {
            cli_run(&shared, usize::MAX, 0).await;
        }
    }
    let warm_incidents = stats.take_incidents();
    if !warm_incidents.is_empty() {
        let list: Vec<String> = warm_incidents.iter().map(|i| format!("{}: {}", i.op, i.what)).collect();
        return Err(format!("the warm-up failed (no cut yet):\n  {}", list.join("\n  ")).into());
    }
    stats.reset();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = [sample(rig.proxy_pid), sample(rig.agent_pid)];
    let baseline_engine_conns = rig.engine_conns();
    println!(
        "baseline: proxy {} fds / {:.1} MiB, agent {} fds / {:.1} MiB",
        baseline[0].fds, baseline[0].rss_mib, baseline[1].fds, baseline[1].rss_mib
    );

    // Sample both halves for their peaks until the end.
    let peaks = Arc::new(Mutex::new(baseline));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peaks, sampling) = (peaks.clone(), sampling.clone());
        let pids = [rig.proxy_pid, rig.agent_pid];
        tokio::spawn(async move {
            while sampling.load(Ordering::SeqCst) {
                for (index, pid) in pids.into_iter().enumerate() {
                    let now = sample(pid);
                    let mut peaks = peaks.lock().unwrap_or_else(|p| p.into_inner());
                    peaks[index].fds = peaks[index].fds.max(now.fds);
                    peaks[index].rss_mib = peaks[index].rss_mib.max(now.rss_mib);
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };

    // The load, and the cuts.
    let duration = Duration::from_secs(config.seconds);
    let schedule = cut_schedule(duration, config.kills, config.seed);
    println!(
        "running {} API clients and {} docker CLI loops for {} s; cutting the link at {} (seed {})",
        config.clients,
        config.cli_clients,
        config.seconds,
        schedule.iter().map(|t| format!("{:.1} s", t.as_secs_f64())).collect::<Vec<_>>().join(", "),
        config.seed
    );
    let started = Instant::now();
    let cuts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let cutter = {
        let (relay, cuts) = (rig.relay.clone(), cuts.clone());
        tokio::spawn(async move {
            for at in schedule {
                tokio::time::sleep_until((started + at).into()).await;
                cuts.lock().unwrap_or_else(|p| p.into_inner()).push(Instant::now());
                relay.cut();
                println!("  {:6.1} s  link cut", started.elapsed().as_secs_f64());
            }
        })
    };
    let mut clients = JoinSet::new();
    for index in 0..config.clients {
        let mut client = ApiClient::new(index, shared.clone(), config.seed);
        clients.spawn(async move { client.run_until_stopped().await });
    }
    for index in 0..config.cli_clients {
        let shared = shared.clone();
        clients.spawn(async move {
            let mut n = 0;
            while !shared.stop.load(Ordering::SeqCst) {
                n += 1;
                cli_run(&shared, index, n).await;
            }
        });
    }
    // The control: the same inspect, straight to the engine, once a second. When ops
    // through offload are slow, this tells whether the engine was slow too.
    let control = {
        let (stats, engine, path) =
            (stats.clone(), config.engine.clone(), format!("/containers/{long_id}/json"));
        tokio::spawn(async move {
            loop {
                let begun = Instant::now();
                let answer = tokio::time::timeout(
                    Duration::from_secs(60),
                    api_expect(&engine, Method::GET, &path, None, StatusCode::OK),
                )
                .await;
                stats.control(CONTROL_INSPECT, begun.elapsed(), matches!(answer, Ok(Ok(_))));
                tokio::time::sleep(Duration::from_secs(1).saturating_sub(begun.elapsed())).await;
            }
        })
    };
    // And a container run straight to the engine every 3 s: the heavy path.
    let control_run = {
        let (stats, engine, image) = (stats.clone(), config.engine.clone(), config.image.clone());
        tokio::spawn(async move {
            for n in 1.. {
                let begun = Instant::now();
                let name = format!("{NAME_PREFIX}{pid}-ctl-{n}");
                let answer =
                    tokio::time::timeout(Duration::from_secs(60), direct_run(&engine, &image, &name)).await;
                stats.control(CONTROL_RUN, begun.elapsed(), matches!(answer, Ok(Ok(_))));
                if !matches!(answer, Ok(Ok(_))) {
                    let path = format!("/containers/{name}?force=1");
                    let _ = api_expect(&engine, Method::DELETE, &path, None, StatusCode::NO_CONTENT).await;
                }
                tokio::time::sleep(Duration::from_secs(3).saturating_sub(begun.elapsed())).await;
            }
        })
    };
    let progress = {
        let stats = stats.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let (requests, cli, errors, hangs) = stats.counts();
                let direct = stats
                    .controls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(CONTROL_INSPECT)
                    .and_then(|samples| samples.last())
                    .map(|(millis, _)| format!("{millis} ms"))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "  {:6.1} s  {requests} API requests, {cli} docker runs, {errors} errors, {hangs} hangs; \
                     engine direct inspect {direct}",
                    started.elapsed().as_secs_f64()
                );
            }
        })
    };
    tokio::time::sleep(duration).await;
    shared.stop.store(true, Ordering::SeqCst);
    let _ = cutter.await;
    // Each step is bounded by the request timeout, and an op stops at its first
    // failure, so the clients end within about two timeouts.
    let drain_limit = config.request_timeout * 2 + Duration::from_secs(10);
    let drained =
        tokio::time::timeout(drain_limit, async { while clients.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        let left = clients.len();
        stats.incident(
            Incident::Hang,
            "drain",
            Instant::now(),
            format!("{left} clients still busy {drain_limit:?} after the stop; aborted"),
        );
        clients.abort_all();
    }
    progress.abort();
    control.abort();
    control_run.abort();
    // An aborted control run may leave its container (made straight at the
    // engine, not through offload): remove it so it is not counted as a leftover.
    for container in own_resources(&config.engine, pid).await.unwrap_or_default() {
        if let Some(name) = container.strip_prefix("container ").and_then(|c| c.split(' ').next()) {
            if name.contains("-ctl-") {
                let path = format!("/containers/{name}?force=1");
                let _ = api_expect(&config.engine, Method::DELETE, &path, None, StatusCode::NO_CONTENT).await;
            }
        }
    }
    let load_elapsed = started.elapsed();
    println!("clients stopped after {:.1} s", load_elapsed.as_secs_f64());

    // Let the session end by itself: stop (not remove) the long-running container
    // first, since a running container keeps its session.
    let kill_path = format!("/containers/{long_id}/kill");
    let mut stopped = false;
    for _ in 0..5 {
        let attempt = async {
            let mut conn = ApiConn::open(&socket).await?;
            conn.expect(Method::POST, &kill_path, None, StatusCode::NO_CONTENT).await
        };
        match tokio::time::timeout(config.request_timeout, attempt).await {
            Ok(Ok(_)) => {
                stopped = true;
                break;
            }
            Ok(Err(err)) => println!("stopping {long_name}: {err}; retrying"),
            Err(_) => println!("stopping {long_name}: no answer; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if !stopped {
        stats.incident(
            Incident::Error,
            "teardown",
            Instant::now(),
            format!("could not stop {long_name} through the proxy"),
        );
    }
    let quiet = Instant::now();
    let sessions_ended = loop {
        let log = rig.agent_log_text();
        let started_ids = session_ids(&log, "session started");
        let cleaned = session_ids(&log, "session cleaned up");
        if !started_ids.is_empty() && started_ids.iter().all(|id| cleaned.contains(id)) {
            break Some(quiet.elapsed());
        }
        if quiet.elapsed() > config.expire_wait {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after_end = [sample(rig.proxy_pid), sample(rig.agent_pid)];
    let settle_started = Instant::now();
    let settled = loop {
        let now = [sample(rig.proxy_pid), sample(rig.agent_pid)];
        let back = (0..2).all(|i| now[i].within(&baseline[i], config.fd_margin, config.rss_margin_mib));
        if back || settle_started.elapsed() >= config.settle {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    sampling.store(false, Ordering::SeqCst);
    let _ = sampler.await;

    // What the engine still holds, asked directly.
    let log = rig.agent_log_text();
    let ids = session_ids(&log, "session started");
    let mut leftovers = Vec::new();
    for id in &ids {
        leftovers.extend(session_resources(&config.engine, id).await?);
    }
    for resource in own_resources(&config.engine, pid).await? {
        if !leftovers.contains(&resource) {
            leftovers.push(resource);
        }
    }

    let peaks = *peaks.lock().unwrap_or_else(|p| p.into_inner());
    let agent_engine_conns = rig.engine_conns();
    let settle_waited = settle_started.elapsed();
    let proxy_log = rig.proxy_log_text();
    let probe = if config.probe { Some(pool_probe(config, rig, &ids).await) } else { None };
    report.fill(Filled {
        config,
        stats: &stats,
        cuts: &cuts.lock().unwrap_or_else(|p| p.into_inner()),
        started,
        load_elapsed,
        baseline,
        peaks,
        after_end,
        settled,
        settle_waited,
        sessions_ended,
        session_log: &log,
        session_ids: ids,
        leftovers,
        agent_engine_conns,
        baseline_engine_conns,
        probe,
        proxy_log: &proxy_log,
    });
    Ok(())
}

/// What the pool probe found.
struct Probe {
    /// The agent's engine connections before the probe.
    before: usize,
    /// Concurrent requests sent (one per connection it had).
    concurrent: usize,
    /// The most engine connections the agent had while they were all open.
    peak: usize,
    /// Requests of the probe that failed.
    failed: usize,
    /// The probe's own session ended by itself (and left nothing).
    session_ended: bool,
    leftovers: usize,
}

impl Probe {
    /// Connections that were not handed out again: neither idle in the pool nor closed.
    fn not_reused(&self) -> usize {
        // Slack of 2: the session handshake's own engine calls.
        self.peak.saturating_sub(self.concurrent + 2)
    }
}

/// Tells idle pooled engine connections of the agent from lost ones. The agent's
/// engine client keeps idle connections for reuse, so after a burst its fd count need
/// not come back. With as many concurrent 3-second requests as it holds engine
/// connections, a pool that can hand all of them out again needs no new ones; every
/// connection above that count was held by something that never let go. The probe
/// opens a new session (the soak's has ended); it creates nothing and is left to end
/// by itself as well.
async fn pool_probe(config: &Config, rig: &Rig, earlier: &[String]) -> Probe {
    let before = rig.engine_conns();
    let concurrent = before.max(1);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let path = format!("/events?since={now}&until={}", now + 3);
    let mut requests = JoinSet::new();
    for _ in 0..concurrent {
        let (socket, path) = (rig.socket.clone(), path.clone());
        requests.spawn(async move {
            let attempt = async {
                let mut conn = ApiConn::open(&socket).await?;
                conn.expect(Method::GET, &path, None, StatusCode::OK).await
            };
            matches!(tokio::time::timeout(Duration::from_secs(30), attempt).await, Ok(Ok(_)))
        });
    }
    let mut peak = 0;
    let mut failed = 0;
    loop {
        peak = peak.max(rig.engine_conns());
        match tokio::time::timeout(Duration::from_millis(50), requests.join_next()).await {
            Ok(None) => break,
            Ok(Some(outcome)) => failed += usize::from(!matches!(outcome, Ok(true))),
            Err(_) => {}
        }
    }
    let deadline = Instant::now() + config.expire_wait;
    let (session_ended, probe_ids) = loop {
        let log = rig.agent_log_text();
        let probe_ids: Vec<String> =
            session_ids(&log, "session started").into_iter().filter(|id| !earlier.contains(id)).collect();
        let cleaned = session_ids(&log, "session cleaned up");
        if probe_ids.iter().all(|id| cleaned.contains(id)) {
            break (true, probe_ids);
        }
        if Instant::now() > deadline {
            break (false, probe_ids);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut leftovers = 0;
    for id in &probe_ids {
        leftovers += session_resources(&config.engine, id).await.map(|found| found.len()).unwrap_or(0);
    }
    Probe { before, concurrent, peak, failed, session_ended, leftovers }
}

/// K moments spread over the middle 80 % of the run: one at a random point of each
/// of K equal slots, so that no two cuts are close.
fn cut_schedule(duration: Duration, kills: usize, seed: u64) -> Vec<Duration> {
    if kills == 0 {
        return Vec::new();
    }
    let mut rng = WyRand(seed ^ 0x5eed_c075);
    let window = duration.as_secs_f64() * 0.8;
    let slot = window / kills as f64;
    (0..kills)
        .map(|k| {
            let within = 0.15 + 0.7 * rng.unit();
            Duration::from_secs_f64(duration.as_secs_f64() * 0.1 + slot * (k as f64 + within))
        })
        .collect()
}

/// Session ids from the agent's log lines that contain `what`.
fn session_ids(log: &str, what: &str) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for line in log.lines().filter(|line| line.contains(what)) {
        if let Some(id) = field(line, "session") {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// `name=value` from a tracing line.
fn field(line: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=");
    let rest = &line[line.find(&key)? + key.len()..];
    Some(rest.split_whitespace().next()?.trim_matches('"').to_string())
}

// ---------------------------------------------------------------------------------
// The agent, the relay and the proxy
// ---------------------------------------------------------------------------------

struct Rig {
    socket: PathBuf,
    agent_log: PathBuf,
    proxy_log: PathBuf,
    agent_pid: u32,
    proxy_pid: u32,
    /// Unix sockets the agent had before any request (its signal pipe): the rest are
    /// connections to the engine.
    agent_own_sockets: usize,
    // Dropped in this order: the proxy, then the relay, then the agent.
    proxy: Option<Daemon>,
    relay: Arc<DelayRelay>,
    agent: Option<Daemon>,
    /// Last: removed once both processes have exited (the agent writes its session
    /// records there while it stops).
    dir: tempfile::TempDir,
}

impl Rig {
    async fn start(config: &Config) -> Result<Rig> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{NAME_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating a temporary directory")?;
        let state = dir.path().join("agent-state");
        let mut command = guarded_command(&config.binary);
        command
            .arg("agent")
            .args(["--listen", "tcp://127.0.0.1:0", "--insecure"])
            .arg(format!("--docker=unix://{}", config.engine.display()))
            .arg("--state-dir")
            .arg(&state)
            .arg(format!("--idle-timeout={}s", config.idle_timeout.as_secs()))
            .arg(format!("--grace={}s", config.grace.as_secs()))
            .env("RUST_LOG", "info");
        let mut agent = Daemon::spawn("agent", command, dir.path())?;
        let deadline = Instant::now() + START_TIMEOUT;
        let agent_addr: SocketAddr = loop {
            let text = agent.log_text();
            if let Some(line) = text.lines().find(|line| line.contains("offload agent ready")) {
                let url = field(line, "listen").unwrap_or_default();
                break url
                    .trim_start_matches("tcp://")
                    .parse()
                    .context(format!("agent address in {line:?}"))?;
            }
            if let Some(status) = agent.exited()? {
                return Err(format!(
                    "the agent exited ({status}) before it was ready:\n{}",
                    tail(&agent.log, 20)
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the agent was not ready within {START_TIMEOUT:?}:\n{}",
                    tail(&agent.log, 20)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The relay builds its own runtime, which cannot happen on a runtime thread.
        let relay = std::thread::spawn(move || DelayRelay::start(agent_addr, Duration::ZERO))
            .join()
            .map_err(|_| "starting the relay panicked")?;
        let socket = dir.path().join("o.sock");
        let mut command = guarded_command(&config.binary);
        command
            .arg("proxy")
            .arg(format!("--listen=unix://{}", socket.display()))
            .arg(format!("--remote=tcp://{}", relay.addr))
            .arg("--insecure")
            .env("RUST_LOG", "info");
        let mut proxy = Daemon::spawn("proxy", command, dir.path())?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !(socket.exists() && UnixStream::connect(&socket).await.is_ok()) {
            if let Some(status) = proxy.exited()? {
                return Err(format!(
                    "the proxy exited ({status}) before it was ready:\n{}",
                    tail(&proxy.log, 20)
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the proxy was not ready within {START_TIMEOUT:?}:\n{}",
                    tail(&proxy.log, 20)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let agent_own_sockets = unix_sockets(agent.pid);
        Ok(Rig {
            agent_own_sockets,
            socket,
            agent_log: agent.log.clone(),
            proxy_log: proxy.log.clone(),
            agent_pid: agent.pid,
            proxy_pid: proxy.pid,
            proxy: Some(proxy),
            relay: Arc::new(relay),
            agent: Some(agent),
            dir,
        })
    }

    /// The agent's connections to the engine (in use, or idle in its pool).
    fn engine_conns(&self) -> usize {
        unix_sockets(self.agent_pid).saturating_sub(self.agent_own_sockets)
    }

    fn agent_log_text(&self) -> String {
        std::fs::read_to_string(&self.agent_log).unwrap_or_default()
    }

    fn proxy_log_text(&self) -> String {
        std::fs::read_to_string(&self.proxy_log).unwrap_or_default()
    }

    /// Stops the proxy, then the agent (SIGTERM, SIGKILL after 5 s).
    fn stop_all(&mut self) {
        for daemon in [self.proxy.take(), self.agent.take()].into_iter().flatten() {
            drop(daemon);
        }
    }

    fn keep_logs(&self, dir: &Path) {
        let _ = std::fs::create_dir_all(dir);
        for log in [&self.agent_log, &self.proxy_log] {
            if let Some(name) = log.file_name() {
                let _ = std::fs::copy(log, dir.join(name));
            }
        }
        println!("logs copied to {}", dir.display());
    }
}

/// The agent or the proxy; stopped with SIGTERM (then SIGKILL) on drop.
struct Daemon {
    name: String,
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, mut command: Command, dir: &Path) -> Result<Daemon> {
        let log = dir.join(format!("{name}.log"));
        let output = std::fs::File::create(&log).context(format!("creating {}", log.display()))?;
        let errors = output.try_clone().context("sharing a log file")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn()
            .context(format!("starting the {name}"))?;
        Ok(Daemon { name: name.to_string(), pid: child.id(), child: Some(child), log })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().context(format!("checking the {}", self.name)),
            None => Ok(None),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SIGTERM by `kill`, so no unsafe code is needed.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let started = Instant::now();
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if started.elapsed() > STOP_TIMEOUT {
                eprintln!(
                    "warning: the {} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killing it",
                    self.name
                );
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------

struct Shared {
    socket: PathBuf,
    image: String,
    long_id: String,
    pid: u32,
    timeout: Duration,
    stop: AtomicBool,
    stats: Arc<Stats>,
    docker_config: PathBuf,
    run_slots: Arc<Semaphore>,
    exec_slots: Arc<Semaphore>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum OpKind {
    Run,
    Exec,
    Logs,
    Inspect,
    List,
    Volume,
    Cli,
}

impl OpKind {
    const ALL: [OpKind; 6] =
        [OpKind::Run, OpKind::Exec, OpKind::Logs, OpKind::Inspect, OpKind::List, OpKind::Volume];
    /// Relative weights of the API clients' mix, in the order of `ALL`.
    const WEIGHTS: [u64; 6] = [20, 20, 15, 15, 20, 10];

    fn name(self) -> &'static str {
        match self {
            OpKind::Run => "run (create, wait, start, logs, rm)",
            OpKind::Exec => "exec (create, start 101, inspect)",
            OpKind::Logs => "logs (plain, or follow + hang up)",
            OpKind::Inspect => "inspect",
            OpKind::List => "ping + ps",
            OpKind::Volume => "volume (create, inspect, rm 4 of 5)",
            OpKind::Cli => "docker run --rm (CLI 28)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            OpKind::Run => "run",
            OpKind::Exec => "exec",
            OpKind::Logs => "logs",
            OpKind::Inspect => "inspect",
            OpKind::List => "ps",
            OpKind::Volume => "volume",
            OpKind::Cli => "cli",
        }
    }
}

/// Marks a failed op; the incident is already recorded.
struct Failed;

type Step<T> = std::result::Result<T, Failed>;

struct ApiClient {
    index: usize,
    shared: Arc<Shared>,
    rng: WyRand,
    n: u64,
    /// When the op in progress began.
    op_started: Instant,
}

impl ApiClient {
    fn new(index: usize, shared: Arc<Shared>, seed: u64) -> ApiClient {
        ApiClient {
            index,
            shared,
            rng: WyRand(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            n: 0,
            op_started: Instant::now(),
        }
    }

    async fn run_until_stopped(&mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            let mut kind = self.pick();
            let slots = match kind {
                OpKind::Run => Some(&self.shared.run_slots),
                OpKind::Exec => Some(&self.shared.exec_slots),
                _ => None,
            };
            let permit = slots.map(|slots| slots.clone().try_acquire_owned());
            if let Some(Err(_)) = permit {
                kind = self.pick_light();
            }
            self.run_op(kind).await;
            drop(permit);
            // A little think time, so that the clients do not march in step.
            let pause = self.rng.below(200) as u64;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// One of the ops that cost the engine little.
    fn pick_light(&mut self) -> OpKind {
        loop {
            let kind = self.pick();
            if !matches!(kind, OpKind::Run | OpKind::Exec) {
                return kind;
            }
        }
    }

    fn pick(&mut self) -> OpKind {
        let total: u64 = OpKind::WEIGHTS.iter().sum();
        let mut roll = self.rng.below(total as usize) as u64;
        for (kind, weight) in OpKind::ALL.into_iter().zip(OpKind::WEIGHTS) {
            if roll < weight {
                return kind;
            }
            roll -= weight;
        }
        OpKind::List
    }

    async fn run_op(&mut self, kind: OpKind) {
        self.n += 1;
        let started = Instant::now();
        self.op_started = started;
        let outcome = match kind {
            OpKind::Run => self.op_run().await,
            OpKind::Exec => self.op_exec().await,
            OpKind::Logs => self.op_logs().await,
            OpKind::Inspect => self.op_inspect().await,
            OpKind::List => self.op_list().await,
            OpKind::Volume => self.op_volume().await,
            OpKind::Cli => Ok(()),
        };
        self.shared.stats.op_done(kind, outcome.is_ok(), started.elapsed());
    }

    fn tag(&self, what: &str) -> String {
        let client = if self.index == usize::MAX { "w".to_string() } else { self.index.to_string() };
        format!("{}-{what}-{client}-{}", self.shared.pid, self.n)
    }

    /// One bounded step of an op: a request answered in time, or an incident.
    async fn step<T>(
        &self,
        kind: OpKind,
        what: &str,
        counts: bool,
        future: impl Future<Output = Result<T>>,
    ) -> Step<T> {
        match tokio::time::timeout(self.shared.timeout, future).await {
            Ok(Ok(value)) => {
                if counts {
                    self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
                }
                Ok(value)
            }
            Ok(Err(err)) => {
                self.shared.stats.incident(
                    Incident::Error,
                    kind.short(),
                    self.op_started,
                    format!("{what}: {err}"),
                );
                Err(Failed)
            }
            Err(_) => {
                let limit = self.shared.timeout;
                self.shared.stats.incident(
                    Incident::Hang,
                    kind.short(),
                    self.op_started,
                    format!("{what}: no answer within {limit:?}"),
                );
                Err(Failed)
            }
        }
    }

    async fn connect(&self, kind: OpKind) -> Step<ApiConn> {
        self.step(kind, "connect", false, ApiConn::open(&self.shared.socket)).await
    }

    /// `docker run` as the CLI does it: create, wait (next-exit) on a second
    /// connection before start, start, the exit code, the output, remove.
    async fn op_run(&mut self) -> Step<()> {
        let kind = OpKind::Run;
        let name = format!("{NAME_PREFIX}{}", self.tag("run"));
        let marker = self.tag("soak-out");
        let mut conn = self.connect(kind).await?;
        let spec = json!({
            "Image": self.shared.image,
            "Cmd": ["echo", marker],
            "Labels": { LABEL: self.shared.pid.to_string() },
        });
        let created = self
            .step(
                kind,
                "create",
                true,
                conn.expect(
                    Method::POST,
                    &format!("/containers/create?name={name}"),
                    Some(spec),
                    StatusCode::CREATED,
                ),
            )
            .await?;
        let id = self
            .step(kind, "create answer", false, async {
                Ok(json_of(&created)?["Id"].as_str().ok_or("no Id")?.to_string())
            })
            .await?;
        let mut waiter = self.connect(kind).await?;
        let wait_path = format!("/containers/{id}/wait?condition=next-exit");
        let wait = self
            .step(kind, "wait (head)", false, async {
                let response = waiter.send(Method::POST, &wait_path, None).await?;
                expect_status(&response, StatusCode::OK, "wait")?;
                Ok(response)
            })
            .await?;
        self.step(
            kind,
            "start",
            true,
            conn.expect(Method::POST, &format!("/containers/{id}/start"), None, StatusCode::NO_CONTENT),
        )
        .await?;
        self.step(kind, "wait (body)", true, async {
            let body = wait.into_body().collect().await.context("wait body")?.to_bytes();
            let code = json_of(&body)?["StatusCode"].as_i64();
            if code == Some(0) {
                Ok(())
            } else {
                Err(format!("wait answered {}", String::from_utf8_lossy(&body)).into())
            }
        })
        .await?;
        let logs_path = format!("/containers/{id}/logs?stdout=1&stderr=1");
        self.step(kind, "logs", true, async {
            let body = conn.expect(Method::GET, &logs_path, None, StatusCode::OK).await?;
            if contains(&body, marker.as_bytes()) {
                Ok(())
            } else {
                Err(format!("the output lacks {marker:?}: {:?}", String::from_utf8_lossy(&body)).into())
            }
        })
        .await?;
        self.step(
            kind,
            "remove",
            true,
            conn.expect(Method::DELETE, &format!("/containers/{id}?v=1"), None, StatusCode::NO_CONTENT),
        )
        .await?;
        Ok(())
    }

    /// `docker exec`: create, start with `Upgrade: tcp` (101), read to EOF, inspect.
    async fn op_exec(&mut self) -> Step<()> {
        let kind = OpKind::Exec;
        let marker = self.tag("soak-exec");
        let mut conn = self.connect(kind).await?;
        let spec = json!({ "AttachStdout": true, "AttachStderr": true, "Cmd": ["echo", marker] });
        let path = format!("/containers/{}/exec", self.shared.long_id);
        let created = self
            .step(
                kind,
                "exec create",
                true,
                conn.expect(Method::POST, &path, Some(spec), StatusCode::CREATED),
            )
            .await?;
        let id = self
            .step(kind, "exec create answer", false, async {
                Ok(json_of(&created)?["Id"].as_str().ok_or("no Id")?.to_string())
            })
            .await?;
        let start = format!("/exec/{id}/start");
        self.step(kind, "exec start (101, output to EOF)", true, async {
            let mut request = build(Method::POST, &start, Some(json!({ "Detach": false, "Tty": false })))?;
            request.headers_mut().insert(CONNECTION, "Upgrade".parse().context("header")?);
            request.headers_mut().insert(UPGRADE, "tcp".parse().context("header")?);
            let mut response = conn.send_request(request).await?;
            expect_status(&response, StatusCode::SWITCHING_PROTOCOLS, "exec start")?;
            let upgraded = hyper::upgrade::on(&mut response).await.context("upgrade")?;
            let mut io = TokioIo::new(upgraded);
            let mut output = Vec::new();
            io.read_to_end(&mut output).await.context("reading the exec stream")?;
            if contains(&output, marker.as_bytes()) {
                Ok(())
            } else {
                Err(format!("the exec stream ended without {marker:?} ({} bytes)", output.len()).into())
            }
        })
        .await?;
        let mut conn = self.connect(kind).await?;
        let inspect = format!("/exec/{id}/json");
        self.step(kind, "exec inspect", true, async {
            let body = conn.expect(Method::GET, &inspect, None, StatusCode::OK).await?;
            let value = json_of(&body)?;
            if value["ExitCode"].as_i64() == Some(0) && value["Running"] == json!(false) {
                Ok(())
            } else {
                Err(format!("exec inspect: {value}").into())
            }
        })
        .await?;
        Ok(())
    }

    /// Logs of the long-running container: plain, or followed until the first line
    /// comes and then hung up on (the stream must not keep the session alive).
    async fn op_logs(&mut self) -> Step<()> {
        let kind = OpKind::Logs;
        let follow = self.rng.below(2) == 0;
        let mut conn = self.connect(kind).await?;
        let path =
            format!("/containers/{}/logs?stdout=1&stderr=1&follow={}", self.shared.long_id, u8::from(follow));
        self.step(kind, if follow { "logs follow" } else { "logs" }, true, async {
            let response = conn.send(Method::GET, &path, None).await?;
            expect_status(&response, StatusCode::OK, "logs")?;
            if !follow {
                let body = response.into_body().collect().await.context("logs body")?.to_bytes();
                return if contains(&body, b"soak-ready") {
                    Ok(())
                } else {
                    Err(format!("logs lack soak-ready: {:?}", String::from_utf8_lossy(&body)).into())
                };
            }
            let mut body = response.into_body();
            let mut seen = Vec::new();
            while !contains(&seen, b"soak-ready") {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        seen.extend_from_slice(frame.data_ref().map(|d| &d[..]).unwrap_or_default())
                    }
                    Some(Err(err)) => return Err(format!("logs body: {err}").into()),
                    None => {
                        return Err(format!("logs ended without soak-ready ({} bytes)", seen.len()).into())
                    }
                }
            }
            // A followed stream is dropped here, with its connection: a hang-up.
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn op_inspect(&mut self) -> Step<()> {
        let kind = OpKind::Inspect;
        let mut conn = self.connect(kind).await?;
        let path = format!("/containers/{}/json", self.shared.long_id);
        self.step(kind, "inspect", true, async {
            let body = conn.expect(Method::GET, &path, None, StatusCode::OK).await?;
            let value = json_of(&body)?;
            if value["State"]["Running"] == json!(true) {
                Ok(())
            } else {
                Err(format!("the long-running container is not running: {}", value["State"]).into())
            }
        })
        .await?;
        Ok(())
    }

    async fn op_list(&mut self) -> Step<()> {
        let kind = OpKind::List;
        let mut conn = self.connect(kind).await?;
        self.step(kind, "ping", true, conn.expect(Method::GET, "/_ping", None, StatusCode::OK)).await?;
        self.step(kind, "ps", true, async {
            let body = conn.expect(Method::GET, "/containers/json", None, StatusCode::OK).await?;
            json_of(&body)?.as_array().map(|_| ()).ok_or_else(|| "ps: not a JSON array".into())
        })
        .await?;
        Ok(())
    }

    /// Creates a volume, inspects it, and removes four out of five (the rest are the
    /// session's to clean up).
    async fn op_volume(&mut self) -> Step<()> {
        let kind = OpKind::Volume;
        let name = format!("{NAME_PREFIX}{}", self.tag("vol"));
        let keep = self.rng.below(5) == 0;
        let mut conn = self.connect(kind).await?;
        let spec = json!({ "Name": name, "Labels": { LABEL: self.shared.pid.to_string() } });
        self.step(
            kind,
            "volume create",
            true,
            conn.expect(Method::POST, "/volumes/create", Some(spec), StatusCode::CREATED),
        )
        .await?;
        self.step(
            kind,
            "volume inspect",
            true,
            conn.expect(Method::GET, &format!("/volumes/{name}"), None, StatusCode::OK),
        )
        .await?;
        if !keep {
            self.step(
                kind,
                "volume rm",
                true,
                conn.expect(Method::DELETE, &format!("/volumes/{name}"), None, StatusCode::NO_CONTENT),
            )
            .await?;
        }
        Ok(())
    }
}

/// One `docker run --rm` of the real CLI through the proxy, bounded in time.
async fn cli_run(shared: &Shared, index: usize, n: u64) {
    let client = if index == usize::MAX { "w".to_string() } else { index.to_string() };
    let name = format!("{NAME_PREFIX}{}-cli{client}-{n}", shared.pid);
    let marker = format!("soak-cli-{}-{client}-{n}", shared.pid);
    let started = Instant::now();
    let mut command = tokio::process::Command::new(DOCKER_CLI);
    command
        .env("DOCKER_HOST", format!("unix://{}", shared.socket.display()))
        .env("DOCKER_CONFIG", &shared.docker_config)
        .env_remove("DOCKER_CONTEXT")
        .args(["run", "--rm", "--name", &name, "--label"])
        .arg(format!("{LABEL}={}", shared.pid))
        .args([&shared.image, "echo", &marker])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let ok = match command.spawn() {
        Err(err) => {
            shared.stats.incident(
                Incident::Error,
                "cli",
                started,
                format!("cannot start {DOCKER_CLI}: {err}"),
            );
            false
        }
        Ok(child) => match tokio::time::timeout(shared.timeout, child.wait_with_output()).await {
            Err(_) => {
                let limit = shared.timeout;
                shared.stats.incident(
                    Incident::Hang,
                    "cli",
                    started,
                    format!("docker run did not finish within {limit:?}"),
                );
                false
            }
            Ok(Err(err)) => {
                shared.stats.incident(Incident::Error, "cli", started, format!("docker run: {err}"));
                false
            }
            Ok(Ok(output)) => {
                let stdout = String::from_utf8_lossy(&output.stdout);
                if output.status.success() && stdout.contains(&marker) {
                    shared.stats.cli.fetch_add(1, Ordering::Relaxed);
                    true
                } else {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    shared.stats.incident(
                        Incident::Error,
                        "cli",
                        started,
                        format!("docker run ({}): {}{}", output.status, stdout.trim(), stderr.trim()),
                    );
                    false
                }
            }
        },
    };
    shared.stats.op_done(OpKind::Cli, ok, started.elapsed());
}

// ---------------------------------------------------------------------------------
// A minimal Engine API client (HTTP/1.1 on a unix socket)
// ---------------------------------------------------------------------------------

struct ApiConn {
    sender: SendRequest<Full<Bytes>>,
}

impl ApiConn {
    /// One connection; its task ends when the sender and the last body are dropped.
    async fn open(socket: &Path) -> Result<ApiConn> {
        let stream =
            UnixStream::connect(socket).await.context(format!("connecting to {}", socket.display()))?;
        let (sender, connection) =
            http1::handshake(TokioIo::new(stream)).await.context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok(ApiConn { sender })
    }

    async fn send_request(&mut self, request: Request<Full<Bytes>>) -> Result<Response<Incoming>> {
        let what = format!("{} {}", request.method(), request.uri());
        self.sender.ready().await.context(format!("{what}: connection closed"))?;
        self.sender.send_request(request).await.context(what)
    }

    async fn send(&mut self, method: Method, path: &str, body: Option<Value>) -> Result<Response<Incoming>> {
        self.send_request(build(method, path, body)?).await
    }

    /// Sends, checks the status, and returns the whole body.
    async fn expect(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
        want: StatusCode,
    ) -> Result<Bytes> {
        let response = self.send(method.clone(), path, body).await?;
        let status = response.status();
        let bytes =
            response.into_body().collect().await.context(format!("body of {method} {path}"))?.to_bytes();
        if status == want {
            Ok(bytes)
        } else {
            Err(format!("{method} {path}: {status}: {}", String::from_utf8_lossy(&bytes).trim()).into())
        }
    }
}

fn build(method: Method, path: &str, body: Option<Value>) -> Result<Request<Full<Bytes>>> {
    let mut builder = Request::builder().method(method).uri(path).header(HOST, API_HOST);
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let payload = body.map(|value| value.to_string()).unwrap_or_default();
    builder.body(Full::new(Bytes::from(payload))).context(format!("building a request for {path}"))
}

fn json_of(bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).context(format!("not JSON: {:?}", String::from_utf8_lossy(bytes)))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

const CONTROL_INSPECT: &str = "control: inspect, engine direct";
const CONTROL_RUN: &str = "control: run, engine direct";

/// create, start, wait, remove: a container run straight to the engine.
async fn direct_run(engine: &Path, image: &str, name: &str) -> Result<()> {
    let spec =
        json!({ "Image": image, "Cmd": ["true"], "Labels": { LABEL: std::process::id().to_string() } });
    let path = format!("/containers/create?name={name}");
    api_expect(engine, Method::POST, &path, Some(spec), StatusCode::CREATED).await?;
    let path = format!("/containers/{name}/start");
    api_expect(engine, Method::POST, &path, None, StatusCode::NO_CONTENT).await?;
    let path = format!("/containers/{name}/wait");
    api_expect(engine, Method::POST, &path, None, StatusCode::OK).await?;
    let path = format!("/containers/{name}?v=1");
    api_expect(engine, Method::DELETE, &path, None, StatusCode::NO_CONTENT).await?;
    Ok(())
}

/// A request straight to the engine on a fresh connection.
async fn api_expect(
    engine: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
    want: StatusCode,
) -> Result<Value> {
    let mut conn = ApiConn::open(engine).await?;
    let bytes = conn.expect(method, path, body, want).await?;
    if bytes.is_empty() {
        Ok(Value::Null)
    } else {
        json_of(&bytes)
    }
}

fn filter_query(filters: &Value) -> String {
    let mut encoded = String::new();
    for byte in filters.to_string().bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("filters={encoded}")
}

/// The containers, volumes and networks the engine holds with this session's label.
async fn session_resources(engine: &Path, session: &str) -> Result<Vec<String>> {
    let filters = filter_query(&json!({ "label": [format!("{SESSION_LABEL}={session}")] }));
    listed(engine, &filters, |_| true).await
}

/// Resources named by this run (whatever labels they carry).
async fn own_resources(engine: &Path, pid: u32) -> Result<Vec<String>> {
    let prefix = format!("{NAME_PREFIX}{pid}-");
    let filters = filter_query(&json!({ "name": [prefix.clone()] }));
    listed(engine, &filters, |name| name.trim_start_matches('/').starts_with(&prefix)).await
}

/// `kind name` of every container, volume and network that matches `filters` and `keep`.
async fn listed(engine: &Path, filters: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let containers =
        api_expect(engine, Method::GET, &format!("/containers/json?all=1&{filters}"), None, StatusCode::OK)
            .await?;
    for container in containers.as_array().into_iter().flatten() {
        let name = container["Names"][0].as_str().unwrap_or_default();
        if keep(name) {
            found.push(format!(
                "container {} ({})",
                name.trim_start_matches('/'),
                container["State"].as_str().unwrap_or("?")
            ));
        }
    }
    let volumes =
        api_expect(engine, Method::GET, &format!("/volumes?{filters}"), None, StatusCode::OK).await?;
    for volume in volumes["Volumes"].as_array().into_iter().flatten() {
        let name = volume["Name"].as_str().unwrap_or_default();
        if keep(name) {
            found.push(format!("volume {name}"));
        }
    }
    let networks =
        api_expect(engine, Method::GET, &format!("/networks?{filters}"), None, StatusCode::OK).await?;
    for network in networks.as_array().into_iter().flatten() {
        let name = network["Name"].as_str().unwrap_or_default();
        if keep(name) {
            found.push(format!("network {name}"));
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------------
// Cleanup of the soak's own resources (blocking, so it also works in Drop)
// ---------------------------------------------------------------------------------

/// Removes, on drop, whatever of this run's own resources is left: containers with
/// its label or name prefix, volumes and networks with its name prefix.
struct OwnSweep {
    engine: PathBuf,
}

impl Drop for OwnSweep {
    fn drop(&mut self) {
        let removed = sweep_pid(&self.engine, &std::process::id().to_string());
        if removed > 0 {
            println!("removed {removed} resources of this run that were still on the engine");
        }
    }
}

/// Removes resources left by soak runs that were killed (their pid is gone).
async fn sweep_leftovers(engine: &Path) {
    let engine = engine.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        let mut owners: HashSet<String> = HashSet::new();
        let containers = engine_get_blocking(&engine, "/containers/json?all=1").unwrap_or(Value::Null);
        for container in containers.as_array().into_iter().flatten() {
            if let Some(owner) = container["Labels"][LABEL].as_str() {
                owners.insert(owner.to_string());
            }
            if let Some(name) = container["Names"][0].as_str() {
                owners.extend(owner_of(name.trim_start_matches('/')));
            }
        }
        let volumes = engine_get_blocking(&engine, "/volumes").unwrap_or(Value::Null);
        for volume in volumes["Volumes"].as_array().into_iter().flatten() {
            owners.extend(volume["Name"].as_str().and_then(owner_of));
        }
        let networks = engine_get_blocking(&engine, "/networks").unwrap_or(Value::Null);
        for network in networks.as_array().into_iter().flatten() {
            owners.extend(network["Name"].as_str().and_then(owner_of));
        }
        for owner in owners.into_iter().filter(|owner| !is_running(owner)) {
            let removed = sweep_pid(&engine, &owner);
            if removed > 0 {
                println!("removed {removed} resources left by an earlier soak run (pid {owner})");
            }
        }
    })
    .await;
}

/// The pid in `offload-soak-<pid>-...`.
fn owner_of(name: &str) -> Option<String> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let pid = rest.split('-').next()?;
    pid.parse::<u32>().ok().map(|_| pid.to_string())
}

/// Force-removes the containers, volumes and networks of one soak run; returns how many.
fn sweep_pid(engine: &Path, pid: &str) -> usize {
    let prefix = format!("{NAME_PREFIX}{pid}-");
    let mine = |name: &str| name.trim_start_matches('/').starts_with(&prefix);
    let mut removed = 0;
    let containers = engine_get_blocking(engine, "/containers/json?all=1").unwrap_or(Value::Null);
    for container in containers.as_array().into_iter().flatten() {
        let labelled = container["Labels"][LABEL].as_str() == Some(pid);
        let named = container["Names"][0].as_str().is_some_and(mine);
        if let (true, Some(id)) = (labelled || named, container["Id"].as_str()) {
            removed += usize::from(engine_delete_blocking(engine, &format!("/containers/{id}?force=1&v=1")));
        }
    }
    let volumes = engine_get_blocking(engine, "/volumes").unwrap_or(Value::Null);
    for volume in volumes["Volumes"].as_array().into_iter().flatten() {
        if let Some(name) = volume["Name"].as_str().filter(|name| mine(name)) {
            removed += usize::from(engine_delete_blocking(engine, &format!("/volumes/{name}?force=1")));
        }
    }
    let networks = engine_get_blocking(engine, "/networks").unwrap_or(Value::Null);
    for network in networks.as_array().into_iter().flatten() {
        if let Some(name) = network["Name"].as_str().filter(|name| mine(name)) {
            removed += usize::from(engine_delete_blocking(engine, &format!("/networks/{name}")));
        }
    }
    removed
}

/// An HTTP/1.0 exchange with blocking std I/O (the answer is close-delimited, never
/// chunked), so that it works in `Drop`, during a panic, and outside any runtime.
fn engine_blocking(engine: &Path, method: &str, path: &str) -> Result<(String, Vec<u8>)> {
    let mut stream = std::os::unix::net::UnixStream::connect(engine).context("connecting to the engine")?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).context("setting a timeout")?;
    let request = format!("{method} {path} HTTP/1.0\r\nHost: {API_HOST}\r\n\r\n");
    stream.write_all(request.as_bytes()).context("sending a request")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).context("reading the answer")?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of head")?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, answer[split + 4..].to_vec()))
}

fn engine_get_blocking(engine: &Path, path: &str) -> Result<Value> {
    let (status, body) = engine_blocking(engine, "GET", path)?;
    if !status.contains(" 200 ") {
        return Err(format!("GET {path}: {status}").into());
    }
    json_of(&body)
}

fn engine_delete_blocking(engine: &Path, path: &str) -> bool {
    match engine_blocking(engine, "DELETE", path) {
        Ok((status, _)) if status.contains(" 20") => true,
        Ok((status, body)) if !status.contains(" 404 ") => {
            eprintln!("warning: DELETE {path}: {status} {}", String::from_utf8_lossy(&body).trim());
            false
        }
        Ok(_) => false,
        Err(err) => {
            eprintln!("warning: DELETE {path}: {err}");
            false
        }
    }
}

/// Removes temporary directories of killed soak runs.
fn sweep_temp_dirs() {
    let entries = std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten();
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(owner) = owner_of(&name) {
            if !is_running(&owner) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct Sample {
    fds: usize,
    rss_mib: f64,
}

impl Sample {
    fn within(&self, baseline: &Sample, fd_margin: usize, rss_margin_mib: f64) -> bool {
        self.fds <= baseline.fds + fd_margin && self.rss_mib <= baseline.rss_mib + rss_margin_mib
    }
}

fn sample(pid: u32) -> Sample {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0);
    let rss_kib: f64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Sample { fds, rss_mib: rss_kib / 1024.0 }
}

/// How many of the process's fds are unix sockets (for the agent: its connections
/// to the engine, in use or pooled).
fn unix_sockets(pid: u32) -> usize {
    let unix: HashSet<String> = std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(6).map(str::to_string))
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(target.strip_prefix("socket:[")?.trim_end_matches(']').to_string())
        })
        .filter(|inode| unix.contains(inode))
        .count()
}

// ---------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Incident {
    Error,
    Hang,
}

struct Event {
    /// When the op began: a cut between this and `at` may have caused it.
    since: Instant,
    at: Instant,
    kind: Incident,
    op: &'static str,
    what: String,
}

#[derive(Default)]
struct OpStats {
    ok: u64,
    failed: u64,
    millis: Vec<u64>,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    cli: AtomicU64,
    events: Mutex<Vec<Event>>,
    ops: Mutex<BTreeMap<OpKind, OpStats>>,
    /// The controls: milliseconds of each request straight to the engine, and
    /// whether it succeeded.
    controls: Mutex<BTreeMap<&'static str, Vec<(u64, bool)>>>,
}

impl Stats {
    /// Records a failure of an op (or a docker run) that began at `since`.
    fn incident(&self, kind: Incident, op: &'static str, since: Instant, what: String) {
        let event = Event { since, at: Instant::now(), kind, op, what };
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }

    fn op_done(&self, kind: OpKind, ok: bool, took: Duration) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let entry = ops.entry(kind).or_default();
        if ok {
            entry.ok += 1;
            entry.millis.push(took.as_millis() as u64);
        } else {
            entry.failed += 1;
        }
    }

    fn control(&self, what: &'static str, took: Duration, ok: bool) {
        let mut controls = self.controls.lock().unwrap_or_else(|p| p.into_inner());
        controls.entry(what).or_default().push((took.as_millis() as u64, ok));
    }

    fn take_incidents(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn reset(&self) {
        self.requests.store(0, Ordering::SeqCst);
        self.cli.store(0, Ordering::SeqCst);
        self.events.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.controls.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn counts(&self) -> (u64, u64, usize, usize) {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let hangs = events.iter().filter(|e| e.kind == Incident::Hang).count();
        (self.requests.load(Ordering::Relaxed), self.cli.load(Ordering::Relaxed), events.len() - hangs, hangs)
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    let index = ((q * sorted.len() as f64).ceil() as usize).saturating_sub(1);
    sorted.get(index).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------

struct Filled<'a> {
    config: &'a Config,
    stats: &'a Stats,
    cuts: &'a [Instant],
    started: Instant,
    load_elapsed: Duration,
    baseline: [Sample; 2],
    peaks: [Sample; 2],
    after_end: [Sample; 2],
    settled: [Sample; 2],
    settle_waited: Duration,
    sessions_ended: Option<Duration>,
    session_log: &'a str,
    session_ids: Vec<String>,
    leftovers: Vec<String>,
    agent_engine_conns: usize,
    baseline_engine_conns: usize,
    probe: Option<Probe>,
    proxy_log: &'a str,
}

#[derive(Default)]
struct Report {
    engine: String,
    load_start: String,
    load_end: String,
    clients: usize,
    cli_clients: usize,
    load_secs: f64,
    cut_offsets: Vec<f64>,
    requests: u64,
    cli_runs: u64,
    ops: Vec<(OpKind, u64, u64, u64, u64, u64)>,
    /// Controls straight to the engine: what, ok, failed, p50, p99, max (ms).
    controls: Vec<(&'static str, usize, usize, u64, u64, u64)>,
    kill_errors: Vec<(f64, String)>,
    /// Of those: failures that surfaced later than the window, in an op that was
    /// under way at the cut (a delayed consequence; worth reading).
    kill_late: Vec<(f64, String)>,
    unexpected: Vec<(f64, String)>,
    hangs: Vec<(f64, String)>,
    sessions: Vec<String>,
    resumed: usize,
    new_session_warnings: usize,
    sessions_ended: Option<f64>,
    cleaned: Vec<String>,
    baseline: [Sample; 2],
    peaks: [Sample; 2],
    after_end: [Sample; 2],
    settled: [Sample; 2],
    settle_waited: f64,
    back: [bool; 2],
    agent_engine_conns: usize,
    baseline_engine_conns: usize,
    probe: Option<Probe>,
    /// The agent is back to baseline once its idle pooled engine connections are
    /// set aside (known from the probe).
    agent_back_without_pool: Option<(bool, String)>,
    leftovers: Vec<String>,
}

impl Report {
    fn fill(&mut self, f: Filled<'_>) {
        let config = f.config;
        self.clients = config.clients;
        self.cli_clients = config.cli_clients;
        self.load_secs = f.load_elapsed.as_secs_f64();
        self.cut_offsets = f.cuts.iter().map(|cut| cut.duration_since(f.started).as_secs_f64()).collect();
        self.requests = f.stats.requests.load(Ordering::SeqCst);
        self.cli_runs = f.stats.cli.load(Ordering::SeqCst);
        for (kind, op) in f.stats.ops.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            op.millis.sort_unstable();
            let (p50, p99, max) = (
                percentile(&op.millis, 0.5),
                percentile(&op.millis, 0.99),
                op.millis.last().copied().unwrap_or(0),
            );
            self.ops.push((*kind, op.ok, op.failed, p50, p99, max));
        }
        for (what, samples) in f.stats.controls.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let mut millis: Vec<u64> =
                samples.iter().filter(|(_, ok)| *ok).map(|(millis, _)| *millis).collect();
            millis.sort_unstable();
            let failed = samples.len() - millis.len();
            let (p50, p99) = (percentile(&millis, 0.5), percentile(&millis, 0.99));
            self.controls.push((what, millis.len(), failed, p50, p99, millis.last().copied().unwrap_or(0)));
        }
        for event in f.stats.take_incidents() {
            let offset = event.at.saturating_duration_since(f.started).as_secs_f64();
            let line = format!("[{}] {}", event.op, event.what);
            // The cut's doing: the op was under way when the link was cut, or began
            // within the window after a cut (while the proxy reconnected).
            let during = f.cuts.iter().any(|cut| *cut >= event.since && *cut <= event.at);
            let since_cut = f.cuts.iter().filter(|cut| **cut <= event.at).map(|cut| event.at - *cut).min();
            match event.kind {
                Incident::Hang => self.hangs.push((offset, line)),
                Incident::Error if since_cut.is_some_and(|d| d <= config.kill_window) => {
                    self.kill_errors.push((offset, line))
                }
                Incident::Error if during => {
                    self.kill_late.push((offset, line.clone()));
                    self.kill_errors.push((offset, line))
                }
                Incident::Error => self.unexpected.push((offset, line)),
            }
        }
        self.sessions = f.session_ids;
        self.resumed = f.session_log.lines().filter(|l| l.contains("session resumed")).count();
        self.new_session_warnings =
            f.proxy_log.lines().filter(|l| l.contains("the previous session had ended")).count();
        self.sessions_ended = f.sessions_ended.map(|d| d.as_secs_f64());
        self.cleaned = f
            .session_log
            .lines()
            .filter(|line| line.contains("session cleaned up"))
            .map(|line| {
                let get = |name| field(line, name).unwrap_or_else(|| "?".into());
                format!(
                    "{}: {} containers, {} volumes, {} networks, {} images",
                    get("session"),
                    get("containers"),
                    get("volumes"),
                    get("networks"),
                    get("images")
                )
            })
            .collect();
        self.baseline = f.baseline;
        self.peaks = f.peaks;
        self.after_end = f.after_end;
        self.settled = f.settled;
        self.settle_waited = f.settle_waited.as_secs_f64();
        for i in 0..2 {
            self.back[i] = f.settled[i].within(&f.baseline[i], config.fd_margin, config.rss_margin_mib);
        }
        self.agent_engine_conns = f.agent_engine_conns;
        self.baseline_engine_conns = f.baseline_engine_conns;
        self.agent_back_without_pool = f.probe.as_ref().map(|probe| {
            let reusable = probe.before.saturating_sub(probe.not_reused());
            let after = f.settled[1].fds.saturating_sub(reusable);
            let base = f.baseline[1].fds.saturating_sub(f.baseline_engine_conns);
            let rss_growth = f.settled[1].rss_mib - f.baseline[1].rss_mib;
            let back = probe.not_reused() == 0
                && after <= base + config.fd_margin
                && rss_growth <= config.rss_margin_mib;
            let detail = format!(
                "fds other than reusable engine conns {base} -> {after}; RSS {rss_growth:+.1} MiB \
                 (the idle conns' buffers count here)"
            );
            (back, detail)
        });
        self.probe = f.probe;
        self.leftovers = f.leftovers;
    }

    fn failures(&self, config: &Config) -> Vec<String> {
        let mut failures = Vec::new();
        if !self.hangs.is_empty() {
            failures.push(format!("{} hangs", self.hangs.len()));
        }
        if !self.unexpected.is_empty() {
            failures.push(format!("{} unexpected errors", self.unexpected.len()));
        }
        if !self.leftovers.is_empty() {
            failures.push(format!("{} resources of the session left on the engine", self.leftovers.len()));
        }
        if self.sessions_ended.is_none() {
            failures.push("the session did not end by itself".to_string());
        }
        if let Some(probe) = &self.probe {
            if probe.not_reused() > 0 {
                failures.push(format!(
                    "{} engine connections of the agent were lost (fd leak)",
                    probe.not_reused()
                ));
            }
            if !probe.session_ended || probe.leftovers > 0 {
                failures.push("the pool probe's session did not end cleanly".to_string());
            }
        }
        if config.strict {
            if !self.back[0] {
                failures.push("proxy fds/RSS did not return to baseline".to_string());
            }
            if !self.agent_back_without_pool.as_ref().map_or(self.back[1], |(back, _)| *back) {
                failures.push("agent fds/RSS did not return to baseline".to_string());
            }
        }
        failures
    }

    fn print(&self, config: &Config) {
        let limit = |list: &[(f64, String)], max: usize| {
            for (offset, line) in list.iter().take(max) {
                println!("    {offset:7.1} s  {}", shorten(line, 200));
            }
            if list.len() > max {
                println!("    ... and {} more", list.len() - max);
            }
        };
        println!();
        if !self.kill_errors.is_empty() {
            println!(
                "errors of ops cut in flight, or within {:?} after a cut (expected):",
                config.kill_window
            );
            limit(&self.kill_errors, 8);
        }
        if !self.kill_late.is_empty() {
            println!(
                "of those, failures that surfaced more than {:?} after the cut, in an op under way at it:",
                config.kill_window
            );
            limit(&self.kill_late, 12);
        }
        if !self.unexpected.is_empty() {
            println!("UNEXPECTED errors:");
            limit(&self.unexpected, 30);
        }
        if !self.hangs.is_empty() {
            println!("HANGS:");
            limit(&self.hangs, 30);
        }
        if !self.leftovers.is_empty() {
            println!("LEFT ON THE ENGINE:");
            for item in self.leftovers.iter().take(30) {
                println!("    {item}");
            }
        }

        println!();
        println!("soak summary");
        println!(
            "  engine {} · load average {} at the start, {} at the end · seed {}",
            self.engine, self.load_start, self.load_end, config.seed
        );
        println!("  op mix (API clients):");
        println!(
            "    {:<38} {:>7} {:>7} {:>8} {:>8} {:>8}",
            "op", "ok", "failed", "p50 ms", "p99 ms", "max ms"
        );
        for (kind, ok, failed, p50, p99, max) in &self.ops {
            println!("    {:<38} {ok:>7} {failed:>7} {p50:>8} {p99:>8} {max:>8}", kind.name());
        }
        for (what, ok, failed, p50, p99, max) in &self.controls {
            println!("    {what:<38} {ok:>7} {failed:>7} {p50:>8} {p99:>8} {max:>8}");
        }
        let cuts = self.cut_offsets.iter().map(|o| format!("{o:.1}")).collect::<Vec<_>>().join(", ");
        let mut rows: Vec<(String, String)> = vec![
            (
                "clients".into(),
                format!(
                    "{} API (hyper, HTTP/1.1; at most {} runs + {} execs at once) + {} docker CLI 28 loops",
                    self.clients, config.run_slots, config.exec_slots, self.cli_clients
                ),
            ),
            (
                "duration".into(),
                format!(
                    "{:.1} s of load (asked {} s), then drain and expiry",
                    self.load_secs, config.seconds
                ),
            ),
            (
                "link cuts".into(),
                format!(
                    "{} at {} s",
                    self.cut_offsets.len(),
                    if cuts.is_empty() { "-".into() } else { cuts }
                ),
            ),
            (
                "requests done".into(),
                format!(
                    "{} API requests answered as expected + {} docker runs",
                    self.requests, self.cli_runs
                ),
            ),
            (
                "errors caused by link kills".into(),
                format!(
                    "{} ({} within {} ms of a cut, {} later in an op under way at the cut)",
                    self.kill_errors.len(),
                    self.kill_errors.len() - self.kill_late.len(),
                    config.kill_window.as_millis(),
                    self.kill_late.len()
                ),
            ),
            ("unexpected errors".into(), self.unexpected.len().to_string()),
            (
                "hangs".into(),
                format!("{} (no answer within {} s)", self.hangs.len(), config.request_timeout.as_secs()),
            ),
            (
                "sessions".into(),
                format!(
                    "{} started ({}), {} resumes, {} proxy warnings of a lost session",
                    self.sessions.len(),
                    self.sessions.join(", "),
                    self.resumed,
                    self.new_session_warnings
                ),
            ),
            (
                "session end".into(),
                match self.sessions_ended {
                    Some(secs) => format!(
                        "{secs:.1} s after the last client (idle {} s + grace {} s)",
                        config.idle_timeout.as_secs(),
                        config.grace.as_secs()
                    ),
                    None => format!("NOT ended within {:.0} s", config.expire_wait.as_secs_f64()),
                },
            ),
            (
                "agent cleanup".into(),
                if self.cleaned.is_empty() { "-".into() } else { self.cleaned.join("; ") },
            ),
        ];
        for (i, name) in ["proxy", "agent"].into_iter().enumerate() {
            let (b, p, e, s) = (self.baseline[i], self.peaks[i], self.after_end[i], self.settled[i]);
            let extra = if i == 1 {
                format!(" ({} of them engine conns)", self.agent_engine_conns)
            } else {
                String::new()
            };
            rows.push((
                format!("{} fds base/peak/end/after", name),
                format!("{} / {} / {} / {}{extra}", b.fds, p.fds, e.fds, s.fds),
            ));
            rows.push((
                format!("{} RSS MiB base/peak/end/after", name),
                format!("{:.1} / {:.1} / {:.1} / {:.1}", b.rss_mib, p.rss_mib, e.rss_mib, s.rss_mib),
            ));
            rows.push((
                format!("{} back to baseline?", name),
                format!(
                    "{} (margin {} fds, {} MiB; after = {:.1} s past the session end)",
                    if self.back[i] { "yes" } else { "NO" },
                    config.fd_margin,
                    config.rss_margin_mib,
                    self.settle_waited
                ),
            ));
        }
        if let Some(probe) = &self.probe {
            rows.push((
                "agent engine conns base/after".into(),
                format!(
                    "{} / {} (connections to the engine, in use or idle)",
                    self.baseline_engine_conns, self.agent_engine_conns
                ),
            ));
            rows.push((
                "pool probe".into(),
                format!(
                    "{} concurrent 3 s requests -> at most {} engine conns, so {} not reusable{}",
                    probe.concurrent,
                    probe.peak,
                    probe.not_reused(),
                    if probe.failed > 0 {
                        format!(" ({} probe requests failed)", probe.failed)
                    } else {
                        String::new()
                    }
                ),
            ));
            if let Some((back, detail)) = &self.agent_back_without_pool {
                rows.push((
                    "agent back, idle pool aside?".into(),
                    format!("{} ({detail})", if *back { "yes" } else { "NO" }),
                ));
            }
        }
        let names = if self.leftovers.is_empty() {
            String::new()
        } else {
            format!(": {}", self.leftovers.join(", "))
        };
        rows.push(("left on the engine".into(), format!("{} (must be 0){names}", self.leftovers.len())));
        let failures = self.failures(config);
        rows.push((
            "verdict".into(),
            if failures.is_empty() { "PASS".into() } else { format!("FAIL: {}", failures.join(", ")) },
        ));
        let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        println!("  {}", "-".repeat(width + 40));
        for (name, value) in rows {
            println!("  {name:<width$} | {value}");
        }
    }
}

fn shorten(line: &str, max: usize) -> String {
    let line = line.replace('\n', " ");
    if line.chars().count() <= max {
        line
    } else {
        format!("{}…", line.chars().take(max).collect::<String>())
    }
}
