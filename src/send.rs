//! `hirehop-relay send`: posts a realistic HireHop webhook to a relay and returns the answer,
//! so a deployment can be tested end to end.

use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("invalid URL {0}: expected http://host[:port]/path")]
    Url(String),
    #[error("failed to connect to {addr}: {cause}")]
    Connect { addr: String, cause: std::io::Error },
    #[error("HTTP exchange with {addr} failed: {cause}")]
    Http { addr: String, cause: hyper::Error },
}

/// What to send.
pub struct Sample<'a> {
    pub event: &'a str,
    pub export_key: &'a str,
    pub company_id: u64,
}

/// A body shaped like HireHop's for `event`: the documented envelope, with `data` and
/// `changes` typical of the event's family.
pub fn sample_body(sample: &Sample<'_>) -> String {
    let (data, changes) = match sample.event {
        event if event.starts_with("job.") => (
            json!({
                "ID": 1234, "NUMBER": 1234, "JOB_NAME": "Summer festival main stage",
                "STATUS": 2, "OUT_DATE": "2026-07-01 08:00:00", "RETURN_DATE": "2026-07-05 18:00:00",
                "CUSTOM_FIELDS": {"PO_NUMBER": "PO-5521"}
            }),
            json!({"STATUS": {"from": "1", "to": "2"}}),
        ),
        event if event.starts_with("invoice.") => (
            json!({"ID": 77, "NUMBER": "INV-0077", "JOB_ID": 1234, "STATUS": 1, "TOTAL": "1520.00"}),
            json!({"STATUS": {"from": "0", "to": "1"}}),
        ),
        event if event.starts_with("contact.") => (
            json!({"ID": 501, "NAME": "Stage Hire Ltd", "EMAIL": "office@example.com"}),
            json!([]),
        ),
        _ => (json!({"ID": 1}), json!([])),
    };
    let time = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    // HireHop's own format: "YYYY-MM-DD HH:MM:SS", UTC.
    let time = time.trim_end_matches('Z').replace('T', " ");
    let body: Value = json!({
        "time": time,
        "user_id": 1,
        "user_name": "Test User",
        "user_email": "test@example.com",
        "company_id": sample.company_id,
        "export_key": sample.export_key,
        "event": sample.event,
        "data": data,
        "changes": changes,
    });
    body.to_string()
}

/// Posts the sample to `url` (plain HTTP) and returns the status and body of the answer.
pub async fn send(url: &str, sample: &Sample<'_>) -> Result<(StatusCode, String), SendError> {
    let uri: Uri = url.parse().map_err(|_| SendError::Url(url.to_owned()))?;
    let (Some("http"), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(SendError::Url(url.to_owned()));
    };
    let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|cause| SendError::Connect {
            addr: addr.clone(),
            cause,
        })?;
    let http = |cause| SendError::Http {
        addr: addr.clone(),
        cause,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::post(path)
        .header("host", host)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("hirehop-relay-send/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(sample_body(sample))))
        .map_err(|_| SendError::Url(url.to_owned()))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;

    #[test]
    fn samples_are_envelopes_the_relay_reads() {
        for event in [
            "job.status.updated",
            "invoice.status.updated",
            "contact.person.created",
            "x.y",
        ] {
            let body = sample_body(&Sample {
                event,
                export_key: "k",
                company_id: 9,
            });
            let envelope = Envelope::parse(body.as_bytes()).unwrap();
            assert_eq!(envelope.event.as_deref(), Some(event));
            assert_eq!(envelope.company_id, Some(9));
            let time = serde_json::from_str::<Value>(&body).unwrap()["time"]
                .as_str()
                .unwrap()
                .to_owned();
            assert_eq!(time.len(), 19, "{time}");
        }
    }
}
