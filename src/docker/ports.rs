//! Published ports on a remote engine: bind them to the remote's loopback
//! only (nothing is exposed on the remote host's interfaces), remember the
//! address the user asked for, and read the real bindings back. Pure.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Container label holding the host addresses the user asked for, per port
/// (`{"80/tcp":["0.0.0.0"]}`), so the proxy can listen where they expected.
pub const REQUESTED_ADDRESSES_LABEL: &str = "offload.publish-addresses";

const LOOPBACK: &str = "127.0.0.1";

fn key_ci<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    object.keys().rfind(|k| k.eq_ignore_ascii_case(name)).map(String::as_str)
}

/// Rewrites a container-create body so every published port binds to the
/// remote's loopback. `PublishAllPorts` becomes explicit loopback bindings
/// with random ports for every exposed port (`image_exposed` plus the
/// request's own `ExposedPorts`). Returns the new body, or `None` when the
/// body is not a JSON object or publishes nothing.
pub fn bind_to_loopback(body: &[u8], image_exposed: &[String]) -> Option<Vec<u8>> {
    let mut root: Value = serde_json::from_slice(body).ok()?;
    let object = root.as_object_mut()?;
    let mut exposed: Vec<String> = image_exposed.to_vec();
    if let Some(key) = key_ci(object, "ExposedPorts").map(str::to_string) {
        if let Some(ports) = object.get(&key).and_then(Value::as_object) {
            exposed.extend(ports.keys().cloned());
        }
    }
    let host_config_key = key_ci(object, "HostConfig")?.to_string();
    let host_config = object.get_mut(&host_config_key)?.as_object_mut()?;
    let publish_all_key = key_ci(host_config, "PublishAllPorts").map(str::to_string);
    let publish_all =
        publish_all_key.as_ref().and_then(|k| host_config.get(k)).and_then(Value::as_bool) == Some(true);
    let bindings_key =
        key_ci(host_config, "PortBindings").map(str::to_string).unwrap_or_else(|| "PortBindings".into());
    let mut bindings = host_config.get(&bindings_key).and_then(Value::as_object).cloned().unwrap_or_default();
    if publish_all {
        for port in exposed {
            bindings
                .entry(normalize_port(&port))
                .or_insert_with(|| serde_json::json!([{"HostIp": "", "HostPort": ""}]));
        }
        if let Some(key) = publish_all_key {
            host_config.insert(key, Value::Bool(false));
        }
    }
    if bindings.is_empty() {
        return None;
    }
    let mut requested: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (port, list) in bindings.iter_mut() {
        let Some(list) = list.as_array_mut() else { continue };
        for binding in list.iter_mut().filter_map(Value::as_object_mut) {
            let ip_key = key_ci(binding, "HostIp").map(str::to_string).unwrap_or_else(|| "HostIp".into());
            let asked = binding.get(&ip_key).and_then(Value::as_str).unwrap_or("").to_string();
            requested.entry(port.clone()).or_default().push(asked);
            binding.insert(ip_key, Value::String(LOOPBACK.into()));
        }
    }
    host_config.insert(bindings_key, Value::Object(bindings));
    let labels_key = key_ci(object, "Labels").map(str::to_string).unwrap_or_else(|| "Labels".into());
    let labels = object.entry(labels_key).or_insert_with(|| Value::Object(Map::new()));
    if !labels.is_object() {
        *labels = Value::Object(Map::new());
    }
    let requested = serde_json::to_string(&requested).ok()?;
    labels.as_object_mut()?.insert(REQUESTED_ADDRESSES_LABEL.into(), Value::String(requested));
    serde_json::to_vec(&root).ok()
}

fn normalize_port(port: &str) -> String {
    if port.contains('/') {
        port.to_string()
    } else {
        format!("{port}/tcp")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub protocol: String,
    pub host_port: u16,
    /// The address the user asked for ("" when none).
    pub requested_address: String,
}

/// The ports a container really publishes (from its inspect JSON), with the
/// address each was requested on. One entry per distinct host port.
pub fn published(inspect: &Value) -> Vec<Published> {
    let requested: BTreeMap<String, Vec<String>> = inspect["Config"]["Labels"][REQUESTED_ADDRESSES_LABEL]
        .as_str()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    let mut out: Vec<Published> = Vec::new();
    let Some(ports) = inspect["NetworkSettings"]["Ports"].as_object() else { return out };
    for (port, bindings) in ports {
        let protocol = port.split('/').nth(1).unwrap_or("tcp").to_string();
        let asked = requested.get(port).and_then(|list| list.first()).cloned().unwrap_or_default();
        for binding in bindings.as_array().into_iter().flatten() {
            let Some(host_port) = binding["HostPort"].as_str().and_then(|p| p.parse().ok()) else { continue };
            let entry = Published { protocol: protocol.clone(), host_port, requested_address: asked.clone() };
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_every_published_port_to_loopback_and_remembers_the_request() {
        let body = br#"{"Image":"x","HostConfig":{"PortBindings":{"80/tcp":[{"HostIp":"0.0.0.0","HostPort":"8080"}],"53/udp":[{"HostIp":"","HostPort":""}]},"Memory":1}}"#;
        let out: Value = serde_json::from_slice(&bind_to_loopback(body, &[]).unwrap()).unwrap();
        assert_eq!(out["HostConfig"]["PortBindings"]["80/tcp"][0]["HostIp"], "127.0.0.1");
        assert_eq!(out["HostConfig"]["PortBindings"]["80/tcp"][0]["HostPort"], "8080");
        assert_eq!(out["HostConfig"]["PortBindings"]["53/udp"][0]["HostIp"], "127.0.0.1");
        assert_eq!(out["HostConfig"]["Memory"], 1);
        let label = out["Labels"][REQUESTED_ADDRESSES_LABEL].as_str().unwrap();
        assert_eq!(label, r#"{"53/udp":[""],"80/tcp":["0.0.0.0"]}"#);
    }

    #[test]
    fn publish_all_becomes_explicit_loopback_bindings() {
        let body = br#"{"Image":"x","ExposedPorts":{"81/tcp":{}},"HostConfig":{"PublishAllPorts":true}}"#;
        let out: Value =
            serde_json::from_slice(&bind_to_loopback(body, &["80/tcp".into()]).unwrap()).unwrap();
        assert_eq!(out["HostConfig"]["PublishAllPorts"], false);
        for port in ["80/tcp", "81/tcp"] {
            assert_eq!(out["HostConfig"]["PortBindings"][port][0]["HostIp"], "127.0.0.1", "{port}");
            assert_eq!(out["HostConfig"]["PortBindings"][port][0]["HostPort"], "", "{port}");
        }
    }

    #[test]
    fn leaves_bodies_without_ports_alone() {
        assert_eq!(bind_to_loopback(br#"{"Image":"x","HostConfig":{}}"#, &[]), None);
        assert_eq!(bind_to_loopback(br#"{"Image":"x"}"#, &[]), None);
        assert_eq!(bind_to_loopback(b"garbage", &[]), None);
    }

    #[test]
    fn reads_real_bindings_with_requested_addresses() {
        let inspect = serde_json::json!({
            "Config": {"Labels": {REQUESTED_ADDRESSES_LABEL: r#"{"80/tcp":["0.0.0.0"]}"#}},
            "NetworkSettings": {"Ports": {
                "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32768"}],
                "90/udp": [{"HostIp": "127.0.0.1", "HostPort": "32769"}],
                "443/tcp": null
            }}
        });
        assert_eq!(
            published(&inspect),
            vec![
                Published { protocol: "tcp".into(), host_port: 32768, requested_address: "0.0.0.0".into() },
                Published { protocol: "udp".into(), host_port: 32769, requested_address: "".into() },
            ]
        );
    }
}
