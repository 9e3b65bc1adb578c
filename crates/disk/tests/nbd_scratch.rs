#[path = "nbd_support.rs"]
mod support;
use disk::nbd::*;
use support::*;
#[tokio::test]
async fn scratch() {
    for fmt in ["raw", "qcow2", "vhdx"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d");
        qemu_img(&["create", "-q", "-f", fmt, image.to_str().unwrap(), "64M"]);
        let server = ServerGuard::qemu_nbd(dir.path(), &image, fmt, &["--discard=unmap"]);
        let mut nbd = NbdClient::connect_unix(&server.sock, "disk0", &[BASE_ALLOCATION]).await.unwrap();
        println!("{fmt}: flags {:#x} bs {:?} trim {} fz {} mc {}", nbd.transmission_flags(), nbd.block_sizes(), nbd.can_trim(), nbd.can_fast_zero(), nbd.can_multi_conn());
        println!("  map {:?}", nbd.map(BASE_ALLOCATION, 0, 64 << 20).await.unwrap());
        nbd.write(0, &[1u8; 70000]).await.unwrap();
        nbd.trim(0, 65536).await.unwrap();
        println!("  after trim {:?}", nbd.map(BASE_ALLOCATION, 0, 1 << 20).await.unwrap());
        println!("  fast zero {:?}", nbd.write_zeroes_fast(0, 1<<20).await.map_err(|e| e.to_string()));
        println!("  bs 0 {:?}", nbd.block_status(BASE_ALLOCATION, 0, 1<<30 ).await.map_err(|e| e.to_string()).map(|v| v.len()));
        match NbdClient::connect_unix(&server.sock, "nope", &[]).await { Err(e) => println!("  {e}"), Ok(_) => {} }
        drop(nbd);
    }
}
