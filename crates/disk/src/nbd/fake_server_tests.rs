//! The client against a scripted in-memory server: replies that break the protocol, short and
//! overlong BLOCK_STATUS answers, out-of-order READ chunks, and server-reported errors.

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

const SIZE: u64 = 1 << 20;
const CTX: u32 = 7;

fn opt_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    for n in [option, kind, payload.len() as u32] {
        v.extend_from_slice(&n.to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = 0x668e_33efu32.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn be(parts: &[u64], widths: &[usize]) -> Vec<u8> {
    parts
        .iter()
        .zip(widths)
        .flat_map(|(v, w)| v.to_be_bytes()[8 - w..].to_vec())
        .collect()
}

/// Serves the handshake: structured replies, one meta context (id 7), a 1 MiB writable export.
async fn serve_handshake(s: &mut DuplexStream) {
    s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").await.unwrap();
    let _client_flags = s.read_u32().await.unwrap();
    loop {
        let (_magic, option, len) = (
            s.read_u64().await.unwrap(),
            s.read_u32().await.unwrap(),
            s.read_u32().await.unwrap(),
        );
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await.unwrap();
        let reply = match option {
            8 => opt_reply(8, 1, &[]),
            10 => [
                opt_reply(
                    10,
                    4,
                    &[&CTX.to_be_bytes()[..], b"base:allocation"].concat(),
                ),
                opt_reply(10, 1, &[]),
            ]
            .concat(),
            7 => [
                opt_reply(7, 3, &be(&[0, SIZE, 0b0110_0101], &[2, 8, 2])),
                opt_reply(7, 1, &[]),
            ]
            .concat(),
            other => panic!("unexpected option {other}"),
        };
        s.write_all(&reply).await.unwrap();
        if option == 7 {
            return;
        }
    }
}

/// Reads one request: (command, cookie, offset, length).
async fn request(s: &mut DuplexStream) -> (u16, u64, u64, u32) {
    let mut h = [0u8; 28];
    s.read_exact(&mut h).await.unwrap();
    let n = |r: std::ops::Range<usize>| h[r].iter().fold(0u64, |a, b| a << 8 | u64::from(*b));
    (n(6..8) as u16, n(8..16), n(16..24), n(24..28) as u32)
}

async fn client_with(
    script: impl FnOnce(DuplexStream) -> tokio::task::JoinHandle<()>,
) -> NbdClient {
    let (ours, mut theirs) = duplex(1 << 16);
    let server = async move {
        serve_handshake(&mut theirs).await;
        theirs
    };
    let (client, theirs) = tokio::join!(
        NbdClient::handshake(Box::new(ours), "x", &[BASE_ALLOCATION]),
        server
    );
    script(theirs);
    client.unwrap()
}

#[tokio::test]
async fn wrong_cookie_breaks_the_connection() {
    let mut c = client_with(|mut s| {
        tokio::spawn(async move {
            let (_, cookie, ..) = request(&mut s).await;
            s.write_all(&chunk(1, 0, cookie + 1, &[])).await.unwrap();
            let _ = s.read_u8().await;
        })
    })
    .await;
    assert_eq!(c.context_id(BASE_ALLOCATION), Some(CTX));
    let err = c.flush().await.unwrap_err();
    assert!(
        matches!(
            err,
            NbdError::Protocol(NbdProtocolError::CookieMismatch { .. })
        ),
        "{err}"
    );
    assert!(matches!(c.flush().await, Err(NbdError::Broken)));
}

#[tokio::test]
async fn read_assembles_out_of_order_chunks_and_rejects_strays() {
    let mut c = client_with(|mut s| {
        tokio::spawn(async move {
            let (_, cookie, offset, _) = request(&mut s).await;
            s.write_all(&chunk(
                0,
                1,
                cookie,
                &[be(&[offset + 2], &[8]), b"cd".to_vec()].concat(),
            ))
            .await
            .unwrap();
            s.write_all(&chunk(1, 2, cookie, &be(&[offset, 2], &[8, 4])))
                .await
                .unwrap();
            let (_, cookie, offset, _) = request(&mut s).await;
            s.write_all(&chunk(
                1,
                1,
                cookie,
                &[be(&[offset + 3], &[8]), b"zz".to_vec()].concat(),
            ))
            .await
            .unwrap();
        })
    })
    .await;
    let mut buf = [9u8; 4];
    c.read(100, &mut buf).await.unwrap();
    assert_eq!(&buf, b"\0\0cd");
    let err = c.read(100, &mut buf).await.unwrap_err();
    assert!(
        matches!(
            err,
            NbdError::Protocol(NbdProtocolError::ChunkOutOfRange { .. })
        ),
        "{err}"
    );
}

#[tokio::test]
async fn map_clips_long_extents_and_repeats_short_answers() {
    let mut c = client_with(|mut s| {
        tokio::spawn(async move {
            // First answer is short (1000 bytes), second overshoots the request.
            for extents in [vec![600u64, 0, 400, 3], vec![SIZE, 3]] {
                let (kind, cookie, ..) = request(&mut s).await;
                assert_eq!(kind, 7);
                let mut payload = CTX.to_be_bytes().to_vec();
                payload.extend(extents.iter().flat_map(|v| (*v as u32).to_be_bytes()));
                s.write_all(&chunk(1, 5, cookie, &payload)).await.unwrap();
            }
        })
    })
    .await;
    let map = c.map(BASE_ALLOCATION, 0, 5000).await.unwrap();
    let e = |offset, length, flags| Extent {
        offset,
        length,
        flags,
    };
    assert_eq!(map, vec![e(0, 600, 0), e(600, 4400, 3)]);
}

#[tokio::test]
async fn server_errors_fail_the_command_but_keep_the_connection() {
    let mut c = client_with(|mut s| {
        tokio::spawn(async move {
            let (_, cookie, ..) = request(&mut s).await;
            let mut payload = be(&[28, 5], &[4, 2]);
            payload.extend_from_slice(b"full!");
            s.write_all(&chunk(1, 0x8001, cookie, &payload))
                .await
                .unwrap();
            let (_, cookie, ..) = request(&mut s).await;
            s.write_all(&be(&[0x6744_6698, 0, cookie], &[4, 4, 8]))
                .await
                .unwrap();
        })
    })
    .await;
    let err = c.write_zeroes(0, 4096).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "NBD NBD_CMD_WRITE_ZEROES at 0+4096 failed with ENOSPC (no space left on device): full!"
    );
    assert!(!err.breaks_connection());
    c.flush().await.unwrap();
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let mut c = client_with(|mut s| {
        tokio::spawn(async move {
            let _ = request(&mut s).await;
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        })
    })
    .await;
    c.set_timeout(Some(std::time::Duration::from_millis(50)));
    assert!(matches!(c.flush().await, Err(NbdError::Timeout(_))));
    assert!(matches!(c.flush().await, Err(NbdError::Broken)));
}
