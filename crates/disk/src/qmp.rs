//! A thin QMP client (QEMU Machine Protocol: one JSON object per line over a unix socket).
//!
//! QEMU and qemu-storage-daemon greet with `{"QMP": {...}}`; the client answers
//! `qmp_capabilities` and then sends commands with an `id`, skipping asynchronous events (kept for
//! [`QmpClient::take_events`]) until the reply with that id arrives. Every line read is bounded by
//! [`MAX_LINE`], so a misbehaving peer cannot make the daemon allocate without limit, and every
//! wait is bounded by the client's timeout.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest QMP message accepted (QEMU's replies to the commands used here are a few KiB).
pub const MAX_LINE: usize = 1 << 20;
/// Most events kept between two [`QmpClient::take_events`] calls.
const MAX_EVENTS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QMP peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("QMP peer closed the connection")]
    Closed,
    #[error("QMP message is over {MAX_LINE} bytes")]
    TooLong,
    #[error("QMP peer sent something that is not a QMP message: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    next_id: u64,
    events: Vec<Value>,
    /// The pid of the process at the other end (`SO_PEERCRED`), if the kernel told.
    peer_pid: Option<i32>,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let stream = tokio::time::timeout(timeout, connect_retrying(path))
            .await
            .map_err(|_| QmpError::Timeout(timeout))??;
        let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid());
        let (read, writer) = stream.into_split();
        let mut client = QmpClient {
            reader: BufReader::new(read),
            writer,
            timeout,
            next_id: 1,
            events: Vec::new(),
            peer_pid,
        };
        let greeting = client.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// The pid of the QEMU process this client talks to, if known.
    pub fn peer_pid(&self) -> Option<i32> {
        self.peer_pid
    }

    /// Runs `command` and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        tokio::time::timeout(self.timeout, self.writer.write_all(line.as_bytes()))
            .await
            .map_err(|_| QmpError::Timeout(self.timeout))??;
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                if self.events.len() < MAX_EVENTS {
                    self.events.push(msg);
                }
                continue;
            }
            if msg.get("QMP").is_some() {
                // A second greeting: QEMU sends one when the connection opens and another when
                // the monitor attaches to a chardev that is already connected, so a client that
                // connects while QEMU is still starting can see two. It is not a reply.
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Protocol(format!(
                    "reply for another request: {msg}"
                )));
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "reply without return or error: {msg}"
            )));
        }
    }

    /// Sends `quit` and waits until the peer closes the connection.
    pub async fn quit(mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => {}
            Err(e) => return Err(e),
        }
        loop {
            match self.read_message().await {
                Err(QmpError::Closed) => return Ok(()),
                Err(QmpError::Io(_)) => return Ok(()),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
    }

    /// The asynchronous events received so far (e.g. BLOCK_JOB_COMPLETED, SHUTDOWN).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let read = async {
            loop {
                let available = self.reader.fill_buf().await?;
                if available.is_empty() {
                    return Err(QmpError::Closed);
                }
                let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                    Some(i) => (&available[..=i], true),
                    None => (available, false),
                };
                if line.len() + chunk.len() > MAX_LINE {
                    return Err(QmpError::TooLong);
                }
                line.extend_from_slice(chunk);
                let used = chunk.len();
                self.reader.consume(used);
                if done {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| QmpError::Timeout(self.timeout))??;
        serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(format!("invalid JSON ({e})")))
    }
}

/// Connects, retrying while the listener's backlog is full: QEMU accepts one QMP client at a time
/// with a backlog of one, so a connect can meet EAGAIN while an earlier client is being served.
async fn connect_retrying(path: &Path) -> Result<UnixStream, QmpError> {
    let mut pause = Duration::from_millis(5);
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(source) => {
                return Err(QmpError::Connect {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP peer: sends the greeting, then answers each request line with `answer(request)`.
    async fn fake_peer(listener: UnixListener, answers: Vec<String>) {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .expect("greet");
        for answer in answers {
            let Ok(Some(_request)) = lines.next_line().await else {
                return;
            };
            write.write_all(answer.as_bytes()).await.expect("answer");
        }
    }

    fn socket_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("vmr-qmp-{}-{name}.sock", std::process::id()))
    }

    #[tokio::test]
    async fn events_are_skipped_and_errors_are_typed() {
        let path = socket_path("events");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let peer = tokio::spawn(fake_peer(
            listener,
            vec![
                "{\"return\": {}, \"id\": 1}\r\n".into(),
                "{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {}}\r\n{\"return\": [1, 2], \"id\": 2}\r\n".into(),
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such node\"}, \"id\": 3}\r\n".into(),
            ],
        ));
        let mut qmp = QmpClient::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        assert_eq!(
            qmp.execute("query-x", None).await.expect("ok"),
            json!([1, 2])
        );
        assert_eq!(qmp.take_events().len(), 1);
        match qmp
            .execute("block-dirty-bitmap-remove", Some(json!({"node": "n"})))
            .await
        {
            Err(QmpError::Command { class, desc, .. }) => assert_eq!(
                (class.as_str(), desc.as_str()),
                ("GenericError", "no such node")
            ),
            other => panic!("expected a command error, got {other:?}"),
        }
        peer.await.expect("peer");
        let _ = std::fs::remove_file(&path);
    }

    /// QEMU greets a second time when a client connects before the monitor attaches to its
    /// chardev (seen with qemu-storage-daemon 10.0 started just before the connect); that greeting
    /// is not the reply to `qmp_capabilities`.
    #[tokio::test]
    async fn a_second_greeting_is_not_a_reply() {
        let path = socket_path("twice");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let peer = tokio::spawn(fake_peer(
            listener,
            vec![
                "{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\r\n{\"return\": {}, \"id\": 1}\r\n".into(),
                "{\"return\": 7, \"id\": 2}\r\n".into(),
            ],
        ));
        let mut qmp = QmpClient::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        assert_eq!(qmp.execute("query-x", None).await.expect("ok"), json!(7));
        peer.await.expect("peer");
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn an_endless_line_is_refused() {
        let path = socket_path("long");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let peer = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..(MAX_LINE / chunk.len() + 2) {
                if stream.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let result = QmpClient::connect(&path, Duration::from_secs(5)).await;
        assert!(
            matches!(result, Err(QmpError::TooLong)),
            "{:?}",
            result.err()
        );
        peer.abort();
        let _ = std::fs::remove_file(&path);
    }
}
