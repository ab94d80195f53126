//! The user's commands: `offload start`, `stop` and `status`. They run the
//! proxy in the background (with an embedded agent when no remote is named),
//! talk to it over its socket, and switch the docker context.

pub mod cert_dates;
pub mod client;
pub mod config;
pub mod context;
pub mod diagnose;
pub mod embedded;
pub mod paths;
pub mod plugin;
pub mod start;
pub mod status;
pub mod stop;
