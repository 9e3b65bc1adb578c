//! The job engine: every asynchronous operation is an `Msvm_ConcreteJob` stored in SQLite.
//!
//! A method that starts work returns 4096 and the job's reference; the work runs as a tokio task
//! that reports progress and ends the job Completed (7), Terminated (8, cancelled) or Exception (10)
//! with an error description and `Msvm_Error` details. Finished jobs stay readable for
//! [`JOB_RETENTION_SECS`] (spec: `TimeBeforeRemoval` 5 minutes). A job that was running when the
//! daemon stopped is reported failed at the next start, never silently lost.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;
use vmreplica_core::job::{JobState, JobType};

use crate::clock::now;
use crate::store::{JobErrorInfo, JobRow, Store, StoreError, StoreResult};

/// How long a finished job stays readable (`TimeBeforeRemoval`).
pub const JOB_RETENTION_SECS: i64 = 300;

/// Why a job's work failed; becomes ErrorCode / ErrorDescription and one `Msvm_Error`.
#[derive(Debug, Clone)]
pub struct JobFailure {
    /// A replication return code (32768 Failed, 32770 Not supported, ...).
    pub error_code: u16,
    pub message: String,
    pub recommended_action: String,
    /// `Msvm_Error.ErrorType`.
    pub error_type: u16,
}

impl JobFailure {
    pub fn failed(message: impl Into<String>, recommended_action: impl Into<String>) -> Self {
        JobFailure {
            error_code: 32768,
            message: message.into(),
            recommended_action: recommended_action.into(),
            error_type: 4,
        }
    }

    pub fn cancelled() -> Self {
        JobFailure::failed(
            "The job was cancelled.",
            "Start the operation again when you want it to run.",
        )
    }
}

impl From<StoreError> for JobFailure {
    fn from(e: StoreError) -> Self {
        JobFailure::failed(
            format!("The metadata database could not be updated: {}", crate::error_chain(&e)),
            "Check the daemon's data directory (free space, permissions) and run the operation again.",
        )
    }
}

/// What the work of a job sees: progress reporting and cancellation.
#[derive(Clone)]
pub struct JobContext {
    id: String,
    store: Arc<Store>,
    cancel: Arc<AtomicBool>,
}

impl JobContext {
    /// The job's InstanceID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records progress (0-100) as the job's PercentComplete.
    pub fn progress(&self, percent: u16) -> StoreResult<()> {
        self.store
            .update_running_job(&self.id, Some(percent.min(100)), None, now())
    }

    /// Adds `text` to the job's log: the daemon's log, and the end of the job's `Description`
    /// (what `Msvm_ConcreteJob` and the CLI show).
    pub fn note(&self, text: &str) -> StoreResult<()> {
        tracing::info!(job = %self.id, "{text}");
        if let Some(job) = self.store.get_job(&self.id)? {
            let description = format!("{}. {text}", job.description.trim_end_matches('.'));
            self.store
                .update_running_job(&self.id, None, Some(&description), now())?;
        }
        Ok(())
    }

    /// True once a cancel was requested.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Ends the work early when a cancel was requested.
    pub fn check_cancelled(&self) -> Result<(), JobFailure> {
        if self.cancel.load(Ordering::SeqCst) {
            Err(JobFailure::cancelled())
        } else {
            Ok(())
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no job with InstanceID '{0}'")]
    NotFound(String),
    #[error("job '{0}' has already finished")]
    Finished(String),
    #[error("job '{0}' cannot be cancelled")]
    NotCancellable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct JobEngine {
    store: Arc<Store>,
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

impl JobEngine {
    pub fn new(store: Arc<Store>) -> Arc<JobEngine> {
        Arc::new(JobEngine {
            store,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Marks every job that was still running when the daemon stopped as failed; returns how many.
    pub fn recover_after_restart(&self) -> StoreResult<usize> {
        let mut count = 0;
        for mut job in self.store.list_jobs()? {
            let terminal = JobState::from_u16(job.state).is_some_and(|s| s.is_terminal());
            if terminal {
                continue;
            }
            let message =
                "The daemon stopped while this job was running, so its work did not complete.";
            finish(
                &mut job,
                JobState::Exception,
                Some(&JobFailure::failed(message, "Run the operation again.")),
            );
            self.store.put_job(&job)?;
            count += 1;
        }
        Ok(count)
    }

    /// Creates the job and runs `work` in the background.
    pub fn spawn<F, Fut>(
        self: &Arc<Self>,
        job_type: JobType,
        vm: Option<Uuid>,
        description: String,
        cancellable: bool,
        work: F,
    ) -> StoreResult<JobRow>
    where
        F: FnOnce(JobContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), JobFailure>> + Send + 'static,
    {
        let t = now();
        let job = JobRow {
            id: Uuid::new_v4().to_string().to_uppercase(),
            job_type: job_type.as_u16(),
            state: JobState::Running.as_u16(),
            percent: 0,
            error_code: 0,
            error_description: None,
            errors: Vec::new(),
            vm,
            description,
            time_submitted: t,
            start_time: Some(t),
            time_finished: None,
            last_change: t,
            cancellable,
        };
        self.store.put_job(&job)?;
        let cancel = Arc::new(AtomicBool::new(false));
        self.lock_running().insert(job.id.clone(), cancel.clone());
        let ctx = JobContext {
            id: job.id.clone(),
            store: self.store.clone(),
            cancel,
        };
        let engine = self.clone();
        let id = job.id.clone();
        tokio::spawn(async move {
            // In a task of its own, so that a panic in it still ends the job (as an exception)
            // instead of leaving it running for good.
            let result = match tokio::spawn(work(ctx)).await {
                Ok(result) => result,
                Err(e) => {
                    tracing::error!(job = %id, "the job's work ended abnormally: {e}");
                    Err(JobFailure::failed(
                        format!("the job ended abnormally: {e}"),
                        "Report this as a bug; the operation can be started again.",
                    ))
                }
            };
            engine.complete(&id, result);
        });
        Ok(job)
    }

    fn complete(&self, id: &str, result: Result<(), JobFailure>) {
        let cancelled = self
            .lock_running()
            .remove(id)
            .is_some_and(|c| c.load(Ordering::SeqCst));
        let outcome = match self.store.get_job(id) {
            Ok(Some(mut job)) => {
                match &result {
                    Ok(()) => finish(&mut job, JobState::Completed, None),
                    Err(f) if cancelled => finish(&mut job, JobState::Terminated, Some(f)),
                    Err(f) => finish(&mut job, JobState::Exception, Some(f)),
                }
                self.store.put_job(&job)
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        match (&result, outcome) {
            (_, Err(e)) => tracing::error!(
                job = id,
                "could not record the end of the job: {}",
                crate::error_chain(&e)
            ),
            (Err(f), Ok(())) => tracing::warn!(job = id, "job failed: {}", f.message),
            (Ok(()), Ok(())) => tracing::debug!(job = id, "job completed"),
        }
    }

    /// Requests cancellation of a running job (`Msvm_ConcreteJob.RequestStateChange(4)`).
    pub fn cancel(&self, id: &str) -> Result<(), CancelError> {
        let job = self
            .store
            .get_job(id)?
            .ok_or_else(|| CancelError::NotFound(id.into()))?;
        if !job.cancellable {
            return Err(CancelError::NotCancellable(id.into()));
        }
        match self.lock_running().get(id) {
            Some(flag) => {
                flag.store(true, Ordering::SeqCst);
                Ok(())
            }
            None => Err(CancelError::Finished(id.into())),
        }
    }

    /// Removes jobs that finished more than [`JOB_RETENTION_SECS`] ago.
    pub fn purge(&self) -> StoreResult<usize> {
        self.store.purge_jobs(now() - JOB_RETENTION_SECS)
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn finish(job: &mut JobRow, state: JobState, failure: Option<&JobFailure>) {
    let t = now();
    job.state = state.as_u16();
    job.time_finished = Some(t);
    job.last_change = t;
    if state == JobState::Completed {
        job.percent = 100;
    }
    if let Some(f) = failure {
        job.error_code = f.error_code;
        job.error_description = Some(f.message.clone());
        job.errors.push(JobErrorInfo {
            message: f.message.clone(),
            recommended_action: f.recommended_action.clone(),
            error_type: f.error_type,
        });
    }
}

/// The job `id` once its state or percent complete changed, or it ended, or `wait` is over (at
/// once for a job that already ended): a client learns at once that a job finished without asking
/// many times a second. None when there is no such job.
pub async fn watch(
    store: &Store,
    id: &str,
    wait: std::time::Duration,
) -> StoreResult<Option<JobRow>> {
    // Subscribed before the first read: a write after it is seen as a change.
    let mut changes = store.job_changes();
    let Some(first) = store.get_job(id)? else {
        return Ok(None);
    };
    let until = tokio::time::Instant::now() + wait;
    let mut job = first.clone();
    while !JobState::from_u16(job.state).is_some_and(|s| s.is_terminal())
        && (job.state, job.percent) == (first.state, first.percent)
    {
        // Woken by a write of any job; only this one's state and percent count.
        match tokio::time::timeout_at(until, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
        match store.get_job(id)? {
            Some(now) => job = now,
            None => return Ok(None),
        }
    }
    Ok(Some(job))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watching_a_job_answers_when_it_moves_on() {
        use std::time::{Duration, Instant};
        let (dir, store, jobs) = engine();
        let (go, gate) = tokio::sync::oneshot::channel::<()>();
        let job = jobs
            .spawn(
                JobType::Resynchronizing,
                None,
                "steps".into(),
                false,
                |ctx| async move {
                    let _ = gate.await;
                    ctx.progress(40)?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(())
                },
            )
            .expect("spawn");
        // Nothing moves: the wait runs out.
        let t = Instant::now();
        let same = watch(&store, &job.id, Duration::from_millis(150))
            .await
            .expect("watch");
        assert!(t.elapsed() >= Duration::from_millis(150));
        assert_eq!(same.expect("exists").percent, job.percent);
        // Progress ends the wait long before it runs out.
        let t = Instant::now();
        let _ = go.send(());
        let moved = watch(&store, &job.id, Duration::from_secs(10))
            .await
            .expect("watch");
        assert_eq!(moved.expect("exists").percent, 40);
        assert!(t.elapsed() < Duration::from_secs(5));
        // So does the end; an ended job is answered at once.
        let ended = watch(&store, &job.id, Duration::from_secs(10))
            .await
            .expect("watch");
        assert_eq!(ended.expect("exists").state, JobState::Completed.as_u16());
        let t = Instant::now();
        watch(&store, &job.id, Duration::from_secs(10))
            .await
            .expect("watch");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(watch(&store, "no-such-job", Duration::from_secs(10))
            .await
            .expect("watch")
            .is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn engine() -> (std::path::PathBuf, Arc<Store>, Arc<JobEngine>) {
        let dir = std::env::temp_dir().join(format!("vmr-jobs-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let store = Arc::new(Store::open(&dir.join("db")).expect("open"));
        (dir, store.clone(), JobEngine::new(store))
    }

    async fn wait_terminal(store: &Store, id: &str) -> JobRow {
        for _ in 0..200 {
            let job = store.get_job(id).expect("get").expect("exists");
            if JobState::from_u16(job.state).is_some_and(|s| s.is_terminal()) {
                return job;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("job {id} did not finish");
    }

    #[tokio::test]
    async fn a_job_whose_work_panics_ends_and_late_progress_never_revives_one() {
        let (dir, store, jobs) = engine();
        let kept: Arc<std::sync::Mutex<Option<JobContext>>> = Arc::default();
        let keep = kept.clone();
        let job = jobs
            .spawn(
                JobType::Resynchronizing,
                None,
                "panics".into(),
                false,
                move |ctx| async move {
                    *keep.lock().expect("lock") = Some(ctx.clone());
                    ctx.progress(30)?;
                    if ctx.id().is_empty() {
                        return Ok(());
                    }
                    panic!("a bug in the work");
                },
            )
            .expect("spawn");
        let ended = wait_terminal(&store, &job.id).await;
        assert_eq!(ended.state, JobState::Exception.as_u16());
        assert!(
            ended
                .error_description
                .as_deref()
                .is_some_and(|d| d.contains("abnormally")),
            "{ended:?}"
        );
        // A report from a task of the job that outlived it (an upload's progress) changes nothing.
        let ctx = kept.lock().expect("lock").clone().expect("the context");
        ctx.progress(90).expect("progress");
        ctx.note("late").expect("note");
        let after = store.get_job(&job.id).expect("get").expect("exists");
        assert_eq!(
            (after.state, after.percent, after.description),
            (ended.state, ended.percent, ended.description)
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_cancelled_job_ends_terminated_and_a_failed_one_keeps_its_error() {
        let (dir, store, jobs) = engine();
        let slow = jobs
            .spawn(
                JobType::Resynchronizing,
                None,
                "slow".into(),
                true,
                |ctx| async move {
                    loop {
                        ctx.check_cancelled()?;
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                },
            )
            .expect("spawn");
        jobs.cancel(&slow.id).expect("cancel");
        let done = wait_terminal(&store, &slow.id).await;
        assert_eq!(done.state, JobState::Terminated.as_u16());
        assert!(matches!(
            jobs.cancel(&slow.id),
            Err(CancelError::Finished(_))
        ));

        let failing = jobs
            .spawn(
                JobType::InitiateFailback,
                None,
                "fails".into(),
                false,
                |_| async { Err(JobFailure::failed("disk gone", "put it back")) },
            )
            .expect("spawn");
        let done = wait_terminal(&store, &failing.id).await;
        assert_eq!(done.state, JobState::Exception.as_u16());
        assert_eq!(done.error_description.as_deref(), Some("disk gone"));
        assert_eq!(done.errors[0].recommended_action, "put it back");
        assert!(matches!(
            jobs.cancel(&failing.id),
            Err(CancelError::NotCancellable(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_job_running_at_restart_is_reported_failed() {
        let (dir, store, jobs) = engine();
        let job = jobs
            .spawn(
                JobType::StartInbandInitialReplication,
                None,
                "ir".into(),
                true,
                |_| std::future::pending(),
            )
            .expect("spawn");
        let restarted = JobEngine::new(store.clone());
        assert_eq!(restarted.recover_after_restart().expect("recover"), 1);
        let after = store.get_job(&job.id).expect("get").expect("kept");
        assert_eq!(after.state, JobState::Exception.as_u16());
        assert!(after
            .error_description
            .expect("described")
            .contains("daemon stopped"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
