//! A VM's power state as `Msvm_ComputerSystem.EnabledState` (2 Enabled = running, 3 Disabled = off).
//!
//! A VM whose definition names a QMP socket is running while a process listens on that socket
//! (QEMU, or qemu-storage-daemon standing in for it in tests). The probe is a non-blocking
//! `connect`: QEMU's QMP socket has a backlog of one and accepts nobody while libvirt holds it, so a
//! blocking connect could stall the daemon; "would block" means a listener exists, so the VM runs.
//! Without a socket the daemon has no way to see the VM run and reports it off.
//!
//! Changing the power state (`Msvm_ComputerSystem.RequestStateChange`): start runs the definition's
//! start command and waits for the QMP socket to listen; turn off sends QMP `quit` (or runs the stop
//! command); shut down asks the guest with `system_powerdown`, falling back to `quit` for a peer
//! without a guest (qemu-storage-daemon). Every step is bounded by [`POWER_TIMEOUT`].

use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, Instant};

use disk::qmp::{QmpClient, QmpError};
use socket2::{Domain, SockAddr, Socket, Type};
use vmreplica_core::command::PowerControl;

pub const ENABLED: u16 = 2;
pub const DISABLED: u16 = 3;
/// `RequestStateChange` value for a graceful shut down.
pub const SHUT_DOWN: u16 = 4;
/// How long a start or stop may take.
pub const POWER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("the VM definition has no {0}; give it with `vmreplica vm add --{0}`")]
    NotConfigured(&'static str),
    #[error("the {what} command failed ({status}): {stderr}")]
    CommandFailed {
        what: &'static str,
        status: String,
        stderr: String,
    },
    #[error("the {0} command could not be run")]
    Spawn(&'static str, #[source] std::io::Error),
    #[error("the VM did not {0} within {POWER_TIMEOUT:?}")]
    Timeout(&'static str),
    #[error("QMP")]
    Qmp(#[from] QmpError),
}

/// Runs the start command and waits until the VM is seen running (its QMP socket listens). The
/// command finds the VM's current disk images in `VMREPLICA_DISK0`, `VMREPLICA_DISK1`, … (a
/// failed-over replica runs on an overlay whose path the command cannot know in advance) and, for
/// a failed-over replica with failover IP settings, those settings as a JSON array in
/// `VMREPLICA_FAILOVER_NETWORK` (Hyper-V injects them into the guest through KVP; here the command
/// hands them on: a cloud-init network-config, the guest agent, its own script).
pub async fn start(
    power: &PowerControl,
    disks: &[String],
    failover_network: Option<&[vmreplica_core::settings::FailoverNetworkSettings]>,
) -> Result<(), PowerError> {
    let cmd = power
        .start_command
        .as_deref()
        .ok_or(PowerError::NotConfigured("start-command"))?;
    let mut env: Vec<(String, String)> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("VMREPLICA_DISK{i}"), d.clone()))
        .collect();
    if let Some(settings) = failover_network {
        env.push((
            "VMREPLICA_FAILOVER_NETWORK".into(),
            serde_json::to_string(settings).unwrap_or_else(|_| "[]".into()),
        ));
    }
    run_shell("start", cmd, &env).await?;
    if power.qmp_socket.is_some() {
        wait_for(power, ENABLED, "start").await?;
    }
    Ok(())
}

/// Turns the VM off (`graceful`: asks the guest to shut down first) and waits until it is off.
pub async fn stop(power: &PowerControl, graceful: bool) -> Result<(), PowerError> {
    match (&power.qmp_socket, &power.stop_command) {
        (Some(sock), _) if listening(sock) => {
            let mut qmp = QmpClient::connect(Path::new(sock), Duration::from_secs(10)).await?;
            let asked = graceful && qmp.execute("system_powerdown", None).await.is_ok();
            if !asked {
                qmp.quit().await?;
            }
            wait_for(power, DISABLED, "stop").await
        }
        (_, Some(cmd)) => {
            run_shell("stop", cmd, &[]).await?;
            if power.qmp_socket.is_some() {
                wait_for(power, DISABLED, "stop").await?;
            }
            Ok(())
        }
        (Some(_), None) => Ok(()), // nothing listens: already off
        (None, None) => Err(PowerError::NotConfigured("stop-command")),
    }
}

async fn run_shell(
    what: &'static str,
    cmd: &str,
    env: &[(String, String)],
) -> Result<(), PowerError> {
    let child = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(POWER_TIMEOUT, child)
        .await
        .map_err(|_| PowerError::Timeout(what))?
        .map_err(|e| PowerError::Spawn(what, e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .chars()
            .rev()
            .take(500)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(PowerError::CommandFailed {
            what,
            status: out.status.to_string(),
            stderr: tail.trim().to_string(),
        });
    }
    Ok(())
}

async fn wait_for(power: &PowerControl, state: u16, what: &'static str) -> Result<(), PowerError> {
    let deadline = Instant::now() + POWER_TIMEOUT;
    while enabled_state(power) != state {
        if Instant::now() > deadline {
            return Err(PowerError::Timeout(what));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

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
            nbd_socket: None,
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
