//! Benchmark harness for the transparent proxy (`offload proxy`).
//!
//! Every figure is measured side by side in one run: the engine socket itself
//! ("direct") and the same engine through the proxy ("offload"), interleaved round by
//! round so that the drift of this shared, noisy box hits both variants equally.
//! See `benches/README.md` for what each row means and how to tune the run.
//!
//! Run with `cargo bench --bench proxy`. Without `--bench` (that is, when
//! `cargo test --all-targets` runs this target) it only prints how to run it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::CONTENT_TYPE;
use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use common::engine::{
    api_expect, ensure_image, expect_status, open_connection, request, sweep_leftovers, ApiClient, Container,
};
use common::procfs::{load_average, process_tree, stat_fields};
use common::report::{Columns, Paired, Report, Row, Style, Target};
use common::stats::{megabytes_per_sec, micros, Percentiles};
use common::upload::{verify_upload, TarUpload};
use common::{env_or, is_running, run_bounded, sections, within, Context, Result, API_HOST, DEFAULT_IMAGE};

/// Label put on every container the bench creates; its value is the bench's pid, so
/// a later run can tell leftovers of a killed run from containers of a live one.
const LABEL: &str = "offload-bench.pid";
/// Prefix of the bench's temporary directory, followed by the bench's pid.
const TEMP_PREFIX: &str = "offload-bench-";
/// Name of the one file inside the uploaded tar.
const BULK_FILE: &str = "offload-bench.bin";
/// How long the proxy gets to start answering `/_ping`, and to exit after SIGTERM.
const PROXY_START_TIMEOUT: Duration = Duration::from_secs(15);
const PROXY_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long RSS is left to settle before it is read (lazy frees, deferred tasks).
const SETTLE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------

/// What stands behind the "offload" variant.
enum ProxyKind {
    /// A binary with the `offload proxy` command line (by default the one cargo built).
    Offload(PathBuf),
    /// `socat` relaying the socket: a stand-in to develop the harness against.
    Socat,
}

/// The phases of the bench, each selectable on its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Memory,
    Latency,
    Logs,
    Bulk,
}

impl Section {
    const ALL: [Section; 4] = [Section::Memory, Section::Latency, Section::Logs, Section::Bulk];

    fn parse(name: &str) -> Result<Section> {
        match name {
            "memory" => Ok(Section::Memory),
            "latency" => Ok(Section::Latency),
            "logs" => Ok(Section::Logs),
            "bulk" => Ok(Section::Bulk),
            other => {
                Err(format!("unknown section {other:?} (expected memory, latency, logs or bulk)").into())
            }
        }
    }
}

struct Config {
    engine: PathBuf,
    image: String,
    proxy: ProxyKind,
    sections: Vec<Section>,
    /// Latency: measured rounds, discarded warm-up rounds, requests per round per variant.
    rounds: usize,
    warmup_rounds: usize,
    requests: usize,
    /// Bulk: payload per upload, measured uploads per variant, warm-up payload.
    bulk_mib: u64,
    bulk_rounds: usize,
    bulk_warmup_mib: u64,
    /// Logs: bytes the container writes (before line breaks), line width, rounds.
    logs_mb: u64,
    logs_line: u64,
    logs_rounds: usize,
    /// Memory: idle hijacked streams opened through the proxy.
    streams: usize,
    /// Hard cap on the whole run.
    timeout: Duration,
    /// Exit with status 2 when a target is missed.
    strict: bool,
}

impl Config {
    fn from_env(args: &[String]) -> Result<Config> {
        Ok(Config {
            engine: PathBuf::from(env_or("OFFLOAD_BENCH_ENGINE", "/var/run/docker.sock".to_string())?),
            image: env_or("OFFLOAD_BENCH_IMAGE", DEFAULT_IMAGE.to_string())?,
            proxy: proxy_kind()?,
            sections: sections(args, "OFFLOAD_BENCH_ONLY", &Section::ALL, Section::parse)?,
            rounds: env_or("OFFLOAD_BENCH_ROUNDS", 6)?,
            warmup_rounds: env_or("OFFLOAD_BENCH_WARMUP_ROUNDS", 1)?,
            requests: env_or("OFFLOAD_BENCH_REQUESTS", 2000)?,
            bulk_mib: env_or("OFFLOAD_BENCH_BULK_MIB", 1024)?,
            bulk_rounds: env_or("OFFLOAD_BENCH_BULK_ROUNDS", 4)?,
            bulk_warmup_mib: env_or("OFFLOAD_BENCH_BULK_WARMUP_MIB", 64)?,
            logs_mb: env_or("OFFLOAD_BENCH_LOGS_MB", 32)?,
            logs_line: env_or("OFFLOAD_BENCH_LOGS_LINE", 100)?,
            logs_rounds: env_or("OFFLOAD_BENCH_LOGS_ROUNDS", 4)?,
            streams: env_or("OFFLOAD_BENCH_STREAMS", 1000)?,
            timeout: Duration::from_secs(env_or("OFFLOAD_BENCH_TIMEOUT_S", 600)?),
            strict: env_or("OFFLOAD_BENCH_STRICT", 0u8)? != 0,
        })
        .and_then(Config::validated)
    }

    /// Rejects settings that would make a phase meaningless (no samples to compare).
    fn validated(self) -> Result<Config> {
        let positive = [
            ("OFFLOAD_BENCH_ROUNDS", self.rounds as u64),
            ("OFFLOAD_BENCH_REQUESTS", self.requests as u64),
            ("OFFLOAD_BENCH_BULK_MIB", self.bulk_mib),
            ("OFFLOAD_BENCH_BULK_ROUNDS", self.bulk_rounds as u64),
            ("OFFLOAD_BENCH_LOGS_MB", self.logs_mb),
            ("OFFLOAD_BENCH_LOGS_LINE", self.logs_line),
            ("OFFLOAD_BENCH_LOGS_ROUNDS", self.logs_rounds as u64),
            ("OFFLOAD_BENCH_STREAMS", self.streams as u64),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be at least 1").into());
            }
        }
        Ok(self)
    }

    fn runs(&self, section: Section) -> bool {
        self.sections.contains(&section)
    }

    fn proxy_label(&self) -> String {
        match &self.proxy {
            ProxyKind::Offload(path) => format!("offload ({})", path.display()),
            ProxyKind::Socat => "socat stand-in (NOT the offload proxy)".to_string(),
        }
    }
}

fn proxy_kind() -> Result<ProxyKind> {
    let choice = std::env::var("OFFLOAD_BENCH_PROXY").unwrap_or_default();
    Ok(match choice.as_str() {
        "" | "offload" => ProxyKind::Offload(PathBuf::from(env!("CARGO_BIN_EXE_offload"))),
        "socat" => ProxyKind::Socat,
        // Any other value is a path to a binary with the same command line, for
        // example a release build of another branch.
        path => ProxyKind::Offload(PathBuf::from(path)),
    })
}

// ---------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and a test
    // run must not spend minutes benchmarking.
    if !args.iter().any(|arg| arg == "--bench") {
        println!("proxy bench: skipped; run it with `cargo bench --bench proxy`");
        return ExitCode::SUCCESS;
    }
    let config = match Config::from_env(&args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("proxy bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("building a tokio runtime");

    let mut report = Report::new(REPORT_STYLE);
    let outcome =
        runtime.block_on(run_bounded(config.timeout, "OFFLOAD_BENCH_TIMEOUT_S", run(&config, &mut report)));
    report.print(&format!("offload proxy bench: {}", config.proxy_label()));
    report.exit_code(outcome, config.strict, "proxy bench")
}

async fn run(config: &Config, report: &mut Report) -> Result<()> {
    report.note(format!("proxy under test: {}", config.proxy_label()));
    report.note(format!("load average at the start: {}", load_average()));
    // Each stream costs the bench two fds (direct and proxied) and the proxy at least
    // two; raise the limit before the proxy is spawned so that it inherits it.
    let fds = raise_nofile_limit(2 * config.streams as u64 + 256)?;
    report.note(format!("RLIMIT_NOFILE (bench and proxy): {fds}"));

    let engine = config.engine.clone();
    describe_engine(&engine, report).await?;
    ensure_image(&engine, &config.image).await?;
    sweep_leftovers(&engine, LABEL, "bench").await?;
    sweep_temp_dirs();

    // Declared before the proxy so that it is dropped after it: the socket lives here.
    let dir = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .tempdir()
        .context("creating a temporary directory")?;
    let mut proxy = ProxyProcess::spawn(config, dir.path())?;
    proxy.wait_ready().await?;
    report.socket_mode(&proxy.socket)?;

    let sockets = Sockets { direct: engine, offload: proxy.socket.clone() };
    if let Err(err) = run_phases(config, &sockets, &proxy, report).await {
        // A failed request is often the proxy having died: say so, with its log.
        return Err(match proxy.exited()? {
            Some(status) => {
                format!("{err}\nthe proxy exited ({status}); its log:\n{}", proxy.log_tail()).into()
            }
            None => err,
        });
    }
    report.single("proxy RSS at the end (MiB)", mib(tree_rss_kib(proxy.pid())), "-", None);
    report.single(
        "proxy peak RSS, VmHWM (MiB)",
        mib(status_kib(proxy.pid(), "VmHWM").unwrap_or(0)),
        "-",
        None,
    );
    report.shutdown(proxy.stop(), &proxy.socket);
    Ok(())
}

async fn run_phases(
    config: &Config,
    sockets: &Sockets,
    proxy: &ProxyProcess,
    report: &mut Report,
) -> Result<()> {
    idle_rss(sockets, proxy, report).await?;
    // Memory first: after bulk the allocator holds freed pages that new streams would
    // reuse, which would hide their cost.
    if config.runs(Section::Memory) {
        hijack_phase(config, sockets, proxy, report).await?;
    }
    if config.runs(Section::Latency) {
        latency_phase(config, sockets, report).await?;
    }
    if config.runs(Section::Logs) {
        logs_phase(config, sockets, proxy, report).await?;
    }
    if config.runs(Section::Bulk) {
        bulk_phase(config, sockets, proxy, report).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Variants
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Direct,
    Offload,
}

impl Variant {
    fn index(self) -> usize {
        self as usize
    }

    /// The order of the two variants in a round: alternated (A B, B A, ...) so that
    /// neither always runs right after the other's warm caches.
    fn order(round: usize) -> [Variant; 2] {
        if round % 2 == 0 {
            [Variant::Direct, Variant::Offload]
        } else {
            [Variant::Offload, Variant::Direct]
        }
    }
}

struct Sockets {
    direct: PathBuf,
    offload: PathBuf,
}

impl Sockets {
    fn get(&self, variant: Variant) -> &Path {
        match variant {
            Variant::Direct => &self.direct,
            Variant::Offload => &self.offload,
        }
    }
}

// ---------------------------------------------------------------------------------
// Phase: idle RSS
// ---------------------------------------------------------------------------------

async fn idle_rss(sockets: &Sockets, proxy: &ProxyProcess, report: &mut Report) -> Result<()> {
    // "Idle" means after it has served something, so that lazily built state
    // (upstream connection, buffers) is counted.
    let mut client = ApiClient::connect(&sockets.offload).await?;
    for _ in 0..10 {
        client.get("/_ping").await?;
    }
    client.get("/containers/json").await?;
    drop(client);
    tokio::time::sleep(SETTLE / 4).await;
    let rss = tree_rss_kib(proxy.pid());
    report.single("proxy idle RSS (MiB)", mib(rss), "<= 10", Some(rss <= 10 * 1024));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Phase: latency
// ---------------------------------------------------------------------------------

async fn latency_phase(config: &Config, sockets: &Sockets, report: &mut Report) -> Result<()> {
    const PATHS: [&str; 2] = ["/_ping", "/containers/json"];
    // One keep-alive connection per variant for the whole phase, as a client would.
    let mut clients =
        [ApiClient::connect(&sockets.direct).await?, ApiClient::connect(&sockets.offload).await?];
    let mut p50 = [Paired::default(), Paired::default()];
    let mut p99 = [Paired::default(), Paired::default()];
    for round in 0..config.warmup_rounds + config.rounds {
        let measured = round >= config.warmup_rounds;
        let mut figures = [[Percentiles::default(); 2]; 2];
        for variant in Variant::order(round) {
            let client = &mut clients[variant.index()];
            for (p, path) in PATHS.iter().enumerate() {
                let samples = within(
                    Duration::from_secs(120),
                    format!("{} round {round}", path),
                    client.time_gets(path, config.requests),
                )
                .await?;
                figures[p][variant.index()] = Percentiles::of(samples);
            }
        }
        if measured {
            for p in 0..PATHS.len() {
                let [direct, offload] = figures[p];
                p50[p].push(direct.p50, offload.p50);
                p99[p].push(direct.p99, offload.p99);
                progress(
                    &format!("latency round {round} {}", PATHS[p]),
                    format!("p50 {} / {} µs", micros(direct.p50), micros(offload.p50)),
                );
            }
        }
    }
    for (p, path) in PATHS.iter().enumerate() {
        report.paired(&format!("GET {path} p50 (µs)"), &p50[p], micros, Target::AtMost(1.3));
        report.paired(&format!("GET {path} p99 (µs)"), &p99[p], micros, Target::None);
    }
    report.note(format!(
        "latency: {} sequential requests per path per variant per round, {} rounds (+{} warm-up)",
        config.requests, config.rounds, config.warmup_rounds
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Phase: stream throughput (logs)
// ---------------------------------------------------------------------------------

async fn logs_phase(
    config: &Config,
    sockets: &Sockets,
    proxy: &ProxyProcess,
    report: &mut Report,
) -> Result<()> {
    let container = logs_container(config, &sockets.direct).await?;
    let path = format!("/containers/{}/logs?follow=1&stdout=1", container.id);

    // The warm-up round reads with both variants too; its direct byte count is the
    // reference every later read (either variant) must match exactly.
    let mut expected = None;
    let mut rates = Paired::default();
    let mut proxy_cpu = 0.0;
    let mut proxied_bytes = 0u64;
    for round in 0..1 + config.logs_rounds {
        let mut rate = [0.0; 2];
        for variant in Variant::order(round) {
            let cpu_before = tree_cpu_secs(proxy.pid());
            let (elapsed, bytes) =
                within(Duration::from_secs(300), "reading logs", read_stream(sockets.get(variant), &path))
                    .await?;
            if variant == Variant::Offload && round > 0 {
                proxy_cpu += tree_cpu_secs(proxy.pid()) - cpu_before;
                proxied_bytes += bytes;
            }
            check_same_bytes(&mut expected, bytes, variant)?;
            rate[variant.index()] = megabytes_per_sec(bytes, elapsed);
        }
        if round > 0 {
            rates.push(rate[0], rate[1]);
            progress(&format!("logs round {round}"), format!("{:.1} / {:.1} MB/s", rate[0], rate[1]));
        }
    }
    report.paired("logs follow, stopped container (MB/s)", &rates, |v| format!("{v:.1}"), Target::None);
    report.single(
        "proxy CPU during logs (CPU-s per GB)",
        format!("{:.2}", proxy_cpu / (proxied_bytes as f64 / 1e9)),
        "-",
        None,
    );
    report.note(format!(
        "logs: {} MB in {}-byte lines ({} bytes on the wire per read), {} rounds (+1 warm-up)",
        config.logs_mb,
        config.logs_line,
        expected.unwrap_or(0),
        config.logs_rounds
    ));
    Ok(())
}

/// A container that wrote its whole output and exited, so that `logs?follow=1`
/// is a pure read that ends by itself.
async fn logs_container(config: &Config, engine: &Path) -> Result<Container> {
    let bytes = config.logs_mb * 1_000_000;
    let script = format!("head -c {bytes} /dev/zero | tr '\\0' a | fold -w {}", config.logs_line);
    // The engine's default log rotation (10 MB here) would throw most of it away;
    // json-file stores roughly 1.6x the raw bytes for 100-byte lines.
    let max_size = format!("{}m", config.logs_mb * 4 + 16);
    let container = Container::create(
        engine,
        LABEL,
        json!({
            "Image": config.image,
            "Cmd": ["sh", "-c", script],
            "HostConfig": {"LogConfig": {
                "Type": "json-file",
                "Config": {"max-size": max_size, "max-file": "1"}
            }},
        }),
    )
    .await?;
    container.start().await?;
    let status = within(Duration::from_secs(300), "waiting for the log writer", container.wait()).await?;
    if status != 0 {
        return Err(format!("the log writer exited with status {status}").into());
    }
    Ok(container)
}

fn check_same_bytes(expected: &mut Option<u64>, bytes: u64, variant: Variant) -> Result<()> {
    match *expected {
        None if bytes == 0 => Err("logs returned no bytes".into()),
        None => {
            *expected = Some(bytes);
            Ok(())
        }
        Some(want) if want != bytes => {
            Err(format!("logs via {} returned {bytes} bytes, expected {want}", variant_name(variant)).into())
        }
        Some(_) => Ok(()),
    }
}

/// Reads a streaming response to its end; returns the time from sending the request
/// to the last byte, and the number of body bytes.
async fn read_stream(socket: &Path, path: &str) -> Result<(Duration, u64)> {
    let mut sender = open_connection::<Empty<Bytes>>(socket).await?;
    let started = Instant::now();
    let response = sender
        .send_request(request(Method::GET, path, Empty::new())?)
        .await
        .context(format!("GET {path}"))?;
    expect_status(&response, StatusCode::OK, path)?;
    let mut body = response.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.context(format!("reading the body of {path}"))?.into_data() {
            bytes += data.len() as u64;
        }
    }
    Ok((started.elapsed(), bytes))
}

// ---------------------------------------------------------------------------------
// Phase: bulk upload
// ---------------------------------------------------------------------------------

async fn bulk_phase(
    config: &Config,
    sockets: &Sockets,
    proxy: &ProxyProcess,
    report: &mut Report,
) -> Result<()> {
    // Created, never started: the archive endpoint writes into its filesystem anyway.
    let container =
        Container::create(&sockets.direct, LABEL, json!({"Image": config.image, "Cmd": ["true"]})).await?;
    let warmup = config.bulk_warmup_mib << 20;
    for variant in Variant::order(0) {
        upload(sockets.get(variant), &container.id, warmup).await?;
    }

    let size = config.bulk_mib << 20;
    let mut rates = Paired::default();
    let mut proxy_cpu = 0.0;
    let mut proxied_bytes = 0u64;
    for round in 0..config.bulk_rounds {
        let mut rate = [0.0; 2];
        for variant in Variant::order(round) {
            flush_dirty_pages().await?;
            let cpu_before = tree_cpu_secs(proxy.pid());
            let (elapsed, body_bytes) = upload(sockets.get(variant), &container.id, size).await?;
            if variant == Variant::Offload {
                proxy_cpu += tree_cpu_secs(proxy.pid()) - cpu_before;
                proxied_bytes += body_bytes;
            }
            // Outside the timing: did the whole file arrive?
            verify_upload(&sockets.direct, &container.id, BULK_FILE, size).await?;
            rate[variant.index()] = megabytes_per_sec(body_bytes, elapsed);
        }
        rates.push(rate[0], rate[1]);
        progress(&format!("bulk round {}", round + 1), format!("{:.0} / {:.0} MB/s", rate[0], rate[1]));
    }
    report.paired("archive PUT upload, chunked (MB/s)", &rates, |v| format!("{v:.0}"), Target::AtLeast(0.9));
    report.single(
        "proxy CPU during upload (CPU-s per GB)",
        format!("{:.2}", proxy_cpu / (proxied_bytes as f64 / 1e9)),
        "-",
        None,
    );
    report.note(format!(
        "bulk: {} MiB of random bytes in one tar entry per upload, {} rounds (+{} MiB warm-up)",
        config.bulk_mib, config.bulk_rounds, config.bulk_warmup_mib
    ));
    Ok(())
}

/// Writes back the previous upload's dirty pages before the next one is timed, so that
/// no variant pays for the other's 1 GiB of writeback.
async fn flush_dirty_pages() -> Result<()> {
    let status = tokio::process::Command::new("sync").status().await.context("sync")?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("sync failed: {status}").into())
    }
}

/// Streams a tar holding one `size`-byte file of random bytes to the container's
/// /tmp. Returns the time from sending the request to the complete response, and
/// the number of body bytes sent.
async fn upload(socket: &Path, id: &str, size: u64) -> Result<(Duration, u64)> {
    let body = TarUpload::new(BULK_FILE, size);
    let body_bytes = body.total_len();
    let path = format!("/containers/{id}/archive?path=/tmp");
    // No Content-Length and no size hint: hyper sends the body chunked, as the CLI does.
    let mut request = request(Method::PUT, &path, body)?;
    request.headers_mut().insert(CONTENT_TYPE, "application/x-tar".parse().expect("static header value"));
    let limit = Duration::from_secs(120.max(size / 10_000_000));
    let mut sender = open_connection::<TarUpload>(socket).await?;
    let started = Instant::now();
    let send = async {
        let response = sender.send_request(request).await.context(format!("PUT {path}"))?;
        expect_status(&response, StatusCode::OK, &path)?;
        response.into_body().collect().await.context("reading the upload's answer")?;
        Ok(())
    };
    within(limit, "uploading", send).await?;
    Ok((started.elapsed(), body_bytes))
}

// ---------------------------------------------------------------------------------
// Phase: memory per idle hijacked stream
// ---------------------------------------------------------------------------------

async fn hijack_phase(
    config: &Config,
    sockets: &Sockets,
    proxy: &ProxyProcess,
    report: &mut Report,
) -> Result<()> {
    // `cat` with an open stdin never exits by itself and echoes what a stream sends.
    let container = Container::create(
        &sockets.direct,
        LABEL,
        json!({"Image": config.image, "Cmd": ["cat"], "OpenStdin": true, "StdinOnce": false}),
    )
    .await?;
    container.start().await?;

    tokio::time::sleep(SETTLE).await;
    let (rss_before, fds_before) = (tree_rss_kib(proxy.pid()), tree_fds(proxy.pid()));

    // Direct streams are opened too, interleaved, only to compare setup times; they
    // touch the engine, not the proxy, so they do not disturb its RSS.
    let mut streams: [Vec<UnixStream>; 2] = [Vec::new(), Vec::new()];
    let mut setup: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..config.streams {
        for variant in Variant::order(i) {
            let started = Instant::now();
            let stream = within(
                Duration::from_secs(10),
                format!("attach #{i} via {}", variant_name(variant)),
                open_attach(sockets.get(variant), &container.id),
            )
            .await?;
            setup[variant.index()].push(started.elapsed().as_nanos() as u64);
            streams[variant.index()].push(stream);
        }
    }

    tokio::time::sleep(SETTLE).await;
    let (rss_with, fds_with) = (tree_rss_kib(proxy.pid()), tree_fds(proxy.pid()));
    // After the RSS reading: the echo wakes every stream (cat's output goes to all).
    let proxied = streams[Variant::Offload.index()].first_mut().ok_or("no proxied stream was opened")?;
    within(Duration::from_secs(10), "echo through a proxied attach", echo(proxied)).await?;

    drop(streams);
    let fds_after = wait_for_fds(proxy.pid(), fds_before, Duration::from_secs(10)).await;
    let rss_after = tree_rss_kib(proxy.pid());

    let per_stream = (rss_with as f64 - rss_before as f64) / config.streams as f64;
    report.single(
        &format!("proxy RSS per idle attach stream, n={} (KiB)", config.streams),
        format!("{per_stream:.1}"),
        "<= 16",
        Some(per_stream <= 16.0),
    );
    report.single(
        "proxy RSS before / with streams / after close (MiB)",
        format!("{} / {} / {}", mib(rss_before), mib(rss_with), mib(rss_after)),
        "-",
        None,
    );
    report.single(
        "proxy open fds before / with streams / after close",
        format!("{fds_before} / {fds_with} / {fds_after}"),
        "after = before",
        Some(fds_after <= fds_before),
    );
    let [direct, offload] = setup.map(Percentiles::of);
    report.row(Row {
        metric: "attach setup to 101, p50 (µs)".to_string(),
        baseline: micros(direct.p50),
        figure: micros(offload.p50),
        ratio: format!("{:.2}", offload.p50 / direct.p50),
        target: "-".to_string(),
        ok: None,
    });
    Ok(())
}

/// Opens `POST /attach` with an upgrade and returns the hijacked connection.
async fn open_attach(socket: &Path, id: &str) -> Result<UnixStream> {
    let mut stream =
        UnixStream::connect(socket).await.context(format!("connecting to {}", socket.display()))?;
    let request = format!(
        "POST /containers/{id}/attach?stream=1&stdin=1&stdout=1 HTTP/1.1\r\n\
         Host: {API_HOST}\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.context("sending attach")?;
    let head = read_head(&mut stream).await?;
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("attach answered {status:?}, expected 101").into());
    }
    Ok(stream)
}

/// Reads a response head. It may read past the blank line, which is harmless here:
/// an idle `cat` sends nothing until a stream writes to it.
async fn read_head(stream: &mut UnixStream) -> Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.context("reading the attach answer")?;
        if n == 0 || head.len() > 16 * 1024 {
            return Err("attach: connection closed before a complete response head".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Writes a line into the container's stdin and waits for `cat` to echo it back.
async fn echo(stream: &mut UnixStream) -> Result<()> {
    const TOKEN: &[u8] = b"offload-bench-echo";
    stream.write_all(b"offload-bench-echo\n").await.context("writing to attach")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(TOKEN.len()).any(|w| w == TOKEN) {
        let n = stream.read(&mut buf).await.context("reading attach output")?;
        if n == 0 {
            return Err("attach closed before the echo arrived".into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// Waits until the proxy has closed the fds of the streams the bench closed; returns
/// the count it ended with (so a leak shows as a higher number, not a hang).
async fn wait_for_fds(pid: u32, target: usize, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let fds = tree_fds(pid);
        if fds <= target || Instant::now() >= deadline {
            return fds;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------
// A minimal Engine API client
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
    Ok(())
}

/// Removes temporary directories (socket, proxy log) of killed bench runs.
fn sweep_temp_dirs() {
    let entries = std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten();
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().unwrap_or_default();
        if !is_running(owner) {
            // Best effort: a directory we cannot remove is only litter.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

// ---------------------------------------------------------------------------------
// Guards: containers and the proxy process
// ---------------------------------------------------------------------------------

/// The proxy (or its stand-in) as a child process; stopped with SIGTERM on drop.
struct ProxyProcess {
    child: Option<Child>,
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
}

impl ProxyProcess {
    fn spawn(config: &Config, dir: &Path) -> Result<ProxyProcess> {
        let socket = dir.join("offload.sock");
        let log = dir.join("proxy.log");
        // If the bench is killed outright (SIGKILL, no guards run), the kernel still
        // sends the proxy SIGTERM (util-linux `setpriv --pdeathsig`), so it never
        // outlives the bench.
        let mut command = Command::new("setpriv");
        command.args(["--pdeathsig", "TERM", "--"]);
        match &config.proxy {
            ProxyKind::Offload(binary) => {
                command
                    .arg(binary)
                    .arg("proxy")
                    .arg("--listen")
                    .arg(format!("unix://{}", socket.display()))
                    .arg("--docker")
                    .arg(format!("unix://{}", config.engine.display()));
            }
            ProxyKind::Socat => {
                command
                    .arg("socat")
                    .arg(format!("UNIX-LISTEN:{},fork,mode=600", socket.display()))
                    .arg(format!("UNIX-CONNECT:{}", config.engine.display()));
            }
        }
        let output = std::fs::File::create(&log).context("creating the proxy log")?;
        let errors = output.try_clone().context("sharing the proxy log")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn()
            .context(format!("starting {}", config.proxy_label()))?;
        Ok(ProxyProcess { pid: child.id(), child: Some(child), socket, log })
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the proxy answers `GET /_ping` on its socket.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + PROXY_START_TIMEOUT;
        loop {
            if let Some(status) = self.exited()? {
                return Err(format!(
                    "the proxy exited ({status}) before it was ready; its log:\n{}",
                    self.log_tail()
                )
                .into());
            }
            if self.socket.exists() {
                if let Ok(mut client) = ApiClient::connect(&self.socket).await {
                    if client.get("/_ping").await.is_ok() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the proxy did not answer /_ping within {PROXY_START_TIMEOUT:?}; its log:\n{}",
                    self.log_tail()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().context("checking the proxy process"),
            None => Ok(None),
        }
    }

    /// Sends SIGTERM and waits for the exit; SIGKILL if it does not come in time.
    /// Returns how long the proxy took to exit and its status.
    fn stop(&mut self) -> Result<(Duration, ExitStatus)> {
        let mut child = self.child.take().ok_or("the proxy was already stopped")?;
        let started = Instant::now();
        // `pid` is our own child, not yet reaped (we hold its `Child`), so it
        // cannot name an unrelated process.
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        while started.elapsed() < PROXY_STOP_TIMEOUT {
            if let Some(status) = child.try_wait().context("waiting for the proxy")? {
                return Ok((started.elapsed(), status));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("the proxy did not exit within {PROXY_STOP_TIMEOUT:?} of SIGTERM; killed it").into())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(err) = self.stop() {
                eprintln!("warning: {err}");
            }
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to `wanted` (up to the hard limit); returns the
/// limit in force, or an error if it is still too low for the streams asked for.
fn raise_nofile_limit(wanted: u64) -> Result<u64> {
    // util-linux `prlimit` on our own pid (no unsafe code needed): the soft
    // limit goes up to the hard one, generously, because the proxy inherits it
    // and needs more fds per stream than the bench does.
    let pid = std::process::id().to_string();
    let read = |column: &str| -> u64 {
        Command::new("prlimit")
            .args(["--pid", &pid, "--nofile", "--raw", "--noheadings", "--output", column])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    };
    let hard = read("HARD");
    let _ = Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={hard}:{hard}")]).status();
    let soft = read("SOFT");
    if soft < wanted {
        return Err(format!(
            "RLIMIT_NOFILE is {soft}, below the {wanted} fds needed; lower OFFLOAD_BENCH_STREAMS"
        )
        .into());
    }
    Ok(soft)
}

// ---------------------------------------------------------------------------------
// /proc readings of the proxy (summed over its process tree, so that a forking
// stand-in such as socat is measured fairly too)
// ---------------------------------------------------------------------------------

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(&format!("{key}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn tree_rss_kib(root: u32) -> u64 {
    process_tree(root).into_iter().filter_map(|pid| status_kib(pid, "VmRSS")).sum()
}

fn tree_fds(root: u32) -> usize {
    process_tree(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
        .map(Iterator::count)
        .sum()
}

/// User + system CPU seconds of the tree, including children it already reaped.
fn tree_cpu_secs(root: u32) -> f64 {
    let ticks_per_sec = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0);
    let ticks: u64 = process_tree(root)
        .into_iter()
        .filter_map(stat_fields)
        // utime, stime, cutime, cstime are fields 14-17, that is 11-14 here.
        .map(|fields| {
            fields.get(11..15).unwrap_or_default().iter().filter_map(|f| f.parse::<u64>().ok()).sum::<u64>()
        })
        .sum();
    ticks as f64 / ticks_per_sec
}

// ---------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------

/// Prints one round's figures (direct / offload) as it ends, so that noise is visible.
fn progress(what: &str, direct_slash_offload: String) {
    println!("    {what}: direct / offload = {direct_slash_offload}");
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn variant_name(variant: Variant) -> &'static str {
    match variant {
        Variant::Direct => "direct",
        Variant::Offload => "offload",
    }
}

// ---------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------

const REPORT_STYLE: Style = Style {
    columns: Columns::DirectOffload,
    marks: ["yes", "NO"],
    ratio_digits: 2,
    footnote: "ratios are offload/direct: the median of per-round ratios, \
               with a bootstrap 95% interval",
};

impl Report {
    fn socket_mode(&mut self, socket: &Path) -> Result<()> {
        let mode = std::fs::metadata(socket).context("proxy socket")?.permissions().mode() & 0o777;
        self.single("proxy socket mode", format!("{mode:04o}"), "0600", Some(mode == 0o600));
        Ok(())
    }

    fn shutdown(&mut self, outcome: Result<(Duration, ExitStatus)>, socket: &Path) {
        let removed = if socket.exists() { "socket left behind" } else { "socket removed" };
        let (value, ok) = match outcome {
            Ok((took, status)) => (format!("{status} after {} ms, {removed}", took.as_millis()), true),
            Err(err) => (err.to_string(), false),
        };
        self.single("proxy stop on SIGTERM", value, "exits", Some(ok));
    }
}
