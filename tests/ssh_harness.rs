//! Self-check of the SSH test remote (tests/support/ssh.rs): a real OpenSSH
//! server through `sshd -i`, reached by the real `ssh` client.

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::ssh::SshRemote;

const LIMIT: Duration = Duration::from_secs(60);

fn ssh(remote: &SshRemote) -> Command {
    let mut command = Command::new("ssh");
    command.args(remote.ssh_args()).arg(remote.host());
    command
}

/// Whether a process is gone (a zombie waiting for a reaper counts as gone).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
            .unwrap_or(false),
    }
}

#[test]
fn echo_exit_code_and_nothing_left_running() {
    let remote = SshRemote::start();
    assert_eq!(remote.host(), "offload-test-remote");
    assert_eq!(remote.url(), "ssh://offload-test-remote");
    assert_eq!(remote.ssh_args(), vec!["-F".to_string(), remote.config_path().display().to_string()]);

    // The shell, the sshd session process (its parent) and the sshd monitor
    // (the ProxyCommand process, its grandparent).
    let output = ssh(&remote)
        .arg("echo hello; read -r _ _ _ gp _ < /proc/$PPID/stat; echo $$ $PPID $gp")
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ssh failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("hello"), "stdout: {stdout:?}");
    let pids: Vec<u32> =
        lines.next().expect("pid line").split_whitespace().map(|p| p.parse().expect("pid")).collect();
    assert_eq!(pids.len(), 3, "stdout: {stdout:?}");

    let output = ssh(&remote).arg("exit 42").stdin(Stdio::null()).output().expect("run ssh");
    assert_eq!(output.status.code(), Some(42), "stderr: {}", String::from_utf8_lossy(&output.stderr));

    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|&p| gone(p)) {
        assert!(Instant::now() < deadline, "remote processes {pids:?} still running after ssh exited");
        std::thread::sleep(Duration::from_millis(20));
    }

    let dir = remote.dir().to_path_buf();
    drop(remote);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn stdin_stdout_are_binary_clean() {
    let remote = SshRemote::start();
    // 4 MiB of every byte value, xorshift-scrambled.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let data: Vec<u8> = (0..4 * 1024 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();

    let started = Instant::now();
    let mut child = ssh(&remote)
        .arg("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let mut stdin = child.stdin.take().unwrap();
    let input = data.clone();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&input).expect("write to ssh");
        // dropping stdin sends EOF, so the remote cat ends
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut echoed = Vec::with_capacity(data.len());
    child.stdout.take().unwrap().read_to_end(&mut echoed).expect("read from ssh");
    writer.join().unwrap();
    let status = child.wait().expect("wait ssh");
    let stderr = err_reader.join().unwrap();
    assert!(started.elapsed() < LIMIT, "took {:?}", started.elapsed());
    assert!(status.success(), "ssh cat failed ({status}): {stderr}");
    assert_eq!(echoed.len(), data.len(), "stderr: {stderr}");
    assert!(echoed == data, "bytes changed on the way through ssh");
}

#[test]
fn refusing_remote_fails_fast_with_permission_denied() {
    let remote = SshRemote::start_refusing();
    let started = Instant::now();
    let output = ssh(&remote).arg("echo should-not-run").stdin(Stdio::null()).output().expect("run ssh");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(255), "stderr: {stderr}");
    assert!(stderr.contains("Permission denied"), "stderr: {stderr}");
    assert!(output.stdout.is_empty(), "stdout: {:?}", String::from_utf8_lossy(&output.stdout));
    assert!(elapsed < Duration::from_secs(10), "refusal took {elapsed:?}");
}
