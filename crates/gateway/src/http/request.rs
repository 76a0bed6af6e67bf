//! Reading an HTTP request before any event is looked at: the write key from
//! basic auth, and the body, gunzipped when it is gzip whatever its label
//! (RudderStack's Node client sends gzip labelled
//! `application/x-www-form-urlencoded`), never past the size limit.

use std::io::Read;

use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, CONTENT_ENCODING};
use base64::Engine;

use crate::error::GatewayError;

/// The write key of `Authorization: Basic base64("<key>:")`, if the request
/// carries basic auth. Another scheme, or a header that does not decode, is an
/// error: the client meant to authenticate and did it wrong.
pub fn write_key(headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let bad =
        || GatewayError::Unauthenticated("the Authorization header is not valid basic auth".into());
    let value = value.to_str().map_err(|_| bad())?;
    let (scheme, encoded) = value.trim().split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(GatewayError::Unauthenticated(format!(
            "use basic auth with the write key as user name, not {scheme}"
        )));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let key = decoded
        .split_once(':')
        .map_or(decoded.as_str(), |(user, _)| user);
    Ok(Some(key.to_owned()))
}

/// The body's bytes, gunzipped if it is gzip (by `Content-Encoding` or by its
/// magic number), at most `limit` bytes once decompressed.
pub fn body(headers: &HeaderMap, raw: &[u8], limit: usize) -> Result<Vec<u8>, GatewayError> {
    let labelled = headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let gzip = match labelled.as_deref() {
        Some("gzip" | "x-gzip") => true,
        None | Some("" | "identity") => raw.starts_with(&[0x1f, 0x8b]),
        Some(other) => {
            return Err(GatewayError::InvalidArgument(format!(
                "Content-Encoding {other} is not supported (gzip or none)"
            )));
        }
    };
    let too_large = || GatewayError::TooLarge(format!("the body is over the {limit}-byte limit"));
    if !gzip {
        if raw.len() > limit {
            return Err(too_large());
        }
        return Ok(raw.to_vec());
    }
    // Read one byte past the limit to tell "exactly at" from "over" without
    // ever inflating more than that (a small gzip can expand enormously).
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| GatewayError::InvalidArgument(format!("the body is not valid gzip: {e}")))?;
    if out.len() > limit {
        return Err(too_large());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::http::HeaderValue;
    use std::io::Write;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn the_write_key_is_the_basic_auth_user_name() {
        // base64("wk_123:") as Segment's clients send it.
        let h = headers(&[("authorization", "Basic d2tfMTIzOg==")]);
        assert_eq!(write_key(&h).unwrap().as_deref(), Some("wk_123"));
        assert_eq!(write_key(&HeaderMap::new()).unwrap(), None);
        for bad in ["Bearer abc", "Basic !!!", "Basic"] {
            let err = write_key(&headers(&[("authorization", bad)])).unwrap_err();
            assert!(
                matches!(err, GatewayError::Unauthenticated(_)),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn gzip_is_read_whatever_its_label() {
        let json = br#"{"batch":[]}"#;
        let labelled = headers(&[("content-encoding", "gzip")]);
        assert_eq!(body(&labelled, &gzip(json), 100).unwrap(), json);
        // RudderStack's Node client: gzip, labelled as a form, no encoding header.
        let form = headers(&[("content-type", "application/x-www-form-urlencoded")]);
        assert_eq!(body(&form, &gzip(json), 100).unwrap(), json);
        assert_eq!(body(&HeaderMap::new(), json, 100).unwrap(), json);
    }

    #[test]
    fn limits_apply_after_decompression() {
        let big = vec![b' '; 10_000];
        let compressed = gzip(&big);
        assert!(compressed.len() < 100);
        assert_eq!(
            body(&HeaderMap::new(), &compressed, 10_000).unwrap().len(),
            10_000
        );
        let err = body(&HeaderMap::new(), &compressed, 9_999).unwrap_err();
        assert!(matches!(err, GatewayError::TooLarge(_)), "{err}");
        let err = body(&HeaderMap::new(), &big, 9_999).unwrap_err();
        assert!(matches!(err, GatewayError::TooLarge(_)), "{err}");
        let broken = headers(&[("content-encoding", "gzip")]);
        let err = body(&broken, b"not gzip", 100).unwrap_err();
        assert!(err.to_string().contains("not valid gzip"), "{err}");
        let err = body(&headers(&[("content-encoding", "br")]), b"{}", 100).unwrap_err();
        assert!(err.to_string().contains("br is not supported"), "{err}");
    }
}
