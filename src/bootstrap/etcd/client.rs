//! etcd's v3 API through its JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/lease/...`,
//! `/v3/watch`): keys and values travel base64-encoded, 64-bit numbers as strings. A call goes
//! to the endpoints in turn, starting with the one that answered last, each given at most
//! [`ATTEMPT`] in the first round (so that a stopped or unreachable member cannot take the
//! whole deadline), twice that in the next and so on up to [`MAX_ATTEMPT`] (so that a cluster
//! that is slow to answer, an fsync on a loaded disk say, is not asked again and again in
//! vain), until one answers; an answer that says the member cannot serve now (no leader, overloaded, a 5xx)
//! counts as no answer. While none answers, it tries again until its deadline, and then names
//! them all and the last error.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http;
use crate::bootstrap::exec;
use crate::sys::sync::{AtomicBool, AtomicU32, Ordering};

/// The longest one endpoint is given for one request in the first round over the endpoints.
const ATTEMPT: Duration = Duration::from_secs(1);
/// The longest one endpoint is given for one request in any later round.
const MAX_ATTEMPT: Duration = Duration::from_secs(8);

/// An etcd cluster, by its client endpoints.
#[derive(Debug)]
pub(crate) struct Client {
    pub endpoints: Vec<SocketAddr>,
    /// The endpoint that answered last: the next call starts there.
    good: AtomicU32,
}

impl Client {
    pub(crate) fn new(endpoints: Vec<SocketAddr>) -> Client {
        Client { endpoints, good: AtomicU32::new(0) }
    }
}

impl Clone for Client {
    fn clone(&self) -> Client {
        Client::new(self.endpoints.clone())
    }
}

impl PartialEq for Client {
    fn eq(&self, other: &Client) -> bool {
        self.endpoints == other.endpoints
    }
}

impl Eq for Client {}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallError {
    /// No endpoint answered before the deadline; the last error seen.
    Unreachable(String),
    /// An endpoint answered with an error.
    Refused(String),
    /// The formation was abandoned.
    Abandoned,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(s) => write!(f, "etcd did not answer: {s}"),
            CallError::Refused(s) => write!(f, "etcd refused: {s}"),
            CallError::Abandoned => f.write_str("the formation was abandoned"),
        }
    }
}

/// A key and its value, as a range returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// One condition of a transaction.
pub(crate) enum Cmp<'a> {
    /// The key does not exist.
    Absent(&'a str),
    /// The key exists.
    Present(&'a str),
    /// The key was last changed at this revision (0: it does not exist).
    ModRevision(&'a str, i64),
    /// The key holds this value.
    Value(&'a str, &'a [u8]),
}

/// One operation of a transaction.
pub(crate) enum Op<'a> {
    /// Puts `value` at the key, bound to a lease (0: none).
    Put(&'a str, &'a [u8], i64),
    Delete(&'a str),
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub kv: Kv,
    pub deleted: bool,
}

pub(crate) fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() { A[(n >> shift) as usize & 63] as char } else { '=' });
        }
    }
    out
}

pub(crate) fn unb64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in s {
        acc = (acc << 6) | u32::from(val(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The key just after every key that starts with `prefix` (a range's end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn num(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv_of(v: &Value) -> Kv {
    let text = |k: &str| v.get(k).and_then(Value::as_str).and_then(unb64).unwrap_or_default();
    Kv {
        key: String::from_utf8_lossy(&text("key")).into_owned(),
        value: text("value"),
        create_revision: v.get("create_revision").map_or(0, num),
        mod_revision: v.get("mod_revision").map_or(0, num),
        lease: v.get("lease").map_or(0, num),
    }
}

impl Client {
    /// Runs `attempt` at each endpoint in turn (the last one that answered first), each time
    /// with at most [`ATTEMPT`] of the time left (doubled each round, up to [`MAX_ATTEMPT`]),
    /// again and again until one is done or `deadline` passes.
    async fn rotate<T, F, Fut>(
        &self,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
        mut attempt: F,
    ) -> Result<T, CallError>
    where
        F: FnMut(SocketAddr, Instant) -> Fut,
        Fut: std::future::Future<Output = Tried<T>>,
    {
        let mut backoff = Duration::from_millis(5);
        let mut each = ATTEMPT;
        let mut last = String::from("the deadline passed before one was asked");
        let n = self.endpoints.len();
        loop {
            let first = self.good.load(Ordering::Relaxed) as usize;
            for i in (0..n).map(|k| (first + k) % n) {
                if crate::bootstrap::addr::is_cancelled(cancel) {
                    return Err(CallError::Abandoned);
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                match attempt(self.endpoints[i], deadline.min(now + each)).await {
                    Tried::Done(v) => {
                        self.good.store(i as u32, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Tried::Next(why) => last = why,
                    Tried::Stop(e) => return Err(e),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let all: Vec<String> = self.endpoints.iter().map(|e| e.to_string()).collect();
                return Err(CallError::Unreachable(format!("endpoints {}; last: {last}", all.join(", "))));
            }
            exec::sleep_until((now + backoff).min(deadline)).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
            each = (each * 2).min(MAX_ATTEMPT);
        }
    }

    /// One call: `path` with `req`, to each endpoint in turn, again and again until one
    /// answers or `deadline` passes.
    pub(crate) async fn call(
        &self,
        path: &str,
        req: &Value,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> Result<Value, CallError> {
        let body = req.to_string();
        let body = body.as_bytes();
        self.rotate(deadline, cancel, |e, until| async move {
            let r = match http::post(e, path, body, until, cancel).await {
                Ok(r) => r,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => return Tried::Stop(CallError::Abandoned),
                Err(err) => return Tried::Next(format!("{e}: {err}")),
            };
            let parsed: Option<Value> = serde_json::from_slice(&r.body).ok();
            let msg = parsed
                .as_ref()
                .and_then(|v| v.get("message").or_else(|| v.get("error")))
                .and_then(Value::as_str)
                .unwrap_or("error")
                .to_owned();
            // gRPC's Unavailable (14), DeadlineExceeded (4), ResourceExhausted (8): this
            // member cannot serve now; another may.
            let code = parsed.as_ref().and_then(|v| v.get("code")).and_then(Value::as_i64);
            if r.status >= 500 || matches!(code, Some(4 | 8 | 14)) {
                return Tried::Next(format!("{e}: {msg}"));
            }
            match parsed {
                None => Tried::Stop(CallError::Refused(format!("{e} answered {} with no JSON", r.status))),
                Some(_) if r.status != 200 => Tried::Stop(CallError::Refused(format!("{e}: {msg}"))),
                Some(v) => Tried::Done(v),
            }
        })
        .await
    }

    /// Every key that starts with `prefix`, sorted, and the store's revision.
    pub(crate) async fn range_prefix(
        &self,
        prefix: &str,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> Result<(i64, Vec<Kv>), CallError> {
        let req = json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)) });
        let v = self.call("/v3/kv/range", &req, deadline, cancel).await?;
        let rev = v.pointer("/header/revision").map_or(0, num);
        let kvs = v.get("kvs").and_then(Value::as_array).map(|a| a.iter().map(kv_of).collect()).unwrap_or_default();
        Ok((rev, kvs))
    }

    /// A transaction: `ops` if every condition in `cmps` holds; true if they did.
    pub(crate) async fn txn(
        &self,
        cmps: &[Cmp<'_>],
        ops: &[Op<'_>],
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> Result<bool, CallError> {
        let compare: Vec<Value> = cmps
            .iter()
            .map(|c| match c {
                Cmp::Absent(k) => json!({ "key": b64(k.as_bytes()), "target": "CREATE", "create_revision": "0" }),
                Cmp::Present(k) => {
                    json!({ "key": b64(k.as_bytes()), "target": "CREATE", "result": "GREATER", "create_revision": "0" })
                }
                Cmp::ModRevision(k, r) => {
                    json!({ "key": b64(k.as_bytes()), "target": "MOD", "mod_revision": r.to_string() })
                }
                Cmp::Value(k, v) => json!({ "key": b64(k.as_bytes()), "target": "VALUE", "value": b64(v) }),
            })
            .collect();
        let success: Vec<Value> = ops.iter().map(op_json).collect();
        let req = json!({ "compare": compare, "success": success });
        let v = self.call("/v3/kv/txn", &req, deadline, cancel).await?;
        Ok(v.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }

    pub(crate) async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), CallError> {
        self.txn(&[], &[Op::Put(key, value, lease)], deadline, cancel).await.map(|_| ())
    }

    pub(crate) async fn delete(
        &self,
        key: &str,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), CallError> {
        self.call("/v3/kv/deleterange", &json!({ "key": b64(key.as_bytes()) }), deadline, cancel).await.map(|_| ())
    }

    /// A new lease of `ttl` seconds; its id.
    pub(crate) async fn grant(
        &self,
        ttl: u64,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> Result<i64, CallError> {
        let v = self.call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() }), deadline, cancel).await?;
        match v.get("ID").map_or(0, num) {
            0 => Err(CallError::Refused(format!("no lease granted: {v}"))),
            id => Ok(id),
        }
    }

    /// Keeps lease `id` alive; its remaining time in seconds (0: it expired).
    pub(crate) async fn keepalive(&self, id: i64, deadline: Instant) -> Result<i64, CallError> {
        let v = self.call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }), deadline, None).await?;
        Ok(v.pointer("/result/TTL").or_else(|| v.get("TTL")).map_or(0, num))
    }

    /// Watches every key under `prefix` from revision `from` on.
    pub(crate) async fn watch_prefix(
        &self,
        prefix: &str,
        from: i64,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> Result<Watch, CallError> {
        let req = json!({ "create_request": {
            "key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)), "start_revision": from.to_string() } });
        let body = req.to_string();
        let body = body.as_bytes();
        // Only the headers within one attempt's time; the stream then lives on.
        let stream = self
            .rotate(deadline, cancel, |e, until| async move {
                match http::post_stream(e, "/v3/watch", body, until, cancel).await {
                    Ok(s) if s.status == 200 => Tried::Done(s),
                    Ok(s) => Tried::Next(format!("{e}: watch answered {}", s.status)),
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => Tried::Stop(CallError::Abandoned),
                    Err(err) => Tried::Next(format!("{e}: {err}")),
                }
            })
            .await?;
        Ok(Watch { stream })
    }
}

/// What one attempt at one endpoint came to (`Client::rotate`).
enum Tried<T> {
    Done(T),
    /// This endpoint cannot serve now (why): try the next.
    Next(String),
    /// An answer that ends the call.
    Stop(CallError),
}

fn op_json(op: &Op<'_>) -> Value {
    match op {
        Op::Put(k, v, lease) => {
            json!({ "request_put": { "key": b64(k.as_bytes()), "value": b64(v), "lease": lease.to_string() } })
        }
        Op::Delete(k) => json!({ "request_delete_range": { "key": b64(k.as_bytes()) } }),
    }
}

/// A watch's stream of changes.
pub(crate) struct Watch {
    stream: http::Stream,
}

impl Watch {
    /// The next batch of changes (empty for the watch's own notices); `Err` with `TimedOut`
    /// when nothing came before `deadline`, `Ok(None)` when the stream ended.
    pub(crate) async fn next(
        &mut self,
        deadline: Instant,
        cancel: Option<&AtomicBool>,
    ) -> std::io::Result<Option<Vec<Change>>> {
        let Some(line) = self.stream.next_line(deadline, cancel).await? else { return Ok(None) };
        let v: Value = serde_json::from_slice(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("watch: {e}")))?;
        // A watch etcd cancelled (its start revision compacted away, say) is over.
        if v.pointer("/result/canceled").and_then(Value::as_bool) == Some(true) || v.get("error").is_some() {
            return Ok(None);
        }
        let events = v.pointer("/result/events").and_then(Value::as_array).cloned().unwrap_or_default();
        Ok(Some(
            events
                .iter()
                .map(|e| Change {
                    kv: e.get("kv").map(kv_of).unwrap_or_else(|| kv_of(&Value::Null)),
                    deleted: e.get("type").and_then(Value::as_str) == Some("DELETE"),
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_known_text() {
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b""), "");
        assert_eq!(unb64("Zm9vYmFy").unwrap(), b"foobar");
        assert_eq!(unb64("Zm8=").unwrap(), b"fo");
        assert!(unb64("Zm9v!").is_none());
        for n in 0..300usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            assert_eq!(unb64(&b64(&data)).unwrap(), data);
        }
    }

    #[test]
    fn a_prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("a/b/"), b"a/b0");
        assert_eq!(prefix_end("\u{7f}"), [0x80]);
        assert_eq!(prefix_end(""), [0]);
    }
}
