//! Per-VM serialization: at most one state-changing command or job runs for a VM at a time.
//!
//! A command claims its VM before it asks the state machine and keeps the claim until its job has
//! written the result, so two concurrent requests can never both pass `decide` on the same state.
//! The loser gets 32774 (System is in use).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

#[derive(Default, Clone)]
pub struct VmClaims(Arc<Mutex<HashSet<Uuid>>>);

/// A held claim; dropping it releases the VM.
pub struct VmClaim {
    set: VmClaims,
    vm: Uuid,
}

impl VmClaims {
    fn lock(&self) -> MutexGuard<'_, HashSet<Uuid>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `vm`, or None when another command holds it.
    pub fn claim(&self, vm: Uuid) -> Option<VmClaim> {
        self.lock().insert(vm).then(|| VmClaim {
            set: self.clone(),
            vm,
        })
    }
}

impl VmClaim {
    pub fn vm(&self) -> Uuid {
        self.vm
    }
}

impl Drop for VmClaim {
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
        drop(first);
        assert!(claims.claim(a).is_some());
        drop(other);
    }
}
