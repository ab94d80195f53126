//! Where a user's running offload keeps its socket, log and state:
//! `$XDG_RUNTIME_DIR/offload/` (private to the user, cleared at logout), or
//! `~/.offload/` where there is no runtime directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn resolve() -> Self {
        let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(runtime) => PathBuf::from(runtime).join("offload"),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".offload"),
        };
        Self { dir }
    }

    pub fn at(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("offload.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("proxy.log")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The embedded agent's state (session records, synced copies).
    pub fn agent_dir(&self) -> PathBuf {
        self.dir.join("agent")
    }

    /// Creates the directory, private to the user (0700).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
    }

    pub fn read_state(&self) -> Option<RunState> {
        let text = std::fs::read_to_string(self.state()).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write_state(&self, state: &RunState) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        let staging = self.dir.join(".state.json.new");
        std::fs::write(&staging, json)?;
        std::fs::rename(staging, self.state())
    }
}

/// What `start` recorded for `status` and `stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    pub pid: u32,
    /// `embedded`, or the remote as given.
    pub remote: String,
    /// The docker context that was current before `start` switched, if any.
    #[serde(default)]
    pub previous_context: Option<String>,
    pub started_unix: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().expect("tmp");
        let paths = Paths::at(dir.path());
        assert!(paths.read_state().is_none());
        let state = RunState {
            pid: 7,
            remote: "embedded".into(),
            previous_context: Some("default".into()),
            started_unix: 1,
        };
        paths.write_state(&state).expect("write");
        let read = paths.read_state().expect("read");
        assert_eq!(
            (read.pid, read.remote.as_str(), read.previous_context.as_deref()),
            (7, "embedded", Some("default"))
        );
    }
}
