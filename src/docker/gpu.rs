//! GPUs on a remote engine: whether the engine can give containers a GPU
//! (read from its `GET /info`), and whether a container-create body asks for
//! one (`docker run --gpus` sends `HostConfig.DeviceRequests`). Pure.

use serde_json::{Map, Value};

/// The answer to a GPU create on an engine without GPUs. The engine's own
/// error only comes at start and names no cause (`could not select device
/// driver "" with capabilities: [[gpu]]`).
pub const NO_GPU: &str = "this offload remote has no GPU: its Docker engine reports no NVIDIA runtime \
     and no CDI GPU device, so --gpus cannot work there. Use a remote with an NVIDIA GPU and the NVIDIA \
     Container Toolkit (offload start --remote HOST); if this remote does have one, configure the toolkit \
     for Docker there (sudo nvidia-ctk runtime configure --runtime=docker, then restart dockerd)";

/// What the engine's `/info` says about GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineGpus {
    /// Runtimes that bring a GPU into containers (`nvidia`, `nvidia-cdi`, `amd`).
    pub runtimes: Vec<String>,
    /// GPUs the engine found through CDI (`nvidia.com/gpu=0`); only newer
    /// engines report `DiscoveredDevices`.
    pub cdi_devices: Vec<String>,
}

impl EngineGpus {
    /// Reads `Runtimes`, `DefaultRuntime` and `DiscoveredDevices`.
    /// `CDISpecDirs` is not a signal: it says CDI is enabled, not that any
    /// spec there describes a GPU.
    pub fn from_info(info: &Value) -> EngineGpus {
        let mut runtimes: Vec<String> = info["Runtimes"]
            .as_object()
            .map(|all| {
                all.iter()
                    .filter(|(name, runtime)| is_gpu_runtime(name, runtime["path"].as_str().unwrap_or("")))
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(default) = info["DefaultRuntime"].as_str() {
            if is_gpu_runtime(default, "") && !runtimes.iter().any(|r| r == default) {
                runtimes.push(default.to_string());
            }
        }
        let cdi_devices = info["DiscoveredDevices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|device| device["ID"].as_str())
            .filter(|id| is_gpu_device(id))
            .map(str::to_string)
            .collect();
        EngineGpus { runtimes, cdi_devices }
    }

    /// Whether `--gpus` can work on this engine, as far as `/info` tells.
    /// (The engine really decides by finding the toolkit's hook in its PATH,
    /// which `/info` does not show; a registered runtime is the toolkit's
    /// documented Docker setup.)
    pub fn available(&self) -> bool {
        !self.runtimes.is_empty() || !self.cdi_devices.is_empty()
    }
}

/// `nvidia-ctk runtime configure` registers `nvidia` (and `nvidia-cdi`,
/// `nvidia-legacy`); `amd-ctk` registers `amd`. A runtime with another name
/// counts when its binary is one of theirs.
fn is_gpu_runtime(name: &str, path: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let binary = path.rsplit('/').next().unwrap_or("");
    name.starts_with("nvidia")
        || name == "amd"
        || binary.starts_with("nvidia-container-runtime")
        || binary.starts_with("amd-container-runtime")
}

/// A CDI device of a GPU kind: `nvidia.com/gpu=0`, `amd.com/gpu=all`.
fn is_gpu_device(id: &str) -> bool {
    id.split('=').next().is_some_and(|kind| kind.to_ascii_lowercase().ends_with("/gpu"))
}

/// Whether a container-create body asks for a GPU: a `DeviceRequests` entry
/// for the `nvidia` driver, one whose capabilities include `gpu` or `nvidia`
/// (`--gpus` sends `[["gpu"]]`), or a CDI request for a GPU device
/// (`--device nvidia.com/gpu=all`). Keys match case-insensitively, as in the
/// engine's JSON decoding. A body that is not JSON asks for nothing.
pub fn requests_gpu(body: &[u8]) -> bool {
    let Ok(root) = serde_json::from_slice::<Value>(body) else { return false };
    let requests = field(&root, "HostConfig").and_then(|host_config| field(host_config, "DeviceRequests"));
    requests.and_then(Value::as_array).into_iter().flatten().any(is_gpu_request)
}

fn is_gpu_request(request: &Value) -> bool {
    let driver = field(request, "Driver").and_then(Value::as_str).unwrap_or("");
    let list = |name| field(request, name).and_then(Value::as_array).into_iter().flatten();
    // An OR list of AND lists: any set naming a GPU asks for one.
    let mut capabilities =
        list("Capabilities").filter_map(Value::as_array).flatten().filter_map(Value::as_str);
    let mut device_ids = list("DeviceIDs").filter_map(Value::as_str);
    driver.eq_ignore_ascii_case("nvidia")
        || capabilities.any(|c| c.eq_ignore_ascii_case("gpu") || c.eq_ignore_ascii_case("nvidia"))
        || (driver.eq_ignore_ascii_case("cdi") && device_ids.any(is_gpu_device))
}

/// The value of `name` in an object, matched like the engine's decoder does
/// (case-insensitively; the last of several spellings wins).
fn field<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    let object: &Map<String, Value> = value.as_object()?;
    object.iter().rfind(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_engine_without_gpu_runtimes_has_no_gpu() {
        // Docker 20.10 (this machine's engine) and Docker 28 with CDI enabled.
        let info = json!({
            "Runtimes": {"io.containerd.runc.v2": {"path": "runc"}, "runc": {"path": "runc"}},
            "DefaultRuntime": "runc",
            "CDISpecDirs": ["/etc/cdi", "/var/run/cdi"],
            "DiscoveredDevices": []
        });
        let gpus = EngineGpus::from_info(&info);
        assert_eq!(gpus, EngineGpus::default());
        assert!(!gpus.available());
        assert!(!EngineGpus::from_info(&json!({})).available());
        assert!(!EngineGpus::from_info(&json!({"Runtimes": null, "DiscoveredDevices": null})).available());
    }

    #[test]
    fn the_toolkits_runtimes_mean_a_gpu() {
        let info = json!({
            "Runtimes": {
                "nvidia": {"path": "nvidia-container-runtime"},
                "nvidia-cdi": {"path": "nvidia-container-runtime.cdi"},
                "gpu": {"path": "/usr/bin/nvidia-container-runtime"},
                "runc": {"path": "runc"}
            },
            "DefaultRuntime": "runc"
        });
        let gpus = EngineGpus::from_info(&info);
        assert_eq!(gpus.runtimes, ["nvidia", "nvidia-cdi", "gpu"]);
        assert!(gpus.available());
        let amd = EngineGpus::from_info(&json!({"Runtimes": {"amd": {"path": "amd-container-runtime"}}}));
        assert_eq!(amd.runtimes, ["amd"]);
    }

    #[test]
    fn a_default_nvidia_runtime_counts_even_unlisted() {
        let gpus = EngineGpus::from_info(&json!({"Runtimes": {"runc": {}}, "DefaultRuntime": "nvidia"}));
        assert_eq!(gpus.runtimes, ["nvidia"]);
        let listed =
            json!({"Runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}, "DefaultRuntime": "nvidia"});
        assert_eq!(EngineGpus::from_info(&listed).runtimes, ["nvidia"]);
    }

    #[test]
    fn cdi_gpus_count_and_other_cdi_devices_do_not() {
        let info = json!({
            "Runtimes": {"runc": {"path": "runc"}},
            "DiscoveredDevices": [
                {"Source": "cdi", "ID": "nvidia.com/gpu=0"},
                {"Source": "cdi", "ID": "nvidia.com/gpu=all"},
                {"Source": "cdi", "ID": "vendor.com/fpga=0"}
            ]
        });
        let gpus = EngineGpus::from_info(&info);
        assert_eq!(gpus.cdi_devices, ["nvidia.com/gpu=0", "nvidia.com/gpu=all"]);
        assert!(gpus.runtimes.is_empty());
        assert!(gpus.available());
        let fpga = json!({"DiscoveredDevices": [{"Source": "cdi", "ID": "vendor.com/fpga=0"}]});
        assert!(!EngineGpus::from_info(&fpga).available());
    }

    #[test]
    fn what_docker_run_gpus_sends_asks_for_a_gpu() {
        // Captured from the docker CLI 28: `--gpus all`, `--gpus 2`,
        // `--gpus device=0,capabilities=compute`, `--device nvidia.com/gpu=all`.
        for requests in [
            r#"[{"Driver":"","Count":-1,"DeviceIDs":null,"Capabilities":[["gpu"]],"Options":{}}]"#,
            r#"[{"Driver":"","Count":2,"DeviceIDs":null,"Capabilities":[["gpu"]],"Options":{}}]"#,
            r#"[{"Driver":"","Count":0,"DeviceIDs":["0"],"Capabilities":[["compute","gpu"]],"Options":{}}]"#,
            r#"[{"Driver":"cdi","Count":0,"DeviceIDs":["nvidia.com/gpu=all"],"Capabilities":null,"Options":null}]"#,
        ] {
            let body = format!(r#"{{"Image":"x","HostConfig":{{"Memory":0,"DeviceRequests":{requests}}}}}"#);
            assert!(requests_gpu(body.as_bytes()), "{body}");
        }
    }

    #[test]
    fn the_nvidia_driver_or_capability_asks_for_a_gpu_with_any_key_case() {
        assert!(requests_gpu(br#"{"HostConfig":{"DeviceRequests":[{"Driver":"nvidia","Count":-1}]}}"#));
        assert!(requests_gpu(
            br#"{"hostconfig":{"devicerequests":[{"driver":"","capabilities":[["utility"],["nvidia"]]}]}}"#
        ));
        assert!(requests_gpu(br#"{"HOSTCONFIG":{"DEVICEREQUESTS":[{"CAPABILITIES":[["GPU"]]}]}}"#));
    }

    #[test]
    fn other_creates_ask_for_nothing() {
        for body in [
            &br#"{"Image":"x","HostConfig":{"Memory":0}}"#[..],
            br#"{"Image":"x","HostConfig":{"DeviceRequests":null}}"#,
            br#"{"Image":"x","HostConfig":{"DeviceRequests":[]}}"#,
            br#"{"Image":"x","HostConfig":{"Devices":[{"PathOnHost":"/dev/fuse"}]}}"#,
            br#"{"Image":"x","HostConfig":{"DeviceRequests":[{"Driver":"cdi","DeviceIDs":["vendor.com/fpga=0"]}]}}"#,
            br#"{"Image":"x","HostConfig":{"DeviceRequests":[{"Driver":"","Capabilities":"gpu"}]}}"#,
            br#"{"Image":"x","Labels":{"gpu":"gpu"}}"#,
            br#"{"Image":"x","HostConfig":"garbage"}"#,
            b"not json",
            b"",
        ] {
            assert!(!requests_gpu(body), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn the_last_spelling_of_a_key_wins_like_in_the_engine() {
        let body = br#"{"HostConfig":{"DeviceRequests":[{"Capabilities":[["gpu"]]}],"deviceRequests":[]}}"#;
        assert!(!requests_gpu(body));
        let body = br#"{"HostConfig":{"deviceRequests":[],"DeviceRequests":[{"Capabilities":[["gpu"]]}]}}"#;
        assert!(requests_gpu(body));
    }
}
