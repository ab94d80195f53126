//! The docker CLI plugin: `docker offload start|stop|status` run this
//! program as `docker-offload offload <command> ...` after asking it
//! `docker-cli-plugin-metadata`.

use std::ffi::OsString;
use std::path::PathBuf;

pub const PLUGIN_NAME: &str = "docker-offload";

/// What the docker CLI asks every plugin before listing or running it.
pub fn metadata() -> String {
    serde_json::json!({
        "SchemaVersion": "0.1.0",
        "Vendor": "offload",
        "Version": env!("CARGO_PKG_VERSION"),
        "ShortDescription": "Run containers and builds on a remote Docker Engine",
        "URL": "https://github.com/offload/offload",
    })
    .to_string()
}

/// The arguments as a plugin received them, turned into offload's own:
/// `docker-offload offload start` → `offload start`. `None`: not a plugin call.
pub fn plugin_arguments(args: &[OsString]) -> Option<Vec<OsString>> {
    let program = PathBuf::from(args.first()?);
    let name = program.file_name()?.to_str()?;
    if name != PLUGIN_NAME {
        return None;
    }
    let mut rewritten = vec![OsString::from("offload")];
    let rest = &args[1..];
    // The docker CLI passes the plugin's own name first.
    let rest = match rest.first() {
        Some(first) if first == "offload" => &rest[1..],
        _ => rest,
    };
    rewritten.extend(rest.iter().cloned());
    Some(rewritten)
}

/// Where the docker CLI looks for plugins: `$DOCKER_CONFIG/cli-plugins`,
/// else `~/.docker/cli-plugins`.
pub fn plugin_dir() -> PathBuf {
    match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        Some(config) => PathBuf::from(config).join("cli-plugins"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".docker/cli-plugins"),
    }
}

/// Copies this program there as `docker-offload` (a copy, not a link: it
/// survives `cargo clean` and moving the build).
pub fn install() -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let program = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let dir = plugin_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let target = dir.join(PLUGIN_NAME);
    let staging = dir.join(format!(".{PLUGIN_NAME}.new"));
    std::fs::copy(&program, &staging).map_err(|e| format!("cannot copy to {}: {e}", staging.display()))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", staging.display()))?;
    std::fs::rename(&staging, &target).map_err(|e| format!("cannot install {}: {e}", target.display()))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn plugin_calls_become_offload_commands() {
        let called =
            plugin_arguments(&args(&["/home/u/.docker/cli-plugins/docker-offload", "offload", "status"]));
        assert_eq!(called, Some(args(&["offload", "status"])));
        assert_eq!(
            plugin_arguments(&args(&["docker-offload", "stop", "--force"])),
            Some(args(&["offload", "stop", "--force"]))
        );
        assert_eq!(plugin_arguments(&args(&["/usr/bin/offload", "status"])), None);
    }

    #[test]
    fn metadata_is_what_the_docker_cli_expects() {
        let parsed: serde_json::Value = serde_json::from_str(&metadata()).expect("json");
        assert_eq!(parsed["SchemaVersion"], "0.1.0");
        assert!(parsed["ShortDescription"].as_str().is_some_and(|d| !d.is_empty()));
    }
}
