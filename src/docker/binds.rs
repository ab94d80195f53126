//! Bind mounts in Docker API bodies: find the host paths a container or
//! volume create names, replace them, and map them back in inspect and list
//! answers. Pure: the proxy decides what each path becomes, the agent checks
//! what the rewritten body may reach.
//!
//! Keys are matched case-insensitively, like the engine's JSON decoder; every
//! other field (and every number, exactly) is kept as sent.

use serde_json::{Map, Value};

/// Where in a create body a host path was found. The engine treats a missing
/// source differently per form: `-v` creates it, `--mount` refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindForm {
    /// `HostConfig.Binds`: `"/src:/dst[:opts]"`.
    Binds,
    /// `HostConfig.Mounts` with `"Type": "bind"`.
    Mount,
    /// A `local` volume with `o=bind` and a `device` path (volume create, or
    /// a volume mount's driver options).
    VolumeDevice,
}

/// One host path named by a create body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPath {
    pub path: String,
    pub form: BindForm,
}

fn key_ci(object: &Map<String, Value>, name: &str) -> Option<String> {
    object.keys().rfind(|k| k.eq_ignore_ascii_case(name)).cloned()
}

fn get_ci<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    key_ci(object, name).and_then(|k| object.get(&k))
}

fn get_ci_mut<'a>(object: &'a mut Map<String, Value>, name: &str) -> Option<&'a mut Value> {
    let key = key_ci(object, name)?;
    object.get_mut(&key)
}

/// Splits a `Binds` entry into its source and the rest (`:/dst[:opts]`).
/// Only absolute sources are host paths; anything else is a named volume.
fn split_bind(entry: &str) -> Option<(&str, &str)> {
    if !entry.starts_with('/') {
        return None;
    }
    let colon = entry.find(':')?;
    Some((&entry[..colon], &entry[colon..]))
}

/// Applies `visit` to every host path of a container-create body; where it
/// returns `Some`, the path is replaced. Returns whether anything changed.
pub fn rewrite_container_create(
    create: &mut Value,
    mut visit: impl FnMut(&HostPath) -> Option<String>,
) -> bool {
    let Some(host_config) = create.as_object_mut().and_then(|o| get_ci_mut(o, "HostConfig")) else {
        return false;
    };
    let Some(host_config) = host_config.as_object_mut() else { return false };
    let mut changed = false;
    if let Some(Value::Array(binds)) = get_ci_mut(host_config, "Binds") {
        for bind in binds.iter_mut() {
            let Some(entry) = bind.as_str() else { continue };
            let Some((source, rest)) = split_bind(entry) else { continue };
            let found = HostPath { path: source.to_string(), form: BindForm::Binds };
            if let Some(new_source) = visit(&found) {
                *bind = Value::String(format!("{new_source}{rest}"));
                changed = true;
            }
        }
    }
    if let Some(Value::Array(mounts)) = get_ci_mut(host_config, "Mounts") {
        for mount in mounts.iter_mut().filter_map(Value::as_object_mut) {
            changed |= rewrite_mount(mount, &mut visit);
        }
    }
    changed
}

fn rewrite_mount(
    mount: &mut Map<String, Value>,
    visit: &mut impl FnMut(&HostPath) -> Option<String>,
) -> bool {
    let kind = get_ci(mount, "Type").and_then(Value::as_str).unwrap_or("").to_ascii_lowercase();
    match kind.as_str() {
        "bind" => {
            let Some(key) = key_ci(mount, "Source") else { return false };
            let Some(source) = mount.get(&key).and_then(Value::as_str) else { return false };
            let found = HostPath { path: source.to_string(), form: BindForm::Mount };
            match visit(&found) {
                Some(new_source) => {
                    mount.insert(key, Value::String(new_source));
                    true
                }
                None => false,
            }
        }
        "volume" => {
            let Some(options) = get_ci_mut(mount, "VolumeOptions").and_then(Value::as_object_mut) else {
                return false;
            };
            let Some(driver) = get_ci_mut(options, "DriverConfig").and_then(Value::as_object_mut) else {
                return false;
            };
            rewrite_volume_driver(driver, "Name", visit)
        }
        _ => false,
    }
}

/// A `local` volume bound to a host directory: `{"o": "bind", "device": "/path"}`.
fn rewrite_volume_driver(
    driver: &mut Map<String, Value>,
    name_key: &str,
    visit: &mut impl FnMut(&HostPath) -> Option<String>,
) -> bool {
    let name = get_ci(driver, name_key).and_then(Value::as_str).unwrap_or("local");
    if !(name.is_empty() || name == "local") {
        return false;
    }
    let Some(key) = key_ci(driver, "Options").or_else(|| key_ci(driver, "DriverOpts")) else {
        return false;
    };
    let Some(options) = driver.get_mut(&key).and_then(Value::as_object_mut) else { return false };
    let binds = options
        .get("o")
        .and_then(Value::as_str)
        .is_some_and(|o| o.split(',').any(|part| part.trim() == "bind" || part.trim() == "rbind"));
    if !binds {
        return false;
    }
    let Some(device) = options.get("device").and_then(Value::as_str) else { return false };
    if !device.starts_with('/') {
        return false;
    }
    let found = HostPath { path: device.to_string(), form: BindForm::VolumeDevice };
    match visit(&found) {
        Some(new_device) => {
            options.insert("device".into(), Value::String(new_device));
            true
        }
        None => false,
    }
}

/// Applies `visit` to the device path of a volume-create body
/// (`{"Driver": "local", "DriverOpts": {"o": "bind", "device": "/path"}}`).
pub fn rewrite_volume_create(create: &mut Value, mut visit: impl FnMut(&HostPath) -> Option<String>) -> bool {
    let Some(object) = create.as_object_mut() else { return false };
    rewrite_volume_driver(object, "Driver", &mut visit)
}

/// Every host path a container-create body names.
pub fn container_host_paths(create: &Value) -> Vec<HostPath> {
    let mut found = Vec::new();
    let mut copy = create.clone();
    rewrite_container_create(&mut copy, |path| {
        found.push(path.clone());
        None
    });
    found
}

/// Every host path a volume-create body names.
pub fn volume_host_paths(create: &Value) -> Vec<HostPath> {
    let mut found = Vec::new();
    let mut copy = create.clone();
    rewrite_volume_create(&mut copy, |path| {
        found.push(path.clone());
        None
    });
    found
}

/// Maps the remote paths in a container inspect answer (`Mounts[].Source`,
/// `HostConfig.Binds`) back to local ones. Returns whether anything changed.
pub fn localize_inspect(container: &mut Value, local: &impl Fn(&str) -> Option<String>) -> bool {
    let Some(object) = container.as_object_mut() else { return false };
    let mut changed = localize_mounts(object, local);
    if let Some(Value::Array(binds)) =
        get_ci_mut(object, "HostConfig").and_then(Value::as_object_mut).and_then(|hc| get_ci_mut(hc, "Binds"))
    {
        for bind in binds.iter_mut() {
            let Some((source, rest)) = bind.as_str().and_then(split_bind) else { continue };
            if let Some(path) = local(source) {
                *bind = Value::String(format!("{path}{rest}"));
                changed = true;
            }
        }
    }
    changed
}

/// The same for a container list answer (each entry's `Mounts[].Source`).
pub fn localize_list(list: &mut Value, local: &impl Fn(&str) -> Option<String>) -> bool {
    let Some(containers) = list.as_array_mut() else { return false };
    let mut changed = false;
    for container in containers.iter_mut().filter_map(Value::as_object_mut) {
        changed |= localize_mounts(container, local);
    }
    changed
}

fn localize_mounts(container: &mut Map<String, Value>, local: &impl Fn(&str) -> Option<String>) -> bool {
    let Some(Value::Array(mounts)) = get_ci_mut(container, "Mounts") else { return false };
    let mut changed = false;
    for mount in mounts.iter_mut().filter_map(Value::as_object_mut) {
        let Some(key) = key_ci(mount, "Source") else { continue };
        let Some(path) = mount.get(&key).and_then(Value::as_str).and_then(local) else { continue };
        mount.insert(key, Value::String(path));
        changed = true;
    }
    changed
}

/// Whether `path` is `root` or lies below it, compared by components (no
/// `..`, no `.`: a path that needs normalizing is not trusted).
pub fn is_within(path: &str, root: &str) -> bool {
    if path.split('/').any(|c| c == ".." || c == ".") {
        return false;
    }
    let root = root.trim_end_matches('/');
    path == root || path.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rewrites_binds_and_bind_mounts_and_keeps_everything_else() {
        let mut create = json!({
            "Image": "x",
            "hostconfig": {
                "Binds": ["/home/u/app:/app:ro,z", "named:/data", "/tmp/f.txt:/f"],
                "Mounts": [
                    {"Type": "bind", "Source": "/src", "Target": "/s", "BindOptions": {"Propagation": "rshared"}},
                    {"Type": "tmpfs", "Target": "/t"},
                    {"Type": "volume", "Source": "v", "Target": "/v"}
                ],
                "Memory": 12345678901234567890u64
            }
        });
        let changed = rewrite_container_create(&mut create, |p| Some(format!("/remote{}", p.path)));
        assert!(changed);
        let hc = &create["hostconfig"];
        assert_eq!(
            hc["Binds"],
            json!(["/remote/home/u/app:/app:ro,z", "named:/data", "/remote/tmp/f.txt:/f"])
        );
        assert_eq!(hc["Mounts"][0]["Source"], "/remote/src");
        assert_eq!(hc["Mounts"][0]["BindOptions"]["Propagation"], "rshared");
        assert_eq!(hc["Mounts"][1], json!({"Type": "tmpfs", "Target": "/t"}));
        assert_eq!(hc["Mounts"][2]["Source"], "v");
        assert_eq!(hc["Memory"].to_string(), "12345678901234567890");
    }

    #[test]
    fn lists_host_paths_with_their_form() {
        let create = json!({"HostConfig": {
            "Binds": ["/a:/a", "vol:/b"],
            "Mounts": [
                {"type": "BIND", "source": "/c", "target": "/c"},
                {"Type": "volume", "Target": "/d", "VolumeOptions": {"DriverConfig": {
                    "Name": "local", "Options": {"type": "none", "o": "bind", "device": "/e"}}}}
            ]
        }});
        let found = container_host_paths(&create);
        assert_eq!(
            found,
            vec![
                HostPath { path: "/a".into(), form: BindForm::Binds },
                HostPath { path: "/c".into(), form: BindForm::Mount },
                HostPath { path: "/e".into(), form: BindForm::VolumeDevice },
            ]
        );
    }

    #[test]
    fn finds_bind_volumes_only_for_the_local_driver() {
        let bind = json!({"Name": "v", "Driver": "local", "DriverOpts": {"type": "none", "o": "bind", "device": "/srv"}});
        assert_eq!(
            volume_host_paths(&bind),
            vec![HostPath { path: "/srv".into(), form: BindForm::VolumeDevice }]
        );
        let nfs =
            json!({"Driver": "local", "DriverOpts": {"type": "nfs", "o": "addr=1.2.3.4", "device": ":/x"}});
        assert!(volume_host_paths(&nfs).is_empty());
        let other = json!({"Driver": "rexray", "DriverOpts": {"o": "bind", "device": "/srv"}});
        assert!(volume_host_paths(&other).is_empty());
        let mut renamed = bind.clone();
        assert!(rewrite_volume_create(&mut renamed, |_| Some("/r".into())));
        assert_eq!(renamed["DriverOpts"]["device"], "/r");
        assert_eq!(renamed["DriverOpts"]["type"], "none");
    }

    #[test]
    fn leaves_bodies_without_binds_alone() {
        let mut create = json!({"Image": "x"});
        assert!(!rewrite_container_create(&mut create, |_| Some("/y".into())));
        let mut not_object = json!([1, 2]);
        assert!(!rewrite_container_create(&mut not_object, |_| Some("/y".into())));
    }

    #[test]
    fn maps_inspect_and_list_answers_back() {
        let local = |p: &str| p.strip_prefix("/sync/m1").map(|rest| format!("/home/u/app{rest}"));
        let mut inspect = json!({
            "Id": "c",
            "HostConfig": {"Binds": ["/sync/m1:/app:ro", "vol:/v"]},
            "Mounts": [{"Type": "bind", "Source": "/sync/m1/sub", "Destination": "/app"},
                       {"Type": "volume", "Source": "/var/lib/docker/volumes/v/_data"}]
        });
        assert!(localize_inspect(&mut inspect, &local));
        assert_eq!(inspect["HostConfig"]["Binds"], json!(["/home/u/app:/app:ro", "vol:/v"]));
        assert_eq!(inspect["Mounts"][0]["Source"], "/home/u/app/sub");
        assert_eq!(inspect["Mounts"][1]["Source"], "/var/lib/docker/volumes/v/_data");
        let mut list = json!([{"Id": "c", "Mounts": [{"Source": "/sync/m1"}]}, {"Id": "d"}]);
        assert!(localize_list(&mut list, &local));
        assert_eq!(list[0]["Mounts"][0]["Source"], "/home/u/app");
    }

    #[test]
    fn containment_is_by_component() {
        assert!(is_within("/sync/s1/m", "/sync/s1"));
        assert!(is_within("/sync/s1", "/sync/s1/"));
        assert!(!is_within("/sync/s10", "/sync/s1"));
        assert!(!is_within("/sync/s1/../../etc", "/sync/s1"));
        assert!(!is_within("/sync/s1/./x", "/sync/s1"));
        assert!(!is_within("/etc", "/sync/s1"));
    }
}
