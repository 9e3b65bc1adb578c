//! A VM's power state as `Msvm_ComputerSystem.EnabledState` (2 Enabled = running, 3 Disabled = off).
//!
//! A VM whose definition names a QMP socket is running while a process listens on that socket
//! (QEMU, or qemu-storage-daemon standing in for it in tests). The probe is a non-blocking
//! `connect`: QEMU's QMP socket has a backlog of one and accepts nobody while libvirt holds it, so a
//! blocking connect could stall the daemon; "would block" means a listener exists, so the VM runs.
//! Without a socket the daemon has no way to see the VM run and reports it off.

use std::io::ErrorKind;

use socket2::{Domain, SockAddr, Socket, Type};
use vmreplica_core::command::PowerControl;

pub const ENABLED: u16 = 2;
pub const DISABLED: u16 = 3;

pub fn enabled_state(power: &PowerControl) -> u16 {
    match &power.qmp_socket {
        Some(path) if listening(path) => ENABLED,
        _ => DISABLED,
    }
}

/// True when something listens on the unix socket `path`; never blocks.
fn listening(path: &str) -> bool {
    let Ok(addr) = SockAddr::unix(path) else {
        return false;
    };
    let Ok(socket) = Socket::new(Domain::UNIX, Type::STREAM, None) else {
        return false;
    };
    if socket.set_nonblocking(true).is_err() {
        return false;
    }
    match socket.connect(&addr) {
        Ok(()) => true,
        // Linux answers EAGAIN when the listener's backlog is full.
        Err(e) => e.kind() == ErrorKind::WouldBlock,
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

        // A listener that accepts nobody (QMP held by libvirt) with a full backlog: the probe must
        // neither block nor call the VM off.
        let addr = SockAddr::unix(&sock).expect("addr");
        let server = Socket::new(Domain::UNIX, Type::STREAM, None).expect("socket");
        server.bind(&addr).expect("bind");
        server.listen(1).expect("listen");
        let mut held = Vec::new();
        while held.len() < 64 {
            let c = Socket::new(Domain::UNIX, Type::STREAM, None).expect("socket");
            c.set_nonblocking(true).expect("nonblocking");
            match c.connect(&addr) {
                Ok(()) => held.push(c),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("unexpected connect error {e}"),
            }
        }
        assert!(held.len() < 64, "the backlog never filled");
        let started = std::time::Instant::now();
        assert_eq!(enabled_state(&power), ENABLED);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        drop(held);
        drop(server);
        let _ = std::fs::remove_file(&sock);
        assert_eq!(enabled_state(&power), DISABLED);
        power.qmp_socket = None;
        assert_eq!(enabled_state(&power), DISABLED);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
