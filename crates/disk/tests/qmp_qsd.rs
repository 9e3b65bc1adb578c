//! The QMP client against a real qemu-storage-daemon (the stand-in for a running VM's block layer).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use disk::qmp::{QmpClient, QmpError};
use serde_json::json;

struct Qsd {
    child: Child,
    dir: PathBuf,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_qsd(name: &str) -> Qsd {
    let dir = std::env::temp_dir().join(format!("vmr-qmp-qsd-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let image = dir.join("disk.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("16M")
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    let qmp = dir.join("qmp.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            qmp.display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .spawn()
        .expect("qemu-storage-daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qmp.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Qsd { child, dir }
}

fn qmp_path(q: &Qsd) -> PathBuf {
    q.dir.join("qmp.sock")
}

fn bitmaps(nodes: &serde_json::Value, node: &str) -> Vec<String> {
    let Some(list) = nodes.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn commands_errors_and_quit_against_qemu_storage_daemon() {
    let mut qsd = start_qsd("basic");
    let path: &Path = &qmp_path(&qsd);
    let mut qmp = QmpClient::connect(path, Duration::from_secs(10))
        .await
        .expect("connect");
    let args = json!({"node": "disk0", "name": "bm0", "persistent": true, "granularity": 65536});
    qmp.execute("block-dirty-bitmap-add", Some(args))
        .await
        .expect("bitmap add");
    let nodes = qmp
        .execute("query-named-block-nodes", None)
        .await
        .expect("query");
    assert_eq!(bitmaps(&nodes, "disk0"), vec!["bm0".to_string()]);

    let again = json!({"node": "disk0", "name": "bm0"});
    match qmp.execute("block-dirty-bitmap-add", Some(again)).await {
        Err(QmpError::Command { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("bm0"), "{desc}");
        }
        other => panic!("a duplicate bitmap must fail, got {other:?}"),
    }

    qmp.quit().await.expect("quit");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = qsd.child.try_wait().expect("wait") {
            assert!(status.success(), "qemu-storage-daemon exited with {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The bitmap was persistent: it is in the image after a clean quit.
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(qsd.dir.join("disk.qcow2"))
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    let names: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|b| b.iter().filter_map(|x| x["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["bm0"]);
}

#[tokio::test]
async fn connecting_to_nothing_is_a_clear_error() {
    let missing = std::env::temp_dir().join(format!("vmr-qmp-none-{}.sock", std::process::id()));
    match QmpClient::connect(&missing, Duration::from_secs(2)).await {
        Err(QmpError::Connect { path, .. }) => assert!(path.contains("vmr-qmp-none")),
        other => panic!("expected a connect error, got {:?}", other.err()),
    }
}
