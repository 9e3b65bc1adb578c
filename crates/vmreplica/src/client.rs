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

pub struct Client {
    agent: ureq::Agent,
    url: String,
}

impl Client {
    pub fn new(url: &str) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            agent,
            url: format!("{}/api/v1/command", url.trim_end_matches('/')),
        }
    }

    pub fn execute(&self, cmd: &Command) -> Result<CommandOutput, Failure> {
        let mut resp = self
            .agent
            .post(&self.url)
            .send_json(cmd)
            .with_context(|| format!("cannot reach the daemon at {}", self.url))
            .map_err(Failure::Transport)?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .context("cannot read the daemon's answer")
            .map_err(Failure::Transport)?;
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

    /// Polls the job until it ends, showing its progress on a terminal.
    pub fn wait_job(&self, id: &str, poll: Duration) -> Result<JobView, Failure> {
        let bar = ProgressBar::new(100);
        bar.set_style(
            ProgressStyle::with_template("{msg:30} [{bar:40}] {pos:>3}%")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        loop {
            let job = match self.execute(&Command::GetJob { id: id.to_string() })? {
                CommandOutput::Job(job) => job,
                other => return Err(Failure::unexpected(&other)),
            };
            bar.set_message(job.caption.clone());
            bar.set_position(u64::from(job.percent_complete));
            if JobState::from_u16(job.job_state).is_some_and(|s| s.is_terminal()) {
                bar.finish_and_clear();
                return Ok(job);
            }
            std::thread::sleep(poll);
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
