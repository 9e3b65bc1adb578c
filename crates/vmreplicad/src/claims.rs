//! Per-VM serialization: at most one state-changing command or job runs for a VM at a time.
//!
//! A command claims its VM before it asks the state machine and keeps the claim until its job has
//! written the result, so two concurrent requests can never both pass `decide` on the same state.
//! The loser gets 32774 (System is in use).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

#[derive(Default, Clone)]
pub struct VmClaims(Arc<Mutex<HashSet<Uuid>>>, ApplyLocks);

/// One lock per VM that the replica's apply of a log holds from start to end, so what must not
/// meet an apply halfway (a removal dropping the logs not applied) waits for it instead. Apart
/// from the claims: an apply runs while commands hold theirs.
#[derive(Default, Clone)]
struct ApplyLocks(Arc<Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>>);

/// A held claim; dropping it releases the VM. Its clones share it: the VM is released when the
/// last of them is dropped (a job keeps one until it has written its result, whatever its work
/// does with the other).
#[derive(Clone)]
pub struct VmClaim(Arc<Held>);

struct Held {
    set: VmClaims,
    vm: Uuid,
}

impl VmClaims {
    fn lock(&self) -> MutexGuard<'_, HashSet<Uuid>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply_lock(&self, vm: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.1
             .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vm)
            .or_default()
            .clone()
    }

    /// Waits until no apply of `vm`'s logs runs, and holds off the next one until dropped.
    pub async fn applying(&self, vm: Uuid) -> tokio::sync::OwnedMutexGuard<()> {
        self.apply_lock(vm).lock_owned().await
    }

    /// [`VmClaims::applying`] without waiting: None while an apply of `vm`'s logs runs.
    pub fn try_applying(&self, vm: Uuid) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.apply_lock(vm).try_lock_owned().ok()
    }

    /// Claims `vm`, or None when another command holds it.
    pub fn claim(&self, vm: Uuid) -> Option<VmClaim> {
        self.lock().insert(vm).then(|| {
            VmClaim(Arc::new(Held {
                set: self.clone(),
                vm,
            }))
        })
    }
}

impl VmClaim {
    pub fn vm(&self) -> Uuid {
        self.0.vm
    }

    /// Waits until no apply of this VM's logs runs (the caller keeps the next one off otherwise).
    pub async fn apply_ended(&self) {
        drop(self.0.set.applying(self.0.vm).await);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.set.lock().remove(&self.vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_claimed_once_until_the_claim_is_dropped() {
        let claims = VmClaims::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = claims.claim(a).expect("free");
        assert!(claims.claim(a).is_none());
        let other = claims.claim(b).expect("another VM is independent");
        let shared = first.clone();
        drop(first);
        assert!(claims.claim(a).is_none(), "a clone still holds it");
        drop(shared);
        assert!(claims.claim(a).is_some());
        drop(other);
    }

    #[tokio::test]
    async fn an_apply_lock_is_held_until_dropped_and_claims_do_not_wait_for_it() {
        let claims = VmClaims::default();
        let a = Uuid::new_v4();
        let held = claims.applying(a).await;
        let waiting = tokio::spawn({
            let claims = claims.clone();
            async move { claims.applying(a).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        assert!(claims.try_applying(a).is_none());
        assert!(claims.claim(a).is_some());
        drop(held);
        waiting.await.expect("the lock once dropped");
    }
}
