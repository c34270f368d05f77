//! Property tests of the message codec: every message round-trips through a frame, and arbitrary
//! bytes never panic the frame decoder or the message decoders.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use ringkv_protocol::message::opcode;
use ringkv_protocol::*;
use tokio_util::codec::{Decoder, Encoder};

fn bytes_strategy(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn request_strategy() -> impl Strategy<Value = Request> {
    let ropts = (any::<u8>(), any::<u32>(), any::<u8>(), any::<u8>()).prop_map(
        |(r, timeout_ms, flags, pr)| ReadOptions {
            r,
            timeout_ms,
            flags,
            pr,
        },
    );
    let wopts = || {
        (any::<u8>(), any::<u32>(), any::<u8>(), any::<u8>()).prop_map(
            |(w, timeout_ms, flags, pw)| WriteOptions {
                w,
                timeout_ms,
                flags,
                pw,
            },
        )
    };
    prop_oneof![
        Just(Request::Ping),
        Just(Request::Status),
        Just(Request::Ring),
        Just(Request::Members),
        Just(Request::Repair { range: None }),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Request::Repair {
            range: Some((a.min(b), a.max(b)))
        }),
        (bytes_strategy(64), ropts).prop_map(|(key, opts)| Request::Get { key, opts }),
        (
            bytes_strategy(64),
            bytes_strategy(256),
            bytes_strategy(64),
            wopts()
        )
            .prop_map(|(key, value, context, opts)| Request::Put {
                key,
                value,
                context,
                opts
            }),
        (bytes_strategy(64), bytes_strategy(64), wopts())
            .prop_map(|(key, context, opts)| { Request::Delete { key, context, opts } }),
    ]
}

fn read_reply_strategy() -> impl Strategy<Value = ReadReply> {
    let sibling = (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(bytes_strategy(64)),
    )
        .prop_map(|(actor, counter, timestamp_ms, value)| Sibling {
            actor,
            counter,
            timestamp_ms,
            value,
        });
    (
        proptest::collection::vec(sibling, 0..5),
        bytes_strategy(40),
        any::<u32>(),
    )
        .prop_map(|(siblings, context, hidden)| ReadReply {
            siblings,
            context,
            hidden,
        })
}

fn response_strategy() -> impl Strategy<Value = Response> {
    let write = || {
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(read_reply_strategy()),
            any::<u8>(),
            any::<u8>(),
        )
            .prop_map(
                |(actor, counter, body, primary_acks, fallback_acks)| WriteReply {
                    actor,
                    counter,
                    body,
                    primary_acks,
                    fallback_acks,
                },
            )
    };
    let kind = (0u16..14, any::<u64>(), any::<u64>()).prop_map(|(code, a, b)| match code {
        0 => ErrorKind::TooLarge { size: a, limit: b },
        1 => ErrorKind::Malformed,
        2 => ErrorKind::UnsupportedVersion {
            got: a,
            supported: b,
        },
        3 => ErrorKind::Overloaded { retry_after_ms: a },
        4 => ErrorKind::Internal,
        5 => ErrorKind::Timeout { acks: a, needed: b },
        6 => ErrorKind::Unavailable {
            alive: a,
            needed: b,
        },
        7 => ErrorKind::InvalidRequest,
        8 => ErrorKind::TooManySiblings { count: a, limit: b },
        9 => ErrorKind::WrongCluster,
        10 => ErrorKind::Unauthenticated,
        11 => ErrorKind::NotServing,
        _ => ErrorKind::Unknown { code: 1000 + code },
    });
    let member = (
        "[a-z0-9]{1,8}",
        0..=ringkv_protocol::limits::MAX_VNODES,
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(node_id, tokens, primary_ppm, alive)| RingMember {
            client_addr: format!("{node_id}:1"),
            peer_addr: format!("{node_id}:2"),
            tokens_of: node_id.clone(),
            node_id,
            tokens,
            primary_ppm,
            alive,
        });
    let ring = (
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u64>(),
        proptest::collection::vec(member, 0..5),
    )
        .prop_map(|(n, r, w, epoch, members)| {
            Response::Ring(RingReply {
                n,
                r,
                w,
                epoch,
                members,
            })
        });
    let status = (
        "[a-z0-9]{1,8}",
        0u8..3,
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(node_id, swim_state, incarnation, generation, phi_milli, last_heard_ms, flag)| {
                MemberStatus {
                    client_addr: format!("{node_id}:1"),
                    peer_addr: format!("{node_id}:2"),
                    gossip_addr: format!("{node_id}:3"),
                    node_id,
                    swim_state,
                    incarnation,
                    generation,
                    phi_milli,
                    last_heard_ms,
                    ring_status: 1,
                    vnodes: 256,
                    available: flag,
                    is_self: !flag,
                }
            },
        );
    let members = (any::<u32>(), proptest::collection::vec(status, 0..4)).prop_map(
        |(phi_threshold_milli, members)| {
            Response::Members(MembersReply {
                phi_threshold_milli,
                members,
            })
        },
    );
    prop_oneof![
        ring,
        members,
        Just(Response::Pong),
        read_reply_strategy().prop_map(Response::Get),
        write().prop_map(Response::Put),
        write().prop_map(Response::Delete),
        (kind, any::<bool>(), "[a-z ]{0,40}").prop_map(|(kind, definite, message)| {
            Response::Error(ErrorReply {
                kind,
                definite,
                message,
            })
        }),
        (
            "[a-z0-9]{1,10}",
            any::<u64>(),
            proptest::collection::vec(("[a-z.]{1,12}", any::<u64>()), 0..5),
            proptest::collection::vec(("[a-z.]{1,12}", "[ -~]{0,20}"), 0..5)
        )
            .prop_map(|(node_id, uptime_ms, metrics, info)| {
                Response::Status(StatusReply {
                    node_id,
                    server_version: "0.1.0".into(),
                    uptime_ms,
                    metrics,
                    info,
                })
            }),
    ]
}

fn through_codec(frame: Frame, max: usize) -> Frame {
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    codec.encode(frame, &mut buf).unwrap();
    match codec.decode(&mut buf).unwrap() {
        Some(Inbound::Frame(f)) => f,
        other => panic!("expected a frame, got {other:?}"),
    }
}

proptest! {
    #[test]
    fn requests_round_trip(req in request_strategy(), id in any::<u64>()) {
        let frame = through_codec(req.to_frame(id), limits::MAX_REQUEST_BODY_LEN);
        prop_assert_eq!(frame.request_id, id);
        prop_assert_eq!(Request::decode(frame.opcode, frame.body).unwrap(), req);
    }

    #[test]
    fn responses_round_trip(resp in response_strategy(), id in any::<u64>()) {
        let frame = through_codec(resp.to_frame(id), limits::MAX_RESPONSE_BODY_LEN);
        prop_assert_eq!(frame.request_id, id);
        prop_assert_eq!(Response::decode(frame.opcode, frame.body).unwrap(), resp);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(data in proptest::collection::vec(any::<u8>(), 0..512),
                                                  op in any::<u8>()) {
        let mut codec = FrameCodec::new(256);
        let mut buf = BytesMut::from(&data[..]);
        // Drain until the decoder wants more input or reports a fatal error.
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
        let _ = Request::decode(op, Bytes::from(data.clone()));
        let _ = Response::decode(op, Bytes::from(data));
    }

    #[test]
    fn valid_header_with_garbage_body_is_a_decode_error_not_a_panic(
        body in proptest::collection::vec(any::<u8>(), 0..128),
        op in prop_oneof![Just(opcode::GET), Just(opcode::PUT), Just(opcode::DELETE),
                          Just(opcode::GET_REPLY), Just(opcode::STATUS_REPLY), Just(opcode::ERROR)]) {
        let frame = through_codec(Frame { opcode: op, request_id: 1, body: Bytes::from(body) }, 1024);
        let _ = Request::decode(frame.opcode, frame.body.clone());
        let _ = Response::decode(frame.opcode, frame.body);
    }
}

#[test]
fn forged_sibling_count_does_not_allocate() {
    // count = 100 siblings but only 4 bytes follow: must be a clean error.
    let mut body = BytesMut::new();
    body.extend_from_slice(&100u32.to_be_bytes());
    body.extend_from_slice(&[0, 0, 0, 0]);
    let err = Response::decode(opcode::GET_REPLY, body.freeze()).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated { .. }), "{err}");
}

#[test]
fn validate_reports_too_large_key_and_value() {
    let big_key = Request::Get {
        key: Bytes::from(vec![b'k'; limits::MAX_KEY_LEN + 1]),
        opts: ReadOptions::default(),
    };
    let (kind, msg) = big_key.validate().unwrap_err();
    assert_eq!(
        kind,
        ErrorKind::TooLarge {
            size: limits::MAX_KEY_LEN as u64 + 1,
            limit: limits::MAX_KEY_LEN as u64
        }
    );
    assert!(msg.contains("key"), "{msg}");
    let big_value = Request::Put {
        key: Bytes::from_static(b"k"),
        value: Bytes::from(vec![0u8; limits::MAX_VALUE_LEN + 1]),
        context: Bytes::new(),
        opts: WriteOptions::default(),
    };
    assert!(matches!(
        big_value.validate(),
        Err((ErrorKind::TooLarge { .. }, _))
    ));
    let empty = Request::Get {
        key: Bytes::new(),
        opts: ReadOptions::default(),
    };
    assert_eq!(empty.validate().unwrap_err().0, ErrorKind::InvalidRequest);
}
