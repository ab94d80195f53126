//! `~/.config/offload/config.toml`: defaults for `offload start` and
//! `diagnose`. A flag wins over an `OFFLOAD_*` environment variable, which
//! wins over the file.
//!
//! ```toml
//! remote = "ssh://me@build-box"        # or tls://host:7443; absent: embedded
//! tlscacert = "/home/me/.offload/certs/ca.pem"
//! tlscert = "/home/me/.offload/certs/cert.pem"
//! tlskey = "/home/me/.offload/certs/key.pem"
//! idle_timeout = "30m"
//! publish_address = "127.0.0.1"
//! ignore = ["node_modules/", "target/"]  # sync ignore rules for every mount
//! ssh_args = ["-F", "/home/me/.ssh/work_config"]
//! remote_command = "/opt/offload/bin/offload agent --stdio"
//! ```

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub remote: Option<String>,
    pub tlscacert: Option<PathBuf>,
    pub tlscert: Option<PathBuf>,
    pub tlskey: Option<PathBuf>,
    pub idle_timeout: Option<String>,
    pub publish_address: Option<String>,
    #[serde(default)]
    pub ignore: Vec<String>,
    #[serde(default)]
    pub ssh_args: Vec<String>,
    pub remote_command: Option<String>,
}

/// `$OFFLOAD_CONFIG`, else `$XDG_CONFIG_HOME/offload/config.toml`, else
/// `~/.config/offload/config.toml`.
pub fn path() -> PathBuf {
    if let Some(explicit) = std::env::var_os("OFFLOAD_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(explicit);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".config"));
    base.join("offload/config.toml")
}

/// The file's settings; none when it does not exist.
pub fn load() -> Result<Config, String> {
    let file = path();
    match std::fs::read_to_string(&file) {
        Ok(text) => parse(&text).map_err(|e| format!("{}: {e}", file.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(error) => Err(format!("{}: {error}", file.display())),
    }
}

pub fn parse(text: &str) -> Result<Config, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

/// The flag, else the environment variable, else the file's value.
pub fn pick(flag: Option<String>, variable: &str, file: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var(variable).ok().filter(|v| !v.is_empty())).or(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_setting_and_refuses_unknown_ones() {
        let config = parse(
            "remote = \"ssh://me@box\"\nidle_timeout = \"10m\"\nignore = [\"target/\"]\nssh_args = [\"-F\", \"cfg\"]\n",
        )
        .expect("parse");
        assert_eq!(config.remote.as_deref(), Some("ssh://me@box"));
        assert_eq!(config.idle_timeout.as_deref(), Some("10m"));
        assert_eq!(config.ignore, vec!["target/"]);
        assert_eq!(config.ssh_args, vec!["-F", "cfg"]);
        assert_eq!(parse("").expect("empty"), Config::default());
        let typo = parse("remtoe = \"x\"").expect_err("unknown key");
        assert!(typo.contains("remtoe"), "{typo}");
    }

    #[test]
    fn flags_win_over_the_file() {
        assert_eq!(
            pick(Some("flag".into()), "OFFLOAD_TEST_UNSET_VARIABLE", Some("file".into())).as_deref(),
            Some("flag")
        );
        assert_eq!(pick(None, "OFFLOAD_TEST_UNSET_VARIABLE", Some("file".into())).as_deref(), Some("file"));
        assert_eq!(pick(None, "OFFLOAD_TEST_UNSET_VARIABLE", None), None);
    }
}
