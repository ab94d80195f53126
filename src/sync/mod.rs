//! File sync for bind mounts, shared by both halves: the proxy mirrors a
//! local directory (or one file) to the agent and back.
//!
//! Each side keeps a [`manifest::Manifest`] of its own disk as last agreed
//! with the other side; a path whose state differs from its entry has
//! changed here, anything else (including the echo of our own writes) has
//! not. Changes travel as a [`stream`] of records (zstd-compressed), are
//! found by [`watch`] (inotify, no rescans) and filtered by [`ignore`].

pub mod bridge;
pub mod ignore;
pub mod manifest;
pub mod scan;
pub mod stream;
pub mod watch;

use serde::{Deserialize, Serialize};

use manifest::Manifest;

/// What the proxy asks for when it registers a mount with the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRequest {
    /// The local source as the user named it (identifies the mount).
    pub local_path: String,
    /// For a single-file bind: the file's name; the mount is its directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<String>,
    /// Ignore rules for every mount (gitignore lines), besides `.offloadignore`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
}

/// The agent's answer: where the copy lives and what it holds now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    pub mount_id: String,
    /// The directory on the remote host that holds the copy.
    pub remote_root: String,
    pub manifest: Manifest,
}

/// The agent's answer to a push.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PushReport {
    /// Paths written on both sides at once: the remote version was kept
    /// beside them under these names.
    pub conflicts: Vec<String>,
    pub files: u64,
    pub bytes: u64,
}
