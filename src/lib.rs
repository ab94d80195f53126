//! offload: run containers and builds on a remote Docker Engine with the Docker
//! tools you already use.
//!
//! ```text
//! docker CLI / Compose / docker-py / bollard
//!       │ HTTP/1.1 + upgrades on a unix socket (0600)
//!       ▼
//! proxy      (local half: accept loop, per-request forwarding, hijack relay)
//!       │ Upstream trait: the engine directly today, the agent link next
//!       ▼
//! dockerd
//! ```
//!
//! Module map:
//! - [`docker`]: pure Docker API knowledge (routes, header rules, error bodies); no I/O.
//! - [`upstream`]: where requests go (an engine over unix/tcp/tls).
//! - [`proxy`]: the local half that Docker clients talk to.
//! - [`lifecycle`]: cancellation, task tracking and signal handling.
//! - [`duration`]: human durations (`500ms`, `10s`, `30m`) for flags.

pub mod agent;
pub mod body;
pub mod certs;
pub mod control;
pub mod docker;
pub mod duration;
pub mod lifecycle;
pub mod link;
pub mod proxy;
pub mod splice;
pub mod sync;
pub mod tls;
pub mod unix_socket;
pub mod upstream;
