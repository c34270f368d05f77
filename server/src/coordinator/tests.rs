//! Coordination without processes: the coordinator over the in-memory engine, a fixed
//! cluster view, and a scripted transport whose peers answer late, fail, send stale or
//! concurrent states. Asserts the replies, the repairs sent and the errors.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use super::*;
use crate::background::Runner;
use crate::metrics::Registry;
use crate::storage::memory::MemoryEngine;
use crate::testkit::{b_replaced_by_d, eventually, peer_addr as addr, view, view_changing};
use crate::version::Dot;

/// What a scripted peer does with one kind of request.
#[derive(Clone)]
struct Behaviour {
    delay: Duration,
    reply: Result<PeerResponse, PeerError>,
}

fn answer(reply: PeerResponse) -> Behaviour {
    Behaviour {
        delay: Duration::ZERO,
        reply: Ok(reply),
    }
}

fn late(delay: Duration, reply: PeerResponse) -> Behaviour {
    Behaviour {
        delay,
        reply: Ok(reply),
    }
}

fn failing() -> Behaviour {
    Behaviour {
        delay: Duration::ZERO,
        reply: Err(PeerError::Lost("scripted failure".into())),
    }
}

fn unreachable() -> Behaviour {
    Behaviour {
        delay: Duration::ZERO,
        reply: Err(PeerError::Unreachable("scripted: not running".into())),
    }
}

fn late_ack(delay: Duration) -> Behaviour {
    late(delay, PeerResponse::Replica(ReplicaResponse::Ack))
}

/// A primary that coordinates a forwarded write and answers `resp`.
fn coordinates(resp: &Response) -> Behaviour {
    let frame = resp.to_frame(0);
    answer(PeerResponse::Coordinator(
        CoordinatorResponse::ForwardReply {
            opcode: frame.opcode,
            body: frame.body,
        },
    ))
}

fn ack() -> Behaviour {
    answer(PeerResponse::Replica(ReplicaResponse::Ack))
}

fn state_reply(s: &KeyState) -> PeerResponse {
    PeerResponse::Replica(ReplicaResponse::State(Bytes::from(s.encode())))
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Read,
    Replicate,
    Forward,
    StoreHint,
    ReadHint,
}

fn kind(req: &PeerRequest) -> Kind {
    match req {
        PeerRequest::Replica(ReplicaRequest::ReadLocal { .. }) => Kind::Read,
        PeerRequest::Replica(ReplicaRequest::Replicate { .. }) => Kind::Replicate,
        PeerRequest::Coordinator(_) => Kind::Forward,
        PeerRequest::Handoff(HandoffRequest::StoreHint { .. }) => Kind::StoreHint,
        PeerRequest::Handoff(HandoffRequest::ReadHint { .. }) => Kind::ReadHint,
        other => panic!("the coordinator sent {other:?}"),
    }
}

/// Peers by address: scripted answers, and every call recorded in order.
#[derive(Default)]
struct Script {
    behaviours: Mutex<HashMap<(String, Kind), Behaviour>>,
    calls: Mutex<Vec<(String, PeerRequest)>>,
}

impl Script {
    fn on(&self, node: &str, k: Kind, b: Behaviour) {
        self.behaviours.lock().unwrap().insert((addr(node), k), b);
    }

    fn calls(&self, k: Kind) -> Vec<(String, PeerRequest)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| kind(r) == k)
            .cloned()
            .collect()
    }

    /// The states replicated to `node`, decoded.
    fn replicated_to(&self, node: &str) -> Vec<KeyState> {
        self.calls(Kind::Replicate)
            .into_iter()
            .filter(|(a, _)| *a == addr(node))
            .map(|(_, r)| match r {
                PeerRequest::Replica(ReplicaRequest::Replicate { state, .. }) => {
                    KeyState::decode(&state).unwrap()
                }
                _ => unreachable!(),
            })
            .collect()
    }
}

impl Transport for Script {
    fn call(
        self: Arc<Self>,
        addr: String,
        req: PeerRequest,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<PeerResponse, PeerError>> + Send + 'static {
        let k = kind(&req);
        self.calls.lock().unwrap().push((addr.clone(), req));
        let b = self
            .behaviours
            .lock()
            .unwrap()
            .get(&(addr.clone(), k))
            .cloned()
            .unwrap_or_else(unreachable);
        async move {
            if b.delay > timeout {
                // No reply before the caller gives up: the caller's deadline decides.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(b.delay).await;
            b.reply
        }
    }
}

struct Harness {
    coordinator: Arc<Coordinator<Script>>,
    store: Arc<Store>,
    engine: Arc<MemoryEngine>,
    script: Arc<Script>,
    _runner: Arc<Runner>,
}

impl Harness {
    /// Puts `state` into the coordinator's own copy of `key`.
    async fn holds(&self, key: &str, state: &KeyState) {
        let op = WriteOp::Merge {
            key: Bytes::from(key.to_string()),
            state: state.clone(),
        };
        self.store.write(op).await.unwrap();
    }
}

/// Node "a" coordinates, with N=3, R=W=2 by default; reads ask every live replica (the
/// tests of read repair across all replicas).
fn harness(view: ClusterView) -> Harness {
    harness_with(view, true)
}

/// Reads ask R replicas (`--read-fanout quorum`, the default), spares after 20 ms.
fn harness_quorum_reads(view: ClusterView) -> Harness {
    harness_with(view, false)
}

fn harness_with(view: ClusterView, read_all: bool) -> Harness {
    let engine = Arc::new(MemoryEngine::new());
    let store = crate::testkit::open_store(engine.clone(), "a");
    let script = Arc::new(Script::default());
    let (membership, _view_tx) = Membership::fixed(view);
    let runner = Runner::new("a".into(), Arc::new(Registry::default()));
    let (late, worker) = LateReplies::new();
    runner.spawn(worker);
    let coordinator = Arc::new(Coordinator::new(
        CoordinatorConfig {
            node_id: "a".into(),
            n: 3,
            r: 2,
            w: 2,
            timeouts: Timeouts {
                default_ms: 1000,
                longest_ms: 1000,
            },
            hinted_handoff: true,
            read_repair: true,
            read_all,
            read_speculate: Duration::from_millis(20),
        },
        store.clone(),
        script.clone(),
        membership,
        late,
    ));
    Harness {
        coordinator,
        store,
        engine,
        script,
        _runner: runner,
    }
}

fn put(key: &str, value: &str, w: u8, timeout_ms: u32) -> Request {
    Request::Put {
        key: Bytes::from(key.to_string()),
        value: Bytes::from(value.to_string()),
        context: Bytes::new(),
        opts: WriteOptions {
            w,
            timeout_ms,
            flags: 0,
            pw: 0,
        },
    }
}

fn get_opts(r: u8, timeout_ms: u32) -> ReadOptions {
    ReadOptions {
        r,
        timeout_ms,
        flags: 0,
        pr: 0,
    }
}

/// A state holding one sibling minted by `actor`.
fn one_sibling(actor: u64, value: &str) -> KeyState {
    KeyState::new().update(
        &VersionVector::new(),
        Dot { actor, counter: 1 },
        5,
        Some(Bytes::from(value.to_string())),
    )
}

fn values(state: &KeyState) -> BTreeSet<String> {
    state
        .siblings()
        .iter()
        .filter_map(|s| s.value.as_ref())
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
        .collect()
}

fn reply_values(resp: &Response) -> BTreeSet<String> {
    match resp {
        Response::Get(r) => r
            .siblings
            .iter()
            .filter_map(|s| s.value.as_ref())
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
            .collect(),
        other => panic!("expected a read reply, got {other:?}"),
    }
}

async fn local(store: &Arc<Store>, key: &str) -> KeyState {
    store.read(Bytes::from(key.to_string())).await.unwrap()
}

/// The error of `resp`, which must be `Unavailable { alive, needed }` (`context` says why in
/// the failure message).
fn expect_unavailable(
    resp: Response,
    (alive, needed): (u64, u64),
    context: &str,
) -> ringkv_protocol::ErrorReply {
    match resp {
        Response::Error(e) => {
            assert_eq!(
                e.kind,
                ErrorKind::Unavailable { alive, needed },
                "{}",
                e.message
            );
            e
        }
        other => panic!("{context}: {other:?}"),
    }
}

/// `resp` refused the write of `key` before anything was written: a definite `Unavailable`
/// with `alive` of `needed` replicas whose message contains `why`, no peer asked, nothing
/// minted here.
async fn assert_refused_up_front(
    h: &Harness,
    key: &str,
    resp: Response,
    (alive, needed): (u64, u64),
    why: &str,
) {
    let e = expect_unavailable(resp, (alive, needed), "refused up front");
    assert!(e.definite && e.message.contains(why), "{}", e.message);
    assert!(
        h.script.calls.lock().unwrap().is_empty(),
        "no peer was asked"
    );
    assert!(
        local(&h.store, key).await.siblings().is_empty(),
        "nothing minted"
    );
}

const ABC: [&str; 3] = ["a", "b", "c"];

#[tokio::test]
async fn a_write_succeeds_at_w_with_one_replica_failing_and_ships_the_minted_state() {
    let h = harness(view(&ABC, "a", &["b", "c"]));
    h.script.on("b", Kind::Replicate, ack());
    h.script.on("c", Kind::Replicate, failing());
    let resp = h.coordinator.write(put("k", "v", 2, 1000)).await;
    let Response::Put(reply) = resp else {
        panic!("{resp:?}")
    };
    let dot = Dot {
        actor: reply.actor,
        counter: reply.counter,
    };
    let mine = local(&h.store, "k").await;
    assert_eq!(values(&mine), BTreeSet::from(["v".to_string()]));
    assert_eq!(
        mine.siblings()[0].dot,
        dot,
        "the coordinator minted the dot"
    );
    for node in ["b", "c"] {
        let shipped = h.script.replicated_to(node);
        assert_eq!(shipped.len(), 1, "{node}");
        assert_eq!(shipped[0], mine, "{node} got the coordinator's state");
    }
    eventually("c's failure counted", || {
        h.coordinator.metrics.replicate_failed.get() == 1
    })
    .await;
}

#[tokio::test]
async fn a_write_missing_w_at_the_deadline_is_an_indefinite_timeout() {
    let h = harness(view(&ABC, "a", &["b", "c"]));
    h.script.on("b", Kind::Replicate, ack());
    h.script
        .on("c", Kind::Replicate, late_ack(Duration::from_secs(5)));
    let resp = h.coordinator.write(put("k", "v", 3, 100)).await;
    match resp {
        Response::Error(e) => {
            assert_eq!(
                e.kind,
                ErrorKind::Timeout { acks: 2, needed: 3 },
                "{}",
                e.message
            );
            assert!(
                !e.definite,
                "two replicas hold the write: the outcome is not definite"
            );
            assert!(e.message.starts_with("node a: key \"k\""), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_ack_after_the_answer_is_counted_late() {
    let h = harness(view(&ABC, "a", &["b", "c"]));
    h.script.on("b", Kind::Replicate, ack());
    h.script
        .on("c", Kind::Replicate, late_ack(Duration::from_millis(100)));
    let resp = h.coordinator.write(put("k", "v", 2, 2000)).await;
    assert!(matches!(resp, Response::Put(_)), "{resp:?}");
    assert_eq!(
        h.coordinator.metrics.late_acks.get(),
        0,
        "answered before c"
    );
    eventually("c's ack counted late", || {
        h.coordinator.metrics.late_acks.get() == 1
    })
    .await;
}

#[tokio::test]
async fn a_write_with_too_few_live_primaries_is_refused_before_anything_is_written() {
    let h = harness(view(&ABC, "a", &["b"]));
    let resp = h.coordinator.write(put("k", "v", 3, 1000)).await;
    assert_refused_up_front(&h, "k", resp, (2, 3), "").await;
}

#[tokio::test]
async fn a_write_whose_replicas_all_fail_is_unavailable_and_indefinite() {
    let h = harness(view(&ABC, "a", &["b", "c"]));
    h.script.on("b", Kind::Replicate, failing());
    h.script.on("c", Kind::Replicate, failing());
    let resp = h.coordinator.write(put("k", "v", 2, 1000)).await;
    let e = expect_unavailable(resp, (1, 2), "all replicas failed");
    assert!(!e.definite, "this node holds the version: {}", e.message);
}

#[tokio::test]
async fn a_read_merges_stale_and_concurrent_replies_and_repairs_every_other_replica() {
    let h = harness(view(&ABC, "a", &["b", "c"]));
    let mine = one_sibling(1, "from-a");
    h.holds("k", &mine).await;
    let theirs = one_sibling(2, "from-c");
    h.script
        .on("b", Kind::Read, answer(state_reply(&KeyState::new())));
    h.script.on("c", Kind::Read, answer(state_reply(&theirs)));
    h.script.on("b", Kind::Replicate, ack());
    h.script.on("c", Kind::Replicate, ack());
    let resp = h
        .coordinator
        .get(Bytes::from_static(b"k"), get_opts(3, 1000))
        .await;
    let both = BTreeSet::from(["from-a".to_string(), "from-c".to_string()]);
    assert_eq!(
        reply_values(&resp),
        both,
        "concurrent versions are siblings"
    );
    let merged = mine.sync(&theirs);
    eventually("b and c repaired", || {
        h.script.replicated_to("b") == vec![merged.clone()]
            && h.script.replicated_to("c") == vec![merged.clone()]
    })
    .await;
    for _ in 0..400 {
        if values(&local(&h.store, "k").await) == both {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        values(&local(&h.store, "k").await),
        both,
        "the coordinator's copy repaired too"
    );
    assert_eq!(h.coordinator.metrics.read_repairs.get(), 3);
}

/// Found in review: read repairs went to their targets one after another, each with its own
/// 2 s, so with a silent first target the next one got the merged state seconds after the
/// read, later than tombstone GC allows for a state read before a delete (its settle time
/// assumes the read's deadline plus half the settle time). They go out together now, within
/// one bound from the read's end.
#[tokio::test]
async fn read_repairs_go_out_together_not_one_after_another() {
    let h = harness(view(&ABC, "a", &["b", "c"]));
    let mine = one_sibling(1, "from-a");
    h.holds("k", &mine).await;
    h.script
        .on("b", Kind::Read, answer(state_reply(&KeyState::new())));
    h.script
        .on("c", Kind::Read, answer(state_reply(&KeyState::new())));
    // Neither b nor c answers a repair.
    for node in ["b", "c"] {
        h.script.on(
            node,
            Kind::Replicate,
            late(
                Duration::from_secs(30),
                PeerResponse::Replica(ReplicaResponse::Ack),
            ),
        );
    }
    let resp = h
        .coordinator
        .get(Bytes::from_static(b"k"), get_opts(3, 1000))
        .await;
    assert_eq!(reply_values(&resp), BTreeSet::from(["from-a".to_string()]));
    let answered = Instant::now();
    while h.script.calls(Kind::Replicate).len() < 2 {
        assert!(
            answered.elapsed() < Duration::from_millis(500),
            "one repair waited for the other: {:?}",
            h.script.calls(Kind::Replicate)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (_, req) in h.script.calls(Kind::Replicate) {
        let PeerRequest::Replica(ReplicaRequest::Replicate { timeout_ms, .. }) = req else {
            unreachable!()
        };
        assert!(
            timeout_ms <= READ_REPAIR_TIMEOUT.as_millis() as u32,
            "{timeout_ms}"
        );
    }
}

#[tokio::test]
async fn a_reply_after_the_read_quorum_is_merged_later_and_repaired() {
    let h = harness(view(&ABC, "a", &["b", "c"]));
    let old = one_sibling(1, "old");
    h.holds("k", &old).await;
    let concurrent = one_sibling(2, "late");
    h.script.on("b", Kind::Read, answer(state_reply(&old)));
    h.script.on(
        "c",
        Kind::Read,
        late(Duration::from_millis(100), state_reply(&concurrent)),
    );
    h.script.on("b", Kind::Replicate, ack());
    h.script.on("c", Kind::Replicate, ack());
    let resp = h
        .coordinator
        .get(Bytes::from_static(b"k"), get_opts(2, 2000))
        .await;
    assert_eq!(
        reply_values(&resp),
        BTreeSet::from(["old".to_string()]),
        "answered at R=2"
    );
    assert!(
        h.script.calls(Kind::Replicate).is_empty(),
        "a and b agreed: nothing to repair yet"
    );
    let merged = old.sync(&concurrent);
    // The repairs to b and c go out together; either may be recorded first.
    eventually("the late sibling repaired onto b and c", || {
        h.script.replicated_to("b") == vec![merged.clone()]
            && h.script.replicated_to("c") == vec![merged.clone()]
    })
    .await;
}

#[tokio::test]
async fn a_read_with_too_many_failed_replicas_is_a_definite_unavailable() {
    let h = harness(view(&ABC, "a", &["b", "c"]));
    h.script.on("b", Kind::Read, failing());
    h.script.on(
        "c",
        Kind::Read,
        answer(PeerResponse::Replica(ReplicaResponse::State(
            Bytes::from_static(b"\xff garbage"),
        ))),
    );
    let resp = h
        .coordinator
        .get(Bytes::from_static(b"k"), get_opts(2, 1000))
        .await;
    let e = expect_unavailable(resp, (1, 2), "an undecodable replica state");
    assert!(e.definite);
}

/// The answer of a primary that coordinated a forwarded put with a dot of `actor`.
fn coordinated_put(actor: u64) -> Response {
    Response::Put(WriteReply {
        actor,
        counter: 9,
        body: None,
        primary_acks: 2,
        fallback_acks: 0,
    })
}

/// Node `a` of four, all up, and a key `a` does not replicate (its writes are forwarded), with
/// the key's primaries in order.
fn forwarding_harness() -> (Harness, String, Vec<NodeId>) {
    let v = view(&["a", "b", "c", "d"], "a", &["b", "c", "d"]);
    let key = (0..1000u32)
        .map(|i| format!("key-{i}"))
        .find(|k| !plan(&v, k.as_bytes(), 3).is_primary("a"))
        .expect("some key is not on a");
    let primaries = plan(&v, key.as_bytes(), 3).preference;
    (harness(v), key, primaries)
}

/// A forwarded write whose time ran out before the peer connection could send it did nothing:
/// the client is told so (definite), not that the outcome is unknown.
#[tokio::test]
async fn a_forward_whose_time_ran_out_unsent_is_definite() {
    let (h, key, primaries) = forwarding_harness();
    h.script.on(
        &primaries[0],
        Kind::Forward,
        Behaviour {
            delay: Duration::ZERO,
            reply: Err(PeerError::Expired(1000)),
        },
    );
    let resp = h.coordinator.write(put(&key, "v", 2, 1000)).await;
    let Response::Error(e) = &resp else {
        panic!("{resp:?}")
    };
    assert!(matches!(e.kind, ErrorKind::Timeout { .. }), "{e:?}");
    assert!(e.definite, "nothing was sent, so nothing was done: {e:?}");
    assert!(e.message.contains(&*primaries[0]), "{}", e.message);
}

#[tokio::test]
async fn a_write_for_a_key_this_node_does_not_replicate_is_forwarded_to_the_first_reachable_primary(
) {
    let (h, key, primaries) = forwarding_harness();
    let coordinated = coordinated_put(77);
    h.script.on(&primaries[0], Kind::Forward, unreachable());
    h.script
        .on(&primaries[1], Kind::Forward, coordinates(&coordinated));
    let resp = h.coordinator.write(put(&key, "v", 2, 1000)).await;
    assert_eq!(resp, coordinated, "the primary's answer is the client's");
    let forwards: Vec<String> = h
        .script
        .calls(Kind::Forward)
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(forwards, vec![addr(&primaries[0]), addr(&primaries[1])]);
    assert!(
        local(&h.store, &key).await.siblings().is_empty(),
        "a minted nothing"
    );
}

/// Found in review: a write forwarded by a node with a stale ring view to one that no longer
/// replicates the key was coordinated there anyway: the node minted a dot with a counter above
/// the versions it had handed over (its released copy no longer held them), and replicas that
/// merged the new state dropped an acknowledged sibling its context covered. Only a replica of
/// the key (in this node's own view) mints; the sender is told to retry, nothing was done.
#[tokio::test]
async fn a_write_forwarded_to_a_node_that_does_not_replicate_the_key_is_refused_not_minted() {
    let (h, key, primaries) = forwarding_harness();
    for p in &primaries {
        h.script.on(p, Kind::Replicate, ack());
    }
    let frame = put(&key, "v", 2, 1000).to_frame(0);
    let resp = h
        .coordinator
        .serve_peer(
            CoordinatorRequest::Forward {
                opcode: frame.opcode,
                body: frame.body,
            },
            Instant::now(),
        )
        .await;
    let PeerResponse::Coordinator(CoordinatorResponse::ForwardReply { opcode, body }) = resp else {
        panic!("{resp:?}")
    };
    let resp = Response::decode(opcode, body).unwrap();
    let e = expect_unavailable(resp, (0, 2), "does not replicate");
    assert!(e.definite, "nothing was done: {e:?}");
    assert!(e.message.contains(&key), "{}", e.message);
    assert!(
        h.script.calls(Kind::Replicate).is_empty(),
        "nothing shipped"
    );
    assert!(
        local(&h.store, &key).await.siblings().is_empty(),
        "a minted nothing"
    );
}

/// Found in review: the forwarding node answered a primary's "I do not replicate that key"
/// refusal to the client, although the next primary in its view could take the write.
#[tokio::test]
async fn a_forward_refused_by_a_node_that_does_not_replicate_the_key_goes_to_the_next() {
    let (h, key, primaries) = forwarding_harness();
    let refusal = Response::error(
        ErrorKind::Unavailable {
            alive: 0,
            needed: 2,
        },
        true,
        "does not replicate the key in its ring view",
    );
    let coordinated = coordinated_put(77);
    h.script
        .on(&primaries[0], Kind::Forward, coordinates(&refusal));
    h.script
        .on(&primaries[1], Kind::Forward, coordinates(&coordinated));
    let resp = h.coordinator.write(put(&key, "v", 2, 1000)).await;
    assert_eq!(resp, coordinated);
    // Every primary refusing: the refusal is the answer (definite).
    h.script
        .on(&primaries[1], Kind::Forward, coordinates(&refusal));
    h.script
        .on(&primaries[2], Kind::Forward, coordinates(&refusal));
    let resp = h.coordinator.write(put(&key, "v", 2, 1000)).await;
    assert_eq!(resp, refusal);
}

#[tokio::test]
async fn a_coordinator_that_cannot_write_hands_the_write_to_another_primary() {
    let h = harness(view(&ABC, "a", &["b", "c"]));
    h.engine.set_fail_writes(true);
    let coordinated = coordinated_put(5);
    for node in ["b", "c"] {
        h.script.on(node, Kind::Forward, coordinates(&coordinated));
    }
    let resp = h.coordinator.write(put("k", "v", 2, 1000)).await;
    assert_eq!(resp, coordinated);
    assert_eq!(h.coordinator.metrics.forwarded_after_local_failure.get(), 1);
    assert!(
        h.script.calls(Kind::Replicate).is_empty(),
        "nothing was shipped from a"
    );
    assert_eq!(h.script.calls(Kind::Forward).len(), 1, "handed over once");
}

const ABCDE: [&str; 5] = ["a", "b", "c", "d", "e"];

fn hint_stored() -> Behaviour {
    answer(PeerResponse::Handoff(HandoffResponse::HintStored))
}

/// A key `a` is a primary of, with the other two primaries and the first two fallbacks in
/// ring order (all nodes alive).
fn key_on_a() -> (String, Vec<NodeId>, Vec<NodeId>) {
    let all_up = view(&ABCDE, "a", &["b", "c", "d", "e"]);
    (0..1000u32)
        .map(|i| format!("key-{i}"))
        .find_map(|k| {
            let p = plan_with_fallbacks(&all_up, k.as_bytes(), 3, Some(2));
            p.is_primary("a").then(|| {
                let others = p.preference.into_iter().filter(|n| **n != *"a").collect();
                (k, others, p.fallbacks)
            })
        })
        .expect("a is a primary of some key")
}

fn alive_but(down: &[&NodeId]) -> ClusterView {
    let alive: Vec<&str> = ABCDE
        .iter()
        .copied()
        .filter(|n| *n != "a" && !down.iter().any(|d| ***d == **n))
        .collect();
    view(&ABCDE, "a", &alive)
}

fn hint_targets(script: &Script, fallback: &str) -> Vec<String> {
    script
        .calls(Kind::StoreHint)
        .into_iter()
        .filter(|(a, _)| *a == addr(fallback))
        .map(|(_, r)| match r {
            PeerRequest::Handoff(HandoffRequest::StoreHint { target, .. }) => target,
            _ => unreachable!(),
        })
        .collect()
}

#[tokio::test]
async fn a_down_primary_is_covered_by_a_fallback_hint_that_counts_toward_w() {
    let (key, others, fallbacks) = key_on_a();
    let (up, down) = (&others[0], &others[1]);
    let h = harness(alive_but(&[down]));
    h.script.on(up, Kind::Replicate, ack());
    h.script.on(&fallbacks[0], Kind::StoreHint, hint_stored());
    let resp = h.coordinator.write(put(&key, "v", 3, 1000)).await;
    let Response::Put(reply) = resp else {
        panic!("W=3 with one primary down succeeds through a fallback: {resp:?}")
    };
    assert_eq!((reply.primary_acks, reply.fallback_acks), (2, 1));
    assert_eq!(
        hint_targets(&h.script, &fallbacks[0]),
        vec![down.to_string()],
        "the first fallback in ring order keeps a hint naming the down primary"
    );
    assert!(
        h.script
            .calls(Kind::Replicate)
            .iter()
            .all(|(a, _)| *a != addr(down)),
        "nothing is sent to a primary known to be down"
    );
}

#[tokio::test]
async fn pw_refuses_before_writing_when_too_few_primaries_are_up() {
    let (key, others, fallbacks) = key_on_a();
    let h = harness(alive_but(&[&others[1]]));
    h.script.on(&others[0], Kind::Replicate, ack());
    h.script.on(&fallbacks[0], Kind::StoreHint, hint_stored());
    let mut req = put(&key, "v", 2, 1000);
    if let Request::Put { opts, .. } = &mut req {
        opts.pw = 3;
    }
    let resp = h.coordinator.write(req).await;
    assert_refused_up_front(&h, &key, resp, (2, 3), "PW=3").await;
}

#[tokio::test]
async fn a_failing_primary_is_replaced_by_its_spare_fallback() {
    let (key, others, fallbacks) = key_on_a();
    let h = harness(alive_but(&[]));
    h.script.on(&others[0], Kind::Replicate, ack());
    h.script.on(&others[1], Kind::Replicate, failing());
    for f in &fallbacks {
        h.script.on(f, Kind::StoreHint, hint_stored());
    }
    let resp = h.coordinator.write(put(&key, "v", 3, 1000)).await;
    let Response::Put(reply) = resp else {
        panic!("{resp:?}")
    };
    assert_eq!((reply.primary_acks, reply.fallback_acks), (2, 1));
    let hinted: Vec<String> = fallbacks
        .iter()
        .flat_map(|f| hint_targets(&h.script, f))
        .collect();
    assert_eq!(
        hinted,
        vec![others[1].to_string()],
        "one hint, for the failing primary"
    );
}

#[tokio::test]
async fn a_slow_primary_gets_a_hint_on_its_fallback_at_half_the_deadline() {
    let (key, others, fallbacks) = key_on_a();
    let h = harness(alive_but(&[]));
    h.script.on(&others[0], Kind::Replicate, ack());
    h.script.on(
        &others[1],
        Kind::Replicate,
        late_ack(Duration::from_secs(5)),
    );
    for f in &fallbacks {
        h.script.on(f, Kind::StoreHint, hint_stored());
    }
    let resp = h.coordinator.write(put(&key, "v", 3, 400)).await;
    let Response::Put(reply) = resp else {
        panic!("{resp:?}")
    };
    assert_eq!((reply.primary_acks, reply.fallback_acks), (2, 1));
}

#[tokio::test]
async fn a_down_primary_without_a_fallback_gets_a_hint_here_in_the_write_batch() {
    // Three nodes: no node beyond the preference list can stand in for c.
    let h = harness(view(&ABC, "a", &["b"]));
    h.script.on("b", Kind::Replicate, ack());
    let resp = h.coordinator.write(put("k", "v", 2, 1000)).await;
    let Response::Put(reply) = resp else {
        panic!("{resp:?}")
    };
    assert_eq!((reply.primary_acks, reply.fallback_acks), (2, 0));
    let row = h
        .store
        .read_hint("c", b"k")
        .await
        .unwrap()
        .expect("a hint for c");
    let (_, hinted) = crate::storage::hints::decode_hint(b"k", &row).unwrap();
    assert_eq!(
        hinted,
        local(&h.store, "k").await,
        "the hint is the written state"
    );
    assert_eq!(h.store.hint_book().target("c").keys, 1);
    assert!(h.store.read_hint("b", b"k").await.unwrap().is_none());
}

#[tokio::test]
async fn a_sloppy_read_counts_fallback_hints_and_pr_refuses_it() {
    let (key, others, fallbacks) = key_on_a();
    // Both other primaries down: R=2 needs one fallback's hint.
    let h = harness(alive_but(&[&others[0], &others[1]]));
    let hinted = one_sibling(9, "hinted");
    for f in &fallbacks {
        h.script.on(
            f,
            Kind::ReadHint,
            answer(PeerResponse::Handoff(HandoffResponse::HintState(
                Bytes::from(hinted.encode()),
            ))),
        );
    }
    let resp = h
        .coordinator
        .get(Bytes::from(key.clone()), get_opts(2, 1000))
        .await;
    assert_eq!(reply_values(&resp), BTreeSet::from(["hinted".to_string()]));
    assert_eq!(
        h.script.calls(Kind::ReadHint).len(),
        2,
        "one per down primary"
    );
    let mut opts = get_opts(2, 1000);
    opts.pr = 2;
    let resp = h.coordinator.get(Bytes::from(key), opts).await;
    expect_unavailable(resp, (1, 2), "PR=2 with one primary up");
}

/// A fallback holds its hints by (target, key), and which fallback a read pairs with which
/// down primary need not be the pairing the write made (primaries that went down since, a
/// spare that stood in for a slow primary). Asked for one primary's hint, a fallback answers
/// with every hint it holds for the key: before (found in review), a read that paired this
/// node with the other down primary missed the acknowledged write its hint held, and
/// returned the live primary's stale copy.
#[tokio::test]
async fn a_fallback_answers_a_sloppy_read_with_every_hint_it_holds_for_the_key() {
    // A key "a" does not replicate, whose first two primaries are down, with "a" their first
    // fallback: the read pairs "a" with the first, and "a" holds a hint for the second.
    let all_up = view(&ABCDE, "a", &["b", "c", "d", "e"]);
    let (key, first, second, live, other_fallback) = (0..1000u32)
        .map(|i| format!("key-{i}"))
        .find_map(|k| {
            let p = plan_with_fallbacks(&all_up, k.as_bytes(), 3, Some(2));
            if p.is_primary("a") {
                return None;
            }
            let (first, second, live) = (
                p.preference[0].clone(),
                p.preference[1].clone(),
                p.preference[2].clone(),
            );
            let down = alive_but(&[&first, &second]);
            let read = crate::coordinator::plan::plan(&down, k.as_bytes(), 3);
            (read.fallbacks.len() == 2 && *read.fallbacks[0] == *"a")
                .then(|| (k, first, second, live, read.fallbacks[1].clone()))
        })
        .expect("some key pairs a with its first down primary");
    let h = harness(alive_but(&[&first, &second]));
    let hinted = one_sibling(9, "acknowledged");
    h.store
        .write(WriteOp::Hint {
            target: second.to_string(),
            key: Bytes::from(key.clone()),
            state: hinted.clone(),
            last_copy: true,
        })
        .await
        .unwrap();
    h.script.on(
        &other_fallback,
        Kind::ReadHint,
        answer(PeerResponse::Handoff(HandoffResponse::HintState(
            Bytes::from(KeyState::new().encode()),
        ))),
    );
    h.script
        .on(&live, Kind::Read, answer(state_reply(&KeyState::new())));
    h.script.on(&live, Kind::Replicate, ack());
    let resp = h
        .coordinator
        .get(Bytes::from(key.clone()), get_opts(2, 1000))
        .await;
    assert_eq!(
        reply_values(&resp),
        BTreeSet::from(["acknowledged".to_string()]),
        "paired with {first}, a holds the hint for {second}"
    );
}

/// A delete without a context deletes everything its quorum read returned, the siblings a
/// client's reply would not show included: the read's merged state can exceed what one reply
/// shows (`MAX_STATE_SIBLINGS`), and a tombstone with the reply's context left the hidden ones
/// readable (found in review).
#[tokio::test]
async fn a_delete_without_context_covers_siblings_a_reply_would_hide() {
    let many = |actor: u64, count: u64| {
        (1..=count).fold(KeyState::new(), |s, counter| {
            s.update(
                &VersionVector::new(),
                Dot { actor, counter },
                5,
                Some(Bytes::from(format!("v{actor}-{counter}"))),
            )
        })
    };
    let ours = many(1, 250);
    let theirs = many(2, 250);
    assert!(
        ours.sync(&theirs).client_view().hidden > 0,
        "the merged read is more than a reply shows"
    );
    let h = harness(view(&ABC, "a", &["b", "c"]));
    h.holds("k", &ours).await;
    h.script.on("b", Kind::Read, answer(state_reply(&theirs)));
    // c fails: the read is a's copy and b's.
    h.script.on("c", Kind::Read, failing());
    h.script.on("b", Kind::Replicate, ack());
    h.script.on("c", Kind::Replicate, ack());
    let delete = Request::Delete {
        key: Bytes::from_static(b"k"),
        context: Bytes::new(),
        opts: WriteOptions {
            w: 2,
            timeout_ms: 1000,
            flags: 0,
            pw: 0,
        },
    };
    let resp = h.coordinator.write(delete).await;
    assert!(matches!(resp, Response::Delete(_)), "{resp:?}");
    // b merges all it was sent (a read repair, then the tombstone).
    let at_b = h
        .script
        .replicated_to("b")
        .iter()
        .fold(theirs.clone(), |s, shipped| s.sync(shipped));
    assert!(
        values(&at_b).is_empty(),
        "left readable at b: {} siblings",
        values(&at_b).len()
    );
}

#[tokio::test]
async fn a_delete_without_context_reads_primaries_only() {
    let (key, others, fallbacks) = key_on_a();
    let h = harness(alive_but(&[&others[0], &others[1]]));
    for f in &fallbacks {
        h.script.on(
            f,
            Kind::ReadHint,
            answer(PeerResponse::Handoff(HandoffResponse::HintState(
                Bytes::from(KeyState::new().encode()),
            ))),
        );
    }
    let delete = Request::Delete {
        key: Bytes::from(key.clone()),
        context: Bytes::new(),
        opts: WriteOptions {
            w: 1,
            timeout_ms: 1000,
            flags: 0,
            pw: 0,
        },
    };
    let resp = h.coordinator.write(delete).await;
    let e = expect_unavailable(
        resp,
        (1, 2),
        "a fallback's hint must not stand in for the delete's read",
    );
    assert!(e.definite, "{}", e.message);
    assert!(h.script.calls(Kind::ReadHint).is_empty());
    assert!(
        local(&h.store, &key).await.siblings().is_empty(),
        "nothing was written"
    );
}

/// A key whose preference list, with "a" moved to the front, asks `first` before `second`.
fn key_asking(v: &ClusterView, first: &str, second: &str) -> String {
    (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| {
            let p = crate::coordinator::plan::plan(v, k.as_bytes(), 3).primaries_alive;
            let others: Vec<&str> = p.iter().map(|n| &**n).filter(|n| *n != "a").collect();
            others == [first, second]
        })
        .expect("some key orders b and c either way")
}

#[tokio::test]
async fn a_quorum_read_asks_this_node_and_r_minus_one_other_replica() {
    let v = view(&ABC, "a", &["b", "c"]);
    let key = key_asking(&v, "b", "c");
    let h = harness_quorum_reads(v);
    h.holds(&key, &one_sibling(1, "x")).await;
    h.script
        .on("b", Kind::Read, answer(state_reply(&one_sibling(1, "x"))));
    h.script
        .on("c", Kind::Read, answer(state_reply(&one_sibling(1, "x"))));
    let resp = h
        .coordinator
        .get(Bytes::from(key.clone()), get_opts(2, 1000))
        .await;
    assert_eq!(reply_values(&resp), BTreeSet::from(["x".to_string()]));
    let asked: Vec<String> = h
        .script
        .calls(Kind::Read)
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(
        asked,
        vec![addr("b")],
        "a (local) and b make R=2; c is not asked"
    );
    assert_eq!(h.coordinator.metrics.read_spares.get(), 0);
    // R=3 asks everyone.
    let resp = h.coordinator.get(Bytes::from(key), get_opts(3, 1000)).await;
    assert_eq!(reply_values(&resp), BTreeSet::from(["x".to_string()]));
    assert_eq!(h.script.calls(Kind::Read).len(), 3);
}

#[tokio::test]
async fn a_failed_replica_read_starts_the_spare_at_once() {
    let v = view(&ABC, "a", &["b", "c"]);
    let key = key_asking(&v, "b", "c");
    let h = harness_quorum_reads(v);
    h.script.on("b", Kind::Read, failing());
    h.script.on(
        "c",
        Kind::Read,
        answer(state_reply(&one_sibling(2, "from-c"))),
    );
    h.script.on("c", Kind::Replicate, ack());
    let resp = h.coordinator.get(Bytes::from(key), get_opts(2, 1000)).await;
    assert_eq!(
        reply_values(&resp),
        BTreeSet::from(["from-c".to_string()]),
        "{resp:?}"
    );
    assert_eq!(h.coordinator.metrics.read_spares.get(), 1);
}

#[tokio::test]
async fn a_slow_replica_read_gets_a_speculative_spare() {
    let v = view(&ABC, "a", &["b", "c"]);
    let key = key_asking(&v, "b", "c");
    let h = harness_quorum_reads(v);
    // b answers after 500 ms, far beyond the 20 ms speculation delay; c at once.
    h.script.on(
        "b",
        Kind::Read,
        late(
            Duration::from_millis(500),
            state_reply(&one_sibling(3, "from-b")),
        ),
    );
    h.script.on(
        "c",
        Kind::Read,
        answer(state_reply(&one_sibling(2, "from-c"))),
    );
    h.script.on("b", Kind::Replicate, ack());
    h.script.on("c", Kind::Replicate, ack());
    let resp = h.coordinator.get(Bytes::from(key), get_opts(2, 2000)).await;
    assert_eq!(
        reply_values(&resp),
        BTreeSet::from(["from-c".to_string()]),
        "answered by a and the spare c, before b's reply"
    );
    assert_eq!(h.coordinator.metrics.read_spares.get(), 1);
    // b's late reply is still merged and repaired onto the others.
    let merged = one_sibling(2, "from-c").sync(&one_sibling(3, "from-b"));
    eventually("b's late sibling repaired onto c", || {
        h.script.replicated_to("c").contains(&merged)
    })
    .await;
}

#[tokio::test]
async fn during_a_ring_change_a_write_needs_w_among_the_next_replicas_too() {
    // W=2 among a, b, c is met (a and b), but among the next replicas only a holds it: after
    // the switch an R=2 read from c and d would miss an acknowledged write.
    let h = harness(b_replaced_by_d(&["b", "c", "d"]));
    h.script.on("b", Kind::Replicate, ack());
    h.script.on("c", Kind::Replicate, failing());
    h.script.on("d", Kind::Replicate, failing());
    let resp = h.coordinator.write(put("k", "v", 2, 1000)).await;
    let e = expect_unavailable(
        resp,
        (1, 2),
        "W=2 held by one next replica must not be acknowledged",
    );
    assert!(e.message.contains("next ring"), "{}", e.message);
    assert!(!e.definite, "a and b hold the version: {}", e.message);
    assert_eq!(h.script.replicated_to("d").len(), 1, "d was sent the write");
}

#[tokio::test]
async fn during_a_ring_change_a_write_with_w_in_both_rings_succeeds_and_counts_current_acks() {
    let h = harness(b_replaced_by_d(&["b", "c", "d"]));
    h.script.on("b", Kind::Replicate, ack());
    h.script.on("c", Kind::Replicate, failing());
    h.script.on("d", Kind::Replicate, ack());
    let resp = h.coordinator.write(put("k", "v", 2, 1000)).await;
    let Response::Put(reply) = resp else {
        panic!("a and b (current), a and d (next): W=2 in both: {resp:?}")
    };
    assert_eq!(
        (reply.primary_acks, reply.fallback_acks),
        (2, 0),
        "the reply counts the current replicas' acks"
    );
    let mine = local(&h.store, "k").await;
    assert_eq!(h.script.replicated_to("d"), vec![mine], "d holds the state");
}

#[tokio::test]
async fn during_a_ring_change_a_silent_next_replica_times_the_write_out() {
    // The current replicas a and b answer; among the next ones only a does before the deadline.
    let h = harness(b_replaced_by_d(&["b", "c", "d"]));
    h.script.on("b", Kind::Replicate, ack());
    h.script.on("c", Kind::Replicate, failing());
    h.script
        .on("d", Kind::Replicate, late_ack(Duration::from_secs(5)));
    match h.coordinator.write(put("k", "v", 2, 200)).await {
        Response::Error(e) => {
            assert_eq!(
                e.kind,
                ErrorKind::Timeout { acks: 1, needed: 2 },
                "{}",
                e.message
            );
            assert!(
                e.message.contains("next ring") && !e.definite,
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn during_a_ring_change_a_write_is_refused_up_front_when_too_few_next_replicas_are_up() {
    // Only b is up besides this node: W=2 among a, b, c could be met, among a, c, d it cannot.
    let h = harness(b_replaced_by_d(&["b"]));
    let resp = h.coordinator.write(put("k", "v", 2, 1000)).await;
    assert_refused_up_front(&h, "k", resp, (1, 2), "next ring").await;
}

/// b leaves a ring of four: a key whose replicas are a, b, c (d is their fallback) has a, c,
/// d next. With c down its fallback is d, itself a next replica: d can ack once, so W=3 among
/// a, c, d cannot be met and the write is refused before anything is written (before, c's
/// fallback and d counted as two, the write was minted, and it timed out indefinite).
#[tokio::test]
async fn during_a_ring_change_a_fallback_that_is_a_next_replica_counts_once() {
    let v = view_changing(&["a", "b", "c", "d"], &["a", "c", "d"], "a", &["b", "d"]);
    let key = (0..1000u32)
        .map(|i| format!("key-{i}"))
        .find(|k| {
            let p = plan_with_fallbacks(&v, k.as_bytes(), 3, Some(1));
            let mut pref: Vec<&str> = p.preference.iter().map(|n| &**n).collect();
            pref.sort();
            pref == ["a", "b", "c"]
        })
        .expect("some key has a, b, c as replicas");
    let h = harness(v);
    h.script.on("b", Kind::Replicate, ack());
    h.script.on("d", Kind::Replicate, ack());
    h.script.on("d", Kind::StoreHint, hint_stored());
    let resp = h.coordinator.write(put(&key, "v", 3, 1000)).await;
    assert_refused_up_front(&h, &key, resp, (2, 3), "next ring").await;
}
