//! Which Docker API requests create resources, and the session label the
//! agent puts on what it can label. Pure: no I/O.
//!
//! Containers, volumes and networks carry the label, so the engine itself
//! knows what a session owns. Images cannot be labelled after the fact (a
//! pull, a tag, a load), so their references are recorded from the request,
//! or from the response for a load.

use http::Method;
use serde_json::{Map, Value};

use super::route::unversioned;

/// The label on every container, volume and network a session creates.
pub const SESSION_LABEL: &str = "offload.session";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creation {
    /// Labelled in the request body.
    Container,
    Volume,
    Network,
    /// Image references the request will create or move.
    Images(Vec<String>),
    /// `POST /images/load`: the references come in the response stream.
    ImageLoad,
}

pub fn creation(method: &Method, path: &str, query: Option<&str>) -> Option<Creation> {
    if method != Method::POST {
        return None;
    }
    let path = unversioned(path);
    let params = parse_query(query.unwrap_or(""));
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let all = |name: &str| -> Vec<&str> {
        params.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["containers", "create"] => Some(Creation::Container),
        ["volumes", "create"] => Some(Creation::Volume),
        ["networks", "create"] => Some(Creation::Network),
        ["images", "load"] => Some(Creation::ImageLoad),
        ["images", "create"] => {
            let name = param("fromImage").filter(|n| !n.is_empty()).or_else(|| param("repo"))?;
            Some(Creation::Images(vec![reference(name, param("tag"))]))
        }
        ["build"] => {
            let tags: Vec<String> = all("t").into_iter().map(|t| reference(t, None)).collect();
            (!tags.is_empty()).then_some(Creation::Images(tags))
        }
        ["commit"] => param("repo")
            .filter(|r| !r.is_empty())
            .map(|r| Creation::Images(vec![reference(r, param("tag"))])),
        ["images", .., "tag"] => param("repo")
            .filter(|r| !r.is_empty())
            .map(|r| Creation::Images(vec![reference(r, param("tag"))])),
        _ => None,
    }
}

/// `name` with `tag` (default `latest`) unless `name` already has a tag or digest.
pub fn reference(name: &str, tag: Option<&str>) -> String {
    if name.contains('@') {
        return name.to_string();
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        return name.to_string();
    }
    format!("{name}:{}", tag.filter(|t| !t.is_empty()).unwrap_or("latest"))
}

/// Adds `key=value` to the top-level `Labels` object of a JSON body (found
/// case-insensitively, as the engine's decoder does). `None` when the body is
/// not a JSON object: it is then forwarded untouched for the engine to judge.
pub fn add_label(body: &[u8], key: &str, value: &str) -> Option<Vec<u8>> {
    let mut root: Value = serde_json::from_slice(body).ok()?;
    let object = root.as_object_mut()?;
    let existing = object.keys().rfind(|k| k.eq_ignore_ascii_case("labels")).cloned();
    let name = existing.unwrap_or_else(|| "Labels".to_string());
    let labels = object.entry(name).or_insert_with(|| Value::Object(Map::new()));
    if !labels.is_object() {
        *labels = Value::Object(Map::new());
    }
    labels.as_object_mut()?.insert(key.to_string(), Value::String(value.to_string()));
    serde_json::to_vec(&root).ok()
}

/// Image references in a `POST /images/load` progress stream.
pub fn loaded_images(stream_text: &str) -> Vec<String> {
    stream_text
        .split(['\n', '}'])
        .filter_map(|piece| {
            let at = piece.find("Loaded image")?;
            let rest = &piece[at..];
            let value =
                rest.strip_prefix("Loaded image ID: ").or_else(|| rest.strip_prefix("Loaded image: "))?;
            let value = value.split(['\\', '"']).next()?.trim();
            (!value.is_empty()).then(|| value.to_string())
        })
        .collect()
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_creations() {
        let post = Method::POST;
        assert_eq!(creation(&post, "/v1.41/containers/create", Some("name=x")), Some(Creation::Container));
        assert_eq!(creation(&post, "/volumes/create", None), Some(Creation::Volume));
        assert_eq!(creation(&post, "/networks/create", None), Some(Creation::Network));
        assert_eq!(
            creation(&post, "/images/create", Some("fromImage=offload-test%2Fbusybox&tag=1")),
            Some(Creation::Images(vec!["offload-test/busybox:1".into()]))
        );
        assert_eq!(
            creation(&post, "/build", Some("t=a%3Av1&t=b&rm=1")),
            Some(Creation::Images(vec!["a:v1".into(), "b:latest".into()]))
        );
        assert_eq!(creation(&post, "/build", Some("rm=1")), None);
        assert_eq!(
            creation(&post, "/images/offload-test/busybox:latest/tag", Some("repo=mine&tag=t")),
            Some(Creation::Images(vec!["mine:t".into()]))
        );
        assert_eq!(creation(&post, "/images/load", Some("quiet=1")), Some(Creation::ImageLoad));
        assert_eq!(creation(&Method::GET, "/containers/create", None), None);
        assert_eq!(creation(&post, "/containers/x/start", None), None);
    }

    #[test]
    fn references_get_a_default_tag() {
        assert_eq!(reference("busybox", None), "busybox:latest");
        assert_eq!(reference("localhost:5000/app", None), "localhost:5000/app:latest");
        assert_eq!(reference("localhost:5000/app:2", None), "localhost:5000/app:2");
        assert_eq!(reference("app@sha256:abc", None), "app@sha256:abc");
    }

    #[test]
    fn adds_labels_case_insensitively_and_keeps_everything_else() {
        let body = br#"{"Image":"x","labels":{"a":"b"},"HostConfig":{"Memory":9007199254740993}}"#;
        let out = add_label(body, SESSION_LABEL, "s1").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""labels":{"a":"b","offload.session":"s1"}"#), "{text}");
        assert!(text.contains("9007199254740993"), "numbers must stay exact: {text}");
        let out = add_label(br#"{"Image":"x","Labels":null}"#, SESSION_LABEL, "s1").unwrap();
        assert!(String::from_utf8(out).unwrap().contains(r#""Labels":{"offload.session":"s1"}"#));
        let out = add_label(br#"{"Name":"v"}"#, SESSION_LABEL, "s1").unwrap();
        assert!(String::from_utf8(out).unwrap().contains(r#""Labels":{"offload.session":"s1"}"#));
        assert_eq!(add_label(b"not json", SESSION_LABEL, "s1"), None);
        assert_eq!(add_label(b"[1]", SESSION_LABEL, "s1"), None);
    }

    #[test]
    fn finds_loaded_images() {
        let stream = "{\"stream\":\"Loaded image: offload-test/x:latest\\n\"}\n{\"stream\":\"Loaded image ID: sha256:abc\\n\"}";
        assert_eq!(
            loaded_images(stream),
            vec!["offload-test/x:latest".to_string(), "sha256:abc".to_string()]
        );
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("a%2Fb%3Ac"), "a/b:c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
