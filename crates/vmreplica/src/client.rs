//! The daemon's JSON API over HTTP, and waiting for jobs with a progress bar.

use std::time::Duration;

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};
use vmreplica_core::command::{Command, CommandError, CommandOutput, JobView};
use vmreplica_core::job::JobState;

/// Why a command did not succeed.
pub enum Failure {
    /// The daemon could not be reached or answered something unreadable.
    Transport(anyhow::Error),
    /// The daemon refused the command with a return code.
    Refused(CommandError),
    /// A job ended in a failure state.
    JobFailed(String),
}

impl Failure {
    pub fn unexpected(out: &CommandOutput) -> Failure {
        Failure::Transport(anyhow!("unexpected answer from the daemon: {out:?}"))
    }
}

/// How to reach the daemon.
pub struct Endpoint {
    pub url: String,
    /// HTTP Basic credentials (user, password).
    pub basic: Option<(String, String)>,
    /// PEM file of the CA that signed the daemon's HTTPS certificate.
    pub ca_cert: Option<std::path::PathBuf>,
}

pub struct Client {
    agent: ureq::Agent,
    url: String,
    authorization: Option<String>,
}

impl Client {
    pub fn new(endpoint: &Endpoint) -> anyhow::Result<Client> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &endpoint.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let certs = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{} is not a PEM certificate file", ca.display()))?;
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .tls_config(tls.build())
            .build()
            .into();
        let authorization = endpoint.basic.as_ref().map(|(user, password)| {
            use base64::Engine;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {token}")
        });
        let url = format!("{}/api/v1/command", endpoint.url.trim_end_matches('/'));
        Ok(Client {
            agent,
            url,
            authorization,
        })
    }

    pub fn execute(&self, cmd: &Command) -> Result<CommandOutput, Failure> {
        let mut request = self.agent.post(&self.url);
        if let Some(value) = &self.authorization {
            request = request.header("Authorization", value);
        }
        let mut resp = request
            .send_json(cmd)
            .with_context(|| format!("cannot reach the daemon at {}", self.url))
            .map_err(Failure::Transport)?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .context("cannot read the daemon's answer")
            .map_err(Failure::Transport)?;
        if status == 401 {
            return Err(Failure::Transport(anyhow!(
                "the daemon wants credentials: give --user and --password"
            )));
        }
        if status == 200 {
            return serde_json::from_str(&text)
                .with_context(|| format!("unreadable answer: {text}"))
                .map_err(Failure::Transport);
        }
        match serde_json::from_str::<CommandError>(&text) {
            Ok(e) => Err(Failure::Refused(e)),
            Err(_) => Err(Failure::Transport(anyhow!("HTTP {status}: {text}"))),
        }
    }

    /// Follows the job until it ends, showing its progress on a terminal: each `GetJob` waits on
    /// the daemon for up to `poll` until the job moves on, so the end is seen at once.
    pub fn wait_job(&self, id: &str, poll: Duration) -> Result<JobView, Failure> {
        let bar = ProgressBar::new(100);
        bar.set_style(
            ProgressStyle::with_template("{msg:30} [{bar:40}] {pos:>3}%")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut wait_ms = u32::try_from(poll.as_millis()).unwrap_or(u32::MAX);
        let mut seen = None;
        loop {
            let asked = std::time::Instant::now();
            let get = |wait_ms| {
                self.execute(&Command::GetJob {
                    id: id.to_string(),
                    wait_ms,
                })
            };
            let answer = match get(wait_ms) {
                // A daemon older than `wait_ms` refuses the field: ask without it, and poll.
                Err(Failure::Refused(_)) if wait_ms > 0 && seen.is_none() => {
                    wait_ms = 0;
                    get(0)?
                }
                other => other?,
            };
            let job = match answer {
                CommandOutput::Job(job) => job,
                other => return Err(Failure::unexpected(&other)),
            };
            bar.set_message(job.caption.clone());
            bar.set_position(u64::from(job.percent_complete));
            if JobState::from_u16(job.job_state).is_some_and(|s| s.is_terminal()) {
                bar.finish_and_clear();
                return Ok(job);
            }
            let now = Some((job.job_state, job.percent_complete));
            if wait_ms == 0 || (now == seen && asked.elapsed() < poll / 2) {
                // A daemon that does not wait (unchanged and answered at once): poll, then.
                std::thread::sleep(poll / 5);
            }
            seen = now;
        }
    }
}

/// Success, or the job's error as a failure.
pub fn job_outcome(job: &JobView) -> Result<(), Failure> {
    if JobState::from_u16(job.job_state).is_some_and(|s| s.is_success()) {
        return Ok(());
    }
    let why = job
        .error_description
        .clone()
        .unwrap_or_else(|| "no description".into());
    Err(Failure::JobFailed(format!(
        "job {} ({}) failed: {why}",
        job.id, job.caption
    )))
}
