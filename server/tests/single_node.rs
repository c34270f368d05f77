//! Integration tests: the real `ringkv` binary on an ephemeral 127.0.0.1 port with a temp
//! RocksDB data dir, driven through the client library and raw sockets.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ringkv_client::{Client, ClientConfig, Error, ErrorKind, GetOptions, PutOptions};
use ringkv_jepsen::disk::SmallDisk;
use ringkv_jepsen::powerloss;
use ringkv_jepsen::NodeProcess;
use ringkv_protocol::frame::{put_header, HEADER_LEN};
use ringkv_protocol::limits::{MAX_KEY_LEN, MAX_REQUEST_BODY_LEN, MAX_VALUE_LEN};
use ringkv_protocol::message::opcode;
use ringkv_protocol::{Frame, Request, Response};

/// A lone node: replication factor 1 (the default N=3 needs three nodes).
const SINGLE: &[&str] = &["--n", "1"];

async fn client(node: &NodeProcess) -> Client {
    Client::connect([node.addr.clone()]).await.expect("connect")
}

use ringkv_jepsen::sorted_values as strings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete() {
    let node = NodeProcess::start_temp("n1", SINGLE);
    let c = client(&node).await;
    let missing = c.get("k").await.unwrap();
    assert!(!missing.is_found());
    assert!(
        !missing.context.is_empty(),
        "not found still carries a context token"
    );
    c.put("k", "v1", None).await.unwrap();
    let read = c.get("k").await.unwrap();
    assert_eq!(read.value().map(|v| v.as_ref()), Some(&b"v1"[..]));
    c.put("k", "v2", Some(&read.context)).await.unwrap();
    let read = c.get("k").await.unwrap();
    assert_eq!(strings(&read), vec!["v2"]);
    c.delete("k", Some(&read.context)).await.unwrap();
    let read = c.get("k").await.unwrap();
    assert!(!read.is_found());
    assert!(read.siblings.iter().all(|s| s.is_deleted()));
    // Re-create with the tombstone's context: exactly one live sibling, no tombstone left.
    c.put("k", "v3", Some(&read.context)).await.unwrap();
    let read = c.get("k").await.unwrap();
    assert_eq!(read.siblings.len(), 1);
    assert_eq!(strings(&read), vec!["v3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_blind_writes_become_siblings_and_context_resolves_them() {
    let node = NodeProcess::start_temp("n1", SINGLE);
    let a = client(&node).await;
    let b = client(&node).await;
    a.put("cart", "apple", None).await.unwrap();
    b.put("cart", "pear", None).await.unwrap();
    let read = a.get("cart").await.unwrap();
    assert_eq!(strings(&read), vec!["apple", "pear"]);
    assert!(read.has_conflict());
    let merged = a
        .put_returning("cart", "apple+pear", Some(&read.context))
        .await
        .unwrap();
    assert_eq!(strings(&merged), vec!["apple+pear"]);
    assert_eq!(strings(&b.get("cart").await.unwrap()), vec!["apple+pear"]);
    // A writer with a stale context keeps the newer value as a sibling (nothing is lost).
    b.put("cart", "stale", Some(&read.context)).await.unwrap();
    assert_eq!(
        strings(&a.get("cart").await.unwrap()),
        vec!["apple+pear", "stale"]
    );
    // A context for another key is refused, and changes nothing.
    let err = a.put("other", "x", Some(&read.context)).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::InvalidRequest), "{err}");
    assert!(err.to_string().contains("another key"), "{err}");
    assert!(!a.get("other").await.unwrap().is_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_graceful_restart() {
    let mut node = NodeProcess::start_temp("n1", SINGLE);
    let c = client(&node).await;
    for i in 0..50 {
        c.put(format!("k{i}"), format!("v{i}"), None).await.unwrap();
    }
    let status = node.stop().expect("graceful stop");
    assert!(status.success(), "SIGTERM exit status: {status}");
    assert!(
        node.log_tail(20).contains("storage closed cleanly"),
        "{}",
        node.log_tail(20)
    );
    node.start().unwrap();
    let c = client(&node).await;
    for i in 0..50 {
        let read = c.get(format!("k{i}")).await.unwrap();
        assert_eq!(strings(&read), vec![format!("v{i}")]);
    }
}

/// Puts `k0..k199` = `v0..v199`, all in flight at once, each acknowledged.
async fn put_200_at_once(c: &Client) {
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put(format!("k{i}"), format!("v{i}"), None).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// kill -9 immediately after the last acknowledgement. The WAL is written before the ack in
/// every sync mode, so a process crash loses nothing in any of them (power loss needs `group`
/// or `always`; see docs/operations.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    for mode in ["none", "group", "always"] {
        // 200 writes in flight at once on one connection: above the default client budget
        // (128), which would refuse some of them Overloaded.
        let mut node = NodeProcess::start_temp(
            "n1",
            &["--n", "1", "--sync", mode, "--max-requests", "1024"],
        );
        let c = client(&node).await;
        put_200_at_once(&c).await;
        node.kill9();
        node.start().unwrap();
        let c = client(&node).await;
        for i in 0..200 {
            let read = c.get(format!("k{i}")).await.unwrap();
            assert_eq!(
                strings(&read),
                vec![format!("v{i}")],
                "sync={mode}: key k{i} lost after kill -9"
            );
        }
        // After an unclean stop, new writes still never collide with old versions.
        c.put("k0", "after", None).await.unwrap();
        assert_eq!(
            strings(&c.get("k0").await.unwrap()),
            vec!["after".to_string(), "v0".to_string()]
        );
        c.put("k0", "resolved", Some(&c.get("k0").await.unwrap().context))
            .await
            .unwrap();
        assert_eq!(strings(&c.get("k0").await.unwrap()), vec!["resolved"]);
    }
}

/// A simulated power loss through the binary: `kill -9`, then every file of the data dir cut
/// back to what was fsynced (the fsync-logging shim the Jepsen `powerloss` nemesis uses), and a
/// restart with another boot id. `group` and `always` keep every acknowledged write; `none`
/// loses those its last fsync did not cover, which shows the model drops what a power loss
/// would (docs/operations.md, "Durability").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_keeps_acknowledged_writes_under_group_and_always_not_none() {
    for mode in ["none", "group", "always"] {
        let mut node = NodeProcess::new_temp(
            "n1",
            &["--n", "1", "--sync", mode, "--max-requests", "1024"],
        );
        let data_dir = node.data_dir.clone();
        for (k, v) in powerloss::env(&data_dir, None) {
            node.set_env(&k, &v);
        }
        node.start().unwrap();
        let c = client(&node).await;
        put_200_at_once(&c).await;
        let dropped = powerloss::power_loss(&mut node).unwrap();
        node.set_env("RINGKV_BOOT_ID", &format!("after-power-loss-{mode}"));
        node.start().unwrap();
        let c = client(&node).await;
        let mut lost = 0;
        for i in 0..200 {
            let read = strings(&c.get(format!("k{i}")).await.unwrap());
            if read.is_empty() {
                lost += 1;
            } else {
                assert_eq!(read, vec![format!("v{i}")], "sync={mode}");
            }
        }
        eprintln!(
            "sync={mode}: power loss dropped {dropped} unsynced bytes, {lost} of 200 writes lost"
        );
        if mode == "none" {
            assert!(
                lost > 0,
                "sync=none: the power loss ({dropped} unsynced bytes dropped) lost no write"
            );
        } else {
            assert_eq!(
                lost, 0,
                "sync={mode}: acknowledged writes lost ({dropped} bytes dropped)"
            );
        }
        // The node writes on after it, as a new incarnation.
        c.put("k0", "after", None).await.unwrap();
        assert!(strings(&c.get("k0").await.unwrap()).contains(&"after".to_string()));
    }
}

/// Found by the Jepsen full profile (set, disk+kill): a node on a 64 MiB disk filled it with
/// write-ahead log and could not restart. RocksDB keeps a WAL file until every column family
/// with data in it has flushed, and a column family written rarely (`meta`) held them all up
/// to a fixed 256 MiB budget, whatever the memtable size. The budget is now four data
/// memtables: overwriting a few keys with 48 MiB keeps the WAL within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_within_four_memtables_while_a_column_family_idles() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "write_buffer_mb = 4\n").unwrap();
    let data = dir.path().join("data");
    let config_arg = config.display().to_string();
    let mut args: Vec<&str> = SINGLE.to_vec();
    args.extend(["--config", config_arg.as_str()]);
    let mut node = NodeProcess::new("n1", &data, "127.0.0.1:0", &args);
    node.start().unwrap();
    let c = client(&node).await;
    let value = |i: usize| Bytes::from(vec![i as u8; 64 << 10]);
    let wal_bytes = || -> u64 {
        std::fs::read_dir(data.join("db"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum()
    };
    let mut largest = 0;
    for i in 0..768 {
        c.put(format!("k{}", i % 16), value(i), None).await.unwrap();
        largest = largest.max(wal_bytes());
    }
    // Four 4 MiB memtables, and the file being written past the budget when a flush starts.
    let bound = 4 * (4 << 20) + (8 << 20);
    assert!(
        largest <= bound,
        "the WAL reached {} MiB with 4 MiB memtables (bound {} MiB)",
        largest >> 20,
        bound >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_key_and_value_get_too_large_and_connection_stays_usable() {
    let node = NodeProcess::start_temp("n1", SINGLE);
    let c = client(&node).await;
    let big_key = "k".repeat(MAX_KEY_LEN + 1);
    let err = c.put(&big_key, "v", None).await.unwrap_err();
    assert_eq!(
        err.kind(),
        Some(ErrorKind::TooLarge {
            size: MAX_KEY_LEN as u64 + 1,
            limit: MAX_KEY_LEN as u64
        }),
        "{err}"
    );
    assert!(err.is_definite());
    assert!(
        err.to_string().contains("node n1"),
        "error names the node: {err}"
    );
    let big_value = Bytes::from(vec![7u8; MAX_VALUE_LEN + 1]);
    let err = c.put("k", big_value, None).await.unwrap_err();
    assert!(
        matches!(err.kind(), Some(ErrorKind::TooLarge { .. })),
        "{err}"
    );
    // The largest allowed value works, on the same connection.
    let max_value = Bytes::from(vec![7u8; MAX_VALUE_LEN]);
    c.put("k", max_value.clone(), None).await.unwrap();
    assert_eq!(c.get("k").await.unwrap().value(), Some(&max_value));
}

fn raw_connect(node: &NodeProcess) -> TcpStream {
    let s = TcpStream::connect(&node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn read_frame(s: &mut TcpStream) -> Option<(u64, Response)> {
    let mut header = [0u8; HEADER_LEN];
    s.read_exact(&mut header).ok()?;
    let opcode = header[3];
    let id = u64::from_be_bytes(header[4..12].try_into().unwrap());
    let len = u32::from_be_bytes(header[12..16].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((id, Response::decode(opcode, Bytes::from(body)).unwrap()))
}

fn write_frame(s: &mut TcpStream, f: &Frame) {
    let mut buf = BytesMut::new();
    put_header(&mut buf, f.opcode, f.request_id, f.body.len());
    buf.extend_from_slice(&f.body);
    s.write_all(&buf).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_and_unknown_version_are_answered_and_skipped() {
    let node = NodeProcess::start_temp("n1", SINGLE);
    let mut s = raw_connect(&node);
    // A frame larger than any request may be: answered TooLarge by id, body skipped.
    let huge = Frame {
        opcode: opcode::PUT,
        request_id: 11,
        body: Bytes::from(vec![0u8; MAX_REQUEST_BODY_LEN + 10]),
    };
    write_frame(&mut s, &huge);
    // A frame of an unknown protocol version.
    let mut v9 = BytesMut::new();
    put_header(&mut v9, opcode::PING, 12, 3);
    v9[2] = 9;
    v9.extend_from_slice(b"abc");
    s.write_all(&v9).unwrap();
    // A frame with a valid header and a garbage body.
    write_frame(
        &mut s,
        &Frame {
            opcode: opcode::GET,
            request_id: 13,
            body: Bytes::from_static(b"\xff\xff"),
        },
    );
    write_frame(&mut s, &Request::Ping.to_frame(14));
    let mut got = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let (id, resp) = read_frame(&mut s).expect("a reply per frame");
        got.insert(id, resp);
    }
    match &got[&11] {
        Response::Error(e) => assert!(
            matches!(e.kind, ringkv_protocol::ErrorKind::TooLarge { .. }),
            "{e:?}"
        ),
        other => panic!("{other:?}"),
    }
    match &got[&12] {
        Response::Error(e) => assert_eq!(
            e.kind,
            ringkv_protocol::ErrorKind::UnsupportedVersion {
                got: 9,
                supported: 1
            }
        ),
        other => panic!("{other:?}"),
    }
    match &got[&13] {
        Response::Error(e) => assert_eq!(e.kind, ringkv_protocol::ErrorKind::Malformed, "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(got[&14], Response::Pong);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_get_an_error_and_other_clients_keep_working() {
    let node = NodeProcess::start_temp("n1", SINGLE);
    let good = client(&node).await;
    good.put("k", "v", None).await.unwrap();
    let mut bad = raw_connect(&node);
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (id, resp) = read_frame(&mut bad).expect("an error frame before closing");
    assert_eq!(id, 0);
    match resp {
        Response::Error(e) => {
            assert_eq!(e.kind, ringkv_protocol::ErrorKind::Malformed);
            assert!(e.message.contains("bad magic"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let mut rest = Vec::new();
    assert_eq!(bad.read_to_end(&mut rest).unwrap(), 0, "connection closed");
    assert_eq!(strings(&good.get("k").await.unwrap()), vec!["v"]);
    let status = good.status().await.unwrap();
    let malformed = status
        .metrics
        .iter()
        .find(|(k, _)| k == "net.malformed")
        .unwrap()
        .1;
    assert!(malformed >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_clients_read_their_own_writes() {
    let node = NodeProcess::start_temp("n1", SINGLE);
    let mut tasks = Vec::new();
    for c in 0..100 {
        let addr = node.addr.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::connect([addr]).await?;
            for i in 0..20 {
                let key = format!("client{c}/key{i}");
                let value = format!("value {c}.{i}");
                client.put(&key, value.clone(), None).await?;
                let read = client.get(&key).await?;
                assert_eq!(read.values(), vec![&Bytes::from(value)], "{key}");
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let status = client(&node).await.status().await.unwrap();
    let puts = status
        .metrics
        .iter()
        .find(|(k, _)| k == "requests{op=put,result=ok}")
        .unwrap()
        .1;
    assert_eq!(puts, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_larger_than_n_is_refused() {
    let node = NodeProcess::start_temp("n1", SINGLE);
    let c = client(&node).await;
    let err = c
        .get_with(
            "k",
            GetOptions {
                r: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::InvalidRequest));
    assert!(
        err.to_string()
            .contains("R=2 exceeds the replication factor N=1"),
        "{err}"
    );
    let err = c
        .put_with(
            "k",
            "v",
            None,
            PutOptions {
                w: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("W=3"), "{err}");
    assert!(
        !c.get("k").await.unwrap().is_found(),
        "refused write applied nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_with_overloaded() {
    let node = NodeProcess::start_temp("n1", &["--n", "1", "--max-connections", "2"]);
    let _a = raw_connect(&node);
    let _b = raw_connect(&node);
    std::thread::sleep(Duration::from_millis(200));
    let mut c = raw_connect(&node);
    let (id, resp) = read_frame(&mut c).expect("an Overloaded frame");
    assert_eq!(id, 0);
    assert!(
        matches!(resp, Response::Error(ref e) if matches!(e.kind, ringkv_protocol::ErrorKind::Overloaded { .. })),
        "{resp:?}"
    );
    drop(_a);
    // A slot frees up: a client connects again.
    let mut ok = false;
    for _ in 0..50 {
        let cfg = ClientConfig {
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        if Client::connect_with([node.addr.clone()], cfg).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "a connection slot frees when a client leaves");
}

#[test]
fn invalid_config_exits_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ringkv_jepsen::bin_path("ringkv"))
        .args(["--node-id", "bad id", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid node_id"), "{err}");

    let out = std::process::Command::new(ringkv_jepsen::bin_path("ringkv"))
        .args(["--node-id", "n1", "--sync", "maybe", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid sync mode"));
}

#[test]
fn data_dir_of_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = NodeProcess::new("n1", dir.path(), "127.0.0.1:0", SINGLE);
    a.start().unwrap();
    a.stop().unwrap();
    let mut b = NodeProcess::new("n2", dir.path(), "127.0.0.1:0", SINGLE);
    let err = b.start().unwrap_err();
    assert!(err.contains("belongs to node \"n1\""), "{err}");
}

/// A full disk through the real binary: the write that does not fit is answered `Internal`
/// with the cause, naming node and key, and as definite (nothing written); every write
/// acknowledged before stays readable and the node keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_internal_with_the_cause_and_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_disk) = SmallDisk::mount(&dir.path().join("db"), 16).unwrap() else {
        eprintln!("skipped: mounting a small tmpfs as a full disk needs root");
        return;
    };
    let mut node = NodeProcess::new("n1", dir.path(), "127.0.0.1:0", SINGLE);
    node.start().unwrap();
    let c = client(&node).await;
    let value = |i: usize| Bytes::from(vec![i as u8; MAX_VALUE_LEN]);
    let mut acked = Vec::new();
    let err = loop {
        let i = acked.len();
        assert!(i < 64, "64 MiB of writes fit a 16 MiB disk");
        match c.put(format!("big{i}"), value(i), None).await {
            Ok(_) => acked.push(i),
            Err(e) => break e,
        }
    };
    eprintln!("{} MiB acknowledged, then: {err}", acked.len());
    assert!(!acked.is_empty(), "the first write fits: {err}");
    assert_eq!(err.kind(), Some(ErrorKind::Internal), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("node n1"), "names the node: {msg}");
    assert!(
        msg.contains(&format!("big{}", acked.len())),
        "names the key: {msg}"
    );
    assert!(msg.contains("disk full"), "names the cause: {msg}");
    assert!(err.is_definite(), "a rejected batch applied nothing: {msg}");
    for &i in &acked {
        let read = c.get(format!("big{i}")).await.unwrap();
        assert_eq!(
            read.value(),
            Some(&value(i)),
            "acknowledged big{i} readable"
        );
    }
    let failed = c.get(format!("big{}", acked.len())).await.unwrap();
    assert!(!failed.is_found(), "the refused write is not there");
    assert!(
        node.child_running(),
        "the node survives the full disk:\n{}",
        node.log_tail(20)
    );
}

/// Regression (defect 4): every new actor added a permanent version-vector entry while
/// contexts were capped at 64 entries, so after 65 incarnations a read-modify-write of a key
/// was refused forever. 100 incarnations of one node (kill -9 in sync=none, each restart
/// after a simulated reboot, which renews the actor) write one key; then a read-modify-write
/// succeeds, and no value was lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_incarnations_writing_one_key_leave_it_writable_and_lose_nothing() {
    let mut node = NodeProcess::new_temp("n1", &["--n", "1", "--sync", "none"]);
    let mut actors = std::collections::BTreeSet::new();
    let mut blind = Vec::new();
    for i in 0..100 {
        node.set_env("RINGKV_BOOT_ID", &format!("simulated-boot-{i}"));
        node.start().unwrap();
        let c = client(&node).await;
        // Half the incarnations write blind (a sibling each, from another actor), half
        // read-modify-write (superseding what they read).
        let written = if i % 2 == 0 {
            let v = format!("blind{i}");
            blind.push(v.clone());
            c.put("k", v, None).await.unwrap()
        } else {
            let read = c.get("k").await.unwrap();
            for v in &blind {
                assert!(
                    strings(&read).contains(v),
                    "incarnation {i}: {v} lost before it was resolved"
                );
            }
            blind.clear();
            c.put("k", format!("rmw{i}"), Some(&read.context))
                .await
                .unwrap()
        };
        actors.insert(written.dot.0);
        node.kill9();
    }
    assert_eq!(
        actors.len(),
        100,
        "every simulated reboot renewed the actor"
    );
    node.set_env("RINGKV_BOOT_ID", "simulated-boot-final");
    node.start().unwrap();
    let c = client(&node).await;
    let read = c.get("k").await.unwrap();
    assert_eq!(strings(&read), vec!["rmw99"]);
    let ctx = ringkv_protocol::CausalContext::decode(read.context.as_bytes(), b"k").unwrap();
    assert!(
        ctx.entries.len() <= ringkv_protocol::limits::MAX_SIBLINGLESS_ENTRIES + 1,
        "{} context entries",
        ctx.entries.len()
    );
    c.put("k", "final", Some(&read.context)).await.unwrap();
    assert_eq!(strings(&c.get("k").await.unwrap()), vec!["final"]);
    assert!(
        ringkv_jepsen::metric(&c, "storage.vv_entries_pruned").await > 0,
        "retired entries were pruned"
    );
}

/// kill -9 on the same boot keeps the actor in every sync mode: every write was handed to the
/// OS before it was acknowledged, so nothing can be missing from the node's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_the_same_boot_keeps_the_actor() {
    for mode in ["none", "group"] {
        let mut node = NodeProcess::new_temp("n1", &["--n", "1", "--sync", mode]);
        node.set_env("RINGKV_BOOT_ID", "one-boot");
        node.start().unwrap();
        let first = client(&node).await.put("a", "1", None).await.unwrap().dot;
        node.kill9();
        node.start().unwrap();
        let second = client(&node).await.put("b", "1", None).await.unwrap().dot;
        assert_eq!(first.0, second.0, "sync={mode}");
        assert!(second.1 > first.1);
    }
}
