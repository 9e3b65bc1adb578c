//! A VM's power state as `Msvm_ComputerSystem.EnabledState` (2 Enabled = running, 3 Disabled = off).
//!
//! A VM whose definition names a QMP socket is running while a QEMU process listens on that socket
//! (QEMU, or qemu-storage-daemon standing in for it in tests). Without a socket the daemon has no way
//! to see the VM run and reports it off.

use std::os::unix::net::UnixStream;

use vmreplica_core::command::PowerControl;

pub const ENABLED: u16 = 2;
pub const DISABLED: u16 = 3;

pub fn enabled_state(power: &PowerControl) -> u16 {
    match &power.qmp_socket {
        Some(path) if UnixStream::connect(path).is_ok() => ENABLED,
        _ => DISABLED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_qmp_socket_means_running_and_a_missing_one_off() {
        let dir = std::env::temp_dir().join(format!("vmr-power-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let mut power = PowerControl {
            qmp_socket: Some(sock.display().to_string()),
            ..Default::default()
        };
        assert_eq!(enabled_state(&power), DISABLED);
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert_eq!(enabled_state(&power), ENABLED);
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        power.qmp_socket = None;
        assert_eq!(enabled_state(&power), DISABLED);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
