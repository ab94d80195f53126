//! Docker-style error bodies. Every error the proxy produces itself is
//! `{"message":"offload: ..."}`, which every Docker client prints as a sentence.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// The JSON body the engine uses for errors, with our prefix.
pub fn error_json(message: &str) -> Bytes {
    let text = format!("offload: {message}");
    let mut out = serde_json::to_vec(&serde_json::json!({ "message": text }))
        .unwrap_or_else(|_| b"{\"message\":\"offload: internal error\"}".to_vec());
    out.push(b'\n');
    Bytes::from(out)
}

pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let json = error_json(message);
    let mut response = Response::new(body::full(json.clone()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(json.len()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_escapes_and_prefixes() {
        let json = error_json("bad \"thing\"\nhappened");
        let value: serde_json::Value = serde_json::from_slice(&json).expect("valid json");
        assert_eq!(value["message"], "offload: bad \"thing\"\nhappened");
    }

    #[test]
    fn error_response_has_length_and_type() {
        let response = error_response(StatusCode::BAD_GATEWAY, "down");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let expected = error_json("down").len().to_string();
        assert_eq!(response.headers()[header::CONTENT_LENGTH], expected.as_str());
    }
}
