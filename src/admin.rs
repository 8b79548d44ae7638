//! The admin socket: one JSON request per line from `qrbd <command>`, one JSON response line
//! back. The daemon side runs on the actor system's runtime; the client side is plain blocking
//! I/O for the CLI.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qrbd_actors::status::ResourceStatus;
use serde::{Deserialize, Serialize};

/// The environment variable that enables the daemon's test hooks
/// ([`AdminRequest::TestSendData`]).
pub const TEST_HOOKS_ENV: &str = "QRBD_TEST_HOOKS";

/// A command for the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum AdminRequest {
    Status {
        resource: Option<String>,
    },
    Up {
        resource: String,
    },
    Down {
        resource: String,
    },
    Primary {
        resource: String,
        force: bool,
    },
    Secondary {
        resource: String,
    },
    Verify {
        resource: String,
    },
    SkipInitialSync {
        resource: String,
    },
    Invalidate {
        resource: String,
        /// The peer's data rather than this node's.
        #[serde(default)]
        remote: bool,
    },
    SuspendIo {
        resource: String,
    },
    ResumeIo {
        resource: String,
    },
    Connect {
        resource: String,
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect {
        resource: String,
    },
    /// Stream state changes, one line each, until the client goes away.
    Events,
    /// A test hook, refused unless the daemon runs with `QRBD_TEST_HOOKS=1`: sends `len` bytes
    /// of `byte` at `offset` to every connected peer as a replicated write, whatever this
    /// node's role, so that tests can show how a peer treats data it must not accept.
    TestSendData {
        resource: String,
        offset: u64,
        len: u64,
        byte: u8,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum AdminResponse {
    Done { message: String },
    Status { resources: Vec<ResourceStatus> },
    Failed { message: String },
}

impl AdminResponse {
    pub fn done(message: impl Into<String>) -> Self {
        AdminResponse::Done {
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        AdminResponse::Failed {
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("cannot reach the qrbd daemon at {path}: {source} (is `qrbd daemon` running with this configuration?)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the qrbd daemon at {path} failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the qrbd daemon at {path} sent an answer this client does not understand: {detail}")]
    BadAnswer { path: PathBuf, detail: String },
}

/// How long the CLI waits for an answer. Role changes wait for in-flight I/O, so be generous.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one request and waits for its answer.
pub fn request(socket: &Path, req: &AdminRequest) -> Result<AdminResponse, AdminClientError> {
    let io_error = |source| AdminClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(|source| AdminClientError::Unreachable {
        path: socket.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(io_error)?;
    let mut line = serde_json::to_string(req).map_err(|error| AdminClientError::BadAnswer {
        path: socket.to_owned(),
        detail: error.to_string(),
    })?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io_error)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(io_error)?;
    serde_json::from_str(answer.trim()).map_err(|error| AdminClientError::BadAnswer {
        path: socket.to_owned(),
        detail: format!("{error}: {:?}", answer.trim()),
    })
}

/// Set by SIGINT/SIGTERM while `events` streams, so that Ctrl-C ends it cleanly.
static STOP_EVENTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP_EVENTS.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// `qrbd events`: prints every line the daemon streams until the daemon goes away or the user
/// presses Ctrl-C (a clean end, exit status 0).
pub fn stream_events(socket: &Path, out: &mut impl Write) -> Result<(), AdminClientError> {
    let io_error = |source| AdminClientError::Io {
        path: socket.to_owned(),
        source,
    };
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            request_stop as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            request_stop as *const () as libc::sighandler_t,
        );
    }
    let stream = UnixStream::connect(socket).map_err(|source| AdminClientError::Unreachable {
        path: socket.to_owned(),
        source,
    })?;
    // Wake up now and then to notice Ctrl-C.
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io_error)?;
    let mut line = serde_json::to_string(&AdminRequest::Events).unwrap_or_default();
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io_error)?;
    let mut reader = BufReader::new(&stream);
    let mut pending = Vec::new();
    loop {
        if STOP_EVENTS.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let mut chunk = [0u8; 4096];
        match std::io::Read::read(&mut reader, &mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                pending.extend_from_slice(&chunk[..n]);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let rest = pending.split_off(end + 1);
                    out.write_all(&pending).map_err(io_error)?;
                    out.flush().map_err(io_error)?;
                    pending = rest;
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(error) => return Err(io_error(error)),
        }
    }
}

/// Parses a request line from a client, with an error the client can show.
pub fn parse_request(line: &str) -> Result<AdminRequest, String> {
    serde_json::from_str(line.trim()).map_err(|error| format!("malformed admin request: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let req = AdminRequest::Primary {
            resource: "r0".into(),
            force: true,
        };
        let line = serde_json::to_string(&req).expect("a request serializes");
        assert_eq!(
            line,
            r#"{"command":"primary","resource":"r0","force":true}"#
        );
        assert_eq!(parse_request(&line), Ok(req));
    }

    #[test]
    fn garbage_gets_a_clear_error() {
        let error =
            parse_request("{\"command\":\"explode\"}").expect_err("an unknown command is refused");
        assert!(error.contains("malformed admin request"), "{error}");
    }

    #[test]
    fn missing_daemon_is_reported_with_the_path() {
        let error = request(
            Path::new("/nonexistent/qrbd.sock"),
            &AdminRequest::Status { resource: None },
        )
        .expect_err("no daemon listens there")
        .to_string();
        assert!(error.contains("/nonexistent/qrbd.sock"), "{error}");
        assert!(error.contains("qrbd daemon"), "{error}");
    }
}
