//! Header rules for relaying Docker API messages through a proxy hop.
//!
//! Hop-by-hop headers describe one connection and must not be forwarded,
//! except the upgrade pair, which the engine needs to hijack the connection
//! (without `Upgrade` it answers attach/exec with a 200 and `/session` fails).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones hyper reframes itself.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

/// The protocol a client asks to switch to, as the engine sees it: dockerd
/// treats any `Upgrade` header as a hijack request, whatever `Connection` says.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    headers.get(header::UPGRADE).cloned()
}

/// Removes hop-by-hop headers, including any that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
}

/// Headers for the request sent upstream: hop-by-hop removed, the upgrade pair
/// restored exactly when the client asked for one.
pub fn upstream_request_headers(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// Headers for the response sent to the client. A 101 keeps `Connection` and
/// `Upgrade` (clients check them); everything else loses hop-by-hop headers.
pub fn client_response_headers(headers: &mut HeaderMap, status: StatusCode) {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // A 101 never has a body; a stray length would make docker-java read none.
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::TRANSFER_ENCODING);
        return;
    }
    strip_hop_by_hop(headers);
}

/// True when a response body runs until the connection closes: no length, not
/// chunked, and a status/method that has a body. The engine answers this way
/// when it hijacks an attach/exec that was sent without `Upgrade`.
pub fn is_close_delimited(method: &Method, status: StatusCode, headers: &HeaderMap) -> bool {
    let bodiless = method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    !bodiless
        && !headers.contains_key(header::CONTENT_LENGTH)
        && !headers.contains_key(header::TRANSFER_ENCODING)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn strips_hop_by_hop_and_named_headers_but_keeps_repeats() {
        let mut headers = map(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("x-docker-expose-session-grpc-method", "/a"),
            ("x-docker-expose-session-grpc-method", "/b"),
            ("host", "api.moby.localhost"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert!(!headers.contains_key("connection"));
        assert!(!headers.contains_key("keep-alive"));
        assert!(!headers.contains_key("x-private"));
        assert!(!headers.contains_key("transfer-encoding"));
        let methods: Vec<_> = headers.get_all("x-docker-expose-session-grpc-method").iter().collect();
        assert_eq!(methods, ["/a", "/b"]);
        assert_eq!(headers["host"], "api.moby.localhost");
    }

    #[test]
    fn upgrade_pair_is_restored_for_upgrades_only() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "h2c")]);
        let upgrade = requested_upgrade(&headers);
        upstream_request_headers(&mut headers, upgrade);
        assert_eq!(headers["connection"], "Upgrade");
        assert_eq!(headers["upgrade"], "h2c");

        let mut plain = map(&[("connection", "keep-alive"), ("content-length", "0")]);
        let upgrade = requested_upgrade(&plain);
        upstream_request_headers(&mut plain, upgrade);
        assert!(!plain.contains_key("connection"));
        assert_eq!(plain["content-length"], "0");
    }

    #[test]
    fn switching_protocols_keeps_upgrade_headers_and_drops_lengths() {
        let mut headers = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "tcp"),
            ("content-type", "application/vnd.docker.raw-stream"),
            ("content-length", "0"),
        ]);
        client_response_headers(&mut headers, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(headers["upgrade"], "tcp");
        assert_eq!(headers["connection"], "Upgrade");
        assert!(!headers.contains_key("content-length"));
    }

    #[test]
    fn close_delimited_detection() {
        let none = HeaderMap::new();
        assert!(is_close_delimited(&Method::POST, StatusCode::OK, &none));
        assert!(!is_close_delimited(&Method::HEAD, StatusCode::OK, &none));
        assert!(!is_close_delimited(&Method::POST, StatusCode::NO_CONTENT, &none));
        assert!(!is_close_delimited(&Method::POST, StatusCode::NOT_MODIFIED, &none));
        let chunked = map(&[("transfer-encoding", "chunked")]);
        assert!(!is_close_delimited(&Method::GET, StatusCode::OK, &chunked));
        let sized = map(&[("content-length", "2")]);
        assert!(!is_close_delimited(&Method::GET, StatusCode::OK, &sized));
    }
}
