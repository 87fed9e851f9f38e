//! The webhooks the benchmark sends: realistic HireHop envelopes of a fixed size, spread over
//! a few event names so the four-queue layout gets one event per queue.

use bytes::Bytes;
use serde_json::json;

/// The event names sent, in rotation. The four-queue layout binds one queue to each.
pub const EVENTS: [&str; 4] = [
    "job.status.updated",
    "job.updated",
    "invoice.created",
    "contact.person.updated",
];

/// One request body and what the relay reads out of it (the raw publisher needs the event as
/// routing key, and the ids for the relay's headers with `--raw-properties relay`).
#[derive(Debug, Clone)]
pub struct Webhook {
    pub event: &'static str,
    pub company_id: u64,
    pub user_id: u64,
    pub body: Bytes,
}

/// `count` distinct webhooks signed with `export_key`, each exactly `body_bytes` long (or as
/// short as the envelope allows, if `body_bytes` is smaller than that).
pub fn webhooks(export_key: &str, count: usize, body_bytes: usize) -> Vec<Webhook> {
    (0..count)
        .map(|i| {
            let event = EVENTS[i % EVENTS.len()];
            let (company_id, user_id) = (COMPANY_ID, user_id(i));
            Webhook {
                event,
                company_id,
                user_id,
                body: Bytes::from(body(export_key, event, i, body_bytes)),
            }
        })
        .collect()
}

/// The `company_id` of every webhook.
const COMPANY_ID: u64 = 1;

/// The `user_id` of the `i`th webhook.
fn user_id(i: usize) -> u64 {
    1 + (i % 7) as u64
}

/// A HireHop envelope as its webhooks look (PHP `json_encode`, `changes` as an object), with
/// the job notes padded so the whole body has the wanted size.
fn body(export_key: &str, event: &'static str, i: usize, body_bytes: usize) -> String {
    let render = |notes: &str| {
        let id = 10_000 + i;
        json!({
            "time": "2024-05-14 09:31:07",
            "user_id": user_id(i),
            "user_name": "Jane Doe",
            "user_email": "jane.doe@example-rentals.co.uk",
            "company_id": COMPANY_ID,
            "export_key": export_key,
            "event": event,
            "data": {
                "ID": id,
                "NUMBER": id,
                "JOB_NAME": "Summer festival main stage",
                "COMPANY": "Example Events Ltd",
                "NAME": "John Smith",
                "ADDRESS": "Unit 4, Riverside Trading Estate\nHigh Street\nLondon\nSE1 9XX",
                "TELEPHONE": "+44 20 7946 0000",
                "EMAIL": "bookings@example-events.co.uk",
                "CLIENT_REF": format!("PO-{id}"),
                "JOB_DATE": "2024-07-12 08:00:00",
                "JOB_END": "2024-07-15 23:00:00",
                "OUT_DATE": "2024-07-11 14:00:00",
                "RETURN_DATE": "2024-07-16 10:00:00",
                "STATUS": 2,
                "DEPOT": 1,
                "PROJECT_ID": 0,
                "MANAGER": 3,
                "MANAGER2": 0,
                "VAT_RATE": 20,
                "CURRENCY": "GBP",
                "TOTAL": "12450.00",
                "NOTES": notes,
            },
            "changes": {
                "STATUS": {"from": "1", "to": "2"},
                "RETURN_DATE": {"from": "2024-07-15 10:00:00", "to": "2024-07-16 10:00:00"},
            },
        })
        .to_string()
    };
    let unpadded = render("").len();
    let filler = "Load-in via the rear gate; forklift on site. ";
    let notes: String = filler
        .chars()
        .cycle()
        .take(body_bytes.saturating_sub(unpadded))
        .collect();
    render(&notes)
}
