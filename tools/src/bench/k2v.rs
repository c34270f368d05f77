//! Garage's K2V API as a kvbench target: ReadItem and InsertItem over keep-alive HTTP/1.1
//! (hyper's client), every request signed with AWS SigV4 (`aws-sigv4`, service `k2v`).
//!
//! A benchmark record `key` is the K2V item (partition key `key`, sort key [`SORT_KEY`]), so
//! items spread over Garage's partitions as ringkv's keys spread over its ring. The
//! read-modify-write pattern is ringkv's: a read keeps the item's causality token
//! (`X-Garage-Causality-Token`), and the next insert of that key sends the last token seen,
//! so it replaces the values that read returned (concurrent ones stay as siblings). Garage's
//! InsertItem returns no token, so a token is only ever refreshed by a read.
//!
//! Credentials come from the environment (`GARAGE_K2V_KEY_ID`, `GARAGE_K2V_SECRET`), never
//! from the command line (process listings) nor into the JSON summary.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings,
};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The sort key of every benchmark item.
pub const SORT_KEY: &str = "v";
/// The header carrying an item's causality token (reads return it, inserts send it).
pub const TOKEN_HEADER: &str = "x-garage-causality-token";
/// Environment variables holding the access key.
pub const KEY_ID_ENV: &str = "GARAGE_K2V_KEY_ID";
pub const SECRET_ENV: &str = "GARAGE_K2V_SECRET";

/// Where and as whom to send K2V requests.
#[derive(Clone)]
pub struct K2vAuth {
    pub bucket: String,
    pub region: String,
    credentials: Credentials,
}

impl std::fmt::Debug for K2vAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("K2vAuth")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl K2vAuth {
    pub fn new(bucket: &str, region: &str, key_id: &str, secret: &str) -> K2vAuth {
        K2vAuth {
            bucket: bucket.to_string(),
            region: region.to_string(),
            credentials: Credentials::new(key_id, secret, None, None, "kvbench"),
        }
    }

    /// From [`KEY_ID_ENV`] and [`SECRET_ENV`].
    pub fn from_env(bucket: &str, region: &str) -> Result<K2vAuth, String> {
        let get = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("garage-k2v: set {name} (the K2V access key)"))
        };
        Ok(K2vAuth::new(
            bucket,
            region,
            &get(KEY_ID_ENV)?,
            &get(SECRET_ENV)?,
        ))
    }

    /// The SigV4 headers of a request (`authorization`, `x-amz-date`,
    /// `x-amz-content-sha256: UNSIGNED-PAYLOAD`), signed at `time`.
    pub fn sign(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        time: SystemTime,
    ) -> Result<Vec<(String, String)>, String> {
        let identity = self.credentials.clone().into();
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("k2v")
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| format!("garage-k2v: signing parameters: {e}"))?
            .into();
        let signable = SignableRequest::new(
            method,
            url,
            headers.iter().copied(),
            SignableBody::UnsignedPayload,
        )
        .map_err(|e| format!("garage-k2v: cannot sign {method} {url}: {e}"))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| format!("garage-k2v: cannot sign {method} {url}: {e}"))?
            .into_parts();
        let (signed, _params) = instructions.into_parts();
        Ok(signed
            .into_iter()
            .map(|h| (h.name().to_string(), h.value().to_string()))
            .collect())
    }
}

/// What a ReadItem returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRead {
    /// At least one live value (not only tombstones).
    pub found: bool,
    pub token: Option<String>,
}

/// One keep-alive HTTP/1.1 connection to one Garage node's K2V endpoint (one request at a
/// time, as HTTP/1.1 without pipelining allows).
pub struct K2vConn {
    addr: String,
    auth: K2vAuth,
    sender: http1::SendRequest<Full<Bytes>>,
}

impl K2vConn {
    pub async fn connect(addr: &str, auth: K2vAuth) -> Result<K2vConn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("garage-k2v {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("garage-k2v {addr}: HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(K2vConn {
            addr: addr.to_string(),
            auth,
            sender,
        })
    }

    fn path(&self, key: &str) -> String {
        format!("/{}/{}?sort_key={SORT_KEY}", self.auth.bucket, key)
    }

    /// Sends one signed request; (status, token header, body).
    async fn send(
        &mut self,
        method: &str,
        key: &str,
        extra: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(u16, Option<String>, Bytes), String> {
        let path = self.path(key);
        let url = format!("http://{}{path}", self.addr);
        let mut headers: Vec<(&str, &str)> = vec![("host", self.addr.as_str())];
        headers.extend_from_slice(extra);
        let signed = self.auth.sign(method, &url, &headers, SystemTime::now())?;
        let mut req = hyper::Request::builder().method(method).uri(path);
        for (name, value) in headers {
            req = req.header(name, value);
        }
        for (name, value) in &signed {
            req = req.header(name.as_str(), value.as_str());
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("garage-k2v {}: request for {key}: {e}", self.addr))?;
        self.sender
            .ready()
            .await
            .map_err(|e| format!("garage-k2v {}: connection: {e}", self.addr))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("garage-k2v {}: {method} {key}: {e}", self.addr))?;
        let status = resp.status().as_u16();
        let token = resp
            .headers()
            .get(TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("garage-k2v {}: {method} {key}: body: {e}", self.addr))?
            .to_bytes();
        Ok((status, token, body))
    }

    /// ReadItem, all values as JSON (a conflicted item is a 200 with several values, not a
    /// 409 as with `application/octet-stream`).
    pub async fn read(&mut self, key: &str) -> Result<ItemRead, String> {
        let (status, token, body) = self
            .send("GET", key, &[("accept", "application/json")], Bytes::new())
            .await?;
        match status {
            200 => Ok(ItemRead {
                found: json_has_live_value(&body)
                    .map_err(|e| format!("garage-k2v {}: read {key}: {e}", self.addr))?,
                token,
            }),
            204 | 404 => Ok(ItemRead {
                found: false,
                token,
            }),
            _ => Err(format!(
                "garage-k2v {}: read {key}: HTTP {status}: {}",
                self.addr,
                String::from_utf8_lossy(&body)
            )),
        }
    }

    /// InsertItem, replacing what `token` saw (a blind insert without one).
    pub async fn insert(
        &mut self,
        key: &str,
        value: Bytes,
        token: Option<&str>,
    ) -> Result<(), String> {
        let extra: Vec<(&str, &str)> = token.map(|t| (TOKEN_HEADER, t)).into_iter().collect();
        let (status, _, body) = self.send("PUT", key, &extra, value).await?;
        match status {
            200 | 204 => Ok(()),
            _ => Err(format!(
                "garage-k2v {}: insert {key}: HTTP {status}: {}",
                self.addr,
                String::from_utf8_lossy(&body)
            )),
        }
    }
}

/// A ReadItem JSON body is a list of base64 values, `null` for a deletion marker.
fn json_has_live_value(body: &[u8]) -> Result<bool, String> {
    let values: Vec<Option<String>> =
        serde_json::from_slice(body).map_err(|e| format!("invalid ReadItem JSON: {e}"))?;
    Ok(values.iter().any(Option::is_some))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_item_json_bodies() {
        assert_eq!(json_has_live_value(br#"["aGVsbG8="]"#), Ok(true));
        assert_eq!(json_has_live_value(br#"[null, "aGk="]"#), Ok(true));
        assert_eq!(json_has_live_value(br#"[null]"#), Ok(false));
        assert!(json_has_live_value(b"<html>").is_err());
    }

    /// The signature headers for the K2V scope: the AWS test suite's credentials and time
    /// (get-vanilla), service `k2v`, unsigned payload. (That Garage accepts them is checked
    /// by every benchmark run against it.)
    #[test]
    fn signs_with_the_k2v_scope_and_an_unsigned_payload() {
        let auth = K2vAuth::new(
            "b",
            "us-east-1",
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        );
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160); // 2015-08-30T12:36:00Z
        let headers = auth
            .sign(
                "GET",
                "http://example.amazonaws.com/",
                &[("host", "example.amazonaws.com")],
                time,
            )
            .expect("signs");
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(get("x-amz-date"), "20150830T123600Z");
        assert_eq!(get("x-amz-content-sha256"), "UNSIGNED-PAYLOAD");
        let authz = get("authorization");
        assert!(
            authz.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/k2v/aws4_request, \
                 SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature="
            ),
            "{authz}"
        );
        // The secret never appears in what is sent, nor in Debug output.
        assert!(!authz.contains("wJalrXUtnFEMI"));
        assert!(!format!("{auth:?}").contains("wJalrXUtnFEMI"));
    }
}
