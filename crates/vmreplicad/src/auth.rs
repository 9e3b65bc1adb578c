//! Who may use the management endpoints.
//!
//! | listener                 | accepted                                                        |
//! |--------------------------|-----------------------------------------------------------------|
//! | loopback, plain HTTP     | anyone on this host, unless a credentials file is configured   |
//! | HTTPS (any address)      | HTTP Basic credentials from the credentials file, or a client   |
//! |                          | certificate signed by the configured client CA                  |
//! | non-loopback, plain HTTP | refused at start-up                                             |
//!
//! The credentials file has one `user:$argon2id$...` line per user (PHC strings, as
//! `vmreplica credentials add` writes them); `#` starts a comment. pywbem and wbemcli send Basic
//! credentials; /healthz needs none.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use blake2::{Blake2s256, Digest};
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the credentials file {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected 'user:$argon2id$...' (a PHC password hash)")]
    Malformed { path: String, line: usize },
}

/// The users of the credentials file with their password hashes (PHC strings).
pub struct Credentials {
    users: Vec<(String, String)>,
}

impl Credentials {
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut users = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = || CredentialsError::Malformed {
                path: shown.clone(),
                line: i + 1,
            };
            let (user, hash) = line.split_once(':').ok_or_else(malformed)?;
            PasswordHash::new(hash).map_err(|_| malformed())?;
            users.push((user.to_string(), hash.to_string()));
        }
        Ok(Credentials { users })
    }

    /// No users: only client certificates get in.
    pub fn empty() -> Credentials {
        Credentials { users: Vec::new() }
    }

    /// True when `user` exists and `password` matches its hash.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.users.iter().any(|(u, hash)| {
            u == user
                && PasswordHash::new(hash).is_ok_and(|h| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                })
        })
    }
}

/// Set on requests of a TLS connection whose client presented a certificate the verifier accepted.
#[derive(Clone, Copy)]
pub struct ClientCertificate;

/// How long a verified (user, password) pair is remembered, so a polling client does not pay for an
/// Argon2 check on every request.
const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// Argon2 checks running at once (each takes ~19 MiB and tens of milliseconds).
const PARALLEL_CHECKS: usize = 2;

/// The policy for one listener.
pub struct AuthPolicy {
    /// None: no credentials are required (loopback without a credentials file).
    credentials: Option<Arc<Credentials>>,
    /// BLAKE2s of (user, password) of recently verified pairs → when verified. Never the password.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    checks: Semaphore,
}

impl AuthPolicy {
    pub fn new(credentials: Option<Credentials>) -> AuthPolicy {
        AuthPolicy {
            credentials: credentials.map(Arc::new),
            verified: Mutex::new(HashMap::new()),
            checks: Semaphore::new(PARALLEL_CHECKS),
        }
    }

    fn remembered(&self, key: &[u8; 32]) -> bool {
        let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).is_some_and(|t| t.elapsed() < VERIFIED_TTL)
    }

    fn remember(&self, key: [u8; 32]) {
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, t| t.elapsed() < VERIFIED_TTL);
        if cache.len() < 1024 {
            cache.insert(key, Instant::now());
        }
    }

    /// Checks Basic credentials off the async workers, a bounded number at a time.
    async fn check_basic(&self, creds: &Arc<Credentials>, user: String, password: String) -> bool {
        let mut hasher = Blake2s256::new();
        hasher.update(user.as_bytes());
        hasher.update([0]);
        hasher.update(password.as_bytes());
        let key: [u8; 32] = hasher.finalize().into();
        if self.remembered(&key) {
            return true;
        }
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        let creds = creds.clone();
        let ok = tokio::task::spawn_blocking(move || creds.verify(&user, &password))
            .await
            .unwrap_or(false);
        if ok {
            self.remember(key);
        }
        ok
    }
}

fn basic_credentials(req: &Request) -> Option<(String, String)> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("Basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// True when the Host header names this machine's loopback interface (any port).
fn loopback_host(req: &Request) -> bool {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Middleware: lets a request through when the policy allows it, else 401 with a Basic challenge.
///
/// Without credentials (the loopback default) the request must also name a loopback host, so a web
/// page that rebinds its own DNS name to 127.0.0.1 cannot drive the daemon from a browser.
pub async fn require(State(policy): State<Arc<AuthPolicy>>, req: Request, next: Next) -> Response {
    if policy.credentials.is_none() && !loopback_host(&req) {
        tracing::warn!("refused a request whose Host header is not a loopback name");
        return (
            StatusCode::FORBIDDEN,
            "address the daemon as 127.0.0.1, [::1] or localhost\n",
        )
            .into_response();
    }
    let allowed = match &policy.credentials {
        None => true,
        Some(_) if req.extensions().get::<ClientCertificate>().is_some() => true,
        Some(creds) => match basic_credentials(&req) {
            Some((user, password)) => policy.check_basic(creds, user, password).await,
            None => false,
        },
    };
    if allowed {
        return next.run(req).await;
    }
    tracing::warn!("refused a request without valid credentials");
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        "valid HTTP Basic credentials or a client certificate are required\n",
    )
        .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"vmreplica\""),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};
    use rand_core::OsRng;

    fn hash(pw: &str) -> String {
        Argon2::default()
            .hash_password(pw.as_bytes(), &SaltString::generate(&mut OsRng))
            .expect("hash")
            .to_string()
    }

    #[test]
    fn verifies_users_of_the_file_and_rejects_malformed_lines() {
        let dir = std::env::temp_dir().join(format!("vmr-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("credentials");
        std::fs::write(
            &file,
            format!(
                "# admins\nalice:{}\n\nbob:{}\n",
                hash("s3cret"),
                hash("other")
            ),
        )
        .expect("write");
        let creds = Credentials::load(&file).expect("load");
        assert!(creds.verify("alice", "s3cret"));
        assert!(creds.verify("bob", "other"));
        assert!(!creds.verify("alice", "other"));
        assert!(!creds.verify("carol", "s3cret"));
        std::fs::write(&file, "alice:plaintext\n").expect("write");
        assert!(matches!(
            Credentials::load(&file),
            Err(CredentialsError::Malformed { line: 1, .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
